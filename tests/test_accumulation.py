"""Gradient accumulation (train.batch_per_device): the rounds per bucket, the accumulated gradient
and step against the unsplit ones on one device (on 8 fake CPU devices: test_eight_devices.py), the
program's single scan. (The exact resume of an accumulating run is test_train.py's resume test,
whose 4 px bucket runs in 2 rounds.)"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import ADM_TINY
from patchdiff import accumulation, config_lib, patches, programs, train, train_step
from patchdiff.nn import edm, models
from test_train import watch_compiles
from tiny import tiny_config


def _rel(a, b) -> float:
  """The relative L2 error of tree `a` against tree `b`, all leaves together."""
  flat = lambda t: np.concatenate([np.ravel(np.asarray(x, np.float64))  # noqa: E731
                                   for x in jax.tree_util.tree_leaves(t)])
  return float(np.linalg.norm(flat(a) - flat(b)) / np.linalg.norm(flat(b)))


# ---------------------------------------------------------------------------------------------
# The rounds of each bucket, and the config errors.

@pytest.mark.parametrize("batch,devices,per_device,rounds", [
    (4, 1, None, {4: 1, 8: 1, 16: 1}),
    (4, 1, 2, {4: 8, 8: 4, 16: 2}),
    (4, 1, 16, {4: 1, 8: 1, 16: 1}),     # no bucket exceeds it: no accumulation
    (6, 1, 4, {4: 6, 8: 3, 16: 2}),      # 24, 12, 6 per device in rounds of 4, 4, 3
    (16, 8, 2, {4: 4, 8: 2, 16: 1}),     # 8, 4, 2 per device
])
def test_rounds_per_bucket(batch, devices, per_device, rounds):
  cfg = tiny_config(**{"train.batch_size": batch, "train.batch_per_device": per_device})
  schedule = config_lib.patch_schedule(cfg)
  assert accumulation.rounds_per_bucket(schedule, cfg.train, devices) == rounds


def test_rounds_of_the_imagenet256_batch_on_8_devices():
  """The published batch of 4096: 512 full latents per device of 8, 1024 at the R/2 bucket."""
  from test_configs import load  # pylint: disable=import-outside-toplevel
  cfg = config_lib.override(config_lib.finalize(load("imagenet256")),
                            {"train.batch_per_device": 128})
  config_lib.validate(cfg, num_devices=8)
  assert config_lib.accumulation_rounds(cfg, 8) == {16: 8, 32: 4}


@pytest.mark.parametrize("value,devices,match", [
    (0, 1, r"train.batch_per_device=0 must be a positive integer or None"),
    (-2, 1, r"train.batch_per_device=-2 must be a positive integer"),
    (2.5, 1, r"train.batch_per_device=2.5 must be a positive integer"),
    (True, 1, r"train.batch_per_device=True must be a positive integer"),
    # 4 per device at 16 px are 2 rounds of 2, but 8 at 8 px would be 3 rounds of 8 / 3.
    (3, 1, r"train.batch_per_device=3: the 8px bucket has 8 samples per device, which do not "
           r"split into 3 equal micro-batches of at most 3; train.batch_per_device=2 "),
    (1, 3, r"train.batch_size=4: the 4 samples of the 16px bucket do not split over the 3 "
           r"devices"),
])
def test_bad_batch_per_device_is_named(value, devices, match):
  cfg = tiny_config()
  del cfg.train["batch_per_device"]  # the placeholder(int) refuses a float (a config's types
  cfg.train.batch_per_device = value  # are not checked everywhere validate() is called)
  with pytest.raises(ValueError, match=match):
    config_lib.validate(cfg, num_devices=devices)


def test_bad_batch_per_device_fails_before_compiling(tmp_path):
  compiles = watch_compiles()
  with pytest.raises(ValueError, match=r"train.batch_per_device=3: the 8px bucket"):
    train.train_and_evaluate(tiny_config(**{"train.batch_per_device": 3}), str(tmp_path))
  assert not compiles, f"compiled {len(compiles)} program(s) before the error"


# ---------------------------------------------------------------------------------------------
# The draws and the gradient.

@pytest.fixture(scope="module")
def conditional_model():
  """A tiny conditional ADM with dropout and label dropout: every random draw of the loss."""
  den = models.create_denoiser(dict(ADM_TINY, dropout=0.2, label_dropout=0.3), seed=1)
  graphdef, params, buffers = nnx.split(den, nnx.Param, ...)
  rng = np.random.default_rng(0)
  b = 8
  batch = dict(image=jnp.asarray(rng.uniform(-1, 1, (b, 8, 8, 3)), jnp.float32),
               pos=jnp.asarray(rng.uniform(-1, 1, (b, 8, 8, 2)), jnp.float32),
               label=jax.nn.one_hot(rng.integers(0, 5, b), 5))
  return den, graphdef, params, buffers, batch


def test_a_sample_draws_the_same_in_any_batch(conditional_model):
  """Sample i's noise level, noise and dropout masks come from fold_in(key, i): its loss in a
  part of the batch (given its keys) is its loss in the whole batch."""
  den, _, _, _, batch = conditional_model
  loss = jax.jit(lambda x, pos, label, key: edm.denoising_loss(den, x, pos, label, key))
  key = jax.random.key(7)
  whole = loss(batch["image"], batch["pos"], batch["label"], key)
  part = loss(batch["image"][4:], batch["pos"][4:], batch["label"][4:],
              edm.sample_keys(key, jnp.arange(4, 8)))
  np.testing.assert_allclose(part, whole[4:], rtol=1e-5)
  other = loss(batch["image"], batch["pos"], batch["label"], jax.random.key(8))
  assert not np.allclose(other, whole, rtol=1e-2)  # the key matters


@pytest.fixture(scope="module")
def whole_batch_gradient(conditional_model):
  _, graphdef, params, buffers, batch = conditional_model
  fn = jax.jit(train_step.make_grad_fn(graphdef, tiny_config().train))
  return jax.device_get(fn(params, buffers, batch, jax.random.key(3), jnp.float32(8.0)))


@pytest.mark.parametrize("rounds,shards", [(4, 1), (2, 2)])
def test_accumulated_gradient_equals_the_whole_batch_gradient(conditional_model,
                                                              whole_batch_gradient, rounds,
                                                              shards):
  _, graphdef, params, buffers, batch = conditional_model
  fn = jax.jit(train_step.make_grad_fn(graphdef, tiny_config().train, rounds, shards))
  grads, loss = jax.device_get(fn(params, buffers, batch, jax.random.key(3), jnp.float32(8.0)))
  ref_grads, ref_loss = whole_batch_gradient
  assert _rel(grads, ref_grads) < 1e-5
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# The train step of the trainer: unsplit and accumulated on one device, and the program.

SIZE = 8  # the R/2 bucket of the tiny config: batch 4 x 2 = 8; batch_per_device=2 is 4 rounds


def _cfg(per_device=None, **overrides):
  return tiny_config(**{"model.dropout": 0.1, "train.batch_per_device": per_device, **overrides})


def _batches(cfg, n):
  rng = np.random.default_rng(0)
  b = cfg.train.batch_size * patches.batch_mul(SIZE, cfg.model.img_resolution)
  r = cfg.model.img_resolution
  out = []
  for _ in range(n):
    offsets = rng.integers(0, r - SIZE + 1, (b, 2))
    out.append(dict(image=rng.integers(0, 256, (b, SIZE, SIZE, 3), dtype=np.uint8),
                    pos=patches.coord_grid(offsets[:, 0], offsets[:, 1], SIZE, r)))
  return out


def _steps(cfg, state0, n=2):
  run = train.Run(cfg)
  compiled = programs.Programs(run).compile_step(SIZE)
  state, metrics = jax.device_put(state0, run.state_shardings), []
  for step, batch in enumerate(_batches(cfg, n)):
    state, m = compiled(state, run.to_device(batch), run.hyper(step, SIZE))
    metrics.append(jax.device_get(m))
  return jax.device_get(state), metrics


def test_accumulated_step_equals_the_unsplit_step():
  state0 = jax.device_get(train.Run(_cfg()).init_state())
  ref, ref_metrics = _steps(_cfg(), state0)
  got, metrics = _steps(_cfg(2), state0)
  assert train.Run(_cfg(2)).rounds[SIZE] == 4
  # The tolerances of the sharded step's test: only the order of float32 sums differs.
  assert _rel(got["params"], ref["params"]) < 1e-4
  assert _rel(got["ema"], ref["ema"]) < 1e-4
  delta = lambda p: jax.tree_util.tree_map(lambda x, x0: x - x0, p, state0["params"])  # noqa: E731
  assert _rel(delta(got["params"]), delta(ref["params"])) < 1e-3
  assert int(got["step"]) == int(ref["step"]) == 2
  for m, r in zip(metrics, ref_metrics):
    np.testing.assert_allclose(m["loss"], r["loss"], rtol=1e-5)
    np.testing.assert_allclose(m["grad_norm"], r["grad_norm"], rtol=1e-4)
    assert (float(m["lr"]), float(m["ema_beta"])) == (float(r["lr"]), float(r["ema_beta"]))


def _eqns(jaxpr, name):
  """Every equation of primitive `name` in a jaxpr, nested ones included."""
  from jax.extend import core as jcore  # pylint: disable=import-outside-toplevel
  out = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == name:
      out.append(eqn)
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(sub, jcore.ClosedJaxpr):
          sub = sub.jaxpr
        if isinstance(sub, jcore.Jaxpr):
          out += _eqns(sub, name)
  return out


@pytest.mark.parametrize("param_sharding", ["replicated", "fsdp"])
def test_the_program_holds_one_scan_over_the_rounds(param_sharding):
  """One scan of length k whose body holds the network once: the program does not grow with k,
  and the FLOPs counted from the jaxpr are the unsplit step's (the scan's body times k)."""
  kw = {"mesh.param_sharding": param_sharding}
  plain = programs.Programs(train.Run(_cfg(**kw))).trace_grad(SIZE).jaxpr
  split = programs.Programs(train.Run(_cfg(2, **kw))).trace_grad(SIZE).jaxpr
  assert not _eqns(plain.jaxpr, "scan")
  [scan] = _eqns(split.jaxpr, "scan")
  assert scan.params["length"] == 4
  convs = len(_eqns(plain.jaxpr, "conv_general_dilated"))
  assert convs > 0 and len(_eqns(scan.params["jaxpr"].jaxpr, "conv_general_dilated")) == convs
  assert len(_eqns(split.jaxpr, "conv_general_dilated")) == convs
  flops = programs.jaxpr_flops(plain)
  np.testing.assert_allclose(programs.jaxpr_flops(split), flops, rtol=1e-9)
