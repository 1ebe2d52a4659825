"""Image sources (folder, dataset_tool zip, TFDS) listed and read as encoded bytes; decoding is
`decode.py`'s job, the per-step fetch of the uncached mode `uncached.py`'s.

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
Each source is listed before any image is read (`list_source` -> `Listing`: count, labels, a
fingerprint; a zip's central directory is read by `ZipIndex` into numpy arrays) and read a range
of examples at a time (`Listing.read(lo, hi)`); `scan` reads them all.

Bad input: an image that cannot be read or decoded is skipped, counted and logged (absl warning
with its path and the decoder's message), or raises a ValueError naming it when
`skip_corrupt=False`; never a zero image. Structural problems (empty folder, zip without images,
dataset.json naming a missing file or missing an image, labels out of range) raise ValueError
naming the file, at build time.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from patchdiff.data import pipeline
from patchdiff.data.zip_index import ZipIndex, _decoded, _names_array

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


@dataclasses.dataclass
class Listing:
  """A source's examples, listed but not read: `read(lo, hi)` reads examples [lo, hi) in source
  order as `Encoded` (their labels included), so that a dataset can be read a part at a time.

  `fingerprint`: a SHA-256 hex digest of what the listing found (zip: the name, size and CRC-32 of
  every image member; folder: every relative path; TFDS: dataset, split, version and count), which
  tells two sources apart without reading their images.
  """
  size: int
  origin: str
  fingerprint: str
  read: Callable[[int, int], Encoded]
  class_names: list[str] | None = None

  def __len__(self) -> int:
    return self.size


def _fingerprint(*arrays: np.ndarray) -> str:
  h = hashlib.sha256()
  for a in arrays:
    h.update(str((a.dtype.str, a.shape)).encode())
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


def list_folder(path, use_labels: bool = False, limit: int | None = None) -> Listing:
  """Image files under `path` (recursive), sorted by relative path; labels = first subfolder."""
  root = Path(path)
  if not root.is_dir():
    raise ValueError(f"{root} is not a folder")
  found: list[bytes] = []
  for top, _, files in os.walk(root):
    rel = Path(top).relative_to(root).as_posix()
    for f in files:
      if (os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS
          and os.path.isfile(os.path.join(top, f))):
        found.append((f if rel == "." else f"{rel}/{f}").encode("utf-8", "surrogateescape"))
  if not found:
    raise ValueError(f"folder {root} contains no images (searched recursively for "
                     f"{', '.join(IMAGE_EXTENSIONS)})")
  names = np.sort(_names_array(found))
  del found
  labels = class_names = None
  if use_labels:
    parts = [_decoded(n).split("/", 1) for n in names]
    loose = [i for i, p in enumerate(parts) if len(p) < 2]
    if loose:
      raise ValueError(f"{root / _decoded(names[loose[0]])} lies directly in {root}, not in a "
                       f"class subfolder; with data.labels=True every image must be in one "
                       f"({len(loose)} such files)")
    class_names = sorted({p[0] for p in parts})
    ids = {c: i for i, c in enumerate(class_names)}
    labels = np.asarray([ids[p[0]] for p in parts], dtype=np.int64)
    del parts
  if limit is not None:
    names = names[:int(limit)]
    labels = labels[:int(limit)] if labels is not None else None

  def read(lo: int, hi: int) -> Encoded:
    files = [root / _decoded(n) for n in names[lo:hi]]
    blobs, errors = _read_files(files)
    return Encoded([str(p) for p in files], blobs, errors,
                   None if labels is None else labels[lo:hi], class_names, origin=str(root))

  return Listing(len(names), str(root), _fingerprint(names), read, class_names)


def _zip_labels(index: ZipIndex, path: Path, names: np.ndarray) -> np.ndarray:
  """The class id of every image `names` (sorted) from the archive's dataset.json."""
  where = f"{path}:dataset.json"
  at = index.find("dataset.json")
  if at < 0:
    raise ValueError(f"zip archive {path} has no dataset.json, but data.labels=True")
  try:
    meta = json.loads(index.read(at))
  except (ValueError, zipfile.BadZipFile, zlib.error, OSError, EOFError) as e:
    raise ValueError(f"{where} cannot be read as JSON: {e}") from e
  entries = meta.get("labels") if isinstance(meta, dict) else None
  if entries is None:
    raise ValueError(f"{where} has no labels (\"labels\" is null or missing), but "
                     "data.labels=True")
  if not isinstance(entries, list):
    raise ValueError(f"{where}: \"labels\" must be a list of [file name, class id] pairs")
  files, values = [], []
  for entry in entries:
    if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[0], str)):
      raise ValueError(f"{where}: entry {entry!r} is not a [file name, class id] pair")
    fname, lab = entry[0].replace("\\", "/"), entry[1]
    if isinstance(lab, bool) or not isinstance(lab, int):
      raise ValueError(f"{where}: label {lab!r} of {fname} is not an integer class id "
                       "(only class-id labels are supported)")
    files.append(fname.encode("utf-8", "surrogateescape"))
    values.append(lab)
  del meta, entries
  files = _names_array(files)
  at = np.minimum(np.searchsorted(names, files), len(names) - 1)
  named = names[at] == files
  if not named.all():
    first = int(np.argmin(named))
    raise ValueError(f"{where} names {_decoded(files[first])!r}, which is not an image in the "
                     "archive")
  # A file named twice takes its last label: the first of each in the reversed list.
  where_rev, last = np.unique(at[::-1], return_index=True)
  labels = np.zeros(len(names), dtype=np.int64)
  labels[where_rev] = np.asarray(values, dtype=np.int64)[::-1][last]
  unlabelled = np.setdiff1d(np.arange(len(names)), where_rev)
  if unlabelled.size:
    raise ValueError(f"{where} has no label for {_decoded(names[unlabelled[0]])!r} "
                     f"({unlabelled.size} images without labels)")
  return labels


