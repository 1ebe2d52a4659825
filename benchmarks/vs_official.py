"""The authors' training loop beside patchdiff's, at the demo's recipe, on the CPU: both trained on
the same zip for the same number of steps, both scored by patchdiff's FID.

  python -m venv --system-site-packages .venv-official    # torch beside this project's packages
  .venv-official/bin/pip install torch                     # not a project requirement
  nice -n 19 .venv-official/bin/python benchmarks/vs_official.py --official=PATH --out=runs/vs

PATH is a checkout of github.com/Zhendong-Wang/Patch-Diffusion; nothing of it is copied here: its
`training/training_loop.py` is imported from PATH at run time, with only what a CPU needs changed
at run time: a one-process gloo group on 127.0.0.1, DDP replaced by the bare module, the CUDA
memory queries answered with 0, a stub `diffusers` module (the loop imports it for latents only),
`torch.utils.data.Sampler.__init__` taking the dataset argument current torch no longer accepts,
and the loop's `batch_mul_dict` extended with `8: 128`, so that 32 px images get R/4 = 8 px
patches. The loop gets `configs/demo.py`'s recipe (its network, batch, learning rate and ramp,
P_mean/P_std, EMA half-life and ramp-up; no augmentation) and stops as it does, at
`cur_nimg >= total_kimg * 1000`, counting `int(batch_size * batch_mul_avg)` images a step;
patchdiff trains `configs/demo.py:p=P` on the same zip (`data.source=zip`) for that number of steps.

The data: the demo's 168 "Smileys & Emotion" Twemoji at 32 px, written once as a zip in the
official dataset layout (PNGs + dataset.json). Each run's final EMA weights (the official
`network-snapshot-*.pkl` converted as `python -m patchdiff.convert` does it) are scored as
`python -m patchdiff.main --mode=eval --seeds=0-499` scores the demo: FID of --fid_samples samples
(seeds 0..N-1, the demo's sampler: 18 Heun steps) against the Inception statistics of all 168
training images, one statistics file for every run. The first 64 samples of each run are saved as
a grid in --grids, with `results.json` (every run's record) and `table.md`. Finished runs are
skipped when the command is repeated; --report only writes the table of what --out holds.

  --points=1:24,0.5:61   full-image ratio p : kimg (the official loop's count) of each run
  --sides=official,patchdiff --seeds=0,1   which runs (official ones first)
  --cores=0,1            two runs at a time, each pinned to one core (default: one at a time)

Times in the table: wall time of the training process (start-up, patchdiff's compiles and its
final grid included), the loop's own time (official: its clock less its start-up; patchdiff: its
`train_seconds`, without compiles and sampling), and the CPU time of the training process.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import glob
import importlib.util
import json
import math
import os
import queue
import shutil
import socket
import subprocess
import sys
import time
import types
import zipfile

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

BATCH_MUL_DICT = "batch_mul_dict = {512: 1, 256: 2, 128: 4, 64: 16, 32: 32, 16: 64}"
CATEGORY = "Smileys & Emotion"


# ---- The recipe, from configs/demo.py, for both loops.

def demo_config(p: float, seed: int = 0, steps: int | None = None, data_zip: str | None = None):
  """configs/demo.py:p=P reading `data_zip` (when given) instead of the Twemoji package."""
  spec = importlib.util.spec_from_file_location("demo_config", os.path.join(REPO, "configs",
                                                                            "demo.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config(f"p={p:g}")
  cfg.seed = seed
  if data_zip:
    cfg.data.source = "zip"
    cfg.data.path = os.path.abspath(data_zip)
    cfg.data.twemoji_category = None
  if steps is not None:
    cfg.train.steps = steps
  return cfg


def official_kwargs(cfg, p: float, kimg: float, seed: int, data_zip: str, run_dir: str) -> dict:
  """`training_loop`'s arguments for the recipe of `cfg` (as the official train.py builds them)."""
  from patchdiff.nn import models  # pylint: disable=import-outside-toplevel
  m, t = models.resolve(cfg.model), cfg.train
  network = dict(class_name="training.networks.Patch_EDMPrecond", model_type="SongUNet",
                 use_fp16=False, dropout=m["dropout"])
  for key in ("embedding_type", "encoder_type", "decoder_type", "channel_mult_noise",
              "model_channels", "channel_mult_emb", "num_blocks"):
    network[key] = m[key]
  for key in ("resample_filter", "channel_mult", "attn_resolutions"):
    network[key] = list(m[key])
  return dict(
      run_dir=run_dir,
      dataset_kwargs=dict(class_name="training.dataset.ImageFolderDataset", path=data_zip,
                          use_labels=False, xflip=bool(cfg.data.hflip), cache=True,
                          resolution=m["img_resolution"]),
      data_loader_kwargs=dict(pin_memory=False, num_workers=1, prefetch_factor=2),
      network_kwargs=network,
      loss_kwargs=dict(class_name="training.patch_loss.Patch_EDMLoss", P_mean=t.p_mean,
                       P_std=t.p_std),
      optimizer_kwargs=dict(class_name="torch.optim.Adam", lr=t.lr, betas=[t.adam_b1, t.adam_b2],
                            eps=t.adam_eps),
      augment_kwargs=None, seed=seed, batch_size=t.batch_size, total_kimg=kimg,
      ema_halflife_kimg=t.ema_mimg * 1000, ema_rampup_ratio=t.ema_rampup,
      lr_rampup_kimg=t.lr_rampup_kimg, loss_scaling=1, kimg_per_tick=4,
      snapshot_ticks=10**6, state_dump_ticks=None, real_p=p, progressive=False)


