"""FFHQ 64x64, unconditional, DDPM++ (EDM's SongUNet, 61.8M parameters) with Patch Diffusion.

The authors published no FFHQ command: this is EDM's FFHQ-64 recipe (batch 256, channel_mult
1,2,2,2, lr 2e-4, dropout 0.05, 200 Mimg, EMA 0.5 Mimg, fp32) without EDM's augmentation (0.15
there), as in every published Patch Diffusion command, and with the paper's stochastic schedule
(p = 0.5). Paper FID 3.11; EDM 2.60. Data: the zip of EDM's dataset_tool.py
(`--source=ffhq-images1024x1024 --resolution=64x64`). No flips (--config.data.hflip=True for EDM's
--xflip).

  python -m patchdiff.main --config=configs/ffhq64.py --workdir=runs/ffhq64 \
      --config.data.path=datasets/ffhq-64x64.zip
Arguments (config_lib.VARIANT_HELP): `:smoke` (a few CPU steps on synthetic data), `:p=F` (the
full-image ratio ablation), `:schedule=progressive`, `:edm` (the EDM baseline, p=1), combined with
commas, e.g. `--config=configs/ffhq64.py:p=0.25`.
"""
from patchdiff import config_lib


def get_config(arg=None):
  c = config_lib.pixel64_config()
  c.train.batch_size = 256
  c.train.lr = 2e-4
  c.model.dropout = 0.05
  c.train.duration_mimg = 200.0  # 411,185 steps at p=0.5 (256 x 1.9 images per step)
  c.train.ema_mimg = 0.5
  return config_lib.apply_args(c, arg)
