"""Start-up cost of training: compiling the step's programs (a gradient program per bucket and
the update program they share), one at a time against all at once, and again from the
persistent compilation cache (what a restart pays).

  python benchmarks/compile_time.py --config=configs/ffhq64.py --config.train.batch_size=1

Each measurement runs in a fresh process (so no in-memory cache helps) with the trainer's own
`programs.Programs.compile_steps`, and prints the wall time from the first trace to the last
program:
  1. `train.compile_threads=1`, no persistent cache: the programs one after the other;
  2. `train.compile_threads=0` (the default), no persistent cache: all programs at once;
  3. the default again, twice, with a persistent cache in a fresh folder: the first run fills
     it, the second is a restart.

`--cold_only` measures just 2 (the cold start of training), `--repeats` times, and prints each
wall time and their median. XLA_FLAGS passes through to the measured processes, so
`XLA_FLAGS=--xla_backend_optimization_level=3` measures XLA's default LLVM level on CPU
(`patchdiff/xla_options.py` asks for 1).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile

from absl import app, flags
from ml_collections import config_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file")
_CHILD = flags.DEFINE_string("child", None, "internal: compile once and print JSON")
_COLD_ONLY = flags.DEFINE_bool("cold_only", False, "measure only the cold start (all at once, "
                               "no cache)")
_REPEATS = flags.DEFINE_integer("repeats", 1, "times to measure the cold start (--cold_only)")
flags.mark_flags_as_required(["config"])


def _child(cache: str) -> None:
  import jax  # pylint: disable=import-outside-toplevel
  from patchdiff import programs, train  # pylint: disable=import-outside-toplevel
  train.use_compilation_cache(cache, tempfile.gettempdir())
  step_programs = programs.Programs(train.Run(_CONFIG.value))
  _, stats = step_programs.compile_steps()
  print(json.dumps(dict(wall=step_programs.compile_wall_seconds, platform=jax.devices()[0].platform,
                        programs={k: v["compile_seconds"] for k, v in stats.items()})))


def _measure(argv: list[str], threads: int, cache: str) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), *argv, f"--config.train.compile_threads={threads}",
         f"--child={cache}"]
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
  out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env, cwd=REPO)
  return json.loads(out.stdout.strip().splitlines()[-1])


def _report(label: str, r: dict) -> None:
  programs = ", ".join(f"{k} {v:.1f} s" for k, v in r["programs"].items())
  print(f"{label:>38}: {r['wall']:6.1f} s wall ({r['platform']}; per program, trace + "
        f"compile: {programs})", flush=True)


def main(argv):
  if _CHILD.value is not None:
    _child("" if _CHILD.value == "none" else _CHILD.value)
    return
  args = [a for a in sys.argv[1:] if not a.startswith("--child")]  # the child ignores the rest
  if _COLD_ONLY.value:
    walls = []
    for _ in range(_REPEATS.value):
      r = _measure(args, 0, "none")
      walls.append(r["wall"])
      _report("all programs at once, no cache", r)
    print(f"median of {len(walls)}: {statistics.median(walls):.1f} s "
          f"({', '.join(f'{w:.1f}' for w in walls)})")
    return
  with tempfile.TemporaryDirectory() as cache:
    for label, threads, where in (("one program at a time, no cache", 1, "none"),
                                  ("all programs at once, no cache", 0, "none"),
                                  ("all at once, filling a fresh cache", 0, cache),
                                  ("restart: all from the cache", 0, cache)):
      r = _measure(args, threads, where)
      _report(label, r)
  del argv


if __name__ == "__main__":
  app.run(main)
