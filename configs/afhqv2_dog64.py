"""AFHQv2-Dog 64x64 (about 5,000 images), unconditional, DDPM++ with Patch Diffusion.

The authors published no AFHQv2 command. Defaults: EDM's AFHQv2-64 command (EDM's README:
`--cond=0 --arch=ddpmpp --batch=256 --cres=1,2,2,2 --lr=2e-4 --dropout=0.25 --augment=0.15`) with
train.py's defaults for the options it leaves out (--ema=0.5 Mimg, fp32, --ls=1, --real_p=0.5, no
--xflip) and the paper's 75 Mimg in place of train.py's --duration=200; the official README's
DDPM++ sampler, `generate.py --steps=50 --batch 64` (deterministic Heun). Deviation: --augment=0
instead of EDM's 0.15, as in every published Patch Diffusion command; this package has no
augmentation pipeline, so EDM's value cannot be restored. Paper FID, EDM -> Patch Diffusion:
4.94 -> 4.80 (~18 h -> ~9 h on 8 V100s): small datasets gain most from patches. Data: EDM's
dataset_tool.py on the AFHQv2 `train/dog` folder at 64x64. No flips (--config.data.hflip=True for
EDM's --xflip).

  python -m patchdiff.main --config=configs/afhqv2_dog64.py --workdir=runs/afhqv2_dog64 \
      --config.data.path=datasets/afhqv2-dog-64x64.zip
Arguments (presets.VARIANT_HELP): `:smoke` (a few CPU steps on Twemoji), `:p=F` (the
full-image ratio ablation), `:schedule=progressive`, `:edm` (the EDM baseline, p=1), combined with
commas, e.g. `--config=configs/afhqv2_dog64.py:p=0.25`.
"""
from patchdiff import config_lib, presets


def get_config(arg=None):
  c = config_lib.pixel64_config()
  c.train.batch_size = 256
  c.train.lr = 2e-4
  c.model.dropout = 0.25
  c.train.duration_mimg = 75.0  # 154,321 steps at p=0.5 (int(256 x 1.9) = 486 images per step)
  c.train.ema_mimg = 0.5
  return presets.apply_args(c, arg)
