"""The paper's ablations in miniature: the demo's model and recipe on Twemoji at 32 px.

  pip install matplotlib==3.10.8      # for the curves only
  python benchmarks/ablation.py --out=runs/ablation --minutes=20 --cores=0,1
  python benchmarks/ablation.py --out=runs/ablation --report=docs/ablation   # table, curves, grids

`--data=all` (default) trains on all 4,009 images, `--data=smileys` on the demo's 168 images of
the "Smileys & Emotion" category (its 10% subset: 17 images). Every run trains
`configs/demo.py` (`:all` for all images) with one change, for
the same expected training time on one CPU core: the step count of each run is --minutes
divided by its mean step time, from per-bucket step times measured once on that core
(`benchmarks/train_step.py --json`). Runs go two at a time, each pinned to its own core
(`taskset`), so pairs run on equal terms. Each run measures itself --points times (FID of
--fid_samples EMA samples against the Inception statistics of all 4,009 images, and the
multi-scale SWD against as many training images; `train.fid_every`; FID against the Inception
statistics of all the training images of `--data`), and its TensorBoard log
keeps the figures with the training time they were reached at (`train_seconds`: the loop's
time without compiling and measuring). A run that was interrupted resumes from its checkpoint
when the command is repeated; finished runs are skipped.

The runs: the full-image ratio p = 1 (EDM), 0.75, 0.5 and 0.25 with the stochastic schedule; p = 0.5
with the progressive schedule; a random 10% subset (400 images) with p = 1 and p = 0.5; patch
sizes [16, 32] against [8, 16, 32] (measured twice); a second seed of p = 1 and p = 0.5 (measured at
the end only).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import glob
import importlib.util
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# name -> (config argument, config overrides, what it tests)
RUNS = {
    "edm": ("edm,all", {}, "p = 1.0 (EDM: full images only)"),
    "p0.5": ("p=0.5,all", {}, "p = 0.5, stochastic (the paper's default)"),
    "p0.75": ("p=0.75,all", {}, "p = 0.75, stochastic"),
    "p0.25": ("p=0.25,all", {}, "p = 0.25, stochastic"),
    "p0.5_progressive": ("p=0.5,schedule=progressive,all", {}, "p = 0.5, progressive schedule"),
    "edm_subset": ("edm,all", {"data.limit": 400, "data.twemoji_subset_seed": 0},
                   "p = 1.0 on a random 10% subset"),
    "p0.5_subset": ("p=0.5,all", {"data.limit": 400, "data.twemoji_subset_seed": 0},
                    "p = 0.5 on the same 10% subset"),
    "p0.5_sizes16_32": ("p=0.5,all", {"patch.sizes": (16, 32), "patch.probs": (0.5, 0.5)},
                        "p = 0.5 with patch sizes [16, 32] (no 8 px patches)"),
    "edm_seed1": ("edm,all", {"seed": 1}, "p = 1.0, second seed"),
    "p0.5_seed1": ("p=0.5,all", {"seed": 1}, "p = 0.5, second seed"),
}
# Second seeds have their first seed's budget and are measured at its end only: the table needs
# their final figures to show the noise, and each measurement costs about a quarter of a run.
REPLICATES = {"edm_seed1": "edm", "p0.5_seed1": "p0.5"}
# Runs measured at fewer points than --points (same budget; the last point is the end).
FEWER_POINTS = {"edm_seed1": 1, "p0.5_seed1": 1, "p0.5_sizes16_32": 2}
CONFIG = os.path.join(REPO, "configs", "demo.py")
# --data: (config argument added to every run, size of the 10% subset, what the data are)
DATA = {"all": (",all", 400, "all 4,009 images"),
        "smileys": ("", 17, "the 168 Smileys & Emotion images")}


def run_spec(name: str, data: str) -> tuple[str, dict, str]:
  """RUNS[name] for the data `data`: its config argument and overrides."""
  arg, overrides, about = RUNS[name]
  suffix, subset, _ = DATA[data]
  arg = arg.replace(",all", suffix)
  if "data.limit" in overrides:
    overrides = dict(overrides, **{"data.limit": subset})
    about += f" ({subset} images)"
  return arg, overrides, about


def load_config(arg: str, overrides: dict):
  from patchdiff import config_lib  # pylint: disable=import-outside-toplevel
  spec = importlib.util.spec_from_file_location("demo_config", CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return config_lib.override(module.get_config(arg), overrides)


def mean_step_seconds(cfg, bucket_seconds: dict[int, float], steps: int = 10_000) -> float:
  """The mean step time of `cfg`'s patch schedule over `steps` steps."""
  from patchdiff import config_lib  # pylint: disable=import-outside-toplevel
  sizes = config_lib.patch_schedule(cfg, total_steps=steps).sizes_at(np.arange(steps))
  return float(np.mean([bucket_seconds[int(s)] for s in sizes]))


