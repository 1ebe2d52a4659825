"""The Stable Diffusion VAE (diffusers' `AutoencoderKL`, as stabilityai/sd-vae-ft-ema) in Flax NNX.

NHWC; names follow diffusers (`encoder.down_blocks.0.resnets.0.conv1.weight`), so its state dicts
map one to one. `load_vae` reads a diffusers-format folder (config.json + safetensors weights).
"""
from __future__ import annotations

import functools
import json
import os
import re
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from patchdiff import xla_options
from patchdiff.nn import networks, torch_io
from patchdiff.weights import files

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"

# diffusers' AutoencoderKL constructor defaults: a config.json that leaves a key out means these.
# The Stable Diffusion VAE's config.json (stabilityai/sd-vae-ft-ema), as published: the keys it
# leaves out take diffusers' defaults. For shapes and benchmarks; weights come from the folder.
SD_VAE_CONFIG: dict[str, Any] = {
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.4.2", "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
    "out_channels": 3, "sample_size": 256, "up_block_types": ["UpDecoderBlock2D"] * 4}

DEFAULT_CONFIG: dict[str, Any] = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
    up_block_types=("UpDecoderBlock2D",), block_out_channels=(64,), layers_per_block=1,
    act_fn="silu", latent_channels=4, norm_num_groups=32, scaling_factor=0.18215,
    shift_factor=None, use_quant_conv=True, use_post_quant_conv=True,
    mid_block_add_attention=True)
# Keys of diffusers' config that do not change the network or how we use it; accepted and unused.
_IGNORED_KEYS = ("sample_size", "latents_mean", "latents_std", "force_upcast")
# "swish" is diffusers' other name for SiLU.
_SILU_NAMES = ("silu", "swish")
# diffusers' resnets and attention in the VAE all use this GroupNorm epsilon.
_EPS = 1e-6


# ---------------------------------------------------------------------------------------------
# Layers.


def _uniform(rngs: nnx.Rngs, shape: tuple[int, ...], fan_in: int) -> nnx.Param:
  """PyTorch's default conv/linear init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)); real use loads
  weights, so this only has to give a network whose activations stay of order one."""
  bound = 1.0 / np.sqrt(fan_in)
  return nnx.Param(jax.random.uniform(rngs.params(), shape, jnp.float32, -bound, bound))


class Conv2d(nnx.Module):
  """2-D convolution, HWIO kernel; `padding` is ((top, bottom), (left, right))."""

  def __init__(self, in_channels: int, out_channels: int, kernel: int, *, rngs: nnx.Rngs,
               stride: int = 1, padding: tuple[tuple[int, int], tuple[int, int]] | None = None,
               dtype=jnp.float32):
    p = kernel // 2
    self.stride = stride
    self.padding = ((p, p), (p, p)) if padding is None else tuple(map(tuple, padding))
    self.dtype = dtype
    fan_in = in_channels * kernel * kernel
    self.weight = _uniform(rngs, (kernel, kernel, in_channels, out_channels), fan_in)
    self.bias = _uniform(rngs, (out_channels,), fan_in)

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), self.weight[...].astype(self.dtype),
        window_strides=(self.stride, self.stride), padding=self.padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + self.bias[...].astype(self.dtype)


class Linear(nnx.Module):
  """Dense layer over the last axis, weight (in, out)."""

  def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.dtype = dtype
    self.weight = _uniform(rngs, (in_features, out_features), in_features)
    self.bias = _uniform(rngs, (out_features,), in_features)

  def __call__(self, x: jax.Array) -> jax.Array:
    y = x.astype(self.dtype) @ self.weight[...].astype(self.dtype)
    return y + self.bias[...].astype(self.dtype)


