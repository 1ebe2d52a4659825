"""ImageNet 256x256, class-conditional, Latent Patch Diffusion with classifier-free guidance.

Defaults: the authors' published command (official README), `--cond=1 --arch=adm
--train_on_latents=1 --duration=2500 --batch-gpu=32 --batch=4096 --lr=1e-4 --ema=50 --dropout=0.10
--fp16=1 --ls=100 --augment=0 --real_p=0.5 --tick=200` (ADM's 192 channels x 1,2,3,4 from
train.py; 4x32x32 latents, patches 16 and 32; --tick only sets the progress prints), and the
README's ADM sampler with its ImageNet guidance, `generate.py --steps=256 --S_churn=40 --S_min=0.05
--S_max=50 --S_noise=1.003 --batch 64 --cfg=1.3`: D = D_u + 1.3 (D_c - D_u), where D_u is the
network given an all-zero label vector. Paper FID 2.72 (ADM 280.4M parameters).

Label dropout: the official train.py has no label-dropout option and its networks default to none,
so the published model never saw an all-zero label in training, and neither does this one by
default (model.label_dropout = 0). D_u is then an input the network was not trained on (the zero
label only removes the class embedding: ADM's label map has no bias), and guidance 1.3 extrapolates
from it as the published FID did. `:label_dropout=F` zeroes the labels of a fraction F of the
training samples (0.1 is the usual choice): D_u is then a trained unconditional denoiser and 1.3 is
classifier-free guidance as Ho and Salimans define it; it departs from the published recipe.
`--config.sample.guidance=1.0` samples the conditional model alone (generate.py without --cfg).

Deviation: --batch-gpu=32, a per-GPU memory limit, is left unset (train.batch_per_device). Here it
only splits each device's share of the batch into micro-batches with the same gradient (the
official loop also drew a patch size per GPU and micro-batch; this package draws one per step);
--config.train.batch_per_device=32 sets it. Data: a dataset_tool zip of ImageNet train at 256x256
with its dataset.json labels, encoded with sd-vae-ft-ema.

  python -m patchdiff.encode_latents --vae=sd-vae-ft-ema --source=zip \
      --path=datasets/imagenet-256x256.zip --resolution=256 \
      --out=datasets/imagenet256-latents --labels
  python -m patchdiff.main --config=configs/imagenet256.py --workdir=runs/imagenet256 \
      --config.data.path=datasets/imagenet256-latents --config.vae.path=sd-vae-ft-ema
Arguments: `:label_dropout=F` (above), and presets.VARIANT_HELP's: `:smoke` (a few CPU steps on
synthetic latents), `:p=F`, `:schedule=progressive`, `:edm` (p=1: full 32x32 latents only),
combined with commas, e.g. `--config=configs/imagenet256.py:label_dropout=0.1,p=0.25`.
"""
from patchdiff import config_lib, presets


def _label_dropout(token, value):
  """The fraction of `label_dropout=F`; ValueError naming the token unless 0 <= F < 1."""
  try:
    fraction = float(value)
  except ValueError:
    raise ValueError(f"config argument {token!r}: {value!r} is not a number") from None
  if not 0.0 <= fraction < 1.0:
    raise ValueError(f"config argument {token!r}: label_dropout must lie in [0, 1)")
  return fraction


def get_config(arg=None):
  c = config_lib.latent256_config()
  c.data.labels = True
  c.model.label_dim = 1000
  c.model.label_dropout = 0.0  # published: the official train.py trains with no label dropout
  c.train.batch_size = 4096
  # 406,902 steps at p=0.5 (4096 x 1.5 = 6,144 images per step)
  c.train.duration_mimg = 2500.0
  c.sample.guidance = 1.3  # the README's --cfg=1.3
  rest = []
  for token in filter(None, (t.strip() for t in (arg or "").split(","))):
    key, eq, value = token.partition("=")
    if key == "label_dropout" and eq:
      c.model.label_dropout = _label_dropout(token, value)
    else:
      rest.append(token)
  return presets.apply_args(c, ",".join(rest))