def official_steps(p: float, kimg: float, batch: int) -> tuple[int, int]:
  """(steps, images counted a step) of the official loop's stochastic schedule at 32 px."""
  p_list = np.array([(1 - p) * 2 / 5, (1 - p) * 3 / 5, p])
  per_step = int(batch * np.sum(p_list * np.array([4, 2, 1])))  # as the loop counts
  return math.ceil(kimg * 1000 / per_step), per_step


# ---- The data: the demo's images as a dataset_tool zip.

def write_zip(path: str, resolution: int = 32) -> int:
  """The demo's images (168 Smileys & Emotion Twemoji) in the official dataset layout."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  from patchdiff.data import twemoji  # pylint: disable=import-outside-toplevel
  images = twemoji.load_twemoji(resolution, category=CATEGORY)
  tmp = path + ".tmp"
  with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
    for i, image in enumerate(images):
      with zf.open(f"{i // 1000:05d}/img{i:08d}.png", "w") as f:
        Image.fromarray(image).save(f, format="PNG")
    zf.writestr("dataset.json", json.dumps({"labels": None}))
  os.replace(tmp, path)
  return len(images)


# ---- The official loop, patched for a CPU at run time (a child process).

def _free_port() -> int:
  with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def train_official(official: str, kwargs: dict) -> None:
  import torch  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(len(os.sched_getaffinity(0)))  # the cores it may use (--cores: one)
  sys.path.insert(0, os.path.abspath(official))
  sys.modules["diffusers"] = types.SimpleNamespace(AutoencoderKL=None)  # latents only
  # Current torch's Sampler has no __init__ of its own; the official InfiniteSampler passes it the
  # dataset, as torch 1.x's accepted.
  torch.utils.data.Sampler.__init__ = lambda self, *args, **kw: None
  torch.nn.parallel.DistributedDataParallel = lambda module, **kw: module
  torch.cuda.max_memory_allocated = lambda *args, **kw: 0
  torch.cuda.max_memory_reserved = lambda *args, **kw: 0
  torch.cuda.reset_peak_memory_stats = lambda *args, **kw: None
  # One process; the snapshot's consistency check broadcasts, so a group must exist.
  os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
  torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}",
                                       rank=0, world_size=1)
  from torch_utils import training_stats  # pylint: disable=import-outside-toplevel
  training_stats.init_multiprocessing(rank=0, sync_device=None)
  path = os.path.join(official, "training", "training_loop.py")
  with open(path, encoding="utf-8") as f:
    source = f.read()
  if source.count(BATCH_MUL_DICT) != 1:
    raise SystemExit(f"{path}: `{BATCH_MUL_DICT}` not found once; is PATH the authors' code?")
  source = source.replace(BATCH_MUL_DICT, BATCH_MUL_DICT[:-1] + ", 8: 128}")
  import training  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  module = types.ModuleType("training.training_loop")
  module.__file__ = path
  sys.modules[module.__name__] = module
  exec(compile(source, path, "exec"), module.__dict__)  # pylint: disable=exec-used
  os.makedirs(kwargs["run_dir"], exist_ok=True)
  with open(os.path.join(kwargs["run_dir"], "training_options.json"), "w") as f:
    json.dump(kwargs, f, indent=2)
  module.training_loop(**kwargs, device=torch.device("cpu"))


def official_result(run_dir: str, per_step: int) -> tuple[str, int]:
  """(the last network snapshot, the images the loop counted) of an official run."""
  with open(os.path.join(run_dir, "stats.jsonl"), encoding="utf-8") as f:
    last = json.loads(f.read().splitlines()[-1])
  nimg = round(last["Progress/kimg"]["mean"] * 1000)
  snaps = sorted(glob.glob(os.path.join(run_dir, "network-snapshot-*.pkl")))
  return snaps[-1], nimg


# ---- patchdiff's loop and the measurement (child processes).

def train_patchdiff(cfg, workdir: str) -> None:
  from patchdiff import train  # pylint: disable=import-outside-toplevel
  train.train_and_evaluate(cfg, workdir)


def convert(snapshot: str, cfg, workdir: str, step: int) -> None:
  """The snapshot's EMA network as a checkpoint that `evaluation` samples from."""
  from patchdiff import checkpoint  # pylint: disable=import-outside-toplevel
  from patchdiff.nn import models  # pylint: disable=import-outside-toplevel
  from patchdiff.weights import files  # pylint: disable=import-outside-toplevel
  denoiser = models.load_torch_state_dict(files.read_state_dict(snapshot), cfg.model)
  checkpoint.save_weights(workdir, denoiser, cfg, step=step)


