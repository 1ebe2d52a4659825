"""The containers that torch and `pickle` write, read through the restricted unpickler:
`read_archive`, `read_legacy`, `unpickle`, and `read_file`, which tells them apart by their
first bytes.

- Zip archives. `torch.save` (PyTorch >= 1.6) writes `<name>/data.pkl` plus one raw little-endian
  file per storage, `<name>/data/<key>` (`<name>` is `archive` or the file's stem), and
  TorchScript's `torch.jit.save` writes the same two kinds of record under its own `<name>/` next
  to the TorchScript source (`<name>/code/`), which is never read here.
- The legacy (non-zip) `torch.save` format: a sequence of pickles, the magic number
  0x1950a86a20f9469cfc6c, the protocol version 1001, a dict of system information, the object
  pickle, then the list of storage keys; after them, for each key in that order, the element
  count as a little-endian int64 followed by the elements' raw little-endian bytes.
- Plain pickles (`pickle.dump`), such as NVIDIA's `network-snapshot-*.pkl` (`snapshot_pkl`),
  whose storages are `torch.save` files of their own (`_read_storage_bytes`).

A zip record is read only if it is stored or deflated (as torch writes them; bzip2, LZMA and
encrypted records are refused), lies inside the file, and its uncompressed size
(`ZipInfo.file_size`) is exactly what its storage declares, or at most `PICKLE_CAP` for
`data.pkl` (`BYTEORDER_CAP` bytes for `byteorder`); it is inflated to that size and no further.
Record names may not repeat. A legacy file ends where its last storage ends.
"""
from __future__ import annotations

import io
import os
import pickletools
import zipfile
from typing import Any, BinaryIO

import numpy as np

from patchdiff.weights.pickle_scan import _scan
from patchdiff.weights.read_context import (TorchPickleError, _cut, _describe, _is_int, _Read,
                                            reading, short_repr)
from patchdiff.weights.snapshot_pkl import read_storage_bytes_with
from patchdiff.weights.unpickler import _load


PICKLE_CAP = 32 << 20  # uncompressed size of a zip archive's data.pkl
BYTEORDER_CAP = 16
_ZIP_MAGIC = b"PK\x03\x04"
LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
_LEGACY_PROTOCOL = 1001


def _unbuilt(*args, **kwargs) -> None:
  del args, kwargs


# The legacy reader's first pass over an object pickle: storages are recorded, nothing is built.
_DRY_RUN = {("torch._utils", "_rebuild_tensor_v2"): _unbuilt,
            ("torch._utils", "_rebuild_parameter"): _unbuilt,
            ("torch._utils", "_rebuild_parameter_with_state"): _unbuilt,
            ("torch.storage", "_load_from_bytes"): _unbuilt}


def _source(file: Any, source: str | None) -> str:
  if isinstance(file, (str, os.PathLike)):
    return source or os.fspath(file)
  if isinstance(file, (bytes, bytearray, memoryview)):
    return source or "<bytes>"
  return source or getattr(file, "name", "<stream>")


def _check_exists(file: Any, source: str) -> None:
  if isinstance(file, (str, os.PathLike)) and not os.path.isfile(file):
    raise FileNotFoundError(f"{source}: no such file")


def unpickle(data: bytes | BinaryIO, *, source: str = "<pickle>",
             extra_globals: dict[tuple[str, str], Any] | None = None) -> Any:
  """A plain pickle through `RestrictedUnpickler`'s restrictions, scanned first: no persistent
  ids; storages embedded with `torch.storage._load_from_bytes` are read (e.g. EDM's network
  snapshots)."""
  with reading(source):
    read = _Read(source)
    if isinstance(data, (bytes, bytearray, memoryview)):
      return _load(io.BytesIO(data), read, "the pickle", extra_globals=extra_globals)
    # The scan reads a copy in memory (a file's reads allocate what they ask for, which the scan
    # checks); the unpickler then reads the file itself.
    at = data.tell()
    _scan(io.BytesIO(data.read()), read, "the pickle")
    data.seek(at)
    return _load(data, read, "the pickle", extra_globals=extra_globals, scan=False)


def _record_prefix(names: list[str], source: str) -> str:
  """The archive's top folder: the one holding `data.pkl`."""
  tops = sorted({n[:-len("data.pkl")] for n in names
                 if n.endswith("/data.pkl") and n.count("/") == 1})
  if len(tops) != 1:
    raise TorchPickleError(f"{source}: not a torch archive: expected one <name>/data.pkl, found "
                           f"{len(tops)}" + (f" ({', '.join(_cut(t) for t in tops[:4])})"
                                             if tops else ""))
  return tops[0]


