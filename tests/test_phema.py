"""Post-hoc EMA math (`patchdiff.phema`) against its definitions: quadrature of the power
profiles, the EMA written out as a weighted sum, and EMAs tracked step by step."""
from __future__ import annotations

import gc
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from patchdiff import phema

try:
  from scipy import integrate
except ImportError:  # pragma: no cover - scipy is optional
  integrate = None


def _integral(f, a: float, b: float) -> float:
  """integral_a^b f: adaptive quadrature, or 500-point Gauss-Legendre without scipy."""
  if integrate is not None:
    return integrate.quad(f, a, b, epsabs=0, epsrel=1e-12, limit=200)[0]
  x, w = np.polynomial.legendre.leggauss(500)
  return float((b - a) / 2 * w @ f(a + (b - a) / 2 * (x + 1)))


def _profile(gamma: float, t: float):
  return lambda tau: (gamma + 1) * np.power(tau, gamma) / t ** (gamma + 1) * (tau <= t)


def _trajectory(tau, total: float) -> dict:
  """A smooth parameter trajectory theta(tau), as a tree of float64 arrays of two shapes."""
  u = np.asarray(tau, np.float64)[..., None] / total
  a = np.sin(3.0 * u * np.arange(1, 13) + np.arange(12)).reshape(u.shape[:-1] + (3, 4))
  b = 0.5 + u * np.linspace(-1, 1, 5) + (u - 0.3) ** 2
  return {"a": a, "b": b}


def _track(stds, deltas, snap_every: int, step=phema.update, cast=lambda tree: tree):
  """EMAs of `stds` tracked along `_trajectory` with images `deltas` per step.

  Returns ({std: final EMA tree}, [(std, nimg)], [snapshot trees]), snapshots taken after every
  `snap_every` steps, each std in turn. `cast` maps a host tree to the step's leaves."""
  nimg = np.cumsum(deltas)
  total = float(nimg[-1])
  gammas = {s: phema.exponent(s) for s in stds}
  emas = {s: cast(jax.tree_util.tree_map(np.zeros_like, _trajectory(0.0, total))) for s in stds}
  snapshots, trees = [], []
  for k, (t, d) in enumerate(zip(nimg.tolist(), deltas.tolist())):
    params = cast(_trajectory(t, total))
    for s in stds:
      emas[s] = step(emas[s], params, phema.beta(gammas[s], t, d))
    if (k + 1) % snap_every == 0:
      for s in stds:
        snapshots.append((s, t))
        trees.append(jax.tree_util.tree_map(np.array, emas[s]))
  return emas, snapshots, trees


def _rel_err(x: dict, y: dict) -> float:
  diff = sum(np.sum((np.float64(x[k]) - np.float64(y[k])) ** 2) for k in x)
  return float(np.sqrt(diff / sum(np.sum(np.float64(y[k]) ** 2) for k in y)))


def test_exponent_and_relative_std():
  """Round trips both ways; 0.05 -> 16.97 and 0.10 -> 6.94 (as the profile's std of tau / t
  measured by quadrature); MAX_STD is the supremum of sigma_rel, reached at (sqrt(5) - 3) / 2."""
  stds = np.array([0.01, 0.05, 0.07, 0.10, 0.15, 0.25, 0.2887, 0.30, phema.MAX_STD])
  gammas = phema.exponent(stds)
  np.testing.assert_allclose(phema.relative_std(gammas), stds, rtol=1e-7)
  np.testing.assert_allclose(phema.relative_std(gammas[:-1]), stds[:-1], rtol=1e-12)
  assert np.all(np.diff(gammas) < 0)
  for g in (-0.38, -0.2, 0.0, 1.0, 6.94, 16.97, 70.0, 1000.0):
    assert phema.exponent(phema.relative_std(g)) == pytest.approx(g, rel=1e-9, abs=1e-12)
  assert isinstance(phema.exponent(0.1), float)
  for std, known in ((0.05, 16.97), (0.10, 6.94)):
    g = phema.exponent(std)
    assert g == pytest.approx(known, abs=5e-3)
    mean = _integral(lambda u: u * _profile(g, 1.0)(u), 0.0, 1.0)
    square = _integral(lambda u: u * u * _profile(g, 1.0)(u), 0.0, 1.0)
    assert np.sqrt(square - mean ** 2) == pytest.approx(std, rel=1e-9)
  assert phema.exponent(phema.MAX_STD) == pytest.approx((5 ** 0.5 - 3) / 2, abs=1e-6)
  grid = phema.relative_std(np.linspace(-0.999, 50.0, 200_001))
  assert grid.max() <= phema.MAX_STD and grid.max() == pytest.approx(phema.MAX_STD, rel=1e-8)


