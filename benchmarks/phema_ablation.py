"""The Smileys ablation of the full-image ratio re-scored with post-hoc EMA (EDM2).

  python benchmarks/phema_ablation.py --out=runs/phema_ablation --cores=0,1
  python benchmarks/phema_ablation.py --out=runs/phema_ablation --report=docs/phema_ablation

Each run of `benchmarks/ablation.py --data=smileys` for p = 1, 0.75, 0.5 and 0.25 is trained again
for the step count that ablation gave it (16 minutes of one core, read from
docs/ablation_smileys/results.json), with two tracked power-function EMAs (relative stds 0.05 and
0.10) and 20 snapshots over the run. After training, each run is scored by FID (and SWD) of the
same 500 seeds against the 168 training images: once with the EDM1 EMA of the recipe (half-life
0.02 Mimg, ramp 0.1), and once per candidate length `--lengths` reconstructed by
`--mode=eval --ema_std`. The report ranks the runs by each run's best length and by the EDM1 EMA,
writes the table (`table.md`, `results.json`), the plot of FID against the EMA length for every
run (`fid_vs_length.png`, matplotlib) and a grid of each run at its best length.

The recipe, seed and step count are the ablation's; tracking the post-hoc EMAs does not change
the training trajectory. Runs go two at a time, each pinned to one core; a repeated command
skips what is done, and resumes an interrupted training from its last checkpoint (every eighth
of the run).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import glob
import json
import os
import queue
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ablation import run  # pylint: disable=wrong-import-position  (taskset, log, check)
CONFIG = os.path.join(REPO, "configs", "demo.py")
# name -> (config argument, what it is), as benchmarks/ablation.py names them
RUNS = {"edm": ("edm", "p = 1.0 (EDM: full images only)"),
        "p0.75": ("p=0.75", "p = 0.75, stochastic"),
        "p0.5": ("p=0.5", "p = 0.5, stochastic (the paper's default)"),
        "p0.25": ("p=0.25", "p = 0.25, stochastic")}
ABLATION = os.path.join(REPO, "docs", "ablation_smileys", "results.json")
TRACKED = (0.05, 0.10)
SNAPSHOTS = 20


def plan() -> dict[str, tuple[int, float]]:
  """name -> (steps, kimg) of the run in the Smileys ablation (its kimg as counted then, before
  the count became the official loop's whole images a step)."""
  with open(ABLATION, encoding="utf-8") as f:
    done = json.load(f)
  return {name: (done[name]["steps"][-1], done[name]["kimg"][-1]) for name in RUNS}


def standard_eval(workdir: str) -> str | None:
  found = sorted(glob.glob(os.path.join(workdir, "samples", "*", "eval.json")))
  return found[-1] if found else None


def posthoc_eval(workdir: str) -> str | None:
  found = sorted(glob.glob(os.path.join(workdir, "phema_ema", "eval_*.json")))
  return found[-1] if found else None


def train_all(args) -> None:
  os.makedirs(args.out, exist_ok=True)
  steps_of = plan()
  free: queue.Queue[int] = queue.Queue()
  for c in args.cores.split(","):
    free.put(int(c))
  main = [sys.executable, "-m", "patchdiff.main"]

  def job(name: str) -> str:
    arg, _ = RUNS[name]
    steps, kimg = steps_of[name]
    workdir = os.path.join(args.out, name)
    log = os.path.join(args.out, f"{name}.log")
    every = round(kimg / SNAPSHOTS, 3)
    core = free.get()
    t0 = time.time()
    try:
      while subprocess.run(["pgrep", "-f", f"workdir={workdir}( |$)"],
                           capture_output=True, check=False).returncode == 0:
        time.sleep(30)  # a training of this run started by an earlier command is still going
      if os.path.isfile(os.path.join(workdir, "samples_%08d.png" % steps)):  # the run's end
        open(os.path.join(workdir, "phema_done"), "w", encoding="utf-8").close()
      if not os.path.isfile(os.path.join(workdir, "phema_done")):
        run(main + [f"--config={CONFIG}:{arg}", f"--workdir={workdir}",
                    f"--config.train.steps={steps}",
                    f"--config.train.checkpoint_every={-(-steps // 8)}",
                    "--config.train.keep_checkpoints=1", f"--config.train.log_every={steps // 8}",
                    "--config.train.phema.stds=(" + ",".join(map(str, TRACKED)) + ")",
                    f"--config.train.phema.every_kimg={every}"], log, core)
        open(os.path.join(workdir, "phema_done"), "w", encoding="utf-8").close()
      if standard_eval(workdir) is None:
        run(main + ["--mode=eval", f"--workdir={workdir}", f"--seeds=0-{args.samples - 1}"],
            log, core)
      if posthoc_eval(workdir) is None:
        run(main + ["--mode=eval", f"--workdir={workdir}", f"--ema_std={args.lengths}",
                    f"--seeds=0-{args.samples - 1}"], log, core)
      return f"{name}: {steps} steps, done on core {core} in {(time.time() - t0) / 60:.1f} min"
    finally:
      free.put(core)

  with concurrent.futures.ThreadPoolExecutor(len(args.cores.split(","))) as pool:
    for message in pool.map(job, list(RUNS)):
      print(message, flush=True)


def report(args) -> None:
  os.makedirs(args.report, exist_ok=True)
  steps_of = plan()
  rows = {}
  for name, (_, about) in RUNS.items():
    workdir = os.path.join(args.out, name)
    std_path, post_path = standard_eval(workdir), posthoc_eval(workdir)
    if std_path is None or post_path is None:
      print(f"{name}: not scored yet, left out")
      continue
    with open(std_path, encoding="utf-8") as f:
      standard = json.load(f)
    with open(post_path, encoding="utf-8") as f:
      post = json.load(f)
    best = min(post["rows"], key=lambda r: r["fid"])
    rows[name] = dict(about=about, steps=steps_of[name][0], kimg=post["nimg"] / 1000,
                      edm1_fid=standard["fid"], edm1_swd=standard["swd_mean"],
                      lengths=[dict(std=r["std"], fid=r["fid"], swd=r["swd_mean"],
                                    residual=r["residual"]) for r in post["rows"]],
                      best_std=best["std"], best_fid=best["fid"], best_swd=best["swd_mean"])
    grids = glob.glob(os.path.join(workdir, "phema_ema", f"std_{best['std']:.4f}", "**",
                                   "grid.png"), recursive=True)
    if grids:
      shutil.copy(sorted(grids)[0], os.path.join(args.report, f"grid_{name}_best.png"))
  with open(os.path.join(args.report, "results.json"), "w", encoding="utf-8") as f:
    json.dump(rows, f, indent=1)
  lengths = sorted({l["std"] for r in rows.values() for l in r["lengths"]})
  lines = ["| run | steps | kimg | EDM1 EMA FID | " + " | ".join(f"std {s:g}" for s in lengths)
           + " | best std | best FID | rank EDM1 | rank best |",
           "| --- | ---: | ---: | ---: | " + " | ".join("---:" for _ in lengths)
           + " | ---: | ---: | ---: | ---: |"]
  rank_edm1 = {n: i + 1 for i, n in enumerate(sorted(rows, key=lambda n: rows[n]["edm1_fid"]))}
  rank_best = {n: i + 1 for i, n in enumerate(sorted(rows, key=lambda n: rows[n]["best_fid"]))}
  for name, r in rows.items():
    by_std = {l["std"]: l["fid"] for l in r["lengths"]}
    cells = [f"{by_std[s]:.1f}" if s in by_std else "-" for s in lengths]
    lines.append(f"| `{name}` | {r['steps']:,} | {r['kimg']:.0f} | {r['edm1_fid']:.1f} | "
                 + " | ".join(cells) + f" | {r['best_std']:g} | {r['best_fid']:.1f} | "
                 f"{rank_edm1[name]} | {rank_best[name]} |")
  with open(os.path.join(args.report, "table.md"), "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))
  try:
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  except ImportError:
    print("matplotlib is not installed: no plot (pip install matplotlib==3.10.8)")
    return
  fig, ax = plt.subplots(figsize=(6, 4))
  for name, r in rows.items():
    line, = ax.plot([l["std"] for l in r["lengths"]], [l["fid"] for l in r["lengths"]], "o-",
                    label=f"{name}")
    ax.axhline(r["edm1_fid"], color=line.get_color(), ls=":", lw=1)
  ax.set_xlabel("EMA length (relative std)")
  ax.set_ylabel("FID, 500 samples")
  ax.set_title("Smileys ablation, post-hoc EMA (dotted: EDM1 EMA)")
  ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(args.report, "fid_vs_length.png"), dpi=120)


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default="runs/phema_ablation", help="folder of the runs")
  parser.add_argument("--cores", default="0,1", help="CPU cores, one run on each at a time")
  parser.add_argument("--lengths", default="0.02,0.04,0.07,0.12",
                      help="candidate EMA lengths (relative stds), the same for every run")
  parser.add_argument("--samples", type=int, default=500, help="samples per FID")
  parser.add_argument("--report", default=None, help="write the table, plot and grids here")
  args = parser.parse_args()
  if args.report:
    report(args)
  else:
    train_all(args)


if __name__ == "__main__":
  main()
