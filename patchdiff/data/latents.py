"""Precomputed latents (`data.source="latents"`): .npy/.npz files or a folder of shards written by
`patchdiff.encode_latents`, memory-mapped or in memory, and the per-step fetch that crops them and
draws each sample's posterior noise.

A folder of shards holds:
  spec.json      written first: what is encoded (source, its fingerprint, VAE, resolution, shard
                 size, ...); a resumed encoding must match it.
  shard-KKKKK/   shard K: the source's images [K * shard_size, (K + 1) * shard_size), those that
                 decoded, in source order: `mean.npy`, `std.npy` (count, C, R, R) float32 and, with
                 labels, `labels.npy` (count,) int64, plus `shard.json` (count, source range,
                 skipped images). Written under a temporary name and renamed whole: a shard folder
                 is complete or absent.
  manifest.json  written last, once every shard is there: the spec, the per-example shape and
                 dtype, the scaling factor, each shard's name and count, the skipped images.
The latents are the shards' arrays concatenated in shard order.
"""
from __future__ import annotations

import dataclasses
import json
import struct
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from patchdiff.config_lib import LATENT_LAYOUTS
from patchdiff.data import pipeline

# Random streams of the posterior noise of latent (mean, std) files.
STREAM_EPS_U1 = 0x4550535F5531  # Box-Muller radius
STREAM_EPS_U2 = 0x4550535F5532  # Box-Muller angle

# A folder of latent shards (see the module docstring).
SHARDS_FORMAT = "patchdiff-latent-shards/1"
SPEC = "spec.json"
MANIFEST = "manifest.json"
SHARD_INFO = "shard.json"


def shard_name(k: int) -> str:
  """The folder name of shard k."""
  return f"shard-{k:05d}"


class ShardedArray:
  """Arrays (the memory-mapped shards) concatenated along axis 0 without copying them. Indexing
  with an integer array gathers rows into a new ndarray; a slice gives a ShardedArray of the
  shards' slices; `np.asarray` concatenates."""

  def __init__(self, parts: list[np.ndarray]):
    if not parts:
      raise ValueError("ShardedArray needs at least one array")
    kinds = sorted({f"{p.dtype} {p.shape[1:]}" for p in parts})
    if len(kinds) != 1:
      raise ValueError(f"ShardedArray: the arrays differ in dtype or row shape: {kinds}")
    self.parts = list(parts)
    self.starts = np.cumsum([0] + [len(p) for p in parts])
    self.shape = (int(self.starts[-1]),) + tuple(parts[0].shape[1:])
    self.dtype = parts[0].dtype

  @property
  def ndim(self) -> int:
    return len(self.shape)

  def __len__(self) -> int:
    return self.shape[0]

  def __array__(self, dtype=None, copy=None):
    out = np.concatenate(self.parts)
    return out if dtype is None else out.astype(dtype)

  def __getitem__(self, key):
    if isinstance(key, slice):
      lo, hi, step = key.indices(len(self))
      if step != 1:
        raise IndexError("ShardedArray slices take step 1")
      parts = [p[max(lo - a, 0):max(min(hi - a, len(p)), 0)]
               for p, a in zip(self.parts, self.starts[:-1])]
      return ShardedArray([p for p in parts if len(p)] or [self.parts[0][:0]])
    index = np.asarray(key)
    if not np.issubdtype(index.dtype, np.integer):
      raise IndexError(f"ShardedArray takes integer indices or a slice, got {index.dtype}")
    flat = index.reshape(-1)
    if flat.size and (flat.min() < -len(self) or flat.max() >= len(self)):
      raise IndexError(f"index out of range for {len(self)} rows")
    flat = np.where(flat < 0, flat + len(self), flat)
    which = np.searchsorted(self.starts, flat, side="right") - 1
    out = np.empty((flat.size,) + self.shape[1:], self.dtype)
    for k in np.unique(which):
      rows = which == k
      out[rows] = self.parts[k][flat[rows] - self.starts[k]]
    return out.reshape(index.shape + self.shape[1:])


def read_manifest(folder: Path) -> dict[str, Any]:
  """The manifest of a folder of latent shards; an unfinished or foreign folder is an error."""
  path = folder / MANIFEST
  if not path.is_file():
    spec = folder / SPEC
    if spec.is_file():
      try:
        total = int(json.loads(spec.read_text())["num_shards"])
      except (ValueError, KeyError, TypeError, OSError):
        total = "?"
      done = sum(1 for d in folder.glob("shard-*") if (d / SHARD_INFO).is_file())
      raise ValueError(f"{folder} holds no {MANIFEST}: its encoding is unfinished ({done} of "
                       f"{total} shards written); rerun patchdiff.encode_latents with the flags "
                       f"recorded in {spec}")
    raise ValueError(f"{folder} is not a folder of latent shards (it has no {MANIFEST})")
  try:
    manifest = json.loads(path.read_text())
  except (ValueError, OSError) as e:
    raise ValueError(f"cannot read {path}: {e}") from e
  if not isinstance(manifest, dict) or manifest.get("format") != SHARDS_FORMAT:
    found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
    raise ValueError(f"{path}: format {found!r} is not {SHARDS_FORMAT!r}")
  return manifest


