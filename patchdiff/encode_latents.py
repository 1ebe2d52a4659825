"""Precomputes a dataset's VAE posteriors (mean and std) for Latent Patch Diffusion, streaming: the
images are read, decoded and encoded a chunk at a time and the latents written in shards as they
come, so memory does not grow with the dataset.

  python -m patchdiff.encode_latents --vae=sd-vae-ft-ema --source=zip \
      --path=datasets/imagenet-256x256.zip --resolution=256 --labels \
      --out=datasets/imagenet256-latents

Images go through the training decoder (`data.decode.decode_image_tf`: alpha on white, centre crop,
Lanczos resize to --resolution) and the VAE's encoder. The output is a folder of shards (the format
is described in `data.latents`; `data.latent_shards` writes and checks the files): shard k holds
the latents of the source's images [k S, (k + 1) S) (S = --shard_size) that decoded, in source
order, as `mean.npy` and `std.npy` (count, C, R/f, R/f) float32 (NCHW), both multiplied by the
VAE's scaling factor (the mean after subtracting its shift factor), and with --labels
`labels.npy` (count,) int64. `manifest.json`, written last, lists the shards and records counts,
shapes, dtype, scaling factor, source and VAE.
Training reads the folder (`data.source="latents"`, `data.path=` the folder) memory-mapped shard
by shard, and draws a fresh posterior sample per epoch (`data.latents.load_latents`).

Memory: a background thread reads and decodes the next chunks of --chunk images while the VAE
encodes one; at most 4 chunks are held (one being read and decoded, two waiting, one being
encoded), each its encoded files plus R x R x 3 uint8 pixels, and one shard of latents,
2 x S x C x (R/f)^2 x 4 bytes. Beyond these, the VAE and the runtime, the only memory that grows
with the dataset is the source's listing: names and class ids, ~85 bytes per image of a labelled
zip (`data.zip_index.ZipIndex`), ~340 bytes per image while the listing is built, before encoding
starts. ImageNet at 256 px with the defaults (chunk 512, shard 4096): 384 MiB of pixels plus the
encoded files of 4 x 512 images, a 128 MiB shard, ~110 MiB of listing.

Resuming: spec.json, written first, records what is encoded (the source and its fingerprint, the
number of images, labels, resolution, the VAE's weights digest and compute dtype, the LLVM level
the encoder compiles with (`xla_options.optimization_level`: XLA_FLAGS', else the package's), the
shard size). Rerunning the same command skips the finished shards and encodes the rest, so that
the result is the uninterrupted run's bit for bit; a rerun that differs in any of these is a
ValueError naming the key and both values (for the source: both sources and image counts, as
--limit changes the count). A spec.json without the level (written before it was recorded)
resumes unchecked, with a warning where shards exist: those were compiled at the level of their
run (XLA_FLAGS', else XLA's default 3), which it does not record; its manifest records no level.
Every shard is written under a temporary name and renamed whole, and spec.json and manifest.json
are written to temporary files and renamed, so an interrupted run leaves finished shards and no
partial file; the rerun removes the temporary files and folders of killed processes. The rerun
also checks each finished shard of its slice against its shard.json (the arrays' headers and
file sizes, not their data) and encodes a damaged one again, saying so.

Several processes or hosts: process p of P (--process_index, --process_count; by default
`jax.process_index()` and `jax.process_count()`) encodes the contiguous shards
[floor(p K / P), floor((p + 1) K / P)) of the K shards, on its own devices; the slices never
overlap and together are every shard in order. The process that finds every shard written writes
manifest.json (rerunning any process once all are done writes it too). All processes write to the
same --out folder (a shared filesystem) and must be given the same flags.

Corrupt images are skipped and reported by path (or fatal with --noskip_corrupt).
"""
from __future__ import annotations

import hashlib
import json
import os
import queue
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from jax.sharding import NamedSharding, PartitionSpec as P

from patchdiff import config_lib, sharding, xla_options
from patchdiff.data import latent_shards, latents as latent_files

# Decoded chunks waiting for the VAE.
_PREFETCH = 2


def vae_digest(vae) -> str:
  """SHA-256 of the VAE's weights (diffusers names, PyTorch layout) and its scaling and shift:
  the same for the same weights wherever the files are."""
  from patchdiff.nn import vae as vae_lib  # pylint: disable=import-outside-toplevel
  h = hashlib.sha256(repr((vae.scaling_factor, vae.shift_factor)).encode())
  for name, a in sorted(vae_lib.state_dict(vae).items()):
    a = np.ascontiguousarray(a)
    h.update(f"{name} {a.dtype.str} {a.shape}\n".encode())
    h.update(a.tobytes())
  return h.hexdigest()


