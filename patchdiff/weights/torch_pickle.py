"""Reads files that PyTorch writes, without torch and without running anything from the file.

Three containers, one pickle vocabulary:

- Zip archives. `torch.save` (PyTorch >= 1.6) writes `<name>/data.pkl` plus one raw little-endian
  file per storage, `<name>/data/<key>` (`<name>` is `archive` or the file's stem), and
  TorchScript's `torch.jit.save` writes the same two kinds of record under its own `<name>/` next
  to the TorchScript source (`<name>/code/`), which is never read here.
- The legacy (non-zip) `torch.save` format: a sequence of pickles, the magic number
  0x1950a86a20f9469cfc6c, the protocol version 1001, a dict of system information, the object
  pickle, then the list of storage keys; after them, for each key in that order, the element
  count as a little-endian int64 followed by the elements' raw little-endian bytes.
- Plain pickles (`pickle.dump`), such as the `network-snapshot-*.pkl` files of NVIDIA's EDM
  training loop: `dict(ema=<network>, loss_fn=..., augment_pipe=..., dataset_kwargs=...)`. A
  tensor's storage there is `torch.storage._load_from_bytes(b)`, where `b` is a `torch.save` of
  the storage alone (legacy format, or a zip archive). The network and the loss are
  `torch_utils.persistence` objects: `_reconstruct_persistent_obj(meta)` with the class's Python
  source (`meta['module_src']`), which a normal unpickler runs, its name and the object's state.

In the pickles, a tensor is a call of `torch._utils._rebuild_tensor_v2(storage, offset, size,
stride, ...)` (or `_rebuild_parameter` around it) whose storage is a persistent id
`('storage', torch.<Type>Storage, key, location, numel)` (legacy: with a sixth item, None), or
the result of `_load_from_bytes`. Several tensors may view one storage.

`RestrictedUnpickler` rebuilds exactly that and nothing else: tensors become NumPy arrays (with
the storage offset, size and stride given, copied out of the storage), objects become inert
stand-ins that hold a class name and the pickled state (`InertObject`: TorchScript objects
`ScriptObject`, `torch_utils.persistence` objects `PersistentObject`, the few `torch.nn`
modules in `TORCH_MODULES` `TorchModule`; no method of the file is called or defined, and the
persistent classes' source is dropped unread), NumPy scalars of plain numeric types become NumPy
scalars, `OrderedDict`s become dicts (without the attributes a pickle gives them, such as a state
dict's `_metadata`), other containers stay containers. The globals it admits are the one table
`_GLOBALS` (plus the storage types and TorchScript classes); any other global the pickle names
(`os.system`, `builtins.eval`, any class) is refused by name before it is looked up.

The work a file can cause is bounded by what it declares, and checked before it is done:

- Each pickle is scanned opcode by opcode (`pickletools.genops`) before it is unpickled. Refused:
  the extension registry (EXT1/2/4, which bypasses the allow-list), memo indices beyond the
  pickle's opcode count, lengths beyond the bytes that remain, more than `OBJECT_BUDGET` bytes of
  Python objects (estimated per opcode, strings and bytes apart: those are the file's own bytes),
  dict and set keys that are tuples nested deeper than `KEY_DEPTH`, and more than `RISKY_KEYS`
  keys whose hashes a file can make collide (tuples, frozensets, integers of 61 bits and more,
  objects a call returns).
- A tensor may not reach outside its storage nor have more elements than it (zero and
  overlapping strides included); the tensors' copies together may not exceed `COPY_FACTOR` times
  the bytes of the storages read, plus `COPY_SLACK`.
- A zip record is read only if it is stored or deflated (as torch writes them; bzip2, LZMA and
  encrypted records are refused), lies inside the file, and its uncompressed size
  (`ZipInfo.file_size`) is exactly what its storage declares, or at most `PICKLE_CAP` for
  `data.pkl` (16 bytes for `byteorder`); it is inflated to that size and no further. Record names
  may not repeat.
- A legacy file ends where its last storage ends; `_load_from_bytes` is read one level deep, and
  each bytes object once.

Every failure is a `TorchPickleError` whose message begins with the file's name (`source`):
damage, refused content, and whatever the standard library raises on a damaged file
(`RecursionError`, `MemoryError`, `zlib.error`, ...). Messages show values from the file by type
name or `reprlib`, cut short.

Public API: `read_file` (any of the three -> its object graph), `read_archive` (a zip archive),
`read_legacy` (a legacy `torch.save` file), `unpickle` (a plain pickle; `extra_globals` admits
more callables where a caller knows a format), `state_dict` (an object graph -> `{dotted.name:
array}`, with `torch.nn.Module.state_dict`'s names for modules, bounded as its docstring says),
`InertObject`, `ScriptObject`, `PersistentObject`, `TorchModule`, `TorchPickleError`; for other
readers of weight files, `reading` (a context in which any failure becomes a `TorchPickleError`
naming the file), `zip_records` and `check_zip_record` (a zip archive's records, checked as
above), and `short_repr`.

Not read: sparse and quantised tensors, storages of types not in `STORAGE_DTYPES`, storage views
in legacy files (a persistent id whose sixth item is not None), and NumPy arrays (only NumPy
scalars).
"""
from __future__ import annotations

import contextlib
import functools
import io
import os
import pickle
import pickletools
import re
import reprlib
import sys
import zipfile
from typing import Any, BinaryIO, Callable, Iterator

import numpy as np

