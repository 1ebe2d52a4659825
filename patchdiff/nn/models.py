"""Builds the preconditioned denoiser from a `model` config (EDM's keyword names), checks the
config, and loads the official PyTorch weights (Patch_EDMPrecond state dicts) into it.

The small name -> class table here is the project's only registry of backbones.
"""
from __future__ import annotations

import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from patchdiff import xla_options
from patchdiff.nn import edm, networks, torch_io

COORD_CHANNELS = 2

# EDM's defaults per architecture (its train.py and network constructors). A key a config leaves
# out takes these values.
_COMMON = dict(label_dim=0, channel_mult_emb=4, dropout=0.13, label_dropout=0.0, augment_dim=0)
ARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "ddpmpp": dict(_COMMON, model_channels=128, channel_mult=(2, 2, 2), num_blocks=4,
                   attn_resolutions=(16,), embedding_type="positional", channel_mult_noise=1,
                   encoder_type="standard", decoder_type="standard", resample_filter=(1, 1)),
    "ncsnpp": dict(_COMMON, model_channels=128, channel_mult=(2, 2, 2), num_blocks=4,
                   attn_resolutions=(16,), embedding_type="fourier", channel_mult_noise=2,
                   encoder_type="residual", decoder_type="standard", resample_filter=(1, 3, 3, 1)),
    "adm": dict(_COMMON, model_channels=192, channel_mult=(1, 2, 3, 4), num_blocks=3,
                attn_resolutions=(32, 16, 8)),
}
BACKBONES = {"ddpmpp": networks.SongUNet, "ncsnpp": networks.SongUNet,
             "adm": networks.DhariwalUNet}
_TOP_KEYS = ("arch", "img_resolution", "img_channels", "out_channels", "sigma_data", "dtype")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def resolve(model_config: Mapping[str, Any]) -> dict[str, Any]:
  """The full set of model hyperparameters: the config's values over the arch defaults.

  Raises ValueError naming the key for anything unknown or inconsistent.
  """
  cfg = dict(model_config.to_dict() if isinstance(model_config, ml_collections.ConfigDict)
             else model_config)
  arch = cfg.get("arch")
  if arch not in ARCH_DEFAULTS:
    raise ValueError(f"model.arch={arch!r} is not one of {sorted(ARCH_DEFAULTS)}")
  for key in ("img_resolution", "img_channels"):
    if key not in cfg:
      raise ValueError(f"model.{key} is required")
  known = set(ARCH_DEFAULTS[arch]) | set(_TOP_KEYS)
  unknown = sorted(set(cfg) - known)
  if unknown:
    raise ValueError(f"unknown model config keys for arch {arch!r}: {unknown}")
  out = dict(ARCH_DEFAULTS[arch])
  out.update({k: v for k, v in cfg.items() if v is not None})
  out.setdefault("out_channels", out["img_channels"])
  out.setdefault("sigma_data", edm.SIGMA_DATA)
  out.setdefault("dtype", "float32")
  for key in ("channel_mult", "attn_resolutions", "resample_filter"):
    if key in out:
      out[key] = tuple(out[key])
  _validate(out)
  return out


