"""Run by test_accumulation.py in a process with 8 fake CPU devices; prints a JSON line of results.

The same global batches through the train step of one bucket on 8 devices (data layout with
replicated state; the fsdp layout's program is checked by tracing in test_accumulation.py),
unsplit and accumulated over micro-batches: the states agree. The accumulated gradient program's
collectives are recorded, to show that slicing the micro-batches moves no batch data between
devices.
"""
import json
import os
import re
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from sharded_worker import batches, layout, max_rel  # pylint: disable=wrong-import-position

from patchdiff import programs, train  # pylint: disable=wrong-import-position

SIZE = 8  # the R/2 bucket: batch 8 x 2 = 16, 2 per device, so batch_per_device=1 is 2 rounds
STEPS = 2
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


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


def run(cfg, devices, state0):
  r = train.Run(cfg, devices)
  compiled = programs.Programs(r).compile_step(SIZE)
  state = jax.device_put(state0, r.state_shardings)
  losses = []
  for step, batch in enumerate(batches(cfg)[:STEPS]):
    state, metrics = compiled(state, r.to_device(batch), r.hyper(step, SIZE))
    losses.append(float(metrics["loss"]))
  return r, compiled, jax.device_get(state), losses


def main():
  devices = jax.devices()
  assert len(devices) == 8, devices
  results = {}
  dropout = {"model.dropout": 0.2}
  name = "data8"  # the data layout, replicated state
  state0 = jax.device_get(train.Run(layout(8, 1, "replicated", **dropout), devices).init_state())
  _, plain, ref, ref_losses = run(layout(8, 1, "replicated", **dropout), devices, state0)
  r, acc, got, losses = run(layout(8, 1, "replicated", **dropout, **{"train.batch_per_device": 1}),
                            devices, state0)
  results[f"{name}_rounds"] = r.rounds[SIZE]
  results[f"{name}_param_rel_err"] = max_rel(got["params"], ref["params"])
  results[f"{name}_ema_rel_err"] = max_rel(got["ema"], ref["ema"])
  delta = lambda p: jax.tree_util.tree_map(lambda x, x0: np.asarray(x) - x0, p,  # noqa: E731
                                           state0["params"])
  results[f"{name}_update_rel_err"] = max_rel(delta(got["params"]), delta(ref["params"]))
  results[f"{name}_step"] = [int(got["step"]), int(ref["step"])]
  results[f"{name}_loss_rel_err"] = max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses))
  results[f"{name}_collectives"] = collectives(acc.grad.as_text())
  results[f"{name}_plain_collectives"] = collectives(plain.grad.as_text())
  print("RESULTS " + json.dumps(results))


if __name__ == "__main__":
  main()
