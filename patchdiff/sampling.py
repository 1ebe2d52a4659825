"""EDM's Heun sampler (deterministic and stochastic) with coordinate channels and guidance.

The loop is a `lax.fori_loop` inside one jitted program; the noise levels are computed on the
host in float64 (as the official sampler does) and enter the program as constants.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from patchdiff import patches, xla_options


def noise_levels(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0,
                 rho: float = 7.0) -> np.ndarray:
  """t_0 > ... > t_{N-1} by EDM's rho schedule, then t_N = 0; float64, length N + 1."""
  if num_steps < 1:
    raise ValueError(f"num_steps={num_steps} must be >= 1")
  if not 0 < sigma_min < sigma_max:
    raise ValueError(f"need 0 < sigma_min ({sigma_min}) < sigma_max ({sigma_max})")
  i = np.arange(num_steps, dtype=np.float64)
  denom = max(num_steps - 1, 1)
  t = (sigma_max ** (1 / rho) + i / denom * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
  return np.concatenate([t, [0.0]])


def canvas_grid(batch: int, canvas: int, resolution: int) -> np.ndarray:
  """Coordinates of a `canvas` x `canvas` image centred on the training canvas: the grid of
  [-1, 1] continued beyond it at the same pixel spacing (extrapolation, paper section 4.5).
  With canvas = resolution it is the full-image grid the sampler uses by default."""
  if canvas < resolution or (canvas - resolution) % 2:
    raise ValueError(f"canvas {canvas} must be >= the resolution {resolution} and differ from "
                     "it by an even number of pixels")
  off = -((canvas - resolution) // 2)
  return patches.coord_grid(np.full(batch, off), np.full(batch, off), canvas, resolution)


def churn_gammas(t_steps: np.ndarray, num_steps: int, s_churn: float, s_min: float,
                 s_max: float) -> np.ndarray:
  g = min(s_churn / num_steps, np.sqrt(2) - 1)
  t = t_steps[:-1]
  return np.where((s_min <= t) & (t <= s_max), g, 0.0)


def guided(denoiser: Callable, guidance: float):
  """D with classifier-free guidance: D_u + w (D_c - D_u), the batch doubled in one call."""
  if guidance == 1.0:
    return denoiser

  def d(x, sigma, pos, labels):
    if labels is None:
      raise ValueError("classifier-free guidance needs class labels")
    b = x.shape[0]
    both = denoiser(jnp.concatenate([x, x]), jnp.concatenate([sigma, sigma]),
                    jnp.concatenate([pos, pos]),
                    jnp.concatenate([labels, jnp.zeros_like(labels)]))
    d_c, d_u = both[:b], both[b:]
    return d_u + guidance * (d_c - d_u)
  return d


def _normal_like(key, x, i):
  """Per-step noise; `key` is one key, or one key per sample (then each sample's noise depends
  only on its own key, whatever the batch)."""
  if key.ndim == 0:
    return jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
  keys = jax.vmap(lambda k: jax.random.fold_in(k, i))(key)
  return jax.vmap(lambda k: jax.random.normal(k, x.shape[1:], x.dtype))(keys)


_KNOWN_NOISE = 1 << 20  # folded into the key for the noise of the known region (see heun_loop)


def heun_loop(denoise: Callable, latents, pos, labels, t_steps: np.ndarray, gammas: np.ndarray,
              s_noise: float = 1.0, key=None, known=None, mask=None):
  """The sampler as a traceable function of D(x, sigma, pos, labels). NFE = 2N - 1.

  Inpainting and outpainting: where `mask` (broadcastable to the latents, 1 = known) is set, the
  state is replaced by `known` noised to the current level before every step (at the start with
  the latents themselves, later with fresh per-step noise), and by `known` itself at the end, so
  the known pixels come out exactly and the rest is generated around them.
  """
  n = len(t_steps) - 1
  b = latents.shape[0]
  t_hats = t_steps[:-1] * (1 + gammas)
  stochastic = bool(np.any(gammas > 0))
  if stochastic and key is None:
    raise ValueError("a stochastic sampler (S_churn > 0) needs a PRNG key")
  if (known is None) != (mask is None):
    raise ValueError("inpainting needs both `known` and `mask`")
  if known is not None and key is None:
    raise ValueError("inpainting needs a PRNG key (the known region is re-noised every step)")
  t_cur_a = jnp.asarray(t_steps[:-1], jnp.float32)

  def impose(i, x):
    """x with its known region replaced by the known image at noise level t_i (i >= 1)."""
    if known is None:
      return x
    noised = known + t_cur_a[i] * _normal_like(key, x, _KNOWN_NOISE + i)
    return mask * noised + (1 - mask) * x
  t_next_a = jnp.asarray(t_steps[1:], jnp.float32)
  t_hat_a = jnp.asarray(t_hats, jnp.float32)
  # sqrt(t_hat^2 - t_cur^2) * S_noise, from float64
  churn_a = jnp.asarray(np.sqrt(np.maximum(t_hats ** 2 - t_steps[:-1] ** 2, 0)) * s_noise,
                        jnp.float32)

  def euler(i, x_cur):
    t_hat = t_hat_a[i]
    x_hat = x_cur
    if stochastic:
      x_hat = x_cur + churn_a[i] * _normal_like(key, x_cur, i)
    denoised = denoise(x_hat, jnp.full((b,), t_hat), pos, labels)
    d_cur = (x_hat - denoised) / t_hat
    return x_hat, d_cur, x_hat + (t_next_a[i] - t_hat) * d_cur

  def heun_step(i, x_cur):
    x_cur = jax.lax.cond(i > 0, impose, lambda _, x: x, i, x_cur) if known is not None else x_cur
    x_hat, d_cur, x_next = euler(i, x_cur)
    t_next = t_next_a[i]
    denoised = denoise(x_next, jnp.full((b,), t_next), pos, labels)
    d_prime = (x_next - denoised) / t_next
    return x_hat + (t_next - t_hat_a[i]) * (0.5 * d_cur + 0.5 * d_prime)

  x = latents.astype(jnp.float32) * jnp.float32(t_steps[0])
  if known is not None:
    known = known.astype(jnp.float32)
    mask = mask.astype(jnp.float32)
    x = mask * (known + x) + (1 - mask) * x  # level t_0 with the latents as its noise
  x = jax.lax.fori_loop(0, n - 1, heun_step, x)
  if known is not None and n > 1:
    x = impose(n - 1, x)
  x = euler(n - 1, x)[2]  # the last step is Euler: t_N = 0
  return x if known is None else mask * known + (1 - mask) * x


def _heun_program(graphdef, state, latents, pos, labels, key, known, mask, *, t_steps, gammas,
                   s_noise, guidance):
  denoiser = nnx.merge(graphdef, state)
  d = guided(lambda x, s, p, l: denoiser(x, s, p, l), guidance)
  return heun_loop(d, latents, pos, labels, np.asarray(t_steps), np.asarray(gammas), s_noise, key,
                   known=known, mask=mask)


_heun_jit = xla_options.lazy_jit(_heun_program, static_argnames=(
    "graphdef", "t_steps", "gammas", "s_noise", "guidance"))


def heun_sample(denoiser: nnx.Module, latents, *, num_steps: int = 18, sigma_min: float = 0.002,
                sigma_max: float = 80.0, rho: float = 7.0, s_churn: float = 0.0,
                s_min: float = 0.0, s_max: float = float("inf"), s_noise: float = 1.0,
                labels=None, guidance: float = 1.0, pos=None, key=None, known=None,
                mask=None):
  """Samples from standard-normal `latents` (B,H,W,C) with EDM's Heun sampler, jitted.

  `pos` defaults to the full-image grid of an H x W canvas (offset 0, size R = H), attached at
  every evaluation. `labels` (B, label_dim) one-hot or None; `guidance` is the CFG scale w.
  `key` (one key, or one per sample) drives the churn noise when s_churn > 0 and the noise of
  the known region when `known` (B,H,W,C) and `mask` (1 = known) are given (see heun_loop).
  """
  b, h, w, _ = latents.shape
  if h != w:
    raise ValueError(f"latents must be square, got {h}x{w}")
  if pos is None:
    pos = canvas_grid(b, h, h)
  t_steps = noise_levels(num_steps, sigma_min, sigma_max, rho)
  gammas = churn_gammas(t_steps, num_steps, s_churn, s_min, s_max)
  graphdef, state = nnx.split(denoiser)
  return _heun_jit(graphdef, state, jnp.asarray(latents), jnp.asarray(pos),
                   None if labels is None else jnp.asarray(labels, jnp.float32), key,
                   None if known is None else jnp.asarray(known),
                   None if mask is None else jnp.asarray(mask), t_steps=tuple(t_steps.tolist()), gammas=tuple(gammas.tolist()),
                   s_noise=float(s_noise), guidance=float(guidance))