__all__ = ["TorchPickleError", "InertObject", "ScriptObject", "PersistentObject", "TorchModule",
           "RestrictedUnpickler", "STORAGE_DTYPES", "TORCH_MODULES", "LEGACY_MAGIC", "read_file",
           "read_archive", "read_legacy", "unpickle", "state_dict", "reading", "zip_records",
           "check_zip_record", "short_repr"]


class TorchPickleError(ValueError):
  """A file that is damaged, not in a format read here, or that names a refused global."""


# torch.<Name>Storage -> NumPy dtype name.
STORAGE_DTYPES: dict[str, str] = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64", "ComplexDoubleStorage": "complex128",
}

# The bounds (see the module docstring).
OBJECT_BUDGET = 128 << 20  # estimated bytes of the Python objects one file's pickles make
KEY_DEPTH = 32  # deepest tuple nesting of a dict or set key
RISKY_KEYS = 4096  # dict and set keys whose hashes a file can make collide, per file
COPY_FACTOR, COPY_SLACK = 4, 1 << 20  # tensor copies <= COPY_FACTOR * storage bytes + COPY_SLACK
PICKLE_CAP = 32 << 20  # uncompressed size of a zip archive's data.pkl
BYTEORDER_CAP = 16
STATE_DICT_DEPTH = 256  # nesting of containers under a state-dict name
STATE_DICT_NAME_CHARS = 64 << 20  # characters of all state-dict names together
# Steps of the state-dict walk (a container's visit and each of its entries): at most
# STATE_DICT_STEPS plus STATE_DICT_REVISITS times the entries of the distinct containers.
STATE_DICT_STEPS, STATE_DICT_REVISITS = 1 << 16, 4

_SAFE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_ZIP_MAGIC = b"PK\x03\x04"
LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
_LEGACY_PROTOCOL = 1001
_MAX_DIMS = 64
_MAX_EXTENT = 1 << 62  # bound on a tensor's size, stride, offset and a storage's element count

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlong = 3, 60, 60, 40
_REPR.maxtuple = _REPR.maxlist = _REPR.maxdict = _REPR.maxset = _REPR.maxfrozenset = 6


def short_repr(value: Any) -> str:
  """A short repr of a value from a file (`reprlib`, bounded in depth and length)."""
  try:
    return _REPR.repr(value)
  except Exception:  # pylint: disable=broad-except  (an int too long for str, say)
    return f"<{type(value).__name__}>"


def _cut(text: str, limit: int = 80) -> str:
  """A string from a file, cut to `limit` characters."""
  return text if len(text) <= limit else text[:limit - 3] + "..."


def _describe(e: BaseException) -> str:
  """An exception as `Type: message`, from its first argument where that is a string (never the
  repr of another argument, which may be an object from the file), cut short."""
  text = e.args[0] if e.args and isinstance(e.args[0], str) else ""
  return f"{type(e).__name__}: {_cut(text, 200)}" if text else type(e).__name__


def _is_int(value: Any) -> bool:
  """Whether `value` is a Python int (not a bool)."""
  return isinstance(value, int) and not isinstance(value, bool)


def _storage_dtype(name: str) -> np.dtype:
  if name == "bfloat16":
    import ml_dtypes  # pylint: disable=import-outside-toplevel  (a dependency of jax)
    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(name)


class _Budget:
  """What one file's read has spent, across its nested pickles: estimated object bytes, risky
  keys, bytes of the storages read and of the tensors copied out of them, and the bytes objects
  given to `_load_from_bytes` (kept, so that their ids stay theirs)."""
  __slots__ = ("objects", "risky_keys", "storage_bytes", "copied", "decoded")

  def __init__(self):
    self.objects = self.risky_keys = self.storage_bytes = self.copied = 0
    self.decoded: dict[int, bytes] = {}


class _Read:
  """One read: the name its errors begin with, its budget (shared with the reads nested in it)
  and whether it is nested (a storage's bytes)."""
  __slots__ = ("source", "budget", "nested")

  def __init__(self, source: str, budget: _Budget | None = None, nested: bool = False):
    self.source, self.budget, self.nested = source, budget or _Budget(), nested

  def error(self, problem: str) -> TorchPickleError:
    return TorchPickleError(f"{self.source}: {problem}")

  def add_storage(self, nbytes: int) -> None:
    self.budget.storage_bytes += nbytes

  def copy(self, nbytes: int, size: tuple[int, ...]) -> None:
    """Spends `nbytes` of copies on a tensor of `size`; refuses what the storages read do not
    cover."""
    budget = self.budget
    limit = COPY_FACTOR * budget.storage_bytes + COPY_SLACK
    if budget.copied + nbytes > limit:
      raise TorchPickleError(
          f"a tensor of size {short_repr(size)} would bring the tensors' copies to "
          f"{budget.copied + nbytes} bytes; the storages read hold {budget.storage_bytes} (at "
          f"most {COPY_FACTOR}x that plus {COPY_SLACK} is copied)")
    budget.copied += nbytes


class _Sealed:
  """Pickle's BUILD may not change these objects."""
  __slots__ = ()

  def __setstate__(self, state):
    raise TorchPickleError(f"a pickle may not set the state of {type(self).__name__}")


class _StorageType(_Sealed):
  """The pickled reference to a `torch.<Name>Storage` class: its name and element type only."""
  __slots__ = ("name", "dtype")

  def __init__(self, name: str, dtype: np.dtype):
    self.name, self.dtype = name, dtype

  def __repr__(self):
    return f"torch.{self.name}"


