"""Throughput of the patch input pipeline on a dataset_tool-style zip of 64 px PNGs.

Writes a temporary zip of N synthetic but photo-like 64x64 PNGs (smooth random colour fields
plus fine grain, so they compress like real 64 px photos rather than flat colours), then times
`data.build_input` per bucket (16, 32, 64 px alone) and for the p=0.5 mix, with the decoded
images cached in memory and straight from the zip (decoded in the tf.data graph every step).

  python benchmarks/input_pipeline.py [--num_images 4000] [--batch_size 256] [--seconds 5]
                                      [--repeats 2] [--stat best|median] [--decoders]
                                      [--cache both|on|off] [--mix_only]
                                      [--png_decoder auto|tensorflow]

Prints samples/s (patches per second) and full images/s (samples * (s/R)^2) per row, the best
(or median) of `repeats` timings (other processes on the machine only ever slow a timing down),
samples per CPU-second of this process (a load-independent measure of cost: on k idle cores the
rate can reach at most k times it), the cores other processes kept busy meanwhile (Linux; a figure
taken with others > 0 is not one of an idle machine), and, as a baseline, the rate of PNG decoding
alone. Uncached rows decode these PNGs with `png.decoder_name()` (imagecodecs when installed;
`--png_decoder tensorflow` forces TensorFlow's decoder, the fallback, for comparison).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
import zipfile

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from patchdiff import data  # noqa: E402  pylint: disable=wrong-import-position
from patchdiff.data import png  # noqa: E402  pylint: disable=wrong-import-position
from patchdiff.patches import PatchSchedule  # noqa: E402  pylint: disable=wrong-import-position

R = 64


def synthetic_image(rng: np.random.Generator, res: int = R) -> np.ndarray:
  """A smooth random colour field (bicubic-upsampled 6x6 noise) plus +-4 grain."""
  small = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
  img = np.asarray(Image.fromarray(small).resize((res, res), Image.Resampling.BICUBIC), np.int16)
  img = img + rng.integers(-4, 5, img.shape)
  return np.clip(img, 0, 255).astype(np.uint8)


def write_zip(path: str, num: int, seed: int = 0) -> float:
  """dataset_tool layout: 00000/img00000000.png, ..., dataset.json {"labels": null}."""
  rng = np.random.default_rng(seed)
  total = 0
  with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
    for i in range(num):
      buf = io.BytesIO()
      Image.fromarray(synthetic_image(rng)).save(buf, format="PNG")
      total += buf.tell()
      zf.writestr(f"{i // 1000:05d}/img{i:08d}.png", buf.getvalue())
    zf.writestr("dataset.json", json.dumps({"labels": None}))
  return total / num


def cpu_seconds() -> float:
  """CPU time (user + system) of this process, all threads."""
  t = os.times()
  return t.user + t.system


def machine_busy_seconds() -> float:
  """CPU time (all processes, all cores) the machine has spent busy, from /proc/stat (Linux);
  NaN elsewhere."""
  try:
    with open("/proc/stat", encoding="ascii") as f:
      ticks = [int(v) for v in f.readline().split()[1:]]
  except (OSError, ValueError):
    return float("nan")
  return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # less idle, iowait


def measure(cfg: dict, sched: PatchSchedule, batch_size: int, seconds: float, repeats: int,
            stat: str = "best"):
  """Best (or median) of `repeats` timings of `seconds` each, by samples/s: (samples/s, full
  images/s, samples/CPU-s, cores used by other processes meanwhile)."""
  it = data.build_input(cfg, sched, batch_size, 10**7, seed=0)
  for _ in range(3):  # warm up
    next(it)
  runs = []
  for _ in range(repeats):
    t0, c0, m0 = time.perf_counter(), cpu_seconds(), machine_busy_seconds()
    samples = pixels = 0
    while time.perf_counter() - t0 < seconds:
      b = next(it)
      n, s = b["image"].shape[:2]
      samples += n
      pixels += n * s * s
    dt, dc, dm = time.perf_counter() - t0, cpu_seconds() - c0, machine_busy_seconds() - m0
    runs.append((samples / dt, pixels / (R * R) / dt, samples / dc, max(dm - dc, 0.0) / dt))
  runs.sort()
  return runs[-1] if stat == "best" else runs[(len(runs) - 1) // 2]


def decode_only(path: str, seconds: float, repeats: int) -> float:
  """Baseline: PNG decoding alone (tf.io.decode_png in a parallel tf.data map), images/s."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  with zipfile.ZipFile(path) as zf:
    blobs = [zf.read(n) for n in sorted(zf.namelist()) if n.endswith(".png")]
  ds = tf.data.Dataset.from_tensor_slices(np.asarray(blobs, dtype=object)).repeat()
  ds = ds.map(lambda b: tf.io.decode_png(b, channels=3), num_parallel_calls=tf.data.AUTOTUNE)
  it = iter(ds.batch(256).prefetch(2))
  for _ in range(3):
    next(it)
  best = (0.0, 0.0)
  for _ in range(repeats):
    t0, c0, n = time.perf_counter(), cpu_seconds(), 0
    while time.perf_counter() - t0 < seconds:
      n += int(next(it).shape[0])
    best = max(best, (n / (time.perf_counter() - t0), n / (cpu_seconds() - c0)))
  return best


