"""Post-hoc EMA (EDM2: Karras et al. 2024, section 3 and appendix C): the math core.

During training a few power-function EMAs are tracked: the one of exponent gamma averages the
parameter trajectory theta(tau), tau in [0, t], with density p(tau) = (gamma + 1) tau^gamma /
t^(gamma + 1), and is named by its relative standard deviation sigma_rel (the std of tau / t).
Time is the count of training images (nimg): a step counting `delta` images, ending at t, moves
the EMA by beta = (1 - delta / t)^(gamma + 1), which makes it exactly the power average of the
trajectory held piecewise constant over each step. Snapshots of these EMAs taken at several
counts are later combined linearly into the EMA of any other (sigma_rel, t): the coefficients
minimise the L2 distance between profiles, using their closed-form inner products.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import numpy as np

# sigma_rel(gamma) peaks at gamma = (sqrt(5) - 3) / 2, where it equals phi^(-5/2) (phi the golden
# ratio), and falls to 0 both as gamma -> -1 and as gamma -> inf; `exponent` takes the branch
# gamma >= (sqrt(5) - 3) / 2, on which sigma_rel decreases.
MAX_STD = ((1 + 5 ** 0.5) / 2) ** -2.5
_MIN_EXPONENT = (5 ** 0.5 - 3) / 2


def _out(values: np.ndarray) -> Any:
  return float(values) if values.ndim == 0 else values


def _check(ok, message: str, values) -> None:
  """Raise ValueError(message.format(v)) with v the first of `values` where `ok` fails."""
  shape = np.broadcast_shapes(np.shape(ok), np.shape(values))
  ok = np.broadcast_to(ok, shape)
  if not ok.all():
    raise ValueError(message.format(np.broadcast_to(values, shape)[~ok].flat[0]))


def relative_std(gamma) -> Any:
  """sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))) of exponent(s) gamma > -1."""
  g = np.asarray(gamma, np.float64)
  _check(g > -1, "EMA exponent {} must be > -1", g)
  return _out(np.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3))))


def exponent(std) -> Any:
  """The exponent gamma of relative std(s) 0 < std <= MAX_STD: the largest real root of
  gamma^3 + 7 gamma^2 + (16 - std^-2) gamma + 12 - std^-2 = 0 (sigma_rel's definition squared)."""
  s = np.asarray(std, np.float64)
  _check((s > 0) & (s <= MAX_STD), "EMA relative std {} must be in (0, %.6f]" % MAX_STD, s)
  root = lambda v: np.roots([1.0, 7.0, 16.0 - v ** -2, 12.0 - v ** -2]).real.max()  # noqa: E731
  return _out(np.maximum(np.vectorize(root, otypes=[np.float64])(s), _MIN_EXPONENT))


def beta(gamma, nimg, delta) -> Any:
  """(1 - delta / nimg)^(gamma + 1) in float64: the factor of the EMA update of a step that
  counted `delta` images and ended at `nimg` images. 0 at the first step (nimg == delta)."""
  g, t, d = (np.asarray(v, np.float64) for v in (gamma, nimg, delta))
  _check(g > -1, "EMA exponent {} must be > -1", g)
  _check(d > 0, "images of a step ({}) must be > 0", d)
  _check(t >= d, "image count {} must be >= the step's images", t)
  with np.errstate(divide="ignore"):  # log1p(-1) = -inf: beta = 0 exactly
    return _out(np.exp((g + 1) * np.log1p(-d / t)))


def update(ema_tree, params_tree, beta):
  """beta * ema + (1 - beta) * params, leaf by leaf in each EMA leaf's dtype (jittable; beta may
  be traced). Written params + beta * (ema - params): beta = 0 gives params exactly."""
  return jax.tree_util.tree_map(lambda e, p: (p + beta * (e - p)).astype(e.dtype), ema_tree,
                                params_tree)


def profile_inner(gamma_a, t_a, gamma_b, t_b) -> Any:
  """<p_a, p_b> = integral over tau of p_{gamma_a,t_a} p_{gamma_b,t_b}, broadcasting.

  With T = max(t_a, t_b), m = min(t_a, t_b) and g_T the exponent of the profile ending at T it is
  (gamma_a + 1)(gamma_b + 1) / ((gamma_a + gamma_b + 1) T) * (m / T)^g_T: only the ratio m / T is
  raised to a power, so it stays finite for large exponents and counts. Needs both gammas > -1/2
  (square-integrable profiles; `exponent` gives gamma >= -0.382).
  """
  ga, ta, gb, tb = (np.asarray(v, np.float64) for v in (gamma_a, t_a, gamma_b, t_b))
  for g, t in ((ga, ta), (gb, tb)):
    _check(g > -0.5, "EMA exponent {} must be > -1/2 (a square-integrable profile)", g)
    _check(t > 0, "image count {} must be > 0", t)
  big, small = np.maximum(ta, tb), np.minimum(ta, tb)
  g_big = np.where(ta >= tb, ga, gb)
  return _out((ga + 1) * (gb + 1) / ((ga + gb + 1) * big) * (small / big) ** g_big)


def solve(snapshots: Sequence[tuple[float, float]], target_std: float,
          target_nimg: float) -> tuple[np.ndarray, float]:
  """Coefficients x (float64) of the snapshots' EMAs, given as (relative std, nimg) pairs, whose
  sum best approximates the EMA of `target_std` at `target_nimg`, and the fit's relative residual
  ||p_r - sum_i x_i p_i||^2 / ||p_r||^2 (0 = exact). Least squares on the profiles' Gram matrix."""
  if len(snapshots) == 0:
    raise ValueError(f"no snapshots to reconstruct from: {snapshots!r}")
  stds, counts = np.asarray(snapshots, np.float64).reshape(len(snapshots), 2).T
  _check(counts > 0, "snapshot image count {} must be > 0", counts)
  if not target_nimg > 0:
    raise ValueError(f"target image count {target_nimg} must be > 0")
  g, gr = exponent(stds), exponent(target_std)
  t = counts / float(target_nimg)  # in units of the target: entries O(1), x unchanged
  a = profile_inner(g[:, None], t[:, None], g[None, :], t[None, :])
  b = profile_inner(g, t, gr, 1.0)
  x = np.linalg.lstsq(a, b, rcond=None)[0]
  rr = profile_inner(gr, 1.0, gr, 1.0)
  return x, max(float((rr - 2 * x @ b + x @ a @ x) / rr), 0.0)


def reconstruct(coefficients, load_snapshot: Callable[[int], Any]):
  """sum_i coefficients[i] * load_snapshot(i), loading one snapshot at a time and dropping each
  leaf once added (peak: the sum and one snapshot). Sums in float32, or a leaf's wider dtype."""
  coefficients = np.asarray(coefficients, np.float64).reshape(-1)
  if coefficients.size == 0:
    raise ValueError(f"no coefficients to reconstruct from: {coefficients!r}")
  total, treedef = None, None
  for i, c in enumerate(coefficients.tolist()):  # Python floats: leaves keep their dtype
    leaves, structure = jax.tree_util.tree_flatten(load_snapshot(i))
    if total is None:
      total, treedef = [None] * len(leaves), structure
    elif structure != treedef:
      raise ValueError(f"snapshot {i} has structure {structure}, snapshot 0 had {treedef}")
    for j in range(len(leaves)):
      leaf, leaves[j] = leaves[j], None
      term = leaf.astype(np.promote_types(leaf.dtype, np.float32)) * c
      total[j] = term if total[j] is None else total[j] + term
      del leaf, term
  return jax.tree_util.tree_unflatten(treedef, total)
