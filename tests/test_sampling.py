"""The Heun sampler: parity with the official float64 sampler, closed-form Gaussian, guidance."""
import numpy as np
import jax
import jax.numpy as jnp
import pytest

from conftest import FIXTURES
from patchdiff import convert, sampling


def nhwc(a):
  return np.transpose(a, (0, 2, 3, 1))


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_heun_matches_official_sampler(reference, name):
  parity = reference / "parity"
  denoiser = convert.load_torch_state_dict(
      convert.read_state_dict(str(parity / f"{name}_weights.npz")), FIXTURES[name])
  with np.load(parity / f"{name}_io.npz") as io:
    latents = nhwc(io["sampler_latents"])
    labels = io["sampler_labels"] if "sampler_labels" in io.files else None
    for n in (3, 6):
      out = np.asarray(sampling.heun_sample(denoiser, latents, num_steps=n, labels=labels))
      ref = nhwc(io[f"heun_{n}_steps"])
      assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 1e-3


def test_noise_levels_follow_the_rho_schedule():
  t = sampling.noise_levels(50)
  assert len(t) == 51 and t[-1] == 0
  np.testing.assert_allclose([t[0], t[-2]], [80.0, 0.002], rtol=1e-12)
  assert np.all(np.diff(t) < 0)
  with pytest.raises(ValueError, match="num_steps"):
    sampling.noise_levels(0)


def gaussian_denoiser(mu, s):
  """The ideal denoiser of data ~ N(mu, s^2) per dimension: E[y | y + sigma n]."""
  def d(x, sigma, pos, labels):
    sig = sigma.reshape(-1, 1, 1, 1)
    return mu + s ** 2 / (s ** 2 + sig ** 2) * (x - mu)
  return d


def test_heun_with_ideal_denoiser_reproduces_gaussian_data():
  mu, s = 0.7, 0.4
  key = jax.random.key(0)
  latents = jax.random.normal(key, (4096, 4, 4, 1))
  t_steps = sampling.noise_levels(100)
  gammas = sampling.churn_gammas(t_steps, 100, 0.0, 0.0, np.inf)
  x = np.asarray(jax.jit(lambda z: sampling.heun_loop(
      gaussian_denoiser(mu, s), z, None, None, t_steps, gammas))(latents))
  # The probability-flow ODE of a Gaussian is solved in closed form: x(sigma) - mu scales with
  # sqrt(s^2 + sigma^2). From x(80) = 80 z the exact end point is mu + (80 z - mu) s / sqrt(s^2+80^2).
  exact = mu + (80 * np.asarray(latents) - mu) * s / np.sqrt(s ** 2 + 80 ** 2)
  # Heun's discretisation error on this ODE, measured with the same algorithm in float64, falls
  # as N^-2: max |error| 0.016 at 40 steps, 0.0024 at 100, 0.00013 at 400. At 100 steps a
  # tolerance of 4e-3 leaves room for float32 and fails for any first-order (Euler) slip.
  np.testing.assert_allclose(x, exact, atol=4e-3)
  # Data statistics: 65,536 values give a standard error of s / 256 = 0.0016 for the mean and
  # about s^2 * sqrt(2/65536) = 0.0009 for the variance; the start at N(0, 80^2) instead of
  # N(mu, 80^2 + s^2) biases the mean by mu s / 80 = 0.0035. Tolerances: 4 standard errors + bias.
  assert abs(x.mean() - mu) < 4 * 0.0016 + 0.0035
  assert abs(x.var() - s ** 2) < 4 * 0.0009 + 1e-3


def test_stochastic_sampler_with_ideal_denoiser_keeps_the_distribution():
  mu, s = -0.3, 0.6
  latents = jax.random.normal(jax.random.key(1), (4096, 4, 4, 1))
  t_steps = sampling.noise_levels(64)
  gammas = sampling.churn_gammas(t_steps, 64, 40.0, 0.05, 50.0)
  assert gammas.max() > 0
  x = np.asarray(sampling.heun_loop(gaussian_denoiser(mu, s), latents, None, None, t_steps,
                                    gammas, s_noise=1.0, key=jax.random.key(2)))
  # Churn adds fresh noise, so samples are no longer the ODE map of their latents, but the
  # distribution is still N(mu, s^2): same tolerances as above, doubled for the extra noise.
  assert abs(x.mean() - mu) < 2 * (4 * s / 256 + abs(mu) * s / 80)
  assert abs(x.var() - s ** 2) < 2 * (4 * s ** 2 * np.sqrt(2 / 65536) + 1e-3)
  with pytest.raises(ValueError, match="PRNG key"):
    sampling.heun_loop(gaussian_denoiser(mu, s), latents, None, None, t_steps, gammas)


def test_per_sample_keys_make_each_sample_independent_of_the_batch():
  d = gaussian_denoiser(0.0, 0.5)
  t_steps = sampling.noise_levels(8)
  gammas = sampling.churn_gammas(t_steps, 8, 10.0, 0.0, np.inf)
  keys = jax.vmap(jax.random.key)(jnp.arange(4))
  latents = jax.random.normal(jax.random.key(9), (4, 2, 2, 1))
  full = sampling.heun_loop(d, latents, None, None, t_steps, gammas, key=keys)
  part = sampling.heun_loop(d, latents[2:], None, None, t_steps, gammas, key=keys[2:])
  np.testing.assert_allclose(full[2:], part, rtol=1e-6)


def test_classifier_free_guidance_combines_both_halves():
  def d(x, sigma, pos, labels):  # a fake denoiser whose output reveals the label it saw
    return x * 0 + labels.sum(axis=1).reshape(-1, 1, 1, 1)
  g = sampling.guided(d, 1.3)
  x = jnp.zeros((2, 2, 2, 1))
  labels = jnp.array([[1.0, 0.0], [0.0, 1.0]])
  out = g(x, jnp.ones((2,)), x, labels)
  np.testing.assert_allclose(out, 0 + 1.3 * (1 - 0), rtol=1e-6)  # D_u = 0, D_c = 1
  assert sampling.guided(d, 1.0) is d
  with pytest.raises(ValueError, match="class labels"):
    g(x, jnp.ones((2,)), x, None)


def test_nfe_is_two_n_minus_one():
  calls = []
  def d(x, sigma, pos, labels):
    calls.append(1)
    return x * 0
  sampling.heun_loop(d, jnp.ones((1, 2, 2, 1)), None, None, sampling.noise_levels(5),
                     np.zeros(5))
  # The loop body is traced once, so count the traced evaluations: one Heun body (2 calls) for
  # steps 0..N-2 and one final Euler call.
  assert len(calls) == 3
