"""Writes torch-format files for tests, without torch: pickle opcodes emitted one by one.

`records(obj, prefix)` returns the archive's records (`<prefix>/data.pkl` and one raw storage per
tensor, `<prefix>/data/<key>`) for an object built from: None, bools, ints, floats, strings,
bytes, tuples, lists, dicts, sets, NumPy arrays and `Tensor`s (tensors, each with its own
storage), `Storage` (a bare storage), `View` (a tensor over any storage expression, e.g. a
`torch.storage._load_from_bytes` call), `Script` (an object rebuilt by NEWOBJ and BUILD: class
name and attribute dict), `Call` (any global called with arguments, for hand-made payloads),
`Global` (a global itself, uncalled) and `Shared` (one object pickled once and referenced again
through the memo). `write_zip` stores records in a zip; `legacy_save` writes the legacy (non-zip)
`torch.save` format; `dumps` a plain pickle.
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


class Storage:
  """A bare storage, as `torch.save(storage)` pickles it: its persistent id only."""

  def __init__(self, array, key=None):
    self.array, self.key = np.array(array, order="C").ravel(), key


class View:
  """`_rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())` where `storage` is
  any pickled expression (a `Shared` `_load_from_bytes` call, say)."""

  def __init__(self, storage, offset, size, stride):
    self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)


class Shared:
  """`obj`, pickled where this object first occurs and fetched from the memo where it recurs."""

  def __init__(self, obj):
    self.obj = obj


class Script:
  """An object of the class `module.name` rebuilt by NEWOBJ (no arguments) and BUILD with an
  attribute dict: a TorchScript object, or a pickled `torch.nn` module."""

  def __init__(self, qualname: str, attributes: dict):
    self.qualname, self.attributes = qualname, attributes


class Global:
  """The global `module.name` itself (GLOBAL), not called."""

  def __init__(self, module: str, name: str):
    self.module, self.name = module, name


class Call:
  """`module.name(*args)` in the pickle (GLOBAL + args + REDUCE)."""

  def __init__(self, module: str, name: str, args: tuple = ()):
    self.module, self.name, self.args = module, name, tuple(args)


class Reduce:
  """An object whose (plain) pickle calls `func(*args)` on load: a payload for refusal tests."""

  def __init__(self, func, *args):
    self.func, self.args = func, args

  def __reduce__(self):
    return self.func, self.args


def _global(module: str, name: str) -> bytes:
  return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


class _Writer:

  def __init__(self, legacy: bool = False):
    self.out: list[bytes] = []
    self.storages: dict[str, np.ndarray] = {}
    self.legacy = legacy  # persistent ids with the legacy format's sixth item (None)
    self.memo: dict[int, int] = {}

  def storage_pid(self, array: np.ndarray, key) -> None:
    key = key if key is not None else str(len(self.storages))
    self.storages[key] = array
    self.out.append(b"(")
    self.emit("storage")
    self.out.append(_global("torch", STORAGE_NAMES[array.dtype]))
    self.emit(key)
    self.emit("cpu")
    self.emit(int(array.size))
    if self.legacy:
      self.out.append(b"N")
    self.out.append(b"tQ")

  def rebuild_tensor(self, emit_storage, t) -> None:
    """`torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())`
    of `t` (offset, size, stride), its storage written by `emit_storage()`."""
    self.out.append(_global("torch._utils", "_rebuild_tensor_v2") + b"(")
    emit_storage()
    for value in (t.offset, t.size, t.stride, False, Call("collections", "OrderedDict")):
      self.emit(value)
    self.out.append(b"tR")

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
    elif isinstance(obj, bytes):
      w(b"B" + struct.pack("<I", len(obj)) + obj)
    elif isinstance(obj, (set, frozenset)):
      w(b"\x8f")
      if obj:
        w(b"(")
        for item in sorted(obj):
          self.emit(item)
        w(b"\x90")
    elif isinstance(obj, Shared):
      if id(obj) in self.memo:
        w(b"j" + struct.pack("<I", self.memo[id(obj)]))
      else:
        self.emit(obj.obj)
        self.memo[id(obj)] = len(self.memo)
        w(b"r" + struct.pack("<I", self.memo[id(obj)]))
    elif isinstance(obj, Storage):
      self.storage_pid(obj.array, obj.key)
    elif isinstance(obj, View):
      self.rebuild_tensor(lambda: self.emit(obj.storage), obj)
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
      self.rebuild_tensor(lambda: self.storage_pid(obj.storage, obj.key), obj)
    elif isinstance(obj, Script):
      module, name = obj.qualname.rsplit(".", 1)
      w(_global(module, name) + b")\x81")
      self.emit(obj.attributes)
      w(b"b")
    elif isinstance(obj, Global):
      w(_global(obj.module, obj.name))
    elif isinstance(obj, Call):
      w(_global(obj.module, obj.name))
      self.emit(obj.args)
      w(b"R")
    else:
      raise TypeError(f"cannot write {type(obj).__name__}")


def dumps(obj, legacy: bool = False) -> tuple[bytes, dict[str, np.ndarray]]:
  """The protocol-2 pickle of `obj` and the storages it references (key -> flat array)."""
  writer = _Writer(legacy)
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


LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
SYS_INFO = {"protocol_version": 1001, "little_endian": True,
            "type_sizes": {"short": 2, "int": 4, "long": 4}}


def legacy_save(obj, *, magic: int = LEGACY_MAGIC, protocol: int = 1001) -> bytes:
  """`torch.save(obj, _use_new_zipfile_serialization=False)`: the magic number, protocol version
  and system information pickles, the object pickle, the storage key list, then each storage as
  its element count (little-endian int64) and its little-endian bytes."""
  pkl, storages = dumps(obj, legacy=True)
  parts = [dumps(magic)[0], dumps(protocol)[0], dumps(SYS_INFO)[0], pkl, dumps(list(storages))[0]]
  for array in storages.values():
    parts += [struct.pack("<q", array.size), array.astype(array.dtype.newbyteorder("<")).tobytes()]
  return b"".join(parts)
