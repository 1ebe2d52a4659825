"""FFHQ 64x64, unconditional, DDPM++ (EDM's SongUNet, 61.8M parameters) with Patch Diffusion.

The Patch Diffusion authors published no FFHQ command; this follows EDM's FFHQ-64 recipe
(batch 256, channel_mult 1,2,2,2, lr 2e-4, dropout 0.05, 200 Mimg, EMA 0.5 Mimg, fp32) with the
paper's stochastic patch schedule (p = 0.5) and without augmentation, as in every published Patch
Diffusion command. Paper: FID 3.11 (EDM 2.60). Data: the zip written by EDM's dataset_tool.py
(`--source=ffhq-images1024x1024 --resolution=64x64`), horizontally flipped at random as EDM's --xflip.

  python -m patchdiff.main --config=configs/ffhq64.py --workdir=runs/ffhq64 \
      --config.data.path=datasets/ffhq-64x64.zip
"""
from patchdiff import config_lib


def get_config():
  c = config_lib.base_config()
  c.data.source = "zip"
  c.data.resolution = 64
  c.data.hflip = True

  c.model.arch = "ddpmpp"
  c.model.img_resolution = 64
  c.model.img_channels = 3
  c.model.channel_mult = (1, 2, 2, 2)
  c.model.dropout = 0.05

  c.patch.real_p = 0.5

  c.train.batch_size = 256
  c.train.lr = 2e-4
  c.train.ema_mimg = 0.5
  # 200 Mimg counted as in the paper: 256 images x mean batch_mul 1.9 = 486.4 per step.
  c.train.steps = 411_185
  c.train.log_every = 500
  c.train.checkpoint_every = 10_000
  c.train.sample_every = 50_000

  c.sample.num_steps = 18  # EDM's deterministic Heun for 64 px (35 evaluations)
  return c
