"""Weight files read without torch and without running anything from them: `.npz` (each record's
size checked, object arrays refused), `.safetensors`, `.pt`/`.pth` (torch zip archives,
TorchScript, the legacy `torch.save` format) and official `network-snapshot-*.pkl` files
(`torch_pickle`: one allow-list of inert reconstructions, memory and time bounded by what the file
declares). `read_state_dict` gives a file's tensors under their `state_dict()` names,
`read_snapshot` a snapshot's `ema` network and what the file says about it.
"""
from __future__ import annotations

import os
import zipfile
from typing import Any

import numpy as np

from patchdiff.weights import torch_pickle


def read(path: str | os.PathLike) -> Any:
  """What a weights file holds: `.npz` (no pickled objects) and `.safetensors` -> {name:
  array}; `.pt`/`.pth` (a `torch.save` zip archive, TorchScript, or the legacy `torch.save`
  format) and `.pkl` (a pickle such as EDM's `network-snapshot-*.pkl`) -> its object graph, read
  by `torch_pickle.read_file` without torch and without running anything from the file (see
  `read_snapshot`).

  Raises FileNotFoundError for a missing file, ValueError for an unsupported extension, and
  `TorchPickleError` (a ValueError whose message begins with the path) for anything else that
  goes wrong reading the file.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"weights file {path} does not exist")
  ext = os.path.splitext(path)[1].lower()
  if ext not in (".npz", ".safetensors", ".pt", ".pth", ".pkl"):
    raise ValueError(f"unsupported weights file {path}: expected .npz, .pt or .pth (PyTorch), "
                     ".pkl (an official network snapshot), or .safetensors")
  if ext == ".safetensors":
    from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
    with torch_pickle.reading(f"{path}: cannot read weights"):
      return load_file(path)
  with torch_pickle.reading(path):
    return _read_npz(path) if ext == ".npz" else torch_pickle.read_file(path)


def _read_npz(path: str) -> dict[str, np.ndarray]:
  """The arrays of an `.npz` (`np.savez`: a zip archive of `.npy` records), each record's size
  checked against its header before its data is read; pickled (object) arrays are refused."""
  out = {}
  with open(path, "rb") as f:
    size = os.fstat(f.fileno()).st_size
    with zipfile.ZipFile(f) as archive:
      for name, info in torch_pickle.zip_records(archive, path).items():
        torch_pickle.check_zip_record(info, size, path)
        if not name.endswith(".npy"):
          raise torch_pickle.TorchPickleError(f"{path}: record {name[:80]} is not an .npy array")
        with archive.open(info) as member:
          version = np.lib.format.read_magic(member)
          if version not in ((1, 0), (2, 0)):
            raise torch_pickle.TorchPickleError(f"{path}: {name[:80]} has .npy version {version}")
          header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                    else np.lib.format.read_array_header_2_0)
          shape, fortran, dtype = header(member)
          if dtype.hasobject:
            raise torch_pickle.TorchPickleError(f"{path}: {name[:80]} holds Python objects, which "
                                                "are not read")
          nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
          if info.file_size != member.tell() + nbytes:
            raise torch_pickle.TorchPickleError(
                f"{path}: {name[:80]} holds {info.file_size - member.tell()} bytes of data; its "
                f"header declares {shape} x {dtype} ({nbytes} bytes)")
          data = member.read(nbytes)
        if len(data) != nbytes:
          raise torch_pickle.TorchPickleError(f"{path}: {name[:80]} is truncated")
        array = np.frombuffer(data, dtype).reshape(shape, order="F" if fortran else "C")
        out[name[:-len(".npy")]] = np.array(array, copy=True)
  return out


_OPAQUE = object()
PLAIN_ITEMS, PLAIN_DEPTH = 100_000, 32  # bounds on the plain data `read_snapshot` copies


class _Allowance:
  """How many more container entries `_plain` may copy."""
  __slots__ = ("left",)

  def __init__(self, left: int):
    self.left = left


def _scalar(value: Any) -> Any:
  """A leaf as Python data: None, a bool, number or string as itself, a NumPy scalar as a Python
  number; `_OPAQUE` for anything else."""
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  if isinstance(value, np.generic):
    return value.item()
  return _OPAQUE


def _plain(value: Any, allowance: _Allowance | None = None) -> Any:
  """`value` as Python data (NumPy scalars as Python numbers) where it is None, a bool, number or
  string, or a list, tuple or string-keyed dict of such; else `_OPAQUE`. The walk is iterative:
  a value nested deeper than `PLAIN_DEPTH`, holding itself, or with more entries than
  `allowance` has left (default `PLAIN_ITEMS`) is `_OPAQUE` too."""
  allowance = allowance or _Allowance(PLAIN_ITEMS)
  if not isinstance(value, (list, tuple, dict)):
    return _scalar(value)
  # Frames of (container, its entries' iterator, the entries copied so far).
  frames = [(value, iter(value.items() if isinstance(value, dict) else value), [])]
  on_path = {id(value)}
  while True:
    node, entries, copied = frames[-1]
    entry = next(entries, _OPAQUE)
    if entry is _OPAQUE:  # the container is done
      frames.pop()
      on_path.discard(id(node))
      done = (dict(copied) if isinstance(node, dict) else tuple(copied)
              if isinstance(node, tuple) else copied)
      if not frames:
        return done
      parent, _, siblings = frames[-1]  # its last entry holds the container's place
      siblings[-1] = (siblings[-1][0], done) if isinstance(parent, dict) else done
      continue
    allowance.left -= 1
    if allowance.left < 0:
      return _OPAQUE
    key, child = entry if isinstance(node, dict) else (None, entry)
    if isinstance(node, dict) and not isinstance(key, str):
      return _OPAQUE
    if isinstance(child, (list, tuple, dict)):
      if len(frames) >= PLAIN_DEPTH or id(child) in on_path:
        return _OPAQUE
      copied.append((key, None) if isinstance(node, dict) else None)  # filled when it is done
      frames.append((child, iter(child.items() if isinstance(child, dict) else child), []))
      on_path.add(id(child))
      continue
    leaf = _scalar(child)
    if leaf is _OPAQUE:
      return _OPAQUE
    copied.append((key, leaf) if isinstance(node, dict) else leaf)


def _plain_items(attrs: Any, public: bool = False) -> dict[str, Any]:
  """The string-keyed entries of `attrs` whose values are plain (see `_plain`), sharing one
  allowance of `PLAIN_ITEMS` entries."""
  if not isinstance(attrs, dict):
    return {}
  allowance = _Allowance(PLAIN_ITEMS)
  return {k: p for k, v in attrs.items() if isinstance(k, str)
          and not (public and k.startswith("_")) and (p := _plain(v, allowance)) is not _OPAQUE}


def read_snapshot(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """The `ema` network of an official `network-snapshot-*.pkl` (EDM / Patch Diffusion training):
  its state dict, named as `torch.nn.Module.state_dict` names it (`model.enc.16x16_conv.weight`),
  and what the file says about it:

  - `class_name`: the network's class (`Patch_EDMPrecond`, `EDMPrecond`, ...);
  - `model_class`: the class of its `model` submodule (`SongUNet`, `DhariwalUNet`), or None;
  - `init_args`, `init_kwargs`: the arguments the network was built with, as
    `torch_utils.persistence` records them (empty where absent; kwargs with plain values only);
  - `attributes`: its other public attributes with plain values (`img_resolution`,
    `img_channels` (with the coordinate channels for patch networks), `label_dim`, `use_fp16`,
    `sigma_min`, `sigma_max`, `sigma_data`, ...).

  Values are Python data (NumPy scalars as Python numbers; values larger or deeper than `_plain`
  copies are left out). Raises `TorchPickleError` (a ValueError naming the file) for a file that
  is damaged, names a refused global, has no `ema` network, or whose network's state dict
  `torch_pickle.state_dict` refuses.
  """
  path = os.fspath(path)
  graph = read(path)
  with torch_pickle.reading(path):
    net = graph.get("ema") if isinstance(graph, dict) else None
    state = (torch_pickle.state_dict(net, source=path)
             if isinstance(net, torch_pickle.InertObject) else {})
    if not state:
      if isinstance(graph, dict):
        names = sorted(k for k in graph if isinstance(k, str))
        what = f"keys {[n[:60] for n in names[:20]]}" + (
            f" and {len(graph) - 20} more" if len(graph) > 20 else "")
      else:
        what = type(graph).__name__
      raise torch_pickle.TorchPickleError(
          f"{path} holds no network under 'ema' ({what}); expected an official network "
          "snapshot, dict(ema=<network>, ...)")
    attrs = net.attributes
    modules = attrs.get("_modules")
    model = modules.get("model") if isinstance(modules, dict) else None
    init_args = _plain(attrs.get("_init_args", ()))
    info = {
        "class_name": net.qualname,
        "model_class": model.qualname if isinstance(model, torch_pickle.InertObject) else None,
        "init_args": list(init_args) if isinstance(init_args, (list, tuple)) else [],
        "init_kwargs": _plain_items(attrs.get("_init_kwargs")),
        "attributes": _plain_items(attrs, public=True),
    }
  return state, info


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Arrays by dotted name from a weights file (see `read`); for a `.pkl` network snapshot, its
  `ema` network's (see `read_snapshot`). Errors as `read`'s, and `torch_pickle.state_dict`'s
  (two tensors under one name, say), naming the file."""
  path = os.fspath(path)
  if os.path.splitext(path)[1].lower() == ".pkl":
    return read_snapshot(path)[0]
  graph = read(path)
  with torch_pickle.reading(path):
    return torch_pickle.state_dict(graph, source=path)
