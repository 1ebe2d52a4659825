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
scalars, containers stay containers. The globals it admits are the one table `_GLOBALS` (plus
the storage types and TorchScript classes); any other global the pickle names (`os.system`,
`builtins.eval`, any class) is refused by name before it is looked up, with a
`TorchPickleError` naming the file. Damage (not a zip, a CRC error, a missing or short storage,
a tensor reaching outside its storage, a wrong magic number) raises a `TorchPickleError` naming
the file and the problem.

Public API: `read_file` (any of the three -> its object graph), `read_archive` (a zip archive),
`read_legacy` (a legacy `torch.save` file), `unpickle` (a plain pickle; `extra_globals` admits
more callables where a caller knows a format), `state_dict` (an object graph -> `{dotted.name:
array}`, with `torch.nn.Module.state_dict`'s names for modules), `InertObject`,
`ScriptObject`, `PersistentObject`, `TorchModule`, `TorchPickleError`.

Not read: sparse and quantised tensors, storages of types not in `STORAGE_DTYPES`, storage views
in legacy files (a persistent id whose sixth item is not None), and NumPy arrays (only NumPy
scalars).
"""
from __future__ import annotations

import collections
import io
import os
import pickle
import pickletools
import re
import zipfile
from typing import Any, BinaryIO, Callable

import numpy as np

__all__ = ["TorchPickleError", "InertObject", "ScriptObject", "PersistentObject", "TorchModule",
           "RestrictedUnpickler", "STORAGE_DTYPES", "TORCH_MODULES", "LEGACY_MAGIC", "read_file",
           "read_archive", "read_legacy", "unpickle", "state_dict"]


class TorchPickleError(ValueError):
  """A file that is damaged, not in a format read here, or that names a refused global."""


# torch.<Name>Storage -> NumPy dtype name.
STORAGE_DTYPES: dict[str, str] = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64", "ComplexDoubleStorage": "complex128",
}


_SAFE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_ZIP_MAGIC = b"PK\x03\x04"
LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
_LEGACY_PROTOCOL = 1001


def _storage_dtype(name: str) -> np.dtype:
  if name == "bfloat16":
    import ml_dtypes  # pylint: disable=import-outside-toplevel  (a dependency of jax)
    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(name)


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
      raise TorchPickleError(f"{cls.qualname} is called with arguments; its objects are rebuilt "
                             "from their state only")
    obj = super().__new__(cls)
    obj.attributes = {}
    return obj

  def __setstate__(self, state):
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
      raise TorchPickleError(f"the state of a {self.qualname} object is not an attribute dict")
    self.attributes = dict(state)

  def __getitem__(self, name: str) -> Any:
    return self.attributes[name]

  def __repr__(self):
    return f"{type(self).__name__}({self.qualname}, {sorted(self.attributes)})"


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


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
  """A copy of the tensor `storage[offset + sum(i_k * stride_k)]` as a NumPy array."""
  del requires_grad, backward_hooks, metadata
  if not isinstance(storage, _Storage):
    raise TorchPickleError(f"a tensor's storage is {type(storage).__name__}, not a storage")
  size, stride = tuple(size), tuple(stride)
  if (len(size) != len(stride) or not all(isinstance(v, int) for v in size + stride)
      or not isinstance(storage_offset, int)):
    raise TorchPickleError(f"tensor geometry is not integral: size {size}, stride {stride}, "
                           f"offset {storage_offset}")
  if any(v < 0 for v in size) or any(v < 0 for v in stride) or storage_offset < 0:
    raise TorchPickleError(f"negative tensor geometry: size {size}, stride {stride}, "
                           f"offset {storage_offset}")
  flat = storage.array
  if 0 in size:
    return np.zeros(size, flat.dtype)
  last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= flat.size:
    raise TorchPickleError(
        f"tensor of size {size}, stride {stride}, offset {storage_offset} reaches element {last} "
        f"of storage {storage.key}, which has {flat.size}")
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
    raise TorchPickleError(f"_codecs.encode is read for latin-1 text only, got {encoding!r}")
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
      raise TorchPickleError(f"numpy.dtype state {state!r:.80} is not that of a plain numeric "
                             "type")
    if state[1] in ("<", ">"):
      self.dtype = self.dtype.newbyteorder(state[1])


def _numpy_dtype(spec, align=False, copy=False):
  del align, copy
  if not isinstance(spec, str) or not _PLAIN_NUMPY.match(spec):
    raise TorchPickleError(f"numpy.dtype({spec!r:.40}) is not read: only plain numeric and bool "
                           "types are")
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
                           f"type {meta.get('type')!r:.40}, class_name "
                           f"{meta.get('class_name')!r:.80}")
  state = meta.get("state")
  obj = PersistentObject()
  obj.qualname, obj.version = meta["class_name"], meta.get("version")
  if state is not None:
    obj.__setstate__(state)
  return obj


def _load_from_bytes(data):
  """`torch.storage._load_from_bytes(b)`: the storage `torch.save` wrote into `b` (legacy format,
  or a zip archive), read with the same restrictions."""
  if not isinstance(data, bytes):
    raise TorchPickleError(f"torch.storage._load_from_bytes is given a {type(data).__name__}, not "
                           "bytes")
  if data[:4] == _ZIP_MAGIC:
    obj = read_archive(data, source="storage bytes")
  else:
    obj = read_legacy(data, source="storage bytes")
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
# and TorchScript classes (`__torch__.<...>`) are admitted by name pattern in `find_class`.
_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch.jit._pickle", "build_intlist"): _build_list,
    ("torch.jit._pickle", "build_floatlist"): _build_list,
    ("torch.jit._pickle", "build_doublelist"): _build_list,
    ("torch.jit._pickle", "build_boollist"): _build_list,
    ("torch.jit._pickle", "build_tensorlist"): _build_list,
    ("torch.jit._pickle", "restore_type_tag"): _restore_type_tag,
    ("_codecs", "encode"): _codecs_encode,
    ("torch.storage", "_load_from_bytes"): _load_from_bytes,
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
    ("numpy", "dtype"): _numpy_dtype,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    **{("torch", name): _TorchDtype(name) for name in _TORCH_DTYPES},
    **{tuple(q.rsplit(".", 1)): _inert_class(TorchModule, q) for q in TORCH_MODULES},
}


class _Callable(_Sealed):
  """A function of this module as a pickle sees it: callable, and sealed, so that no pickle
  changes (by BUILD) what a later pickle gets."""
  __slots__ = ("fn",)

  def __init__(self, fn: Callable[..., Any]):
    self.fn = fn

  def __call__(self, *args, **kwargs):
    return self.fn(*args, **kwargs)

  def __repr__(self):
    return f"<{self.fn.__name__}>"


def _sealed(value: Any) -> Any:
  """`value` as a pickle may see it: classes (whose `__setstate__` needs an instance) and sealed
  objects as they are, functions wrapped."""
  return value if isinstance(value, (type, _Sealed)) else _Callable(value)


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
  change them for later pickles. `source` names the file in errors.
  """

  def __init__(self, file: BinaryIO, *, source: str,
               storage: Callable[[str, np.dtype, int], np.ndarray] | None = None,
               extra_globals: dict[tuple[str, str], Any] | None = None):
    super().__init__(file)
    self.source = source
    self._storage = storage
    self._globals = {k: _sealed(v) for k, v in {**_GLOBALS, **(extra_globals or {})}.items()}
    self._script_classes: dict[str, type] = {}

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) in self._globals:
      return self._globals[(module, name)]
    if module == "torch" and name in STORAGE_DTYPES:
      return _StorageType(name, _storage_dtype(STORAGE_DTYPES[name]))
    if (module == "__torch__" or module.startswith("__torch__.")) and _SAFE_NAME.match(module) \
        and _SAFE_NAME.match(name):
      qualname = f"{module}.{name}"
      if qualname not in self._script_classes:
        self._script_classes[qualname] = _inert_class(ScriptObject, qualname)
      return self._script_classes[qualname]
    raise TorchPickleError(
        f"{self.source}: refusing the global {module}.{name}: only tensors, containers, NumPy "
        "scalars and the state of modules are read (nothing from the file is run)")

  def persistent_load(self, pid: Any) -> Any:
    if self._storage is None:
      raise TorchPickleError(f"{self.source}: the pickle references a storage ({pid!r:.80}) "
                             "outside a torch archive")
    # Zip archives: ('storage', type, key, location, numel); the legacy format adds a sixth item,
    # a storage view's metadata, which torch writes as None.
    if (not isinstance(pid, tuple) or len(pid) not in (5, 6) or pid[0] != "storage"
        or not isinstance(pid[1], _StorageType) or not isinstance(pid[1].dtype, np.dtype)
        or not isinstance(pid[2], str)
        or not isinstance(pid[4], int) or pid[4] < 0):
      raise TorchPickleError(f"{self.source}: unrecognised persistent id {pid!r:.120}")
    if len(pid) == 6 and pid[5] is not None:
      raise TorchPickleError(f"{self.source}: storage {pid[2]} is a view of another storage, "
                             "which is not read")
    kind, key, numel = pid[1], pid[2], pid[4]
    return _Storage(key, self._storage(key, kind.dtype, numel))


