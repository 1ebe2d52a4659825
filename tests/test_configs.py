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
    "afhqv2_cat64": (256, 2e-4, 0.25, 75, 0.5, "float32", 1.0, 0),
    "afhqv2_dog64": (256, 2e-4, 0.25, 75, 0.5, "float32", 1.0, 0),
    "afhqv2_wild64": (256, 2e-4, 0.25, 75, 0.5, "float32", 1.0, 0),
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
  # The official loop's images counted per step, int(batch x mean batch_mul): 1.9 at 64 px, 1.5
  # for latents; it stops once the count reaches total_kimg = int(duration * 1000) kimg.
  assert sched.mean_batch_mul == pytest.approx(1.5 if name in LATENT else 1.9)
  per_step = int(batch * sched.mean_batch_mul)
  assert sched.step_images(16 if name in LATENT else 64) == per_step
  assert cfg.train.steps == math.ceil(int(mimg * 1000) * 1000 / per_step)
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
    assert (m["label_dropout"], cfg.sample.guidance, cfg.data.labels) == (0.0, 1.3, True)


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
    per_step = int(256 * sched.mean_batch_mul)
    assert cfg.train.steps * per_step >= 200e6 > (cfg.train.steps - 1) * per_step
  prog = config_lib.finalize(load("celeba64", "schedule=progressive"))
  sched = config_lib.patch_schedule(prog)
  sizes = sched.sizes_at(np.arange(prog.train.steps))
  assert sizes[0] == 16 and sizes[-1] == 64 and np.all(np.diff(sizes) >= 0)
  # Each progressive step counts its own batch_mul, so 200 Mimg take more steps than the
  # stochastic schedule's (which counts the mean 1.9 every step): about 200e6 / 256 x 0.7.
  assert prog.train.steps == pytest.approx(200e6 / 256 * (0.2 / 4 + 0.3 / 2 + 0.5), rel=1e-3)
  assert prog.train.steps > base.train.steps
  ends = sched.nimg_before([prog.train.steps - 1, prog.train.steps])
  assert ends[0] < 200_000_000 <= ends[1]
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


@pytest.mark.parametrize("key", [k for k, v in config_lib.DATA_DEFAULTS.items() if v is None])
def test_data_keys_without_a_default_are_typed(key):
  # A key that defaults to None still has a type: a value of another type is refused on
  # assignment, with a message naming the key and the value.
  data = config_lib.base_config().data
  wrong = 12345 if data.get_ref(key).get_type() is str else "not-a-number"
  with pytest.raises(TypeError, match=f"field '{key}'.*{wrong}"):
    data[key] = wrong


@pytest.mark.parametrize("key, value, message", [
    ("resolution", "32", "data.resolution must be a positive integer, got '32'"),
    ("limit", 2.5, "data.limit must be a positive integer or None, got 2.5"),
    ("hflip", 1, "data.hflip must be a bool, got 1"),
    ("latent_scale", "0.18", "data.latent_scale must be a positive number or None, got '0.18'"),
    ("shuffle", True, r"unknown data config key\(s\) \['shuffle'\]"),
])
def test_data_config_refuses_unknown_keys_and_wrong_types(key, value, message):
  assert config_lib.data_config(None) == config_lib.DATA_DEFAULTS  # the defaults pass
  with pytest.raises(ValueError, match=message):
    config_lib.data_config({key: value})


# The smoke variants of the configs of one kind are one config; ImageNet's is the latent one with
# class labels and guidance. One experiment of each kind trains: CelebA's (its programs are the
# tiny run's that the other tests share, tests/tiny.py) and ImageNet's (tests/test_latent.py
# trains the same config on latents that the tiny VAE encoded, and decodes its samples).
KINDS = {"celeba64": PIXEL, "lsun_church256": ["lsun_bedroom256", "lsun_church256"]}
TRAINED = ["celeba64", "imagenet256"]


