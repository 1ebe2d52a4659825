"""ImageNet 256x256, class-conditional, Latent Patch Diffusion with classifier-free guidance.

The authors' published command: as LSUN (adm, lr 1e-4, EMA 50 Mimg, dropout 0.10, fp16, loss
scale 100, real_p 0.5, 4x32x32 latents, patches 16 and 32), conditional on the 1,000 classes, batch
4096, 2500 Mimg. Labels are dropped (zeroed) for 10% of samples in training and sampling uses
guidance w = 1.3 (D = D_u + w (D_c - D_u)), 256 Heun steps with S_churn 40. Paper FID 2.72 (ADM
280.4M parameters). Data: a dataset_tool zip of ImageNet train at 256x256 with its dataset.json
labels, encoded with sd-vae-ft-ema.

  python -m patchdiff.encode_latents --vae=sd-vae-ft-ema --source=zip \
      --path=datasets/imagenet-256x256.zip --resolution=256 \
      --out=datasets/imagenet256-latents --labels
  python -m patchdiff.main --config=configs/imagenet256.py --workdir=runs/imagenet256 \
      --config.data.path=datasets/imagenet256-latents --config.vae.path=sd-vae-ft-ema
Arguments (config_lib.VARIANT_HELP): `:smoke` (a few CPU steps on synthetic latents), `:p=F`,
`:schedule=progressive`, `:edm` (p=1: full 32x32 latents only), combined with commas.
"""
from patchdiff import config_lib


def get_config(arg=None):
  c = config_lib.latent256_config()
  c.data.labels = True
  c.model.label_dim = 1000
  c.model.label_dropout = 0.1
  c.train.batch_size = 4096
  # 406,902 steps at p=0.5 (4096 x 1.5 images per step)
  c.train.duration_mimg = 2500.0
  c.sample.guidance = 1.3
  return config_lib.apply_args(c, arg)
