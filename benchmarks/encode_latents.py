"""Throughput and peak memory of the streaming latent encoder (`patchdiff.encode_latents`) against
the size of the dataset.

For each N, writes a dataset_tool-style zip of N synthetic labelled PNGs (smooth random colour
fields plus grain, `--resolution` px, 10 classes in dataset.json) and a tiny VAE with random
weights (3 blocks of 32, 32, 64 channels, 4x downsampling, 4 latent channels; `--vae` takes a
diffusers folder instead), then encodes the zip in a fresh child process per N and prints the
images/s of the whole run (listing, one XLA compile, decoding, encoding, writing), the same per
CPU-second of the child (less dependent on what else the machine runs), and its peak
resident memory (the RSS high-water mark, `resource.getrusage(RUSAGE_SELF).ru_maxrss`), next
to its RSS once the modules are imported and the VAE is loaded, before the encoder starts. A peak
that does not grow with N is the encoder's bounded memory.

  taskset -c 1 python benchmarks/encode_latents.py --num_images=10000,50000

Datasets and outputs go to a temporary folder (`--workdir` keeps them; a zip already there is
reused).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# A diffusers config of the VAE's kind, tiny: 3 encoder blocks, 4x downsampling.
TINY_VAE = {"_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3,
            "down_block_types": ["DownEncoderBlock2D"] * 3,
            "up_block_types": ["UpDecoderBlock2D"] * 3, "block_out_channels": [32, 32, 64],
            "layers_per_block": 1, "act_fn": "silu", "latent_channels": 4, "norm_num_groups": 8,
            "scaling_factor": 0.18215}
CLASSES = 10


def synthetic_png(rng: np.random.Generator, res: int) -> bytes:
  """A smooth random colour field (bicubic-upsampled 6x6 noise) plus +-4 grain, as PNG."""
  small = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
  img = np.asarray(Image.fromarray(small).resize((res, res), Image.Resampling.BICUBIC), np.int16)
  img = np.clip(img + rng.integers(-4, 5, img.shape), 0, 255).astype(np.uint8)
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, "PNG")
  return buf.getvalue()


def write_zip(path: str, n: int, res: int) -> None:
  """N labelled PNGs as EDM's dataset_tool writes them (stored, names 00000/img00000000.png)."""
  rng = np.random.default_rng(n)
  names = [f"{i // 1000:05d}/img{i:08d}.png" for i in range(n)]
  tmp = path + ".partial"
  with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
    for name in names:
      zf.writestr(name, synthetic_png(rng, res))
    labels = rng.integers(0, CLASSES, n)
    zf.writestr("dataset.json", json.dumps({"labels": [[m, int(c)] for m, c in
                                                       zip(names, labels)]}))
  os.replace(tmp, path)


def write_tiny_vae(folder: str) -> None:
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  from patchdiff.nn import vae  # pylint: disable=import-outside-toplevel
  os.makedirs(folder, exist_ok=True)
  save_file({k: np.asarray(v) for k, v in vae.state_dict(vae.create(TINY_VAE, seed=0)).items()},
            os.path.join(folder, "diffusion_pytorch_model.safetensors"))
  with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
    json.dump(TINY_VAE, f)


def rss_mib() -> float:
  """This process's current resident memory (Linux /proc)."""
  with open("/proc/self/statm", encoding="ascii") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(args: argparse.Namespace) -> None:
  """One encoding run; prints its figures as one JSON line."""
  from patchdiff import encode_latents  # pylint: disable=import-outside-toplevel
  from patchdiff.nn import vae  # pylint: disable=import-outside-toplevel
  import tensorflow  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  vae.load_vae(args.vae)  # load once, so that the baseline counts the runtime's share of it
  before = rss_mib()
  cpu0 = resource.getrusage(resource.RUSAGE_SELF)
  t0 = time.perf_counter()
  s = encode_latents.encode_dataset(
      dict(source="zip", path=args.zip, resolution=args.resolution, labels=True), args.vae,
      args.out, batch=args.batch, chunk=args.chunk, shard_size=args.shard_size)
  wall = time.perf_counter() - t0
  usage = resource.getrusage(resource.RUSAGE_SELF)
  cpu = usage.ru_utime + usage.ru_stime - cpu0.ru_utime - cpu0.ru_stime
  print(json.dumps(dict(n=s["num_images"], shards=s["num_shards"], wall=wall,
                        images_per_s=s["num_images"] / wall, per_cpu_s=s["num_images"] / cpu,
                        before_mib=before, peak_mib=usage.ru_maxrss / 1024)))  # KiB on Linux


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--num_images", default="10000,50000", help="comma-separated dataset sizes")
  ap.add_argument("--resolution", type=int, default=32)
  ap.add_argument("--batch", type=int, default=64)
  ap.add_argument("--chunk", type=int, default=512)
  ap.add_argument("--shard_size", type=int, default=4096)
  ap.add_argument("--vae", default=None, help="a diffusers VAE folder (default: the tiny one)")
  ap.add_argument("--workdir", default=None, help="keep datasets and outputs here")
  ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  ap.add_argument("--zip", help=argparse.SUPPRESS)
  ap.add_argument("--out", help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.child:
    child(args)
    return
  work = args.workdir or tempfile.mkdtemp(prefix="encode_latents_bench_")
  os.makedirs(work, exist_ok=True)
  try:
    vae_dir = args.vae or os.path.join(work, "tiny_vae")
    if not args.vae:
      write_tiny_vae(vae_dir)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"{args.resolution} px PNGs with labels, VAE {args.vae or 'tiny (random weights)'}, "
          f"batch {args.batch}, chunk {args.chunk}, shard {args.shard_size}, {cores} core(s)")
    print(f"{'images':>8} {'shards':>6} {'zip MiB':>8} {'wall s':>7} {'images/s':>9} "
          f"{'per CPU-s':>9} {'RSS before MiB':>15} {'peak RSS MiB':>13}")
    for n in (int(v) for v in args.num_images.split(",")):
      path = os.path.join(work, f"images_{n}_{args.resolution}.zip")
      if not os.path.exists(path):
        write_zip(path, n, args.resolution)
      out = os.path.join(work, f"latents_{n}")
      shutil.rmtree(out, ignore_errors=True)
      cmd = [sys.executable, os.path.abspath(__file__), "--child", f"--zip={path}",
             f"--out={out}", f"--vae={vae_dir}", f"--resolution={args.resolution}",
             f"--batch={args.batch}", f"--chunk={args.chunk}", f"--shard_size={args.shard_size}"]
      done = subprocess.run(cmd, capture_output=True, text=True, check=False)
      if done.returncode:
        sys.exit(f"encoding {n} images failed:\n{done.stderr[-3000:]}")
      r = json.loads(done.stdout.strip().splitlines()[-1])
      print(f"{r['n']:>8} {r['shards']:>6} {os.path.getsize(path) / 2**20:>8.1f} "
            f"{r['wall']:>7.1f} {r['images_per_s']:>9.1f} {r['per_cpu_s']:>9.1f} "
            f"{r['before_mib']:>15.0f} "
            f"{r['peak_mib']:>13.0f}", flush=True)
      shutil.rmtree(out, ignore_errors=True)
  finally:
    if not args.workdir:
      shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
  main()
