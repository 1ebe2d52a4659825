"""Drawing samples: seed ranges, batches sharded over every device, canvases and known regions;
and `--mode=sample`, sampling a checkpoint (or a network file) into PNGs or an .npz.

Each image depends on its seed alone (its latents, churn noise and drawn class come from
`jax.random.key(seed)`), not on the batch size, the device count or the host count.
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from patchdiff import checkpoint, images_io, sampling, sharding
from patchdiff.nn import models


def parse_seeds(spec: str) -> list[int]:
  """'0-49999', '7', '0,5,10-12' -> the seeds in order; empty or reversed ranges are errors."""
  seeds: list[int] = []
  for part in str(spec).split(","):
    part = part.strip()
    m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
    if not m:
      raise ValueError(f"seeds {spec!r}: {part!r} is not N or N-M with non-negative integers")
    lo, hi = int(m.group(1)), int(m.group(2) if m.group(2) is not None else m.group(1))
    if hi < lo:
      raise ValueError(f"seeds {spec!r}: the range {part!r} is reversed")
    seeds.extend(range(lo, hi + 1))
  if not seeds:
    raise ValueError(f"seeds {spec!r} is empty")
  if max(seeds) >= 2 ** 32:
    raise ValueError(f"seeds {spec!r}: seeds must be below 2^32")
  return seeds


@dataclass
class Known:
  """An image held fixed where `mask` is 1 (inpainting; outpainting is a centred known region)."""
  image: np.ndarray  # (H, W, C) in [-1, 1]
  mask: np.ndarray   # (H, W, 1) in {0, 1}

  @classmethod
  def centred(cls, image: np.ndarray, canvas: int) -> "Known":
    """Outpainting: `image` (R, R, C) in the middle of a `canvas` square, the border unknown."""
    r, c = image.shape[0], image.shape[-1]
    if canvas < r or (canvas - r) % 2:
      raise ValueError(f"canvas {canvas} must be >= the image size {r} and differ by an even "
                       "number of pixels")
    o = (canvas - r) // 2
    full = np.zeros((canvas, canvas, c), np.float32)
    mask = np.zeros((canvas, canvas, 1), np.float32)
    full[o:o + r, o:o + r] = image
    mask[o:o + r, o:o + r] = 1
    return cls(full, mask)


class Sampler:
  """Samples seeds in batches sharded over `mesh`'s devices (all of them by default)."""

  def __init__(self, denoiser: nnx.Module, model_cfg: dict, sample_cfg, mesh: Mesh | None = None,
               decoder: Callable[[jax.Array], jax.Array] | None = None):
    """`decoder` maps a batch of samples to images on the devices (a latent model's VAE)."""
    self.denoiser = denoiser
    self.decoder = decoder
    self.model_cfg = model_cfg
    self.scfg = sample_cfg
    self.mesh = mesh or sharding.data_mesh()
    self.devices = self.mesh.devices.size
    self.sharding = NamedSharding(self.mesh, P(self.mesh.axis_names))

  def batches(self, seeds: Sequence[int], batch_size: int) -> Iterator[tuple[list[int], int]]:
    """(seeds of the batch padded to a multiple of the device count, number of real seeds)."""
    b = -(-batch_size // self.devices) * self.devices
    for start in range(0, len(seeds), b):
      chunk = list(seeds[start:start + b])
      yield chunk + [chunk[-1]] * (b - len(chunk)), len(chunk)

  def sample(self, seeds: Sequence[int], *, batch_size: int | None = None,
             class_idx: int | None = None, canvas: int | None = None,
             known: Known | None = None,
             on_batch: Callable[[list[int], np.ndarray], None] | None = None) -> np.ndarray | None:
    """Images in [-1, 1] for `seeds` (N, S, S, C), S the canvas (default: the resolution);
    with a decoder, its images of the samples.

    `on_batch(seeds, images)` receives each batch as it is done (then nothing is returned, so
    50,000 samples never sit in memory together).
    """
    r, c = self.model_cfg["img_resolution"], self.model_cfg["img_channels"]
    label_dim = self.model_cfg["label_dim"]
    size = canvas or (known.image.shape[0] if known is not None else r)
    if class_idx is not None and not 0 <= class_idx < max(label_dim, 1):
      raise ValueError(f"class {class_idx} is outside [0, label_dim={label_dim})")
    if class_idx is not None and not label_dim:
      raise ValueError("a class was given, but the model is unconditional (label_dim = 0)")
    scfg = self.scfg
    out, done, t0 = [], 0, time.perf_counter()
    for batch, n in self.batches(seeds, batch_size or scfg.batch_size):
      seed_arr = jax.device_put(np.asarray(batch, np.uint32), self.sharding)
      keys = jax.vmap(jax.random.key)(seed_arr)
      latents = jax.vmap(lambda k: jax.random.normal(k, (size, size, c)))(keys)
      labels = None
      if label_dim:
        labels = jax.nn.one_hot(_classes(keys, label_dim, class_idx), label_dim)
      pos = jax.device_put(sampling.canvas_grid(len(batch), size, r), self.sharding)
      kw = {}
      if known is not None:
        kw = dict(known=jax.device_put(np.broadcast_to(known.image, (len(batch), *known.image.shape)),
                                       self.sharding),
                  mask=jax.device_put(np.broadcast_to(known.mask, (len(batch), *known.mask.shape)),
                                      self.sharding))
      x = sampling.heun_sample(self.denoiser, latents, num_steps=scfg.num_steps,
                               s_churn=scfg.s_churn, s_min=scfg.s_min, s_max=scfg.s_max,
                               s_noise=scfg.s_noise, labels=labels, guidance=scfg.guidance,
                               pos=pos, key=jax.vmap(lambda k: jax.random.fold_in(k, 2))(keys),
                               **kw)
      if self.decoder is not None:
        x = self.decoder(x)
      images = _gather(x)[:n]
      done += n
      if on_batch is not None:
        on_batch(list(batch[:n]), images)
      else:
        out.append(images)
      dt = time.perf_counter() - t0
      logging.info("sampled %d/%d images (%.2f images/s)", done, len(seeds), done / dt)
    return np.concatenate(out) if out else None


def _classes(keys: jax.Array, label_dim: int, class_idx: int | None) -> jax.Array:
  """The class of each seed's sample: `class_idx` for all, else drawn from the seed's key."""
  if class_idx is not None:
    return jnp.full(keys.shape, class_idx, jnp.int32)
  return jax.vmap(lambda k: jax.random.randint(jax.random.fold_in(k, 1), (), 0, label_dim))(keys)


def seed_classes(seeds: Sequence[int], label_dim: int, class_idx: int | None = None) -> np.ndarray:
  """(N,) int64: the class `Sampler.sample` conditions each seed's sample on."""
  keys = jax.vmap(jax.random.key)(jnp.asarray(np.asarray(seeds, np.uint32)))
  return np.asarray(_classes(keys, label_dim, class_idx), np.int64)


def _gather(x: jax.Array) -> np.ndarray:
  """The whole global array on this host (every process holds a copy after a multi-host run)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


class UsageError(ValueError):
  """Arguments of a workflow that do not go together (the command line shows them as usage)."""


def pixel_model(cfg: ml_collections.ConfigDict) -> bool:
  """Whether the model's samples are images (else latents, which need a VAE to be seen)."""
  return not cfg.patch.latent and models.resolve(cfg.model)["img_channels"] in (1, 3)


def latent_decoder(cfg: ml_collections.ConfigDict):
  """The VAE decoder of a latent model with `vae.path`, else None."""
  vae_cfg = cfg.get("vae")
  if pixel_model(cfg) or vae_cfg is None or not vae_cfg.path:
    return None
  from patchdiff.nn import vae  # pylint: disable=import-outside-toplevel
  return vae.latent_decoder(vae_cfg.path, vae_cfg.scale)


def load_image_pm1(path: str, size: int, channels: int) -> np.ndarray:
  """An image file as (size, size, channels) float32 in [-1, 1] (`data.load_image` gives the
  uint8 pixels), preprocessed exactly as training data (RGBA on white, centre crop, Lanczos
  resize)."""
  from patchdiff import data  # pylint: disable=import-outside-toplevel  (TensorFlow)
  if channels not in (1, 3):
    raise UsageError(f"a {channels}-channel model cannot take an image file ({path})")
  try:
    x = data.load_image(path, size)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"cannot read image {path}: {e}") from None
  return x[..., :channels].astype(np.float32) / 127.5 - 1


