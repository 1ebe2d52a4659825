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
Each source is listed before any image is read (`list_source` -> `Listing`: count, labels, a
fingerprint; a zip's central directory is read by `ZipIndex` into numpy arrays) and read a range
of examples at a time (`Listing.read(lo, hi)`); `scan` reads them all.

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

import array
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


def _names_array(names: list[bytes]) -> np.ndarray:
  """UTF-8 names as one fixed-width bytes array: a few tens of bytes per name, where a list holds
  a Python object of ~100 bytes each. Sorting it sorts by code point, as sorting the strings."""
  return np.asarray(names, dtype=np.bytes_) if names else np.zeros(0, dtype="S1")


def _decoded(name: bytes) -> str:
  return bytes(name).decode("utf-8", "surrogateescape")


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


# The zip records `ZipIndex` reads (the layouts of Python's zipfile module).
_ZIP_END = struct.Struct("<4s4H2LH")            # end of central directory
_ZIP64_LOCATOR = struct.Struct("<4sLQL")        # zip64 end of central directory locator
_ZIP64_END = struct.Struct("<4sQ2H2L4Q")        # zip64 end of central directory
_ZIP_CENTRAL = struct.Struct("<4s4B4HL2L5H2L")  # central directory entry
_ZIP_LOCAL = struct.Struct("<4s2B4HL2L2H")      # local file header


class ZipIndex:
  """The members of a zip archive, listed from its central directory into two numpy arrays (some
  tens of bytes per member; `zipfile.ZipFile` keeps a ZipInfo object of ~600 bytes per member) and
  read one at a time: stored and deflated members directly, their size and CRC-32 checked, other
  compression methods through `zipfile`. Reads zip64 archives and archives with data prepended.

  `names`: (M,) UTF-8 member names, sorted (a name entered twice counts once, its last entry, as
  `zipfile` reads it); `table`: (M, 6) int64 local header offset, compressed size, size, CRC-32,
  compression method, flags.
  """

  def __init__(self, path, keep: Callable[[str], bool]):
    """Indexes the members of `path` whose name passes `keep`."""
    self.path = Path(path)
    names: list[bytes] = []
    rows = array.array("q")
    with open(self.path, "rb") as f:
      count, cd_offset = self._end_record(f)
      f.seek(cd_offset)
      buf, at = b"", 0
      for _ in range(count):
        if len(buf) - at < _ZIP_CENTRAL.size + 0x30000:  # an entry's fixed part + 3 x 64 KiB
          buf, at = buf[at:] + f.read(1 << 22), 0
        if buf[at:at + 4] != b"PK\x01\x02" or len(buf) - at < _ZIP_CENTRAL.size:
          raise zipfile.BadZipFile("Bad magic number for central directory")
        (_, _, _, _, _, flags, method, _, _, crc, csize, size, name_len, extra_len, comment_len,
         _, _, _, offset) = _ZIP_CENTRAL.unpack_from(buf, at)
        at += _ZIP_CENTRAL.size
        raw, extra = buf[at:at + name_len], buf[at + name_len:at + name_len + extra_len]
        at += name_len + extra_len + comment_len
        name = raw.decode("utf-8" if flags & 0x800 else "cp437")
        if not keep(name):
          continue
        if 0xFFFFFFFF in (size, csize, offset):
          size, csize, offset = self._zip64_sizes(extra, size, csize, offset)
        names.append(name.encode("utf-8", "surrogateescape"))
        rows.extend((offset + self._concat, csize, size, crc, method, flags))
    encoded = _names_array(names)
    table = np.frombuffer(rows, dtype=np.int64).reshape(-1, 6)
    del names, rows
    # np.unique sorts and keeps the first of equal names: of the reversed list, the last entry.
    self.names, first = np.unique(encoded[::-1], return_index=True)
    self.table = table[len(encoded) - 1 - first]
    self._zipfile: zipfile.ZipFile | None = None

  def _end_record(self, f) -> tuple[int, int]:
    """(number of entries, file offset of the central directory); sets `_concat`, the number of
    bytes prepended to the archive."""
    f.seek(0, os.SEEK_END)
    file_size = f.tell()
    tail_size = min(file_size, _ZIP_END.size + 0xFFFF)  # the record, then a comment < 64 KiB
    f.seek(file_size - tail_size)
    tail = f.read(tail_size)
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or at + _ZIP_END.size > len(tail):
      raise zipfile.BadZipFile("File is not a zip file")
    _, _, _, _, count, cd_size, cd_offset, _ = _ZIP_END.unpack_from(tail, at)
    end = file_size - tail_size + at  # where the end record starts
    loc = end - _ZIP64_LOCATOR.size
    if loc >= _ZIP64_END.size:
      f.seek(loc)
      if f.read(4) == b"PK\x06\x07":
        f.seek(loc - _ZIP64_END.size)
        record = f.read(_ZIP64_END.size)
        if record[:4] != b"PK\x06\x06":
          raise zipfile.BadZipFile("Bad magic number for zip64 end of central directory")
        _, _, _, _, _, _, _, count, cd_size, cd_offset = _ZIP64_END.unpack(record)
        end = loc - _ZIP64_END.size
    self._concat = end - cd_size - cd_offset
    if self._concat < 0:
      raise zipfile.BadZipFile("central directory offset out of range")
    return count, cd_offset + self._concat

  @staticmethod
  def _zip64_sizes(extra: bytes, size: int, csize: int, offset: int) -> tuple[int, int, int]:
    at = 0
    while at + 4 <= len(extra):
      tag, length = struct.unpack_from("<HH", extra, at)
      if tag == 1:  # zip64: the 64-bit values of the fields that hold 0xFFFFFFFF, in this order
        values = list(struct.unpack_from(f"<{length // 8}Q", extra, at + 4))
        try:
          if size == 0xFFFFFFFF:
            size = values.pop(0)
          if csize == 0xFFFFFFFF:
            csize = values.pop(0)
          if offset == 0xFFFFFFFF:
            offset = values.pop(0)
        except IndexError as e:
          raise zipfile.BadZipFile("corrupt zip64 extra field") from e
        return size, csize, offset
      at += 4 + length
    return size, csize, offset

  def __len__(self) -> int:
    return len(self.names)

  def find(self, name: str) -> int:
    """The index of member `name`, or -1."""
    key = name.encode("utf-8", "surrogateescape")
    i = int(np.searchsorted(self.names, key))
    return i if i < len(self.names) and self.names[i] == key else -1

  def read(self, i: int, f=None) -> bytes:
    """Member i's bytes. `f`: the archive, open for reading (else it is opened). A damaged member
    raises as `zipfile.ZipFile.read` does (zipfile.BadZipFile, zlib.error, EOFError)."""
    offset, csize, size, crc, method, flags = (int(v) for v in self.table[i])
    name = _decoded(self.names[i])
    if method not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED) or flags & 0x1:
      if self._zipfile is None:  # rare: bzip2, lzma, encrypted
        self._zipfile = zipfile.ZipFile(self.path)
      return self._zipfile.read(name)
    if f is None:
      with open(self.path, "rb") as g:
        return self.read(i, g)
    f.seek(offset)
    head = f.read(_ZIP_LOCAL.size)
    if len(head) < _ZIP_LOCAL.size or head[:4] != b"PK\x03\x04":
      raise zipfile.BadZipFile(f"Bad magic number for file header of {name!r}")
    name_len, extra_len = _ZIP_LOCAL.unpack(head)[-2:]
    f.seek(name_len + extra_len, os.SEEK_CUR)
    data = f.read(csize)
    if len(data) < csize:
      raise EOFError(f"{name!r} is truncated")
    if method == zipfile.ZIP_DEFLATED:
      d = zlib.decompressobj(-15)
      data = d.decompress(data) + d.flush()
    if len(data) != size or zlib.crc32(data) != crc:
      raise zipfile.BadZipFile(f"Bad CRC-32 for file {name!r}")
    return data


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


def load_image(path, size: int) -> np.ndarray:
  """An image file as (size, size, 3) uint8, preprocessed exactly as training images are."""
  with open(path, "rb") as f:
    return np.asarray(decode_image_tf(f.read(), size))


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
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  ds = t.builder.as_dataset(split=split, shuffle_files=False,
                            decoders={t.keys[0]: tfds.decode.SkipDecoding()})
  ds = ds.map(lambda ex: {k: ex[k] for k in t.keys})
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
