"""Training data sources for the patch pipeline, and the trainer's entry point `build_input`.

Sources (`data.source`):
  twemoji  the embedded Twemoji set (`data.load_twemoji`: PIL, decoded once and cached as .npz).
  folder   a folder searched recursively for .png .jpg .jpeg .webp .bmp files (any case), taken in
           sorted order of their relative POSIX paths; with `labels`, the class of a file is its
           first-level subfolder (sorted subfolder names -> class ids 0, 1, ...).
  zip      an archive written by EDM's / Patch Diffusion's `dataset_tool.py`: image members in
           sorted name order, plus an optional `dataset.json` {"labels": [["00000/img00000000.png",
           6], ...]} (or "labels": null). Labels must be integer class ids.
  tfds     a TFDS dataset by `tfds_name` (+ `tfds_data_dir`; nothing is downloaded unless
           `tfds_download`), or a prepared directory `path` (`tfds.builder_from_directory`).
           Images are read *encoded* (`tfds.decode.SkipDecoding`) and go through the same decoder
           as files; labels come from the `tfds_label_key` ClassLabel feature.
  latents  precomputed latents, `.npy` or `.npz` (see `load_latents`), float, used as stored.
  synthetic  `limit` (default 256) random arrays N(0, 0.5^2) of `channels` channels (and random
           labels), a pure function of the seed: for smoke runs and benchmarks, never for science.

Preprocessing of images (folder, zip, tfds), one TensorFlow function `decode_image_tf` used by
both cache modes, so that they produce bit-identical pixels:
  decode (`tf.io.decode_image`: PNG incl. 16-bit and palette, JPEG, WebP, BMP, GIF first frame)
  -> grayscale to 3 channels; alpha (RGBA, gray+alpha) composited on white:
     rint(rgb * a/255 + 255 * (1 - a/255)) in float32 -> uint8
  -> centre crop to a square of side min(H, W) (top/left offsets (H-side)//2, (W-side)//2)
  -> if side != R: `tf.image.resize(method="lanczos3", antialias=True)` (Lanczos-3 scaled by the
     resize factor when shrinking, as PIL's LANCZOS; the results agree with PIL up to rounding,
     they are not bit-identical), rounded half-to-even, clipped to [0, 255] -> uint8 (R, R, 3).
  In the patch pipeline: optional horizontal flip, then x -> x / 127.5 - 1 in [-1, 1].
(The Twemoji source keeps its own PIL path: alpha on white at 72 px, then PIL LANCZOS.)

Cache modes (`data.cache`):
  True   every image is decoded once at build time (tf.data, parallel) into an (N, R, R, 3) uint8
         array held in memory; steps crop from it.
  False  only the *encoded* bytes stay in memory; each step decodes its samples, several steps
         in flight: plain R x R 8-bit RGB PNGs (what dataset_tool writes) by libspng (the
         `pyspng` wheel, called with the GIL released from one `tf.numpy_function` per step, so
         both cores decode), everything else by `decode_image_tf` in the graph; the pixels are
         the same either way (for those PNGs preprocessing is the identity). The build still decodes every image once to find corrupt files (so
         that no error can surface mid-training), discarding the pixels.
For latents, cache=True loads the arrays into memory and cache=False memory-maps them.

Bad input: an image that cannot be read or decoded is skipped, counted and logged (absl warning
with its path and the decoder's message), or raises a ValueError naming it when
`skip_corrupt=False`; never a zero image. Structural problems (empty folder, zip without images,
dataset.json naming a missing file or missing an image, labels out of range, latent arrays of a
wrong shape, ...) raise ValueError naming the file, at build time.

Order and multi-host behaviour are those of `data.build_patch_pipeline` (a pure function of
(seed, step); host p of P gets the contiguous slice p of each global batch); see `patchdiff.data`.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import struct
import zipfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
from absl import logging

from patchdiff.data import pipeline as data_lib
from patchdiff.patches import PatchSchedule

SOURCES = ("twemoji", "folder", "zip", "tfds", "latents", "synthetic")
SYNTHETIC_EXAMPLES = 256
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
LATENT_LAYOUTS = ("NCHW", "NHWC")

# Keys of `cfg.data` that this module reads, with their defaults.
DATA_DEFAULTS: dict[str, Any] = dict(
    source="twemoji",      # one of SOURCES
    path=None,             # folder / zip file / .npy or .npz / prepared TFDS directory
    resolution=32,         # R: images are centre-cropped and resized to R x R
    hflip=False,           # random horizontal flips (per sample, from (seed, k))
    limit=None,            # use only the first `limit` examples (in source order)
    twemoji_category=None,  # twemoji: one Unicode emoji category, e.g. "Smileys & Emotion"
    twemoji_subset_seed=None,  # twemoji: `limit` images drawn at random with this seed
    cache=True,            # decode once into memory (True) or decode per step in the graph
    labels=False,          # use class labels (needs model label_dim > 0)
    skip_corrupt=True,     # skip + log corrupt images (True) or raise ValueError (False)
    cache_dir=None,        # Twemoji .npz cache folder (default $PATCHDIFF_CACHE or ~/.cache)
    tfds_name=None,        # TFDS dataset name, e.g. "cifar10" (or None with `path`)
    tfds_split="train",
    tfds_data_dir=None,
    tfds_download=False,   # allow TFDS to download and prepare
    tfds_image_key="image",
    tfds_label_key="label",
    latent_layout="NCHW",  # layout of latent arrays: (N, C, R, R) "NCHW" or (N, R, R, C) "NHWC"
    latent_scale=None,     # latents: the VAE scale factor the file must have been written with
)

# Random stream of the posterior noise of latent (mean, std) files.
_STREAM_EPS_U1 = 0x4550535F5531  # Box-Muller radius
_STREAM_EPS_U2 = 0x4550535F5532  # Box-Muller angle


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


def _cfg_items(data_cfg) -> dict[str, Any]:
  if data_cfg is None:
    return {}
  if hasattr(data_cfg, "to_dict"):
    return dict(data_cfg.to_dict())
  if isinstance(data_cfg, Mapping):
    return dict(data_cfg)
  raise ValueError(f"data config must be a ConfigDict or a mapping, got {type(data_cfg).__name__}")


def read_config(data_cfg, label_dim: int = 0) -> dict[str, Any]:
  """`data_cfg` with defaults filled in, validated (ValueError naming the key and the value)."""
  given = _cfg_items(data_cfg)
  unknown = sorted(set(given) - set(DATA_DEFAULTS))
  if unknown:
    raise ValueError(f"unknown data config key(s) {unknown}; known keys: {sorted(DATA_DEFAULTS)}")
  cfg = dict(DATA_DEFAULTS)
  cfg.update({k: v for k, v in given.items()})
  for key in ("tfds_split", "tfds_image_key", "tfds_label_key", "latent_layout"):
    if cfg[key] is None:
      cfg[key] = DATA_DEFAULTS[key]

  src = cfg["source"]
  if src not in SOURCES:
    raise ValueError(f"data.source={src!r} is not one of {SOURCES}")
  res = cfg["resolution"]
  if isinstance(res, bool) or not isinstance(res, (int, np.integer)) or res <= 0:
    raise ValueError(f"data.resolution must be a positive integer, got {res!r}")
  cfg["resolution"] = int(res)
  lim = cfg["limit"]
  if lim is not None and (isinstance(lim, bool) or not isinstance(lim, (int, np.integer))
                          or lim <= 0):
    raise ValueError(f"data.limit must be a positive integer or None, got {lim!r}")
  for key in ("hflip", "cache", "labels", "skip_corrupt", "tfds_download"):
    if not isinstance(cfg[key], (bool, np.bool_)):
      raise ValueError(f"data.{key} must be a bool, got {cfg[key]!r}")
    cfg[key] = bool(cfg[key])
  if cfg["latent_layout"] not in LATENT_LAYOUTS:
    raise ValueError(f"data.latent_layout={cfg['latent_layout']!r} is not one of {LATENT_LAYOUTS}")
  scale = cfg["latent_scale"]
  if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                            or not scale > 0):
    raise ValueError(f"data.latent_scale must be a positive number or None, got {scale!r}")

  label_dim = int(label_dim)
  if label_dim < 0:
    raise ValueError(f"label_dim must be >= 0, got {label_dim}")
  if cfg["labels"] and label_dim == 0:
    raise ValueError("data.labels=True but the model's label_dim is 0: set label_dim to the "
                     "number of classes")
  if not cfg["labels"] and label_dim > 0:
    raise ValueError(f"the model has label_dim={label_dim} but data.labels=False: a conditional "
                     "model needs labels")

  path = cfg["path"]
  category = cfg["twemoji_category"]
  if category is not None and (src != "twemoji" or category not in data_lib.TWEMOJI_CATEGORIES):
    raise ValueError(f"data.twemoji_category={category!r}: needs data.source='twemoji' and one of "
                     f"{data_lib.TWEMOJI_CATEGORIES}")
  subset_seed = cfg["twemoji_subset_seed"]
  if subset_seed is not None and (src != "twemoji" or lim is None):
    raise ValueError(f"data.twemoji_subset_seed={subset_seed!r} draws data.limit Twemoji images "
                     "at random: it needs data.source='twemoji' and data.limit")
  if src == "twemoji":
    if cfg["labels"]:
      raise ValueError("data.source='twemoji' has no labels: set data.labels=False")
    if not cfg["cache"]:
      raise ValueError("data.cache=False is not supported for data.source='twemoji' (the "
                       "embedded set is always decoded once and cached as .npz)")
  elif src in ("folder", "zip", "latents"):
    if not path:
      raise ValueError(f"data.source={src!r} needs data.path")
    p = Path(os.fspath(path)).expanduser()
    if src == "folder" and not p.is_dir():
      raise ValueError(f"data.path {p} is not a folder (data.source='folder')")
    if src in ("zip", "latents") and not p.is_file():
      raise ValueError(f"data.path {p} is not a file (data.source={src!r})")
    if src == "latents" and p.suffix.lower() not in (".npy", ".npz"):
      raise ValueError(f"latent file {p} must be .npy or .npz")
    cfg["path"] = str(p)
  elif src == "tfds":
    if not cfg["tfds_name"] and not path:
      raise ValueError("data.source='tfds' needs data.tfds_name (a dataset name) or data.path "
                       "(a prepared TFDS directory)")
    if path and not cfg["tfds_name"] and not Path(os.fspath(path)).is_dir():
      raise ValueError(f"data.path {path} is not a prepared TFDS directory")
  return cfg


# ---------------------------------------------------------------------------------------------
# Raw sources: names, encoded bytes, labels
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Encoded:
  """Encoded images of a source, in source order (before decoding)."""
  names: list[str]                   # path (or other locator) of every example, for messages
  data: list[bytes | None]           # encoded bytes, None where the file could not be read
  errors: dict[int, str]             # example -> why it could not be read
  labels: np.ndarray | None = None   # (N,) int64 class ids
  class_names: list[str] | None = None
  origin: str = ""


def _check_labels(labels: np.ndarray, label_dim: int, where: str, names: list[str]) -> None:
  bad = np.flatnonzero((labels < 0) | (labels >= label_dim))
  if bad.size:
    m = int(bad[0])
    raise ValueError(f"{where}: label {int(labels[m])} of {names[m]} is out of range for "
                     f"label_dim={label_dim} ({bad.size} labels out of range in all)")


def _read_files(paths: list[Path]) -> tuple[list[bytes | None], dict[int, str]]:
  def read(p: Path):
    try:
      return p.read_bytes(), None
    except OSError as e:
      return None, f"unreadable: {e}"

  with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
    results = list(pool.map(read, paths))
  return [r[0] for r in results], {i: r[1] for i, r in enumerate(results) if r[1] is not None}


def scan_folder(path, use_labels: bool = False, limit: int | None = None) -> Encoded:
  """Image files under `path` (recursive), sorted by relative path; labels = first subfolder."""
  root = Path(path)
  if not root.is_dir():
    raise ValueError(f"{root} is not a folder")
  files = [p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]
  if not files:
    raise ValueError(f"folder {root} contains no images (searched recursively for "
                     f"{', '.join(IMAGE_EXTENSIONS)})")
  files.sort(key=lambda p: p.relative_to(root).as_posix())
  labels = class_names = None
  if use_labels:
    rel = [p.relative_to(root).parts for p in files]
    loose = [files[i] for i, parts in enumerate(rel) if len(parts) < 2]
    if loose:
      raise ValueError(f"{loose[0]} lies directly in {root}, not in a class subfolder; with "
                       f"data.labels=True every image must be in one ({len(loose)} such files)")
    class_names = sorted({parts[0] for parts in rel})
    ids = {c: i for i, c in enumerate(class_names)}
    labels = np.asarray([ids[parts[0]] for parts in rel], dtype=np.int64)
  if limit is not None:
    files = files[:int(limit)]
    labels = labels[:int(limit)] if labels is not None else None
  blobs, errors = _read_files(files)
  return Encoded([str(p) for p in files], blobs, errors, labels, class_names, origin=str(root))


def scan_zip(path, use_labels: bool = False, limit: int | None = None) -> Encoded:
  """The image members of a dataset_tool zip in sorted order, labels from its dataset.json."""
  path = Path(path)
  try:
    zf = zipfile.ZipFile(path)
  except (zipfile.BadZipFile, OSError) as e:
    raise ValueError(f"{path} is not a readable zip archive: {e}") from e
  with zf:
    members = set(zf.namelist())
    names = sorted(n for n in members
                   if not n.endswith("/") and os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS)
    if not names:
      raise ValueError(f"zip archive {path} contains no images (looked for "
                       f"{', '.join(IMAGE_EXTENSIONS)})")
    labels = None
    if use_labels:
      where = f"{path}:dataset.json"
      if "dataset.json" not in members:
        raise ValueError(f"zip archive {path} has no dataset.json, but data.labels=True")
      try:
        meta = json.loads(zf.read("dataset.json"))
      except (ValueError, zipfile.BadZipFile, OSError) as e:
        raise ValueError(f"{where} cannot be read as JSON: {e}") from e
      entries = meta.get("labels") if isinstance(meta, dict) else None
      if entries is None:
        raise ValueError(f"{where} has no labels (\"labels\" is null or missing), but "
                         "data.labels=True")
      if not isinstance(entries, list):
        raise ValueError(f"{where}: \"labels\" must be a list of [file name, class id] pairs")
      mapping: dict[str, int] = {}
      image_set = set(names)
      for entry in entries:
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2
                and isinstance(entry[0], str)):
          raise ValueError(f"{where}: entry {entry!r} is not a [file name, class id] pair")
        fname, lab = entry[0].replace("\\", "/"), entry[1]
        if isinstance(lab, bool) or not isinstance(lab, int):
          raise ValueError(f"{where}: label {lab!r} of {fname} is not an integer class id "
                           "(only class-id labels are supported)")
        if fname not in image_set:
          raise ValueError(f"{where} names {fname!r}, which is not an image in the archive")
        mapping[fname] = lab
      unlabelled = [n for n in names if n not in mapping]
      if unlabelled:
        raise ValueError(f"{where} has no label for {unlabelled[0]!r} "
                         f"({len(unlabelled)} images without labels)")
      labels = np.asarray([mapping[n] for n in names], dtype=np.int64)
    if limit is not None:
      names = names[:int(limit)]
      labels = labels[:int(limit)] if labels is not None else None
    blobs: list[bytes | None] = []
    errors: dict[int, str] = {}
    for i, n in enumerate(names):
      try:
        blobs.append(zf.read(n))
      except Exception as e:  # pylint: disable=broad-except  (bad CRC, truncation, zlib.error)
        blobs.append(None)
        errors[i] = f"unreadable zip member: {type(e).__name__}: {e}"
  return Encoded([f"{path}:{n}" for n in names], blobs, errors, labels, origin=str(path))


def scan_tfds(cfg: Mapping[str, Any], use_labels: bool = False) -> Encoded:
  """A TFDS split, images kept encoded. Nothing is downloaded unless cfg['tfds_download']."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  name, limit = cfg["tfds_name"], cfg["limit"]
  if name:
    try:
      builder = tfds.builder(name, data_dir=cfg["tfds_data_dir"])
    except Exception as e:  # pylint: disable=broad-except  (DatasetNotFoundError, ...)
      raise ValueError(f"TFDS dataset {name!r} (data_dir={cfg['tfds_data_dir']}) cannot be "
                       f"opened: {e}") from e
    where = f"tfds:{name} (data_dir={cfg['tfds_data_dir']})"
    if not builder.is_prepared():
      if not cfg["tfds_download"]:
        raise ValueError(f"TFDS dataset {name!r} is not prepared in data_dir="
                         f"{cfg['tfds_data_dir']} and data.tfds_download is False")
      builder.download_and_prepare()
  else:
    try:
      builder = tfds.builder_from_directory(os.fspath(cfg["path"]))
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f"{cfg['path']} is not a prepared TFDS directory: {e}") from e
    where = f"tfds:{cfg['path']}"
  split = cfg["tfds_split"]
  if split not in builder.info.splits:
    raise ValueError(f"{where} has no split {split!r} (splits: {sorted(builder.info.splits)})")
  features = builder.info.features
  image_key, label_key = cfg["tfds_image_key"], cfg["tfds_label_key"]
  if image_key not in features:
    raise ValueError(f"{where} has no feature {image_key!r} (features: {sorted(features)})")
  if not isinstance(features[image_key], tfds.features.Image):
    raise ValueError(f"{where}: feature {image_key!r} is not an image feature")
  class_names = None
  keys = [image_key]
  if use_labels:
    if label_key not in features or not isinstance(features[label_key],
                                                    tfds.features.ClassLabel):
      raise ValueError(f"{where} has no class-label feature {label_key!r} (features: "
                       f"{sorted(features)}), but data.labels=True")
    class_names = list(features[label_key].names)
    keys.append(label_key)

  ds = builder.as_dataset(split=split, shuffle_files=False,
                          decoders={image_key: tfds.decode.SkipDecoding()})
  ds = ds.map(lambda ex: {k: ex[k] for k in keys})
  if limit is not None:
    ds = ds.take(int(limit))
  blobs: list[bytes | None] = []
  labels: list[np.ndarray] = []
  for batch in ds.batch(1024).as_numpy_iterator():
    blobs.extend(bytes(b) for b in batch[image_key])
    if use_labels:
      labels.append(np.asarray(batch[label_key], dtype=np.int64))
  if not blobs:
    raise ValueError(f"{where} split {split!r} is empty")
  names = [f"{where}[{split}][{i}]" for i in range(len(blobs))]
  lab = np.concatenate(labels) if use_labels else None
  return Encoded(names, blobs, {}, lab, class_names, origin=where)


