"""Run by test_sharding.py in a process with 8 fake CPU devices; prints one JSON line of results.

1. The same global batches through the train step on 1 device, on 8 (data layout, replicated
   state) and on 8 with the state split along fsdp: the parameters agree.
2. The fsdp-layout state, checkpointed, restores on 1 device and on a 4-device data layout
   (training and sampling targets) with the same values.
3. Sampling sharded over 8 devices gives each seed the image one device gives it.
"""
import json
import os
import sys
import tempfile

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

sys.path.insert(0, os.path.dirname(__file__))
from test_train import tiny_config  # pylint: disable=wrong-import-position

# pylint: disable-next=wrong-import-position
from patchdiff import checkpoint, generate, patches, programs, train

SIZES = (8, 8, 8)  # one bucket (each layout compiles what it runs: ~12 s a program here)


def batches(cfg):
  rng = np.random.default_rng(0)
  out = []
  for size in SIZES:
    b = cfg.train.batch_size * patches.batch_mul(size, cfg.model.img_resolution)
    offsets = rng.integers(0, cfg.model.img_resolution - size + 1, (b, 2))
    pos = patches.coord_grid(offsets[:, 0], offsets[:, 1], size, cfg.model.img_resolution)
    out.append(dict(image=rng.integers(0, 256, (b, size, size, 3), dtype=np.uint8), pos=pos))
  return out


def layout(data, fsdp, param_sharding, **overrides):
  return tiny_config(**{"mesh.data": data, "mesh.fsdp": fsdp,
                        "mesh.param_sharding": param_sharding, "train.batch_size": 8,
                        "train.lr": 1e-3, **overrides})


def train_steps(cfg, devices, state0):
  run = train.Run(cfg, devices)
  state = jax.device_put(state0, run.state_shardings)
  step_programs = programs.Programs(run)
  compiled = {s: step_programs.compile_step(s) for s in set(SIZES)}
  for step, (size, batch) in enumerate(zip(SIZES, batches(cfg))):
    state, _ = compiled[size](state, run.to_device(batch), run.hyper(step, size))
  return run, state


def max_rel(a, b):
  errs = jax.tree_util.tree_map(
      lambda x, y: float(np.linalg.norm(np.asarray(x, np.float64) - np.asarray(y, np.float64))
                         / max(np.linalg.norm(np.asarray(y, np.float64)), 1e-12)), a, b)
  return max(jax.tree_util.tree_leaves(errs))


def main():
  devices = jax.devices()
  assert len(devices) == 8, devices
  results = {}
  single = train.Run(layout(1, 1, "replicated"), devices[:1])
  state0 = jax.device_get(single.init_state())
  _, ref = train_steps(layout(1, 1, "replicated"), devices[:1], state0)
  ref = jax.device_get(ref)
  layouts = {"data8": layout(8, 1, "replicated"), "data2_fsdp4": layout(2, 4, "fsdp")}
  states = {}
  for name, cfg in layouts.items():
    run, state = train_steps(cfg, devices, state0)
    states[name] = (run, state)
    results[f"{name}_param_rel_err"] = max_rel(jax.device_get(state["params"]), ref["params"])
    results[f"{name}_ema_rel_err"] = max_rel(jax.device_get(state["ema"]), ref["ema"])
    # The same on the updates alone (params - params0), which the rounding matters most for.
    delta = lambda p: jax.tree_util.tree_map(lambda x, x0: np.asarray(x) - x0, p,  # noqa: E731
                                             state0["params"])
    results[f"{name}_update_rel_err"] = max_rel(delta(jax.device_get(state["params"])),
                                                delta(ref["params"]))
    results[f"{name}_step"] = int(state["step"])
  # How the fsdp layout splits the state: the biggest tensors are sharded, not replicated.
  run, state = states["data2_fsdp4"]
  leaves = jax.tree_util.tree_leaves(state["params"])
  sharded = [x for x in leaves if not x.sharding.is_fully_replicated]
  results["data2_fsdp4_sharded_fraction"] = (sum(x.size for x in sharded)
                                       / sum(x.size for x in leaves))
  big = max(leaves, key=lambda x: x.size)
  results["data2_fsdp4_biggest_shard_shape"] = list(big.addressable_shards[0].data.shape)
  results["data2_fsdp4_biggest_shape"] = list(big.shape)

  # Save the fsdp state; restore on 1 device and on a 4-device data layout.
  with tempfile.TemporaryDirectory() as tmp:
    mgr = checkpoint.manager(tmp)
    train._save(mgr, 3, run, state, 0.0)  # pylint: disable=protected-access
    mgr.wait_until_finished()
    saved = jax.device_get(state)
    for name, cfg, devs in (("restore_1", layout(1, 1, "replicated"), devices[:1]),
                            ("restore_data4", layout(4, 1, "replicated"), devices[:4])):
      target = train.Run(cfg, devs)
      got, progress = checkpoint.restore_state(mgr, 3, target.abstract_state)
      results[f"{name}_train_err"] = max_rel(jax.device_get(got["params"]), saved["params"])
      results[f"{name}_opt_err"] = max_rel(jax.device_get(got["opt_state"]), saved["opt_state"])
      results[f"{name}_ema_err"] = max_rel(jax.device_get(got["ema"]), saved["ema"])
      results[f"{name}_devices"] = sorted(
          {d.id for x in jax.tree_util.tree_leaves(got["params"]) for d in x.sharding.device_set})
      results[f"{name}_progress"] = progress
      # Sampling restores the EMA denoiser alone, without the trainer.
      denoiser, _ = checkpoint.load_ema(tmp, target.cfg, 3,
                                        NamedSharding(target.mesh, PartitionSpec()))
      results[f"{name}_sample_ema_err"] = max_rel(
          jax.device_get(nnx.state(denoiser, nnx.Param)), saved["ema"])
      if name == "restore_1":
        one_device = generate.Sampler(denoiser, target.model_cfg, target.cfg.sample,
                                      mesh=target.mesh).sample(list(range(8)), batch_size=3)
    mgr.close()
  # Sampling sharded over 8 devices (with the fsdp-split EMA) draws the same images per seed.
  eight = generate.Sampler(nnx.merge(run.graphdef, state["ema"], state["buffers"]), run.model_cfg,
                           run.cfg.sample, mesh=run.mesh).sample(list(range(8)), batch_size=8)
  results["sample_8_vs_1_max_abs"] = float(np.abs(eight - one_device).max())
  results["sample_distinct_seeds"] = float(np.abs(eight[0] - eight[1]).mean())
  print("RESULTS " + json.dumps(results))


if __name__ == "__main__":
  main()
