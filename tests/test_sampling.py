"""The Heun sampler: parity with the official float64 sampler, closed-form Gaussian, guidance,
churn, and what a stub denoiser sees at each evaluation."""
import numpy as np
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from conftest import FIXTURES
from patchdiff import convert, patches, sampling


def nhwc(a):
  return np.transpose(a, (0, 2, 3, 1))


def recording_denoiser(output):
  """(a stub denoiser module computing `output(x, sigma, pos, labels)`, the list of its calls).

  Each evaluation the jitted loop executes appends (x, sigma, pos, labels) on the host, in order:
  a debug callback runs once per executed call, where a Python counter would run once per trace.
  """
  calls = []

  def record(*args):
    calls.append(tuple(None if a is None else np.asarray(a) for a in args))

  class Recorder(nnx.Module):  # one class per stub: its own graphdef, so its own compiled loop
    def __call__(self, x, sigma, pos, labels):
      jax.debug.callback(record, x, sigma, pos, labels, ordered=True)
      return output(x, sigma, pos, labels)
  return Recorder(), calls


def run_recorded(output, latents, **kw):
  """heun_sample with a recording stub: (samples, the calls in order)."""
  stub, calls = recording_denoiser(output)
  x = np.asarray(sampling.heun_sample(stub, latents, **kw))
  jax.effects_barrier()
  return x, calls


# The sampler's error against the official float64 sampler, relative to what the network
# contributes to the sample: |out - ref| / |ref - base|, where `base` is the same sampler with the
# network's output F at zero (D = c_skip x, the ideal denoiser of N(0, sigma_data^2) data). The
# whole sample is no measure: c_skip x is most of it and leaves small errors in D unseen.
# Measured: 3 steps 2.4e-4 (DDPM++) and 9.2e-5 (ADM), 6 steps 8.3e-6 and 3.3e-6. Three steps make
# a Heun step from sigma 2.5 to 0.002 whose correction divides float32 rounding by 0.002 (the
# official sampler runs in float64); six steps end more gently. Defects measured against these
# bounds at 6 steps: sigma_min 0.0021 gives 6e-3 / 1.5e-2, one output-conv weight + 1e-3 gives
# 2.1e-4 / 6.5e-4, the rho schedule's i / (N - 1) as i / N gives 0.44 / 1.1.
PARITY_BOUND = {3: 5e-4, 6: 2e-5}


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_heun_matches_official_sampler(reference, name):
  parity = reference / "parity"
  denoiser = convert.load_torch_state_dict(
      convert.read_state_dict(str(parity / f"{name}_weights.npz")), FIXTURES[name])
  with np.load(parity / f"{name}_io.npz") as io:
    latents = nhwc(io["sampler_latents"])
    labels = io["sampler_labels"] if "sampler_labels" in io.files else None
    for n, bound in PARITY_BOUND.items():
      out = np.asarray(sampling.heun_sample(denoiser, latents, num_steps=n, labels=labels),
                       np.float64)
      ref = nhwc(io[f"heun_{n}_steps"])
      t_steps = sampling.noise_levels(n)
      base = np.asarray(sampling.heun_loop(gaussian_denoiser(0.0, 0.5), jnp.asarray(latents),
                                           None, None, t_steps, np.zeros(n)), np.float64)
      net = np.linalg.norm(ref - base)
      assert net > 0.05 * np.linalg.norm(ref)  # the network does contribute
      assert np.linalg.norm(out - ref) / net < bound, n


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
  values = jnp.array([3.0, -5.0, 7.0])  # a distinct output per class

  def d(x, sigma, pos, labels):  # a fake denoiser whose output depends on every row's inputs
    return (x / (1 + sigma.reshape(-1, 1, 1, 1)) + pos.sum(-1, keepdims=True)
            + (labels @ values).reshape(-1, 1, 1, 1))
  w = 1.3
  g = sampling.guided(d, w)
  x = jnp.arange(2 * 4 * 4, dtype=jnp.float32).reshape(2, 4, 4, 1)
  sigma = jnp.array([0.5, 2.0])
  pos = jnp.asarray(patches.coord_grid(np.array([0, 1]), np.array([2, 0]), 4, 8))
  labels = jnp.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
  d_u = d(x, sigma, pos, jnp.zeros_like(labels))  # unconditional: zero labels
  d_c = d(x, sigma, pos, labels)
  np.testing.assert_allclose(g(x, sigma, pos, labels), d_u + w * (d_c - d_u), rtol=1e-6)
  np.testing.assert_allclose(g(x, sigma, pos, labels) - d_u,
                             w * np.array([-5.0, 7.0]).reshape(2, 1, 1, 1) + 0 * x, rtol=1e-6)
  assert sampling.guided(d, 1.0) is d
  with pytest.raises(ValueError, match="class labels"):
    g(x, sigma, pos, None)


