"""Time that Python's garbage collector takes in a run of the entry point, with the package's
collector thresholds (`patchdiff.main.GC_THRESHOLDS`) or CPython's default ones.

  python benchmarks/collector.py [--default] -- --config=tests/tiny.py --workdir=DIR \
      --config.train.steps=6 --config.train.checkpoint_every=3

Everything after `--` goes to `python -m patchdiff.main`, which runs in this process; the wall
time of the whole run (imports included) and the seconds spent in collections (timed by
`gc.callbacks`) are printed at the end, with the number of passes per generation. Give each
run a fresh workdir; with JAX_COMPILATION_CACHE_DIR set to a folder that earlier runs filled,
the run loads its programs instead of compiling them, and the collector's share is larger.
"""
import gc
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
T0 = time.perf_counter()
SPENT = {"seconds": 0.0, "passes": [0, 0, 0], "start": 0.0}


def _timed(phase, info):
  if phase == "start":
    SPENT["start"] = time.perf_counter()
  else:
    SPENT["seconds"] += time.perf_counter() - SPENT["start"]
    SPENT["passes"][info["generation"]] += 1


def run():
  split = sys.argv.index("--") if "--" in sys.argv else len(sys.argv)
  default, args = "--default" in sys.argv[1:split], sys.argv[split + 1:]
  gc.callbacks.append(_timed)
  from absl import app  # pylint: disable=import-outside-toplevel
  from patchdiff import main  # pylint: disable=import-outside-toplevel
  if default:
    main.GC_THRESHOLDS = gc.get_threshold()  # CPython's: (700, 10, 10)
  try:
    app.run(main.main, argv=["patchdiff.main", *args])
  except SystemExit as e:
    if e.code:
      raise
  print(f"thresholds {main.GC_THRESHOLDS}: wall {time.perf_counter() - T0:.2f} s, collector "
        f"{SPENT['seconds']:.2f} s, passes per generation {SPENT['passes']}", file=sys.stderr)


if __name__ == "__main__":
  run()
