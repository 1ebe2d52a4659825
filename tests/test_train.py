"""Training: schedules of lr and EMA, the gradient guard, config checks, one program per bucket."""
import numpy as np
import jax
import jax.numpy as jnp
import ml_collections
import pytest

from patchdiff import config_lib, train


def tiny_config(**overrides) -> ml_collections.ConfigDict:
  c = config_lib.base_config()
  c.data.source = "twemoji"
  c.data.resolution = 16
  c.data.limit = 40
  c.model.arch = "ddpmpp"
  c.model.img_resolution = 16
  c.model.img_channels = 3
  c.model.model_channels = 16
  c.model.channel_mult = (1, 2)
  c.model.num_blocks = 1
  c.model.attn_resolutions = (8,)
  c.model.dropout = 0.0
  c.train.batch_size = 4
  c.train.steps = 40
  c.train.lr = 1e-3
  c.train.lr_rampup_kimg = 0.1
  c.train.log_every = 10
  c.train.checkpoint_every = 1000
  c.sample.num_steps = 2
  c.sample.batch_size = 4
  c.sample.grid_size = 4
  c.sample.num_images = 4
  for k, v in overrides.items():
    node = c
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  return c


def test_learning_rate_ramps_up_linearly_from_zero():
  fn = train.learning_rate_fn(2e-4, 10.0, 19.0)  # 10 kimg ramp, 19 images per step
  assert float(fn(0)) == 0.0
  np.testing.assert_allclose(float(fn(100)), 2e-4 * 1900 / 10000, rtol=1e-6)
  np.testing.assert_allclose(float(fn(10000)), 2e-4, rtol=1e-6)


def test_ema_beta_follows_the_half_life_with_rampup():
  ips = 256 * 1.9
  # Step 0: half-life 0, so the EMA copies the weights.
  assert float(train.ema_beta(0, 0.5, 0.05, ips)) == 0.0
  # Late: half-life 0.5 Mimg.
  np.testing.assert_allclose(float(train.ema_beta(10**6, 0.5, 0.05, ips)),
                             0.5 ** (ips / 0.5e6), rtol=1e-6)
  # Early: half-life 0.05 * nimg.
  step = 1000
  np.testing.assert_allclose(float(train.ema_beta(step, 0.5, 0.05, ips)),
                             0.5 ** (ips / (0.05 * step * ips)), rtol=1e-5)


def test_gradient_guard():
  g = {"a": jnp.array([jnp.nan, jnp.inf, -jnp.inf, 2.0])}
  np.testing.assert_array_equal(train.sanitize_grads(g)["a"], [0.0, 1e5, -1e5, 2.0])


@pytest.mark.parametrize("key,value,match", [
    ("model.img_resolution", 18, "not divisible"),
    ("data.resolution", 32, "data.resolution=32 differs from model.img_resolution=16"),
    ("model.channel_mult", (1, 2, 2, 2), "patch size 4 is not divisible by 8"),
    ("patch.real_p", 1.5, "real_p=1.5"),
    ("train.batch_size", 0, "train.batch_size=0"),
    ("model.arch", "unet", "model.arch='unet'"),
    ("patch.schedule", "random", "'random'"),
    ("sample.guidance", 1.3, "needs a conditional model"),
])
def test_bad_configs_fail_before_compiling_with_the_key_named(key, value, match):
  cfg = tiny_config(**{key: value})
  if key == "model.img_resolution":
    cfg.data.resolution = 18
  with pytest.raises(ValueError, match=match):
    train.Run(cfg)


def test_checkpoint_from_another_model_is_refused():
  saved = tiny_config().to_dict()
  with pytest.raises(ValueError, match="model.img_channels: checkpoint 3 vs config 1"):
    config_lib.check_compatible(saved, tiny_config(**{"model.img_channels": 1}), where="ckpt/10")
  config_lib.check_compatible(saved, tiny_config(**{"model.dropout": 0.1}), where="ckpt/10")


def test_one_compilation_per_bucket_and_none_in_the_loop(tmp_path):
  compiles = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda name, *a, **k: compiles.append(name) if "backend_compile" in name else None)
  seen = []
  counts = []

  def on_step(step, size):
    seen.append(size)
    counts.append(len(compiles))

  cfg = tiny_config(**{"train.steps": 40})
  metrics = train.train_and_evaluate(cfg, str(tmp_path), on_step=on_step)
  # Each bucket visited many times, and nothing compiled once the loop was running.
  assert {s: seen.count(s) >= 5 for s in (4, 8, 16)} == {4: True, 8: True, 16: True}
  assert len(set(counts)) == 1, "a compilation happened inside the training loop"
  expected = train.Run(cfg).schedule.sizes_at(np.arange(40)).tolist()
  assert seen == expected
  assert np.isfinite(metrics["loss"])
  assert (tmp_path / "samples_00000040.png").exists()