def test_guided_sampler_gives_the_unconditional_half_zero_labels():
  labels = np.eye(5, dtype=np.float32)[[4, 1]]
  latents = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
  for w in (1.0, 2.0):
    _, calls = run_recorded(lambda x, s, p, l: 0.5 * x + l[:, :3].reshape(-1, 1, 1, 3), latents,
                            num_steps=2, labels=labels, guidance=w)
    assert len(calls) == 3
    for x, sigma, pos, seen in calls:
      if w == 1.0:  # no guidance: one evaluation with the labels as given
        np.testing.assert_array_equal(seen, labels)
        continue
      # one doubled call: the same x, sigma and coordinates, the labels then zeros
      np.testing.assert_array_equal(seen, np.concatenate([labels, np.zeros_like(labels)]))
      for a in (x, sigma, pos):
        np.testing.assert_array_equal(a[:2], a[2:])


@pytest.mark.parametrize("n", [1, 2, 5])
def test_nfe_is_two_n_minus_one_at_run_time(n):
  """Heun's steps evaluate D twice, the last step (to t_N = 0) once: at t_0, then t_1 twice, ...,
  t_{N-1} twice. Counted per executed call, so a loop running the wrong number of times fails."""
  latents = jax.random.normal(jax.random.key(0), (1, 4, 4, 3))
  _, calls = run_recorded(lambda x, s, p, l: 0.5 * x, latents, num_steps=n)
  assert len(calls) == 2 * n - 1
  t = sampling.noise_levels(n)
  expected = [t[0]] + [t[i] for i in range(1, n) for _ in range(2)]
  np.testing.assert_allclose([c[1][0] for c in calls], expected, rtol=1e-6)


def test_default_coordinates_are_the_full_canvas():
  latents = jax.random.normal(jax.random.key(0), (2, 6, 6, 3))
  _, calls = run_recorded(lambda x, s, p, l: 0.5 * x, latents, num_steps=2)
  zeros = np.zeros(2, np.int32)
  for _, _, pos, _ in calls:
    np.testing.assert_array_equal(pos, patches.coord_grid(zeros, zeros, 6, 6))


def test_churn_gammas():
  t = sampling.noise_levels(10)
  inside = (t[:-1] >= 0.05) & (t[:-1] <= 50.0)
  assert inside.any() and (~inside).any()
  # min(S_churn / N, sqrt(2) - 1) inside [S_min, S_max], 0 outside; one per step (not t_N = 0)
  np.testing.assert_array_equal(sampling.churn_gammas(t, 10, 2.0, 0.05, 50.0),
                                np.where(inside, 0.2, 0.0))
  np.testing.assert_array_equal(sampling.churn_gammas(t, 10, 40.0, 0.0, np.inf),
                                np.full(10, np.sqrt(2) - 1))
  only = np.zeros(10)  # both ends inclusive
  only[3] = 0.2
  np.testing.assert_array_equal(sampling.churn_gammas(t, 10, 2.0, t[3], t[3]), only)
  np.testing.assert_array_equal(sampling.churn_gammas(t, 10, 0.0, 0.0, np.inf), np.zeros(10))


def test_sampler_adds_the_churn_noise_of_its_gammas():
  n, s_churn, s_min, s_max, s_noise = 6, 3.0, 0.05, 50.0, 1.5
  t = sampling.noise_levels(n)
  gammas = sampling.churn_gammas(t, n, s_churn, s_min, s_max)
  assert gammas[0] == 0 and gammas[1:4].min() > 0 and gammas[-1] == 0  # t_0 = 80, t_5 = 0.002
  t_hat = t[:-1] * (1 + gammas)
  latents = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
  # D = 0: each step scales its state by t_{i+1} / t_hat_i, so the state entering step i + 1 is
  # known from step i's first evaluation, and the first evaluation of step i + 1 shows the noise.
  _, calls = run_recorded(lambda x, s, p, l: 0 * x, latents, num_steps=n, s_churn=s_churn,
                          s_min=s_min, s_max=s_max, s_noise=s_noise, key=jax.random.key(1))
  firsts = calls[0::2]
  assert len(firsts) == n
  np.testing.assert_allclose([c[1][0] for c in firsts], t_hat, rtol=1e-6)
  np.testing.assert_allclose(firsts[0][0], 80 * np.asarray(latents), rtol=1e-6)
  for i in range(1, n):
    x_cur = firsts[i - 1][0] * (t[i] / t_hat[i - 1])
    added = firsts[i][0] - x_cur
    if gammas[i] == 0:  # float32 rounding only (the step from 0.085 to 0.002 cancels ~40x of it)
      np.testing.assert_allclose(added, 0, atol=1e-3 * np.abs(x_cur).max())
    else:  # sqrt(t_hat^2 - t^2) * S_noise * N(0, 1); 768 values: std within 5 standard errors
      noise = added / (np.sqrt(t_hat[i] ** 2 - t[i] ** 2) * s_noise)
      assert abs(noise.std() - 1) < 5 / np.sqrt(2 * noise.size), i
      assert abs(noise.mean()) < 5 / np.sqrt(noise.size), i
