"""Stand-ins for the globals that plain pickles (`pickle.dump`) name beyond torch's tensors,
such as the `network-snapshot-*.pkl` files of NVIDIA's EDM training loop: `dict(ema=<network>,
loss_fn=..., augment_pipe=..., dataset_kwargs=...)`.

- A tensor's storage there is `torch.storage._load_from_bytes(b)`, where `b` is a `torch.save` of
  the storage alone (legacy format, or a zip archive). `_load_from_bytes` reads it with the same
  restrictions and budget, one level deep, each bytes object once, by the reader that
  `torch_archive` gives (`read_storage_bytes_with`; until then it refuses).
- The network and the loss are `torch_utils.persistence` objects:
  `_reconstruct_persistent_obj(meta)` with the class's Python source (`meta['module_src']`),
  which a normal unpickler runs, its name and the object's state. Here they become
  `PersistentObject`s; the source is dropped unread.
- NumPy scalars of plain numeric types (`numpy.dtype`, `numpy.core.multiarray.scalar`) become
  NumPy scalars, and protocol-2 pickles' bytes (`_codecs.encode` of latin-1 text) bytes.
"""
from __future__ import annotations

import re
from typing import Any, Callable

import numpy as np

from patchdiff.weights.inert_objects import _SAFE_NAME, PersistentObject, _Storage
from patchdiff.weights.read_context import TorchPickleError, _Read, short_repr


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


# The reader of storage bytes (`torch_archive`'s zip and legacy readers), set by
# `read_storage_bytes_with`: `torch_archive` imports this module and gives it on import.
_STORAGE_READER: list[Callable[[bytes, _Read], Any]] = []


def read_storage_bytes_with(reader: Callable[[bytes, _Read], Any]) -> None:
  """Makes `reader(data, read)` (a `torch.save` file's bytes and the nested read -> the object
  they hold) the reader of `torch.storage._load_from_bytes`."""
  _STORAGE_READER[:] = [reader]


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
  if not _STORAGE_READER:
    raise TorchPickleError("torch.storage._load_from_bytes is read by "
                           "patchdiff.weights.torch_archive, which is not imported")
  obj = _STORAGE_READER[0](data, inner)
  if not isinstance(obj, _Storage):
    raise TorchPickleError(f"storage bytes hold a {type(obj).__name__}, not a storage")
  return obj