def test_smoke_variants_of_one_kind_are_one_config():
  assert sorted(sum(KINDS.values(), []) + ["imagenet256"]) == sorted(PIXEL + LATENT)
  for name, kind in KINDS.items():
    for other in kind:
      assert load(other, "smoke").to_dict() == load(name, "smoke").to_dict(), other
  labelled, latent = load("imagenet256", "smoke").to_dict(), load("lsun_church256", "smoke")
  latent = latent.to_dict()
  assert labelled["data"] == dict(latent["data"], labels=True)
  assert labelled["sample"] == dict(latent["sample"], guidance=1.3)
  assert labelled["model"] == dict(latent["model"], label_dim=1000, label_dropout=0.0)
  assert {k: v for k, v in labelled.items() if k not in ("data", "sample", "model")} == {
      k: v for k, v in latent.items() if k not in ("data", "sample", "model")}


@pytest.mark.parametrize("name", TRAINED)
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


# The published recipes, option by option, as the official code names them
# (Zhendong-Wang/Patch-Diffusion: README.md, train.py, generate.py; EDM's README where the authors
# published no command). A config's defaults are its recipe, but for the DEVIATIONS below.

# train.py's option defaults, which hold where a command leaves an option out.
TRAIN_PY_DEFAULTS = dict(
    cond=False,              # --cond
    arch="ddpmpp",           # --arch
    precond="pedm",          # --precond: Patch_EDMPrecond and Patch_EDMLoss (P_mean, P_std)
    train_on_latents=False,  # --train_on_latents
    progressive=False,       # --progressive
    duration=200.0,          # --duration, Mimg: total_kimg = max(int(duration * 1000), 1)
    batch=512,               # --batch, global
    batch_gpu=None,          # --batch-gpu: a per-GPU limit (gradient accumulation)
    cbase=None,              # --cbase: None keeps the arch's model_channels (TRAIN_PY_ARCH)
    cres=None,               # --cres: None keeps the arch's channel_mult (TRAIN_PY_ARCH)
    lr=10e-4,                # --lr
    ema=0.5,                 # --ema, Mimg: ema_halflife_kimg = int(ema * 1000)
    dropout=0.13,            # --dropout
    label_dropout=0.0,       # no option: SongUNet's and DhariwalUNet's label_dropout default
    augment=0.12,            # --augment
    xflip=False,             # --xflip
    fp16=False,              # --fp16
    ls=1.0,                  # --ls
    real_p=0.5,              # --real_p
)
# train.py's network per --arch: (model_channels, channel_mult).
TRAIN_PY_ARCH = {"ddpmpp": (128, (2, 2, 2)), "adm": (192, (1, 2, 3, 4))}
# generate.py's option defaults.
GENERATE_PY_DEFAULTS = dict(
    steps=18,            # --steps
    S_churn=0.0,         # --S_churn
    S_min=0.0,           # --S_min
    S_max=float("inf"),  # --S_max
    S_noise=1.0,         # --S_noise
    cfg=None,            # --cfg: None (or 1.0) samples without guidance
    batch=64,            # --batch
)
# The official README's commands. LSUN's names the Bedroom zip; ImageNet's also has --tick=200
# (progress prints only). Both sampler commands pass --batch 64 (and --resolution 64, or
# --resolution 32 --on_latents=1); "For ImageNet ... add --cfg=1.3".
README_CELEBA = dict(cond=False, arch="ddpmpp", batch=256, cres=(1, 2, 2, 2), lr=2e-4,
                     dropout=0.05, augment=0.0, real_p=0.5)
README_LSUN = dict(cond=False, arch="adm", train_on_latents=True, duration=200.0, batch_gpu=32,
                   batch=1024, lr=1e-4, ema=50.0, dropout=0.10, fp16=True, ls=100.0, augment=0.0,
                   real_p=0.5)