_COMPRESSION = {zipfile.ZIP_BZIP2: "bzip2", zipfile.ZIP_LZMA: "LZMA"}


def zip_records(archive: zipfile.ZipFile, source: str) -> dict[str, zipfile.ZipInfo]:
  """A zip archive's records by name; raises TorchPickleError (naming `source`) for a name that
  appears twice (`zipfile` would read the last one)."""
  records: dict[str, zipfile.ZipInfo] = {}
  for info in archive.infolist():
    if info.filename in records:
      raise TorchPickleError(f"{source}: record {_cut(info.filename)} appears twice in the "
                             "archive")
    records[info.filename] = info
  return records


def check_zip_record(info: zipfile.ZipInfo, size: int, source: str) -> None:
  """Raises TorchPickleError (naming `source`) unless the record is stored or deflated, not
  encrypted, and lies inside the `size` bytes of the file (stored: as large as it says)."""
  name = _cut(info.filename)
  if info.flag_bits & 0x1:
    raise TorchPickleError(f"{source}: record {name} is encrypted")
  if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
    method = _COMPRESSION.get(info.compress_type, f"method {info.compress_type}")
    raise TorchPickleError(f"{source}: record {name} is compressed with {method}; torch "
                           "archives hold stored or deflated records")
  if info.header_offset + info.compress_size > size or (
      info.compress_type == zipfile.ZIP_STORED and info.compress_size != info.file_size):
    raise TorchPickleError(f"{source}: record {name} claims {info.compress_size} bytes from byte "
                           f"{info.header_offset} ({info.file_size} uncompressed), beyond the "
                           f"file's {size}")


def read_archive(file: str | os.PathLike | bytes | BinaryIO, *, source: str | None = None,
                 extra_globals: dict[tuple[str, str], Any] | None = None) -> Any:
  """The object graph of a torch zip archive (`torch.save` or TorchScript format).

  `file` is a path, the archive's bytes, or a seekable binary file object. Tensors come back as
  NumPy arrays in the storage's dtype (native byte order), TorchScript modules as
  `ScriptObject`s, dicts, lists and tuples as themselves, OrderedDicts as dicts. Raises
  `TorchPickleError` (naming `source`, default the path) for damaged archives and refused
  content, FileNotFoundError for a missing path.
  """
  source = _source(file, source)
  _check_exists(file, source)
  with reading(source):
    if isinstance(file, (str, os.PathLike)):
      with open(file, "rb") as f:
        return _read_archive(f, os.fstat(f.fileno()).st_size, _Read(source), extra_globals)
    if isinstance(file, (bytes, bytearray, memoryview)):
      return _read_archive(io.BytesIO(bytes(file)), len(file), _Read(source), extra_globals)
    at = file.tell()
    size = file.seek(0, io.SEEK_END)
    file.seek(at)
    return _read_archive(file, size, _Read(source), extra_globals)


