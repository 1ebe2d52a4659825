"""Where a train step's device time goes: the top XLA ops and kernels of one bucket's step (its
gradient program and the update program that all buckets share).

  python benchmarks/profile_step.py --config=configs/ffhq64.py --size=16 --steps=3

Traces --steps steps with jax.profiler, then reads the trace back (jax.profiler.ProfileData) and
prints, per device plane, the ops with the largest total time (XLA op names, which the HLO dump
or `compiled.as_text()` maps back to the model).
"""
from __future__ import annotations

import collections
import glob
import os
import sys
import tempfile

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from patchdiff import programs, train  # noqa: E402  pylint: disable=wrong-import-position

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file")
_SIZE = flags.DEFINE_integer("size", None, "patch size of the bucket (default: full size)")
_STEPS = flags.DEFINE_integer("steps", 3, "traced steps")
_TOP = flags.DEFINE_integer("top", 25, "ops to list")
flags.mark_flags_as_required(["config"])


def main(argv):
  del argv
  cfg = _CONFIG.value
  run = train.Run(cfg)
  size = _SIZE.value or run.schedule.resolution
  state = run.init_state()
  step_programs = programs.Programs(run)
  compiled = step_programs.compile_step(size)
  batch = run.to_device(step_programs.random_batch(size, np.random.default_rng(0)))
  hyper = run.hyper(0, size)
  for _ in range(2):
    state, m = compiled(state, batch, hyper)
  jax.block_until_ready(m)
  logdir = tempfile.mkdtemp()
  with jax.profiler.trace(logdir):
    for _ in range(_STEPS.value):
      state, m = compiled(state, batch, hyper)
    jax.block_until_ready(m)
  path = sorted(glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True))[-1]
  data = jax.profiler.ProfileData.from_file(path)
  printed = False
  for plane in data.planes:
    if not plane.name.startswith("/device:"):
      continue
    for line in plane.lines:
      if line.name not in ("XLA Ops", "XLA Modules") and not line.name.startswith("Stream"):
        continue
      total = collections.Counter()
      count = collections.Counter()
      for ev in line.events:
        total[ev.name] += ev.duration_ns
        count[ev.name] += 1
      if not total:
        continue
      all_ns = sum(total.values())
      printed = True
      print(f"{plane.name} / {line.name}: {all_ns / 1e6 / _STEPS.value:.2f} ms per step in "
            f"{sum(count.values()) // _STEPS.value} events")
      for name, ns in total.most_common(_TOP.value):
        print(f"  {ns / 1e6 / _STEPS.value:9.3f} ms {100 * ns / all_ns:5.1f}%  "
              f"x{count[name] // _STEPS.value:<4d} {name[:110]}")

  if not printed:
    print("no device op timeline in the trace; planes:",
          {p.name: [l.name for l in p.lines] for p in data.planes})


if __name__ == "__main__":
  app.run(main)
