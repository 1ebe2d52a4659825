"""The CPU compile options (`xla_options`): LLVM at level 1 for the project's programs on CPU, the
numbers of XLA's default level to rounding, and an explicit XLA_FLAGS setting wins."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import module_programs
from patchdiff import checkpoint, programs, sampling, train, xla_options
from patchdiff.nn import inception, models, vae
from tiny import tiny_config


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


def xla_defaults() -> dict:
  """XLA's own CPU settings as compile options: its default level, and every other option the
  package passes (under `user_xla_flags`, XLA's default fusion emitters) as it is."""
  return dict(xla_options.CPU_OPTIONS, **DEFAULT_LEVEL)


def test_cpu_gradient_program_matches_the_default_level(user_xla_flags):
  # Dropout (the hashed masks), GroupNorm, attention and the loss: the whole gradient program,
  # compiled by the trainer as a user's run compiles it (level 1; the suite's own settings are
  # undone by `user_xla_flags`) and with XLA's defaults, on one batch.
  run = train.Run(small_config(**{"model.dropout": 0.2}))
  state = run.init_state()
  step_programs = programs.Programs(run)
  batch = run.to_device(step_programs.random_batch(8, np.random.default_rng(0)))
  ours = step_programs.trace_grad(8).lower().compile()
  plain = jax.jit(run.grad_step_fn(8), compiler_options=xla_defaults(),
                  out_shardings=(run.state_shardings["params"], run.replicated))
  grads, loss = ours(state, batch)
  assert float(loss) > 0
  _assert_equal_to_rounding((grads, loss), plain(state, batch))


def test_training_from_a_checkpoint_as_a_user_runs_it(tmp_path, user_xla_flags):
  """Training with train.init_from as a user runs it: compiled with the package's CPU options
  (`user_xla_flags`; in-process, the programs of a subprocess with a clean XLA_FLAGS, without
  its start). The previous test's network and 8 px bucket, whose initialisation and gradient
  programs it compiled (the same programs: the trainer's functions are memoised); one step."""
  cfg = small_config(**{"model.dropout": 0.2, "patch.sizes": (8,), "patch.probs": (1.0,),
                        "train.steps": 1, "train.log_every": 1, "sample.grid_size": 0})
  run = train.Run(cfg)
  state = run.init_state()
  source = nnx.merge(run.graphdef, state["params"], state["buffers"])
  checkpoint.save_weights(str(tmp_path / "source"), source, cfg, step=5)
  cfg.train.init_from = str(tmp_path / "source")
  assert np.isfinite(train.train_and_evaluate(cfg, str(tmp_path / "run"))["loss"])
  mgr = checkpoint.manager(str(tmp_path / "run"), create=False)
  trained, _ = checkpoint.restore_state(mgr, 1, run.abstract_state)
  mgr.close()
  # Step 0 runs at learning rate 0 and the EMA copies the weights: both are the source's.
  for which in ("params", "ema"):
    _assert_equal_leaves(trained[which], state["params"])


def _assert_equal_leaves(a, b):
  leaves_a, leaves_b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  assert len(leaves_a) == len(leaves_b) > 0
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_cpu_sampler_matches_the_default_level(user_xla_flags):
  # (`user_xla_flags` empties the sampler's program cache: it is compiled anew here.)
  cfg = small_config()
  graphdef, state = models.init_denoiser_state(models.resolve(cfg.model), seed=1)
  latents = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  ours = sampling.heun_sample(nnx.merge(graphdef, state), latents, num_steps=3)
  plain = jax.jit(sampling._heun_program,  # pylint: disable=protected-access
                  static_argnames=("graphdef", "t_steps", "gammas", "s_noise", "guidance"),
                  compiler_options=xla_defaults())
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
    programs.Programs(run).trace_apply().lower().compile()
  square = xla_options.lazy_jit(lambda x: x * x)
  with pytest.raises(Exception, match="xla_backend_optimization_level"):
    square(jnp.arange(3.0))
  monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=2")
  np.testing.assert_array_equal(xla_options.lazy_jit(lambda x: x * x)(jnp.arange(3.0)),
                                [0.0, 1.0, 4.0])


def test_a_jitted_function_inside_another_program_takes_that_programs_options(monkeypatch):
  # JAX takes compile options on top-level programs only: a jit with options traced inside
  # another program is a ValueError. The package's jits leave theirs out there, inside a jit
  # with options, a plain jit, eval_shape and the transformations.
  monkeypatch.delenv("XLA_FLAGS")
  square = xla_options.lazy_jit(lambda x: x * x)
  cube = xla_options.jit(lambda x: x * square(x))
  x = jnp.arange(3.0)
  np.testing.assert_array_equal(xla_options.jit(lambda x: cube(x) + 1)(x), [1.0, 2.0, 9.0])
  np.testing.assert_array_equal(jax.jit(cube)(x), [0.0, 1.0, 8.0])
  assert jax.eval_shape(cube, x).shape == (3,)
  np.testing.assert_array_equal(jax.grad(lambda x: cube(x).sum())(x), [0.0, 3.0, 12.0])
  np.testing.assert_array_equal(jax.vmap(cube)(x), [0.0, 1.0, 8.0])
  # Without JAX's private trace state: the arguments' tracers tell.
  monkeypatch.setattr(xla_options, "_trace_state_clean", None)
  np.testing.assert_array_equal(xla_options.jit(lambda x: cube(x) + 1)(x), [1.0, 2.0, 9.0])
  assert not xla_options.tracing(x)
  # The enclosing program carries the options: XLA rejects this value when it compiles it,
  # not JAX when it traces the nested call.
  monkeypatch.setattr(xla_options, "CPU_OPTIONS", {"xla_backend_optimization_level": "fast"})
  outer = xla_options.jit(lambda x: cube(x) + 1)
  with pytest.raises(Exception, match="'fast' is not a valid int32 value"):
    outer(x)
  with pytest.raises(Exception, match="'fast' is not a valid int32 value"):
    outer.lower(x).compile()  # attributes are the optioned jit's


def test_the_optimization_level(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  assert xla_options.optimization_level("cpu") == 1
  assert xla_options.optimization_level("gpu") == xla_options.XLA_DEFAULT_LEVEL == 3
  monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=2 "
                     "--xla_backend_optimization_level=0")  # the last one counts
  assert xla_options.optimization_level("cpu") == xla_options.optimization_level("gpu") == 0


def _nested_calls(reference):
  """{(module, name): (fun, abstract args)}: `fun` calls that program (through the public
  function that wraps it, where it has one) on the arguments, the test's small networks."""
  den_graphdef, den_state = nnx.split(models.abstract_denoiser(small_config().model))
  abstract_inception = inception._abstract  # pylint: disable=protected-access
  inc_graphdef, inc_state = nnx.split(abstract_inception(inception.PYTORCH_FID))
  config = json.loads((reference / "parity" / "vae_tiny_config.json").read_text())
  vae_graphdef, vae_state = nnx.split(vae.abstract_vae(config))
  f = 2 ** (len(config["block_out_channels"]) - 1)
  images = jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32)
  latents = jax.ShapeDtypeStruct((2, 16 // f, 16 // f, config["latent_channels"]), jnp.float32)
  return {
      ("patchdiff.sampling", "_heun_jit"): (
          lambda s, x: sampling.heun_sample(nnx.merge(den_graphdef, s), x, num_steps=2),
          (den_state, images)),
      ("patchdiff.nn.inception", "_forward"): (
          lambda s, x: inception._forward(inc_graphdef, s, x),  # pylint: disable=protected-access
          (inc_state, jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.uint8))),
      ("patchdiff.nn.vae", "_encode_jit"): (
          lambda s, x: vae.encode_fn(nnx.merge(vae_graphdef, s))(x), (vae_state, images)),
      ("patchdiff.nn.vae", "_decode_jit"): (
          lambda s, z: vae.decode_fn(nnx.merge(vae_graphdef, s))(z), (vae_state, latents)),
  }


def test_module_level_programs_run_inside_a_program_with_options(reference, user_xla_flags):
  """Each module-level program of the package, called inside a program jitted with the
  package's CPU options: traced and lowered (JAX refuses a nested jit with options when it
  traces it; the compile, which would take seconds, adds nothing to that)."""
  calls = _nested_calls(reference)
  assert set(module_programs()) == set(calls), "a new module-level program: add a call here"
  assert xla_options.for_platform("cpu")  # the options are on
  failed = []
  for (module, name), (fun, args) in calls.items():
    try:
      xla_options.jit(fun).trace(*args).lower()
    except ValueError as e:
      failed.append(f"{module}.{name}: {e}")
  assert not failed, "inside a program with options:\n" + "\n".join(failed)
