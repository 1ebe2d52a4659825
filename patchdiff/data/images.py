"""Image sources (folder, dataset_tool zip, TFDS) as encoded bytes, their one decoder, and the
per-step fetch of the uncached mode.

Sources:
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

Preprocessing, one TensorFlow function `decode_image_tf` used by both cache modes, so that they
produce bit-identical pixels:
  decode (`tf.io.decode_image`: PNG incl. 16-bit and palette, JPEG, WebP, BMP, GIF first frame)
  -> grayscale to 3 channels; alpha (RGBA, gray+alpha) composited on white:
     rint(rgb * a/255 + 255 * (1 - a/255)) in float32 -> uint8
  -> centre crop to a square of side min(H, W) (top/left offsets (H-side)//2, (W-side)//2)
  -> if side != R: `tf.image.resize(method="lanczos3", antialias=True)` (Lanczos-3 scaled by the
     resize factor when shrinking, as PIL's LANCZOS; the results agree with PIL up to rounding,
     they are not bit-identical), rounded half-to-even, clipped to [0, 255] -> uint8 (R, R, 3).

Cache modes (`data.cache`): True decodes every image once at build time (tf.data, parallel) into
an (N, R, R, 3) uint8 array in memory. False keeps only the encoded bytes and decodes each step's
samples: plain R x R 8-bit RGB PNGs (what dataset_tool writes) by `png.decoder()` with the GIL
released, everything else by `decode_image_tf` in the graph, the same pixels either way. The build
still decodes every image once to find corrupt files, so that no error can surface mid-training.

Bad input: an image that cannot be read or decoded is skipped, counted and logged (absl warning
with its path and the decoder's message), or raises a ValueError naming it when
`skip_corrupt=False`; never a zero image. Structural problems (empty folder, zip without images,
dataset.json naming a missing file or missing an image, labels out of range) raise ValueError
naming the file, at build time.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import zipfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from absl import logging

from patchdiff.data import pipeline, png

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclasses.dataclass
class Encoded:
  """Encoded images of a source, in source order (before decoding)."""
  names: list[str]                   # path (or other locator) of every example, for messages
  data: list[bytes | None]           # encoded bytes, None where the file could not be read
  errors: dict[int, str]             # example -> why it could not be read
  labels: np.ndarray | None = None   # (N,) int64 class ids
  class_names: list[str] | None = None
  origin: str = ""


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


def scan(cfg: Mapping[str, Any]) -> Encoded:
  """The encoded images of a filled data config's source (folder, zip or tfds)."""
  path = cfg["path"] and Path(os.fspath(cfg["path"])).expanduser()
  src = cfg["source"]
  if src in ("folder", "zip") and not path:
    raise ValueError(f"data.source={src!r} needs data.path")
  if src == "folder":
    if not path.is_dir():
      raise ValueError(f"data.path {path} is not a folder (data.source='folder')")
    return scan_folder(path, cfg["labels"], cfg["limit"])
  if src == "zip":
    if not path.is_file():
      raise ValueError(f"data.path {path} is not a file (data.source='zip')")
    return scan_zip(path, cfg["labels"], cfg["limit"])
  if src != "tfds":
    raise ValueError(f"data.source={src!r} holds no images")
  if not cfg["tfds_name"] and not path:
    raise ValueError("data.source='tfds' needs data.tfds_name (a dataset name) or data.path "
                     "(a prepared TFDS directory)")
  if path and not cfg["tfds_name"] and not path.is_dir():
    raise ValueError(f"data.path {path} is not a prepared TFDS directory")
  return scan_tfds(cfg, cfg["labels"])


def load_image(path, size: int) -> np.ndarray:
  """An image file as (size, size, 3) uint8, preprocessed exactly as training images are."""
  with open(path, "rb") as f:
    return np.asarray(decode_image_tf(f.read(), size))


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
    blobs = pipeline.host_tensor(tf, np.asarray([enc.data[i] for i in readable], dtype=object))
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


def encoded_fetch(blobs: list[bytes], res: int):
  """The pipeline's `fetch` for data.cache=False: each step decodes its samples' images."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  found = png.decoder() if png.ENABLED else None
  usable = [png.plain_rgb8(b, res) for b in blobs] if found else []
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

  def fetch(d: pipeline.SampleDraws):
    full, miss, rest = tf.numpy_function(pipeline.exit_safe(decode_step), [d.index],
                                         [tf.uint8, tf.int32, tf.string], stateful=False)
    full = tf.ensure_shape(full, [None, res, res, 3])
    miss, rest = tf.ensure_shape(miss, [None]), tf.ensure_shape(rest, [None])

    def patch():  # the images the fast decoder did not take, as `decode_image_tf` has them
      x = tf.map_fn(lambda e: decode_image_tf(e, res), rest,
                    fn_output_signature=tf.TensorSpec([res, res, 3], tf.uint8),
                    parallel_iterations=4)
      return tf.tensor_scatter_nd_update(full, miss[:, None], x)

    full = tf.cond(tf.size(miss) > 0, patch, lambda: full)
    b = tf.shape(d.index)[0]
    return pipeline.crop_patches(tf, full, tf.range(b), d.offset_i, d.offset_j, d.flip,
                                 d.size, res)

  return fetch


def _encoded_fetch_tf(tf, blobs: list[bytes], res: int):
  enc = pipeline.host_tensor(tf, np.asarray(blobs, dtype=object))

  def fetch(d: pipeline.SampleDraws):
    e = tf.gather(enc, d.index)
    full = tf.map_fn(lambda x: decode_image_tf(x, res), e,
                     fn_output_signature=tf.TensorSpec([res, res, 3], tf.uint8),
                     parallel_iterations=4)
    b = tf.shape(d.index)[0]
    return pipeline.crop_patches(tf, full, tf.range(b), d.offset_i, d.offset_j, d.flip,
                                 d.size, res)

  return fetch
