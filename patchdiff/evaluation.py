"""Measuring samples against the training data: the workflows of `--mode=eval` (FID, KID and
SWD of a checkpoint's samples) and `--mode=fid_ref`, and the grids, FID and SWD that training
logs (`QualityMonitor`). Sampling a checkpoint is `patchdiff.generate`'s.

Nothing here builds an optimizer or a training state: weights come from `checkpoint.load_ema`.
"""
from __future__ import annotations

import json
import os
import time
from typing import Callable

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from patchdiff import generate, images_io, metrics, patches
from patchdiff.nn import inception, models

# Sampling from a checkpoint lives in `patchdiff.generate`; its names stay importable from here.
UsageError = generate.UsageError
sample_from_checkpoint = generate.sample_from_checkpoint


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
  """What the trainer measures of the EMA as it trains, at the steps due, with one process only
  (sampling needs every host's devices; sharded multi-host sampling is still to come):

  - a grid of `sample.grid_size` samples every `train.sample_every` steps and at the last, saved
    as WORKDIR/samples_STEP.png and written as the `ema_samples` image, with its SWD to as many
    full-size training images of the loop's batches (`grid_swd_*`; pixel models);
  - with `train.fid_every`, every that many steps and at the last: the FID of
    `train.fid_samples` samples against the training set's Inception statistics
    (`train.fid_ref`, else computed once and kept as WORKDIR/fid_ref.npz), and their multi-scale
    SWD against as many training images.

  One sampling serves both when both are due. The Inception network is loaded when the monitor
  is made, so missing or damaged weights stop a run before anything is compiled; the statistics
  are computed at the first measurement. `load_decoder` loads a latent model's VAE decoder,
  which shows its samples.
  """

  def __init__(self, cfg: ml_collections.ConfigDict, workdir: str, writer, graphdef,
               model_cfg: dict, mesh: jax.sharding.Mesh):
    t = cfg.train
    self.cfg, self.workdir, self.writer = cfg, workdir, writer
    self.graphdef, self.model_cfg, self.mesh = graphdef, model_cfg, mesh
    self.single = jax.process_count() == 1
    self.model = None  # the Inception network, when FID is measured
    if t.fid_every and not self.single:
      logging.warning("train.fid_every: FID during training runs with one process only; use "
                      "--mode=eval on the checkpoints")
    elif t.fid_every:
      self.num = int(t.fid_samples)
      self.model = load_inception(t.inception)
      self.ref_path = t.fid_ref or os.path.join(workdir, "fid_ref.npz")
      if t.fid_ref and not os.path.isfile(t.fid_ref):
        raise FileNotFoundError(f"train.fid_ref={t.fid_ref!r} does not exist")
    self._ref = None
    self._images = None
    self.decoder, self.show_samples, self.want_grid_reference = None, False, False
    self.grid_reference: list[np.ndarray] = []  # full-size training images, for the grid's SWD

  def load_decoder(self) -> None:
    """Loads the VAE decoder of a latent model with `vae.path` (a pixel model needs none); a
    latent model without one shows no grids."""
    pixels = generate.pixel_model(self.cfg)
    self.want_grid_reference = self.single and self.cfg.sample.grid_size >= 2 and pixels
    self.decoder = generate.latent_decoder(self.cfg)  # None for a pixel model
    self.show_samples = pixels or self.decoder is not None
    if not self.show_samples:
      logging.info("no sample grids: a latent model needs vae.path to decode its samples")

  def observe(self, batch: dict[str, np.ndarray]) -> None:
    """Keeps the full-size images of a training batch until the grid's SWD has as many."""
    if (self.want_grid_reference and batch["image"].shape[1] == self.model_cfg["img_resolution"]
        and sum(len(r) for r in self.grid_reference) < self.cfg.sample.grid_size):
      self.grid_reference.append(images_io.to_uint8(batch["image"]))  # uint8, unless synthetic

  def after_step(self, done: int, state: dict, clock: Callable[[], float]) -> float:
    """Samples the EMA of `state` (the training state after step `done`) and writes the grid
    and the FID due at that step, if any; returns the seconds it took (0 when nothing was due).
    `clock()` is the training time so far, written next to the FID once the steps dispatched
    so far have run."""
    cfg, tcfg = self.cfg, self.cfg.train
    last = done == tcfg.steps
    want_grid = self.single and cfg.sample.grid_size and self.show_samples and (
        (tcfg.sample_every and done % tcfg.sample_every == 0) or last)
    want_fid = self.model is not None and (done % tcfg.fid_every == 0 or last)
    if not (want_grid or want_fid):
      return 0.0
    jax.block_until_ready(state)  # the steps dispatched so far count as training time
    seconds, t_pause = clock(), time.perf_counter()
    sampler = generate.Sampler(nnx.merge(self.graphdef, state["ema"], state["buffers"]),
                               self.model_cfg, cfg.sample, mesh=self.mesh, decoder=self.decoder)
    num = max(cfg.sample.grid_size if want_grid else 0, self.num if want_fid else 0)
    images = images_io.to_uint8(sampler.sample(list(range(cfg.sample.seed,
                                                          cfg.sample.seed + num))))
    if want_fid:
      scores = self.measure(images)
      self.writer.write_scalars(done, dict(scores, train_seconds=seconds))
      logging.info("step %d: FID %.2f of %d EMA samples against the training set; SWD %s",
                   done, scores["fid"], len(images), ", ".join(
                       f"{k} {v:.1f}" for k, v in scores.items() if k.startswith("swd")))
    if want_grid:
      grid = images[:cfg.sample.grid_size]
      images_io.save_grid(grid, os.path.join(self.workdir, f"samples_{done:08d}.png"))
      self.writer.write_images(done, {"ema_samples": images_io.make_grid(grid)[None]})
      if self.grid_reference:
        self._log_grid_swd(done, grid, np.concatenate(self.grid_reference))
    return time.perf_counter() - t_pause

  def _log_grid_swd(self, step: int, samples: np.ndarray, reference: np.ndarray) -> None:
    """Sliced Wasserstein distance of the EMA grid to as many training images: a rough, offline
    quality signal (small sets are noisy; `--mode=eval` measures on thousands)."""
    n = min(len(samples), len(reference))
    try:
      swd = metrics.sliced_wasserstein(samples[:n], reference[:n],
                                       min_resolution=min(16, samples.shape[1]))
    except ValueError as e:
      logging.warning("no SWD for the sample grid: %s", e)
      return
    self.writer.write_scalars(step, {f"grid_{k}": v for k, v in swd.items()})
    logging.info("SWD of %d EMA samples to %d training images: %s", n, n,
                 ", ".join(f"{k} {v:.1f}" for k, v in swd.items()))

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
  base = generate.default_seeds(cfg) if seeds is None else list(seeds)
  span = max(base) - min(base) + 1
  outdir, images = generate.sample_from_checkpoint(cfg, workdir, step, seeds=base, batch=batch,
                                                   fmt="npz", keep_all=True, denoiser=denoiser,
                                                   outdir=outdir)
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
        _, images = generate.sample_from_checkpoint(
            cfg, workdir, step, seeds=[s + k * span for s in base], batch=batch, fmt="npz",
            keep_all=True, outdir=os.path.join(outdir, f"set_{k}"), denoiser=denoiser)
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
