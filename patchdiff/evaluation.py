"""Sampling from checkpoints and measuring samples against the training data: the workflows of
`--mode=sample`, `--mode=eval` and `--mode=fid_ref`, and the FID + SWD that training logs.

Nothing here builds an optimizer or a training state: weights come from `checkpoint.load_ema`.
"""
from __future__ import annotations

import json
import os
import time

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from patchdiff import checkpoint, generate, images_io, metrics, patches, sharding
from patchdiff.nn import inception, models


def reference_images(cfg: ml_collections.ConfigDict, n: int | None = None) -> np.ndarray:
  """`n` full-size training images (uint8; default: every example once, in one epoch's order),
  drawn by the input pipeline with its preprocessing."""
  from patchdiff import data  # pylint: disable=import-outside-toplevel  (TensorFlow)
  r = cfg.model.img_resolution
  schedule = patches.PatchSchedule(sizes=(r,), probs=(1.0,), resolution=r, seed=cfg.seed)
  label_dim = models.resolve(cfg.model)["label_dim"]
  if n is None:
    n = data.build_input(cfg.data, schedule, 1, 1, seed=cfg.seed + 1,
                         label_dim=label_dim).num_examples
  batch = min(n, 256)
  batches = data.build_input(cfg.data, schedule, batch, -(-n // batch), seed=cfg.seed + 1,
                             label_dim=label_dim)
  out = [images_io.to_uint8(next(batches)["image"]) for _ in range(-(-n // batch))]
  return np.concatenate(out)[:n]


def training_set_statistics(cfg: ml_collections.ConfigDict, model) -> tuple[np.ndarray, np.ndarray]:
  """Inception mean and covariance of every training image once (no flips): EDM's reference."""
  cfg = cfg.copy_and_resolve_references()
  cfg.data.hflip = False
  return metrics.feature_statistics(inception.features(model, reference_images(cfg)))


# The data settings that decide which images the training set's statistics come from.
_DATA_KEYS = ("source", "path", "resolution", "limit", "twemoji_category", "twemoji_subset_seed",
              "tfds_name", "tfds_split", "tfds_data_dir", "tfds_image_key")


def data_signature(cfg: ml_collections.ConfigDict) -> str:
  """The training images `cfg` selects, as a text kept next to statistics made from them."""
  return json.dumps({k: cfg.data.get(k) for k in _DATA_KEYS}, sort_keys=True)


def reference_statistics(cfg: ml_collections.ConfigDict, model,
                         path: str) -> tuple[np.ndarray, np.ndarray]:
  """The training set's statistics, kept in `path` (a workdir's own file): read from there when
  the file was made from the data `cfg` selects, else (no file, or other data) made and written
  there."""
  r = cfg.model.img_resolution
  signature = data_signature(cfg)
  if os.path.isfile(path):
    made_from = metrics.statistics_source(path)
    if made_from in (None, signature):  # None: written before files recorded their data
      return metrics.load_statistics(path, feature_dim=2048, resolution=r)
    logging.warning("%s was made from other data (%s, now %s): making it again", path, made_from,
                    signature)
  t0 = time.perf_counter()
  mu, sigma = training_set_statistics(cfg, model)
  metrics.save_statistics(path, mu, sigma, resolution=r, source=signature)
  logging.info("wrote the Inception statistics of every training image to %s (%.0f s)", path,
               time.perf_counter() - t0)
  return mu, sigma


class NoInceptionWeights(FileNotFoundError):
  pass


def load_inception(path: str | None):
  """The FID Inception network of `path`, else of the installed default weights; an error that
  says how to get them when there are none."""
  path = path or inception.default_weights_path()
  if path is None:
    raise NoInceptionWeights(
        "FID needs Inception weights: none were given and none are installed; install NVIDIA's "
        f"(the network of EDM's FID, read without torch) with `{inception.DEFAULT_INSTALL}`, "
        "or give a weight file")
  return inception.load_weights(path)


class QualityMonitor:
  """FID of `train.fid_samples` EMA samples against the training set's Inception statistics
  (`train.fid_ref`, else computed once and kept as WORKDIR/fid_ref.npz), and the multi-scale
  SWD against as many training images.

  The network is loaded when the monitor is made, so missing or damaged weights stop a run
  before anything is compiled; the statistics are computed at the first measurement.
  """

  def __init__(self, cfg: ml_collections.ConfigDict, workdir: str):
    t = cfg.train
    self.cfg, self.workdir = cfg, workdir
    self.num = int(t.fid_samples)
    self.model = load_inception(t.inception)
    self.ref_path = t.fid_ref or os.path.join(workdir, "fid_ref.npz")
    if t.fid_ref and not os.path.isfile(t.fid_ref):
      raise FileNotFoundError(f"train.fid_ref={t.fid_ref!r} does not exist")
    self._ref = None
    self._images = None

  def _reference(self):
    if self._ref is None:
      if self.cfg.train.fid_ref:  # given: taken as it is, whatever data it was made from
        self._ref = metrics.load_statistics(self.ref_path, feature_dim=2048,
                                            resolution=self.cfg.model.img_resolution)
      else:
        self._ref = reference_statistics(self.cfg, self.model, self.ref_path)
      self._images = reference_images(self.cfg, self.num)
    return self._ref

  def measure(self, images: np.ndarray) -> dict[str, float]:
    """FID (and SWD per pyramid level) of uint8 samples (N, R, R, 3)."""
    mu, sigma = self._reference()
    feats = inception.features(self.model, images)
    out = dict(fid=metrics.frechet_distance(*metrics.feature_statistics(feats), mu, sigma))
    n = min(len(images), len(self._images))
    out.update(metrics.sliced_wasserstein(images[:n], self._images[:n],
                                          min_resolution=min(16, images.shape[1])))
    return out


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


def load_image(path: str, size: int, channels: int) -> np.ndarray:
  """An image file as (size, size, channels) in [-1, 1], preprocessed exactly as training data
  (RGBA on white, centre crop, Lanczos resize)."""
  from patchdiff import data  # pylint: disable=import-outside-toplevel  (TensorFlow)
  if channels not in (1, 3):
    raise UsageError(f"a {channels}-channel model cannot take an image file ({path})")
  try:
    x = data.load_image(path, size)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"cannot read image {path}: {e}") from None
  return x[..., :channels].astype(np.float32) / 127.5 - 1


def default_seeds(cfg: ml_collections.ConfigDict) -> list[int]:
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
    known = generate.Known.centred(load_image(outpaint, r, c), canvas or r)
  elif inpaint:
    size = canvas or r
    known = generate.Known(load_image(inpaint, size, c),
                           (load_image(mask, size, 1) > 0).astype(np.float32))
  if canvas is not None:
    generate.canvas_grid(1, canvas, r)  # validates
  mesh = sharding.data_mesh()
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  if denoiser is None:
    denoiser, step = checkpoint.load_ema(workdir, cfg, step, replicated)
  else:  # placed as a restored checkpoint is, so both sample the same program bit for bit
    graphdef, state = nnx.split(denoiser)
    denoiser = nnx.merge(graphdef, jax.device_put(state, replicated))
  sampler = generate.Sampler(denoiser, m, cfg.sample, mesh=mesh, decoder=decoder)
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
      extra["arr_1"] = generate.seed_classes(seeds, m["label_dim"], class_idx)
    npz.close(**extra, seeds=np.asarray(seeds, np.int64))
  if writer and cfg.sample.grid_size:
    images_io.save_grid(kept[:cfg.sample.grid_size], os.path.join(outdir, "grid.png"))
  logging.info("wrote %d samples to %s (%.2f images/s)", len(seeds), outdir, len(seeds) / dt)
  return outdir, kept


def fid_reference(cfg: ml_collections.ConfigDict, inception_path: str | None, out: str) -> str:
  """Inception mean and covariance over every training image (no flips), as EDM's ref files."""
  if not out:
    raise UsageError("--mode=fid_ref needs --ref, the statistics file to write")
  if cfg.patch.latent:
    raise UsageError("a latent config's data are latents: take the statistics of the image "
                     "dataset with a pixel config reading it (e.g. --config.data.path=the "
                     "zip), or use a published reference file with 'mu' and 'sigma'")
  mu, sigma = training_set_statistics(cfg, load_inception(inception_path))
  metrics.save_statistics(out, mu, sigma, resolution=cfg.model.img_resolution,
                          source=data_signature(cfg))
  logging.info("wrote the Inception statistics of every training image to %s", out)
  return out


def evaluate(cfg: ml_collections.ConfigDict, workdir: str, step: int | None = None,
             seeds: list[int] | None = None, batch: int | None = None,
             inception_path: str | None = None, ref: str | None = None,
             fid_sets: int = 1, denoiser=None, outdir: str | None = None,
             fid_ref_path: str | None = None) -> dict:
  """Samples `seeds` from a checkpoint (or `denoiser`, a network read from a file, into `outdir`)
  and reports their multi-scale SWD to the training data, FID (minimum over `fid_sets` seed
  sets) and KID. FID is against the statistics `ref`, by default those of every training image
  (made once, kept as WORKDIR/fid_ref.npz); the Inception weights are `inception_path`, by
  default the installed ones; without weights, SWD only. A config without training data
  (`data.source='none'`, derived from a network file) is measured by FID against `ref` only.
  `fid_ref_path` moves the kept statistics of the training images elsewhere than the workdir
  (a reconstructed post-hoc EMA shares its run's). Writes eval.json next to the samples."""
  if fid_sets < 1:
    raise UsageError(f"--fid_sets={fid_sets} must be >= 1")
  latent = bool(cfg.patch.latent)
  no_data = cfg.data.source == "none"
  if latent and ref is None:
    raise UsageError("a latent model's training data are latents, not images: evaluate it "
                     "by FID against --ref statistics of the image dataset (with --inception)")
  if no_data and ref is None:
    raise UsageError("this model's config names no training data (data.source='none': it was "
                     "derived from a network file): evaluate it by FID against --ref, reference "
                     "statistics such as EDM's fid-refs .npz files")
  model = None
  if inception_path or ref or inception.default_weights_path():
    model = load_inception(inception_path)
  else:
    logging.warning("no FID: no Inception weights are installed (%s)", inception.DEFAULT_INSTALL)
  ref_stats = None
  if ref:
    ref_stats = metrics.load_statistics(ref, feature_dim=2048, resolution=None if latent else
                                        cfg.model.img_resolution)
  base = default_seeds(cfg) if seeds is None else list(seeds)
  span = max(base) - min(base) + 1
  outdir, images = sample_from_checkpoint(cfg, workdir, step, seeds=base, batch=batch, fmt="npz",
                                          keep_all=True, denoiser=denoiser, outdir=outdir)
  result = dict(num_images=len(images))
  if not latent and not no_data:  # SWD and KID compare with training images
    reference = reference_images(cfg, len(images))
    result.update(metrics.sliced_wasserstein(images, reference,
                                             min_resolution=min(16, images.shape[1])))
  if model is not None:
    if ref_stats is None:
      ref_stats = reference_statistics(cfg, model,
                                       fid_ref_path or os.path.join(workdir, "fid_ref.npz"))
    ref_feats = None if latent or no_data else inception.features(model, reference)
    fids, kids = [], []
    for k in range(fid_sets):
      if k:
        _, images = sample_from_checkpoint(cfg, workdir, step, seeds=[s + k * span for s in base],
                                           batch=batch, fmt="npz", keep_all=True,
                                           outdir=os.path.join(outdir, f"set_{k}"),
                                           denoiser=denoiser)
      feats = inception.features(model, images)
      fids.append(metrics.frechet_distance(*metrics.feature_statistics(feats), *ref_stats))
      if ref_feats is not None:
        kids.append(metrics.kernel_inception_distance(feats, ref_feats))
    result.update(fid=min(fids), fid_sets=fids)
    if kids:
      result["kid"] = kids[int(np.argmin(fids))]
  with open(os.path.join(outdir, "eval.json"), "w", encoding="utf-8") as f:
    json.dump(result, f, indent=2)
  logging.info("eval of %s: %s", outdir, result)
  return result
