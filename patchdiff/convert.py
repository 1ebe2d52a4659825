"""Loads weights of the official PyTorch networks (Patch_EDMPrecond state dicts) into our denoiser.

As a program it turns an `.npz` (or, where torch is installed, a `.pt`/`.pth` state dict) into an
orbax checkpoint that `--mode=sample` restores:

  python -m patchdiff.convert --config=configs/ffhq64.py --input=weights.npz --output=DIR
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from patchdiff.nn import edm, models, networks

# Buffers of the official modules that we recompute instead of storing.
_DERIVED_SUFFIXES = (".resample_filter",)


def _torch_layout_to_ours(name: str, kind: str, array: np.ndarray) -> np.ndarray:
  if kind == "conv_weight":  # OIHW -> HWIO
    return np.transpose(array, (2, 3, 1, 0))
  if kind == "linear_weight":  # (out, in) -> (in, out)
    return np.transpose(array, (1, 0))
  return array


def _variables(denoiser: nnx.Module) -> dict[str, tuple[nnx.Variable, str]]:
  """Official tensor name -> (our variable, layout kind), found by walking the module graph."""
  out = {}
  for path, node in nnx.iter_graph(denoiser):
    if not isinstance(node, nnx.Variable) or not path:
      continue
    name = ".".join(str(p) for p in path)
    parent = denoiser
    for p in path[:-1]:
      parent = parent[p] if isinstance(parent, nnx.Dict) else getattr(parent, p)
    kind = "plain"
    if path[-1] == "weight" and isinstance(parent, networks.Conv2d):
      kind = "conv_weight"
    elif path[-1] == "weight" and isinstance(parent, networks.Linear):
      kind = "linear_weight"
    out[name] = (node, kind)
  return out


def _check_derived(name: str, array: np.ndarray, denoiser: nnx.Module, problems: list[str]):
  """A resample_filter in the file must be the filter our config builds."""
  path = name[: -len(".resample_filter")].split(".")
  node = denoiser
  try:
    for p in path:
      node = node[p] if isinstance(node, nnx.Dict) else getattr(node, p)
  except (AttributeError, KeyError):
    problems.append(f"unknown tensor {name} {tuple(array.shape)}")
    return
  if not isinstance(node, networks.Conv2d) or not (node.up or node.down):
    problems.append(f"unknown tensor {name} {tuple(array.shape)}: {'.'.join(path)} resamples nothing")
    return
  expected = networks._resample_filter(node.resample_filter)[None, None]
  if array.shape != expected.shape or not np.allclose(array, expected, atol=1e-6):
    problems.append(f"{name}: resample filter {array.reshape(-1).tolist()} does not match the "
                    f"config's resample_filter {list(node.resample_filter)}")


def load_torch_state_dict(state_dict: Mapping[str, Any], model_config) -> edm.Denoiser:
  """The preconditioned denoiser of `model_config` holding the official weights `state_dict`.

  `state_dict` maps official tensor names (`model.enc.64x64_conv.weight`, ...) to arrays in
  PyTorch layout. Unknown, missing or mis-shaped tensors raise one ValueError listing them all.
  """
  arrays = {k: np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v)
            for k, v in state_dict.items()}
  if arrays and not any(k.startswith("model.") for k in arrays):
    arrays = {"model." + k: v for k, v in arrays.items()}  # a bare backbone state dict
  denoiser = models.abstract_denoiser(model_config)  # every variable is filled below
  ours = _variables(denoiser)
  problems: list[str] = []
  for name, array in arrays.items():
    if name.endswith(_DERIVED_SUFFIXES):
      _check_derived(name, array, denoiser, problems)
      continue
    if name not in ours:
      problems.append(f"unknown tensor {name} {tuple(array.shape)}")
      continue
    var, kind = ours[name]
    value = _torch_layout_to_ours(name, kind, array)
    if value.shape != var.shape:
      expected = _ours_to_torch_shape(kind, var.shape)
      problems.append(f"{name}: shape {tuple(array.shape)} does not match the config's {expected}")
      continue
    var.set_value(jnp.asarray(value, dtype=var.dtype))
  missing = sorted(set(ours) - set(arrays))
  problems += [f"missing tensor {name} {_ours_to_torch_shape(ours[name][1], ours[name][0].shape)}"
               for name in missing]
  if problems:
    raise ValueError("state dict does not fit the model config:\n  " + "\n  ".join(problems))
  return denoiser


def _ours_to_torch_shape(kind: str, shape) -> tuple[int, ...]:
  if kind == "conv_weight":
    return (shape[3], shape[2], shape[0], shape[1])
  if kind == "linear_weight":
    return (shape[1], shape[0])
  return tuple(shape)


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """Arrays by name from an `.npz` or a PyTorch `.pt`/`.pth` state dict (needs torch)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"weights file {path} does not exist")
  if path.endswith(".npz"):
    with np.load(path, allow_pickle=False) as f:
      return {k: f[k] for k in f.files}
  if path.endswith((".pt", ".pth")):
    try:
      import torch  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      raise ImportError(f"reading {path} needs torch; or save it as .npz with numpy") from e
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(sd, Mapping):
      raise ValueError(f"{path} holds a {type(sd).__name__}, not a state dict")
    return {k: v.float().numpy() for k, v in sd.items()}
  raise ValueError(f"weights file {path}: expected .npz, .pt or .pth")


def main(argv):
  from absl import flags  # pylint: disable=import-outside-toplevel
  from patchdiff import checkpoint  # pylint: disable=import-outside-toplevel
  cfg = flags.FLAGS.config
  sd = read_state_dict(flags.FLAGS.input)
  denoiser = load_torch_state_dict(sd, cfg.model)
  _, params, buffers = nnx.split(denoiser, nnx.Param, ...)
  checkpoint.save_weights(flags.FLAGS.output, dict(params=params, buffers=buffers), cfg, step=0)
  print(f"wrote {models.count_params(denoiser):,} parameters to {flags.FLAGS.output}")


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  config_flags.DEFINE_config_file("config", None, "experiment config file", lock_config=True)
  flags.DEFINE_string("input", None, "official weights: .npz or .pt/.pth state dict")
  flags.DEFINE_string("output", None, "workdir to write the orbax checkpoint into")
  flags.mark_flags_as_required(["config", "input", "output"])
  app.run(main)
