"""FFHQ 64x64, unconditional, DDPM++ (EDM's SongUNet, 61.8M parameters) with Patch Diffusion.

The authors published no FFHQ command. Defaults: EDM's FFHQ-64 command (EDM's README: `--cond=0
--arch=ddpmpp --batch=256 --cres=1,2,2,2 --lr=2e-4 --dropout=0.05 --augment=0.15`) with train.py's
defaults for the options it leaves out (--duration=200 Mimg, --ema=0.5 Mimg, fp32, --ls=1,
--real_p=0.5, no --xflip), and the official README's DDPM++ sampler, `generate.py --steps=50
--batch 64` (deterministic Heun). Deviation: --augment=0 instead of EDM's 0.15, as in every
published Patch Diffusion command; this package has no augmentation pipeline, so EDM's value
cannot be restored. Paper FID 3.11; EDM 2.60. Data: the zip of EDM's dataset_tool.py
(`--source=ffhq-images1024x1024 --resolution=64x64`). No flips (--config.data.hflip=True for EDM's
--xflip).

  python -m patchdiff.main --config=configs/ffhq64.py --workdir=runs/ffhq64 \
      --config.data.path=datasets/ffhq-64x64.zip
Arguments (presets.VARIANT_HELP): `:smoke` (a few CPU steps on Twemoji), `:p=F` (the
full-image ratio ablation), `:schedule=progressive`, `:edm` (the EDM baseline, p=1), combined with
commas, e.g. `--config=configs/ffhq64.py:p=0.25`.
"""
from patchdiff import config_lib, presets


def get_config(arg=None):
  c = config_lib.pixel64_config()
  c.train.batch_size = 256
  c.train.lr = 2e-4
  c.model.dropout = 0.05
  c.train.duration_mimg = 200.0  # 411,523 steps at p=0.5 (int(256 x 1.9) = 486 images per step)
  c.train.ema_mimg = 0.5
  return presets.apply_args(c, arg)