class _Storage(_Sealed):
  """A storage after `persistent_load`: a flat array of its elements and its key."""
  __slots__ = ("key", "array")

  def __init__(self, key: str, array: np.ndarray):
    self.key, self.array = key, array


class _PickledDict(dict):
  """`collections.OrderedDict` as a pickle rebuilds it: a dict (in insertion order) that has no
  instance attributes. The attribute dict that BUILD gives it (a state dict's `_metadata`) is
  dropped."""
  __slots__ = ()

  def __setstate__(self, state):
    if not isinstance(state, dict):
      raise TorchPickleError(f"the state of an OrderedDict is a {type(state).__name__}, not an "
                             "attribute dict")


def _ordered_dict(*args, **kwargs) -> _PickledDict:
  """`collections.OrderedDict()`: pickles call it without arguments and fill it by SETITEMS."""
  if args or kwargs:
    raise TorchPickleError("collections.OrderedDict is called with arguments; pickles fill it "
                           "item by item")
  return _PickledDict()


class InertObject:
  """An object rebuilt from its class's name and its pickled state alone.

  `qualname` is the class's name in the file; `attributes` is the object's pickled state (for a
  torch module: `_parameters`, `_buffers`, `_modules` and its other attributes). Nothing of the
  class's code exists here.
  """
  qualname = "object"
  attributes: dict[str, Any]

  def __new__(cls, *args, **kwargs):
    if args or kwargs:
      raise TorchPickleError(f"{_cut(cls.qualname)} is called with arguments; its objects are "
                             "rebuilt from their state only")
    obj = super().__new__(cls)
    obj.attributes = {}
    return obj

  def __setstate__(self, state):
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
      raise TorchPickleError(f"the state of a {_cut(self.qualname)} object is not an attribute "
                             "dict")
    self.attributes = dict(state)

  def __getitem__(self, name: str) -> Any:
    return self.attributes[name]

  def __repr__(self):
    names = sorted(self.attributes)
    shown = ", ".join(_cut(n, 40) for n in names[:8]) + (", ..." if len(names) > 8 else "")
    return f"{type(self).__name__}({_cut(self.qualname)}, [{shown}])"


class ScriptObject(InertObject):
  """An object of a pickled TorchScript class (`__torch__.<...>`); the file's TorchScript source
  is not read."""
  qualname = "__torch__"


class TorchModule(InertObject):
  """An object of one of the `torch.nn` module classes in `TORCH_MODULES` (containers and
  parameter-free layers), which a pickle rebuilds with NEWOBJ and its `__dict__`."""
  qualname = "torch.nn.Module"


class PersistentObject(InertObject):
  """An object of a `torch_utils.persistence` class: `qualname` is the class's name in its
  module, `version` the persistence format's version, `attributes` the object's `__dict__`
  (for a network: the `torch.nn.Module` state and the persistence wrapper's `_init_args` and
  `_init_kwargs`). The class's source, stored in the pickle, is dropped unread."""
  qualname = "persistent"
  version: int | None = None


def _inert_class(base: type, qualname: str) -> type:
  """A subclass of `base` that only records the class name."""
  return type(base.__name__, (base,), {"qualname": qualname})


# ---------------------------------------------------------------------------------------------
# Stand-ins for the few torch functions a tensor pickle calls.