def _validate(c: dict[str, Any]) -> None:
  r = c["img_resolution"]
  levels = len(c["channel_mult"])
  if not isinstance(r, int) or r <= 0:
    raise ValueError(f"model.img_resolution={r!r} must be a positive integer")
  if r % (1 << (levels - 1)):
    raise ValueError(f"model.img_resolution={r} is not divisible by 2^(len(channel_mult)-1)="
                     f"{1 << (levels - 1)}")
  for key in ("img_channels", "out_channels", "model_channels", "num_blocks", "channel_mult_emb"):
    if not isinstance(c[key], int) or c[key] <= 0:
      raise ValueError(f"model.{key}={c[key]!r} must be a positive integer")
  if c["label_dim"] < 0:
    raise ValueError(f"model.label_dim={c['label_dim']} must be >= 0")
  for key in ("dropout", "label_dropout"):
    if not 0.0 <= c[key] < 1.0:
      raise ValueError(f"model.{key}={c[key]} must lie in [0, 1)")
  if c["dtype"] not in DTYPES:
    raise ValueError(f"model.dtype={c['dtype']!r} is not one of {sorted(DTYPES)}")
  # GroupNorm needs its channel count divisible by its group count.
  for mult in c["channel_mult"]:
    ch = c["model_channels"] * mult
    groups = min(32, ch // 4)
    if groups == 0 or ch % groups:
      raise ValueError(f"model.model_channels={c['model_channels']} x channel_mult {mult} = {ch} "
                       f"channels cannot be split into GroupNorm's {groups} groups")


def _build(c: dict[str, Any], rngs: nnx.Rngs) -> edm.Denoiser:
  kwargs = {k: c[k] for k in ARCH_DEFAULTS[c["arch"]]}
  net = BACKBONES[c["arch"]](
      img_resolution=c["img_resolution"], in_channels=c["img_channels"] + COORD_CHANNELS,
      out_channels=c["out_channels"], rngs=rngs, dtype=DTYPES[c["dtype"]], **kwargs)
  return edm.Denoiser(net, label_dim=c["label_dim"], sigma_data=c["sigma_data"],
                      img_channels=c["img_channels"], img_resolution=c["img_resolution"])


def abstract_denoiser(model_config: Mapping[str, Any]) -> edm.Denoiser:
  """The denoiser with ShapeDtypeStructs in place of arrays: no memory is allocated. A new module
  each call; a trainer, a checkpoint restore and a sampler of one config trace its construction
  once (`networks.abstract_builder`)."""
  return _abstract_denoiser(tuple(sorted(resolve(model_config).items())))


_abstract_denoiser = networks.abstract_builder(
    lambda config: _build(dict(config), networks.init_rngs(0)))


def initializer(model_config: Mapping[str, Any], seed: int = 0):
  """(graphdef, init) where init() draws a fresh denoiser state; trace it inside a jit.

  The module is built abstractly; every variable carries its EDM init rule (`init_spec`), which
  `networks.init_variables` applies to two random draws. Equal configs and seeds give the same
  pair (so JAX's caches recognise `init`).
  """
  return _initializer(tuple(sorted(resolve(model_config).items())), seed)


@functools.lru_cache(maxsize=16)
def _initializer(config: tuple[tuple[str, Any], ...], seed: int):
  graphdef, abstract = nnx.split(abstract_denoiser(dict(config)))
  leaves, treedef = jax.tree_util.tree_flatten(abstract, is_leaf=_is_variable)
  specs = [v.get_metadata()["init_spec"] for v in leaves]
  shapes = [tuple(v.shape) for v in leaves]

  def init():
    values = networks.init_variables(specs, shapes, jax.random.key(seed))
    return jax.tree_util.tree_unflatten(
        treedef, [v.replace(x) for v, x in zip(leaves, values)])
  return graphdef, init


def init_denoiser_state(model_config: Mapping[str, Any], seed: int = 0, out_shardings=None):
  """(graphdef, state) of a freshly initialised denoiser (its variables only: the training
  state around them is `train_step.train_state_of`), made by one small jitted program;
  `out_shardings` places the state."""
  graphdef, init = initializer(model_config, seed)
  return graphdef, xla_options.jit(init, out_shardings=out_shardings)()


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def create_denoiser(model_config: Mapping[str, Any], seed: int = 0) -> edm.Denoiser:
  """The preconditioned denoiser D(x, sigma, pos, labels) with freshly initialised weights."""
  return nnx.merge(*init_denoiser_state(model_config, seed))


# Our layouts of the official tensors; names are the official ones (`model.enc.16x16_conv.weight`).
TORCH_LAYERS = {networks.Conv2d: {"weight": ("weight", torch_io.CONV)},
                networks.Linear: {"weight": ("weight", torch_io.LINEAR)}}
count_params = torch_io.count_params


def load_torch_state_dict(state_dict: Mapping[str, Any], model_config) -> edm.Denoiser:
  """The preconditioned denoiser of `model_config` holding the official weights `state_dict`.

  `state_dict` maps official tensor names (`model.enc.64x64_conv.weight`, or without `model.` for
  the bare backbone) to arrays in PyTorch layout. Unknown, missing or mis-shaped tensors raise one
  ValueError listing them all.
  """
  arrays = {k: np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v)
            for k, v in state_dict.items()}
  if arrays and not any(k.startswith("model.") for k in arrays):
    arrays = {"model." + k: v for k, v in arrays.items()}
  denoiser = abstract_denoiser(model_config)  # every variable is set by torch_io.load
  problems = _pop_resample_filters(denoiser, arrays)
  torch_io.load(denoiser, arrays, TORCH_LAYERS, what="the model config", problems=problems)
  return denoiser