def measure(cfg, workdir: str, num: int, ref: str, grid: str) -> dict:
  """FID of samples of seeds 0..num-1 against `ref`, as `evaluation.evaluate` computes it (its
  SWD and KID, which need the training images' features too, are left out: on a shared CPU they
  cost as much again)."""
  from patchdiff import evaluation, generate, metrics  # pylint: disable=import-outside-toplevel
  from patchdiff.nn import inception  # pylint: disable=import-outside-toplevel
  model = evaluation.load_inception(None)
  stats = metrics.load_statistics(ref, feature_dim=2048, resolution=cfg.model.img_resolution)
  t0 = time.perf_counter()
  outdir, images = generate.sample_from_checkpoint(cfg, workdir, seeds=list(range(num)),
                                                   fmt="npz", keep_all=True)
  t1 = time.perf_counter()
  feats = inception.features(model, images)
  fid = metrics.frechet_distance(*metrics.feature_statistics(feats), *stats)
  os.makedirs(os.path.dirname(grid), exist_ok=True)
  shutil.copyfile(os.path.join(outdir, "grid.png"), grid)
  return dict(fid=fid, num_images=len(images), sample_seconds=t1 - t0,
              inception_seconds=time.perf_counter() - t1)


def child(args) -> None:
  """One piece of work in a process of its own: --child=JSON (what, and its arguments)."""
  job = json.loads(args.child)
  from absl import logging  # pylint: disable=import-outside-toplevel
  logging.set_verbosity(logging.INFO)
  if job["what"] == "official":
    train_official(job["official"], job["kwargs"])
    return
  cfg = demo_config(job["p"], job["seed"], job.get("steps"), job["zip"])
  if job["what"] == "patchdiff":
    train_patchdiff(cfg, job["workdir"])
  elif job["what"] == "fid_ref":
    from patchdiff import evaluation  # pylint: disable=import-outside-toplevel
    evaluation.fid_reference(cfg, None, job["ref"])
  elif job["what"] == "measure":
    if job.get("snapshot"):
      convert(job["snapshot"], cfg, job["workdir"], job["steps"])
    result = measure(cfg, job["workdir"], job["num"], job["ref"], job["grid"])
    with open(job["result"], "w", encoding="utf-8") as f:
      json.dump({k: v for k, v in result.items() if np.isscalar(v)}, f, indent=2)


def spawn(job: dict, log: str, core: int | None = None) -> tuple[float, float]:
  """Runs `job` in a child process (output to `log`), on `core` alone when given; (its wall time,
  its CPU time (user + system, with the processes it waited for)) in seconds."""
  cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(job)]
  if core is not None:
    cmd = ["taskset", "-c", str(core)] + cmd
  t0 = time.perf_counter()
  with open(log, "a", encoding="utf-8") as f:
    f.write(f"\n$ {' '.join(cmd)}\n")
    f.flush()
    proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
    _, status, usage = os.wait4(proc.pid, 0)
  code = proc.returncode = os.waitstatus_to_exitcode(status)
  if code:
    raise RuntimeError(f"{job['what']} failed (exit {code}); see {log}")
  return time.perf_counter() - t0, usage.ru_utime + usage.ru_stime