README_IMAGENET = dict(cond=True, arch="adm", train_on_latents=True, duration=2500.0,
                       batch_gpu=32, batch=4096, lr=1e-4, ema=50.0, dropout=0.10, fp16=True,
                       ls=100.0, augment=0.0, real_p=0.5)
README_DDPMPP_SAMPLER = dict(steps=50, batch=64)
README_ADM_SAMPLER = dict(steps=256, S_churn=40.0, S_min=0.05, S_max=50.0, S_noise=1.003, batch=64)
README_IMAGENET_SAMPLER = dict(README_ADM_SAMPLER, cfg=1.3)
# EDM's README (its table of the options of its pre-trained models): FFHQ-64 and AFHQv2-64.
EDM_FFHQ = dict(cond=False, arch="ddpmpp", batch=256, cres=(1, 2, 2, 2), lr=2e-4, dropout=0.05,
                augment=0.15)
EDM_AFHQV2 = dict(EDM_FFHQ, dropout=0.25)
PAPER_AFHQV2 = dict(duration=75.0)  # the paper's AFHQv2 runs: 75 Mimg
# {config: (its command over TRAIN_PY_DEFAULTS, its sampler over GENERATE_PY_DEFAULTS)}
RECIPES = {
    "celeba64": (README_CELEBA, README_DDPMPP_SAMPLER),
    "ffhq64": (EDM_FFHQ, README_DDPMPP_SAMPLER),
    "afhqv2_cat64": (dict(EDM_AFHQV2, **PAPER_AFHQV2), README_DDPMPP_SAMPLER),
    "afhqv2_dog64": (dict(EDM_AFHQV2, **PAPER_AFHQV2), README_DDPMPP_SAMPLER),
    "afhqv2_wild64": (dict(EDM_AFHQV2, **PAPER_AFHQV2), README_DDPMPP_SAMPLER),
    "lsun_bedroom256": (README_LSUN, README_ADM_SAMPLER),
    "lsun_church256": (README_LSUN, README_ADM_SAMPLER),  # the LSUN command, unchanged
    "imagenet256": (README_IMAGENET, README_IMAGENET_SAMPLER),
}
# Deviations kept on purpose, {config: {option: (published value, ours)}}, and where each
# config's docstring says how to restore the published value.
# EDM's augmentation is dropped as in every published Patch Diffusion command (--augment=0);
# this package has no augmentation pipeline, so it cannot be restored.
NO_AUGMENT = {"augment": (0.15, 0.0)}
# --batch-gpu is a memory limit; train.batch_per_device is its counterpart and leaves the gradient
# unchanged here.
NO_BATCH_GPU = {"batch_gpu": (32, None)}
DEVIATIONS = {"ffhq64": NO_AUGMENT, "afhqv2_cat64": NO_AUGMENT, "afhqv2_dog64": NO_AUGMENT,
              "afhqv2_wild64": NO_AUGMENT, "lsun_bedroom256": NO_BATCH_GPU,
              "lsun_church256": NO_BATCH_GPU, "imagenet256": NO_BATCH_GPU}
RESTORE = {"augment": "cannot be restored", "batch_gpu": "--config.train.batch_per_device=32"}


def published_recipe(name):
  """The official (train.py, generate.py) options of config `name`'s recipe."""
  command, sampler = RECIPES[name]
  train = dict(TRAIN_PY_DEFAULTS, **command)
  cbase, cres = TRAIN_PY_ARCH[train["arch"]]
  train["cbase"] = train["cbase"] or cbase
  train["cres"] = train["cres"] or cres
  return train, dict(GENERATE_PY_DEFAULTS, **sampler)