def _read_archive(file: BinaryIO, size: int, read: _Read,
                  extra_globals: dict[tuple[str, str], Any] | None) -> Any:
  """`read_archive` of a seekable file of `size` bytes."""
  source = read.source
  try:
    archive = zipfile.ZipFile(file)
  except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
    raise read.error(f"not a torch zip archive, or damaged ({_describe(e)})") from None
  with archive:
    records = zip_records(archive, source)
    prefix = _record_prefix(list(records), source)

    def record(name: str, *, exactly: int | None = None, cap: int | None = None) -> bytes:
      info = records.get(name)
      if info is None:
        raise read.error(f"record {_cut(name)} is missing")
      check_zip_record(info, size, source)
      if exactly is not None and info.file_size != exactly:
        raise read.error(f"storage {_cut(name)} holds {info.file_size} bytes; its reference "
                         f"declares {exactly}")
      if cap is not None and info.file_size > cap:
        raise read.error(f"record {_cut(name)} holds {info.file_size} bytes (at most {cap})")
      try:
        with archive.open(info) as f:
          data = f.read(info.file_size)  # inflated to the declared size, no further
      except Exception as e:  # pylint: disable=broad-except  (BadZipFile, zlib.error, EOFError)
        raise read.error(f"record {_cut(name)} is damaged ({_describe(e)})") from None
      if len(data) != info.file_size:
        raise read.error(f"record {_cut(name)} is damaged: {len(data)} bytes, its header says "
                         f"{info.file_size}")
      return data

    order = "<"
    if f"{prefix}byteorder" in records:
      byteorder = record(f"{prefix}byteorder", cap=BYTEORDER_CAP).decode("ascii", "replace")
      if byteorder.strip() not in ("little", "big"):
        raise read.error(f"unknown byte order {short_repr(byteorder)}")
      order = "<" if byteorder.strip() == "little" else ">"
    cache: dict[str, np.ndarray] = {}

    def storage(key: str, dtype: np.dtype, numel: int) -> np.ndarray:
      name = f"{prefix}data/{key}"
      if key not in cache:
        raw = record(name, exactly=numel * dtype.itemsize)
        array = np.frombuffer(raw, dtype.newbyteorder(order), count=numel)
        cache[key] = array.astype(dtype.newbyteorder("="), copy=False)
        read.add_storage(len(raw))
      array = cache[key]
      if array.dtype != dtype or array.size != numel:
        raise read.error(f"storage {_cut(name)} is read as {numel} x {dtype} and as "
                         f"{array.size} x {array.dtype}")
      return array

    pkl = record(f"{prefix}data.pkl", cap=PICKLE_CAP)
    return _load(io.BytesIO(pkl), read, f"{_cut(prefix)}data.pkl", storage=storage,
                 extra_globals=extra_globals)


def read_legacy(file: str | os.PathLike | bytes | BinaryIO, *, source: str | None = None,
                extra_globals: dict[tuple[str, str], Any] | None = None) -> Any:
  """The object graph of a file in the legacy (non-zip) `torch.save` format.

  `file` is a path, the file's bytes, or a binary file object. The storages' raw data follow the
  object pickle, and their element types and sizes are known from it only, so the object pickle
  is read twice: first with tensors left unbuilt, to record each storage's (type, size), then,
  with the storages read, for the graph. Raises `TorchPickleError` (naming `source`, default the
  path) for a wrong magic number or protocol version, damaged pickles, storages that are missing,
  short, unlisted or listed twice, bytes after the last storage, and refused content.
  """
  source = _source(file, source)
  _check_exists(file, source)
  with reading(source):
    if isinstance(file, (str, os.PathLike)):
      with open(file, "rb") as f:
        data = f.read()
    elif isinstance(file, (bytes, bytearray, memoryview)):
      data = bytes(file)
    else:
      data = file.read()
    return _read_legacy(data, _Read(source), extra_globals)