def test_update_is_the_piecewise_power_average():
  """The EMA of steps of varying integer image counts is sum_k w_k theta_k with w_k the power
  profile's mass over step k: ((t_k / T)^(gamma + 1) - (t_{k-1} / T)^(gamma + 1)). The first
  step's beta is 0, so the EMA starts at the first parameters whatever it held."""
  rng = np.random.default_rng(0)
  deltas = rng.integers(200, 600, size=400)
  t = np.cumsum(deltas).astype(np.float64)
  thetas = rng.normal(size=(400, 7))
  for std in (0.05, 0.10, 0.25):
    g = phema.exponent(std)
    assert phema.beta(g, deltas[0], deltas[0]) == 0.0
    ema = {"w": np.full(7, 1e30)}
    for k in range(400):
      ema = phema.update(ema, {"w": thetas[k]}, phema.beta(g, t[k], deltas[k]))
      if k == 0:
        np.testing.assert_array_equal(ema["w"], thetas[0])
    cum = (t / t[-1]) ** (g + 1)
    weights = np.diff(cum, prepend=0.0)
    assert weights.sum() == pytest.approx(1.0, rel=1e-12)
    np.testing.assert_allclose(ema["w"], weights @ thetas, rtol=1e-10, atol=1e-12)


def test_update_approaches_the_continuous_profile():
  """On a smooth theta(tau) sampled at the step ends the EMA differs from the integral of
  p_{gamma,T} theta by at most max|theta'| * max step (it averages the trajectory held constant
  over each step), and the error shrinks in proportion to the step."""
  theta = lambda tau: np.sin(4.0 * tau) + tau ** 2  # noqa: E731
  slope = 4.0 + 2.0
  for std in (0.05, 0.10):
    g = phema.exponent(std)
    exact = _integral(lambda tau: _profile(g, 1.0)(tau) * theta(tau), 0.0, 1.0)
    errors = []
    for steps in (40, 400, 4000):
      deltas = np.random.default_rng(steps).integers(50, 150, size=steps)
      t = np.cumsum(deltas)
      ema = {"w": np.zeros(())}
      for k in range(steps):
        ema = phema.update(ema, {"w": theta(t[k] / t[-1])}, phema.beta(g, t[k], deltas[k]))
      errors.append(abs(float(ema["w"]) - exact))
      assert errors[-1] <= slope * deltas.max() / t[-1]
    assert errors[2] < errors[1] / 5 < errors[0] / 25


def test_update_under_jit_keeps_dtypes():
  """Inside jit with a traced beta: each EMA leaf keeps its dtype; beta = 0 gives the params."""
  ema = {"f": jnp.full((3,), 2.0, jnp.float32), "h": jnp.full((2,), 2.0, jnp.bfloat16)}
  params = {"f": jnp.arange(3, dtype=jnp.float32), "h": jnp.ones((2,), jnp.bfloat16)}
  step = jax.jit(phema.update)
  out = step(ema, params, jnp.float32(0.75))
  assert out["f"].dtype == jnp.float32 and out["h"].dtype == jnp.bfloat16
  np.testing.assert_allclose(out["f"], 0.75 * 2.0 + 0.25 * np.arange(3), rtol=1e-6)
  np.testing.assert_allclose(np.float32(out["h"]), 1.75, rtol=1e-2)
  first = step(ema, params, jnp.float32(phema.beta(6.94, 512, 512)))
  np.testing.assert_array_equal(first["f"], params["f"])


@pytest.mark.parametrize("gamma_a,t_a,gamma_b,t_b", [
    (6.94, 1.0, 16.97, 1.0), (6.94, 0.6, 16.97, 1.0), (16.97, 1.0, 6.94, 0.3),
    (70.0, 0.9, 70.0, 1.0), (7.0, 1.0, 70.0, 0.97), (0.0, 1.0, 3.0, 2.0), (-0.38, 1.0, 2.0, 0.5)])