class _Prefetch:
  """Iterates `items`, which a background thread produces at most `depth` ahead; an exception
  there is raised here. Leaving the `with` block stops the thread and waits for it."""

  _END = object()

  def __init__(self, items: Iterator, depth: int):
    self._items, self._queue = items, queue.Queue(maxsize=depth)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)

  def _put(self, x) -> bool:
    while not self._stop.is_set():
      try:
        self._queue.put(x, timeout=0.1)
        return True
      except queue.Full:
        pass
    return False

  def _run(self) -> None:
    try:
      for x in self._items:
        if not self._put((x, None)):
          return
        del x  # held by the queue and then the consumer only
      self._put((self._END, None))
    except BaseException as e:  # pylint: disable=broad-except  (handed to the consumer)
      self._put((None, e))

  def __enter__(self) -> "_Prefetch":
    self._thread.start()
    return self

  def __exit__(self, *exc) -> None:
    self._stop.set()
    self._thread.join()

  def __iter__(self):
    while True:
      x, error = self._queue.get()
      if error is not None:
        raise error
      if x is self._END:
        return
      yield x


def encode_dataset(data_cfg: dict, vae_path: str, out: str, *, batch: int = 64,
                   chunk: int = 512, shard_size: int = 4096, dtype=jnp.float32,
                   process_index: int | None = None, process_count: int | None = None,
                   on_shard: Callable[[int], None] | None = None) -> dict:
  """Encodes the usable images of `data_cfg` (keys of `config_lib.DATA_DEFAULTS`) into the folder
  `out` (see the module docstring), this process's slice of the shards, skipping shards already
  there. `on_shard(k)` is called after shard k is in place.

  Returns a summary: complete (manifest.json written), num_images (latents in the whole folder
  when complete, else in this process's shards), num_skipped and skipped ({name: reason}) of the
  same images, shape (num_images, C, R/f, R/f), num_shards, shards_written (this run),
  shards_resumed (found finished), images_per_s (images read this run / seconds), seconds.
  """
  from patchdiff.nn import vae as vae_lib  # pylint: disable=import-outside-toplevel
  from patchdiff.data import decode, sources  # pylint: disable=import-outside-toplevel
  t0 = time.perf_counter()
  out = Path(out)
  if out.suffix:
    raise ValueError(f"--out {out}: the latents are written as a folder of shards, named without "
                     "a suffix (data.path of the latent source), e.g. "
                     "--out=datasets/imagenet256-latents")
  if out.exists() and not out.is_dir():
    raise ValueError(f"--out {out} exists and is not a folder")
  for name, v in (("batch", batch), ("chunk", chunk), ("shard_size", shard_size)):
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
      raise ValueError(f"{name}={v!r} must be a positive integer")
  p = jax.process_index() if process_index is None else int(process_index)
  n_proc = jax.process_count() if process_count is None else int(process_count)
  if n_proc < 1 or not 0 <= p < n_proc:
    raise ValueError(f"process_index={p} must lie in [0, process_count={n_proc})")
  cfg = config_lib.data_config(dict(data_cfg, cache=True),
                               label_dim=1 if data_cfg.get("labels") else 0)
  src = cfg["source"]
  if src not in ("zip", "folder", "tfds"):
    raise ValueError(f"data source {src!r} holds no images to encode")
  vae = vae_lib.load_vae(vae_path, dtype=dtype)  # a bad folder fails before any image is read
  res, f = cfg["resolution"], vae.downsample_factor
  if res % f:
    raise ValueError(f"resolution {res} is not divisible by the VAE's downsampling factor {f}")
  listing = sources.list_source(cfg)
  n, c, lr = len(listing), vae.latent_channels, res // f
  scale, shift = vae.scaling_factor, vae.shift_factor
  k_all = -(-n // shard_size)
  source = (listing.origin if src == "tfds"  # "tfds:<name or directory>"
            else f"{src}:{os.path.abspath(os.path.expanduser(os.fspath(cfg['path'])))}")
  level = xla_options.optimization_level(jax.default_backend())  # the mesh's platform
  spec = dict(format=latent_files.SHARDS_FORMAT, source=source,
              source_fingerprint=listing.fingerprint, num_images=n, labels=bool(cfg["labels"]),
              resolution=res, vae=vae_digest(vae), vae_dtype=jnp.dtype(dtype).name,
              xla_backend_optimization_level=level,
              vae_path=os.path.abspath(os.fspath(vae_path)), shape=[c, lr, lr],
              scaling_factor=float(scale), shard_size=shard_size, num_shards=k_all)
  out.mkdir(parents=True, exist_ok=True)
  latent_shards.remove_temporary(out)
  found = latent_shards.claim_spec(out, spec)
  if "xla_backend_optimization_level" not in found and any(latent_shards.shard_done(out, k)
                                                            for k in range(k_all)):
    logging.warning("%s does not record the LLVM level (an earlier version wrote it): the "
                    "shards written now use level %d, the finished ones their run's (XLA_FLAGS', "
                    "else XLA's default 3), which this run cannot check", out / latent_files.SPEC,
                    level)
  spec = {k: v for k, v in json.loads(json.dumps(spec)).items() if k in found}  # as recorded

  mine = range(k_all * p // n_proc, k_all * (p + 1) // n_proc)
  todo = latent_shards.prepare_slice(out, mine, spec)
  logging.info("process %d of %d: shards [%d, %d) of %d (%d images), %d already written",
               p, n_proc, mine.start, mine.stop, k_all, n, len(mine) - len(todo))

  mesh = sharding.data_mesh(jax.local_devices())
  layout = NamedSharding(mesh, P(mesh.axis_names))
  b = -(-batch // mesh.size) * mesh.size  # one compiled shape for every call
  chunk = min(chunk, shard_size)
  encode = vae_lib.encode_fn(vae)

  @xla_options.jit  # the mesh's devices are the default backend's; `encode` is part of it
  def to_latent(u8):
    x = u8.astype(jnp.float32) / 127.5 - 1.0
    mean, std = encode(x)
    mean = scale * (mean - shift)
    return (jnp.transpose(mean, (0, 3, 1, 2)), jnp.transpose(scale * std, (0, 3, 1, 2)))

  def decoded() -> Iterator[tuple]:
    """(shard, pixels, labels of the decoded images, {name: reason} of the others, last chunk
    of its shard?) for every chunk of the shards to do."""
    for k in todo:
      start, stop = k * shard_size, min((k + 1) * shard_size, n)
      for lo in range(start, stop, chunk):
        part = listing.read(lo, min(lo + chunk, stop))
        pixels, kept, bad = decode.decode_all(part, res, cfg["skip_corrupt"], allow_none=True)
        labels = part.labels[kept] if cfg["labels"] else None
        bad = {part.names[i]: why for i, why in bad.items()}
        del part  # the encoded files: not held while the next chunk is read
        yield k, pixels, labels, bad, lo + chunk >= stop
        del pixels

  mean = np.empty((min(shard_size, n), c, lr, lr), np.float32)
  std = np.empty_like(mean)
  written, read, count, labels, skipped = [], 0, 0, [], {}
  with _Prefetch(decoded(), _PREFETCH) as chunks:
    for item in chunks:
      k, pixels, lab, bad, last = item
      del item
      pending = x = None
      for s in [*range(0, len(pixels), b), None]:  # None: copy out the last batch
        nxt = None
        if s is not None:
          x = pixels[s:s + b]
          if len(x) < b:
            x = np.concatenate([x, np.zeros((b - len(x), res, res, 3), np.uint8)])
          nxt = (to_latent(jax.device_put(x, layout)), min(b, len(pixels) - s))
        if pending is not None:  # the previous batch, copied out while this one computes
          (mu, sd), m = pending
          mean[count:count + m] = np.asarray(mu)[:m]
          std[count:count + m] = np.asarray(sd)[:m]
          count += m
        pending = nxt
      read += len(pixels) + len(bad)
      pixels = x = None  # not held while waiting for the next chunk
      skipped.update(bad)
      if lab is not None:
        labels.append(lab.astype(np.int64))
      if not last:
        continue
      start, stop = k * shard_size, min((k + 1) * shard_size, n)
      arrays = dict(mean=mean[:count], std=std[:count])
      if cfg["labels"]:
        arrays["labels"] = np.concatenate(labels) if labels else np.zeros(0, np.int64)
      latent_shards.write_shard(out, k, arrays, dict(index=k, start=start, stop=stop, count=count,
                                                     skipped=skipped))
      written.append(k)
      logging.info("shard %d (%d of %d for this process): %d latents, %d images skipped; "
                   "%.1f images/s", k, len(written), len(todo), count, len(skipped),
                   read / (time.perf_counter() - t0))
      count, labels, skipped = 0, [], {}
      if on_shard is not None:
        on_shard(k)

  def owner(k: int) -> str:
    q = next(q for q in range(n_proc) if k < k_all * (q + 1) // n_proc)
    return f"--process_index={q} --process_count={n_proc}" if n_proc > 1 else "the same flags"

  manifest = latent_shards.write_manifest(out, spec, listing.origin, owner)
  if manifest is not None:
    total, skipped = manifest["num_latents"], manifest["skipped"]
  else:
    total, skipped = latent_shards.slice_totals(out, mine)
  seconds = time.perf_counter() - t0
  summary = dict(complete=manifest is not None, num_images=total, num_skipped=len(skipped),
                 skipped=skipped, shape=(total, c, lr, lr), num_shards=k_all,
                 shards_written=len(written), shards_resumed=len(mine) - len(todo),
                 images_per_s=read / seconds, seconds=seconds)
  logging.info("%s %s: %d latents %s, %d images skipped, %d shards written, %d resumed, "
               "%.1f s", "finished" if manifest else "wrote this process's shards of", out,
               total, summary["shape"][1:], len(skipped), len(written), summary["shards_resumed"],
               seconds)
  return summary


def define_flags() -> None:
  """The command line's flags (defined only when run as a program: `main`'s flags share names)."""
  flags.DEFINE_string("vae", None, "diffusers-format VAE folder (config.json + "
                      "diffusion_pytorch_model.safetensors), e.g. stabilityai/sd-vae-ft-ema")
  flags.DEFINE_enum("source", "zip", ["zip", "folder", "tfds"], "the image source")
  flags.DEFINE_string("path", None, "zip / folder / prepared TFDS directory")
  flags.DEFINE_string("tfds_name", None, "with --source=tfds")
  flags.DEFINE_string("tfds_data_dir", None, "with --source=tfds")
  flags.DEFINE_integer("resolution", 256, "image size fed to the VAE")
  flags.DEFINE_bool("labels", False, "store the class labels (dataset.json / subfolders)")
  flags.DEFINE_integer("limit", None, "the first N images only")
  flags.DEFINE_bool("skip_corrupt", True, "skip corrupt images (else: fail on the first)")
  flags.DEFINE_string("out", None, "output folder of latent shards (resumed if it holds some)")
  flags.DEFINE_integer("batch", 64, "images per VAE call (split over this process's devices)")
  flags.DEFINE_integer("chunk", 512, "images read and decoded at a time")
  flags.DEFINE_integer("shard_size", 4096, "source images per shard")
  flags.DEFINE_integer("process_index", None, "this process's slice of the shards (default: "
                       "jax.process_index())")
  flags.DEFINE_integer("process_count", None, "the number of slices (default: "
                       "jax.process_count())")
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "VAE compute precision")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  for name in ("vae", "out"):
    if not f[name].value:
      raise app.UsageError(f"--{name} is required")
  if f.source != "tfds" and not f.path:
    raise app.UsageError(f"--source={f.source} needs --path")
  data_cfg = dict(source=f.source, path=f.path, resolution=f.resolution, labels=f.labels,
                  limit=f.limit, skip_corrupt=f.skip_corrupt, tfds_name=f.tfds_name,
                  tfds_data_dir=f.tfds_data_dir)
  s = encode_dataset(data_cfg, f.vae, f.out, batch=f.batch, chunk=f.chunk,
                     shard_size=f.shard_size, process_index=f.process_index,
                     process_count=f.process_count,
                     dtype=jnp.bfloat16 if f.dtype == "bfloat16" else jnp.float32)
  what = f"{s['num_images']} latents of shape {s['shape'][1:]} ({s['num_skipped']} images skipped)"
  if s["complete"]:
    print(f"wrote {f.out}: {what} in {s['seconds']:.1f} s ({s['shards_written']} of "
          f"{s['num_shards']} shards this run, {s['images_per_s']:.1f} images/s)")
  else:
    print(f"wrote this process's shards to {f.out}: {what} in {s['seconds']:.1f} s; other "
          "processes' shards are still missing (the last process to finish writes "
          f"{latent_files.MANIFEST})")


if __name__ == "__main__":
  define_flags()
  app.run(main)