def _read_legacy(data: bytes, read: _Read,
                 extra_globals: dict[tuple[str, str], Any] | None) -> Any:
  """`read_legacy` of the file's bytes."""
  source = read.source
  stream = io.BytesIO(data)

  def header(what: str) -> Any:
    return _load(stream, read, what)

  try:
    magic = header("the magic number")
  except TorchPickleError as e:
    raise read.error(f"not a torch.save file (neither a zip archive nor the legacy format): "
                     f"{str(e)[len(source) + 2:]}") from None
  if not _is_int(magic) or magic != LEGACY_MAGIC:
    raise read.error(f"not a torch.save file (neither a zip archive nor the legacy format): its "
                     f"first pickle holds {short_repr(magic)}, not the magic number "
                     f"{LEGACY_MAGIC:#x}")
  protocol = header("the protocol version")
  if not _is_int(protocol) or protocol != _LEGACY_PROTOCOL:
    raise read.error(f"legacy torch.save protocol version {short_repr(protocol)}, expected "
                     f"{_LEGACY_PROTOCOL}")
  if not isinstance(header("the system information"), dict):
    raise read.error("the legacy torch.save header's system information is not a dict")

  specs: dict[str, tuple[np.dtype, int]] = {}

  def record(key: str, dtype: np.dtype, numel: int) -> np.ndarray:
    if specs.setdefault(key, (dtype, numel)) != (dtype, numel):
      raise TorchPickleError(f"storage {_cut(key)} is referenced as {specs[key][1]} x "
                             f"{specs[key][0]} and as {numel} x {dtype}")
    return np.empty(0, dtype)

  start = stream.tell()
  dry_run = {**(extra_globals or {}), **_DRY_RUN}
  _load(stream, read, "the object pickle", storage=record, extra_globals=dry_run)
  end = stream.tell()
  keys = header("the storage key list")
  if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
    raise read.error("the storage key list is not a list of strings")

  view, at, arrays = memoryview(data), stream.tell(), {}
  for key in keys:
    if key not in specs or key in arrays:
      raise read.error(f"storage {_cut(key)} is listed "
                       + ("twice" if key in arrays else "but no tensor references it"))
    dtype, numel = specs[key]
    if at + 8 > len(data):
      raise read.error(f"storage {_cut(key)} is missing: the file ends at byte {len(data)}")
    count = int.from_bytes(view[at:at + 8], "little", signed=True)
    if count != numel:
      raise read.error(f"storage {_cut(key)} holds {count} elements; its reference says {numel}")
    size = numel * dtype.itemsize
    if at + 8 + size > len(data):
      raise read.error(f"storage {_cut(key)} is truncated: {len(data) - at - 8} bytes, expected "
                       f"{size} ({numel} x {dtype})")
    array = np.frombuffer(view[at + 8:at + 8 + size], dtype.newbyteorder("<"), count=numel)
    arrays[key] = array.astype(dtype.newbyteorder("="), copy=False)
    read.add_storage(size)
    at += 8 + size
  unlisted = sorted(set(specs) - set(arrays))
  if unlisted:
    raise read.error(f"storage {_cut(unlisted[0])} is referenced but not in the storage key list")
  if at != len(data):
    raise read.error(f"{len(data) - at} bytes follow the last storage, which ends at byte {at}")

  def storage(key: str, dtype: np.dtype, numel: int) -> np.ndarray:
    if key not in arrays or arrays[key].dtype != dtype or arrays[key].size != numel:
      raise TorchPickleError(f"storage {_cut(key)} is read as {numel} x {dtype} and as "
                             f"{specs.get(key)}")
    return arrays[key]

  return _load(io.BytesIO(view[start:end]), read, "the object pickle", storage=storage,
               extra_globals=extra_globals, scan=False)


def _is_legacy(head: bytes) -> bool:
  """Whether `head` begins with the pickle of the legacy `torch.save` magic number."""
  try:
    for op, arg, _ in pickletools.genops(io.BytesIO(head)):
      if op.name not in ("PROTO", "FRAME"):
        return op.name.startswith("LONG") and arg == LEGACY_MAGIC
  except Exception:  # pylint: disable=broad-except  (not a pickle, or cut short)
    return False
  return False


def read_file(file: str | os.PathLike | bytes | BinaryIO, *, source: str | None = None,
              extra_globals: dict[tuple[str, str], Any] | None = None) -> Any:
  """The object graph of a file that torch or `pickle` wrote, told apart by its first bytes: a
  zip archive (`read_archive`), the legacy `torch.save` format (`read_legacy`), or a plain pickle
  (`unpickle`, e.g. EDM's `network-snapshot-*.pkl`). `file` is a path, bytes, or a seekable
  binary file object; errors are `TorchPickleError`s that name `source`, default the path (a
  missing path: FileNotFoundError)."""
  source = _source(file, source)
  _check_exists(file, source)
  if isinstance(file, (str, os.PathLike)):
    with reading(source), open(file, "rb") as f:
      return read_file(f, source=source, extra_globals=extra_globals)
  if isinstance(file, (bytes, bytearray, memoryview)):
    return read_file(io.BytesIO(bytes(file)), source=source, extra_globals=extra_globals)
  with reading(source):
    at = file.tell()
    head = file.read(64)
    file.seek(at)
    if head[:4] == _ZIP_MAGIC:
      return read_archive(file, source=source, extra_globals=extra_globals)
    if _is_legacy(head):
      return read_legacy(file, source=source, extra_globals=extra_globals)
    if not head:
      raise TorchPickleError(f"{source}: the file is empty")
    return unpickle(file, source=source, extra_globals=extra_globals)


def _read_storage_bytes(data: bytes, read: _Read) -> Any:
  """The object that `torch.storage._load_from_bytes(data)` gives: `data` is a zip archive or a
  legacy `torch.save` file, read as `read` (a nested read, on its file's budget)."""
  if data[:4] == _ZIP_MAGIC:
    return _read_archive(io.BytesIO(data), len(data), read, None)
  return _read_legacy(data, read, None)


read_storage_bytes_with(_read_storage_bytes)
