"""Precomputed latents (`data.source="latents"`): .npy/.npz files, memory-mapped or in memory, and
the per-step fetch that crops them and draws each sample's posterior noise."""
from __future__ import annotations

import dataclasses
import struct
import zipfile
from pathlib import Path

import numpy as np

from patchdiff.config_lib import LATENT_LAYOUTS
from patchdiff.data import pipeline

# Random streams of the posterior noise of latent (mean, std) files.
STREAM_EPS_U1 = 0x4550535F5531  # Box-Muller radius
STREAM_EPS_U2 = 0x4550535F5532  # Box-Muller angle


def _npz_member(path: Path, key: str, mmap: bool) -> np.ndarray:
  """Array `key` of an .npz, memory-mapped when it is stored uncompressed and `mmap`."""
  with zipfile.ZipFile(path) as zf:
    info = zf.getinfo(key + ".npy")
    if mmap and info.compress_type == zipfile.ZIP_STORED:
      with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
        if local[:4] != b"PK\x03\x04":
          raise ValueError(f"{path}: bad local zip header for {key}.npy")
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        start = info.header_offset + 30 + name_len + extra_len
        f.seek(start)
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
          shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
          shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        offset = f.tell()
      if dtype.hasobject:
        raise ValueError(f"{path}: array {key!r} holds Python objects")
      return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape,
                       order="F" if fortran else "C")
    with zf.open(info) as f:
      return np.lib.format.read_array(f, allow_pickle=False)


@dataclasses.dataclass
class Latents:
  mean: np.ndarray                   # (N, C, R, R) or (N, R, R, C), float
  std: np.ndarray | None             # same shape, or None (use `mean` as the latents)
  layout: str
  labels: np.ndarray | None
  path: str

  @property
  def channels(self) -> int:
    return int(self.mean.shape[1] if self.layout == "NCHW" else self.mean.shape[3])