def test_profile_inner_matches_quadrature(gamma_a, t_a, gamma_b, t_b):
  """The closed form equals the integral of the product of the two profiles, both orders."""
  pa, pb = _profile(gamma_a, t_a), _profile(gamma_b, t_b)
  m = min(t_a, t_b)
  numeric = _integral(lambda tau: pa(tau) * pb(tau), 0.0, m)
  closed = phema.profile_inner(gamma_a, t_a, gamma_b, t_b)
  assert closed == pytest.approx(numeric, rel=1e-8)
  assert phema.profile_inner(gamma_b, t_b, gamma_a, t_a) == pytest.approx(closed, rel=1e-14)


def test_profile_inner_at_large_counts():
  """At t ~ 1e9 images and gamma ~ 70 (where t^gamma overflows) the products are finite and
  scale exactly as 1 / t; they broadcast, and <p, p> = (gamma + 1)^2 / ((2 gamma + 1) t)."""
  with np.errstate(over="ignore"):
    assert not np.isfinite(np.float64(1e9) ** 71)
  g = np.array([70.0, 6.94, 70.0, 16.97])
  ta = np.array([1.0, 0.5, 0.999, 1.0])
  tb = np.array([0.99, 1.0, 1.0, 0.02])
  unit = phema.profile_inner(g[:, None], ta[:, None], g[None], tb[None])
  big = phema.profile_inner(g[:, None], 1e9 * ta[:, None], g[None], 1e9 * tb[None])
  assert unit.shape == (4, 4) and np.all(np.isfinite(big)) and np.all(big >= 0)
  np.testing.assert_allclose(big * 1e9, unit, rtol=1e-12)
  for i in range(4):
    assert unit[i, 2] == phema.profile_inner(g[i], ta[i], g[2], tb[2])
  assert phema.profile_inner(70.0, 1e9, 70.0, 1e9) == pytest.approx(71 ** 2 / (141 * 1e9))


def test_reconstruct_a_tracked_profile():
  """Asking for a tracked (std, nimg) selects that snapshot (residual ~ 0), and the streamed
  sum over jit-tracked float32 snapshots equals the EMA tracked directly."""
  deltas = np.random.default_rng(1).integers(200, 600, size=12 * 40)
  emas, snapshots, trees = _track((0.05, 0.10), deltas, 40, step=jax.jit(phema.update),
                                  cast=lambda tree: jax.tree_util.tree_map(jnp.float32, tree))
  for index in (len(snapshots) - 2, len(snapshots) - 1, 9):
    x, residual = phema.solve(snapshots, *snapshots[index])
    assert residual < 1e-8
    expected = np.zeros(len(snapshots))
    expected[index] = 1.0
    np.testing.assert_allclose(x, expected, atol=1e-6)
    tree = phema.reconstruct(x, lambda i: trees[i])
    assert _rel_err(tree, trees[index]) < 1e-4
  assert _rel_err(trees[9], trees[-2]) > 1e-2  # the snapshots differ
  tree = phema.reconstruct(phema.solve(snapshots, 0.05, snapshots[-1][1])[0], lambda i: trees[i])
  assert _rel_err(tree, jax.tree_util.tree_map(np.asarray, emas[0.05])) < 1e-4