def list_zip(path, use_labels: bool = False, limit: int | None = None) -> Listing:
  """The image members of a dataset_tool zip in sorted order, labels from its dataset.json."""
  path = Path(path)
  try:
    index = ZipIndex(path, lambda n: n == "dataset.json" or (
        not n.endswith("/") and os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS))
  except (zipfile.BadZipFile, OSError, struct.error, UnicodeDecodeError) as e:
    raise ValueError(f"{path} is not a readable zip archive: {e}") from e
  members = np.flatnonzero(index.names != b"dataset.json")
  if not members.size:
    raise ValueError(f"zip archive {path} contains no images (looked for "
                     f"{', '.join(IMAGE_EXTENSIONS)})")
  labels = _zip_labels(index, path, index.names[members]) if use_labels else None
  if limit is not None:
    members = members[:int(limit)]
    labels = labels[:int(limit)] if labels is not None else None

  def read(lo: int, hi: int) -> Encoded:
    blobs: list[bytes | None] = []
    errors: dict[int, str] = {}
    with open(path, "rb") as f:
      for j, m in enumerate(members[lo:hi]):
        try:
          blobs.append(index.read(int(m), f))
        except Exception as e:  # pylint: disable=broad-except  (bad CRC, truncation, zlib.error)
          blobs.append(None)
          errors[j] = f"unreadable zip member: {type(e).__name__}: {e}"
    return Encoded([f"{path}:{_decoded(index.names[m])}" for m in members[lo:hi]], blobs, errors,
                   None if labels is None else labels[lo:hi], origin=str(path))

  return Listing(len(members), str(path),
                 _fingerprint(index.names[members], index.table[members][:, 2:4]), read)


def list_source(cfg: Mapping[str, Any]) -> Listing:
  """The listed (not yet read) images of a filled data config's source (folder, zip or tfds)."""
  path = cfg["path"] and Path(os.fspath(cfg["path"])).expanduser()
  src = cfg["source"]
  if src in ("folder", "zip") and not path:
    raise ValueError(f"data.source={src!r} needs data.path")
  if src == "folder":
    if not path.is_dir():
      raise ValueError(f"data.path {path} is not a folder (data.source='folder')")
    return list_folder(path, cfg["labels"], cfg["limit"])
  if src == "zip":
    if not path.is_file():
      raise ValueError(f"data.path {path} is not a file (data.source='zip')")
    return list_zip(path, cfg["labels"], cfg["limit"])
  if src != "tfds":
    raise ValueError(f"data.source={src!r} holds no images")
  return list_tfds(cfg, cfg["labels"])


def scan_folder(path, use_labels: bool = False, limit: int | None = None) -> Encoded:
  """Every image of `list_folder`, read."""
  listing = list_folder(path, use_labels, limit)
  return listing.read(0, len(listing))


