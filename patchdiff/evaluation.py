"""Sample quality against the training data: reference images, FID statistics of the training set,
and the FID + SWD measurement that training runs at intervals.
"""
from __future__ import annotations

import json
import os
import time

import ml_collections
import numpy as np
from absl import logging

from patchdiff import images_io, metrics, patches
from patchdiff.nn import models


def reference_images(cfg: ml_collections.ConfigDict, n: int | None = None) -> np.ndarray:
  """`n` full-size training images (uint8; default: every example once, in one epoch's order),
  drawn by the input pipeline with its preprocessing."""
  from patchdiff import data  # pylint: disable=import-outside-toplevel
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
  from patchdiff.nn import inception  # pylint: disable=import-outside-toplevel
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
  from patchdiff.nn import inception  # pylint: disable=import-outside-toplevel
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
    from patchdiff.nn import inception  # pylint: disable=import-outside-toplevel
    mu, sigma = self._reference()
    feats = inception.features(self.model, images)
    out = dict(fid=metrics.frechet_distance(*metrics.feature_statistics(feats), mu, sigma))
    n = min(len(images), len(self._images))
    out.update(metrics.sliced_wasserstein(images[:n], self._images[:n],
                                          min_resolution=min(16, images.shape[1])))
    return out
