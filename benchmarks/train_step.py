"""Train-step throughput per patch-size bucket, and what the patch schedule saves.

  python benchmarks/train_step.py --config=configs/demo.py                    # CPU, tiny model
  python benchmarks/train_step.py --config=configs/ffhq64.py --config.train.batch_size=64 \
      --config.model.dtype=bfloat16                                          # GPU / TPU
  python benchmarks/train_step.py --config=configs/imagenet256.py \
      --config.train.batch_per_device=128                                    # accumulation

For every bucket (R/4, R/2, R): the global batch of that bucket (batch * R/s), the median step
time over --steps timed steps (each waited for; a step is the bucket's gradient program and the
update program, as the trainer runs it), samples/s, the model's FLOPs per step (convolutions
and matrix products of the forward and backward passes, counted from the jaxpr: XLA's cost
analysis misses the cuDNN calls on GPU), achieved FLOP/s (and MFU where the peak is known or
given with --peak_tflops), XLA's memory estimate of the gradient program (arguments +
temporaries per device), the device's peak bytes in use so far, and the gradient program's
compile time (the update program that all buckets share is compiled once; its time is printed
apart). Then the expected step time under the stochastic schedule for p = 0.5 relative to
p = 1.0 (EDM) next to the ideal ratio from FLOPs, per step and per counted image (as the paper
counts images, a step counts batch * mean batch_mul images). Uses random data on the device:
the input pipeline is measured by benchmarks/input_pipeline.py. With
--config.train.batch_per_device, each bucket's step accumulates over the `rounds` micro-batches
the trainer would use (the `rounds` column): the step time is that of the whole global batch,
the memory that of the micro-batches.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from patchdiff import accumulation, patches, programs, train  # noqa: E402  pylint: disable=wrong-import-position

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file")
_STEPS = flags.DEFINE_integer("steps", 10, "timed steps per bucket (after --warmup)")
_WARMUP = flags.DEFINE_integer("warmup", 2, "untimed steps per bucket")
_SIZES = flags.DEFINE_list("sizes", None, "buckets to measure (default: all of the schedule's)")
_PEAK = flags.DEFINE_float("peak_tflops", None, "the device's peak TFLOP/s for MFU (default: "
                           "known dense bf16 peaks of H100/H200/A100, none on CPU)")
_JSON = flags.DEFINE_string("json", None, "also write the per-bucket figures to this JSON file")
flags.mark_flags_as_required(["config"])

# Dense bf16 tensor-core peaks per device (vendor data sheets, SXM parts).
_KNOWN_PEAKS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def _peak_flops(device) -> float | None:
  if _PEAK.value:
    return _PEAK.value * 1e12
  kind = getattr(device, "device_kind", "")
  return next((v for k, v in _KNOWN_PEAKS.items() if k in kind), None)


def _peak_bytes(device) -> float | None:
  try:
    stats = device.memory_stats() or {}
  except Exception:  # pylint: disable=broad-except
    return None
  return stats.get("peak_bytes_in_use")


def main(argv):
  del argv
  cfg = _CONFIG.value
  run = train.Run(cfg)
  device = jax.devices()[0]
  peak = _peak_flops(device)
  sizes = [int(v) for v in _SIZES.value] if _SIZES.value else list(run.schedule.sizes)
  r = run.schedule.resolution
  print(f"JAX {jax.__version__}, {jax.device_count()} x {device.device_kind}, "
        f"model.dtype={run.model_cfg['dtype']}, batch {cfg.train.batch_size}, mesh "
        f"{dict(run.mesh.shape)}, params/state {cfg.mesh.param_sharding}, batch_per_device "
        f"{cfg.train.get('batch_per_device')}")
  state = run.init_state()
  rng = np.random.default_rng(0)
  t0 = time.perf_counter()
  step_programs = programs.Programs(run)
  apply = step_programs.update_program()  # compiled once for all buckets
  print(f"compiled the update program in {time.perf_counter() - t0:.1f} s", flush=True)
  rows = {}
  for size in sizes:
    spec = step_programs.batch_spec(size)
    print(f"compiling the {size}px step ...", flush=True)
    t0 = time.perf_counter()
    traced = step_programs.trace_grad(size)  # one trace: compiled, and its FLOPs counted
    grad = traced.lower().compile()
    compile_s = time.perf_counter() - t0
    compiled = programs.Step(grad, apply)
    st = programs.program_stats(grad)
    b = spec["image"].shape[0]
    batch = run.to_device(step_programs.random_batch(size, rng))
    hyper = run.hyper(0, size)
    for _ in range(_WARMUP.value):
      state, m = compiled(state, batch, hyper)
      jax.block_until_ready(m)
    times = []
    for _ in range(_STEPS.value):
      t0 = time.perf_counter()
      state, m = compiled(state, batch, hyper)
      jax.block_until_ready(m)
      times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    flops = programs.jaxpr_flops(traced.jaxpr)
    rounds = accumulation.rounds_per_bucket(run.schedule, run.cfg.train, run.mesh.devices.size,
                                            sizes=(size,))[size]
    rows[size] = row = dict(batch=b, rounds=rounds, seconds=med, flops=flops,
                            compile_s=compile_s, xla_bytes=st["argument_bytes"] + st["temp_bytes"],
                            peak_bytes=_peak_bytes(device))
    if len(rows) == 1:
      print(f"{'bucket':>7} {'batch':>6} {'rounds':>6} {'step ms':>9} {'samples/s':>10} "
            f"{'GFLOP/step':>11} {'TFLOP/s':>8} {'MFU':>6} {'XLA MiB':>8} {'peak MiB':>9} "
            f"{'compile s':>9}",
            flush=True)
    achieved = row["flops"] / row["seconds"]
    mfu = f"{100 * achieved / peak:5.1f}%" if peak else "    -"
    peak_mib = f"{row['peak_bytes'] / 2**20:9.0f}" if row["peak_bytes"] else "        -"
    print(f"{size:>5}px {row['batch']:>6} {row['rounds']:>6} {1e3 * row['seconds']:>9.2f} "
          f"{row['batch'] / row['seconds']:>10.0f} {row['flops'] / 1e9:>11.1f} "
          f"{achieved / 1e12:>8.3f} {mfu:>6} {row['xla_bytes'] / 2**20:>8.0f} {peak_mib} "
          f"{row['compile_s']:>9.1f}", flush=True)
  if _JSON.value:
    with open(_JSON.value, "w", encoding="utf-8") as f:
      json.dump({str(k): v for k, v in rows.items()}, f, indent=1)
  if tuple(sizes) == tuple(run.schedule.sizes) and len(sizes) > 1:
    full = rows[r]
    for p in (0.5,):
      probs = patches.default_patch_probs(p, len(sizes))
      t = sum(q * rows[s]["seconds"] for s, q in zip(sizes, probs))
      f = sum(q * rows[s]["flops"] for s, q in zip(sizes, probs))
      imgs = sum(q * patches.batch_mul(s, r) for s, q in zip(sizes, probs))
      print(f"p={p} vs p=1.0 (probabilities {dict(zip(sizes, probs))}): expected step time "
            f"{t / full['seconds']:.3f}x (ideal from FLOPs {f / full['flops']:.3f}x); per "
            f"counted image ({imgs:.2f}x images per step) {t / full['seconds'] / imgs:.3f}x "
            f"(ideal {f / full['flops'] / imgs:.3f}x)")


if __name__ == "__main__":
  app.run(main)