def load_latents(path, resolution: int, layout: str = "NCHW", use_labels: bool = False,
                 cache: bool = False, limit: int | None = None,
                 scale: float | None = None) -> Latents:
  """Precomputed latents from `path`.

  `.npy`: one float array, the latents. `.npz`: either `latents` (the latents) or `mean` and
  `std` (a diagonal Gaussian posterior per example: each sample draws a fresh
  z = mean + std * eps, eps ~ N(0, 1) from (seed, k); see `latent_fetch`), plus an
  optional int `labels` (N,). Arrays are (N, C, R, R) for layout "NCHW" (the PyTorch layout
  VAE encoders produce, default) or (N, R, R, C) for "NHWC"; any float dtype (float16 is
  widened to float32 per batch). With cache=False, .npy files and uncompressed .npz members
  (np.savez) are memory-mapped; compressed members (np.savez_compressed) are read into memory.
  Values are used as stored (apply any VAE scale factor when writing the file). An .npz may
  record that factor as a scalar `scaling_factor` (`patchdiff.encode_latents` does); with
  `scale` given, a file recording another factor is an error.
  """
  path = Path(path)
  res = int(resolution)
  if layout not in LATENT_LAYOUTS:
    raise ValueError(f"latent layout {layout!r} is not one of {LATENT_LAYOUTS}")
  std = labels = None
  try:
    if path.suffix.lower() == ".npy":
      mean = np.load(path, mmap_mode=None if cache else "r", allow_pickle=False)
      if use_labels:
        raise ValueError(f"{path} is a .npy file, which cannot hold labels, but data.labels="
                         "True: write an .npz with a 'labels' array")
    elif path.suffix.lower() == ".npz":
      with zipfile.ZipFile(path) as zf:
        keys = sorted(n[:-4] for n in zf.namelist() if n.endswith(".npy"))
      if "mean" in keys and "std" in keys:
        mean = _npz_member(path, "mean", not cache)
        std = _npz_member(path, "std", not cache)
      elif "latents" in keys:
        mean = _npz_member(path, "latents", not cache)
      else:
        raise ValueError(f"{path} holds arrays {keys}; expected 'latents', or 'mean' and 'std'")
      if use_labels:
        if "labels" not in keys:
          raise ValueError(f"{path} has no 'labels' array, but data.labels=True")
        labels = np.asarray(_npz_member(path, "labels", False))
      if scale is not None and "scaling_factor" in keys:
        written = float(_npz_member(path, "scaling_factor", False))
        if not np.isclose(written, scale, rtol=1e-6):
          raise ValueError(f"{path} holds latents scaled by {written}, but the config's "
                           f"data.latent_scale is {scale}")
    else:
      raise ValueError(f"latent file {path} must be .npy or .npz")
  except ValueError:
    raise
  except (OSError, zipfile.BadZipFile, KeyError, EOFError) as e:
    raise ValueError(f"cannot read latent file {path}: {e}") from e

  arrays = [("latents" if std is None else "mean", mean)] + ([("std", std)] if std is not None
                                                               else [])
  for name, a in arrays:
    if a.ndim != 4:
      raise ValueError(f"{path}: {name} must be 4-d ({'(N, C, R, R)' if layout == 'NCHW' else '(N, R, R, C)'}"
                       f", layout {layout}), got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.floating):
      raise ValueError(f"{path}: {name} must be a float array, got dtype {a.dtype}")
    h, w = (a.shape[2], a.shape[3]) if layout == "NCHW" else (a.shape[1], a.shape[2])
    if h != w or h != res:
      other = "NHWC" if layout == "NCHW" else "NCHW"
      raise ValueError(f"{path}: {name} of shape {a.shape} is not {res}x{res} in layout {layout} "
                       f"(data.resolution={res}; set data.latent_layout={other!r} if the file is "
                       f"{other})")
    if a.shape[0] == 0:
      raise ValueError(f"{path}: {name} is empty (N = 0)")
  if std is not None and std.shape != mean.shape:
    raise ValueError(f"{path}: std has shape {std.shape}, mean has shape {mean.shape}")
  if labels is not None:
    if labels.shape != (mean.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
      raise ValueError(f"{path}: labels must be integer class ids of shape ({mean.shape[0]},), "
                       f"got {labels.dtype} {labels.shape}")
    labels = labels.astype(np.int64)
  if limit is not None:
    mean = mean[:int(limit)]
    std = std[:int(limit)] if std is not None else None
    labels = labels[:int(limit)] if labels is not None else None
  return Latents(mean, std, layout, labels, str(path))


def _tf_normal_from_counter(tf, seed: int, counters):
  """Standard normals (float32) from counters by Box-Muller on two counter-hash streams."""
  u1 = pipeline.tf_uniform_from_counter(tf, pipeline.stream_seed(seed, STREAM_EPS_U1), counters)
  u2 = pipeline.tf_uniform_from_counter(tf, pipeline.stream_seed(seed, STREAM_EPS_U2), counters)
  r = tf.sqrt(-2.0 * tf.math.log(1.0 - u1))  # 1 - u1 in (0, 1]
  return tf.cast(r * tf.cos((2.0 * np.pi) * u2), tf.float32)


def latent_fetch(lat: Latents, res: int, seed: int):
  """The pipeline's `fetch` for latents: crops of `mean`, plus `std` times fresh noise for (mean,
  std) files. Sample k's noise at pixel (row, col) of the *source* latent (before any flip),
  channel c, is sqrt(-2 ln(1 - u1)) cos(2 pi u2) with u1, u2 = uniform_from_counter of the
  streams STREAM_EPS_U1, STREAM_EPS_U2 at counter k * R*R*C + (row * R + col) * C + c."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  mean, std, layout, channels = lat.mean, lat.std, lat.layout, lat.channels

  def take(arr):
    def read(idx):
      return np.ascontiguousarray(arr[np.asarray(idx)], dtype=np.float32)
    return read

  def gather(arr, index):
    x = tf.numpy_function(pipeline.exit_safe(take(arr)), [index], tf.float32, stateful=False)
    if layout == "NCHW":
      x = tf.ensure_shape(x, [None, channels, res, res])
      x = tf.transpose(x, [0, 2, 3, 1])
    return tf.ensure_shape(x, [None, res, res, channels])

  def fetch(d: pipeline.SampleDraws):
    b = tf.shape(d.index)[0]
    z = pipeline.crop_patches(tf, gather(mean, d.index), tf.range(b), d.offset_i, d.offset_j,
                              d.flip, d.size, res)
    if std is None:
      return z
    sd = pipeline.crop_patches(tf, gather(std, d.index), tf.range(b), d.offset_i, d.offset_j,
                               d.flip, d.size, res)
    # Noise keyed by the *source* pixel, so the sample equals "draw the full latent, then crop
    # and flip": rows oi + r, columns oj + c (or R - 1 - (oj + c) when flipped).
    r = tf.range(d.size, dtype=tf.int64)
    rows = tf.cast(d.offset_i, tf.int64)[:, None] + r[None, :]
    cols = tf.cast(d.offset_j, tf.int64)[:, None] + r[None, :]
    cols = tf.where(d.flip[:, None], res - 1 - cols, cols)
    e = (d.k[:, None, None, None] * (res * res * channels)
         + (rows[:, :, None, None] * res + cols[:, None, :, None]) * channels
         + tf.range(channels, dtype=tf.int64)[None, None, None, :])
    return z + sd * _tf_normal_from_counter(tf, seed, e)

  return fetch
