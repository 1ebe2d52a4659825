"""CelebA 64x64, unconditional, DDPM++ with Patch Diffusion: the paper's main pixel experiment.

Defaults: the authors' published command (official README), `--cond=0 --arch=ddpmpp --batch=256
--cres=1,2,2,2 --lr=2e-4 --dropout=0.05 --augment=0 --real_p=0.5`, with train.py's defaults for
the options it leaves out: --duration=200 (Mimg), --ema=0.5 (Mimg), --fp16=0 (float32), --ls=1,
--xflip=0, --precond=pedm; and the README's DDPM++ sampler, `generate.py --steps=50 --batch 64`
(deterministic Heun: generate.py's S_churn 0). No deviations. Paper FID 1.77 in ~24 h on 8 V100s;
the EDM baseline (p=1, `:edm`) 1.66 in ~48 h. Ablation of p (`:p=F`): FID 14.51 / 3.05 / 2.10 /
1.77 / 1.65 / 1.66 for p = 0 / 0.1 / 0.25 / 0.5 / 0.75 / 1.0; the progressive schedule 2.05. Data:
the zip of EDM's dataset_tool.py (CelebA aligned faces, centre-cropped and resized to 64x64). No
flips, as published (--config.data.hflip=True for EDM's --xflip).

  python -m patchdiff.main --config=configs/celeba64.py --workdir=runs/celeba64 \
      --config.data.path=datasets/celeba-64x64.zip
Arguments (presets.VARIANT_HELP): `:smoke` (a few CPU steps on Twemoji), `:p=F` (the
full-image ratio ablation), `:schedule=progressive`, `:edm` (the EDM baseline, p=1), combined with
commas, e.g. `--config=configs/celeba64.py:p=0.25`.
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