def _run(unpickler: RestrictedUnpickler, what: str) -> Any:
  try:
    return unpickler.load()
  except TorchPickleError as e:
    if str(e).startswith(unpickler.source):
      raise
    raise TorchPickleError(f"{unpickler.source}: {what}: {e}") from None
  except Exception as e:  # pylint: disable=broad-except  (any malformed pickle)
    raise TorchPickleError(f"{unpickler.source}: {what} is not a readable pickle: "
                           f"{type(e).__name__}: {e}") from None


def unpickle(data: bytes | BinaryIO, *, source: str = "<pickle>",
             extra_globals: dict[tuple[str, str], Any] | None = None) -> Any:
  """A plain pickle through `RestrictedUnpickler`'s restrictions: no persistent ids; storages
  embedded with `torch.storage._load_from_bytes` are read (e.g. EDM's network snapshots)."""
  file = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
  return _run(RestrictedUnpickler(file, source=source, extra_globals=extra_globals), "the pickle")


def _record_prefix(names: list[str], source: str) -> str:
  """The archive's top folder: the one holding `data.pkl`."""
  tops = sorted({n[:-len("data.pkl")] for n in names
                 if n.endswith("/data.pkl") and n.count("/") == 1})
  if len(tops) != 1:
    raise TorchPickleError(f"{source}: not a torch archive: expected one <name>/data.pkl, found "
                           f"{len(tops)}" + (f" ({', '.join(tops)})" if tops else ""))
  return tops[0]


