"""`ZipIndex`: a zip archive's members listed from its central directory into numpy arrays and
read one at a time, so that a dataset_tool zip of millions of images costs tens of bytes per image
to list."""
from __future__ import annotations

import array
import os
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Callable

import numpy as np

def _names_array(names: list[bytes]) -> np.ndarray:
  """UTF-8 names as one fixed-width bytes array: a few tens of bytes per name, where a list holds
  a Python object of ~100 bytes each. Sorting it sorts by code point, as sorting the strings."""
  return np.asarray(names, dtype=np.bytes_) if names else np.zeros(0, dtype="S1")


def _decoded(name: bytes) -> str:
  return bytes(name).decode("utf-8", "surrogateescape")


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
