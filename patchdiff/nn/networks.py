"""EDM's DDPM++/NCSN++ (SongUNet) and ADM (DhariwalUNet) backbones in Flax NNX, NHWC layout.

Module and attribute names follow the official PyTorch modules (`enc['16x16_block0'].conv0.weight`)
so that official state dicts map one to one; only the array layouts differ (conv HWIO, linear (in, out)).
Dropout takes an explicit key, so a forward pass is a pure function of (params, inputs, key). The
key is one typed key for the whole batch or a (B,) array of keys, one per sample (sample i's masks
then come from key i alone, whatever batch it is computed in).
"""
from __future__ import annotations

import functools
import math
import threading
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class Buffer(nnx.Variable):
  """A constant that travels with the weights but is not trained (EDM's registered buffers)."""


# ---------------------------------------------------------------------------------------------
# Initialisation (EDM's weight_init): fan-based xavier / kaiming, scaled by init_weight/init_bias.

def _scaled_init(uniform, normal, mode: str, fan_in: int, fan_out: int, scale: float):
  """EDM's weight_init applied to standard uniform(-1, 1) / normal draws, times `scale`."""
  if mode == "xavier_uniform":
    return math.sqrt(6 / (fan_in + fan_out)) * scale * uniform
  if mode == "xavier_normal":
    return math.sqrt(2 / (fan_in + fan_out)) * scale * normal
  if mode == "kaiming_uniform":
    return math.sqrt(3 / fan_in) * scale * uniform
  if mode == "kaiming_normal":
    return math.sqrt(1 / fan_in) * scale * normal
  if mode == "normal":
    return scale * normal
  raise ValueError(f"unknown init_mode {mode!r}")


def _param(rngs: nnx.Rngs, shape, mode, fan_in, fan_out, scale, cls=nnx.Param):
  """A variable initialised by EDM's rule; the rule is kept as `init_spec` metadata so that
  `init_variables` can re-draw a whole model in one small program (see models.init_denoiser_state)."""
  spec = ("zeros",) if scale == 0 else (mode, fan_in, fan_out, float(scale))
  if scale == 0 or building_abstractly():
    value = jnp.zeros(shape, jnp.float32)
  else:
    key = rngs.params()
    value = _scaled_init(jax.random.uniform(key, shape, jnp.float32, -1.0, 1.0),
                         jax.random.normal(key, shape, jnp.float32), mode, fan_in, fan_out, scale)
  return cls(value, init_spec=spec)


_ABSTRACT = threading.local()


def building_abstractly() -> bool:
  """Whether `abstract_builder` is tracing a construction in this thread. Initial values are then
  never read, only their shapes: the builds take their keys from `init_rngs`, and `_param` skips
  its draws altogether."""
  return getattr(_ABSTRACT, "depth", 0) > 0


class _OneKey:
  """Stands in for `nnx.Rngs` where only `params()` is asked for (flax's layers draw their
  initial values with it) and the values are never read: one key, no stream to advance."""

  def __init__(self, seed: int):
    self._key = jax.random.key(seed)

  def params(self):
    return self._key


def init_rngs(seed: int = 0):
  """`nnx.Rngs(seed)` for a network's construction; inside an abstract build a stand-in that
  hands every layer one key. Advancing NNX's RNG stream under a trace costs in proportion to
  everything traced before it (NNX reads the new count's `sharding`; for a tracer, JAX's error
  for that describes its origin by scanning the trace), so an abstract build with a real stream
  took time quadratic in its variable count: 1 to 2 s for the paper's networks and the
  Inception."""
  return _OneKey(seed) if building_abstractly() else nnx.Rngs(seed)


def _traced_abstractly(build, *args):
  _ABSTRACT.depth = getattr(_ABSTRACT, "depth", 0) + 1
  try:
    return nnx.eval_shape(lambda: build(*args))
  finally:
    _ABSTRACT.depth -= 1


def abstract_builder(build: Callable[..., nnx.Module], maxsize: int = 16
                     ) -> Callable[..., nnx.Module]:
  """`build(*args)` (hashable args) made abstract, its variables ShapeDtypeStructs (no memory
  allocated). Tracing the construction (`nnx.eval_shape`; this module's layers draw no initial
  values then: `building_abstractly`) happens once per args in a process; each call returns a
  new module from it, whose variables are the caller's to set."""
  parts = functools.lru_cache(maxsize)(lambda *args: nnx.split(_traced_abstractly(build, *args)))

  def abstract(*args) -> nnx.Module:
    return nnx.merge(*parts(*args), copy=True)
  return abstract