def _pop_resample_filters(denoiser: edm.Denoiser, arrays: dict[str, np.ndarray]) -> list[str]:
  """EDM stores each resampling conv's filter as a buffer; here the config builds it. The filters
  of resampling convs leave `arrays`; one that differs from the config's is a problem."""
  convs = {".".join(map(str, path)): node for path, node in nnx.iter_graph(denoiser)
           if isinstance(node, networks.Conv2d) and (node.up or node.down)}
  problems = []
  for name in [n for n in arrays if n.endswith(".resample_filter")]:
    conv = convs.get(name[:-len(".resample_filter")])
    if conv is not None:
      array, expected = arrays.pop(name), networks._resample_filter(conv.resample_filter)
      if array.shape != (1, 1) + expected.shape or not np.allclose(array, expected, atol=1e-6):
        problems.append(f"{name}: resample filter {array.reshape(-1).tolist()} does not match "
                        f"the config's resample_filter {list(conv.resample_filter)}")
  return problems


def torch_state_dict(denoiser: edm.Denoiser) -> dict[str, np.ndarray]:
  """The official state dict of `denoiser` (the inverse of `load_torch_state_dict`): every
  tensor under its official name in PyTorch layout, and EDM's `resample_filter` buffer of each
  resampling conv."""
  out = torch_io.state_dict(denoiser, TORCH_LAYERS)
  for path, node in nnx.iter_graph(denoiser):
    if isinstance(node, networks.Conv2d) and (node.up or node.down):
      taps = networks._resample_filter(node.resample_filter)  # pylint: disable=protected-access
      out[".".join(map(str, path)) + ".resample_filter"] = taps[None, None]
  return out


def input_weights(denoiser: edm.Denoiser) -> list[str]:
  """Official names of the weights that read the network's input channels (the image's, then the
  two coordinate channels): the first conv's, and those of the NCSN++ encoders' auxiliary input
  path (see `SongUNet.input_convs`)."""
  return [f"model.{name}.weight" for name in denoiser.model.input_convs]


LABEL_PREFIX = "model.map_label."