def _rebuild_tensor_v2(read: _Read, storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
  """A copy of the tensor `storage[offset + sum(i_k * stride_k)]` as a NumPy array."""
  del requires_grad, backward_hooks, metadata
  if not isinstance(storage, _Storage):
    raise TorchPickleError(f"a tensor's storage is {type(storage).__name__}, not a storage")
  if not isinstance(size, (tuple, list)) or not isinstance(stride, (tuple, list)):
    raise TorchPickleError(f"a tensor's size and stride are {type(size).__name__} and "
                           f"{type(stride).__name__}, not tuples")
  if len(size) > _MAX_DIMS or len(size) != len(stride):
    raise TorchPickleError(f"a tensor has {len(size)} sizes and {len(stride)} strides (at most "
                           f"{_MAX_DIMS} dimensions)")
  size, stride = tuple(size), tuple(stride)
  if not all(_is_int(v) for v in size + stride + (storage_offset,)):
    raise TorchPickleError(f"tensor geometry is not integral: size {short_repr(size)}, stride "
                           f"{short_repr(stride)}, offset {short_repr(storage_offset)}")
  if not all(0 <= v < _MAX_EXTENT for v in size + stride + (storage_offset,)):
    raise TorchPickleError(f"tensor geometry out of range: size {short_repr(size)}, stride "
                           f"{short_repr(stride)}, offset {short_repr(storage_offset)}")
  flat = storage.array
  numel = 1
  for n in size:
    numel *= n
  if numel == 0:
    return np.zeros(size, flat.dtype)
  last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= flat.size:
    raise TorchPickleError(
        f"tensor of size {short_repr(size)}, stride {short_repr(stride)}, offset "
        f"{storage_offset} reaches element {last} of storage {_cut(storage.key)}, which has "
        f"{flat.size}")
  if numel > flat.size:
    raise TorchPickleError(
        f"tensor of size {short_repr(size)}, stride {short_repr(stride)} has {numel} elements; "
        f"its storage {_cut(storage.key)} has {flat.size} (zero or overlapping strides)")
  read.copy(numel * flat.itemsize, size)
  item = flat.itemsize
  view = np.lib.stride_tricks.as_strided(flat[storage_offset:], shape=size,
                                         strides=tuple(s * item for s in stride), writeable=False)
  return np.array(view, copy=True, order="C")


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
  del requires_grad, backward_hooks, state
  if not isinstance(data, np.ndarray):
    raise TorchPickleError(f"a parameter's data is {type(data).__name__}, not a tensor")
  return data


def _build_list(values):
  if not isinstance(values, list):
    raise TorchPickleError(f"a TorchScript list is {type(values).__name__}, not a list")
  return values


def _restore_type_tag(value, type_str=None):
  del type_str
  return value


def _codecs_encode(text, encoding="utf-8"):
  """`_codecs.encode` as protocol-2 pickles use it for bytes: latin-1 text -> bytes only."""
  if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
    raise TorchPickleError("_codecs.encode is read for latin-1 text only, got "
                           f"{short_repr(encoding)}")
  return text.encode("latin1")


_PLAIN_NUMPY = re.compile(r"^[biufc][0-9]{1,2}$")


class _NumpyDtype:
  """`numpy.dtype(spec, align, copy)` as NumPy pickles a dtype, for plain numeric and bool types
  only; pickle's BUILD then gives the byte order (NumPy's dtype state, version 3 or 4)."""
  __slots__ = ("dtype",)

  def __init__(self, dtype: np.dtype):
    self.dtype = dtype

  def __setstate__(self, state):
    if (not isinstance(state, tuple) or len(state) < 5 or state[1] not in ("<", ">", "|", "=")
        or any(v is not None for v in state[2:5])):
      raise TorchPickleError(f"numpy.dtype state {short_repr(state)} is not that of a plain "
                             "numeric type")
    if state[1] in ("<", ">"):
      self.dtype = self.dtype.newbyteorder(state[1])


def _numpy_dtype(spec, align=False, copy=False):
  del align, copy
  if not isinstance(spec, str) or not _PLAIN_NUMPY.match(spec):
    raise TorchPickleError(f"numpy.dtype({short_repr(spec)}) is not read: only plain numeric "
                           "and bool types are")
  return _NumpyDtype(np.dtype(spec))


def _numpy_scalar(dtype, data=None):
  """`numpy...multiarray.scalar(dtype, raw bytes)`: one NumPy scalar of a plain numeric type."""
  if not isinstance(dtype, _NumpyDtype) or not isinstance(data, bytes) \
      or len(data) != dtype.dtype.itemsize:
    raise TorchPickleError("a NumPy scalar is read from a plain numeric dtype and its bytes only")
  return np.frombuffer(data, dtype.dtype, count=1)[0]


class _TorchDtype(_Sealed):
  """A pickled `torch.<dtype>` (e.g. `torch.float32`), kept as its name."""
  __slots__ = ("name",)

  def __init__(self, name: str):
    self.name = name

  def __repr__(self):
    return f"torch.{self.name}"


def _reconstruct_persistent_obj(meta):
  """`torch_utils.persistence._reconstruct_persistent_obj`: a `PersistentObject` with the class
  name and state of `meta`; `meta['module_src']` is dropped unread."""
  if not isinstance(meta, dict):
    raise TorchPickleError(f"a torch_utils.persistence object's metadata is a "
                           f"{type(meta).__name__}, not a dict")
  if (meta.get("type") != "class" or not isinstance(meta.get("class_name"), str)
      or not _SAFE_NAME.match(meta["class_name"])):
    raise TorchPickleError("a torch_utils.persistence object's metadata is not that of a class: "
                           f"type {short_repr(meta.get('type'))}, class_name "
                           f"{short_repr(meta.get('class_name'))}")
  state = meta.get("state")
  obj = PersistentObject()
  obj.qualname, obj.version = meta["class_name"], meta.get("version")
  if state is not None:
    obj.__setstate__(state)
  return obj


def _load_from_bytes(read: _Read, data):
  """`torch.storage._load_from_bytes(b)`: the storage `torch.save` wrote into `b` (legacy format,
  or a zip archive), read with the same restrictions and budget, one level deep, each bytes
  object once."""
  if not isinstance(data, bytes):
    raise TorchPickleError(f"torch.storage._load_from_bytes is given a {type(data).__name__}, not "
                           "bytes")
  if read.nested:
    raise TorchPickleError("torch.storage._load_from_bytes is called inside storage bytes (one "
                           "level is read)")
  decoded = read.budget.decoded
  if id(data) in decoded:
    raise TorchPickleError("torch.storage._load_from_bytes is given the same bytes twice")
  decoded[id(data)] = data
  inner = _Read("storage bytes", read.budget, nested=True)
  if data[:4] == _ZIP_MAGIC:
    obj = _read_archive(io.BytesIO(data), len(data), inner, None)
  else:
    obj = _read_legacy(data, inner, None)
  if not isinstance(obj, _Storage):
    raise TorchPickleError(f"storage bytes hold a {type(obj).__name__}, not a storage")
  return obj


# `torch.nn` module classes a network may hold as such (not as persistent classes); they are
# rebuilt as `TorchModule`s.
TORCH_MODULES = ("torch.nn.modules.container.ModuleDict", "torch.nn.modules.container.ModuleList",
                 "torch.nn.modules.container.Sequential", "torch.nn.modules.linear.Identity",
                 "torch.nn.modules.dropout.Dropout")
_TORCH_DTYPES = ("float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8",
                 "uint8", "bool", "complex64", "complex128")

# The one allow-list: (module, name) -> what the pickle gets. Storage types (`torch.<Name>Storage`)
# and TorchScript classes (`__torch__.<...>`) are admitted by name pattern in `find_class`; the
# functions in `_PER_READ` get the read (its name and budget) as their first argument.
_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): _ordered_dict,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch.jit._pickle", "build_intlist"): _build_list,
    ("torch.jit._pickle", "build_floatlist"): _build_list,
    ("torch.jit._pickle", "build_doublelist"): _build_list,
    ("torch.jit._pickle", "build_boollist"): _build_list,
    ("torch.jit._pickle", "build_tensorlist"): _build_list,
    ("torch.jit._pickle", "restore_type_tag"): _restore_type_tag,
    ("_codecs", "encode"): _codecs_encode,
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
    ("numpy", "dtype"): _numpy_dtype,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    **{("torch", name): _TorchDtype(name) for name in _TORCH_DTYPES},
    **{tuple(q.rsplit(".", 1)): _inert_class(TorchModule, q) for q in TORCH_MODULES},
}
_PER_READ: dict[tuple[str, str], Callable[..., Any]] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch.storage", "_load_from_bytes"): _load_from_bytes,
}