# ---------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------


def decode_image_tf(encoded, resolution: int):
  """Encoded image bytes (scalar tf.string) -> (R, R, 3) uint8; see the module docstring."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  res = int(resolution)
  img = tf.io.decode_image(encoded, channels=0, dtype=tf.uint8, expand_animations=False)
  channels = tf.shape(img)[2]

  def composite(rgb, alpha):
    a = tf.cast(alpha, tf.float32) / 255.0
    out = tf.cast(rgb, tf.float32) * a + 255.0 * (1.0 - a)
    return tf.cast(tf.clip_by_value(tf.round(out), 0.0, 255.0), tf.uint8)

  def gray():
    return tf.tile(img[:, :, :1], [1, 1, 3])

  def gray_alpha():
    return composite(tf.tile(img[:, :, :1], [1, 1, 3]), img[:, :, 1:2])

  def rgb():
    return img[:, :, :3]

  def rgba():
    return composite(img[:, :, :3], img[:, :, 3:4])

  check = tf.debugging.assert_less_equal(channels, 4, message="image has more than 4 channels")
  with tf.control_dependencies([check]):
    x = tf.switch_case(tf.clip_by_value(channels - 1, 0, 3), [gray, gray_alpha, rgb, rgba])
  h, w = tf.shape(x)[0], tf.shape(x)[1]
  side = tf.minimum(h, w)
  top, left = (h - side) // 2, (w - side) // 2
  x = x[top:top + side, left:left + side]

  def resize():
    y = tf.image.resize(tf.cast(x, tf.float32), [res, res], method="lanczos3", antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(y), 0.0, 255.0), tf.uint8)

  x = tf.cond(side == res, lambda: x, resize)
  return tf.ensure_shape(x, [res, res, 3])


def _decode_reason(blob: bytes, resolution: int) -> str:
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  try:
    decode_image_tf(tf.constant(blob), resolution)
  except tf.errors.OpError as e:
    return e.message.strip().splitlines()[0] if e.message else type(e).__name__
  return "decoding failed"


def decode_all(enc: Encoded, resolution: int, skip_corrupt: bool = True,
               keep_pixels: bool = True, allow_none: bool = False
               ) -> tuple[np.ndarray | None, np.ndarray, dict[int, str]]:
  """Decodes every example once (tf.data, parallel).

  Returns (pixels, kept, bad): pixels (len(kept), R, R, 3) uint8 (None unless keep_pixels), the
  indices of the examples that decoded, and {index: reason} of those that did not (unreadable or
  corrupt). With skip_corrupt=False the first bad example raises a ValueError naming it; else
  each is logged (absl warning) with its name and reason. No usable example at all is an error
  unless `allow_none` (a part of a dataset).
  """
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  res = int(resolution)
  bad = dict(enc.errors)
  readable = np.asarray([i for i, b in enumerate(enc.data) if b is not None], dtype=np.int64)
  ok = np.zeros(len(enc.data), dtype=bool)
  pixels = np.empty((len(readable), res, res, 3), np.uint8) if keep_pixels else None
  if len(readable):
    blobs = data_lib.host_tensor(tf, np.asarray([enc.data[i] for i in readable], dtype=object))
    ds = tf.data.Dataset.range(len(readable))

    def dec(i):
      x = decode_image_tf(tf.gather(blobs, i), res)
      return (i, x) if keep_pixels else (i, tf.reduce_max(x))

    ds = ds.map(dec, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.ignore_errors().batch(512).prefetch(2)
    for idx, x in ds.as_numpy_iterator():
      ok[readable[idx]] = True
      if keep_pixels:
        pixels[idx] = x
    for i in readable:
      if not ok[i]:
        bad[int(i)] = "corrupt: " + _decode_reason(enc.data[i], res)
    if keep_pixels:
      pixels = pixels[ok[readable]]
  kept = np.flatnonzero(ok)
  if bad:
    first = min(bad)
    if not skip_corrupt:
      raise ValueError(f"cannot use image {enc.names[first]}: {bad[first]} ({len(bad)} bad "
                       f"image(s) in {enc.origin}; set data.skip_corrupt=True to skip them)")
    for i in sorted(bad):
      logging.warning("skipping image %s: %s", enc.names[i], bad[i])
    logging.warning("skipped %d of %d images of %s as unreadable or corrupt", len(bad),
                    len(enc.data), enc.origin)
  if not len(kept) and not allow_none:
    raise ValueError(f"no usable images in {enc.origin}: all {len(enc.data)} are unreadable or "
                     "corrupt")
  return pixels, kept, bad


# ---------------------------------------------------------------------------------------------
# Latents
# ---------------------------------------------------------------------------------------------


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
  z = mean + std * eps, eps ~ N(0, 1) from (seed, k); see `posterior_eps_reference`), plus an
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
  u1 = data_lib._tf_uniform_from_counter(  # pylint: disable=protected-access
      tf, data_lib.stream_seed(seed, _STREAM_EPS_U1), counters)
  u2 = data_lib._tf_uniform_from_counter(  # pylint: disable=protected-access
      tf, data_lib.stream_seed(seed, _STREAM_EPS_U2), counters)
  r = tf.sqrt(-2.0 * tf.math.log(1.0 - u1))  # 1 - u1 in (0, 1]
  return tf.cast(r * tf.cos((2.0 * np.pi) * u2), tf.float32)


def posterior_eps_reference(seed: int, counters, rows, cols, channels: int,
                            resolution: int) -> np.ndarray:
  """Numpy reference of the posterior noise of samples `counters` (what the pipeline draws).

  Sample k's noise at pixel (row, col) of the *source* latent (before any flip), channel c, is
  normal(seed, k * R*R*C + (row * R + col) * C + c). `rows`/`cols` are (b, s) source indices;
  returns (b, s, s, C) float32.
  """
  from patchdiff.patches import uniform_from_counter  # pylint: disable=import-outside-toplevel
  k = np.asarray(counters, np.int64)
  rows, cols = np.asarray(rows, np.int64), np.asarray(cols, np.int64)
  r, c = int(resolution), int(channels)
  e = (k[:, None, None, None] * (r * r * c) + (rows[:, :, None, None] * r
                                              + cols[:, None, :, None]) * c
       + np.arange(c)[None, None, None, :])
  u1 = uniform_from_counter(data_lib.stream_seed(seed, _STREAM_EPS_U1), e)
  u2 = uniform_from_counter(data_lib.stream_seed(seed, _STREAM_EPS_U2), e)
  return (np.sqrt(-2.0 * np.log(1.0 - u1)) * np.cos(2.0 * np.pi * u2)).astype(np.float32)


def _latent_fetch(tf, lat: Latents, res: int, seed: int):
  mean, std, layout = lat.mean, lat.std, lat.layout
  channels = lat.channels

  def take(arr):
    def read(idx):
      return np.ascontiguousarray(arr[np.asarray(idx)], dtype=np.float32)
    return read

  def gather(arr, index):
    x = tf.numpy_function(exit_safe(take(arr)), [index], tf.float32, stateful=False)
    if layout == "NCHW":
      x = tf.ensure_shape(x, [None, channels, res, res])
      x = tf.transpose(x, [0, 2, 3, 1])
    return tf.ensure_shape(x, [None, res, res, channels])

  def fetch(d: data_lib.SampleDraws):
    b = tf.shape(d.index)[0]
    z = data_lib.crop_patches(tf, gather(mean, d.index), tf.range(b), d.offset_i, d.offset_j,
                              d.flip, d.size, res)
    if std is None:
      return z
    sd = data_lib.crop_patches(tf, gather(std, d.index), tf.range(b), d.offset_i, d.offset_j,
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


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


class InputIterator:
  """Iterator of numpy batch dicts (the element format of `data.make_patch_dataset`).

  Attributes: dataset (the tf.data.Dataset), num_examples (usable examples), names (their
  paths, in the order the batches' `index` refers to; None for twemoji/latents), num_skipped,
  skipped ({name: reason}), class_names (or None), channels, source, cache.
  """

  def __init__(self, dataset, num_examples: int, channels: int, source: str, cache: bool,
               skipped: dict[str, str] | None = None, class_names: list[str] | None = None,
               names: list[str] | None = None):
    self.dataset = dataset
    self.names = names
    self.num_examples = int(num_examples)
    self.channels = int(channels)
    self.source = source
    self.cache = cache
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


# Fast PNG decoding for data.cache=False: libspng, as shipped in the `pyspng` wheel. ------------
#
# Only PNGs that `decode_image_tf` passes through untouched take this path: 8-bit RGB (colour
# type 2), not interlaced, exactly R x R, no tRNS chunk. For those, preprocessing is the identity
# on the decoded pixels, and a lossless decode is the same array whichever library inflates it, so
# the result is bit-identical to TensorFlow's. Everything else (JPEG/WebP/BMP, gray, alpha,
# palette, 16-bit, other sizes) and any image libspng refuses goes through `decode_image_tf` in the
# graph, as before. Corrupt files never get here: `decode_all` has already removed them (or
# failed) at build time, with TensorFlow's decoder.
#
# libspng is called through ctypes on the symbols of pyspng's extension module, which releases the
# GIL for the duration of each decode, so the tf.data map's parallel calls decode on every core;
# pyspng's own `load` holds the GIL (one core at most) and is the fallback if that binding fails its
# self-test. Without pyspng, everything goes through `decode_image_tf` (logged once).

USE_PYSPNG = True  # False: data.cache=False decodes every image with TensorFlow's decoder
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_SPNG_FMT_RGB8 = 4  # spng.h, enum spng_format
_SPNG_CHUNK_LIMIT = 64 << 20  # bytes of ancillary chunks libspng may store (pyspng's limit)
_SPNG_CTX_IGNORE_ADLER32 = 1  # spng.h, enum spng_ctx_flags
_SPNG_CRC_USE = 2  # spng.h, enum spng_crc_action
_SPNG: list = []  # memo of `_spng_decoder()`: empty until looked up, then [(name, fn) or None]


def _png_plain_rgb8(blob, resolution: int) -> bool:
  """Whether `blob` is a PNG that `decode_image_tf` returns exactly as decoded (see above)."""
  if not isinstance(blob, bytes) or len(blob) < 45 or blob[:8] != _PNG_SIGNATURE:
    return False
  length, kind, w, h, depth, ctype, comp, filt, lace = struct.unpack(">I4sIIBBBBB", blob[8:29])
  if (length != 13 or kind != b"IHDR" or w != resolution or h != resolution or depth != 8
      or ctype != 2 or comp or filt or lace):
    return False
  pos = 33  # chunks up to the first IDAT: none may be tRNS (colour-key transparency)
  while pos + 8 <= len(blob):
    length, kind = struct.unpack(">I4s", blob[pos:pos + 8])
    if kind == b"IDAT":
      return True
    if kind in (b"tRNS", b"IEND"):
      return False
    pos += 12 + length
  return False


def _tiny_png(pixels: np.ndarray) -> bytes:
  """An (H, W, 3) uint8 array as a minimal PNG (for the decoder self-test)."""
  import zlib  # pylint: disable=import-outside-toplevel

  def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

  h, w = pixels.shape[:2]
  rows = b"".join(b"\x00" + pixels[r].tobytes() for r in range(h))
  return (_PNG_SIGNATURE + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
          + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def _spng_ctypes(module_file: str):
  """Batch decoder on libspng's C API in pyspng's extension module (GIL released per call).

  Chunk CRCs and the zlib Adler-32 are not verified (about 8% faster): these exact bytes have
  already been decoded by TensorFlow's libpng at build time, which verifies both.
  """
  import ctypes  # pylint: disable=import-outside-toplevel

  lib = ctypes.CDLL(module_file)
  new, free = lib.spng_ctx_new, lib.spng_ctx_free
  new.restype, new.argtypes = ctypes.c_void_p, [ctypes.c_int]
  free.restype, free.argtypes = None, [ctypes.c_void_p]
  limits, source, decode = lib.spng_set_chunk_limits, lib.spng_set_png_buffer, lib.spng_decode_image
  crc = lib.spng_set_crc_action
  limits.restype, limits.argtypes = ctypes.c_int, [ctypes.c_void_p, ctypes.c_size_t,
                                                   ctypes.c_size_t]
  crc.restype, crc.argtypes = ctypes.c_int, [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
  source.restype, source.argtypes = ctypes.c_int, [ctypes.c_void_p, ctypes.c_char_p,
                                                   ctypes.c_size_t]
  decode.restype, decode.argtypes = ctypes.c_int, [ctypes.c_void_p, ctypes.c_void_p,
                                                   ctypes.c_size_t, ctypes.c_int, ctypes.c_int]

  def run(blobs: list, usable, index: list, out: np.ndarray) -> list[int]:
    failed = []
    size = out[0].nbytes if len(out) else 0
    base = out.ctypes.data
    for m, i in enumerate(index):
      ok = False
      if usable[i]:
        ctx = new(_SPNG_CTX_IGNORE_ADLER32)
        if ctx:
          try:
            blob = blobs[i]
            ok = (limits(ctx, _SPNG_CHUNK_LIMIT, _SPNG_CHUNK_LIMIT) == 0
                  and crc(ctx, _SPNG_CRC_USE, _SPNG_CRC_USE) == 0
                  and source(ctx, blob, len(blob)) == 0
                  and decode(ctx, base + m * size, size, _SPNG_FMT_RGB8, 0) == 0)
          finally:
            free(ctx)
      if not ok:
        failed.append(m)
    return failed

  return run


def _spng_load(load):
  """Batch decoder on `pyspng.load` (holds the GIL)."""

  def run(blobs: list, usable, index: list, out: np.ndarray) -> list[int]:
    failed = []
    for m, i in enumerate(index):
      try:
        x = load(blobs[i]) if usable[i] else None
      except Exception:  # pylint: disable=broad-except  (RuntimeError from libspng)
        x = None
      if x is not None and x.shape == out.shape[1:] and x.dtype == np.uint8:
        out[m] = x
      else:
        failed.append(m)
    return failed

  return run


def _spng_decoder():
  """(name, batch decoder) of the best libspng binding that passes a self-test, or None.

  A batch decoder `fn(blobs, usable, index, out) -> failed` decodes blobs[i] for i in `index`
  (where usable[i]) into out[m] (m = position in `index`) and returns the positions it did not
  decode. Looked up once per process; a missing pyspng is logged once.
  """
  if _SPNG:
    return _SPNG[0]
  found = None
  try:
    import pyspng  # pylint: disable=import-outside-toplevel
    from pyspng import _pyspng_c  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    logging.warning("pyspng is not available (%s): data.cache=False decodes PNGs with "
                    "TensorFlow's decoder (slower; pip install pyspng)", e)
  else:
    version = getattr(pyspng, "__version__", "?")
    probe = (np.arange(5 * 4 * 3, dtype=np.uint8) * 37).reshape(5, 4, 3)
    blob = _tiny_png(probe)
    candidates = []
    try:
      candidates.append((f"libspng {_pyspng_c.spng_version_string()} (pyspng {version}, ctypes, "
                         "GIL released)", _spng_ctypes(_pyspng_c.__file__)))
    except (OSError, AttributeError) as e:
      logging.info("libspng's C API is not reachable in %s (%s)", _pyspng_c.__file__, e)
    candidates.append((f"pyspng {version} (pyspng.load, holds the GIL)", _spng_load(pyspng.load)))
    for name, fn in candidates:
      out = np.zeros((1,) + probe.shape, np.uint8)
      try:
        failed = fn([blob], [True], [0], out)
      except Exception as e:  # pylint: disable=broad-except
        failed = [repr(e)]
      if not failed and np.array_equal(out[0], probe):
        found = (name, fn)
        break
      logging.warning("PNG decoder %s failed its self-test (%s); not used", name, failed)
  _SPNG.append(found)
  return found


class _PyCallGuard:
  """Keeps Python called from tf.data's threads (`tf.numpy_function`) out of interpreter exit.

  A tf.data thread that asks for the GIL once the interpreter finalizes is terminated (CPython
  3.11), and the destructor of its iterator then waits for it forever: the process hangs at exit
  whenever a pipeline with a Python function is still live and running. The atexit hook (atexit
  runs before finalization) waits until no wrapped function has run for `quiet_s`: by then every
  live pipeline has filled its buffers and stopped calling Python, as nothing consumes it any more.
  """

  def __init__(self, quiet_s: float = 0.5, timeout_s: float = 60.0):
    import atexit  # pylint: disable=import-outside-toplevel
    import threading  # pylint: disable=import-outside-toplevel
    import time  # pylint: disable=import-outside-toplevel
    self._clock, self._lock = time.monotonic, threading.Lock()
    self._active, self._last = 0, -float("inf")
    self.quiet_s, self.timeout_s = quiet_s, timeout_s
    atexit.register(self.wait_quiet)

  def wrap(self, fn):
    def guarded(*args):
      with self._lock:
        self._active += 1
      try:
        return fn(*args)
      finally:
        with self._lock:
          self._active -= 1
          self._last = self._clock()
    return guarded

  def wait_quiet(self) -> None:
    import time  # pylint: disable=import-outside-toplevel
    deadline = self._clock() + self.timeout_s
    while self._clock() < deadline:
      with self._lock:
        if not self._active and self._clock() - self._last >= self.quiet_s:
          return
      time.sleep(0.02)
    logging.warning("tf.data pipelines still call Python after %.0f s at exit; exit may hang",
                    self.timeout_s)


_PY_CALL_GUARD: list = []  # the process's one `_PyCallGuard`, created on first use


def exit_safe(fn):
  """`fn` for `tf.numpy_function` in a tf.data pipeline, such that the process can exit while the
  pipeline is live (see `_PyCallGuard`)."""
  if not _PY_CALL_GUARD:
    _PY_CALL_GUARD.append(_PyCallGuard())
  return _PY_CALL_GUARD[0].wrap(fn)


def png_decoder_name() -> str:
  """The decoder of plain R x R RGB PNGs with data.cache=False ("tensorflow" without pyspng)."""
  found = _spng_decoder() if USE_PYSPNG else None
  return found[0] if found else "tensorflow"


def _encoded_fetch(tf, blobs: list[bytes], res: int):
  found = _spng_decoder() if USE_PYSPNG else None
  usable = [_png_plain_rgb8(b, res) for b in blobs] if found else []
  if not any(usable):
    return _encoded_fetch_tf(tf, blobs, res)
  name, decode = found
  logging.info("data.cache=False: %d of %d images decoded by %s, the rest by TensorFlow",
               sum(usable), len(blobs), name)
  blobs = list(blobs)  # the only copy of the encoded bytes

  def decode_step(index):
    index = index.tolist()
    out = np.empty((len(index), res, res, 3), np.uint8)
    miss = decode(blobs, usable, index, out)
    rest = np.empty(len(miss), dtype=object)
    rest[:] = [blobs[index[m]] for m in miss]
    return out, np.asarray(miss, np.int32), rest

  def fetch(d: data_lib.SampleDraws):
    full, miss, rest = tf.numpy_function(exit_safe(decode_step), [d.index],
                                         [tf.uint8, tf.int32, tf.string], stateful=False)
    full = tf.ensure_shape(full, [None, res, res, 3])
    miss, rest = tf.ensure_shape(miss, [None]), tf.ensure_shape(rest, [None])

    def patch():  # the images libspng did not take, as `decode_image_tf` has them
      x = tf.map_fn(lambda e: decode_image_tf(e, res), rest,
                    fn_output_signature=tf.TensorSpec([res, res, 3], tf.uint8),
                    parallel_iterations=4)
      return tf.tensor_scatter_nd_update(full, miss[:, None], x)

    full = tf.cond(tf.size(miss) > 0, patch, lambda: full)
    b = tf.shape(d.index)[0]
    return data_lib.crop_patches(tf, full, tf.range(b), d.offset_i, d.offset_j, d.flip,
                                 d.size, res)

  return fetch


def _encoded_fetch_tf(tf, blobs: list[bytes], res: int):
  enc = data_lib.host_tensor(tf, np.asarray(blobs, dtype=object))

  def fetch(d: data_lib.SampleDraws):
    e = tf.gather(enc, d.index)
    full = tf.map_fn(lambda x: decode_image_tf(x, res), e,
                     fn_output_signature=tf.TensorSpec([res, res, 3], tf.uint8),
                     parallel_iterations=4)
    b = tf.shape(d.index)[0]
    return data_lib.crop_patches(tf, full, tf.range(b), d.offset_i, d.offset_j, d.flip,
                                 d.size, res)

  return fetch


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

  `data_cfg` (a ConfigDict like `cfg.data`, or a dict) holds the keys of `DATA_DEFAULTS`.
  Everything that can be checked is checked here, before the first batch: the config, the files,
  labels against `label_dim`, the host split (every bucket's global batch divisible by
  `process_count`), and every image is decoded once (corrupt ones skipped or fatal).
  Host `process_index` of `process_count` gets its contiguous 1/process_count slice of each
  global batch (see `patchdiff.data`). Elements: see `data.make_patch_dataset`.
  `channels`: the model's input channels; a source with another count is an error (None: any;
  the synthetic source makes this many, default 3).
  """
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  cfg = read_config(data_cfg, label_dim)
  res = cfg["resolution"]
  if schedule.resolution != res:
    raise ValueError(f"data.resolution={res} differs from the patch schedule's resolution "
                     f"{schedule.resolution}")
  data_lib.check_process_split(schedule, batch_size, process_index, process_count)
  label_dim = int(label_dim)
  src = cfg["source"]
  common = dict(start_step=start_step, seed=seed, label_dim=label_dim, hflip=cfg["hflip"],
                process_index=process_index, process_count=process_count)

  def check_channels(got: int, what: str) -> None:
    if channels is not None and got != channels:
      raise ValueError(f"{what} has {got} channels, but the model takes {channels} "
                       "(model.img_channels)")

  if src == "twemoji":
    check_channels(3, "the Twemoji set")
    images = data_lib.load_twemoji(res, limit=cfg["limit"], cache_dir=cfg["cache_dir"],
                                   category=cfg["twemoji_category"],
                                   subset_seed=cfg["twemoji_subset_seed"])
    ds = data_lib.make_patch_dataset(images, schedule, batch_size, total_steps, **common)
    return InputIterator(ds, len(images), 3, src, True)

  if src == "synthetic":
    c = 3 if channels is None else int(channels)
    n = cfg["limit"] or SYNTHETIC_EXAMPLES
    rng = np.random.default_rng([int(seed), 0x53594E])
    images = (0.5 * rng.standard_normal((n, res, res, c))).astype(np.float32)
    labels = rng.integers(0, label_dim, n) if cfg["labels"] else None
    ds = data_lib.make_patch_dataset(images, schedule, batch_size, total_steps, labels=labels,
                                     **common)
    return InputIterator(ds, n, c, src, True)

  if src == "latents":
    lat = load_latents(cfg["path"], res, cfg["latent_layout"], cfg["labels"], cfg["cache"],
                       cfg["limit"], scale=cfg["latent_scale"])
    check_channels(lat.channels, f"latent file {lat.path}")
    if lat.labels is not None:
      _check_labels(lat.labels, label_dim, lat.path, [f"{lat.path}[{i}]" for i in
                                                      range(len(lat.labels))])
    # Validate the rest (batch, steps) through the array checks, on a tiny stand-in.
    data_lib._validate(np.zeros((1, res, res, 1), np.float32), schedule, batch_size,  # pylint: disable=protected-access
                       total_steps, start_step, None, 0)
    ds = data_lib.build_patch_pipeline(_latent_fetch(tf, lat, res, int(seed)), len(lat.mean),
                                       res, False, schedule, batch_size, total_steps,
                                       labels=lat.labels, **common)
    return InputIterator(ds, len(lat.mean), lat.channels, src, cfg["cache"])

  if src == "folder":
    enc = scan_folder(cfg["path"], cfg["labels"], cfg["limit"])
  elif src == "zip":
    enc = scan_zip(cfg["path"], cfg["labels"], cfg["limit"])
  else:
    enc = scan_tfds(cfg, cfg["labels"])
  check_channels(3, f"data.source={src!r} (RGB images)")
  if enc.labels is not None:
    _check_labels(enc.labels, label_dim, enc.origin, enc.names)
  pixels, kept, bad = decode_all(enc, res, cfg["skip_corrupt"], keep_pixels=cfg["cache"])
  labels = enc.labels[kept] if enc.labels is not None else None
  skipped = {enc.names[i]: why for i, why in bad.items()}
  if cfg["cache"]:
    ds = data_lib.make_patch_dataset(pixels, schedule, batch_size, total_steps, labels=labels,
                                     **common)
  else:
    data_lib._validate(np.zeros((1, res, res, 3), np.uint8), schedule, batch_size,  # pylint: disable=protected-access
                       total_steps, start_step, None, 0)
    fetch = _encoded_fetch(tf, [enc.data[i] for i in kept], res)
    ds = data_lib.build_patch_pipeline(fetch, len(kept), res, True, schedule, batch_size,
                                       total_steps, labels=labels, **common)
  return InputIterator(ds, len(kept), 3, src, cfg["cache"], skipped, enc.class_names,
                       [enc.names[i] for i in kept])
