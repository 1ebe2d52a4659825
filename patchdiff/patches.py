"""Patch geometry of Patch Diffusion: coordinate channels, patch-size schedules, counter hashes.

Everything here is a pure function of its arguments, so every host and every resumed run agrees.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import numpy as np

SCHEDULES = ("stochastic", "progressive")


def coord_grid(offset_i, offset_j, size: int, resolution: int, xp=np):
  """Coordinate channels of square crops, shape (B, size, size, 2), channel order [x, y].

  x is the column (width) index and y the row index of each pixel in the full image, mapped by
  (v / (R - 1) - 0.5) * 2 so that the full image spans exactly [-1, 1]. Offsets are the crops'
  top row (i) and left column (j); they may lie outside [0, R - size] for extrapolated canvases.
  `xp` is numpy or jax.numpy. The tf.data pipeline crops the full image's grid of this function
  exactly, the sampler and the extrapolation canvas call it with their offsets.
  """
  r = xp.arange(size, dtype=xp.float32)
  rows = xp.asarray(offset_i, dtype=xp.float32)[:, None] + r[None, :]  # (B, size)
  cols = xp.asarray(offset_j, dtype=xp.float32)[:, None] + r[None, :]
  scale = 1.0 / (resolution - 1)
  y = (rows * scale - 0.5) * 2.0
  x = (cols * scale - 0.5) * 2.0
  return xp.stack(xp.broadcast_arrays(x[:, None, :], y[:, :, None]), axis=-1)


def batch_mul(size: int, resolution: int) -> int:
  """How many times more samples a step of patch `size` draws than a full-image step.

  The official code reads this from the table {512:1, 256:2, 128:4, 64:16, 32:32, 16:64}; for
  the configurations it was used with (R=64 pixels, R=32 latents) the table equals R // size:
  R=64 -> 16 px: 4, 32 px: 2, 64 px: 1; latent R=32 -> 16: 2, 32: 1. We use that rule for every R
  (patch sizes are R/4, R/2, R, so the multiplier is 4, 2, 1 at any resolution). The samples of a
  step then hold (size/R) times the pixels of a full step: patch steps stay cheaper per step.
  """
  if resolution % size:
    raise ValueError(f"patch size {size} does not divide resolution {resolution}")
  return resolution // size


@dataclasses.dataclass(frozen=True)
class PatchSchedule:
  """Which patch size each training step uses, and how many images each step counts.

  sizes/probs: the buckets and their probabilities. kind 'stochastic' draws step t's bucket
  from (seed, t); 'progressive' walks the buckets in order as the official training loop does.
  Either way `size_at(t)` is a pure function: hosts and restarts agree.

  Images are counted as the official loop counts them (`cur_nimg`), in whole images:
  `start_nimg` before step 0 (the official resume_kimg * 1000), then each step adds
  `step_images(size)` = int(batch_size * batch_mul_avg), where batch_mul_avg is the schedule's
  mean batch_mul (stochastic; 486 images for a p = 0.5 step at batch 256, not 486.4) or the
  bucket's own batch_mul (progressive). Progressive steps take bucket k while
  (nimg // 1000) / total_kimg <= probs[0] + ... + probs[k] (the last bucket without bound), nimg
  the count before the step; `total_kimg` defaults to the images of `total_steps` steps split
  over the buckets by their probabilities.
  """
  sizes: tuple[int, ...]
  probs: tuple[float, ...]
  resolution: int
  seed: int = 0
  kind: str = "stochastic"
  total_steps: int | None = None
  batch_size: int = 1
  start_nimg: int = 0
  total_kimg: float | None = None

  def __post_init__(self):
    if self.kind not in SCHEDULES:
      raise ValueError(f"patch schedule kind {self.kind!r} is not one of {SCHEDULES}")
    if len(self.sizes) != len(self.probs) or not self.sizes:
      raise ValueError(f"patch sizes {self.sizes} and probabilities {self.probs} differ in length")
    if any(p < 0 for p in self.probs) or abs(sum(self.probs) - 1.0) > 1e-6:
      raise ValueError(f"patch probabilities {self.probs} must be >= 0 and sum to 1")
    for s in self.sizes:
      batch_mul(s, self.resolution)
    if not isinstance(self.batch_size, (int, np.integer)) or self.batch_size < 1:
      raise ValueError(f"batch size {self.batch_size!r} must be a positive integer")
    if not isinstance(self.start_nimg, (int, np.integer)) or self.start_nimg < 0:
      raise ValueError(f"images counted before step 0 ({self.start_nimg!r}) must be an "
                       "integer >= 0")
    if self.kind == "progressive":
      if not self.total_steps and not (self.total_kimg and self.total_kimg > 0):
        raise ValueError("a progressive patch schedule needs total_steps or total_kimg")
      if list(self.sizes) != sorted(self.sizes):
        raise ValueError(f"a progressive schedule walks the sizes in increasing order, got "
                         f"{self.sizes}")

  @property
  def active_sizes(self) -> tuple[int, ...]:
    """The buckets that can occur (probability > 0), smallest first."""
    return tuple(sorted(s for s, p in zip(self.sizes, self.probs) if p > 0))

  @property
  def mean_batch_mul(self) -> float:
    """The official loop's batch_mul_avg: sum of probs[k] * batch_mul[k] in float64, in the
    buckets' order."""
    return float(np.sum(np.asarray(self.probs, np.float64) * np.asarray(
        [batch_mul(s, self.resolution) for s in self.sizes], np.float64)))

  def ema_images(self, size: int) -> float:
    """batch_size * batch_mul_avg of a step of `size` px, not truncated: the images in the
    exponent of the official loop's EMA decay."""
    if self.kind == "stochastic":
      return float(self.batch_size * self.mean_batch_mul)
    return float(self.batch_size * batch_mul(size, self.resolution))

  def step_images(self, size: int) -> int:
    """The images a step of `size` px adds to the count: int(batch_size * batch_mul_avg)."""
    return int(self.ema_images(size))

  @functools.cached_property
  def _progressive_total_kimg(self) -> float:
    if self.total_kimg:
      return float(self.total_kimg)
    active = [(p, batch_mul(s, self.resolution)) for s, p in zip(self.sizes, self.probs) if p > 0]
    return self.total_steps * self.batch_size / sum(p / m for p, m in active) / 1000.0

  def _bucket(self, nimg: int) -> int:
    """Progressive: the index of the bucket a step takes after `nimg` images (official rule)."""
    edges = np.cumsum(np.asarray(self.probs, np.float64))
    edges[-1] = 10.0
    return int(np.flatnonzero((nimg // 1000) / self._progressive_total_kimg <= edges)[0])

  @functools.cached_property
  def _segments(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Progressive: per segment (size, images per step, first step, count before that step).

    Bucket k holds while nimg // 1000 <= q - 1, q the least integer with q / total_kimg above
    probs[0] + ... + probs[k] (found with the official loop's own float comparison), so its
    segment ends at the first step whose count reaches 1000 q.
    """
    total = self._progressive_total_kimg
    edges = np.cumsum(np.asarray(self.probs, np.float64))
    sizes, per, starts, counts = [], [], [], []
    nimg, step = int(self.start_nimg), 0
    while True:
      k = self._bucket(nimg)
      c = self.step_images(self.sizes[k])
      sizes.append(self.sizes[k]), per.append(c), starts.append(step), counts.append(nimg)
      if k == len(self.sizes) - 1:
        break
      q = int(np.floor(edges[k] * total))
      while q / total <= edges[k]:
        q += 1
      while q > 0 and (q - 1) / total > edges[k]:
        q -= 1
      taken = max(-(-(1000 * q - nimg) // c), 1)
      step, nimg = step + taken, nimg + taken * c
    return (np.asarray(sizes, np.int64), np.asarray(per, np.int64), np.asarray(starts, np.int64),
            np.asarray(counts, np.int64))

  def _segment_of(self, steps: np.ndarray) -> np.ndarray:
    starts = self._segments[2]
    return np.searchsorted(starts, steps, side="right") - 1

  def sizes_at(self, steps) -> np.ndarray:
    """Patch sizes for an array of step indices (vectorised)."""
    steps = np.asarray(steps, dtype=np.int64)
    if self.kind == "progressive":
      return self._segments[0][self._segment_of(steps)].astype(np.int64)
    u = uniform_from_counter(self.seed, steps)
    edges = np.cumsum(np.asarray(self.probs, dtype=np.float64))
    edges[-1] = np.inf  # rounding of the probabilities' sum never runs past the last bucket
    idx = np.searchsorted(edges, u, side="right")
    # A bucket with probability 0 has an empty interval, so searchsorted never lands in it.
    return np.asarray(self.sizes, dtype=np.int64)[idx]

  def size_at(self, step: int) -> int:
    return int(self.sizes_at(np.asarray([step]))[0])

  def nimg_before(self, steps) -> np.ndarray:
    """The images counted before each of `steps` (int64, exact; vectorised)."""
    steps = np.asarray(steps, dtype=np.int64)
    if self.kind == "stochastic":
      return self.start_nimg + steps * np.int64(self.step_images(self.sizes[0]))
    _, per, starts, counts = self._segments
    k = self._segment_of(steps)
    return counts[k] + (steps - starts[k]) * per[k]

  def steps_for(self, total_nimg: int) -> int:
    """The number of steps after which at least `total_nimg` images are counted: the official
    loop's length, which stops once cur_nimg >= total_kimg * 1000."""
    if total_nimg <= self.start_nimg:
      return 0
    if self.kind == "stochastic":
      return -(-(int(total_nimg) - self.start_nimg) // self.step_images(self.sizes[0]))
    _, per, starts, counts = self._segments
    k = int(np.searchsorted(counts, total_nimg, side="left")) - 1  # last segment below it
    return int(starts[k] + -(-(int(total_nimg) - counts[k]) // per[k]))


def mix64(z: np.ndarray) -> np.ndarray:
  """SplitMix64 finaliser: a bijective, well-mixing map of uint64."""
  z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return z ^ (z >> np.uint64(31))


def uniform_from_counter(seed: int, counters) -> np.ndarray:
  """Uniform floats in [0, 1) as a pure function of (seed, counter), same on every platform."""
  c = np.asarray(counters, dtype=np.int64).astype(np.uint64)
  with np.errstate(over="ignore"):
    key = mix64(np.uint64(seed & 0xFFFFFFFFFFFFFFFF) + np.uint64(0x9E3779B97F4A7C15))
    z = mix64(key ^ (c * np.uint64(0x9E3779B97F4A7C15) + np.uint64(0x632BE59BD9B4E019)))
  return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def default_patch_sizes(resolution: int, latent: bool = False) -> tuple[int, ...]:
  """[R/4, R/2, R] for pixel models, [R/2, R] (16, 32 at R=32) for latent models."""
  if latent:
    if resolution % 2:
      raise ValueError(f"latent resolution {resolution} is not divisible by 2")
    return (resolution // 2, resolution)
  if resolution % 4:
    raise ValueError(f"resolution {resolution} is not divisible by 4 (patch sizes are R/4, R/2, R)")
  return (resolution // 4, resolution // 2, resolution)


def default_patch_probs(real_p: float, num_sizes: int) -> tuple[float, ...]:
  """[(1-p)*2/5, (1-p)*3/5, p] for three buckets, [1-p, p] for two."""
  if not 0.0 <= real_p <= 1.0:
    raise ValueError(f"real_p={real_p} must lie in [0, 1]")
  if num_sizes == 3:
    return ((1 - real_p) * 2 / 5, (1 - real_p) * 3 / 5, real_p)
  if num_sizes == 2:
    return (1 - real_p, real_p)
  raise ValueError(f"no default probabilities for {num_sizes} patch sizes")


def check_patch_sizes(sizes: Sequence[int], num_levels: int, resolution: int) -> None:
  """Every patch size must survive the UNet's num_levels - 1 halvings exactly."""
  factor = 1 << (num_levels - 1)
  for s in sizes:
    if s <= 0 or s > resolution:
      raise ValueError(f"patch size {s} is outside (0, img_resolution={resolution}]")
    if s % factor:
      raise ValueError(
          f"patch size {s} is not divisible by {factor}, which the UNet's {num_levels} levels "
          f"(len(channel_mult)) need: {s} px would not survive {num_levels - 1} downsamplings")
