"""Run by test_eight_devices.py in a process with 8 fake CPU devices; prints one JSON line of
results. One interpreter for every 8-device check, so JAX starts and compiles once for them all.

1. The same global batches (dropout on) through the train step on 1 device, on 8 (data layout,
   replicated state) and on 8 with the state split along fsdp: the parameters agree.
2. The same on 8 devices accumulated over micro-batches (train.batch_per_device=1: 2 rounds)
   against the unsplit 8-device step, and the collectives of the two gradient programs, to show
   that slicing the micro-batches moves no batch data between devices.
3. The fsdp-layout state, checkpointed, restores on 1 device and on a 4-device data layout
   (training and sampling targets) with the same values.
4. Sampling sharded over 8 devices gives each seed the image one device gives it.
5. The reference of tests/test_eight_devices.py's multi-host test: the run that two processes x
   4 devices train there (`MULTIHOST`), trained here by one process on 8 devices into the
   workdir given as the first argument.

Every run here has the one-level network (tiny.ONE_LEVEL): programs for 8 devices (or for the
first 1 or 4 of them) are this process's own, shared with no other test, and this network's
compile in half the time; no check here depends on the network's depth.
"""
import gc
import json
import logging
import os
import re
import sys
import tempfile

import jax
import numpy as np
from absl import logging as absl_logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

sys.path.insert(0, os.path.dirname(__file__))
from tiny import ONE_LEVEL, tiny_config  # pylint: disable=wrong-import-position

# pylint: disable-next=wrong-import-position
from patchdiff import checkpoint, generate, patches, programs, train
from patchdiff import main as entry_point  # pylint: disable=wrong-import-position

SIZE = 8  # one bucket, the R/2 one: batch 8 x 2 = 16, 2 per device (batch_per_device=1: 2 rounds)
STEPS = 3
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


def batches(cfg):
  rng = np.random.default_rng(0)
  out = []
  for _ in range(STEPS):
    b = cfg.train.batch_size * patches.batch_mul(SIZE, cfg.model.img_resolution)
    offsets = rng.integers(0, cfg.model.img_resolution - SIZE + 1, (b, 2))
    pos = patches.coord_grid(offsets[:, 0], offsets[:, 1], SIZE, cfg.model.img_resolution)
    out.append(dict(image=rng.integers(0, 256, (b, SIZE, SIZE, 3), dtype=np.uint8), pos=pos))
  return out


def layout_overrides(data, fsdp, param_sharding) -> dict:
  return {"mesh.data": data, "mesh.fsdp": fsdp, "mesh.param_sharding": param_sharding,
          "train.batch_size": 8, "train.lr": 1e-3, "model.dropout": 0.2, **ONE_LEVEL}


def layout(data, fsdp, param_sharding, **overrides):
  return tiny_config(**layout_overrides(data, fsdp, param_sharding), **overrides)


# The multi-host run: the data8 layout's config, trained from data for 6 steps of the 8 and 16 px
# buckets (a global batch of 8: one full-size sample per device). Its 8 px programs are those of
# check 1's data8 layout. (Its two processes compile every program each: a process's topology
# enters the persistent cache's key.)
MULTIHOST = {**layout_overrides(8, 1, "replicated"), "patch.sizes": (8, 16),
             "patch.probs": (0.5, 0.5), "train.steps": 6, "train.log_every": 3,
             "train.checkpoint_every": 6, "sample.grid_size": 0}


class _Lines(logging.Handler):
  """Keeps the messages logged while it is attached."""

  def __init__(self):
    super().__init__()
    self.lines = []

  def emit(self, record):
    self.lines.append(record.getMessage())


def train_steps(cfg, devices, state0):
  """STEPS steps of `cfg` on `devices` from `state0`: the Run, its compiled step, the state and
  the losses."""
  run = train.Run(cfg, devices)
  state = jax.device_put(state0, run.state_shardings)
  compiled = programs.Programs(run).compile_step(SIZE)
  losses = []
  for step, batch in enumerate(batches(cfg)):
    state, metrics = compiled(state, run.to_device(batch), run.hyper(step, SIZE))
    losses.append(float(metrics["loss"]))
  return run, compiled, state, losses


def max_rel(a, b):
  errs = jax.tree_util.tree_map(
      lambda x, y: float(np.linalg.norm(np.asarray(x, np.float64) - np.asarray(y, np.float64))
                         / max(np.linalg.norm(np.asarray(y, np.float64)), 1e-12)), a, b)
  return max(jax.tree_util.tree_leaves(errs))