def read_archive(file: str | os.PathLike | bytes | BinaryIO, *, source: str | None = None,
                 extra_globals: dict[tuple[str, str], Any] | None = None) -> Any:
  """The object graph of a torch zip archive (`torch.save` or TorchScript format).

  `file` is a path, the archive's bytes, or a binary file object. Tensors come back as NumPy
  arrays in the storage's dtype (native byte order), TorchScript modules as `ScriptObject`s,
  dicts, lists, tuples and OrderedDicts as themselves. Raises `TorchPickleError` (naming
  `source`, default the path) for damaged archives and refused content.
  """
  if isinstance(file, (str, os.PathLike)):
    source = source or os.fspath(file)
    if not os.path.isfile(file):
      raise FileNotFoundError(f"{source}: no such file")
  elif isinstance(file, (bytes, bytearray, memoryview)):
    source = source or "<bytes>"
    file = io.BytesIO(bytes(file))
  else:
    source = source or getattr(file, "name", "<stream>")
  try:
    archive = zipfile.ZipFile(file)
  except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
    raise TorchPickleError(f"{source}: not a torch zip archive, or damaged ({e})") from None
  with archive:
    names = archive.namelist()
    prefix = _record_prefix(names, source)

    def read(name: str) -> bytes:
      try:
        return archive.read(name)
      except KeyError:
        raise TorchPickleError(f"{source}: record {name} is missing") from None
      except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as e:
        raise TorchPickleError(f"{source}: record {name} is damaged ({e})") from None

    order = "<"
    if f"{prefix}byteorder" in names:
      byteorder = read(f"{prefix}byteorder").decode("ascii", "replace").strip()
      if byteorder not in ("little", "big"):
        raise TorchPickleError(f"{source}: unknown byte order {byteorder!r}")
      order = "<" if byteorder == "little" else ">"
    cache: dict[str, np.ndarray] = {}

    def storage(key: str, dtype: np.dtype, numel: int) -> np.ndarray:
      name = f"{prefix}data/{key}"
      if key not in cache:
        raw = read(name)
        expected = numel * dtype.itemsize
        if len(raw) < expected:
          raise TorchPickleError(f"{source}: storage {name} is truncated: {len(raw)} bytes, "
                                 f"expected {expected} ({numel} x {dtype})")
        array = np.frombuffer(raw, dtype.newbyteorder(order), count=numel)
        cache[key] = array.astype(dtype.newbyteorder("="), copy=False)
      array = cache[key]
      if array.dtype != dtype or array.size != numel:
        raise TorchPickleError(f"{source}: storage {name} is read as {numel} x {dtype} and as "
                               f"{array.size} x {array.dtype}")
      return array

    pkl = read(f"{prefix}data.pkl")
    unpickler = RestrictedUnpickler(io.BytesIO(pkl), source=source, storage=storage,
                                    extra_globals=extra_globals)
    return _run(unpickler, f"{prefix}data.pkl")