def test_reconstruct_an_untracked_std():
  """std 0.07 at the last snapshot from 0.05 and 0.10 x 16 snapshots: residual ~1e-5, and the
  error against the directly tracked 0.07 EMA obeys Cauchy-Schwarz: per parameter it is at
  most ||p_r - sum x_i p_i|| ||theta|| = sqrt(residual) ||p_r|| ||theta||, with theta the
  trajectory held constant over each step (which the discrete EMAs average exactly)."""
  deltas = np.random.default_rng(2).integers(200, 600, size=16 * 30)
  emas, snapshots, trees = _track((0.05, 0.10, 0.07), deltas, 30)
  keep = [i for i, (s, _) in enumerate(snapshots) if s != 0.07]
  tracked = [snapshots[i] for i in keep]
  nimg, g = snapshots[-1][1], phema.exponent(0.07)
  x, residual = phema.solve(tracked, 0.07, nimg)
  assert 1e-7 < residual < 1e-4
  assert x.sum() == pytest.approx(1.0, abs=1e-3)
  # The residual is ||p_r - sum x_i p_i||^2 / ||p_r||^2, integrated between snapshot times.
  fits = [_profile(phema.exponent(s), t / nimg) for s, t in tracked]
  gap = lambda u: (_profile(g, 1.0)(u) - sum(c * p(u) for c, p in zip(x, fits))) ** 2  # noqa
  ends = sorted({0.0} | {t / nimg for _, t in tracked})
  numeric = sum(_integral(gap, a, b) for a, b in zip(ends[:-1], ends[1:]))
  assert residual == pytest.approx(numeric / phema.profile_inner(g, 1.0, g, 1.0), rel=1e-6)
  tree = phema.reconstruct(x, lambda i: trees[keep[i]])
  profile_norm = np.sqrt(phema.profile_inner(g, nimg, g, nimg))
  steps = _trajectory(np.cumsum(deltas), float(nimg))
  for key in tree:
    theta_norm = np.sqrt(np.einsum("k,k...->...", deltas.astype(np.float64), steps[key] ** 2))
    bound = np.sqrt(residual) * profile_norm * theta_norm
    assert np.all(np.abs(tree[key] - emas[0.07][key]) <= bound + 1e-12)
  assert _rel_err(tree, emas[0.07]) < 1e-3  # measured 1.2e-4, the bound allows ~5e-3
  # Extrapolating far beyond the snapshots' profiles fits badly, and the residual says so.
  assert phema.solve(tracked, 0.07, 3 * nimg)[1] > 0.1


def test_reconstruct_streams_and_sums_in_float32_or_wider():
  """One snapshot at a time in index order, each dropped once added; float32 sums for bfloat16
  and float32 leaves, float64 for float64 leaves."""
  stored = [{"h": np.full(4, i + 1.0), "d": np.full(2, i + 1.0)} for i in range(3)]
  alive, calls = [], []

  def load(i):
    gc.collect()
    assert all(r() is None for r in alive)  # no earlier snapshot is still held
    calls.append(i)
    tree = {"h": jnp.asarray(stored[i]["h"], jnp.bfloat16), "d": stored[i]["d"].copy()}
    alive.append(weakref.ref(tree["d"]))
    return tree

  out = phema.reconstruct([0.5, -1.0, 2.0], load)
  assert calls == [0, 1, 2]
  assert out["h"].dtype == jnp.float32 and out["d"].dtype == np.float64
  np.testing.assert_allclose(np.float32(out["h"]), 4.5)
  np.testing.assert_allclose(out["d"], 4.5)


def test_bad_input_is_named():
  for std in (0.0, -0.1, 0.31, float("nan")):
    with pytest.raises(ValueError, match="relative std"):
      phema.exponent(std)
  with pytest.raises(ValueError, match="0.4"):
    phema.exponent([0.05, 0.4])
  with pytest.raises(ValueError, match="-1.5"):
    phema.relative_std(-1.5)
  with pytest.raises(ValueError, match="image count 100"):
    phema.beta(6.94, 100, 200)
  with pytest.raises(ValueError, match=r"images of a step \(0"):
    phema.beta(6.94, 100, 0)
  with pytest.raises(ValueError, match="exponent -0.6"):
    phema.profile_inner(-0.6, 1.0, 3.0, 1.0)
  with pytest.raises(ValueError, match=r"no snapshots.*\[\]"):
    phema.solve([], 0.07, 1000)
  with pytest.raises(ValueError, match="0.5"):
    phema.solve([(0.05, 1000)], 0.5, 1000)
  with pytest.raises(ValueError, match="target image count 0"):
    phema.solve([(0.05, 1000)], 0.07, 0)
  with pytest.raises(ValueError, match="image count -5"):
    phema.solve([(0.05, -5)], 0.07, 1000)
  with pytest.raises(ValueError, match="no coefficients"):
    phema.reconstruct([], lambda i: {})
  with pytest.raises(ValueError, match="snapshot 1 has structure"):
    phema.reconstruct([1.0, 1.0], lambda i: {"a": np.ones(2)} if i == 0 else [np.ones(2)])
