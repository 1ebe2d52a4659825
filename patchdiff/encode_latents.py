"""Precomputes a dataset's VAE posteriors (mean and std) for Latent Patch Diffusion.

  python -m patchdiff.encode_latents --vae=sd-vae-ft-ema --source=zip \
      --path=datasets/lsun-church-256x256.zip --resolution=256 --out=datasets/church-latents.npz

Images go through the training decoder (`data.images.decode_image_tf`: alpha on white, centre crop,
Lanczos resize to --resolution) and the VAE's encoder. The output .npz holds `mean` and `std`
(N, C, R/f, R/f) float32 (NCHW, `data.latent_layout`'s default), both multiplied by the VAE's
scaling factor, plus `scaling_factor` and, with --labels, `labels` (N,) int64. Training draws a
fresh posterior sample per epoch from them (`data.source="latents"`, see `data.latents.load_latents`).
Arrays are stored uncompressed, so training memory-maps them (`data.cache=False`).
Corrupt images are skipped and reported by path (or fatal with --noskip_corrupt). The encoded
files are read into memory (as the pixel pipeline does); pixels are decoded --chunk at a time.
"""
from __future__ import annotations

import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from jax.sharding import NamedSharding, PartitionSpec as P

from patchdiff import config_lib, sharding


def encode_dataset(data_cfg: dict, vae_path: str, out: str, *, batch: int = 64,
                   chunk: int = 4096, dtype=jnp.float32) -> dict:
  """Encodes every usable image of `data_cfg` (keys of `config_lib.DATA_DEFAULTS`) into `out`.

  Returns a summary: num_images, num_skipped, skipped ({name: reason}), shape, seconds.
  """
  from patchdiff.nn import vae as vae_lib  # pylint: disable=import-outside-toplevel
  from patchdiff.data import images  # pylint: disable=import-outside-toplevel
  if not str(out).endswith(".npz"):
    raise ValueError(f"--out {out} must end in .npz")
  cfg = config_lib.data_config(dict(data_cfg, cache=True),
                               label_dim=1 if data_cfg.get("labels") else 0)
  if cfg["source"] not in ("zip", "folder", "tfds"):
    raise ValueError(f"data source {cfg['source']!r} holds no images to encode")
  vae = vae_lib.load_vae(vae_path, dtype=dtype)  # a bad folder fails before any image is read
  res, f = cfg["resolution"], vae.downsample_factor
  if res % f:
    raise ValueError(f"resolution {res} is not divisible by the VAE's downsampling factor {f}")
  enc = images.scan(cfg)
  n, c, lr = len(enc.data), vae.latent_channels, res // f
  scale, shift = vae.scaling_factor, vae.shift_factor

  mesh = sharding.data_mesh()
  shard = NamedSharding(mesh, P(mesh.axis_names))
  b = -(-batch // mesh.size) * mesh.size  # one compiled shape for every call
  encode = vae_lib.encode_fn(vae)

  @jax.jit
  def to_latent(u8):
    x = u8.astype(jnp.float32) / 127.5 - 1.0
    mean, std = encode(x)
    mean = scale * (mean - shift)
    return (jnp.transpose(mean, (0, 3, 1, 2)), jnp.transpose(scale * std, (0, 3, 1, 2)))

  t0 = time.perf_counter()
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(out))) as tmp:
    mean = np.lib.format.open_memmap(os.path.join(tmp, "mean.npy"), "w+", np.float32,
                                     (n, c, lr, lr))
    std = np.lib.format.open_memmap(os.path.join(tmp, "std.npy"), "w+", np.float32,
                                    (n, c, lr, lr))
    kept_all, skipped, done = [], {}, 0
    for lo in range(0, n, chunk):
      part = images.Encoded(enc.names[lo:lo + chunk], enc.data[lo:lo + chunk],
                             {i - lo: e for i, e in enc.errors.items() if lo <= i < lo + chunk},
                             origin=enc.origin)
      pixels, kept, bad = images.decode_all(part, res, cfg["skip_corrupt"], allow_none=True)
      skipped.update({part.names[i]: why for i, why in bad.items()})
      kept_all.append(kept + lo)
      for s in range(0, len(pixels), b):
        x = pixels[s:s + b]
        m = len(x)
        if m < b:
          x = np.concatenate([x, np.zeros((b - m, res, res, 3), np.uint8)])
        mu, sd = to_latent(jax.device_put(x, shard))
        mean[done:done + m] = np.asarray(mu)[:m]
        std[done:done + m] = np.asarray(sd)[:m]
        done += m
      logging.info("encoded %d of %d images (%.1f images/s)", done, n,
                   done / (time.perf_counter() - t0))
    if not done:
      raise ValueError(f"no usable images in {enc.origin}: all {n} are unreadable or corrupt")
    kept = np.concatenate(kept_all)
    arrays = dict(mean=mean[:done], std=std[:done], scaling_factor=np.float32(scale))
    if enc.labels is not None:
      arrays["labels"] = enc.labels[kept].astype(np.int64)
    partial = out[:-len(".npz")] + ".partial.npz"  # never a half-written `out`
    np.savez(partial, **arrays)  # uncompressed: memory-mappable; streamed in 16 MiB pieces
    os.replace(partial, out)
    del mean, std
  summary = dict(num_images=done, num_skipped=len(skipped), skipped=skipped,
                 shape=(done, c, lr, lr), seconds=time.perf_counter() - t0)
  logging.info("wrote %s: %d latents %s, %d images skipped, %.1f s", out, done,
               summary["shape"][1:], len(skipped), summary["seconds"])
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
  flags.DEFINE_string("out", None, "output .npz")
  flags.DEFINE_integer("batch", 64, "images per VAE call (split over the devices)")
  flags.DEFINE_integer("chunk", 4096, "images decoded at a time")
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
                     dtype=jnp.bfloat16 if f.dtype == "bfloat16" else jnp.float32)
  print(f"wrote {f.out}: {s['num_images']} latents of shape {s['shape'][1:]} "
        f"({s['num_skipped']} images skipped) in {s['seconds']:.1f} s")


if __name__ == "__main__":
  define_flags()
  app.run(main)
