"""Every experiment config: published values, derived step counts, variants, and a smoke run."""
import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest

from patchdiff import config_lib, train
from patchdiff.nn import models

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PIXEL = ["celeba64", "ffhq64", "afhqv2_cat64", "afhqv2_dog64", "afhqv2_wild64"]
LATENT = ["lsun_bedroom256", "lsun_church256", "imagenet256"]

# The authors' published commands (EDM's recipes where they published none):
# batch, lr, dropout, Mimg, EMA Mimg, dtype, loss scale, label_dim.
PUBLISHED = {
    "celeba64": (256, 2e-4, 0.05, 200, 0.5, "float32", 1.0, 0),
    "ffhq64": (256, 2e-4, 0.05, 200, 0.5, "float32", 1.0, 0),
    "afhqv2_cat64": (512, 2e-4, 0.25, 75, 0.5, "float32", 1.0, 0),
    "afhqv2_dog64": (512, 2e-4, 0.25, 75, 0.5, "float32", 1.0, 0),
    "afhqv2_wild64": (512, 2e-4, 0.25, 75, 0.5, "float32", 1.0, 0),
    "lsun_bedroom256": (1024, 1e-4, 0.10, 200, 50, "float16", 100.0, 0),
    "lsun_church256": (1024, 1e-4, 0.10, 200, 50, "float16", 100.0, 0),
    "imagenet256": (4096, 1e-4, 0.10, 2500, 50, "float16", 100.0, 1000),
}
PARAMS = {"ddpmpp": 61_806_723, "adm": 279_631_108, "adm_cond": 280_399_108}