def init_variables(specs: Sequence[tuple], shapes: Sequence[tuple[int, ...]], key) -> list:
  """Fresh values for variables described by (init_spec, shape), from two random draws in all.

  One uniform and one normal vector cover every tensor, so the init compiles in a moment even
  for large models, where one random op per tensor takes XLA many seconds on the CPU.
  """
  sizes = [int(np.prod(s)) for s in shapes]
  total = sum(sizes)
  k_u, k_n = jax.random.split(key)
  uniform = jax.random.uniform(k_u, (total,), jnp.float32, -1.0, 1.0)
  normal = jax.random.normal(k_n, (total,), jnp.float32)
  out, start = [], 0
  for spec, shape, size in zip(specs, shapes, sizes):
    u = uniform[start:start + size].reshape(shape)
    n = normal[start:start + size].reshape(shape)
    start += size
    if spec[0] == "zeros":
      out.append(jnp.zeros(shape, jnp.float32))
    elif spec[0] == "ones":
      out.append(jnp.ones(shape, jnp.float32))
    else:
      out.append(_scaled_init(u, n, *spec))
  return out


# ---------------------------------------------------------------------------------------------
# Layers.

class Linear(nnx.Module):
  def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs, bias: bool = True,
               init_mode: str = "kaiming_normal", init_weight: float = 1.0, init_bias: float = 0.0,
               dtype=jnp.float32):
    self.in_features = in_features
    self.out_features = out_features
    self.dtype = dtype
    kw = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
    self.weight = _param(rngs, (in_features, out_features), scale=init_weight, **kw)
    self.bias = _param(rngs, (out_features,), scale=init_bias, **kw) if bias else None

  def __call__(self, x):
    x = x.astype(self.dtype) @ self.weight[...].astype(self.dtype)
    if self.bias is not None:
      x = x + self.bias[...].astype(self.dtype)
    return x


def _resample_filter(taps: Sequence[float]) -> np.ndarray:
  f = np.asarray(taps, dtype=np.float32)
  return np.outer(f, f) / np.square(f.sum())


def _depthwise(x, f: np.ndarray, stride: int, padding, lhs_dilation=(1, 1)):
  c = x.shape[-1]
  k = jnp.asarray(np.tile(f[:, :, None, None], (1, 1, 1, c)), dtype=x.dtype)  # HWIO, I=1
  return jax.lax.conv_general_dilated(
      x, k, window_strides=(stride, stride), padding=padding, lhs_dilation=lhs_dilation,
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c)


def downsample(x, taps: Sequence[float]):
  """EDM's filtered 2x downsampling: depthwise conv with outer(f, f)/sum(f)^2, stride 2."""
  f = _resample_filter(taps)
  if f.shape == (2, 2):  # [1, 1]: plain 2x2 average pooling, which XLA handles better
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
  p = (f.shape[0] - 1) // 2
  return _depthwise(x, f, 2, [(p, p), (p, p)])


def upsample(x, taps: Sequence[float], padding: int | None = None):
  """EDM's filtered 2x upsampling: transposed depthwise conv with 4 * outer(f, f)/sum(f)^2.

  `padding` is the transposed conv's padding, (len(f) - 1) // 2 unless given.
  """
  f = _resample_filter(taps)
  k = f.shape[0]
  p = (k - 1) // 2 if padding is None else padding
  if f.shape == (2, 2) and p == 0:  # [1, 1]: nearest-neighbour repeat
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
  # A stride-2 transposed conv is a conv over the 2x dilated input with padding k - 1 - p.
  return _depthwise(x, (f * 4)[::-1, ::-1], 1, [(k - 1 - p, k - 1 - p)] * 2, lhs_dilation=(2, 2))


