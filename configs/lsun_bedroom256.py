"""LSUN Bedroom 256x256, unconditional, Latent Patch Diffusion (ADM on Stable Diffusion latents).

The authors' published command: adm, batch 1024, lr 1e-4, EMA 50 Mimg, dropout 0.10, fp16 with
loss scale 100, 200 Mimg, real_p 0.5 on 4x32x32 latents (patches 16 and 32). Sampler: 256 Heun
steps, S_churn 40, S_min 0.05, S_max 50, S_noise 1.003. Paper FID 2.75. The authors released no
latent code: latents are precomputed with sd-vae-ft-ema (posterior mean and std; a fresh sample per
epoch) and sampling decodes to pixels with the same VAE.

  python -m patchdiff.encode_latents --vae=sd-vae-ft-ema --source=zip \
      --path=datasets/lsun-bedroom-256x256.zip --resolution=256 \
      --out=datasets/lsun_bedroom256-latents
  python -m patchdiff.main --config=configs/lsun_bedroom256.py --workdir=runs/lsun_bedroom256 \
      --config.data.path=datasets/lsun_bedroom256-latents --config.vae.path=sd-vae-ft-ema
Arguments (config_lib.VARIANT_HELP): `:smoke` (a few CPU steps on synthetic latents), `:p=F`,
`:schedule=progressive`, `:edm` (p=1: full 32x32 latents only), combined with commas.
"""
from patchdiff import config_lib


def get_config(arg=None):
  c = config_lib.latent256_config()
  c.train.batch_size = 1024
  # 130,209 steps at p=0.5 (1024 x 1.5 images per step)
  c.train.duration_mimg = 200.0
  return config_lib.apply_args(c, arg)