def default_seeds(cfg: ml_collections.ConfigDict) -> list[int]:
  """The seeds sampled when none are given: sample.num_images from sample.seed."""
  return list(range(cfg.sample.seed, cfg.sample.seed + cfg.sample.num_images))


def sample_from_checkpoint(cfg: ml_collections.ConfigDict, workdir: str, step: int | None = None,
                           seeds: list[int] | None = None, batch: int | None = None,
                           class_idx: int | None = None, fmt: str = "png",
                           outdir: str | None = None, canvas: int | None = None,
                           outpaint: str | None = None, inpaint: str | None = None,
                           mask: str | None = None, keep_all: bool = False,
                           denoiser=None) -> tuple[str, np.ndarray]:
  """Restores EMA weights from `workdir` (or samples `denoiser`, a network read from a file, with
  `outdir` given) and writes samples of `seeds`: PNGs in folders of 1,000, or one `samples.npz`
  (`arr_0` the uint8 NHWC images, `arr_1` the class of each for conditional models, `seeds`: the
  keys OpenAI's ADM evaluation suite reads), written batch by batch as the samples arrive; and a
  grid. Returns (outdir, the grid's images, or with `keep_all` every image, held in one array).

  Every argument is checked before the checkpoint is read or anything is compiled.
  """
  if denoiser is not None and not outdir:
    raise UsageError("sampling a network file needs --outdir, where the samples go")
  seeds = default_seeds(cfg) if seeds is None else list(seeds)
  m = models.resolve(cfg.model)
  r, c = m["img_resolution"], m["img_channels"]
  decoder = None
  if not pixel_model(cfg):
    if outpaint or inpaint:
      raise UsageError("--outpaint and --inpaint work on pixel models only (a latent model "
                       "would need the known image encoded)")
    decoder = latent_decoder(cfg)
    if decoder is None:
      raise UsageError("a latent model's samples are decoded by its VAE: set "
                       "--config.vae.path to a diffusers-format VAE folder")
  if (inpaint is None) != (mask is None):
    raise UsageError("--inpaint and --mask go together")
  if outpaint and inpaint:
    raise UsageError("--outpaint and --inpaint exclude each other")
  known = None
  if outpaint:
    known = Known.centred(load_image_pm1(outpaint, r, c), canvas or r)
  elif inpaint:
    size = canvas or r
    known = Known(load_image_pm1(inpaint, size, c),
                  (load_image_pm1(mask, size, 1) > 0).astype(np.float32))
  if canvas is not None:
    sampling.canvas_grid(1, canvas, r)  # validates
  mesh = sharding.data_mesh()
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  if denoiser is None:
    denoiser, step = checkpoint.load_ema(workdir, cfg, step, replicated)
  else:  # placed as a restored checkpoint is, so both sample the same program bit for bit
    graphdef, state = nnx.split(denoiser)
    denoiser = nnx.merge(graphdef, jax.device_put(state, replicated))
  sampler = Sampler(denoiser, m, cfg.sample, mesh=mesh, decoder=decoder)
  outdir = outdir or os.path.join(workdir, "samples", f"step_{step:08d}")
  writer = jax.process_index() == 0
  npz, kept, done = None, None, 0
  t0 = time.perf_counter()

  def on_batch(batch_seeds, images):
    nonlocal npz, kept, done
    images = images_io.to_uint8(images)
    if kept is None:  # the images' shape: the canvas's, or the decoder's for a latent model
      kept = np.zeros((len(seeds) if keep_all else min(cfg.sample.grid_size, len(seeds)),
                       *images.shape[1:]), np.uint8)
      if fmt == "npz" and writer:
        npz = images_io.NpzStream(os.path.join(outdir, "samples.npz"), "arr_0",
                                  (len(seeds), *images.shape[1:]), np.uint8)
    if fmt == "png" and writer:
      images_io.save_pngs(images, batch_seeds, outdir)
    if npz is not None:
      npz.append(images)
    kept[done:done + len(images)] = images[:max(len(kept) - done, 0)]
    done += len(images)
  try:
    sampler.sample(seeds, batch_size=batch, class_idx=class_idx, canvas=canvas, known=known,
                   on_batch=on_batch)
  except BaseException:
    if npz is not None:
      npz.abort()
    raise
  dt = time.perf_counter() - t0
  if npz is not None:
    extra = {}
    if m["label_dim"]:
      extra["arr_1"] = seed_classes(seeds, m["label_dim"], class_idx)
    npz.close(**extra, seeds=np.asarray(seeds, np.int64))
  if writer and cfg.sample.grid_size:
    images_io.save_grid(kept[:cfg.sample.grid_size], os.path.join(outdir, "grid.png"))
  logging.info("wrote %d samples to %s (%.2f images/s)", len(seeds), outdir, len(seeds) / dt)
  return outdir, kept
