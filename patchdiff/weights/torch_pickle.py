"""Reads files that PyTorch writes, without torch and without running anything from the file: the
readers' public import path. Each part lives in the module that does its job:

- `torch_archive`: the three containers, told apart by their first bytes (`read_file`): torch
  zip archives (`torch.save` >= 1.6, TorchScript; `read_archive`), the legacy (non-zip)
  `torch.save` format (`read_legacy`), and plain pickles (`unpickle`) such as the
  `network-snapshot-*.pkl` files of NVIDIA's EDM training loop; the checks of zip records
  (`zip_records`, `check_zip_record`).
- `pickle_scan`: each pickle, scanned opcode by opcode before it is unpickled, within the
  bounds `OBJECT_BUDGET`, `KEY_DEPTH` and `RISKY_KEYS`.
- `unpickler`: `RestrictedUnpickler`, its one allow-list of globals, and the tensor stand-ins
  (a tensor becomes a NumPy array copied out of its storage, within the storage).
- `inert_objects`: what stands in for the file's objects (`InertObject`, `ScriptObject`,
  `PersistentObject`, `TorchModule`; storages, dtypes, `OrderedDict`s as dicts).
- `snapshot_pkl`: the stand-ins that plain pickles need (`torch_utils.persistence` objects, whose
  class source is dropped unread, storages saved as bytes, NumPy scalars).
- `state_dicts`: `state_dict` (an object graph -> `{dotted.name: array}`, with
  `torch.nn.Module.state_dict`'s names for modules, bounded as its docstring says).
- `read_context`: `TorchPickleError`, `reading` (a context in which any failure becomes a
  `TorchPickleError` naming the file), `short_repr`, and one file's read and its budget.

The work a file can cause is bounded by what it declares, and checked before it is done; each
module names the bounds it checks. Every failure is a `TorchPickleError` whose message begins
with the file's name.

Public API: `read_file` (any of the three -> its object graph), `read_archive`, `read_legacy`,
`unpickle` (`extra_globals` admits more callables where a caller knows a format), `state_dict`,
`InertObject`, `ScriptObject`, `PersistentObject`, `TorchModule`, `TorchPickleError`; for other
readers of weight files, `reading`, `zip_records`, `check_zip_record` and `short_repr`.

Not read: sparse and quantised tensors, storages of types not in `STORAGE_DTYPES`, storage views
in legacy files (a persistent id whose sixth item is not None), and NumPy arrays (only NumPy
scalars).
"""
from __future__ import annotations

from patchdiff.weights.inert_objects import (STORAGE_DTYPES, InertObject, PersistentObject,
                                             ScriptObject, TorchModule)
from patchdiff.weights.read_context import TorchPickleError, reading, short_repr
from patchdiff.weights.state_dicts import state_dict
from patchdiff.weights.torch_archive import (LEGACY_MAGIC, check_zip_record, read_archive,
                                             read_file, read_legacy, unpickle, zip_records)
from patchdiff.weights.unpickler import TORCH_MODULES, RestrictedUnpickler
# Tests check that no pickle changes it.
from patchdiff.weights.unpickler import _rebuild_tensor_v2  # noqa: F401

__all__ = ["TorchPickleError", "InertObject", "ScriptObject", "PersistentObject", "TorchModule",
           "RestrictedUnpickler", "STORAGE_DTYPES", "TORCH_MODULES", "LEGACY_MAGIC", "read_file",
           "read_archive", "read_legacy", "unpickle", "state_dict", "reading", "zip_records",
           "check_zip_record", "short_repr"]