class Conv2d(nnx.Module):
  """Conv with optional EDM up/down resampling; kernel=0 means resampling only (no weights)."""

  def __init__(self, in_channels: int, out_channels: int, kernel: int, *, rngs: nnx.Rngs,
               bias: bool = True, up: bool = False, down: bool = False,
               resample_filter: Sequence[float] = (1, 1), fused_resample: bool = False,
               init_mode: str = "kaiming_normal", init_weight: float = 1.0, init_bias: float = 0.0,
               dtype=jnp.float32):
    assert not (up and down)
    self.in_channels = in_channels
    self.out_channels = out_channels
    self.kernel = kernel
    self.up = up
    self.down = down
    self.resample_filter = tuple(float(v) for v in resample_filter)
    self.fused_resample = fused_resample
    self.dtype = dtype
    kw = dict(mode=init_mode, fan_in=in_channels * kernel * kernel,
              fan_out=out_channels * kernel * kernel)
    self.weight = (_param(rngs, (kernel, kernel, in_channels, out_channels), scale=init_weight, **kw)
                   if kernel else None)
    self.bias = _param(rngs, (out_channels,), scale=init_bias, **kw) if kernel and bias else None

  def _conv(self, x, pad):
    w = self.weight[...].astype(self.dtype)
    return jax.lax.conv_general_dilated(
        x, w, window_strides=(1, 1), padding=[(pad, pad), (pad, pad)],
        dimension_numbers=("NHWC", "HWIO", "NHWC"))

  def __call__(self, x):
    x = x.astype(self.dtype)
    w_pad = self.kernel // 2
    f_len = len(self.resample_filter)
    f_pad = (f_len - 1) // 2
    if self.fused_resample and self.up and self.weight is not None:
      x = upsample(x, self.resample_filter, padding=max(f_pad - w_pad, 0))
      x = self._conv(x, max(w_pad - f_pad, 0))
    elif self.fused_resample and self.down and self.weight is not None:
      x = self._conv(x, w_pad + f_pad)
      f = _resample_filter(self.resample_filter)
      x = _depthwise(x, f, 2, [(0, 0), (0, 0)])
    else:
      if self.up:
        x = upsample(x, self.resample_filter)
      if self.down:
        x = downsample(x, self.resample_filter)
      if self.weight is not None:
        x = self._conv(x, w_pad)
    if self.bias is not None:
      x = x + self.bias[...].astype(self.dtype)
    return x


class GroupNorm(nnx.Module):
  """GroupNorm with EDM's group rule: min(num_groups, C // min_channels_per_group); f32 statistics."""

  def __init__(self, num_channels: int, *, num_groups: int = 32, min_channels_per_group: int = 4,
               eps: float = 1e-5):
    self.num_groups = min(num_groups, num_channels // min_channels_per_group)
    self.eps = eps
    self.weight = nnx.Param(jnp.ones((num_channels,), jnp.float32), init_spec=("ones",))
    self.bias = nnx.Param(jnp.zeros((num_channels,), jnp.float32), init_spec=("zeros",))

  def __call__(self, x):
    return group_norm(x, self.num_groups, self.weight[...], self.bias[...], self.eps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 4))
def group_norm(x, num_groups: int, weight, bias, eps: float):
  """Group normalisation of NHWC `x` with statistics in float32 whatever x's dtype (bfloat16
  variances over large groups lose too much); returns x's dtype.

  Its gradient is written out (`_group_norm_bwd`): two group reductions for x's gradient,
  fewer than differentiating the forward formula gives XLA to compile, and only x and the
  per-group statistics are kept for the backward pass."""
  return _group_norm_fwd(x, num_groups, weight, bias, eps)[0]