class _Callable(_Sealed):
  """A function of this module as a pickle sees it: callable, and sealed, so that no pickle
  changes (by BUILD) what a later pickle gets."""
  __slots__ = ("fn", "name")

  def __init__(self, fn: Callable[..., Any], name: str | None = None):
    self.fn, self.name = fn, name or fn.__name__

  def __call__(self, *args, **kwargs):
    return self.fn(*args, **kwargs)

  def __repr__(self):
    return f"<{self.name}>"


def _sealed(value: Any) -> Any:
  """`value` as a pickle may see it: classes (whose `__setstate__` needs an instance) and sealed
  objects as they are, functions wrapped."""
  return value if isinstance(value, (type, _Sealed)) else _Callable(value)


_SEALED_GLOBALS = {k: _sealed(v) for k, v in _GLOBALS.items()}


def _unbuilt(*args, **kwargs) -> None:
  del args, kwargs


# The legacy reader's first pass over an object pickle: storages are recorded, nothing is built.
_DRY_RUN = {("torch._utils", "_rebuild_tensor_v2"): _unbuilt,
            ("torch._utils", "_rebuild_parameter"): _unbuilt,
            ("torch._utils", "_rebuild_parameter_with_state"): _unbuilt,
            ("torch.storage", "_load_from_bytes"): _unbuilt}


class RestrictedUnpickler(pickle.Unpickler):
  """An unpickler that builds tensors, containers, NumPy scalars and inert objects, nothing else.

  `storage` maps a persistent id's (key, dtype, numel) to the storage's flat array (None: the
  pickle may not reference storages; storages embedded as `_load_from_bytes` are read all the
  same). `extra_globals` admits further `(module, name) -> callable` entries; everything else
  that the pickle names is refused in `find_class`, before any lookup, so no module is imported
  and nothing from the file runs. The functions admitted are sealed (`_Callable`): BUILD cannot
  change them for later pickles. `source` names the file in errors; `read` carries the budget of
  the file's read (a fresh one by default). The pickle is not scanned here: `unpickle` and the
  readers scan it first.
  """

  def __init__(self, file: BinaryIO, *, source: str,
               storage: Callable[[str, np.dtype, int], np.ndarray] | None = None,
               extra_globals: dict[tuple[str, str], Any] | None = None,
               read: _Read | None = None):
    super().__init__(file)
    self.source = source
    self._read = read or _Read(source)
    self._storage = storage
    self._extra = {k: _sealed(v) for k, v in (extra_globals or {}).items()}
    self._per_read: dict[tuple[str, str], _Callable] = {}
    self._script_classes: dict[str, type] = {}

  def find_class(self, module: str, name: str) -> Any:
    key = (module, name)
    if key in self._extra:
      return self._extra[key]
    if key in _PER_READ:
      if key not in self._per_read:
        fn = _PER_READ[key]
        self._per_read[key] = _Callable(functools.partial(fn, self._read), fn.__name__)
      return self._per_read[key]
    if key in _SEALED_GLOBALS:
      return _SEALED_GLOBALS[key]
    if module == "torch" and name in STORAGE_DTYPES:
      return _StorageType(name, _storage_dtype(STORAGE_DTYPES[name]))
    if (module == "__torch__" or module.startswith("__torch__.")) and _SAFE_NAME.match(module) \
        and _SAFE_NAME.match(name):
      qualname = f"{module}.{name}"
      if qualname not in self._script_classes:
        self._script_classes[qualname] = _inert_class(ScriptObject, qualname)
      return self._script_classes[qualname]
    raise TorchPickleError(
        f"{self.source}: refusing the global {_cut(module)}.{_cut(name)}: only tensors, "
        "containers, NumPy scalars and the state of modules are read (nothing from the file is "
        "run)")

  def persistent_load(self, pid: Any) -> Any:
    if self._storage is None:
      raise TorchPickleError(f"{self.source}: the pickle references a storage ({short_repr(pid)}) "
                             "outside a torch archive")
    # Zip archives: ('storage', type, key, location, numel); the legacy format adds a sixth item,
    # a storage view's metadata, which torch writes as None.
    if (not isinstance(pid, tuple) or len(pid) not in (5, 6) or pid[0] != "storage"
        or not isinstance(pid[1], _StorageType) or not isinstance(pid[1].dtype, np.dtype)
        or not isinstance(pid[2], str)
        or not _is_int(pid[4]) or not 0 <= pid[4] < _MAX_EXTENT):
      raise TorchPickleError(f"{self.source}: unrecognised persistent id {short_repr(pid)}")
    if len(pid) == 6 and pid[5] is not None:
      raise TorchPickleError(f"{self.source}: storage {_cut(pid[2])} is a view of another "
                             "storage, which is not read")
    kind, key, numel = pid[1], pid[2], pid[4]
    return _Storage(key, self._storage(key, kind.dtype, numel))