def _source_and_bytes(file: str | os.PathLike | bytes | BinaryIO,
                      source: str | None) -> tuple[str, bytes]:
  if isinstance(file, (str, os.PathLike)):
    source = source or os.fspath(file)
    if not os.path.isfile(file):
      raise FileNotFoundError(f"{source}: no such file")
    with open(file, "rb") as f:
      return source, f.read()
  if isinstance(file, (bytes, bytearray, memoryview)):
    return source or "<bytes>", bytes(file)
  return source or getattr(file, "name", "<stream>"), file.read()


def read_legacy(file: str | os.PathLike | bytes | BinaryIO, *, source: str | None = None,
                extra_globals: dict[tuple[str, str], Any] | None = None) -> Any:
  """The object graph of a file in the legacy (non-zip) `torch.save` format.

  `file` is a path, the file's bytes, or a binary file object. The storages' raw data follow the
  object pickle, and their element types and sizes are known from it only, so the object pickle
  is read twice: first with tensors left unbuilt, to record each storage's (type, size), then,
  with the storages read, for the graph. Raises `TorchPickleError` (naming `source`, default the
  path) for a wrong magic number or protocol version, damaged pickles, storages that are missing,
  short, unlisted or listed twice, and refused content.
  """
  source, data = _source_and_bytes(file, source)
  stream = io.BytesIO(data)

  def header(what: str) -> Any:
    return _run(RestrictedUnpickler(stream, source=source), what)

  try:
    magic = header("the magic number")
  except TorchPickleError as e:
    raise TorchPickleError(f"{source}: not a torch.save file (neither a zip archive nor the legacy "
                           f"format): {str(e)[len(source) + 2:]}") from None
  if type(magic) is not int or magic != LEGACY_MAGIC:  # pylint: disable=unidiomatic-typecheck
    raise TorchPickleError(f"{source}: not a torch.save file (neither a zip archive nor the legacy "
                           f"format): its first pickle holds {magic!r:.40}, not the magic number "
                           f"{LEGACY_MAGIC:#x}")
  protocol = header("the protocol version")
  if protocol != _LEGACY_PROTOCOL:
    raise TorchPickleError(f"{source}: legacy torch.save protocol version {protocol!r:.40}, "
                           f"expected {_LEGACY_PROTOCOL}")
  if not isinstance(header("the system information"), dict):
    raise TorchPickleError(f"{source}: the legacy torch.save header's system information is not "
                           "a dict")

  specs: dict[str, tuple[np.dtype, int]] = {}

  def record(key: str, dtype: np.dtype, numel: int) -> np.ndarray:
    if specs.setdefault(key, (dtype, numel)) != (dtype, numel):
      raise TorchPickleError(f"storage {key} is referenced as {specs[key][1]} x {specs[key][0]} "
                             f"and as {numel} x {dtype}")
    return np.empty(0, dtype)

  start = stream.tell()
  dry_run = {**(extra_globals or {}), **_DRY_RUN}
  _run(RestrictedUnpickler(stream, source=source, storage=record, extra_globals=dry_run),
       "the object pickle")
  end = stream.tell()
  keys = header("the storage key list")
  if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
    raise TorchPickleError(f"{source}: the storage key list is not a list of strings")

  view, at, arrays = memoryview(data), stream.tell(), {}
  for key in keys:
    if key not in specs or key in arrays:
      raise TorchPickleError(f"{source}: storage {key} is listed "
                             + ("twice" if key in arrays else "but no tensor references it"))
    dtype, numel = specs[key]
    if at + 8 > len(data):
      raise TorchPickleError(f"{source}: storage {key} is missing: the file ends at byte "
                             f"{len(data)}")
    count = int.from_bytes(view[at:at + 8], "little", signed=True)
    if count != numel:
      raise TorchPickleError(f"{source}: storage {key} holds {count} elements; its reference says "
                             f"{numel}")
    size = numel * dtype.itemsize
    if at + 8 + size > len(data):
      raise TorchPickleError(f"{source}: storage {key} is truncated: {len(data) - at - 8} bytes, "
                             f"expected {size} ({numel} x {dtype})")
    array = np.frombuffer(view[at + 8:at + 8 + size], dtype.newbyteorder("<"), count=numel)
    arrays[key] = array.astype(dtype.newbyteorder("="), copy=False)
    at += 8 + size
  unlisted = sorted(set(specs) - set(arrays))
  if unlisted:
    raise TorchPickleError(f"{source}: storage {unlisted[0]} is referenced but not in the storage "
                           "key list")

  def storage(key: str, dtype: np.dtype, numel: int) -> np.ndarray:
    if key not in arrays or arrays[key].dtype != dtype or arrays[key].size != numel:
      raise TorchPickleError(f"storage {key} is read as {numel} x {dtype} and as "
                             f"{specs.get(key)}")
    return arrays[key]

  unpickler = RestrictedUnpickler(io.BytesIO(view[start:end]), source=source, storage=storage,
                                  extra_globals=extra_globals)
  return _run(unpickler, "the object pickle")


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
  binary file object; errors name `source`, default the path."""
  if isinstance(file, (str, os.PathLike)):
    source = source or os.fspath(file)
    if not os.path.isfile(file):
      raise FileNotFoundError(f"{source}: no such file")
    with open(file, "rb") as f:
      return read_file(f, source=source, extra_globals=extra_globals)
  if isinstance(file, (bytes, bytearray, memoryview)):
    return read_file(io.BytesIO(bytes(file)), source=source or "<bytes>",
                     extra_globals=extra_globals)
  source = source or getattr(file, "name", "<stream>")
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


def _module_items(node: InertObject) -> list[tuple[str, Any]] | None:
  """A torch module's entries as `torch.nn.Module.state_dict` lists them (parameters, then the
  persistent buffers, then submodules; None entries left out), or None for other objects."""
  attrs = node.attributes
  params, buffers, modules = (attrs.get(k) for k in ("_parameters", "_buffers", "_modules"))
  if not all(isinstance(v, dict) for v in (params, buffers, modules)):
    return None
  transient = attrs.get("_non_persistent_buffers_set") or ()
  return ([(k, v) for k, v in params.items() if v is not None]
          + [(k, v) for k, v in buffers.items() if v is not None and k not in transient]
          + [(k, v) for k, v in modules.items() if v is not None])


def state_dict(obj: Any, prefix: str = "") -> dict[str, np.ndarray]:
  """Every array in an object graph, keyed by its dotted path (`net.layers.conv.weight`).

  A torch module (an `InertObject` with `_parameters`, `_buffers` and `_modules`) gives what
  `torch.nn.Module.state_dict` would: its parameters and persistent buffers, then its submodules'
  (`model.enc.16x16_conv.weight`), and none of its other attributes. Other `InertObject`s give
  their attributes, dicts their items (string keys), lists and tuples their elements (their
  index); other values are skipped. An array reached twice is listed under each path.
  """
  out: dict[str, np.ndarray] = {}
  seen: set[int] = set()

  def walk(node: Any, path: str) -> None:
    if isinstance(node, np.ndarray):
      out[path] = node
      return
    if id(node) in seen:
      return
    if isinstance(node, InertObject):
      items = _module_items(node)
      if items is None:
        items = node.attributes.items()
    elif isinstance(node, dict):
      items = ((k, v) for k, v in node.items() if isinstance(k, str))
    elif isinstance(node, (list, tuple)):
      items = ((str(i), v) for i, v in enumerate(node))
    else:
      return
    seen.add(id(node))
    for key, value in items:
      walk(value, f"{path}.{key}" if path else key)
    seen.discard(id(node))

  walk(obj, prefix)
  return out
