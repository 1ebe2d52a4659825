"""LSUN Bedroom 256x256, unconditional, Latent Patch Diffusion (ADM on Stable Diffusion latents).

Defaults: the authors' published command (official README), `--cond=0 --arch=adm
--train_on_latents=1 --duration=200 --batch-gpu=32 --batch=1024 --lr=1e-4 --ema=50 --dropout=0.10
--fp16=1 --ls=100 --augment=0 --real_p=0.5` (ADM's 192 channels x 1,2,3,4 from train.py; 4x32x32
latents, patches 16 and 32), and the README's ADM sampler, `generate.py --steps=256 --S_churn=40
--S_min=0.05 --S_max=50 --S_noise=1.003 --batch 64`. Deviation: --batch-gpu=32, a per-GPU memory
limit, is left unset (train.batch_per_device). Here it only splits each device's share of the
batch into micro-batches with the same gradient (the official loop also drew a patch size per GPU
and micro-batch; this package draws one per step); --config.train.batch_per_device=32 sets it.
Paper FID 2.75. The authors released no latent code: latents are precomputed with sd-vae-ft-ema
(posterior mean and std; a fresh sample per epoch) and sampling decodes to pixels with the same VAE.

  python -m patchdiff.encode_latents --vae=sd-vae-ft-ema --source=zip \
      --path=datasets/lsun-bedroom-256x256.zip --resolution=256 \
      --out=datasets/lsun_bedroom256-latents
  python -m patchdiff.main --config=configs/lsun_bedroom256.py --workdir=runs/lsun_bedroom256 \
      --config.data.path=datasets/lsun_bedroom256-latents --config.vae.path=sd-vae-ft-ema
Arguments (presets.VARIANT_HELP): `:smoke` (a few CPU steps on synthetic latents), `:p=F`,
`:schedule=progressive`, `:edm` (p=1: full 32x32 latents only), combined with commas.
"""
from patchdiff import config_lib, presets


def get_config(arg=None):
  c = config_lib.latent256_config()
  c.train.batch_size = 1024
  # 130,209 steps at p=0.5 (1024 x 1.5 = 1,536 images per step)
  c.train.duration_mimg = 200.0
  return presets.apply_args(c, arg)