def pretrained_values(state_dict: Mapping[str, Any], model_config, *, reset_labels: bool = False,
                      where: str = "state dict", notes: tuple[str, ...] = ()
                      ) -> tuple[dict[str, np.ndarray], list[str], list[str]]:
  """The weights of `state_dict` (official names, PyTorch layout) for the denoiser of
  `model_config`, checked: ({official name: array in our layout}, the input weights that were
  widened with zeros for the coordinate channels, the variables left out (to keep their fresh
  initialisation)).

  - A network without coordinate inputs (EDM's, whose input weights read `img_channels`
    channels) gets zero weights for the two coordinate channels in every layer that reads the
    input (`input_weights`): the patch network then computes the file's function whatever the
    coordinates.
  - A label embedding (`model.map_label.*`) of another label dimension than model.label_dim is an
    error unless `reset_labels`; with `reset_labels` the file's label embedding is ignored and
    the model's is left out.

  Raises one ValueError, headed by `where`, listing a few of the missing, unexpected and
  mis-shaped tensors (of each kind), the other problems found, and `notes` (hints about the
  file) when anything does not fit.
  """
  arrays = {k: np.asarray(v) for k, v in state_dict.items()}
  if arrays and not any(k.startswith("model.") for k in arrays):
    arrays = {"model." + k: v for k, v in arrays.items()}
  c = resolve(model_config)
  denoiser = abstract_denoiser(model_config)
  targets = torch_io.state_dict(denoiser, TORCH_LAYERS)  # name -> ShapeDtypeStruct
  problems = _pop_resample_filters(denoiser, arrays)

  ours = [n for n in targets if n.startswith(LABEL_PREFIX)]
  label_weight = arrays.get(LABEL_PREFIX + "weight")  # (out, label_dim)
  file_dim = int(label_weight.shape[1]) if label_weight is not None and label_weight.ndim > 1 else 0
  fresh: list[str] = []
  if reset_labels or file_dim != c["label_dim"]:
    if not reset_labels:
      problems.append(
          f"label dimension: the file's label embedding takes {file_dim} labels "
          + (f"({LABEL_PREFIX}weight {label_weight.shape})" if file_dim else "(it has none)")
          + f", the config's model.label_dim={c['label_dim']}; set "
          "train.init_reset_labels=True to start the label embedding from its fresh "
          "initialisation")
    arrays = {k: v for k, v in arrays.items() if not k.startswith(LABEL_PREFIX)}
    fresh = ours

  zeroed = []
  inputs = input_weights(denoiser)
  for name in inputs:
    array, want = arrays.get(name), targets[name].shape
    if (array is not None and array.ndim == 4 and array.shape[1] == want[1] - COORD_CHANNELS
        and array.shape[:1] + array.shape[2:] == want[:1] + want[2:]):
      pad = np.zeros((want[0], COORD_CHANNELS) + want[2:], array.dtype)
      arrays[name] = np.concatenate([array, pad], axis=1)  # the coordinates come last
      zeroed.append(name)
  if zeroed and len(zeroed) != len(inputs):
    problems.append(f"coordinate inputs: {zeroed} read {c['img_channels']} input channels "
                    f"(no coordinates), {sorted(set(inputs) - set(zeroed))} do not")
  what = ("the model config (" + ", ".join(
      f"{k}={list(c[k]) if isinstance(c[k], tuple) else c[k]!r}" for k in
      ("arch", "img_resolution", "img_channels", "label_dim", "model_channels", "channel_mult",
       "num_blocks", "attn_resolutions")) + ")")
  try:
    values = torch_io.match(denoiser, arrays, TORCH_LAYERS, where=where, what=what,
                            problems=problems, absent=fresh, limit=5)
  except ValueError as e:
    raise ValueError("\n  ".join([str(e), *notes])) from None
  return values, zeroed, fresh


def denoiser_from_values(model_config, values: Mapping[str, Any]) -> edm.Denoiser:
  """The denoiser of `model_config` holding `values` ({official name: array in our layout} for
  every variable, as `pretrained_values` returns them with nothing left fresh)."""
  denoiser = abstract_denoiser(model_config)
  for name, (var, _) in torch_io.variables(denoiser, TORCH_LAYERS).items():
    var.set_value(jnp.asarray(values[name], var.dtype))
  return denoiser


def set_variables(graphdef, variables, values: Mapping[str, Any]):
  """`variables` (the state of the denoiser `graphdef`) with the tensors named in `values`
  ({official name: array in our layout}) replaced, `variables` itself unchanged; traceable
  inside a jit."""
  denoiser = nnx.merge(graphdef, variables, copy=True)
  for name, (var, _) in torch_io.variables(denoiser, TORCH_LAYERS).items():
    if name in values:
      var.set_value(jnp.asarray(values[name], var.dtype))
  return nnx.state(denoiser)