def _group_norm_fwd(x, num_groups: int, weight, bias, eps: float):
  b, h, w, c = x.shape
  xg = x.astype(jnp.float32).reshape(b, h, w, num_groups, c // num_groups)
  mean = xg.mean(axis=(1, 2, 4), keepdims=True)
  var = jnp.square(xg - mean).mean(axis=(1, 2, 4), keepdims=True)
  rstd = jax.lax.rsqrt(var + eps)
  y = (((xg - mean) * rstd).reshape(b, h, w, c) * weight + bias).astype(x.dtype)
  return y, (x, mean, rstd, weight, bias)


def _group_norm_bwd(num_groups: int, eps: float, residuals, dy):
  """With x^ = (x - mean) * rstd per group and g = dy * weight (float32):
  dx = rstd * (g - mean(g) - x^ * mean(g * x^)) over each group, dweight = sum(dy * x^) and
  dbias = sum(dy) over batch and pixels."""
  del eps
  x, mean, rstd, weight, bias = residuals
  b, h, w, c = x.shape
  grouped = (b, h, w, num_groups, c // num_groups)
  xhat = (x.astype(jnp.float32).reshape(grouped) - mean) * rstd
  dy = dy.astype(jnp.float32)
  d_weight = (dy * xhat.reshape(x.shape)).sum(axis=(0, 1, 2))
  d_bias = dy.sum(axis=(0, 1, 2))
  g = (dy * weight).reshape(grouped)
  g_mean = g.mean(axis=(1, 2, 4), keepdims=True)
  gx_mean = (g * xhat).mean(axis=(1, 2, 4), keepdims=True)
  dx = rstd * (g - g_mean - xhat * gx_mean)
  return (dx.reshape(x.shape).astype(x.dtype), d_weight.astype(weight.dtype),
          d_bias.astype(bias.dtype))


group_norm.defvjp(_group_norm_fwd, _group_norm_bwd)


def split_keys(key, n: int) -> list:
  """n keys from `key`: one key gives n keys, a (B,) array of per-sample keys gives n such
  arrays (each sample's key split on its own); None gives n Nones."""
  if key is None:
    return [None] * n
  if jnp.ndim(key) == 0:
    return list(jax.random.split(key, n))
  parts = jax.vmap(lambda k: jax.random.split(k, n))(key)
  return [parts[:, i] for i in range(n)]


def _fmix32(h):
  """MurmurHash3's 32-bit finaliser: a bijection of uint32 in which every input bit flips each
  output bit with probability close to 1/2."""
  h = (h ^ (h >> 16)) * jnp.uint32(0x85EBCA6B)
  h = (h ^ (h >> 13)) * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def hashed_bits(key, shape) -> jax.Array:
  """uint32 random bits of `shape` from one key, or from per-sample keys (B,) for shape[0] == B
  (sample i's bits from key i alone): element c (its flat index within the sample, or within
  the whole array for one key) gets fmix32(fmix32(c ^ k0) ^ k1 ...) over the key's 32-bit words.

  For the dropout and label-dropout masks (`dropped`): a counter hash is a few integer
  operations per element where threefry (`jax.random.bits`) runs twenty rounds, and XLA
  compiles that kernel again for every activation shape (a large share of a gradient program's
  compile time on CPU). The key itself is a threefry key, split as usual; each key gives a
  bijection of the counters.
  """
  dtype = jnp.asarray(key).dtype
  if not jnp.issubdtype(dtype, jax.dtypes.prng_key):
    raise TypeError(f"hashed_bits needs typed keys (jax.random.key), not {dtype}")
  words = jax.random.key_data(key).astype(jnp.uint32)
  if jnp.ndim(key) == 0:
    lead, rest = (), tuple(shape)
  elif jnp.ndim(key) == 1 and len(shape) >= 1 and shape[0] == key.shape[0]:
    lead, rest = (shape[0],), tuple(shape[1:])
  else:
    raise ValueError(f"hashed_bits: keys of shape {jnp.shape(key)} for an array of {shape}")
  n = int(np.prod(rest, dtype=np.int64))
  if n >= 2**32:
    raise ValueError(f"hashed_bits: {n} elements per key; the counters are 32-bit")
  words = words.reshape(lead + (1,) * len(rest) + (-1,))
  h = jax.lax.iota(jnp.uint32, n).reshape(rest)
  for i in range(words.shape[-1]):
    h = _fmix32(h ^ words[..., i])
  return h


def dropped(key, shape, rate: float) -> jax.Array:
  """Booleans of `shape`, each True with probability `rate` (to within 2^-32; all True for
  rate >= 1), from `hashed_bits` of `key` (one key, or per-sample keys (B,))."""
  if rate >= 1:
    return jnp.ones(shape, bool)
  return hashed_bits(key, shape) < jnp.uint32(min(round(rate * 2.0**32), 2**32 - 1))


def dropout(x, rate: float, key, train: bool):
  """Inverted dropout: zero each element with probability `rate`, scale the rest by
  1 / (1 - rate); the mask is `dropped(key, x.shape, rate)`."""
  if not train or rate == 0:
    return x
  if key is None:
    raise ValueError("dropout in training mode needs a PRNG key")
  if not 0 < rate < 1:
    raise ValueError(f"dropout rate {rate} is outside (0, 1)")
  return jnp.where(dropped(key, x.shape, rate), 0, x / (1.0 - rate)).astype(x.dtype)


def positional_embedding(x, num_channels: int, max_positions: int = 10000, endpoint: bool = False):
  half = num_channels // 2
  freqs = jnp.arange(half, dtype=jnp.float32) / (half - (1 if endpoint else 0))
  freqs = (1.0 / max_positions) ** freqs
  x = jnp.outer(x.astype(jnp.float32), freqs)
  return jnp.concatenate([jnp.cos(x), jnp.sin(x)], axis=1)


class FourierEmbedding(nnx.Module):
  def __init__(self, num_channels: int, *, rngs: nnx.Rngs, scale: float = 16.0):
    n = num_channels // 2
    self.freqs = _param(rngs, (n,), "normal", n, n, scale, cls=Buffer)

  def __call__(self, x):
    x = jnp.outer(x.astype(jnp.float32), 2 * np.pi * self.freqs[...])
    return jnp.concatenate([jnp.cos(x), jnp.sin(x)], axis=1)


# ---------------------------------------------------------------------------------------------
# The UNet block shared by both backbones.

class UNetBlock(nnx.Module):
  def __init__(self, in_channels: int, out_channels: int, emb_channels: int, *, rngs: nnx.Rngs,
               up: bool = False, down: bool = False, attention: bool = False,
               num_heads: int | None = None, channels_per_head: int = 64, dropout: float = 0.0,
               skip_scale: float = 1.0, eps: float = 1e-5, resample_filter=(1, 1),
               resample_proj: bool = False, adaptive_scale: bool = True,
               init: dict | None = None, init_zero: dict | None = None, init_attn: dict | None = None,
               dtype=jnp.float32):
    init = dict(init or {})
    init_zero = dict(init_zero if init_zero is not None else {"init_weight": 0})
    self.in_channels = in_channels
    self.out_channels = out_channels
    self.num_heads = (0 if not attention else
                      num_heads if num_heads is not None else out_channels // channels_per_head)
    self.dropout = dropout
    self.skip_scale = skip_scale
    self.adaptive_scale = adaptive_scale
    self.dtype = dtype
    conv = dict(rngs=rngs, dtype=dtype)

    self.norm0 = GroupNorm(in_channels, eps=eps)
    self.conv0 = Conv2d(in_channels, out_channels, 3, up=up, down=down,
                        resample_filter=resample_filter, **init, **conv)
    self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init, **conv)
    self.norm1 = GroupNorm(out_channels, eps=eps)
    self.conv1 = Conv2d(out_channels, out_channels, 3, **init_zero, **conv)
    needs_skip = out_channels != in_channels or up or down
    kernel = 1 if resample_proj or out_channels != in_channels else 0
    self.skip = (Conv2d(in_channels, out_channels, kernel, up=up, down=down,
                        resample_filter=resample_filter, **init, **conv) if needs_skip else None)
    if self.num_heads:
      self.norm2 = GroupNorm(out_channels, eps=eps)
      self.qkv = Conv2d(out_channels, out_channels * 3, 1,
                        **(init_attn if init_attn is not None else init), **conv)
      self.proj = Conv2d(out_channels, out_channels, 1, **init_zero, **conv)

  def __call__(self, x, emb, *, train: bool = False, key=None):
    orig = x
    x = self.conv0(jax.nn.silu(self.norm0(x)))
    params = self.affine(emb)[:, None, None, :].astype(x.dtype)
    if self.adaptive_scale:
      scale, shift = jnp.split(params, 2, axis=-1)
      x = jax.nn.silu(shift + self.norm1(x) * (scale + 1))
    else:
      x = jax.nn.silu(self.norm1(x + params))
    x = self.conv1(dropout(x, self.dropout, key, train))
    x = x + (self.skip(orig) if self.skip is not None else orig.astype(x.dtype))
    x = x * self.skip_scale

    if self.num_heads:
      b, h, w, c = x.shape
      heads = self.num_heads
      ch = c // heads
      # Channel layout of qkv follows the official reshape (heads, channels, 3).
      qkv = self.qkv(self.norm2(x)).reshape(b, h * w, heads, ch, 3)
      q, k, v = qkv[..., 0], qkv[..., 1], qkv[..., 2]
      logits = jnp.einsum("bqhc,bkhc->bhqk", q.astype(jnp.float32),
                          k.astype(jnp.float32) / np.sqrt(ch))
      weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)  # softmax in f32
      a = jnp.einsum("bhqk,bkhc->bqhc", weights, v).reshape(b, h, w, c)
      x = (self.proj(a) + x) * self.skip_scale
    return x


# ---------------------------------------------------------------------------------------------
# DDPM++ / NCSN++.

class SongUNet(nnx.Module):
  def __init__(self, img_resolution: int, in_channels: int, out_channels: int, *, rngs: nnx.Rngs,
               label_dim: int = 0, augment_dim: int = 0, model_channels: int = 128,
               channel_mult: Sequence[int] = (1, 2, 2, 2), channel_mult_emb: int = 4,
               num_blocks: int = 4, attn_resolutions: Sequence[int] = (16,), dropout: float = 0.10,
               label_dropout: float = 0.0, embedding_type: str = "positional",
               channel_mult_noise: int = 1, encoder_type: str = "standard",
               decoder_type: str = "standard", resample_filter: Sequence[int] = (1, 1),
               dtype=jnp.float32):
    if embedding_type not in ("fourier", "positional"):
      raise ValueError(f"embedding_type={embedding_type!r} is not 'fourier' or 'positional'")
    if encoder_type not in ("standard", "skip", "residual"):
      raise ValueError(f"encoder_type={encoder_type!r} is not 'standard', 'skip' or 'residual'")
    if decoder_type not in ("standard", "skip"):
      raise ValueError(f"decoder_type={decoder_type!r} is not 'standard' or 'skip'")
    self.label_dropout = label_dropout
    self.label_dim = label_dim
    self.embedding_type = embedding_type
    self.dtype = dtype
    emb_channels = model_channels * channel_mult_emb
    self.noise_channels = noise_channels = model_channels * channel_mult_noise
    init = dict(init_mode="xavier_uniform")
    init_zero = dict(init_mode="xavier_uniform", init_weight=1e-5)
    init_attn = dict(init_mode="xavier_uniform", init_weight=np.sqrt(0.2))
    block_kwargs = dict(emb_channels=emb_channels, num_heads=1, dropout=dropout,
                        skip_scale=np.sqrt(0.5), eps=1e-6, resample_filter=resample_filter,
                        resample_proj=True, adaptive_scale=False, init=init, init_zero=init_zero,
                        init_attn=init_attn, rngs=rngs, dtype=dtype)
    lin = dict(rngs=rngs)  # the embedding MLP runs in f32: it is tiny

    self.map_noise = (FourierEmbedding(noise_channels, rngs=rngs)
                      if embedding_type == "fourier" else None)
    self.map_label = Linear(label_dim, noise_channels, **init, **lin) if label_dim else None
    self.map_augment = (Linear(augment_dim, noise_channels, bias=False, **init, **lin)
                        if augment_dim else None)
    self.map_layer0 = Linear(noise_channels, emb_channels, **init, **lin)
    self.map_layer1 = Linear(emb_channels, emb_channels, **init, **lin)

    enc = {}
    cout = in_channels
    caux = in_channels
    inputs = []  # the convs that read the network's input (see `input_convs`)
    for level, mult in enumerate(channel_mult):
      res = img_resolution >> level
      if level == 0:
        cin = cout
        cout = model_channels
        enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, 3, **init, rngs=rngs, dtype=dtype)
        inputs.append(f"enc.{res}x{res}_conv")
      else:
        enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block_kwargs)
        if encoder_type == "skip":  # every aux_skip reads the input, downsampled
          enc[f"{res}x{res}_aux_down"] = Conv2d(caux, caux, 0, down=True,
                                                resample_filter=resample_filter, rngs=rngs,
                                                dtype=dtype)
          enc[f"{res}x{res}_aux_skip"] = Conv2d(caux, cout, 1, **init, rngs=rngs, dtype=dtype)
          inputs.append(f"enc.{res}x{res}_aux_skip")
        if encoder_type == "residual":
          if level == 1:  # the first aux_residual reads the input; the next, the one before's sum
            inputs.append(f"enc.{res}x{res}_aux_residual")
          enc[f"{res}x{res}_aux_residual"] = Conv2d(caux, cout, 3, down=True,
                                                    resample_filter=resample_filter,
                                                    fused_resample=True, **init, rngs=rngs,
                                                    dtype=dtype)
          caux = cout
      for idx in range(num_blocks):
        cin = cout
        cout = model_channels * mult
        enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=(res in attn_resolutions),
                                                   **block_kwargs)
    skips = [m.out_channels for name, m in enc.items() if "aux" not in name]

    dec = {}
    for level, mult in reversed(list(enumerate(channel_mult))):
      res = img_resolution >> level
      if level == len(channel_mult) - 1:
        dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block_kwargs)
        dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block_kwargs)
      else:
        dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block_kwargs)
      for idx in range(num_blocks + 1):
        cin = cout + skips.pop()
        cout = model_channels * mult
        attn = idx == num_blocks and res in attn_resolutions
        dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attn, **block_kwargs)
      if decoder_type == "skip" or level == 0:
        if decoder_type == "skip" and level < len(channel_mult) - 1:
          dec[f"{res}x{res}_aux_up"] = Conv2d(out_channels, out_channels, 0, up=True,
                                              resample_filter=resample_filter, rngs=rngs,
                                              dtype=dtype)
        dec[f"{res}x{res}_aux_norm"] = GroupNorm(cout, eps=1e-6)
        dec[f"{res}x{res}_aux_conv"] = Conv2d(cout, out_channels, 3, **init_zero, rngs=rngs,
                                              dtype=dtype)
    self.enc_names = tuple(enc)
    self.dec_names = tuple(dec)
    # The layers whose weights read the input channels (image and coordinates) directly: the
    # first conv, and the encoder's auxiliary input path where the architecture has one.
    self.input_convs = tuple(inputs)
    self.enc = nnx.Dict(enc)
    self.dec = nnx.Dict(dec)

  def embed(self, noise_labels, class_labels, *, train: bool, key):
    if self.map_noise is None:
      emb = positional_embedding(noise_labels, self.noise_channels, endpoint=True)
    else:
      emb = self.map_noise(noise_labels)
    b = emb.shape[0]
    emb = emb.reshape(b, 2, -1)[:, ::-1].reshape(b, -1)  # swap the sin and cos halves
    if self.map_label is not None:
      tmp = _label_input(class_labels, b, self.label_dim)
      tmp = _drop_labels(tmp, self.label_dropout, key, train)
      emb = emb + self.map_label(tmp * np.sqrt(self.map_label.in_features))
    emb = jax.nn.silu(self.map_layer0(emb))
    return jax.nn.silu(self.map_layer1(emb))

  def __call__(self, x, noise_labels, class_labels=None, *, train: bool = False, key=None):
    key_emb, key_blocks = split_keys(key, 2)
    emb = self.embed(noise_labels, class_labels, train=train, key=key_emb)
    keys = iter(split_keys(key_blocks, len(self.enc_names) + len(self.dec_names)))

    skips = []
    aux = x
    for name in self.enc_names:
      block = self.enc[name]
      k = next(keys)
      if "aux_down" in name:
        aux = block(aux)
      elif "aux_skip" in name:
        x = skips[-1] = x + block(aux)
      elif "aux_residual" in name:
        x = skips[-1] = aux = (x + block(aux)) / np.sqrt(2)
      elif isinstance(block, UNetBlock):
        x = block(x, emb, train=train, key=k)
        skips.append(x)
      else:
        x = block(x)
        skips.append(x)

    aux = None
    tmp = None
    for name in self.dec_names:
      block = self.dec[name]
      k = next(keys)
      if "aux_up" in name:
        aux = block(aux)
      elif "aux_norm" in name:
        tmp = block(x)
      elif "aux_conv" in name:
        tmp = block(jax.nn.silu(tmp))
        aux = tmp if aux is None else tmp + aux
      else:
        if x.shape[-1] != block.in_channels:
          x = jnp.concatenate([x, skips.pop().astype(x.dtype)], axis=-1)
        x = block(x, emb, train=train, key=k)
    return aux


