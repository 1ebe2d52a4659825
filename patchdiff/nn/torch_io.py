"""Weights in and out: PyTorch-layout state dicts read from files, mapped onto our NNX modules
(names, conv OIHW <-> HWIO and linear (out, in) <-> (in, out) transposes, strict checks) and back.

A network describes its differences from PyTorch as `layers`, {module class: {attribute:
(PyTorch attribute, layout)}}; every other variable keeps its attribute name and its layout. A
tensor's name is its path in the module graph (`enc.16x16_block0.conv0.weight`).
"""
from __future__ import annotations

import os
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
  """What a weights file holds: `.npz` (read with allow_pickle=False) and `.safetensors` ->
  {name: array}; `.pt`/`.pth` (a `torch.save` zip archive, TorchScript, or the legacy
  `torch.save` format) and `.pkl` (a pickle such as EDM's `network-snapshot-*.pkl`) -> its
  object graph, read by `torch_pickle.read_file` without torch and without running anything from
  the file (see `read_snapshot`)."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"weights file {path} does not exist")
  ext = os.path.splitext(path)[1].lower()
  if ext == ".npz":
    with np.load(path, allow_pickle=False) as f:
      return {k: f[k] for k in f.files}
  if ext == ".safetensors":
    from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
    try:
      return load_file(path)
    except Exception as e:  # safetensors raises its own error types for damaged files
      raise ValueError(f"cannot read weights {path}: {e}") from e
  if ext not in (".pt", ".pth", ".pkl"):
    raise ValueError(f"unsupported weights file {path}: expected .npz, .pt or .pth (PyTorch), "
                     ".pkl (an official network snapshot), or .safetensors")
  return torch_pickle.read_file(path)


_OPAQUE = object()


def _plain(value: Any) -> Any:
  """`value` as Python data (NumPy scalars as Python numbers) where it is None, a bool, number or
  string, or a list, tuple or string-keyed dict of such; else `_OPAQUE`."""
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, (list, tuple)):
    items = [_plain(v) for v in value]
    return _OPAQUE if _OPAQUE in items else tuple(items) if isinstance(value, tuple) else items
  if isinstance(value, dict) and all(isinstance(k, str) for k in value):
    items = {k: _plain(v) for k, v in value.items()}
    return _OPAQUE if _OPAQUE in items.values() else items
  return _OPAQUE


def _plain_items(attrs: Any, public: bool = False) -> dict[str, Any]:
  """The string-keyed entries of `attrs` whose values are plain (see `_plain`)."""
  if not isinstance(attrs, dict):
    return {}
  return {k: p for k, v in attrs.items() if isinstance(k, str)
          and not (public and k.startswith("_")) and (p := _plain(v)) is not _OPAQUE}


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

  Values are Python data (NumPy scalars as Python numbers). Raises `TorchPickleError` for a file
  that is damaged or names a refused global, ValueError for one without an `ema` network.
  """
  path = os.fspath(path)
  graph = read(path)
  net = graph.get("ema") if isinstance(graph, dict) else None
  state = torch_pickle.state_dict(net) if isinstance(net, torch_pickle.InertObject) else {}
  if not state:
    what = f"keys {sorted(map(str, graph))}" if isinstance(graph, dict) else type(graph).__name__
    raise ValueError(f"{path} holds no network under 'ema' ({what}); expected an official "
                     "network snapshot, dict(ema=<network>, ...)")
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
  `ema` network's (see `read_snapshot`)."""
  if os.path.splitext(os.fspath(path))[1].lower() == ".pkl":
    return read_snapshot(path)[0]
  return torch_pickle.state_dict(read(path))