def official_options(cfg):
  """`cfg` read back as the official (train.py, generate.py) options; None where it has none."""
  m = models.resolve(cfg.model)
  t, s = cfg.train, cfg.sample
  train = dict(
      cond=bool(m["label_dim"]) and cfg.data.labels,
      arch=m["arch"],
      # EDM's loss: ln(sigma) ~ N(-1.2, 1.2^2), sigma_data 0.5 (coordinate channels always).
      precond="pedm" if (t.p_mean, t.p_std, m["sigma_data"]) == (-1.2, 1.2, 0.5) else None,
      train_on_latents=cfg.patch.latent,
      progressive=cfg.patch.schedule == "progressive",
      duration=t.duration_mimg,
      batch=t.batch_size,
      batch_gpu=t.get("batch_per_device"),
      cbase=m["model_channels"],
      cres=tuple(m["channel_mult"]),
      lr=t.lr,
      ema=t.ema_mimg,
      dropout=m["dropout"],
      label_dropout=m["label_dropout"],
      augment=0.0 if m["augment_dim"] == 0 else None,  # no augmentation pipeline here
      xflip=cfg.data.hflip,
      fp16={"float16": True, "float32": False}.get(m["dtype"]),
      ls=t.loss_scale if t.loss_scaling == "static" else None,
      real_p=cfg.patch.real_p,
  )
  sample = dict(steps=s.num_steps, S_churn=s.s_churn, S_min=s.s_min, S_max=s.s_max,
                S_noise=s.s_noise, cfg=None if s.guidance == 1.0 else s.guidance,
                batch=s.batch_size)
  return train, sample


@pytest.mark.parametrize("name", PIXEL + LATENT)
def test_defaults_are_the_published_recipe(name):
  want_train, want_sample = published_recipe(name)
  got_train, got_sample = official_options(load(name))
  kept = DEVIATIONS.get(name, {})
  for option, (value, _) in kept.items():
    assert want_train[option] == value, option  # what the deviation departs from
  assert got_train == dict(want_train, **{option: ours for option, (_, ours) in kept.items()})
  assert got_sample == want_sample
  # train.py's unit conversions give whole kimg for these lengths and half-lives.
  assert got_train["duration"] * 1000 == max(int(want_train["duration"] * 1000), 1)
  assert got_train["ema"] * 1000 == int(want_train["ema"] * 1000)


@pytest.mark.parametrize("name", PIXEL + LATENT)
def test_deviations_are_named_and_restorable(name):
  doc = " ".join((CONFIGS / f"{name}.py").read_text().split('"""')[1].split())  # the docstring
  kept = DEVIATIONS.get(name, {})
  if not kept:
    assert "No deviations." in doc
  for option in kept:
    assert f"Deviation: --{option.replace('_', '-')}" in doc, option
    assert RESTORE[option] in doc, option
  if "batch_gpu" in kept:  # the restoring override is valid on the authors' 8 GPUs
    cfg = config_lib.finalize(load(name))
    cfg.train.batch_per_device = 32
    config_lib.validate(cfg, num_devices=8)


def test_imagenet_label_dropout_is_a_variant():
  base = load("imagenet256")
  # Published: no label dropout (train.py has no such option), guidance 1.3 (--cfg=1.3).
  assert (base.model.label_dropout, base.sample.guidance) == (0.0, 1.3)
  cfg = load("imagenet256", "label_dropout=0.1")
  assert cfg.model.label_dropout == 0.1
  assert dict(cfg.to_dict(), model=dict(cfg.model.to_dict(), label_dropout=0.0)) == base.to_dict()
  both = load("imagenet256", "p=0.25, label_dropout=0.2,smoke")
  assert (both.model.label_dropout, both.patch.real_p, both.train.steps) == (0.2, 0.25, 3)
  for arg, message in [("label_dropout=x", "'x' is not a number"),
                       ("label_dropout=1", r"label_dropout must lie in \[0, 1\)"),
                       ("label_dropout=-0.1", r"label_dropout must lie in \[0, 1\)")]:
    with pytest.raises(ValueError, match=message):
      load("imagenet256", arg)
  with pytest.raises(ValueError, match="unknown config argument 'label_dropout=0.1'"):
    load("lsun_church256", "label_dropout=0.1")
