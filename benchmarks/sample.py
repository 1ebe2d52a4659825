"""Sampling throughput: images/s of the Heun sampler for a config, sharded over every device.

  python benchmarks/sample.py --config=configs/demo.py --num=256 --batch=64
  python benchmarks/sample.py --config=configs/ffhq64.py --num=2048 --batch=512 \
      --config.sample.num_steps=40 --config.model.dtype=bfloat16
  python benchmarks/sample.py --config=configs/lsun_church256.py --vae=random --num=512 \
      --batch=256 --config.model.dtype=bfloat16   # latents, decoded by the SD VAE

Uses freshly initialised weights (speed does not depend on them); `--vae=random` adds the decoding
of latents by a Stable Diffusion VAE with random weights, `--vae=FOLDER` by a real one. Prints the compile time (the
first batch) and the images/s of the batches after it.
"""
from __future__ import annotations

import os
import sys
import time

import jax
from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from patchdiff import generate, sharding  # noqa: E402  pylint: disable=wrong-import-position
from patchdiff.nn import models  # noqa: E402  pylint: disable=wrong-import-position

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file")
_NUM = flags.DEFINE_integer("num", 256, "images to draw after the first (compiling) batch")
_BATCH = flags.DEFINE_integer("batch", 64, "global batch")
_VAE = flags.DEFINE_string("vae", None, "latent models: decode the samples with the SD VAE "
                           "('random': random weights of its shape; else a diffusers folder)")
flags.mark_flags_as_required(["config"])


def main(argv):
  del argv
  cfg = _CONFIG.value
  model_cfg = models.resolve(cfg.model)
  denoiser = models.create_denoiser(model_cfg, seed=cfg.seed)
  decoder = None
  if _VAE.value:
    from patchdiff.nn import vae  # pylint: disable=import-outside-toplevel
    dtype = models.DTYPES[model_cfg["dtype"]]
    source = vae.create(vae.SD_VAE_CONFIG, dtype=dtype) if _VAE.value == "random" else _VAE.value
    decoder = vae.latent_decoder(source, cfg.vae.scale, dtype=dtype)
  sampler = generate.Sampler(denoiser, model_cfg, cfg.sample, mesh=sharding.data_mesh(),
                             decoder=decoder)
  b = _BATCH.value
  t0 = time.perf_counter()
  sampler.sample(list(range(b)), batch_size=b)
  first = time.perf_counter() - t0
  t0 = time.perf_counter()
  sampler.sample(list(range(b, b + _NUM.value)), batch_size=b)
  dt = time.perf_counter() - t0
  nfe = 2 * cfg.sample.num_steps - 1
  print(f"JAX {jax.__version__}, {jax.device_count()} x {jax.devices()[0].device_kind}, "
        f"{model_cfg['img_resolution']} px{' + VAE decoding' if decoder else ''}, "
        f"{cfg.sample.num_steps} steps ({nfe} network "
        f"evaluations), batch {b}: first batch (with compile) {first:.1f} s; then {_NUM.value} "
        f"images in {dt:.1f} s = {_NUM.value / dt:.1f} images/s")


if __name__ == "__main__":
  app.run(main)
