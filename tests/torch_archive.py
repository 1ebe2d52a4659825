"""Writes torch-format zip archives for tests, without torch: pickle opcodes emitted one by one.

`records(obj, prefix)` returns the archive's records (`<prefix>/data.pkl` and one raw storage per
tensor, `<prefix>/data/<key>`) for an object built from: None, bools, ints, floats, strings,
tuples, lists, dicts, NumPy arrays and `Tensor`s (tensors, each with its own storage), `Script`
(a TorchScript object: class name and attribute dict) and `Call` (any global called with
arguments, for hand-made payloads). `write_zip` stores records in a zip.
"""
from __future__ import annotations

import struct
import zipfile

import numpy as np

STORAGE_NAMES = {np.dtype(k): v for k, v in {
    "float32": "FloatStorage", "float64": "DoubleStorage", "float16": "HalfStorage",
    "int64": "LongStorage", "int32": "IntStorage", "int16": "ShortStorage", "int8": "CharStorage",
    "uint8": "ByteStorage", "bool": "BoolStorage"}.items()}


class Tensor:
  """A tensor over `storage` (1-d) with the given offset, size and stride (in elements)."""

  def __init__(self, storage, offset, size, stride, key=None):
    self.storage, self.offset = np.array(storage, order="C").ravel(), offset
    self.size, self.stride, self.key = tuple(size), tuple(stride), key


class Script:
  """An object of the TorchScript class `module.name`, with an attribute dict as its state."""

  def __init__(self, qualname: str, attributes: dict):
    self.qualname, self.attributes = qualname, attributes


class Call:
  """`module.name(*args)` in the pickle (GLOBAL + args + REDUCE)."""

  def __init__(self, module: str, name: str, args: tuple = ()):
    self.module, self.name, self.args = module, name, tuple(args)


def _global(module: str, name: str) -> bytes:
  return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


class _Writer:

  def __init__(self):
    self.out: list[bytes] = []
    self.storages: dict[str, np.ndarray] = {}

  def emit(self, obj) -> None:
    w = self.out.append
    if obj is None:
      w(b"N")
    elif obj is True or obj is False:
      w(b"\x88" if obj else b"\x89")
    elif isinstance(obj, int):
      if -2**31 <= obj < 2**31:
        w(b"J" + struct.pack("<i", obj))
      else:
        data = obj.to_bytes((obj.bit_length() + 8) // 8, "little", signed=True)
        w(b"\x8a" + bytes([len(data)]) + data)
    elif isinstance(obj, float):
      w(b"G" + struct.pack(">d", obj))
    elif isinstance(obj, str):
      data = obj.encode()
      w(b"X" + struct.pack("<I", len(data)) + data)
    elif isinstance(obj, tuple):
      w(b"(")
      for item in obj:
        self.emit(item)
      w(b"t")
    elif isinstance(obj, list):
      w(b"]")
      if obj:
        w(b"(")
        for item in obj:
          self.emit(item)
        w(b"e")
    elif isinstance(obj, dict):
      w(b"}")
      if obj:
        w(b"(")
        for k, v in obj.items():
          self.emit(k)
          self.emit(v)
        w(b"u")
    elif isinstance(obj, np.ndarray):
      a = np.array(obj, order="C")
      strides = tuple(s // a.itemsize for s in a.strides) if a.size else (1,) * a.ndim
      self.emit(Tensor(a, 0, a.shape, strides))
    elif isinstance(obj, Tensor):
      key = obj.key if obj.key is not None else str(len(self.storages))
      self.storages[key] = obj.storage
      w(_global("torch._utils", "_rebuild_tensor_v2") + b"(")
      w(b"(")
      self.emit("storage")
      w(_global("torch", STORAGE_NAMES[obj.storage.dtype]))
      self.emit(key)
      self.emit("cpu")
      self.emit(int(obj.storage.size))
      w(b"tQ")
      self.emit(obj.offset)
      self.emit(obj.size)
      self.emit(obj.stride)
      self.emit(False)
      self.emit(Call("collections", "OrderedDict"))
      w(b"tR")
    elif isinstance(obj, Script):
      module, name = obj.qualname.rsplit(".", 1)
      w(_global(module, name) + b")\x81")
      self.emit(obj.attributes)
      w(b"b")
    elif isinstance(obj, Call):
      w(_global(obj.module, obj.name))
      self.emit(obj.args)
      w(b"R")
    else:
      raise TypeError(f"cannot write {type(obj).__name__}")


def dumps(obj) -> tuple[bytes, dict[str, np.ndarray]]:
  """The protocol-2 pickle of `obj` and the storages it references (key -> flat array)."""
  writer = _Writer()
  writer.out.append(b"\x80\x02")
  writer.emit(obj)
  writer.out.append(b".")
  return b"".join(writer.out), writer.storages


def records(obj, prefix: str = "archive") -> dict[str, bytes]:
  """The records of a torch zip archive holding `obj` (storages little-endian)."""
  pkl, storages = dumps(obj)
  out = {f"{prefix}/data.pkl": pkl}
  for key, array in storages.items():
    out[f"{prefix}/data/{key}"] = array.astype(array.dtype.newbyteorder("<")).tobytes()
  return out


def write_zip(path, recs: dict[str, bytes]) -> None:
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
    for name, data in recs.items():
      z.writestr(name, data)
