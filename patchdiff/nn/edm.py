"""EDM maths (Karras et al. 2022) as used by Patch Diffusion: preconditioning, noise levels, loss.

The denoiser wraps a backbone F: D(x) = c_skip x + c_out F(c_in x ++ pos, c_noise); the two
coordinate channels are appended after the c_in scaling and are never noised.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

P_MEAN = -1.2
P_STD = 1.2
SIGMA_DATA = 0.5


def preconditioning(sigma, sigma_data: float = SIGMA_DATA):
  """(c_skip, c_out, c_in, c_noise) for noise levels `sigma`, elementwise."""
  s2 = jnp.square(sigma)
  d2 = sigma_data ** 2
  c_skip = d2 / (s2 + d2)
  c_out = sigma * sigma_data / jnp.sqrt(s2 + d2)
  c_in = 1 / jnp.sqrt(s2 + d2)
  c_noise = jnp.log(sigma) / 4
  return c_skip, c_out, c_in, c_noise


def loss_weight(sigma, sigma_data: float = SIGMA_DATA):
  """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2."""
  return (jnp.square(sigma) + sigma_data ** 2) / jnp.square(sigma * sigma_data)


def sample_sigma(key, batch: int, p_mean: float = P_MEAN, p_std: float = P_STD):
  """Training noise levels: ln(sigma) ~ N(p_mean, p_std^2), one per sample."""
  return jnp.exp(jax.random.normal(key, (batch,), jnp.float32) * p_std + p_mean)


class Denoiser(nnx.Module):
  """Patch_EDMPrecond: the preconditioned denoiser D(x, sigma, pos, labels) around a backbone."""

  def __init__(self, model: nnx.Module, *, label_dim: int = 0, sigma_data: float = SIGMA_DATA,
               img_channels: int = 3, img_resolution: int = 64):
    self.model = model
    self.label_dim = label_dim
    self.sigma_data = sigma_data
    self.img_channels = img_channels
    self.img_resolution = img_resolution

  def __call__(self, x, sigma, pos, labels=None, *, train: bool = False, key=None):
    """x (B,H,W,C) noisy images, sigma (B,) or scalar, pos (B,H,W,2) [x, y] -> (B,H,W,C_out)."""
    x = x.astype(jnp.float32)
    sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32).reshape(-1), (x.shape[0],))
    c_skip, c_out, c_in, c_noise = preconditioning(sigma.reshape(-1, 1, 1, 1), self.sigma_data)
    x_in = c_in * x
    if pos is not None:
      x_in = jnp.concatenate([x_in, pos.astype(jnp.float32)], axis=-1)
    if self.label_dim and labels is None:
      labels = jnp.zeros((1, self.label_dim), jnp.float32)
    f_x = self.model(x_in, c_noise.reshape(-1), labels if self.label_dim else None,
                     train=train, key=key)
    return c_skip * x + c_out * f_x.astype(jnp.float32)


def sample_keys(key, index):
  """Per-sample keys fold_in(key, i) for the sample indices `index` (any shape), so that a
  sample's draws depend on its index alone, not on the batch it is computed in."""
  return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.ravel(index)).reshape(
      jnp.shape(index))


def training_draws(key, shape, *, p_mean: float = P_MEAN, p_std: float = P_STD):
  """The random draws of the training loss for a batch of `shape` (B, H, W, C): a dict of
  `rnd_normal` (B,) (ln(sigma) = rnd_normal * p_std + p_mean), `noise` (B, H, W, C) of unit
  variance (the loss adds noise * sigma) and `dropout` (B,) keys for the network.

  `key` is one typed key (sample i then draws from `sample_keys(key, i)`) or a (B,) array of
  per-sample keys. Each sample draws from its own key, so its draws do not depend on which other
  samples share its batch: the micro-batches of gradient accumulation draw what the whole batch
  draws.
  """
  b = shape[0]
  keys = key if jnp.ndim(key) else sample_keys(key, jnp.arange(b))
  if keys.shape != (b,):
    raise ValueError(f"training_draws: {keys.shape} keys for a batch of {b}")
  parts = jax.vmap(lambda k: jax.random.split(k, 3))(keys)
  k_sigma, k_noise, k_drop = parts[:, 0], parts[:, 1], parts[:, 2]
  rnd_normal = jax.vmap(lambda k: jax.random.normal(k, (), jnp.float32))(k_sigma)
  noise = jax.vmap(lambda k: jax.random.normal(k, tuple(shape[1:]), jnp.float32))(k_noise)
  return dict(rnd_normal=rnd_normal, noise=noise, dropout=k_drop)


def loss_of_draws(denoiser, images, pos, labels, draws, *, train: bool = True,
                  p_mean: float = P_MEAN, p_std: float = P_STD):
  """EDM loss per sample for given draws (`training_draws`' dict): sum over pixels of
  lambda(sigma) (D(y + n) - y)^2 with sigma = exp(rnd_normal * p_std + p_mean) and
  n = noise * sigma, shape (B,).

  Summed, not averaged, per sample as in the official code, so a small patch contributes a
  proportionally smaller loss; the caller averages over samples.
  """
  b = images.shape[0]
  sigma = jnp.exp(draws["rnd_normal"].reshape(b) * p_std + p_mean)
  s4 = sigma.reshape(-1, 1, 1, 1)
  noisy = images + draws["noise"] * s4
  d = denoiser(noisy, sigma, pos, labels, train=train, key=draws["dropout"])
  per_elem = loss_weight(s4, denoiser.sigma_data) * jnp.square(d - images)
  return per_elem.reshape(b, -1).sum(axis=1)


def denoising_loss(denoiser, images, pos, labels, key, *, train: bool = True,
                   p_mean: float = P_MEAN, p_std: float = P_STD):
  """EDM loss per sample, shape (B,): `loss_of_draws` of `training_draws(key, ...)`."""
  draws = training_draws(key, images.shape, p_mean=p_mean, p_std=p_std)
  return loss_of_draws(denoiser, images, pos, labels, draws, train=train, p_mean=p_mean,
                       p_std=p_std)