# ---------------------------------------------------------------------------------------------
# The scan: each pickle's opcodes, checked before it is unpickled.

_HASH_MODULUS = sys.hash_info.modulus  # integers this large or larger can share a hash

# What the scan does for an opcode: one of these actions, then for the generic ones how the
# pushed item's key depth follows and which popped items are dict or set keys.
_PUSH0, _PUSH1, _PUSH_INT, _GET, _PUT, _MEMOIZE, _DUP, _MARK, _POP, _EXT, _GENERIC = range(11)
_ZERO, _TUPLE, _FIRST, _ARGS, _INT = range(5)  # the pushed item's key depth
_NO_KEYS, _SECOND, _PAIRS, _ALL = range(4)  # keys: none, popped[1], items[0::2], items
_MARKED = frozenset({"APPENDS", "LIST", "TUPLE", "DICT", "SETITEMS", "ADDITEMS", "FROZENSET",
                     "POP_MARK", "INST", "OBJ"})
_ACTIONS = {"GET": _GET, "BINGET": _GET, "LONG_BINGET": _GET, "PUT": _PUT, "BINPUT": _PUT,
            "LONG_BINPUT": _PUT, "MEMOIZE": _MEMOIZE, "DUP": _DUP, "MARK": _MARK, "POP": _POP,
            "EXT1": _EXT, "EXT2": _EXT, "EXT4": _EXT}
_KINDS = {"TUPLE": _TUPLE, "TUPLE1": _TUPLE, "TUPLE2": _TUPLE, "TUPLE3": _TUPLE,
          "EMPTY_TUPLE": _TUPLE, "FROZENSET": _TUPLE, "OBJ": _TUPLE, "INST": _TUPLE,
          "APPEND": _FIRST, "APPENDS": _FIRST, "SETITEM": _FIRST, "SETITEMS": _FIRST,
          "ADDITEMS": _FIRST, "BUILD": _FIRST, "REDUCE": _ARGS, "NEWOBJ": _ARGS,
          "NEWOBJ_EX": _ARGS, "INT": _INT, "LONG": _INT, "LONG1": _INT, "LONG4": _INT}
_KEYS = {"SETITEM": _SECOND, "SETITEMS": _PAIRS, "DICT": _PAIRS, "ADDITEMS": _ALL,
         "FROZENSET": _ALL}
# Estimated bytes of Python objects an opcode makes (a stack slot, a container entry, the
# object), measured on CPython 3.11 (an empty set takes 216 bytes, a dict 64, an object 350).
_OBJECT_BYTES = {"EMPTY_SET": 320, "FROZENSET": 320, "EMPTY_DICT": 128, "DICT": 128,
                 "EMPTY_LIST": 128, "LIST": 128, "REDUCE": 512, "NEWOBJ": 512, "NEWOBJ_EX": 512,
                 "OBJ": 512, "INST": 512, "PROTO": 0, "FRAME": 0, "STOP": 0, "MARK": 8}


def _rule(op: pickletools.OpcodeInfo) -> tuple[int, bool, int, int, int, int, int]:
  """(action, pops to a mark, fixed pops, pushes, key depth rule, keys rule, object bytes)."""
  name, before = op.name, op.stack_before
  marked = name in _MARKED
  pops = before.index(pickletools.markobject) if marked else len(before)
  if name == "OBJ":
    pops = 0  # OBJ's class is above its mark
  pushes = len(op.stack_after)
  kind = _KINDS.get(name, _ZERO)
  push = {_ZERO: _PUSH0, _TUPLE: _PUSH1, _INT: _PUSH_INT}.get(kind, _GENERIC)  # EMPTY_TUPLE: 1
  action = _ACTIONS.get(name, push if not marked and not pops and pushes == 1 else _GENERIC)
  return (action, marked, pops, pushes, kind, _KEYS.get(name, _NO_KEYS),
          _OBJECT_BYTES.get(name, 64))


_RULES = {op: _rule(op) for op in pickletools.opcodes}