def load(name, arg=None):
  spec = importlib.util.spec_from_file_location(f"config_{name}", CONFIGS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg is not None else module.get_config()


def test_every_config_file_is_covered():
  assert sorted(p.stem for p in CONFIGS.glob("*.py")) == sorted(PIXEL + LATENT + ["demo"])


@pytest.mark.parametrize("name", PIXEL + LATENT)
def test_published_values_and_derived_length(name):
  batch, lr, dropout, mimg, ema, dtype, ls, label_dim = PUBLISHED[name]
  cfg = config_lib.finalize(load(name))
  config_lib.validate(cfg)
  m = models.resolve(cfg.model)
  assert (cfg.train.batch_size, cfg.train.lr, m["dropout"], cfg.train.duration_mimg,
          cfg.train.ema_mimg, m["dtype"], cfg.train.loss_scale, m["label_dim"]) == (
              batch, lr, dropout, mimg, ema, dtype, ls, label_dim)
  sched = config_lib.patch_schedule(cfg)
  assert cfg.patch.real_p == 0.5 and cfg.patch.schedule == "stochastic"
  # The paper's images counted per step (batch x mean batch_mul): 1.9 at 64 px, 1.5 for latents.
  assert sched.mean_batch_mul == pytest.approx(1.5 if name in LATENT else 1.9)
  per_step = batch * sched.mean_batch_mul
  assert cfg.train.steps == math.ceil(mimg * 1e6 / per_step - 1e-9)
  # The figure quoted in the file is the derived one.
  assert f"{cfg.train.steps:,} steps" in (CONFIGS / f"{name}.py").read_text()
  if name in LATENT:
    assert cfg.patch.latent and sched.active_sizes == (16, 32)
    assert (m["img_resolution"], m["img_channels"], cfg.data.latent_scale) == (32, 4, 0.18215)
    assert (cfg.sample.num_steps, cfg.sample.s_churn, cfg.sample.s_min, cfg.sample.s_max,
            cfg.sample.s_noise) == (256, 40.0, 0.05, 50.0, 1.003)
  else:
    assert sched.active_sizes == (16, 32, 64)
  if name == "imagenet256":
    assert (m["label_dropout"], cfg.sample.guidance, cfg.data.labels) == (0.1, 1.3, True)


@pytest.mark.parametrize("name", PIXEL + LATENT)
def test_full_size_parameter_counts(name):
  cfg = load(name)
  key = {"imagenet256": "adm_cond"}.get(name, "adm" if name in LATENT else "ddpmpp")
  assert models.count_params(models.abstract_denoiser(cfg.model)) == PARAMS[key]


# The published sampler: (num_steps, s_churn, s_min, s_max, s_noise, guidance).
SAMPLERS = {"pixel": (50, 0.0, 0.0, float("inf"), 1.0, 1.0),
            "latent": (256, 40.0, 0.05, 50.0, 1.003, 1.0),
            "imagenet256": (256, 40.0, 0.05, 50.0, 1.003, 1.3)}


@pytest.mark.parametrize("name", PIXEL + LATENT)
def test_published_sampler_ramps_adam_and_no_flips(name):
  cfg = load(name)
  s, t = cfg.sample, cfg.train
  want = SAMPLERS.get(name, SAMPLERS["latent" if name in LATENT else "pixel"])
  assert (s.num_steps, s.s_churn, s.s_min, s.s_max, s.s_noise, s.guidance) == want
  # EDM's ramps: the lr rises linearly over 10 Mimg; the EMA half-life is at most 5% of the
  # images seen. Adam as in EDM, no gradient clipping; no augmentation of any kind.
  assert (t.lr_rampup_kimg, t.ema_rampup) == (10_000.0, 0.05)
  assert (t.adam_b1, t.adam_b2, t.adam_eps) == (0.9, 0.999, 1e-8)
  assert cfg.data.hflip is False and cfg.model.get("augment_dim", 0) == 0
  assert (t.p_mean, t.p_std) == (-1.2, 1.2)


def test_variants_keep_the_length_in_mimg():
  base = config_lib.finalize(load("celeba64"))
  edm = config_lib.finalize(load("celeba64", "edm"))
  assert config_lib.patch_schedule(edm).active_sizes == (64,)
  assert edm.train.steps == math.ceil(200e6 / 256)  # one counted image per sample
  for p in (0.0, 0.1, 0.25, 0.75, 1.0):
    cfg = config_lib.finalize(load("celeba64", f"p={p}"))
    sched = config_lib.patch_schedule(cfg)
    assert sched.probs == pytest.approx(((1 - p) * 0.4, (1 - p) * 0.6, p))
    assert cfg.train.steps * 256 * sched.mean_batch_mul >= 200e6
    assert (cfg.train.steps - 1) * 256 * sched.mean_batch_mul < 200e6
  prog = config_lib.finalize(load("celeba64", "schedule=progressive"))
  sched = config_lib.patch_schedule(prog)
  sizes = sched.sizes_at(np.arange(prog.train.steps))
  assert sizes[0] == 16 and sizes[-1] == 64 and np.all(np.diff(sizes) >= 0)
  # Each progressive step counts its own batch_mul, so 200 Mimg take more steps than the
  # stochastic schedule's (which counts the mean 1.9 every step): 200e6 / 256 x 0.7.
  assert prog.train.steps == math.ceil(200e6 / 256 * (0.2 / 4 + 0.3 / 2 + 0.5)) > base.train.steps
  assert sched.counted_before([prog.train.steps])[0] * 256 == pytest.approx(200e6, rel=1e-5)
  lat = config_lib.finalize(load("lsun_church256", "p=0.25,schedule=progressive"))
  assert config_lib.patch_schedule(lat).probs == pytest.approx((0.75, 0.25))


@pytest.mark.parametrize("arg, message", [
    ("tiny", "unknown config argument 'tiny'"),
    ("p=2", "p must lie in [0, 1]"),
    ("p=half", "'half' is not a number"),
    ("schedule=cosine", "schedule is not one of"),
])
def test_bad_config_arguments_are_named(arg, message):
  with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
    load("ffhq64", arg)


def test_steps_zero_needs_a_duration():
  cfg = load("ffhq64")
  cfg.train.duration_mimg = None
  with pytest.raises(ValueError, match="train.steps=0 needs a positive train.duration_mimg"):
    config_lib.finalize(cfg)


def test_vae_scale_must_match_the_latents():
  cfg = config_lib.finalize(load("lsun_church256"))
  cfg.vae.scale = 0.13025
  with pytest.raises(ValueError, match="vae.scale=0.13025 differs from data.latent_scale"):
    config_lib.validate(cfg)
  pixel = config_lib.finalize(load("ffhq64"))
  pixel.vae.path = "sd-vae-ft-ema"
  with pytest.raises(ValueError, match="patch.latent is False"):
    config_lib.validate(pixel)


@pytest.mark.parametrize("key, value, message", [
    ("source", "lmdb", "data.source='lmdb' is not one of"),
    ("labels", True, "data.labels=True but the model's label_dim is 0"),
    ("twemoji_category", "Flags", "data.twemoji_category='Flags': needs data.source='twemoji'"),
    ("latent_layout", "CHW", "data.latent_layout='CHW' is not one of"),
])
def test_validate_checks_the_data_section(key, value, message):
  cfg = config_lib.finalize(load("ffhq64"))
  config_lib.validate(cfg)  # no data.path yet: files are checked when the input is built
  cfg.data[key] = value
  with pytest.raises(ValueError, match=message):
    config_lib.validate(cfg)


def test_data_defaults_are_base_config_data():
  assert config_lib.base_config().data.to_dict() == config_lib.DATA_DEFAULTS
  assert config_lib.data_config(None) == config_lib.DATA_DEFAULTS


# One experiment of each kind trains; the smoke variants of the others are the same configs.
# ImageNet's is the latent one with class labels and guidance, a combination that
# tests/test_latent.py trains (class-conditional latent ADM in float16 with loss scale 100, and
# decoded samples with guidance).
KINDS = {"celeba64": PIXEL, "lsun_church256": ["lsun_bedroom256", "lsun_church256"]}


def test_smoke_variants_of_one_kind_are_one_config():
  assert sorted(sum(KINDS.values(), []) + ["imagenet256"]) == sorted(PIXEL + LATENT)
  for name, kind in KINDS.items():
    for other in kind:
      assert load(other, "smoke").to_dict() == load(name, "smoke").to_dict(), other
  labelled, latent = load("imagenet256", "smoke").to_dict(), load("lsun_church256", "smoke")
  latent = latent.to_dict()
  assert labelled["data"] == dict(latent["data"], labels=True)
  assert labelled["sample"] == dict(latent["sample"], guidance=1.3)
  assert labelled["model"] == dict(latent["model"], label_dim=1000, label_dropout=0.1)
  assert {k: v for k, v in labelled.items() if k not in ("data", "sample", "model")} == {
      k: v for k, v in latent.items() if k not in ("data", "sample", "model")}


@pytest.mark.parametrize("name", list(KINDS))
def test_smoke_variant_trains_and_checkpoints(name, tmp_path):
  cfg = load(name, "smoke")
  full = load(name)
  # The smoke run keeps the experiment's kind.
  for key in ("arch", "img_channels", "label_dim", "dtype"):
    assert cfg.model.get(key) == full.model.get(key), key
  assert cfg.patch.latent == full.patch.latent and cfg.train.loss_scale == full.train.loss_scale
  seen = []
  out = train.train_and_evaluate(cfg, str(tmp_path), on_step=lambda s, size: seen.append(size))
  assert len(seen) == cfg.train.steps == 3
  assert np.isfinite(out["loss"])
  assert (tmp_path / "checkpoints" / "3").is_dir()
  grids = list(tmp_path.glob("samples_*.png"))
  assert len(grids) == (0 if full.patch.latent else 1)  # latents need a VAE to be seen
