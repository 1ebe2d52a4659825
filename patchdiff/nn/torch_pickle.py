"""Reads PyTorch's zip archives without torch and without running anything from the file.

Two zip layouts share one scheme: `torch.save` (PyTorch >= 1.6) writes `<name>/data.pkl` plus one
raw little-endian file per storage, `<name>/data/<key>` (`<name>` is `archive` or the file's
stem), and TorchScript's `torch.jit.save` writes the same two kinds of record under its own
`<name>/` next to the TorchScript source (`<name>/code/`), which is never read here. In
`data.pkl`, a tensor is a call of `torch._utils._rebuild_tensor_v2(storage, offset, size,
stride, ...)` (or `_rebuild_parameter` around it) whose storage is a persistent id
`('storage', torch.<Type>Storage, key, location, numel)`; a TorchScript module is an object of a
class named `__torch__.<...>` whose pickled state is its attribute dict.

`RestrictedUnpickler` rebuilds exactly that and nothing else: tensors become NumPy arrays (with
the storage offset, size and stride given, copied out of the storage), TorchScript objects become
inert `ScriptObject`s (a class name and an attribute dict; no method of the file is called or
defined), containers stay containers. Any other global the pickle names (`os.system`,
`builtins.eval`, any class) is refused by name before it is looked up, with a `TorchPickleError`
naming the file. Damage (not a zip, a CRC error, a missing or short storage, a tensor reaching
outside its storage) raises a `TorchPickleError` naming the file and the problem.

Public API: `read_archive` (a zip archive -> its object graph), `unpickle` (a plain pickle
through the same restrictions; `extra_globals` admits more callables where a caller knows a
format, e.g. pickles that embed storages as bytes), `state_dict` (an object graph
-> `{dotted.name: array}`), `ScriptObject`, `TorchPickleError`.

Not read: the legacy (pre-1.6, non-zip) `torch.save` format, sparse and quantised tensors, and
storages of types not in `STORAGE_DTYPES`. A tensor pickled by plain `pickle` (not `torch.save`)
holds its storage as `torch.storage._load_from_bytes(b)`, and `b` is in that legacy format (so
written by torch 2.13), not a zip archive: such pickles need a legacy reader first.
"""
from __future__ import annotations

import collections
import io
import os
import pickle
import re
import zipfile
from typing import Any, BinaryIO, Callable

import numpy as np

__all__ = ["TorchPickleError", "ScriptObject", "RestrictedUnpickler", "STORAGE_DTYPES",
           "read_archive", "unpickle", "state_dict"]


class TorchPickleError(ValueError):
  """A file that is damaged, not in a format read here, or that names a refused global."""


# torch.<Name>Storage -> NumPy dtype name.
STORAGE_DTYPES: dict[str, str] = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64", "ComplexDoubleStorage": "complex128",
}


def _numpy_dtype(name: str) -> np.dtype:
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


class ScriptObject:
  """An inert stand-in for an object of a pickled TorchScript class (`__torch__.<...>`).

  `qualname` is the class's name in the file; `attributes` is the object's pickled state (for a
  module: its parameters, buffers, submodules and other attributes). Nothing of the class's code
  exists here: the file's TorchScript source is not read.
  """
  qualname = "__torch__"
  attributes: dict[str, Any]

  def __new__(cls, *args, **kwargs):
    if args or kwargs:
      raise TorchPickleError(f"{cls.qualname} is called with arguments; TorchScript objects are "
                             "rebuilt from their state only")
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
    return f"ScriptObject({self.qualname}, {sorted(self.attributes)})"


def _script_class(qualname: str) -> type:
  """A `ScriptObject` subclass that only records the class name."""
  return type("ScriptObject", (ScriptObject,), {"qualname": qualname})


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
}

_SAFE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


class RestrictedUnpickler(pickle.Unpickler):
  """An unpickler that builds tensors, containers and inert TorchScript objects, and nothing else.

  `storage` maps a persistent id's (key, dtype, numel) to the storage's flat array (None: the
  pickle may not reference storages). `extra_globals` admits further `(module, name) ->
  callable` entries; everything else that the pickle names is refused in `find_class`, before
  any lookup, so no module is imported and nothing from the file runs. `source` names the file
  in errors.
  """

  def __init__(self, file: BinaryIO, *, source: str,
               storage: Callable[[str, np.dtype, int], np.ndarray] | None = None,
               extra_globals: dict[tuple[str, str], Any] | None = None):
    super().__init__(file)
    self.source = source
    self._storage = storage
    self._globals = {**_GLOBALS, **(extra_globals or {})}
    self._script_classes: dict[str, type] = {}

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) in self._globals:
      return self._globals[(module, name)]
    if module == "torch" and name in STORAGE_DTYPES:
      return _StorageType(name, _numpy_dtype(STORAGE_DTYPES[name]))
    if (module == "__torch__" or module.startswith("__torch__.")) and _SAFE_NAME.match(module) \
        and _SAFE_NAME.match(name):
      qualname = f"{module}.{name}"
      if qualname not in self._script_classes:
        self._script_classes[qualname] = _script_class(qualname)
      return self._script_classes[qualname]
    raise TorchPickleError(
        f"{self.source}: refusing the global {module}.{name}: only tensors, containers and "
        "TorchScript module data are read (nothing from the file is run)")

  def persistent_load(self, pid: Any) -> Any:
    if self._storage is None:
      raise TorchPickleError(f"{self.source}: the pickle references a storage ({pid!r:.80}) "
                             "outside a torch archive")
    if (not isinstance(pid, tuple) or len(pid) != 5 or pid[0] != "storage"
        or not isinstance(pid[1], _StorageType) or not isinstance(pid[1].dtype, np.dtype)
        or not isinstance(pid[2], str)
        or not isinstance(pid[4], int) or pid[4] < 0):
      raise TorchPickleError(f"{self.source}: unrecognised persistent id {pid!r:.120}")
    _, kind, key, _, numel = pid
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
  """A plain pickle (no storages) through `RestrictedUnpickler`'s restrictions."""
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


def state_dict(obj: Any, prefix: str = "") -> dict[str, np.ndarray]:
  """Every array in an object graph, keyed by its dotted path (`net.layers.conv.weight`).

  Walks `ScriptObject` attributes, dict items (string keys) and list/tuple elements (their
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
    if isinstance(node, ScriptObject):
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