def _scan(file: BinaryIO, read: _Read, what: str) -> None:
  """Checks the pickle at `file`'s position, opcode by opcode to its STOP, and leaves `file` at
  its start; raises TorchPickleError naming `read.source` and `what`.

  It follows the unpickler's stack (and marks, as CPython's unpickler keeps them) with, for each
  item, how deeply the item may nest as a tuple: 0 for what hashes safely (strings, bytes, small
  integers, floats, None, containers), 1 for integers of 61 bits or more, 1 + its items' for
  tuples, its arguments' for what a call returns. A dict or set key with a depth of 1 or more is
  one whose hash a file can make collide (tuples of crafted integers, say).
  """
  def refuse(problem: str) -> TorchPickleError:
    return read.error(f"{what}: {problem}")

  start = file.tell()
  budget = read.budget
  stack: list[int] = []
  marks: list[int] = []
  memo: dict[int, int] = {}
  ops = objects = 0  # ops counts the opcodes read
  risky = budget.risky_keys
  top = -1
  room = OBJECT_BUDGET - budget.objects
  fence = 0  # the stack's length at the last mark: items below it are out of reach

  push = stack.append
  try:
    for ops, (op, arg, pos) in enumerate(pickletools.genops(file), 1):
      action, marked, pops, pushes, kind_rule, key_rule, weight = _RULES[op]
      objects += weight
      if objects > room:
        raise refuse(f"its objects would take more than {OBJECT_BUDGET} bytes (estimated from "
                     f"its opcodes, {ops} read)")
      if action == _GET:
        if arg not in memo:
          raise refuse(f"opcode {op.name} at byte {pos} fetches memo index {arg}, which is not "
                       "set")
        push(memo[arg])
        continue
      if action == _PUSH0:
        push(0)
        continue
      if action == _PUSH1:
        push(1)
        continue
      if action == _PUSH_INT:
        push(int(_is_int(arg) and abs(arg) >= _HASH_MODULUS))
        continue
      if action == _MARK:
        marks.append(len(stack))
        fence = len(stack)
        continue
      if action == _EXT:
        raise refuse(f"opcode {op.name} at byte {pos} names a global through the extension "
                     "registry, which is not read")
      if action in (_PUT, _MEMOIZE, _DUP, _POP):
        if action == _POP and marks and marks[-1] == len(stack):
          marks.pop()
          fence = marks[-1] if marks else 0
          continue
        if len(stack) <= fence:
          raise refuse(f"opcode {op.name} at byte {pos} finds an empty stack")
        if action == _DUP:
          stack.append(stack[-1])
        elif action == _POP:
          stack.pop()
        else:
          index = len(memo) if action == _MEMOIZE else arg
          if index < 0:
            raise refuse(f"opcode {op.name} at byte {pos} has a negative memo index")
          memo[index] = stack[-1]
          top = max(top, index)
        continue
      items = ()
      if marked:
        if not marks:
          raise refuse(f"opcode {op.name} at byte {pos} finds no MARK")
        at = marks.pop()
        fence = marks[-1] if marks else 0
        items = stack[at:]
        del stack[at:]
      popped = ()
      if pops:
        if len(stack) - pops < fence:
          raise refuse(f"opcode {op.name} at byte {pos} finds too few items on the stack")
        popped = stack[-pops:]
        del stack[-pops:]
      if key_rule != _NO_KEYS:
        keys = popped[1:2] if key_rule == _SECOND else items[0::2] if key_rule == _PAIRS else items
        for depth in keys:
          if depth:
            if depth > KEY_DEPTH:
              raise refuse(f"a dict or set key is a tuple nested {depth} deep (at most "
                           f"{KEY_DEPTH})")
            risky += 1
        if risky > RISKY_KEYS:
          raise refuse(f"more than {RISKY_KEYS} of its dict and set keys are tuples, large "
                       "integers or objects a call returns (keys whose hashes a file can make "
                       "collide)")
      if pushes:
        stack.append(1 + max(items or popped or (0,)) if kind_rule == _TUPLE else
                     popped[0] if kind_rule == _FIRST else popped[1] if kind_rule == _ARGS else
                     0)
  except (TorchPickleError, MemoryError, RecursionError):
    raise  # (the last two: `reading` says what they mean)
  except Exception as e:  # pylint: disable=broad-except  (genops on damaged data)
    raise refuse(f"not a readable pickle: {_describe(e)}") from None
  if top >= ops:
    raise refuse(f"memo index {top} is beyond its {ops} opcodes")
  budget.objects += objects
  budget.risky_keys = risky
  file.seek(start)


def _load(file: BinaryIO, read: _Read, what: str, *,
          storage: Callable[[str, np.dtype, int], np.ndarray] | None = None,
          extra_globals: dict[tuple[str, str], Any] | None = None, scan: bool = True) -> Any:
  """The pickle at `file`'s position, scanned (unless `scan` is False: scanned before), then
  unpickled by `RestrictedUnpickler`; errors name `read.source` and `what`."""
  if scan:
    _scan(file, read, what)
  unpickler = RestrictedUnpickler(file, source=read.source, storage=storage,
                                  extra_globals=extra_globals, read=read)
  try:
    return unpickler.load()
  except TorchPickleError as e:
    if str(e).startswith(read.source):
      raise
    raise read.error(f"{what}: {e}") from None
  except (MemoryError, RecursionError):
    raise  # `reading` says what they mean
  except Exception as e:  # pylint: disable=broad-except  (any malformed pickle)
    raise read.error(f"{what} is not a readable pickle: {_describe(e)}") from None


@contextlib.contextmanager
def reading(source: str) -> Iterator[None]:
  """Any failure inside as a TorchPickleError whose message begins with `source` (a missing
  file stays a FileNotFoundError)."""
  try:
    yield
  except FileNotFoundError:
    raise
  except TorchPickleError as e:
    if str(e).startswith(source):
      raise
    raise TorchPickleError(f"{source}: {e}") from None
  except RecursionError:
    raise TorchPickleError(f"{source}: the file nests objects too deeply to be read") from None
  except MemoryError:
    raise TorchPickleError(f"{source}: reading the file ran out of memory") from None
  except Exception as e:  # pylint: disable=broad-except  (zlib.error, OSError, ... on damage)
    raise TorchPickleError(f"{source}: damaged ({_describe(e)})") from None


# ---------------------------------------------------------------------------------------------
# The three containers.


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


# ---------------------------------------------------------------------------------------------
# State dicts.