def flag(key: str, value) -> str:
  if isinstance(value, tuple):
    value = "(" + ",".join(map(str, value)) + ")"
  return f"--config.{key}={value}"


def run(cmd: list[str], log: str, core: int | None) -> None:
  if core is not None:
    cmd = ["taskset", "-c", str(core)] + cmd
  with open(log, "a", encoding="utf-8") as f:
    f.write(f"\n$ {' '.join(cmd)}\n")
    f.flush()
    subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, check=True)


def read_scalars(workdir: str) -> dict[str, dict[int, float]]:
  """tag -> {step: value} from the TensorBoard event files that clu wrote in `workdir`."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  out: dict[str, dict[int, float]] = {}
  for path in sorted(glob.glob(os.path.join(workdir, "events.out.tfevents.*"))):
    for event in tf.compat.v1.train.summary_iterator(path):
      for v in event.summary.value:
        if v.HasField("tensor") and not v.tensor.string_val:
          value = tf.make_ndarray(v.tensor)
          if value.size == 1:
            out.setdefault(v.tag, {})[int(event.step)] = float(value)
  return out


def train_all(args) -> None:
  os.makedirs(args.out, exist_ok=True)
  ref = os.path.join(args.out, "fid_ref_twemoji32.npz")
  log = os.path.join(args.out, "ablation.log")
  data_arg = DATA[args.data][0][1:]
  base = [sys.executable, "-m", "patchdiff.main",
          f"--config={CONFIG}:{data_arg}" if data_arg else f"--config={CONFIG}"]
  if not os.path.isfile(ref):
    print(f"Inception statistics of {DATA[args.data][2]} ...", flush=True)
    run(base + [f"--workdir={args.out}", "--mode=fid_ref", f"--ref={ref}"], log, None)
  calib = os.path.join(args.out, "bucket_seconds.json")
  cores = [int(c) for c in args.cores.split(",")]
  if not os.path.isfile(calib):
    print(f"timing the three buckets on core {cores[0]} ...", flush=True)
    run([sys.executable, os.path.join(REPO, "benchmarks", "train_step.py"), base[-1],
         "--steps=20", "--warmup=3", f"--json={calib}"], log, cores[0])
  with open(calib, encoding="utf-8") as f:
    bucket_seconds = {int(k): v["seconds"] for k, v in json.load(f).items()}
  print("seconds per step on one core:", bucket_seconds, flush=True)

  names = args.runs.split(",") if args.runs else list(RUNS)
  plan = {}
  for name in names:
    arg, overrides, _ = run_spec(name, args.data)
    per_step = mean_step_seconds(load_config(arg, overrides), bucket_seconds)
    every = max(1, int(round(args.minutes * 60 / per_step / args.points)))
    steps = every * args.points
    every = steps // FEWER_POINTS.get(name, args.points)
    plan[name] = (arg, overrides, steps, every)
    print(f"{name:>18}: {steps} steps ({per_step * 1e3:.0f} ms each), FID every {every}",
          flush=True)

  free: queue.Queue[int] = queue.Queue()
  for c in cores:
    free.put(c)

  def job(name: str) -> str:
    arg, overrides, steps, every = plan[name]
    workdir = os.path.join(args.out, name)
    if "fid" in read_scalars(workdir) and steps in read_scalars(workdir)["fid"]:
      return f"{name}: done before"
    core = free.get()
    try:
      t0 = time.time()
      cmd = base[:-1] + [f"--config={CONFIG}:{arg}", f"--workdir={workdir}"]
      cmd += [flag(k, v) for k, v in overrides.items()]
      cmd += [flag("train.steps", steps), flag("train.fid_every", every),
              flag("train.checkpoint_every", every), flag("train.sample_every", every),
              flag("train.log_every", max(1, every // 4)), flag("train.keep_checkpoints", 1),
              flag("train.fid_samples", args.fid_samples), flag("train.fid_ref", ref)]
      run(cmd, os.path.join(args.out, f"{name}.log"), core)
      return f"{name}: trained and measured on core {core} in {(time.time() - t0) / 60:.1f} min"
    finally:
      free.put(core)

  with concurrent.futures.ThreadPoolExecutor(len(cores)) as pool:
    for message in pool.map(job, names):
      print(message, flush=True)


def _planned_steps(log: str) -> int | None:
  """The train.steps a run was last started with, from the command lines in its log."""
  if not os.path.isfile(log):
    return None
  with open(log, encoding="utf-8", errors="replace") as f:
    steps = re.findall(r"^\$ .*--config\.train\.steps=(\d+)", f.read(), re.MULTILINE)
  return int(steps[-1]) if steps else None


def report(args) -> None:
  from patchdiff import config_lib  # pylint: disable=import-outside-toplevel
  os.makedirs(args.report, exist_ok=True)
  with open(os.path.join(args.out, "bucket_seconds.json"), encoding="utf-8") as f:
    bucket_seconds = {int(k): v["seconds"] for k, v in json.load(f).items()}
  rows = {}
  for name in RUNS:
    arg, overrides, about = run_spec(name, args.data)
    workdir = os.path.join(args.out, name)
    scalars = read_scalars(workdir) if os.path.isdir(workdir) else {}
    if "fid" not in scalars:
      continue
    planned = _planned_steps(os.path.join(args.out, f"{name}.log"))
    if planned and max(scalars["fid"]) < planned:
      print(f"{name}: unfinished ({max(scalars['fid'])} of {planned} steps measured), left out")
      continue
    cfg = load_config(arg, overrides)
    steps = sorted(scalars["fid"])
    sched = config_lib.patch_schedule(cfg, total_steps=max(steps))
    kimg = sched.nimg_before(steps) / 1e3
    step_seconds = np.cumsum([bucket_seconds[int(s)] for s in sched.sizes_at(np.arange(max(steps)))])
    rows[name] = dict(
        about=about, steps=steps, kimg=[float(k) for k in kimg],
        budget_minutes=[float(step_seconds[s - 1]) / 60 for s in steps],
        minutes=[scalars["train_seconds"][s] / 60 for s in steps],
        fid=[scalars["fid"][s] for s in steps],
        swd=[scalars["swd_mean"][s] for s in steps])
    # Per bucket, over the run: the mean loss (per sample: summed over its pixels) and the mean
    # gradient norm, as logged each interval for the steps of that bucket.
    rows[name]["buckets"] = {
        int(tag[len("loss_"):-2]): dict(
            loss=float(np.mean(list(values.values()))),
            grad_norm=float(np.mean(list(scalars[f"grad_norm_{tag[len('loss_'):]}"].values()))))
        for tag, values in scalars.items() if tag.startswith("loss_") and tag.endswith("px")}
    last = max(glob.glob(os.path.join(workdir, "samples_*.png")))
    shutil.copy(last, os.path.join(args.report, f"grid_{name}.png"))
  with open(os.path.join(args.report, "results.json"), "w", encoding="utf-8") as f:
    json.dump(rows, f, indent=1)

  # Budget: the run's steps priced at the per-bucket step times of one core (bucket_seconds.json),
  # equal across runs by design; the loop's own clock (results.json: minutes) also counts what
  # else ran on the machine.
  lines = [f"| run | what | steps | kimg | budget min | FID at the {args.points} points | "
           "SWD at the end |", "| --- | --- | ---: | ---: | ---: | --- | ---: |"]
  for name, r in rows.items():
    fids = ["-"] * args.points  # a run measured at fewer points fills the ones it reached
    for step, value in zip(r["steps"], r["fid"]):
      fids[round(step * args.points / r["steps"][-1]) - 1] = f"{value:.1f}"
    lines.append(f"| `{name}` | {r['about']} | {r['steps'][-1]:,} | {r['kimg'][-1]:.0f} | "
                 f"{r['budget_minutes'][-1]:.1f} | {' / '.join(fids)} | {r['swd'][-1]:.1f} |")
  lines += ["", "Per bucket, mean over the run (loss: per sample, summed over its pixels):", "",
            "| run | " + " | ".join(f"{s} px loss / grad norm" for s in (8, 16, 32)) + " |",
            "| --- | --- | --- | --- |"]
  for name, r in rows.items():
    cells = [f"{r['buckets'][s]['loss']:.0f} / {r['buckets'][s]['grad_norm']:.0f}"
             if s in r["buckets"] else "-" for s in (8, 16, 32)]
    lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
  table = "\n".join(lines)
  with open(os.path.join(args.report, "table.md"), "w", encoding="utf-8") as f:
    f.write(table + "\n")
  print(table)

  try:
    import matplotlib  # pylint: disable=import-outside-toplevel
  except ImportError:
    print("matplotlib is not installed: no curves (pip install matplotlib==3.10.8)")
    return
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
  colors = {}
  for name, r in rows.items():
    # A second seed is one point, drawn in its first seed's colour.
    kw = dict(marker="x", markersize=9, linestyle="none",
              color=colors.get(REPLICATES.get(name))) if name in REPLICATES else dict(marker="o")
    line = axes[0].plot(r["budget_minutes"], r["fid"], label=name, **kw)[0]
    axes[1].plot(r["kimg"], r["fid"], label=name, **kw)
    colors[name] = line.get_color()
  axes[0].set_xlabel("training time on one CPU core (minutes, from the timed step costs)")
  axes[1].set_xlabel("images seen, counted as the paper does (kimg)")
  for ax in axes:
    ax.set_ylabel(f"FID ({args.fid_samples} samples vs {DATA[args.data][2]})")
    ax.grid(alpha=0.3)
  axes[1].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(args.report, "fid_curves.png"), dpi=100)
  print(f"wrote {args.report}/table.md, results.json, fid_curves.png and the grids")


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default="runs/ablation", help="folder of the runs")
  parser.add_argument("--minutes", type=float, default=20.0,
                      help="expected training time of every run on one core")
  parser.add_argument("--points", type=int, default=4, help="measurements per run")
  parser.add_argument("--fid_samples", type=int, default=1000, help="EMA samples per FID")
  parser.add_argument("--cores", default="0,1", help="CPU cores, one run on each at a time")
  parser.add_argument("--runs", default=None, help="comma-separated subset of the runs")
  parser.add_argument("--data", default="all", choices=sorted(DATA),
                      help="all 4,009 Twemoji, or the demo's 168 Smileys & Emotion images")
  parser.add_argument("--report", default=None, help="write the table, curves and grids here "
                      "from the finished runs (no training)")
  args = parser.parse_args()
  if args.report:
    report(args)
  else:
    train_all(args)


if __name__ == "__main__":
  main()