def _load_shard_array(path: Path, shape: tuple[int, ...], dtype: str, manifest: Path,
                      cache: bool) -> np.ndarray:
  if not path.is_file():
    raise ValueError(f"latent shard file {path} is missing ({manifest} lists a shard of "
                     f"{shape[0]} latents there)")
  try:
    a = np.load(path, mmap_mode=None if cache else "r", allow_pickle=False)
  except (ValueError, OSError, EOFError) as e:
    raise ValueError(f"cannot read latent shard file {path}: {e}") from e
  if a.shape != shape or a.dtype != np.dtype(dtype):
    raise ValueError(f"latent shard file {path} holds {a.dtype} {a.shape}, but {manifest} says "
                     f"{dtype} {shape}")
  return a


def read_shards(folder, cache: bool = False
                ) -> tuple[np.ndarray | ShardedArray, np.ndarray | ShardedArray,
                           np.ndarray | None, dict[str, Any]]:
  """(mean, std, labels or None, manifest) of a folder of latent shards.

  With cache=False every shard file is memory-mapped (`np.load(mmap_mode="r")`) and mean / std are
  `ShardedArray`s of them (the one memmap where there is one shard); with cache=True the shards are
  read into memory and concatenated. Labels are always read into memory. A missing or unreadable
  shard file, or one whose shape or dtype is not the manifest's, is a ValueError naming it.
  """
  folder = Path(folder)
  manifest = read_manifest(folder)
  where = folder / MANIFEST
  try:
    shape, dtype = tuple(int(v) for v in manifest["shape"]), str(manifest["dtype"])
    shards = [(str(s["name"]), int(s["count"])) for s in manifest["shards"]]
    has_labels = bool(manifest["spec"]["labels"])
  except (KeyError, TypeError, ValueError) as e:
    raise ValueError(f"{where} is incomplete or malformed: {e!r}") from e
  means, stds, labels = [], [], []
  for name, count in shards:
    if not count:
      continue
    d = folder / name
    means.append(_load_shard_array(d / "mean.npy", (count,) + shape, dtype, where, cache))
    stds.append(_load_shard_array(d / "std.npy", (count,) + shape, dtype, where, cache))
    if has_labels:
      labels.append(np.asarray(_load_shard_array(d / "labels.npy", (count,), "int64", where,
                                                 True)))
  if not means:
    empty = np.zeros((0,) + shape, dtype)
    return empty, empty, (np.zeros(0, np.int64) if has_labels else None), manifest

  def joined(parts):
    if cache:
      return np.concatenate(parts)
    return parts[0] if len(parts) == 1 else ShardedArray(parts)

  return (joined(means), joined(stds), np.concatenate(labels) if has_labels else None,
          manifest)


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


def _check_scale(path: Path, written: float, scale: float) -> None:
  if not np.isclose(written, scale, rtol=1e-6):
    raise ValueError(f"{path} holds latents scaled by {written}, but the config's "
                     f"data.latent_scale is {scale}")


@dataclasses.dataclass
class Latents:
  mean: np.ndarray | ShardedArray    # (N, C, R, R) or (N, R, R, C), float
  std: np.ndarray | ShardedArray | None  # same shape, or None (use `mean` as the latents)
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
  record that factor as a scalar `scaling_factor`; with `scale` given, a file recording another
  factor is an error.

  A folder: the shards `patchdiff.encode_latents` writes (see the module docstring and
  `read_shards`: memory-mapped shard by shard unless cache=True), (mean, std) and labels, NCHW,
  its scaling factor recorded in manifest.json.
  """
  path = Path(path)
  res = int(resolution)
  if layout not in LATENT_LAYOUTS:
    raise ValueError(f"latent layout {layout!r} is not one of {LATENT_LAYOUTS}")
  std = labels = None
  try:
    if path.is_dir():
      mean, std, stored, manifest = read_shards(path, cache)
      if manifest.get("layout", "NCHW") != layout:
        raise ValueError(f"{path} holds {manifest.get('layout')} latents ({MANIFEST}), but "
                         f"data.latent_layout is {layout!r}")
      if use_labels:
        if stored is None:
          raise ValueError(f"{path} has no 'labels' array, but data.labels=True")
        labels = stored
      if scale is not None and manifest.get("scaling_factor") is not None:
        _check_scale(path, float(manifest["scaling_factor"]), scale)
    elif path.suffix.lower() == ".npy":
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
        _check_scale(path, float(_npz_member(path, "scaling_factor", False)), scale)
    else:
      raise ValueError(f"latent file {path} must be .npy or .npz (or a folder of shards)")
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