def _label_input(class_labels, batch: int, label_dim: int):
  if class_labels is None:  # an unconditional call of a conditional net: the all-zero label
    return jnp.zeros((batch, label_dim), jnp.float32)
  return jnp.broadcast_to(class_labels.astype(jnp.float32).reshape(-1, label_dim),
                          (batch, label_dim))


def _drop_labels(labels, rate: float, key, train: bool):
  """Label dropout for classifier-free guidance: whole label vectors zeroed per sample."""
  if not train or not rate:
    return labels
  if key is None:
    raise ValueError("label dropout in training mode needs a PRNG key")
  keep = ~dropped(key, (labels.shape[0], 1), rate)
  return labels * keep.astype(labels.dtype)


# ---------------------------------------------------------------------------------------------
# ADM.

class DhariwalUNet(nnx.Module):
  def __init__(self, img_resolution: int, in_channels: int, out_channels: int, *, rngs: nnx.Rngs,
               label_dim: int = 0, augment_dim: int = 0, model_channels: int = 192,
               channel_mult: Sequence[int] = (1, 2, 3, 4), channel_mult_emb: int = 4,
               num_blocks: int = 3, attn_resolutions: Sequence[int] = (32, 16, 8),
               dropout: float = 0.10, label_dropout: float = 0.0, dtype=jnp.float32):
    self.label_dropout = label_dropout
    self.label_dim = label_dim
    self.model_channels = model_channels
    self.dtype = dtype
    emb_channels = model_channels * channel_mult_emb
    init = dict(init_mode="kaiming_uniform", init_weight=np.sqrt(1 / 3), init_bias=np.sqrt(1 / 3))
    init_zero = dict(init_mode="kaiming_uniform", init_weight=0, init_bias=0)
    block_kwargs = dict(emb_channels=emb_channels, channels_per_head=64, dropout=dropout,
                        init=init, init_zero=init_zero, rngs=rngs, dtype=dtype)

    self.map_augment = (Linear(augment_dim, model_channels, bias=False, init_mode="kaiming_normal",
                               init_weight=np.sqrt(augment_dim), rngs=rngs)
                        if augment_dim else None)
    self.map_layer0 = Linear(model_channels, emb_channels, **init, rngs=rngs)
    self.map_layer1 = Linear(emb_channels, emb_channels, **init, rngs=rngs)
    self.map_label = (Linear(label_dim, emb_channels, bias=False, init_mode="kaiming_normal",
                             init_weight=np.sqrt(label_dim), rngs=rngs) if label_dim else None)

    enc = {}
    cout = in_channels
    for level, mult in enumerate(channel_mult):
      res = img_resolution >> level
      if level == 0:
        cin = cout
        cout = model_channels * mult
        enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, 3, **init, rngs=rngs, dtype=dtype)
      else:
        enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block_kwargs)
      for idx in range(num_blocks):
        cin = cout
        cout = model_channels * mult
        enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=(res in attn_resolutions),
                                                   **block_kwargs)
    skips = [m.out_channels for m in enc.values()]

    dec = {}
    for level, mult in reversed(list(enumerate(channel_mult))):
      res = img_resolution >> level
      if level == len(channel_mult) - 1:
        dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block_kwargs)
        dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block_kwargs)
      else:
        dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block_kwargs)
      for idx in range(num_blocks + 1):
        cin = cout + skips.pop()
        cout = model_channels * mult
        dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=(res in attn_resolutions),
                                                   **block_kwargs)
    self.enc_names = tuple(enc)
    self.dec_names = tuple(dec)
    self.input_convs = (f"enc.{img_resolution}x{img_resolution}_conv",)  # reads the input
    self.enc = nnx.Dict(enc)
    self.dec = nnx.Dict(dec)
    self.out_norm = GroupNorm(cout)
    self.out_conv = Conv2d(cout, out_channels, 3, **init_zero, rngs=rngs, dtype=dtype)

  def __call__(self, x, noise_labels, class_labels=None, *, train: bool = False, key=None):
    key_emb, key_blocks = split_keys(key, 2)
    emb = positional_embedding(noise_labels, self.model_channels)
    b = emb.shape[0]
    emb = jax.nn.silu(self.map_layer0(emb))
    emb = self.map_layer1(emb)
    if self.map_label is not None:
      tmp = _drop_labels(_label_input(class_labels, b, self.label_dim), self.label_dropout,
                         key_emb, train)
      emb = emb + self.map_label(tmp)
    emb = jax.nn.silu(emb)
    keys = iter(split_keys(key_blocks, len(self.enc_names) + len(self.dec_names)))

    skips = []
    for name in self.enc_names:
      block = self.enc[name]
      k = next(keys)
      x = block(x, emb, train=train, key=k) if isinstance(block, UNetBlock) else block(x)
      skips.append(x)
    for name in self.dec_names:
      block = self.dec[name]
      k = next(keys)
      if x.shape[-1] != block.in_channels:
        x = jnp.concatenate([x, skips.pop().astype(x.dtype)], axis=-1)
      x = block(x, emb, train=train, key=k)
    return self.out_conv(jax.nn.silu(self.out_norm(x)))
