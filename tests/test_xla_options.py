"""The CPU compile options (`xla_options`): LLVM at level 1 for the project's programs on CPU, the
numbers of XLA's default level to rounding, and an explicit XLA_FLAGS setting wins."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from patchdiff import sampling, train, xla_options
from patchdiff.nn import models
from test_train import tiny_config


def test_options_by_platform_and_xla_flags(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  assert xla_options.for_platform("cpu") == {"xla_backend_optimization_level": 1}
  assert xla_options.for_platform("gpu") == {}
  assert xla_options.for_platform("tpu") == {}
  # The user's own level in XLA_FLAGS is left alone (passed again, it would override it).
  monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=3")
  assert xla_options.for_platform("cpu") == {}


def _assert_equal_to_rounding(a, b):
  """Every array of `a` within a few float32 ulps of `b`'s, relative to the array's largest
  entry. LLVM's levels contract and order floating-point operations differently, so some
  entries differ in their last bits."""
  leaves_a, leaves_b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  assert len(leaves_a) == len(leaves_b) > 0
  for x, y in zip(leaves_a, leaves_b):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    assert x.shape == y.shape
    scale = np.abs(y).max()
    assert np.abs(x - y).max() <= 1e-6 * scale, (np.abs(x - y).max(), scale)


DEFAULT_LEVEL = {"xla_backend_optimization_level": 3}  # XLA's own default


def small_config(**overrides):
  """The tests' tiny DDPM++ with one level (attention included): two compiles of it per test."""
  return tiny_config(**{"model.channel_mult": (1,), "model.model_channels": 8,
                        "model.attn_resolutions": (16,), **overrides})


def test_cpu_gradient_program_matches_the_default_level(monkeypatch):
  # Dropout (the hashed masks), GroupNorm, attention and the loss: the whole gradient program,
  # compiled by the trainer (level 1) and at XLA's default level, on one batch. (The suite
  # itself runs at level 0, set in XLA_FLAGS by conftest.py; unset here.)
  monkeypatch.delenv("XLA_FLAGS")
  run = train.Run(small_config(**{"model.dropout": 0.2}))
  state = run.init_state()
  batch = run.to_device(run.random_batch(8, np.random.default_rng(0)))
  ours = run.trace_grad(8).lower().compile()
  plain = jax.jit(run.grad_step_fn(8), compiler_options=DEFAULT_LEVEL,
                  out_shardings=(run.state_shardings["params"], run.replicated))
  grads, loss = ours(state, batch)
  assert float(loss) > 0
  _assert_equal_to_rounding((grads, loss), plain(state, batch))


@pytest.fixture
def fresh_sampler_program():
  """The sampler's program compiled anew under this test's XLA_FLAGS, and again after it."""
  sampling._heun_jit.program.cache_clear()  # pylint: disable=protected-access
  yield
  sampling._heun_jit.program.cache_clear()  # pylint: disable=protected-access


def test_cpu_sampler_matches_the_default_level(monkeypatch, fresh_sampler_program):
  monkeypatch.delenv("XLA_FLAGS")
  cfg = small_config()
  graphdef, state = models.init_state(models.resolve(cfg.model), seed=1)
  latents = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  ours = sampling.heun_sample(nnx.merge(graphdef, state), latents, num_steps=3)
  plain = jax.jit(sampling._heun_program,  # pylint: disable=protected-access
                  static_argnames=("graphdef", "t_steps", "gammas", "s_noise", "guidance"),
                  compiler_options=DEFAULT_LEVEL)
  t_steps = sampling.noise_levels(3, 0.002, 80.0, 7.0)
  gammas = sampling.churn_gammas(t_steps, 3, 0.0, 0.0, float("inf"))
  expected = plain(graphdef, state, latents, sampling.canvas_grid(2, 16, 16), None, None, None,
                   None, t_steps=tuple(t_steps.tolist()), gammas=tuple(gammas.tolist()),
                   s_noise=1.0, guidance=1.0)
  assert np.isfinite(np.asarray(ours)).all()
  _assert_equal_to_rounding(ours, expected)


def test_the_options_reach_xla(monkeypatch):
  # An option XLA rejects fails the trainer's compile, and the lazily jitted sampler's: the
  # options are passed. Set in XLA_FLAGS, the level is not passed at all.
  monkeypatch.delenv("XLA_FLAGS")
  monkeypatch.setattr(xla_options, "CPU_OPTIONS", {"xla_backend_optimization_level": "fast"})
  run = train.Run(tiny_config())
  with pytest.raises(Exception, match="xla_backend_optimization_level"):
    run.trace_apply().lower().compile()
  square = xla_options.lazy_jit(lambda x: x * x)
  with pytest.raises(Exception, match="xla_backend_optimization_level"):
    square(jnp.arange(3.0))
  monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=2")
  np.testing.assert_array_equal(xla_options.lazy_jit(lambda x: x * x)(jnp.arange(3.0)),
                                [0.0, 1.0, 4.0])
