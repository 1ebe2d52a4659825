"""An object graph's arrays under their `torch.nn.Module.state_dict` names (`state_dict`), by a
walk that is iterative and bounded: `STATE_DICT_DEPTH`, `STATE_DICT_NAME_CHARS`, and
`STATE_DICT_STEPS` plus `STATE_DICT_REVISITS` times the entries of the distinct containers.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from patchdiff.weights.inert_objects import InertObject
from patchdiff.weights.read_context import TorchPickleError, short_repr


STATE_DICT_DEPTH = 256  # nesting of containers under a state-dict name
STATE_DICT_NAME_CHARS = 64 << 20  # characters of all state-dict names together
# Steps of the state-dict walk (a container's visit and each of its entries): at most
# STATE_DICT_STEPS plus STATE_DICT_REVISITS times the entries of the distinct containers.
STATE_DICT_STEPS, STATE_DICT_REVISITS = 1 << 16, 4


def _module_items(node: InertObject) -> list[tuple[str, Any]] | None:
  """A torch module's entries as `torch.nn.Module.state_dict` lists them (parameters, then the
  persistent buffers, then submodules; None entries left out), or None for other objects."""
  attrs = node.attributes
  params, buffers, modules = (attrs.get(k) for k in ("_parameters", "_buffers", "_modules"))
  if not all(isinstance(v, dict) for v in (params, buffers, modules)):
    return None
  transient = attrs.get("_non_persistent_buffers_set")
  transient = transient if isinstance(transient, (set, frozenset, list, tuple)) else ()
  transient = {k for k in transient if isinstance(k, str)}
  return ([(k, v) for k, v in params.items() if v is not None]
          + [(k, v) for k, v in buffers.items() if v is not None and k not in transient]
          + [(k, v) for k, v in modules.items() if v is not None])


_WALKED = (np.ndarray, InertObject, dict, list, tuple)  # what `state_dict` names or enters


def _items(node: Any) -> tuple[list[tuple[Any, Any]], int] | None:
  """A container's (key, value) entries that `state_dict` walks (arrays and containers) and its
  count of entries, or None for leaves."""
  if isinstance(node, InertObject):
    items = _module_items(node)
    items = list(node.attributes.items()) if items is None else items
    return [(k, v) for k, v in items if isinstance(v, _WALKED)], len(items)
  if isinstance(node, dict):
    return [(k, v) for k, v in node.items() if isinstance(v, _WALKED)], len(node)
  if isinstance(node, (list, tuple)):
    return [(str(i), v) for i, v in enumerate(node) if isinstance(v, _WALKED)], len(node)
  return None


def state_dict(obj: Any, prefix: str = "", *, source: str = "<object graph>"
               ) -> dict[str, np.ndarray]:
  """Every array in an object graph, keyed by its dotted path (`net.layers.conv.weight`).

  A torch module (an `InertObject` with `_parameters`, `_buffers` and `_modules`) gives what
  `torch.nn.Module.state_dict` would: its parameters and persistent buffers, then its submodules'
  (`model.enc.16x16_conv.weight`), and none of its other attributes. Other `InertObject`s give
  their attributes, dicts their items, lists and tuples their elements (their index); other
  values are skipped, and so is a container met again inside itself. An array reached by two
  paths is listed under each (a module shared by two parents, as torch lists it).

  The walk is iterative and bounded: raises TorchPickleError, naming `source`, for a name that
  two different arrays would take (`{"a.b": t1, "a": {"b": t2}}`, or a parameter `x.weight` next
  to a submodule `x`), an array under a key that is not a string, containers nested deeper than
  `STATE_DICT_DEPTH`, more than `STATE_DICT_NAME_CHARS` characters of names, and a walk longer
  than `STATE_DICT_STEPS` plus `STATE_DICT_REVISITS` times the entries of the distinct
  containers (a graph of shared lists built to expand: each path to a container walks it
  again).
  """
  out: dict[str, np.ndarray] = {}
  seen: set[int] = set()
  on_path: set[int] = set()
  steps = unique = chars = 0
  # The stack holds (node, path, depth) to visit, or (None, node id, -1) to leave a container; a
  # path is (parent path, key) or None, its name built only for an array.
  stack: list[tuple[Any, Any, int]] = [(obj, (None, prefix) if prefix else None, 0)]

  def name_of(path) -> tuple[str, Any]:
    """The dotted name of `path` (a key that is not a string as `<type>`), and the first such
    key's type (None where every key is a string)."""
    keys = []
    while path is not None:
      path, key = path
      keys.append(key)
    keys.reverse()
    odd = next((type(k) for k in keys if not isinstance(k, str)), None)
    return ".".join(k if isinstance(k, str) else f"<{type(k).__name__}>" for k in keys), odd

  def where(path) -> str:
    name = name_of(path)[0]
    return short_repr(name) if name else "the top level"

  while stack:
    node, path, depth = stack.pop()
    if depth < 0:
      on_path.discard(path)
      continue
    if isinstance(node, np.ndarray):
      if path is None:
        raise TorchPickleError(f"{source}: the object graph is one array, which has no name")
      name, odd = name_of(path)
      if odd is not None:
        raise TorchPickleError(f"{source}: a tensor at {short_repr(name)} is under a key of type "
                               f"{odd.__name__}; state-dict names are strings")
      chars += len(name)
      if chars > STATE_DICT_NAME_CHARS:
        raise TorchPickleError(f"{source}: the state dict's names exceed "
                               f"{STATE_DICT_NAME_CHARS} characters")
      if name in out and out[name] is not node:
        raise TorchPickleError(f"{source}: two tensors are named {short_repr(name)}")
      out[name] = node
      continue
    found = _items(node)
    if found is None or id(node) in on_path:
      continue
    items, count = found
    if depth >= STATE_DICT_DEPTH:
      raise TorchPickleError(f"{source}: containers nest deeper than {STATE_DICT_DEPTH} under "
                             f"{where(path)}")
    if id(node) not in seen:
      seen.add(id(node))
      unique += 1 + count
    steps += 1 + count
    if steps > STATE_DICT_STEPS + STATE_DICT_REVISITS * unique:
      raise TorchPickleError(
          f"{source}: walking the object graph takes more than {steps} steps for its "
          f"{len(seen)} containers of {unique} entries (shared containers reached by many "
          "paths)")
    on_path.add(id(node))
    stack.append((None, id(node), -1))
    for key, value in reversed(items):
      stack.append((value, (path, key), depth + 1))
  return out
