"""Sums the compile events that sitecustomize.py recorded (see there): per test, the seconds of
XLA compiling (persistent-cache reads included), tracing and lowering, and the cache's hits and
misses; then the longest compilations.

  python benchmarks/suite_compiles/report.py FOLDER [--tests 40] [--programs 30]
"""
import argparse
import collections
import json
import pathlib


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
  parser.add_argument("folder")
  parser.add_argument("--tests", type=int, default=40)
  parser.add_argument("--programs", type=int, default=30)
  args = parser.parse_args()
  records = [json.loads(line) for f in sorted(pathlib.Path(args.folder).glob("*.jsonl"))
             for line in f.read_text().splitlines() if line]
  per_test = collections.defaultdict(collections.Counter)
  for r in records:
    c = per_test[r["test"] or "(outside a test)"]
    c[r["event"]] += r["seconds"]
    c[r["event"] + "_n"] += 1
  total = collections.Counter()
  for c in per_test.values():
    total.update(c)
  print(f"{len(records)} events: compile {total['backend_compile_duration']:.1f} s, tracing "
        f"{total['jaxpr_trace_duration']:.1f} s, lowering "
        f"{total['jaxpr_to_mlir_module_duration']:.1f} s (summed over threads and processes); "
        f"cache hits {total['cache_hits_n']}, misses {total['cache_misses_n']}")
  print(f"{'compile':>8} {'trace':>6} {'lower':>6} {'hits':>5} {'misses':>6}  test")
  rows = sorted(per_test.items(), key=lambda kv: -kv[1]["backend_compile_duration"])
  for test, c in rows[:args.tests]:
    print(f"{c['backend_compile_duration']:8.1f} {c['jaxpr_trace_duration']:6.1f} "
          f"{c['jaxpr_to_mlir_module_duration']:6.1f} {c['cache_hits_n']:5d} "
          f"{c['cache_misses_n']:6d}  {test}")
  print("\nlongest compilations (seconds, program, test, command):")
  compiles = [r for r in records if r["event"] == "backend_compile_duration"]
  for r in sorted(compiles, key=lambda r: -r["seconds"])[:args.programs]:
    print(f"{r['seconds']:6.1f}  {r['name'][:32]:32s} {r['test'][:70]}  {r['argv'][:50]}")


if __name__ == "__main__":
  main()
