"""Training data: `build_input` picks the source named by the data config and returns the
iterator of patch batches the trainer consumes.

Sources (`data.source`; the keys and defaults are `config_lib.DATA_DEFAULTS`):
  twemoji    the embedded Twemoji set (`twemoji.py`: PIL, decoded once and cached as .npz).
  folder, zip, tfds  encoded images (`sources.py`, `zip_index.py`; `decode.py`, `uncached.py`),
             decoded once (data.cache=True) or every step.
  latents    precomputed latents, .npy or .npz or a folder of shards from `encode_latents`
             (`latents.py` reads them, `latent_shards.py` writes them), float, used as stored.
  synthetic  `limit` (default 256) random arrays N(0, 0.5^2) of `channels` channels (and random
             labels), a pure function of the seed: for smoke runs and benchmarks, never for science.
  none       no data: the config of a network read from a file, which samples but cannot train.
Every source feeds the one patch pipeline (`pipeline.py`): order, crops, coordinates and the
multi-host split are a pure function of (seed, step). TensorFlow is imported only when an input
is built, by the modules here.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from patchdiff import config_lib
from patchdiff.data import decode, latents, pipeline, sources, twemoji, uncached
from patchdiff.data.decode import load_image  # noqa: F401  (re-exported)
from patchdiff.patches import PatchSchedule

SYNTHETIC_EXAMPLES = 256


class InputIterator:
  """Iterator of numpy batch dicts (the element format of `pipeline.make_patch_dataset`).

  Attributes: dataset (the tf.data.Dataset), num_examples (usable examples), names (their
  paths, in the order the batches' `index` refers to; None for twemoji/latents), num_skipped,
  skipped ({name: reason}), class_names (or None), channels, source, cache.
  """

  def __init__(self, dataset, num_examples: int, channels: int, source: str, cache: bool,
               skipped: dict[str, str] | None = None, class_names: list[str] | None = None,
               names: list[str] | None = None):
    self.dataset, self.names, self.source, self.cache = dataset, names, source, cache
    self.num_examples, self.channels = int(num_examples), int(channels)
    self.skipped = dict(skipped or {})
    self.class_names = class_names
    self._it = None

  @property
  def num_skipped(self) -> int:
    return len(self.skipped)

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._it is None:
      self._it = self.dataset.as_numpy_iterator()
    return next(self._it)


def _check_label_range(labels: np.ndarray, label_dim: int, where: str, names=None) -> None:
  """Every label in [0, label_dim); the first that is not is named by `names[m]`, or as
  `where[m]` without names."""
  bad = np.flatnonzero((labels < 0) | (labels >= label_dim))
  if bad.size:
    m = int(bad[0])
    name = names[m] if names is not None else f"{where}[{m}]"
    raise ValueError(f"{where}: label {int(labels[m])} of {name} is out of range for "
                     f"label_dim={label_dim} ({bad.size} labels out of range in all)")


def build_input(data_cfg,
                schedule: PatchSchedule,
                batch_size: int,
                total_steps: int,
                start_step: int = 0,
                seed: int = 0,
                process_index: int = 0,
                process_count: int = 1,
                label_dim: int = 0,
                channels: int | None = None) -> InputIterator:
  """The trainer's input: an iterator of numpy batch dicts for steps [start_step, total_steps).

  `data_cfg` (a ConfigDict like `cfg.data`, or a dict) holds keys of `config_lib.DATA_DEFAULTS`
  (missing ones take their defaults). Everything that can be checked is checked here, before the
  first batch: the config, the files, labels against `label_dim`, the host split (every bucket's
  global batch divisible by `process_count`), and every image is decoded once (corrupt ones
  skipped or fatal). Host `process_index` of `process_count` gets its contiguous 1/process_count
  slice of each global batch. Elements: see `pipeline.make_patch_dataset`.
  `channels`: the model's input channels; a source with another count is an error (None: any;
  the synthetic source makes this many, default 3).
  """
  cfg = config_lib.data_config(data_cfg, label_dim)
  res, src, label_dim = cfg["resolution"], cfg["source"], int(label_dim)
  if schedule.resolution != res:
    raise ValueError(f"data.resolution={res} differs from the patch schedule's resolution "
                     f"{schedule.resolution}")
  pipeline.check_process_split(schedule, batch_size, process_index, process_count)
  common = dict(start_step=start_step, seed=seed, label_dim=label_dim, hflip=cfg["hflip"],
                process_index=process_index, process_count=process_count)

  def check_channels(got: int, what: str) -> None:
    if channels is not None and got != channels:
      raise ValueError(f"{what} has {got} channels, but the model takes {channels} "
                       "(model.img_channels)")

  if src == "none":
    raise ValueError("data.source='none': the config names no training data (it was derived "
                     "from a network file); set data.source and data.path to read a dataset")
  if src == "twemoji":
    check_channels(3, "the Twemoji set")
    pixels = twemoji.load_twemoji(res, limit=cfg["limit"], cache_dir=cfg["cache_dir"],
                                  category=cfg["twemoji_category"],
                                  subset_seed=cfg["twemoji_subset_seed"])
    ds = pipeline.make_patch_dataset(pixels, schedule, batch_size, total_steps, **common)
    return InputIterator(ds, len(pixels), 3, src, True)

  if src == "synthetic":
    c = 3 if channels is None else int(channels)
    n = cfg["limit"] or SYNTHETIC_EXAMPLES
    rng = np.random.default_rng([int(seed), 0x53594E])
    pixels = (0.5 * rng.standard_normal((n, res, res, c))).astype(np.float32)
    labels = rng.integers(0, label_dim, n) if cfg["labels"] else None
    ds = pipeline.make_patch_dataset(pixels, schedule, batch_size, total_steps, labels=labels,
                                     **common)
    return InputIterator(ds, n, c, src, True)

  if src == "latents":
    if not cfg["path"]:
      raise ValueError("data.source='latents' needs data.path")
    path = Path(cfg["path"]).expanduser()
    if not path.is_file() and not path.is_dir():
      raise ValueError(f"data.path {path} is not a file (data.source='latents': a .npy/.npz "
                       "file or a folder of shards)")
    lat = latents.load_latents(path, res, cfg["latent_layout"], cfg["labels"], cfg["cache"],
                               cfg["limit"], scale=cfg["latent_scale"])
    check_channels(lat.channels, f"latent file {lat.path}")
    if lat.labels is not None:
      _check_label_range(lat.labels, label_dim, lat.path)
    ds = pipeline.build_patch_pipeline(latents.latent_fetch(lat, res, int(seed)),
                                       len(lat.mean), res, False, schedule, batch_size,
                                       total_steps, labels=lat.labels, **common)
    return InputIterator(ds, len(lat.mean), lat.channels, src, cfg["cache"])

  enc = sources.scan(cfg)
  check_channels(3, f"data.source={src!r} (RGB images)")
  if enc.labels is not None:
    _check_label_range(enc.labels, label_dim, enc.origin, enc.names)
  pixels, kept, bad = decode.decode_all(enc, res, cfg["skip_corrupt"], keep_pixels=cfg["cache"])
  labels = enc.labels[kept] if enc.labels is not None else None
  if cfg["cache"]:
    ds = pipeline.make_patch_dataset(pixels, schedule, batch_size, total_steps, labels=labels,
                                     **common)
  else:
    fetch = uncached.encoded_fetch([enc.data[i] for i in kept], res)
    ds = pipeline.build_patch_pipeline(fetch, len(kept), res, True, schedule, batch_size,
                                       total_steps, labels=labels, **common)
  return InputIterator(ds, len(kept), 3, src, cfg["cache"],
                       {enc.names[i]: why for i, why in bad.items()}, enc.class_names,
                       [enc.names[i] for i in kept])