def scan_zip(path, use_labels: bool = False, limit: int | None = None) -> Encoded:
  """Every image of `list_zip`, read."""
  listing = list_zip(path, use_labels, limit)
  return listing.read(0, len(listing))


def scan(cfg: Mapping[str, Any]) -> Encoded:
  """The encoded images of a filled data config's source (folder, zip or tfds)."""
  if cfg["source"] == "tfds":
    _check_tfds_config(cfg)
    return scan_tfds(cfg, cfg["labels"])
  listing = list_source(cfg)
  return listing.read(0, len(listing))


def _check_tfds_config(cfg: Mapping[str, Any]) -> None:
  path = cfg["path"] and Path(os.fspath(cfg["path"])).expanduser()
  if not cfg["tfds_name"] and not path:
    raise ValueError("data.source='tfds' needs data.tfds_name (a dataset name) or data.path "
                     "(a prepared TFDS directory)")
  if path and not cfg["tfds_name"] and not path.is_dir():
    raise ValueError(f"data.path {path} is not a prepared TFDS directory")


@dataclasses.dataclass
class _TfdsSplit:
  builder: Any
  where: str
  split: str
  keys: list[str]          # the image feature, then the label feature if labels are used
  class_names: list[str] | None


def _open_tfds(cfg: Mapping[str, Any], use_labels: bool) -> _TfdsSplit:
  """The TFDS builder and split of `cfg`, its features checked. Nothing is downloaded unless
  cfg['tfds_download']."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  name = cfg["tfds_name"]
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
  return _TfdsSplit(builder, where, split, keys, class_names)


def _read_tfds(t: _TfdsSplit, split: str, limit: int | None = None
               ) -> tuple[list[bytes], np.ndarray | None]:
  """The encoded images (and labels) of `split` (a split name or a slice of one, "train[0:8]")."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  ds = t.builder.as_dataset(split=split, shuffle_files=False,
                            decoders={t.keys[0]: tfds.decode.SkipDecoding()})
  ds = ds.map(pipeline.as_written(tf, lambda ex: {k: ex[k] for k in t.keys}))
  if limit is not None:
    ds = ds.take(int(limit))
  blobs: list[bytes] = []
  labels: list[np.ndarray] = []
  for batch in ds.batch(1024).as_numpy_iterator():
    blobs.extend(bytes(b) for b in batch[t.keys[0]])
    if len(t.keys) > 1:
      labels.append(np.asarray(batch[t.keys[1]], dtype=np.int64))
  lab = (np.concatenate(labels) if labels else np.zeros(0, np.int64)) if len(t.keys) > 1 else None
  return blobs, lab


def list_tfds(cfg: Mapping[str, Any], use_labels: bool = False) -> Listing:
  """A TFDS split, listed: each `read(lo, hi)` reads the split's slice [lo:hi]."""
  _check_tfds_config(cfg)
  t = _open_tfds(cfg, use_labels)
  n = int(t.builder.info.splits[t.split].num_examples)
  if cfg["limit"] is not None:
    n = min(n, int(cfg["limit"]))
  if not n:
    raise ValueError(f"{t.where} split {t.split!r} is empty")

  def read(lo: int, hi: int) -> Encoded:
    blobs, labels = _read_tfds(t, f"{t.split}[{lo}:{hi}]")
    if len(blobs) != hi - lo:
      raise ValueError(f"{t.where} split {t.split!r}[{lo}:{hi}] holds {len(blobs)} examples, "
                       f"expected {hi - lo}")
    return Encoded([f"{t.where}[{t.split}][{i}]" for i in range(lo, hi)], blobs, {}, labels,
                   t.class_names, origin=t.where)

  version = str(t.builder.info.version)
  digest = hashlib.sha256(f"{t.where}[{t.split}] {version} {n}".encode()).hexdigest()
  return Listing(n, t.where, digest, read, t.class_names)


def scan_tfds(cfg: Mapping[str, Any], use_labels: bool = False) -> Encoded:
  """A TFDS split, images kept encoded. Nothing is downloaded unless cfg['tfds_download']."""
  t = _open_tfds(cfg, use_labels)
  blobs, labels = _read_tfds(t, t.split, cfg["limit"])
  if not blobs:
    raise ValueError(f"{t.where} split {t.split!r} is empty")
  names = [f"{t.where}[{t.split}][{i}]" for i in range(len(blobs))]
  return Encoded(names, blobs, {}, labels, t.class_names, origin=t.where)
