"""Numpy references of the patch pipeline's per-sample draws, for the tests to hold it against."""
import numpy as np

from patchdiff.data import latents, pipeline
from patchdiff.patches import uniform_from_counter


def reference_offsets(seed: int, counters, size: int, resolution: int):
  """The crop offsets (i, j) of samples `counters`."""
  hi = resolution - size + 1
  c = np.asarray(counters, dtype=np.int64)
  draw = lambda stream: uniform_from_counter(pipeline.stream_seed(seed, stream), c)
  oi = np.floor(draw(pipeline.STREAM_OFFSET_I) * hi).astype(np.int32)
  oj = np.floor(draw(pipeline.STREAM_OFFSET_J) * hi).astype(np.int32)
  return oi, oj


def reference_flips(seed: int, counters) -> np.ndarray:
  """The horizontal-flip decisions of samples `counters` (when hflip=True)."""
  return uniform_from_counter(pipeline.stream_seed(seed, pipeline.STREAM_FLIP),
                              np.asarray(counters)) < 0.5


def posterior_eps_reference(seed: int, counters, rows, cols, channels: int,
                            resolution: int) -> np.ndarray:
  """The posterior noise of samples `counters` (see `latents.latent_fetch`).

  `rows`/`cols` are (b, s) indices into the *source* latent; returns (b, s, s, C) float32.
  """
  k = np.asarray(counters, np.int64)
  rows, cols = np.asarray(rows, np.int64), np.asarray(cols, np.int64)
  r, c = int(resolution), int(channels)
  e = (k[:, None, None, None] * (r * r * c) + (rows[:, :, None, None] * r
                                              + cols[:, None, :, None]) * c
       + np.arange(c)[None, None, None, :])
  u1 = uniform_from_counter(pipeline.stream_seed(seed, latents.STREAM_EPS_U1), e)
  u2 = uniform_from_counter(pipeline.stream_seed(seed, latents.STREAM_EPS_U2), e)
  return (np.sqrt(-2.0 * np.log(1.0 - u1)) * np.cos(2.0 * np.pi * u2)).astype(np.float32)
