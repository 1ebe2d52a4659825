"""AFHQv2-Cat 64x64 (about 5,000 images), unconditional, DDPM++ with Patch Diffusion.

The authors published no AFHQ command: EDM's AFHQv2-64 recipe (batch 512, channel_mult 1,2,2,2,
lr 2e-4, dropout 0.25, EMA 0.5 Mimg, fp32) without its augmentation (0.15 there), for the paper's
75 Mimg, p = 0.5. Paper FID, EDM -> Patch Diffusion: 4.60 -> 3.11 (~18 h -> ~9 h on 8 V100s): small
datasets gain most from patches. Data: EDM's dataset_tool.py on the AFHQv2 `train/cat` folder at
64x64. No flips (--config.data.hflip=True for EDM's --xflip).

  python -m patchdiff.main --config=configs/afhqv2_cat64.py --workdir=runs/afhqv2_cat64 \
      --config.data.path=datasets/afhqv2-cat-64x64.zip
Arguments (config_lib.VARIANT_HELP): `:smoke` (a few CPU steps on synthetic data), `:p=F` (the
full-image ratio ablation), `:schedule=progressive`, `:edm` (the EDM baseline, p=1), combined with
commas, e.g. `--config=configs/afhqv2_cat64.py:p=0.25`.
"""
from patchdiff import config_lib


def get_config(arg=None):
  c = config_lib.pixel64_config()
  c.train.batch_size = 512
  c.train.lr = 2e-4
  c.model.dropout = 0.25
  c.train.duration_mimg = 75.0  # 77,098 steps at p=0.5 (512 x 1.9 images per step)
  c.train.ema_mimg = 0.5
  return config_lib.apply_args(c, arg)
