"""Weights in and out: PyTorch-layout state dicts read from files, mapped onto our NNX modules
(names, conv OIHW <-> HWIO and linear (out, in) <-> (in, out) transposes, strict checks) and back.

A network describes its differences from PyTorch as `layers`, {module class: {attribute:
(PyTorch attribute, layout)}}; every other variable keeps its attribute name and its layout. A
tensor's name is its path in the module graph (`enc.16x16_block0.conv0.weight`).
"""
from __future__ import annotations

import os
import zipfile
from typing import Any, Collection, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from patchdiff.nn import torch_pickle

CONV = "conv"  # our HWIO kernel, PyTorch's OIHW weight
LINEAR = "linear"  # our (in, out) weight, PyTorch's (out, in)
_TO_TORCH = {CONV: (3, 2, 0, 1), LINEAR: (1, 0)}
Layers = Mapping[type, Mapping[str, tuple[str, str | None]]]


def variables(module: nnx.Module, layers: Layers) -> dict[str, tuple[nnx.Variable, str | None]]:
  """PyTorch name -> (our variable, its layout) for every variable in `module`'s graph."""
  nodes = dict(nnx.iter_graph(module))
  out = {}
  for path, node in nodes.items():
    if isinstance(node, nnx.Variable):
      attr, layout = layers.get(type(nodes[path[:-1]]), {}).get(path[-1], (path[-1], None))
      out[".".join(map(str, path[:-1] + (attr,)))] = (node, layout)
  return out


def torch_shape(layout: str | None, shape) -> tuple[int, ...]:
  return tuple(shape[i] for i in _TO_TORCH[layout]) if layout else tuple(shape)


def state_dict(module: nnx.Module, layers: Layers) -> dict[str, Any]:
  """`module`'s tensors under their PyTorch names, in PyTorch layout; for an abstract module
  (`nnx.eval_shape`) `jax.ShapeDtypeStruct`s of the PyTorch shapes."""
  out = {}
  for name, (var, layout) in variables(module, layers).items():
    value = var.get_value()
    if isinstance(value, jax.ShapeDtypeStruct):
      out[name] = jax.ShapeDtypeStruct(torch_shape(layout, value.shape), value.dtype)
    else:
      value = np.asarray(value)
      out[name] = np.ascontiguousarray(value.transpose(_TO_TORCH[layout]) if layout else value)
  return out


def match(module: nnx.Module, arrays: Mapping[str, Any], layers: Layers, *,
          where: str = "state dict", what: str = "the network",
          names: Mapping[str, str] | None = None, problems: Sequence[str] = (),
          absent: Collection[str] = (), limit: int | None = None) -> dict[str, np.ndarray]:
  """`arrays` (PyTorch names and layout) checked against the variables of `module`: {name: the
  array in our layout and the variable's dtype} for every variable but those named in `absent`
  (which `arrays` need not hold). Nothing is set.

  A linear weight may come as the equivalent 1x1 conv weight (out, in, 1, 1). Unless every
  tensor fits, one ValueError lists every missing, unexpected and mis-shaped tensor with its
  shapes (at most `limit` of each kind, with the count of the rest), and the caller's own
  `problems`. `names` gives the file's name of a tensor stored under another name, for the
  messages.
  """
  names = names or {}
  targets = variables(module, layers)
  missing, unexpected, mis_shaped, values = [], [], [], {}
  for name, array in arrays.items():
    if name not in targets:
      unexpected.append(f"unexpected tensor {name} {tuple(np.shape(array))}")
      continue
    (var, layout), array = targets[name], np.asarray(array)
    expected = torch_shape(layout, var.shape)
    if layout == LINEAR and array.shape == expected + (1, 1):
      array = array.reshape(expected)
    if array.shape != expected:
      mis_shaped.append(f"{names.get(name, name)}: expected shape {expected}, got {array.shape}")
    else:
      array = array.transpose(np.argsort(_TO_TORCH[layout])) if layout else array
      values[name] = np.asarray(array, var.dtype)
  for name, (var, layout) in targets.items():
    if name not in arrays and name not in absent:
      missing.append(f"missing tensor {names.get(name, name)} {torch_shape(layout, var.shape)}")
  if missing or unexpected or mis_shaped or problems:
    raise ValueError(
        f"{where}: the tensors do not match {what} ({len(missing)} missing, {len(unexpected)} "
        f"unexpected, {len(mis_shaped)} mis-shaped):\n  "
        + "\n  ".join(_first(missing, limit) + _first(unexpected, limit)
                      + _first(mis_shaped, limit) + list(problems)))
  return values


def _first(lines: list[str], limit: int | None) -> list[str]:
  """`lines` sorted, cut to `limit` with a line counting the rest."""
  lines = sorted(lines)
  if limit is None or len(lines) <= limit:
    return lines
  return lines[:limit] + [f"... and {len(lines) - limit} more like these"]


def load(module: nnx.Module, arrays: Mapping[str, Any], layers: Layers, *,
         where: str = "state dict", what: str = "the network",
         names: Mapping[str, str] | None = None, problems: list[str] | None = None) -> None:
  """Sets every variable of `module` from `arrays` (PyTorch names and layout), in place.

  Nothing is set unless every tensor fits (see `match`, whose ValueError lists every problem).
  """
  values = match(module, arrays, layers, where=where, what=what, names=names,
                 problems=problems or ())
  for name, (var, _) in variables(module, layers).items():
    var.set_value(jnp.asarray(values[name], var.dtype))


def count_params(module: nnx.Module) -> int:
  """Trainable parameters (nnx.Param), not buffers; works on abstract modules."""
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(nnx.state(module, nnx.Param))))


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
