"""The restricted unpickler: one allow-list of globals, each an inert reconstruction, and
`_load`, which scans a pickle and unpickles it.

In torch's pickles, a tensor is a call of `torch._utils._rebuild_tensor_v2(storage, offset,
size, stride, ...)` (or `_rebuild_parameter` around it) whose storage is a persistent id
`('storage', torch.<Type>Storage, key, location, numel)` (legacy: with a sixth item, None), or
the result of `_load_from_bytes`. Several tensors may view one storage.

`RestrictedUnpickler` rebuilds exactly that and nothing else: tensors become NumPy arrays (with
the storage offset, size and stride given, copied out of the storage), objects become inert
stand-ins (`inert_objects`; no method of the file is called or defined, and the persistent
classes' source is dropped unread), NumPy scalars of plain numeric types become NumPy scalars
(`snapshot_pkl`), `OrderedDict`s become dicts, other containers stay containers. The globals it
admits are the one table `_GLOBALS` with `_PER_READ` (plus the storage types and TorchScript
classes); any other global the pickle names (`os.system`, `builtins.eval`, any class) is
refused by name before it is looked up. A tensor may not reach outside its storage nor have more
elements than it (zero and overlapping strides included), and its copy is spent from the read's
budget (`_Read.copy`).
"""
from __future__ import annotations

import functools
import pickle
from typing import Any, BinaryIO, Callable

import numpy as np

from patchdiff.weights.inert_objects import (_SAFE_NAME, STORAGE_DTYPES, ScriptObject, TorchModule,
                                             _inert_class, _ordered_dict, _Sealed, _Storage,
                                             _storage_dtype, _StorageType, _TorchDtype)
from patchdiff.weights.pickle_scan import _scan
from patchdiff.weights.read_context import (TorchPickleError, _cut, _describe, _is_int, _Read,
                                            short_repr)
from patchdiff.weights.snapshot_pkl import (_codecs_encode, _load_from_bytes, _numpy_dtype,
                                            _numpy_scalar, _reconstruct_persistent_obj)


_MAX_DIMS = 64
_MAX_EXTENT = 1 << 62  # bound on a tensor's size, stride, offset and a storage's element count


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


# ---------------------------------------------------------------------------------------------
# The allow-list, and the unpickler that admits it alone.


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
  """A function of the allow-list as a pickle sees it: callable, and sealed, so that no pickle
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