# ---- The runs.

def git_head(path: str) -> str | None:
  try:
    out = subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True, text=True,
                         check=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", path, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, check=True).stdout.strip()
    return out + ("+changes" if dirty else "")
  except (OSError, subprocess.CalledProcessError):
    return None


def official_loop_seconds(run_dir: str) -> float:
  """The official loop's own time: its clock at the end less its start-up (tick 0's maintenance:
  dataset, network, optimizer)."""
  with open(os.path.join(run_dir, "stats.jsonl"), encoding="utf-8") as f:
    ticks = [json.loads(line) for line in f if line.strip()]
  return (ticks[-1]["Timing/total_sec"]["mean"]
          - ticks[0]["Timing/maintenance_sec"]["mean"])


def patchdiff_loop_seconds(workdir: str, steps: int) -> float:
  """patchdiff's loop time without compiling and sampling, from its last checkpoint's record."""
  path = os.path.join(workdir, "checkpoints", str(steps), "progress", "metadata")
  with open(path, encoding="utf-8") as f:
    return float(json.load(f)["train_seconds"])


def say(line: str) -> None:
  """One line, written at once (runs going two at a time print from two threads)."""
  sys.stdout.write(line + "\n")
  sys.stdout.flush()


def run_name(side: str, p: float, seed: int) -> str:
  return f"{side}_p{p:g}_seed{seed}"


def do_run(args, side: str, p: float, kimg: float, seed: int, data_zip: str, ref: str,
           core: int | None) -> dict:
  name = run_name(side, p, seed)
  run_dir = os.path.join(args.out, name)
  done_file = os.path.join(run_dir, "result.json")
  if os.path.isfile(done_file):
    with open(done_file, encoding="utf-8") as f:
      return json.load(f)
  if os.path.isdir(run_dir):  # an unfinished run starts again
    shutil.rmtree(run_dir)
  os.makedirs(run_dir)
  log = os.path.join(run_dir, "log.txt")
  cfg = demo_config(p, seed, None, data_zip)
  steps, per_step = official_steps(p, kimg, cfg.train.batch_size)
  where = "" if core is None else f" on core {core}"
  say(f"{name}: {steps} steps ({per_step} images counted a step, {kimg:g} kimg){where}")
  job = dict(p=p, seed=seed, zip=data_zip)
  snapshot = None
  if side == "official":
    train_dir = os.path.join(run_dir, "train")
    kwargs = official_kwargs(cfg, p, kimg, seed, data_zip, train_dir)
    wall, cpu = spawn(dict(what="official", official=os.path.abspath(args.official),
                           kwargs=kwargs), log, core)
    snapshot, nimg = official_result(train_dir, per_step)
    if nimg != steps * per_step:
      raise RuntimeError(f"{name}: the loop counted {nimg} images, not {steps} x {per_step}")
    loop = official_loop_seconds(train_dir)
    workdir = os.path.join(run_dir, "converted")
    code = args.code or git_head(args.official)
  else:
    workdir = os.path.join(run_dir, "workdir")
    wall, cpu = spawn(dict(job, what="patchdiff", workdir=workdir, steps=steps), log, core)
    loop = patchdiff_loop_seconds(workdir, steps)
    code = args.code or git_head(REPO)
  grid = os.path.join(args.grids, f"grid_{name}.png")
  t0 = time.perf_counter()
  spawn(dict(job, what="measure", workdir=workdir, snapshot=snapshot, steps=steps,
             num=args.fid_samples, ref=ref, grid=grid, result=os.path.join(run_dir, "eval.json")),
        log, core)
  with open(os.path.join(run_dir, "eval.json"), encoding="utf-8") as f:
    scores = json.load(f)
  result = dict(side=side, p=p, kimg=kimg, steps=steps, images_per_step=per_step, seed=seed,
                fid=scores["fid"], kid=scores.get("kid"), wall_seconds=wall, cpu_seconds=cpu,
                loop_seconds=loop, eval_seconds=time.perf_counter() - t0, core=core,
                fid_samples=args.fid_samples, code=code, grid=os.path.basename(grid),
                finished=time.strftime("%Y-%m-%d %H:%M"))
  with open(done_file, "w", encoding="utf-8") as f:
    json.dump(result, f, indent=2)
  say(f"{name}: FID {result['fid']:.1f}, trained in {fmt_minutes(wall)} "
      f"(loop {fmt_minutes(loop)}, CPU {fmt_minutes(cpu)})")
  return result


