"""EDM maths: preconditioning, noise distribution, weighting and the per-sample-sum loss."""
import numpy as np
import jax
import jax.numpy as jnp

from patchdiff.nn import edm


def test_preconditioning_formulas():
  sigma = jnp.array([0.002, 0.5, 80.0])
  c_skip, c_out, c_in, c_noise = edm.preconditioning(sigma)
  s, d = np.array(sigma, np.float64), 0.5
  np.testing.assert_allclose(c_skip, d ** 2 / (s ** 2 + d ** 2), rtol=1e-6)
  np.testing.assert_allclose(c_out, s * d / np.sqrt(s ** 2 + d ** 2), rtol=1e-6)
  np.testing.assert_allclose(c_in, 1 / np.sqrt(s ** 2 + d ** 2), rtol=1e-6)
  np.testing.assert_allclose(c_noise, np.log(s) / 4, rtol=1e-6)
  # EDM's weight is 1 / c_out^2: the network's effective target has unit variance.
  np.testing.assert_allclose(edm.loss_weight(sigma), 1 / np.square(c_out), rtol=1e-5)


def test_training_sigma_is_lognormal():
  sigma = np.asarray(edm.sample_sigma(jax.random.key(0), 200000))
  ln = np.log(sigma)
  assert abs(ln.mean() - (-1.2)) < 0.01 and abs(ln.std() - 1.2) < 0.01


class _Zero:
  """A denoiser that always answers 0, so the loss is weight * y^2 summed per sample."""
  sigma_data = 0.5

  def __call__(self, x, sigma, pos, labels, train=False, key=None):
    self.sigma = sigma
    return jnp.zeros_like(x)


def test_loss_is_summed_per_sample():
  d = _Zero()
  y = jnp.ones((4, 8, 8, 3))
  loss = edm.denoising_loss(d, y, None, None, jax.random.key(0))
  assert loss.shape == (4,)
  np.testing.assert_allclose(loss, edm.loss_weight(d.sigma) * 8 * 8 * 3, rtol=1e-5)
  # A patch with a quarter of the pixels gives a quarter of the loss at the same noise level.
  small = edm.denoising_loss(d, y[:, :4, :4], None, None, jax.random.key(0))
  np.testing.assert_allclose(small * 4, loss, rtol=1e-5)


def test_denoiser_appends_coordinates_after_scaling():
  seen = {}

  class Net:
    def __call__(self, x, noise, labels, train=False, key=None):
      seen["x"], seen["noise"] = x, noise
      return x[..., :3] * 0 + 1.0

  d = edm.Denoiser(Net(), img_channels=3)
  x = jnp.full((2, 4, 4, 3), 2.0)
  pos = jnp.full((2, 4, 4, 2), 0.25)
  sigma = jnp.array([1.0, 2.0])
  out = d(x, sigma, pos)
  c_skip, c_out, c_in, c_noise = [np.asarray(v) for v in edm.preconditioning(sigma)]
  np.testing.assert_allclose(seen["x"][..., :3], 2.0 * c_in[:, None, None, None] * np.ones((2, 4, 4, 3)),
                             rtol=1e-6)
  np.testing.assert_array_equal(seen["x"][..., 3:], pos)  # never scaled, never noised
  np.testing.assert_allclose(seen["noise"], c_noise, rtol=1e-6)
  np.testing.assert_allclose(out, (c_skip * 2 + c_out)[:, None, None, None] * np.ones((2, 4, 4, 3)),
                             rtol=1e-6)