def collectives(hlo: str) -> dict[str, int]:
  """How many of each collective op the optimised HLO text holds (async pairs counted once),
  as `OP_entry` in the entry computation and `OP_nested` in the others (loop bodies)."""
  out = {f"{op}_{where}": 0 for op in COLLECTIVES for where in ("entry", "nested")}
  where = "nested"
  for line in hlo.splitlines():
    if line.endswith("{") and not line.startswith(" "):
      where = "entry" if line.startswith("ENTRY") else "nested"
    for op in COLLECTIVES:
      if re.search(rf"\s{op}(-start)?\(", line):
        out[f"{op}_{where}"] += 1
  return out


def compare(results, name, state, ref, state0):
  """The parameters, EMA and updates (params - params0, which the rounding matters most for) of
  `state` against `ref`, as NAME_*_rel_err."""
  got, ref = jax.device_get(state), jax.device_get(ref)
  results[f"{name}_param_rel_err"] = max_rel(got["params"], ref["params"])
  results[f"{name}_ema_rel_err"] = max_rel(got["ema"], ref["ema"])
  delta = lambda p: jax.tree_util.tree_map(lambda x, x0: np.asarray(x) - x0, p,  # noqa: E731
                                           state0["params"])
  results[f"{name}_update_rel_err"] = max_rel(delta(got["params"]), delta(ref["params"]))
  results[f"{name}_step"] = int(got["step"])


def main():
  gc.set_threshold(*entry_point.GC_THRESHOLDS)  # the entry point's, as a user's run has them
  devices = jax.devices()
  assert len(devices) == 8, devices
  results = {}
  single = train.Run(layout(1, 1, "replicated"), devices[:1])
  state0 = jax.device_get(single.init_state())
  _, _, ref, _ = train_steps(layout(1, 1, "replicated"), devices[:1], state0)
  states = {}
  for name, cfg in {"data8": layout(8, 1, "replicated"),
                    "data2_fsdp4": layout(2, 4, "fsdp")}.items():
    states[name] = train_steps(cfg, devices, state0)
    compare(results, name, states[name][2], ref, state0)

  # Accumulated over micro-batches on 8 devices, against the unsplit 8-device step.
  _, plain, plain_state, plain_losses = states["data8"]
  acc_run, acc, acc_state, losses = train_steps(
      layout(8, 1, "replicated", **{"train.batch_per_device": 1}), devices, state0)
  results["accumulated_rounds"] = acc_run.rounds[SIZE]
  compare(results, "accumulated", acc_state, plain_state, state0)
  results["accumulated_loss_rel_err"] = max(abs(a - b) / abs(b)
                                            for a, b in zip(losses, plain_losses))
  results["accumulated_collectives"] = collectives(acc.grad.as_text())
  results["plain_collectives"] = collectives(plain.grad.as_text())

  # How the fsdp layout splits the state: the biggest tensors are sharded, not replicated.
  run, _, state, _ = states["data2_fsdp4"]
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
    train._save(mgr, STEPS, run, state, 0.0)  # pylint: disable=protected-access
    mgr.wait_until_finished()
    saved = jax.device_get(state)
    for name, cfg, devs in (("restore_1", layout(1, 1, "replicated"), devices[:1]),
                            ("restore_data4", layout(4, 1, "replicated"), devices[:4])):
      target = train.Run(cfg, devs)
      got, progress = checkpoint.restore_state(mgr, STEPS, target.abstract_state)
      results[f"{name}_train_err"] = max_rel(jax.device_get(got["params"]), saved["params"])
      results[f"{name}_opt_err"] = max_rel(jax.device_get(got["opt_state"]), saved["opt_state"])
      results[f"{name}_ema_err"] = max_rel(jax.device_get(got["ema"]), saved["ema"])
      results[f"{name}_devices"] = sorted(
          {d.id for x in jax.tree_util.tree_leaves(got["params"]) for d in x.sharding.device_set})
      results[f"{name}_progress"] = progress
      # Sampling restores the EMA denoiser alone, without the trainer.
      denoiser, _ = checkpoint.load_ema(tmp, target.cfg, STEPS,
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

  # The multi-host test's reference run, and the bucket plan it logged.
  lines, logger = _Lines(), logging.getLogger("absl")
  absl_logging.set_verbosity(absl_logging.INFO)
  logger.addHandler(lines)
  train.train_and_evaluate(tiny_config(**MULTIHOST), sys.argv[1])
  logger.removeHandler(lines)
  results["multihost_plans"] = [l for l in lines.lines if "schedule digest" in l]
  print("RESULTS " + json.dumps(results))


if __name__ == "__main__":
  main()