def _module_items(node: InertObject) -> list[tuple[str, Any]] | None:
  """A torch module's entries as `torch.nn.Module.state_dict` lists them (parameters, then the
  persistent buffers, then submodules; None entries left out), or None for other objects."""
  attrs = node.attributes
  params, buffers, modules = (attrs.get(k) for k in ("_parameters", "_buffers", "_modules"))
  if not all(isinstance(v, dict) for v in (params, buffers, modules)):
    return None
  transient = attrs.get("_non_persistent_buffers_set")
  transient = transient if isinstance(transient, (set, frozenset, list, tuple)) else ()
  transient = {k for k in transient if isinstance(k, str)}
  return ([(k, v) for k, v in params.items() if v is not None]
          + [(k, v) for k, v in buffers.items() if v is not None and k not in transient]
          + [(k, v) for k, v in modules.items() if v is not None])


_WALKED = (np.ndarray, InertObject, dict, list, tuple)  # what `state_dict` names or enters


def _items(node: Any) -> tuple[list[tuple[Any, Any]], int] | None:
  """A container's (key, value) entries that `state_dict` walks (arrays and containers) and its
  count of entries, or None for leaves."""
  if isinstance(node, InertObject):
    items = _module_items(node)
    items = list(node.attributes.items()) if items is None else items
    return [(k, v) for k, v in items if isinstance(v, _WALKED)], len(items)
  if isinstance(node, dict):
    return [(k, v) for k, v in node.items() if isinstance(v, _WALKED)], len(node)
  if isinstance(node, (list, tuple)):
    return [(str(i), v) for i, v in enumerate(node) if isinstance(v, _WALKED)], len(node)
  return None


def state_dict(obj: Any, prefix: str = "", *, source: str = "<object graph>"
               ) -> dict[str, np.ndarray]:
  """Every array in an object graph, keyed by its dotted path (`net.layers.conv.weight`).

  A torch module (an `InertObject` with `_parameters`, `_buffers` and `_modules`) gives what
  `torch.nn.Module.state_dict` would: its parameters and persistent buffers, then its submodules'
  (`model.enc.16x16_conv.weight`), and none of its other attributes. Other `InertObject`s give
  their attributes, dicts their items, lists and tuples their elements (their index); other
  values are skipped, and so is a container met again inside itself. An array reached by two
  paths is listed under each (a module shared by two parents, as torch lists it).

  The walk is iterative and bounded: raises TorchPickleError, naming `source`, for a name that
  two different arrays would take (`{"a.b": t1, "a": {"b": t2}}`, or a parameter `x.weight` next
  to a submodule `x`), an array under a key that is not a string, containers nested deeper than
  `STATE_DICT_DEPTH`, more than `STATE_DICT_NAME_CHARS` characters of names, and a walk longer
  than `STATE_DICT_STEPS` plus `STATE_DICT_REVISITS` times the entries of the distinct
  containers (a graph of shared lists built to expand: each path to a container walks it
  again).
  """
  out: dict[str, np.ndarray] = {}
  seen: set[int] = set()
  on_path: set[int] = set()
  steps = unique = chars = 0
  # The stack holds (node, path, depth) to visit, or (None, node id, -1) to leave a container; a
  # path is (parent path, key) or None, its name built only for an array.
  stack: list[tuple[Any, Any, int]] = [(obj, (None, prefix) if prefix else None, 0)]

  def name_of(path) -> tuple[str, Any]:
    """The dotted name of `path` (a key that is not a string as `<type>`), and the first such
    key's type (None where every key is a string)."""
    keys = []
    while path is not None:
      path, key = path
      keys.append(key)
    keys.reverse()
    odd = next((type(k) for k in keys if not isinstance(k, str)), None)
    return ".".join(k if isinstance(k, str) else f"<{type(k).__name__}>" for k in keys), odd

  def where(path) -> str:
    name = name_of(path)[0]
    return short_repr(name) if name else "the top level"

  while stack:
    node, path, depth = stack.pop()
    if depth < 0:
      on_path.discard(path)
      continue
    if isinstance(node, np.ndarray):
      if path is None:
        raise TorchPickleError(f"{source}: the object graph is one array, which has no name")
      name, odd = name_of(path)
      if odd is not None:
        raise TorchPickleError(f"{source}: a tensor at {short_repr(name)} is under a key of type "
                               f"{odd.__name__}; state-dict names are strings")
      chars += len(name)
      if chars > STATE_DICT_NAME_CHARS:
        raise TorchPickleError(f"{source}: the state dict's names exceed "
                               f"{STATE_DICT_NAME_CHARS} characters")
      if name in out and out[name] is not node:
        raise TorchPickleError(f"{source}: two tensors are named {short_repr(name)}")
      out[name] = node
      continue
    found = _items(node)
    if found is None or id(node) in on_path:
      continue
    items, count = found
    if depth >= STATE_DICT_DEPTH:
      raise TorchPickleError(f"{source}: containers nest deeper than {STATE_DICT_DEPTH} under "
                             f"{where(path)}")
    if id(node) not in seen:
      seen.add(id(node))
      unique += 1 + count
    steps += 1 + count
    if steps > STATE_DICT_STEPS + STATE_DICT_REVISITS * unique:
      raise TorchPickleError(
          f"{source}: walking the object graph takes more than {steps} steps for its "
          f"{len(seen)} containers of {unique} entries (shared containers reached by many "
          "paths)")
    on_path.add(id(node))
    stack.append((None, id(node), -1))
    for key, value in reversed(items):
      stack.append((value, (path, key), depth + 1))
  return out
