"""Weights in and out: PyTorch-layout state dicts mapped onto our NNX modules (names, conv OIHW <->
HWIO and linear (out, in) <-> (in, out) transposes, strict checks) and back. Reading weight files
is `patchdiff.weights`' job (re-exported here: `read`, `read_state_dict`, `read_snapshot`).

A network describes its differences from PyTorch as `layers`, {module class: {attribute:
(PyTorch attribute, layout)}}; every other variable keeps its attribute name and its layout. A
tensor's name is its path in the module graph (`enc.16x16_block0.conv0.weight`).
"""
from __future__ import annotations

from typing import Any, Collection, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from patchdiff.weights.files import read, read_snapshot, read_state_dict  # noqa: F401

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
