"""What a training run pays before its first step, program by program, on this machine:
building the trainer (`train.Run`, twice: the second reuses the abstract network), then for
each bucket's gradient program and the update program the seconds of JAX's tracing, lowering
and XLA's compile (one at a time, no persistent cache). Last, what another trainer of the same
programs in this process pays (`Programs.compile_steps` of a run that differs in its length
only: the step's functions are memoised, so JAX finds the programs in memory), and the same
after `jax.clear_caches()` (every program traced, lowered and compiled again).

  python benchmarks/startup.py --config=tests/tiny.py
  XLA_FLAGS="--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false" \
      python benchmarks/startup.py --config=tests/tiny.py     # the test suite's settings

`benchmarks/compile_time.py` measures the trainer's own compile of all programs at once.
"""
import os
import sys
import time

from absl import app
from ml_collections import config_flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file")


def main(_):
  import jax  # pylint: disable=import-outside-toplevel
  from patchdiff import programs, train  # pylint: disable=import-outside-toplevel
  for attempt in ("first", "second"):
    t0 = time.perf_counter()
    run = train.Run(_CONFIG.value)
    print(f"train.Run ({attempt}): {time.perf_counter() - t0:.2f} s")
  progs = programs.Programs(run)
  for size in [*run.schedule.active_sizes, None]:
    t0 = time.perf_counter()
    traced = progs.trace_apply() if size is None else progs.trace_grad(size)
    t1 = time.perf_counter()
    lowered = traced.lower()
    t2 = time.perf_counter()
    lowered.compile()
    t3 = time.perf_counter()
    name = "update" if size is None else f"{size}px"
    print(f"{name:>7}: trace {t1 - t0:.2f} s, lower {t2 - t1:.2f} s, compile {t3 - t2:.2f} s")
  longer = _CONFIG.value.copy_and_resolve_references()
  longer.train.steps += 1
  for what in ("another trainer", "after jax.clear_caches()"):
    if what != "another trainer":
      jax.clear_caches()
    t0 = time.perf_counter()
    programs.Programs(train.Run(longer)).compile_steps()
    print(f"{what}: train.Run and compile_steps {time.perf_counter() - t0:.2f} s")


if __name__ == "__main__":
  app.run(main)
