"""What the restricted unpickler builds in place of the file's objects: storage types and
storages (`_StorageType`, `_Storage`), `OrderedDict`s as dicts without instance attributes
(`_PickledDict`, so a state dict's `_metadata` is dropped), torch dtypes by name
(`_TorchDtype`), and inert stand-ins that hold a class name and the pickled state
(`InertObject`: TorchScript objects `ScriptObject`, `torch_utils.persistence` objects
`PersistentObject`, the few `torch.nn` modules in `unpickler.TORCH_MODULES` `TorchModule`). No
method of the file is called or defined; pickle's BUILD may not change the `_Sealed` ones.
"""
from __future__ import annotations

import re
from typing import Any

import numpy as np

from patchdiff.weights.read_context import TorchPickleError, _cut


# torch.<Name>Storage -> NumPy dtype name.
STORAGE_DTYPES: dict[str, str] = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64", "ComplexDoubleStorage": "complex128",
}

_SAFE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


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


class _TorchDtype(_Sealed):
  """A pickled `torch.<dtype>` (e.g. `torch.float32`), kept as its name."""
  __slots__ = ("name",)

  def __init__(self, name: str):
    self.name = name

  def __repr__(self):
    return f"torch.{self.name}"