def other_decoders(path: str, repeats: int) -> None:
  """PNG decoders alone: PIL on one thread, and the uncached pipeline's (`png.decoder_name()`) on
  one and two threads (a second thread only helps a decoder that releases the GIL)."""
  import threading  # pylint: disable=import-outside-toplevel
  with zipfile.ZipFile(path) as zf:
    blobs = [zf.read(n) for n in sorted(zf.namelist()) if n.endswith(".png")]
  out = np.empty((len(blobs), R, R, 3), np.uint8)
  runs = {"PIL": (1, lambda lo, hi: [np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))
                                     for b in blobs[lo:hi]])}
  found = png.decoder()
  if found is not None:
    runs[found[0]] = (2, lambda lo, hi: found[1](blobs, [True] * len(blobs), list(range(lo, hi)),
                                                 out[lo:hi]))
  for name, (most, fn) in runs.items():
    for threads in range(1, most + 1):
      best = 0.0
      bounds = np.linspace(0, len(blobs), threads + 1).astype(int)
      for _ in range(repeats):
        workers = [threading.Thread(target=fn, args=(lo, hi))
                   for lo, hi in zip(bounds[:-1], bounds[1:])]
        t0 = time.perf_counter()
        for w in workers:
          w.start()
        for w in workers:
          w.join()
        best = max(best, len(blobs) / (time.perf_counter() - t0))
      print(f"PNG decode alone ({name}, {threads} thread{'s' * (threads > 1)}): {best:,.0f} "
            "images/s")


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--num_images", type=int, default=4000)
  ap.add_argument("--batch_size", type=int, default=256, help="full-image batch (global)")
  ap.add_argument("--seconds", type=float, default=5.0, help="timed seconds per row")
  ap.add_argument("--real_p", type=float, default=0.5)
  ap.add_argument("--repeats", type=int, default=2,
                  help="timings per row; the best (or median, --stat) is shown")
  ap.add_argument("--stat", choices=("best", "median"), default="best")
  ap.add_argument("--cache", choices=("both", "on", "off"), default="both",
                  help="rows with the images cached in memory (on), streamed (off), or both")
  ap.add_argument("--mix_only", action="store_true", help="only the p=real_p mix rows")
  ap.add_argument("--png_decoder", choices=("auto", "tensorflow"), default="auto",
                  help="auto: imagecodecs if installed, else TensorFlow (uncached rows)")
  ap.add_argument("--decoders", action="store_true",
                  help="also time PIL and the pipeline's decoder decoding the same PNGs")
  args = ap.parse_args(argv)
  if args.png_decoder == "tensorflow":
    png.ENABLED = False

  print("command: python benchmarks/input_pipeline.py " + " ".join(
      f"--{k}" if v is True else f"--{k} {v}" for k, v in vars(args).items() if v is not False))
  print(f"cpu cores: {os.cpu_count()}")
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "dataset.zip")
    avg = write_zip(path, args.num_images)
    print(f"zip: {args.num_images} PNGs of {R}x{R}, {avg / 1024:.1f} KiB each on average")
    p = args.real_p
    rows = [("16 px", (16,), (1.0,)), ("32 px", (32,), (1.0,)), ("64 px", (64,), (1.0,)),
            (f"mix p={p}", (16, 32, 64), ((1 - p) * 2 / 5, (1 - p) * 3 / 5, p))]
    dec, dec_cpu = decode_only(path, args.seconds, args.repeats)
    print(f"PNG decode alone (tf.data, parallel): {dec:,.0f} images/s, {dec_cpu:,.0f} images "
          "per CPU-second")
    if args.decoders:
      other_decoders(path, args.repeats)
    if args.mix_only:
      rows = rows[-1:]
    modes = {"both": (True, False), "on": (True,), "off": (False,)}[args.cache]
    if False in modes:
      print(f"uncached PNG decoder: {png.decoder_name()}")
    print(f"\n{'bucket':<12} {'source':<14} {'samples/s':>12} {'images/s':>12} "
          f"{'samples/CPU-s':>14} {'others':>7}   ({args.stat} of {args.repeats}; others: cores "
          "busy in other processes meanwhile)")
    for cache in modes:
      cfg = dict(source="zip", path=path, resolution=R, cache=cache)
      for name, sizes, probs in rows:
        sched = PatchSchedule(sizes, probs, R, seed=0)
        sps, ips, spc, others = measure(cfg, sched, args.batch_size, args.seconds, args.repeats,
                                        args.stat)
        label = "zip, cached" if cache else "zip, no cache"
        print(f"{name:<12} {label:<14} {sps:>12,.0f} {ips:>12,.0f} {spc:>14,.0f} {others:>7.2f}",
              flush=True)


if __name__ == "__main__":
  main()
