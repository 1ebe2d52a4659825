"""The paper's experiment presets and the variants a config file's argument selects.

`pixel64` and `latent256` set, on a config of `config_lib.base_config()`'s keys, what every 64 px
and every 256 px latent experiment of the paper shares (`config_lib.pixel64_config` and
`config_lib.latent256_config` apply them to the defaults); `apply_args` applies a config file's
argument string (`--config=configs/NAME.py:ARG,ARG`, see VARIANT_HELP). Each changes the config
it is given in place and returns it.
"""
from __future__ import annotations

import ml_collections

from patchdiff import patches


def pixel64(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """What every 64 px experiment shares: EDM's DDPM++ at 64 px (channel_mult 1,2,2,2, 61.8M
  parameters) on a dataset_tool zip, the paper's stochastic schedule, and the sampler of the
  paper's 64 px FIDs: 50 deterministic Heun steps (99 network evaluations)."""
  c.data.source = "zip"
  c.data.resolution = 64
  c.model.arch = "ddpmpp"
  c.model.img_resolution = 64
  c.model.img_channels = 3
  c.model.channel_mult = (1, 2, 2, 2)
  c.patch.real_p = 0.5
  c.train.steps = 0  # from train.duration_mimg
  c.train.log_every = 500
  c.train.checkpoint_every = 10_000
  c.train.sample_every = 50_000
  c.sample.num_steps = 50  # deterministic (s_churn 0), as the paper's 64 px FIDs were sampled
  return c


def latent256(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """What every 256 px latent experiment shares: Stable Diffusion VAE latents (4x32x32, scale
  0.18215) from `patchdiff.encode_latents`, EDM's ADM backbone (279.6M parameters unconditional),
  latent patches of 16 and 32, fp16 with loss scale 100, and the published stochastic sampler."""
  c.data.source = "latents"
  c.data.resolution = 32
  c.data.latent_scale = 0.18215
  c.vae.scale = 0.18215
  c.model.arch = "adm"
  c.model.img_resolution = 32
  c.model.img_channels = 4
  c.model.dropout = 0.10
  c.model.dtype = "float16"   # as published; bfloat16 (no loss scale needed) on TPU / H100
  c.patch.latent = True
  c.patch.real_p = 0.5
  c.train.lr = 1e-4
  c.train.ema_mimg = 50.0
  c.train.loss_scale = 100.0
  c.train.steps = 0  # from train.duration_mimg
  c.train.duration_mimg = 200.0
  c.train.log_every = 500
  c.train.checkpoint_every = 10_000
  c.train.sample_every = 50_000
  c.sample.num_steps = 256
  c.sample.s_churn = 40.0
  c.sample.s_min = 0.05
  c.sample.s_max = 50.0
  c.sample.s_noise = 1.003
  return c


VARIANT_HELP = """Config arguments (`--config=configs/NAME.py:ARG,ARG`):
  smoke                 a tiny model for a few steps (CPU), on Twemoji or synthetic latents
  p=F                   the full-image ratio real_p (paper ablation: 0, 0.1, 0.25, 0.5, 0.75, 1)
  schedule=S            stochastic (paper) or progressive (ablation)
  edm                   the EDM baseline: full images only (p=1)"""


def apply_args(c: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
  """Applies a config file's argument string (see VARIANT_HELP) to `c`; returns `c`.

  The run length stays what the config says in Mimg (train.steps follows from it), so a
  variant of p trains on as many images as the paper's runs of that variant did.
  """
  for token in filter(None, (t.strip() for t in (arg or "").split(","))):
    key, eq, value = token.partition("=")
    if key == "smoke" and not eq:
      _smoke(c)
    elif key == "edm" and not eq:
      c.patch.real_p = 1.0
    elif key == "p" and eq:
      try:
        c.patch.real_p = float(value)
      except ValueError:
        raise ValueError(f"config argument {token!r}: {value!r} is not a number") from None
      if not 0.0 <= c.patch.real_p <= 1.0:
        raise ValueError(f"config argument {token!r}: p must lie in [0, 1]")
    elif key == "schedule" and eq:
      if value not in patches.SCHEDULES:
        raise ValueError(f"config argument {token!r}: schedule is not one of {patches.SCHEDULES}")
      c.patch.schedule = value
    else:
      raise ValueError(f"unknown config argument {token!r}\n{VARIANT_HELP}")
  return c


def _smoke(c: ml_collections.ConfigDict) -> None:
  """Shrinks `c` to seconds on a CPU, keeping its kind: backbone, pixel or latent, channels,
  labels, patch schedule, precision and sampler settings. Pixel configs train on the embedded
  Twemoji set (uint8 pixels, as real image data reaches the step); latent ones on synthetic
  latents."""
  latent = c.patch.latent
  r = 8 if latent else 16
  c.data.source = "synthetic" if latent else "twemoji"
  c.data.path = None
  c.data.resolution = r
  c.data.limit = 64
  c.data.latent_scale = None
  c.vae.path = None
  c.model.img_resolution = r
  c.model.model_channels = 64 if c.model.arch == "adm" else 16  # ADM: 64 channels per head
  c.model.channel_mult = (1, 2)
  c.model.num_blocks = 1
  c.model.attn_resolutions = (r // 2,)
  # Values that differ between configs of one kind only as constants are made equal, so that
  # smoke runs of, e.g., every 64 px config are one program (and one persistent-cache entry).
  c.model.dropout = 0.0
  c.train.lr = 1e-3
  c.train.ema_mimg = 0.001
  c.patch.sizes = None if latent else (4, 8, 16)
  c.train.batch_size = 4
  c.train.steps = 3
  c.train.duration_mimg = None
  c.train.lr_rampup_kimg = 0.1
  c.train.log_every = 1
  c.train.checkpoint_every = 3
  c.train.sample_every = 0
  c.sample.num_steps = 2
  c.sample.batch_size = 4
  c.sample.grid_size = 4
  c.sample.num_images = 4