def fmt_minutes(seconds: float) -> str:
  return f"{int(seconds // 60)} min {int(round(seconds % 60)):02d} s"


def table(results: list[dict]) -> str:
  lines = ["| side | p | kimg | steps | seed | FID | wall time | loop | CPU time |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
  for r in sorted(results, key=lambda r: (-r["p"], r["side"] != "official", r["seed"])):
    lines.append(f"| {r['side']} | {r['p']:g} | {r['kimg']:g} | {r['steps']:,} | {r['seed']} | "
                 f"{r['fid']:.1f} | {fmt_minutes(r['wall_seconds'])} | "
                 f"{fmt_minutes(r['loop_seconds'])} | {fmt_minutes(r['cpu_seconds'])} |")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--official", help="checkout of the authors' repository")
  parser.add_argument("--out", default="runs/vs_official", help="runs, the zip, the statistics")
  parser.add_argument("--grids", default=os.path.join(REPO, "docs", "vs_official"),
                      help="where each run's grid of its first 64 samples goes")
  parser.add_argument("--points", default="1:24,0.5:61", help="p:kimg of each run of a seed")
  parser.add_argument("--sides", default="official,patchdiff")
  parser.add_argument("--seeds", default="0,1")
  parser.add_argument("--fid_samples", type=int, default=500)
  parser.add_argument("--cores", default=None, help="e.g. 0,1: runs go as many at a time, each "
                      "pinned to one of these cores (taskset); default: one at a time, unpinned")
  parser.add_argument("--code", default=None, help="the code version to record for the runs "
                      "(default: `git rev-parse HEAD` of the side's checkout)")
  parser.add_argument("--report", action="store_true", help="only print the table of --out")
  parser.add_argument("--child", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    child(args)
    return
  os.makedirs(args.out, exist_ok=True)
  args.out = os.path.abspath(args.out)
  args.grids = os.path.abspath(args.grids)
  if not args.report:
    if not args.official or not os.path.isfile(
        os.path.join(args.official, "training", "training_loop.py")):
      parser.error("--official=PATH: a checkout of the authors' repository is needed")
    sides = args.sides.split(",")
    if set(sides) - {"official", "patchdiff"}:
      parser.error(f"--sides={args.sides}: official and/or patchdiff")
    data_zip = os.path.join(args.out, "smileys32.zip")
    if not os.path.isfile(data_zip):
      print(f"wrote {write_zip(data_zip)} images to {data_zip}", flush=True)
    ref = os.path.join(args.out, "fid_ref.npz")
    if not os.path.isfile(ref):
      spawn(dict(what="fid_ref", p=1.0, seed=0, zip=data_zip, ref=ref),
            os.path.join(args.out, "fid_ref.log"))
    points = [tuple(float(v) for v in pk.split(":")) for pk in args.points.split(",")]
    runs = [(side, p, kimg, int(seed)) for side in sides for seed in args.seeds.split(",")
            for p, kimg in points]
    cores: queue.Queue = queue.Queue()
    for c in (args.cores.split(",") if args.cores else [None]):
      cores.put(None if c is None else int(c))

    def job(run):
      core = cores.get()
      try:
        return do_run(args, *run, data_zip, ref, core)
      finally:
        cores.put(core)

    with concurrent.futures.ThreadPoolExecutor(cores.qsize()) as pool:
      list(pool.map(job, runs))
  results = []
  for path in sorted(glob.glob(os.path.join(args.out, "*", "result.json"))):
    with open(path, encoding="utf-8") as f:
      results.append(json.load(f))
  if results:  # beside the grids: every run's record and the table
    os.makedirs(args.grids, exist_ok=True)
    with open(os.path.join(args.grids, "results.json"), "w", encoding="utf-8") as f:
      json.dump(results, f, indent=2)
    with open(os.path.join(args.grids, "table.md"), "w", encoding="utf-8") as f:
      f.write(table(results) + "\n")
  print(table(results))


if __name__ == "__main__":
  main()