class GroupNorm(nnx.Module):
  """GroupNorm with affine weight/bias; statistics and normalisation in float32 whatever the
  input dtype (bfloat16 variances over large groups lose too much)."""

  def __init__(self, num_channels: int, num_groups: int, eps: float = _EPS):
    if num_channels % num_groups:
      raise ValueError(f"GroupNorm: {num_channels} channels cannot be split into {num_groups} "
                       "groups (norm_num_groups must divide every block_out_channels entry)")
    self.num_groups = num_groups
    self.eps = eps
    self.weight = nnx.Param(jnp.ones((num_channels,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((num_channels,), jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    return networks.group_norm(x, self.num_groups, self.weight[...], self.bias[...], self.eps)


class ResnetBlock2D(nnx.Module):
  """norm1 -> silu -> conv1 -> norm2 -> silu -> conv2, plus the (1x1-projected) input.

  diffusers' dropout (0 in the VAE) and output_scale_factor (1) are identities and left out.
  """

  def __init__(self, in_channels: int, out_channels: int, num_groups: int, *, rngs: nnx.Rngs,
               dtype=jnp.float32):
    conv = dict(rngs=rngs, dtype=dtype)
    self.norm1 = GroupNorm(in_channels, num_groups)
    self.conv1 = Conv2d(in_channels, out_channels, 3, **conv)
    self.norm2 = GroupNorm(out_channels, num_groups)
    self.conv2 = Conv2d(out_channels, out_channels, 3, **conv)
    self.conv_shortcut = (Conv2d(in_channels, out_channels, 1, **conv)
                          if in_channels != out_channels else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.conv1(jax.nn.silu(self.norm1(x)))
    h = self.conv2(jax.nn.silu(self.norm2(h)))
    shortcut = self.conv_shortcut(x) if self.conv_shortcut is not None else x.astype(h.dtype)
    return shortcut + h


class Attention(nnx.Module):
  """The mid block's single-head spatial self-attention (head dim = channels) with residual.

  to_out is a one-element list so that its weight is named `to_out.0.weight` as in diffusers.
  """

  def __init__(self, channels: int, num_groups: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
    lin = dict(rngs=rngs, dtype=dtype)
    self.group_norm = GroupNorm(channels, num_groups)
    self.to_q = Linear(channels, channels, **lin)
    self.to_k = Linear(channels, channels, **lin)
    self.to_v = Linear(channels, channels, **lin)
    self.to_out = nnx.List([Linear(channels, channels, **lin)])

  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    t = self.group_norm(x).reshape(b, h * w, c)
    q, k, v = self.to_q(t), self.to_k(t), self.to_v(t)
    logits = jnp.einsum("bqc,bkc->bqk", q.astype(jnp.float32),
                        k.astype(jnp.float32)) * np.float32(1.0 / np.sqrt(c))
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)  # softmax in float32
    a = self.to_out[0](jnp.einsum("bqk,bkc->bqc", weights, v)).reshape(b, h, w, c)
    return a + x.astype(a.dtype)


class Downsample2D(nnx.Module):
  """3x3 conv, stride 2, on the input zero-padded by one row/column at the bottom/right only."""

  def __init__(self, channels: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.conv = Conv2d(channels, channels, 3, stride=2, padding=((0, 1), (0, 1)), rngs=rngs,
                       dtype=dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv(x)


class Upsample2D(nnx.Module):
  """Nearest-neighbour 2x upsampling, then a 3x3 conv."""

  def __init__(self, channels: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.conv = Conv2d(channels, channels, 3, rngs=rngs, dtype=dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)
    return self.conv(x)


class DownEncoderBlock2D(nnx.Module):
  def __init__(self, in_channels: int, out_channels: int, num_layers: int, num_groups: int,
               add_downsample: bool, *, rngs: nnx.Rngs, dtype=jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype)
    self.resnets = nnx.List([
        ResnetBlock2D(in_channels if j == 0 else out_channels, out_channels, num_groups, **kw)
        for j in range(num_layers)])
    self.downsamplers = nnx.List([Downsample2D(out_channels, **kw)] if add_downsample else [])

  def __call__(self, x: jax.Array) -> jax.Array:
    for resnet in self.resnets:
      x = resnet(x)
    for down in self.downsamplers:
      x = down(x)
    return x


class UpDecoderBlock2D(nnx.Module):
  def __init__(self, in_channels: int, out_channels: int, num_layers: int, num_groups: int,
               add_upsample: bool, *, rngs: nnx.Rngs, dtype=jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype)
    self.resnets = nnx.List([
        ResnetBlock2D(in_channels if j == 0 else out_channels, out_channels, num_groups, **kw)
        for j in range(num_layers)])
    self.upsamplers = nnx.List([Upsample2D(out_channels, **kw)] if add_upsample else [])

  def __call__(self, x: jax.Array) -> jax.Array:
    for resnet in self.resnets:
      x = resnet(x)
    for up in self.upsamplers:
      x = up(x)
    return x


class UNetMidBlock2D(nnx.Module):
  """resnet -> attention -> resnet (the attention left out with add_attention=False)."""

  def __init__(self, channels: int, num_groups: int, add_attention: bool, *, rngs: nnx.Rngs,
               dtype=jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype)
    self.resnets = nnx.List([ResnetBlock2D(channels, channels, num_groups, **kw)
                             for _ in range(2)])
    self.attentions = nnx.List([Attention(channels, num_groups, **kw)] if add_attention else [])

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.resnets[0](x)
    for attn in self.attentions:
      x = attn(x)
    return self.resnets[1](x)


class Encoder(nnx.Module):
  """Image (B, H, W, in_channels) -> moments (B, H/f, W/f, out_channels), before quant_conv."""

  def __init__(self, in_channels: int, out_channels: int, block_out_channels: Sequence[int],
               layers_per_block: int, num_groups: int, mid_block_add_attention: bool, *,
               rngs: nnx.Rngs, dtype=jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype)
    self.conv_in = Conv2d(in_channels, block_out_channels[0], 3, **kw)
    blocks = []
    cout = block_out_channels[0]
    for i, ch in enumerate(block_out_channels):
      cin, cout = cout, ch
      blocks.append(DownEncoderBlock2D(cin, cout, layers_per_block, num_groups,
                                       add_downsample=i < len(block_out_channels) - 1, **kw))
    self.down_blocks = nnx.List(blocks)
    self.mid_block = UNetMidBlock2D(cout, num_groups, mid_block_add_attention, **kw)
    self.conv_norm_out = GroupNorm(cout, num_groups)
    self.conv_out = Conv2d(cout, out_channels, 3, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.conv_in(x)
    for block in self.down_blocks:
      x = block(x)
    x = self.mid_block(x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
  """Latent (B, h, w, in_channels), after post_quant_conv -> image (B, h*f, w*f, out_channels)."""

  def __init__(self, in_channels: int, out_channels: int, block_out_channels: Sequence[int],
               layers_per_block: int, num_groups: int, mid_block_add_attention: bool, *,
               rngs: nnx.Rngs, dtype=jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype)
    rev = list(reversed(block_out_channels))
    self.conv_in = Conv2d(in_channels, rev[0], 3, **kw)
    self.mid_block = UNetMidBlock2D(rev[0], num_groups, mid_block_add_attention, **kw)
    blocks = []
    cout = rev[0]
    for i, ch in enumerate(rev):
      cin, cout = cout, ch
      blocks.append(UpDecoderBlock2D(cin, cout, layers_per_block + 1, num_groups,
                                     add_upsample=i < len(rev) - 1, **kw))
    self.up_blocks = nnx.List(blocks)
    self.conv_norm_out = GroupNorm(cout, num_groups)
    self.conv_out = Conv2d(cout, out_channels, 3, **kw)

  def __call__(self, z: jax.Array) -> jax.Array:
    x = self.mid_block(self.conv_in(z))
    for block in self.up_blocks:
      x = block(x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


# ---------------------------------------------------------------------------------------------
# The autoencoder.


class AutoencoderKL(nnx.Module):
  """diffusers' AutoencoderKL (constructor arguments and defaults as there), NHWC.

  `encode(x)`: x (B, H, W, in_channels) in [-1, 1] -> (mean, std) of the diagonal Gaussian
  posterior after `quant_conv`, each (B, H/f, W/f, latent_channels) with f = `downsample_factor`.
  `decode(z)`: a latent through `post_quant_conv` and the decoder, the inverse shapes. Neither
  applies `scaling_factor`: the diffusion model sees scaling_factor * (sample - shift_factor), as
  in diffusers' pipelines. Both are pure functions of the module (jit them via `encode_fn` /
  `decode_fn`).

  Convolutions and linear layers compute in `dtype` (bfloat16 saves time and memory); group norms,
  the attention softmax and the posterior run in float32, weights are stored and outputs returned
  in float32.
  """

  def __init__(self, *, rngs: nnx.Rngs, in_channels: int = 3, out_channels: int = 3,
               down_block_types: Sequence[str] = ("DownEncoderBlock2D",),
               up_block_types: Sequence[str] = ("UpDecoderBlock2D",),
               block_out_channels: Sequence[int] = (64,), layers_per_block: int = 1,
               act_fn: str = "silu", latent_channels: int = 4, norm_num_groups: int = 32,
               scaling_factor: float = 0.18215, shift_factor: float | None = None,
               use_quant_conv: bool = True, use_post_quant_conv: bool = True,
               mid_block_add_attention: bool = True, dtype=jnp.float32):
    block_out_channels = tuple(int(c) for c in block_out_channels)
    _validate(in_channels=in_channels, out_channels=out_channels,
              down_block_types=tuple(down_block_types), up_block_types=tuple(up_block_types),
              block_out_channels=block_out_channels, layers_per_block=layers_per_block,
              act_fn=act_fn, latent_channels=latent_channels, norm_num_groups=norm_num_groups)
    self.in_channels = in_channels
    self.out_channels = out_channels
    self.latent_channels = latent_channels
    self.block_out_channels = block_out_channels
    self.scaling_factor = float(scaling_factor)
    self.shift_factor = float(shift_factor or 0.0)
    self.downsample_factor = 2 ** (len(block_out_channels) - 1)
    self.dtype = dtype
    kw = dict(rngs=rngs, dtype=dtype)
    blocks = dict(block_out_channels=block_out_channels, layers_per_block=layers_per_block,
                  num_groups=norm_num_groups, mid_block_add_attention=mid_block_add_attention)
    # The encoder predicts mean and log-variance: twice the latent channels.
    self.encoder = Encoder(in_channels, 2 * latent_channels, **blocks, **kw)
    self.decoder = Decoder(latent_channels, out_channels, **blocks, **kw)
    self.quant_conv = (Conv2d(2 * latent_channels, 2 * latent_channels, 1, **kw)
                       if use_quant_conv else None)
    self.post_quant_conv = (Conv2d(latent_channels, latent_channels, 1, **kw)
                            if use_post_quant_conv else None)

  def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(mean, std) of the posterior, float32; std = exp(0.5 * clip(logvar, -30, 20))."""
    if x.ndim != 4 or x.shape[-1] != self.in_channels:
      raise ValueError(f"AutoencoderKL.encode: expected images (B, H, W, {self.in_channels}) "
                       f"(NHWC), got shape {tuple(x.shape)}")
    moments = self.encoder(x)
    if self.quant_conv is not None:
      moments = self.quant_conv(moments)
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    return mean, jnp.exp(0.5 * jnp.clip(logvar, -30.0, 20.0))

  def decode(self, z: jax.Array) -> jax.Array:
    """Unscaled latent (B, h, w, latent_channels) -> float32 image (B, h*f, w*f, out_channels)."""
    if z.ndim != 4 or z.shape[-1] != self.latent_channels:
      raise ValueError(f"AutoencoderKL.decode: expected latents (B, h, w, "
                       f"{self.latent_channels}) (NHWC), got shape {tuple(z.shape)}")
    if self.post_quant_conv is not None:
      z = self.post_quant_conv(z)
    return self.decoder(z).astype(jnp.float32)


# ---------------------------------------------------------------------------------------------
# Configs.


def _validate(*, in_channels, out_channels, down_block_types, up_block_types, block_out_channels,
              layers_per_block, act_fn, latent_channels, norm_num_groups) -> None:
  if act_fn not in _SILU_NAMES:
    raise ValueError(f"VAE config: act_fn={act_fn!r} is not supported (only 'silu')")
  for key, types, allowed in (("down_block_types", down_block_types, "DownEncoderBlock2D"),
                              ("up_block_types", up_block_types, "UpDecoderBlock2D")):
    bad = [t for t in types if t != allowed]
    if bad:
      raise ValueError(f"VAE config: {key} {bad} not supported (only {allowed!r})")
  n = len(block_out_channels)
  if n == 0 or len(down_block_types) != n or len(up_block_types) != n:
    raise ValueError(f"VAE config: block_out_channels {list(block_out_channels)}, "
                     f"down_block_types ({len(down_block_types)}) and up_block_types "
                     f"({len(up_block_types)}) must have the same, non-zero length")
  for key, v in (("in_channels", in_channels), ("out_channels", out_channels),
                 ("layers_per_block", layers_per_block), ("latent_channels", latent_channels),
                 ("norm_num_groups", norm_num_groups)):
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
      raise ValueError(f"VAE config: {key}={v!r} must be a positive integer")
  bad = [c for c in block_out_channels if c <= 0 or c % norm_num_groups]
  if bad:
    raise ValueError(f"VAE config: block_out_channels {list(block_out_channels)} must be "
                     f"positive multiples of norm_num_groups={norm_num_groups}")


def resolve_config(config: Mapping[str, Any]) -> dict[str, Any]:
  """AutoencoderKL's constructor arguments from a diffusers config dict, defaults filled in.

  Keys starting with '_' (diffusers' bookkeeping) and keys without effect here (`sample_size`,
  `force_upcast`, `latents_mean`, `latents_std`) are ignored; any other unknown key raises, since
  it may change the network in a way this module does not implement.
  """
  cfg = dict(config)
  cls = cfg.get("_class_name", "AutoencoderKL")
  if cls != "AutoencoderKL":
    raise ValueError(f"VAE config: _class_name={cls!r}, expected 'AutoencoderKL'")
  unknown = sorted(k for k in cfg
                   if not k.startswith("_") and k not in DEFAULT_CONFIG and k not in _IGNORED_KEYS)
  if unknown:
    raise ValueError(f"VAE config: unknown keys {unknown} (known: {sorted(DEFAULT_CONFIG)})")
  out = dict(DEFAULT_CONFIG)
  out.update({k: v for k, v in cfg.items() if k in DEFAULT_CONFIG})
  for key in ("down_block_types", "up_block_types", "block_out_channels"):
    out[key] = tuple(out[key])
  return out


def abstract_vae(config: Mapping[str, Any], dtype=jnp.float32) -> AutoencoderKL:
  """The VAE of `config` with ShapeDtypeStructs in place of arrays: no memory is allocated. A new
  module each call, its construction traced once per process and config."""
  return _abstract_vae(tuple(sorted(resolve_config(config).items())), jnp.dtype(dtype))


_abstract_vae = networks.abstract_builder(
    lambda config, dtype: AutoencoderKL(**dict(config), rngs=networks.init_rngs(0), dtype=dtype),
    maxsize=4)


def create(config: Mapping[str, Any], seed: int = 0, dtype=jnp.float32) -> AutoencoderKL:
  """A randomly initialised VAE (for tests and shapes; load real weights to use it).

  Built abstractly and filled from NumPy (PyTorch's default uniform init, group norms at
  identity), which avoids compiling one XLA random-number program per tensor shape.
  """
  vae = abstract_vae(config, dtype)
  rng = np.random.default_rng(seed)
  for _, node in nnx.iter_graph(vae):
    if isinstance(node, GroupNorm):
      node.weight.set_value(jnp.ones(node.weight.shape, jnp.float32))
      node.bias.set_value(jnp.zeros(node.bias.shape, jnp.float32))
    elif isinstance(node, (Conv2d, Linear)):
      bound = 1.0 / np.sqrt(np.prod(node.weight.shape[:-1]))  # fan-in: all but the output axis
      for var in (node.weight, node.bias):
        var.set_value(jnp.asarray(rng.uniform(-bound, bound, var.shape).astype(np.float32)))
  return vae


# ---------------------------------------------------------------------------------------------
# diffusers state dicts.

# Our layouts of diffusers' tensors; names are diffusers' (`encoder.conv_in.weight`).
TORCH_LAYERS = {Conv2d: {"weight": ("weight", torch_io.CONV)},
                Linear: {"weight": ("weight", torch_io.LINEAR)}}
# Old diffusers attention names (the deprecated AttentionBlock) -> current ones.
_OLD_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_OLD_ATTENTION_RE = re.compile(
    r"^(.*\.attentions\.\d+\.)(query|key|value|proj_attn)\.(weight|bias)$")


def state_dict(vae: AutoencoderKL) -> dict[str, Any]:
  """The VAE's tensors under diffusers' names, in PyTorch layout (conv OIHW, linear (out, in));
  `jax.ShapeDtypeStruct`s for an abstract VAE (`abstract_vae`). The inverse of
  `load_vae_from_arrays`."""
  return torch_io.state_dict(vae, TORCH_LAYERS)


def load_vae_from_arrays(config: Mapping[str, Any], arrays: Mapping[str, Any],
                         dtype=jnp.float32, source: str = "state dict") -> AutoencoderKL:
  """The VAE of the diffusers `config` holding `arrays` (diffusers names, PyTorch layout).

  Attention projections may also come under the old names (`query`, `key`, `value`,
  `proj_attn`; an old name whose current name is also present keeps its own, and so is reported
  as unexpected) and as 1x1 conv weights (out, in, 1, 1). Nothing is loaded unless every tensor
  fits: otherwise one ValueError, prefixed with `source` (the file), lists every missing,
  unexpected and mis-shaped tensor.
  """
  vae = abstract_vae(config, dtype)  # every variable is set by torch_io.load
  ours, names = {}, {}
  for name, array in arrays.items():
    m = _OLD_ATTENTION_RE.match(name)
    new = m and f"{m.group(1)}{_OLD_ATTENTION_NAMES[m.group(2)]}.{m.group(3)}"
    if new and new not in arrays:
      name, names[new] = new, name
    ours[name] = array
  try:
    torch_io.load(vae, ours, TORCH_LAYERS, where=source, what="the AutoencoderKL config",
                  names=names)
  except ValueError as e:
    if any(".down.0.block." in k or k.startswith("first_stage_model.") for k in arrays):
      raise ValueError(f"{e}\n  (the names look like an original CompVis/ldm checkpoint; this "
                       "loader reads diffusers-format weights, as in the 'vae/' folder of a "
                       "diffusers pipeline)") from None
    raise
  return vae


def _find_folder(path: str) -> str:
  """The folder holding the VAE's config.json: `path`, or its `vae/` subfolder (a pipeline)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"VAE folder {path} does not exist")
  if os.path.isfile(path):
    if path.endswith(".safetensors"):
      return os.path.dirname(path) or "."
    raise ValueError(f"VAE path {path} is a file; expected a diffusers-format folder holding "
                     f"{CONFIG_NAME} and {WEIGHTS_NAME}")
  if os.path.isfile(os.path.join(path, CONFIG_NAME)):
    return path
  sub = os.path.join(path, "vae")
  if os.path.isfile(os.path.join(sub, CONFIG_NAME)):
    return sub
  raise FileNotFoundError(f"no {CONFIG_NAME} in {path} (nor in {sub}); expected a diffusers-format "
                          f"VAE folder holding {CONFIG_NAME} and {WEIGHTS_NAME}")


def load_vae(path: str | os.PathLike, dtype=jnp.float32) -> AutoencoderKL:
  """The VAE of a diffusers-format folder: `config.json` + `diffusion_pytorch_model.safetensors`.

  `path` may also be a pipeline folder with the VAE under `vae/`, or the `.safetensors` file
  itself (the config is then read next to it). `dtype` is the conv/linear compute dtype; weights
  are kept in float32. PyTorch `.bin` files are not read: convert them to safetensors.
  """
  path = os.fspath(path)
  folder = _find_folder(path)
  weights = (path if os.path.isfile(path) else os.path.join(folder, WEIGHTS_NAME))
  config_path = os.path.join(folder, CONFIG_NAME)
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"VAE config {config_path} does not exist")
  if not os.path.isfile(weights):
    others = sorted(f for f in os.listdir(folder)
                    if f.startswith("diffusion_pytorch_model") and f != WEIGHTS_NAME)
    note = f" (found {others}; only {WEIGHTS_NAME} is read)" if others else ""
    raise FileNotFoundError(f"VAE weights {weights} do not exist{note}")
  try:
    with open(config_path, encoding="utf-8") as f:
      config = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"VAE config {config_path} is not valid JSON: {e}") from e
  if not isinstance(config, dict):
    raise ValueError(f"VAE config {config_path} holds a {type(config).__name__}, not an object")
  arrays = files.read(weights)
  try:
    return load_vae_from_arrays(config, arrays, dtype=dtype, source=weights)
  except ValueError as e:
    if str(e).startswith("VAE config"):
      raise ValueError(f"{config_path}: {e}") from e
    raise


# ---------------------------------------------------------------------------------------------
# Jitted entry points.


def _encode(graphdef: nnx.GraphDef, state: nnx.State, x: jax.Array):
  return nnx.merge(graphdef, state).encode(x)


def _decode(graphdef: nnx.GraphDef, state: nnx.State, z: jax.Array):
  return nnx.merge(graphdef, state).decode(z)


# The graph definition is static: VAEs of the same structure share the compiled programs.
_encode_jit = xla_options.lazy_jit(_encode, static_argnums=0)
_decode_jit = xla_options.lazy_jit(_decode, static_argnums=0)


def encode_fn(vae: AutoencoderKL):
  """A jitted `(x) -> (mean, std)` for `vae` (split once; one compile per input shape)."""
  graphdef, state = nnx.split(vae)
  return functools.partial(_encode_jit, graphdef, state)


def decode_fn(vae: AutoencoderKL):
  """A jitted `(z) -> x` for `vae` (split once; one compile per input shape)."""
  graphdef, state = nnx.split(vae)
  return functools.partial(_decode_jit, graphdef, state)


def latent_decoder(vae: AutoencoderKL | str | os.PathLike, scale: float | None = None,
                   dtype=jnp.float32):
  """`decode(latents) -> images` for a latent diffusion model: the diffusion model's latents are
  scale * (z - shift), so z = latents / scale + shift goes through the VAE's decoder. `vae`: the
  model, or a folder for `load_vae`; `scale` defaults to the VAE config's scaling_factor.
  Jitted; one compile per batch shape."""
  if not isinstance(vae, AutoencoderKL):
    vae = load_vae(vae, dtype=dtype)
  scale = vae.scaling_factor if scale is None else float(scale)
  shift = vae.shift_factor
  decode = decode_fn(vae)
  return lambda latents: decode(latents / scale + shift)
