"""Stable Diffusion VAE throughput: images/s of encoding (what `patchdiff.encode_latents` spends
per image) and decoding (what sampling a latent model adds), with random weights of its shape.

  python benchmarks/vae.py --resolution=256 --batch=64 --dtype=bfloat16   # GPU / TPU
  python benchmarks/vae.py --resolution=64 --batch=4 --repeats=2          # CPU
"""
from __future__ import annotations

import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from patchdiff.nn import torch_io, vae  # noqa: E402  pylint: disable=wrong-import-position

_RES = flags.DEFINE_integer("resolution", 256, "image size")
_BATCH = flags.DEFINE_integer("batch", 64, "images per call")
_REPEATS = flags.DEFINE_integer("repeats", 10, "timed calls (after one compiling call)")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "conv/linear compute")


def _time(fn, x, repeats: int) -> tuple[float, float]:
  t0 = time.perf_counter()
  jax.block_until_ready(fn(x))
  first = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(repeats):
    out = fn(x)
  jax.block_until_ready(out)
  return first, (time.perf_counter() - t0) / repeats


def main(argv):
  del argv
  dtype = jnp.bfloat16 if _DTYPE.value == "bfloat16" else jnp.float32
  model = vae.create(vae.SD_VAE_CONFIG, dtype=dtype)
  b, r, f = _BATCH.value, _RES.value, model.downsample_factor
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (b, r, r, 3)), jnp.float32)
  z = jnp.asarray(np.random.default_rng(1).normal(size=(b, r // f, r // f, 4)), jnp.float32)
  print(f"JAX {jax.__version__}, {jax.devices()[0].device_kind}, SD VAE "
        f"({torch_io.count_params(model):,} parameters), {_DTYPE.value}, batch {b}, {r} px")
  for name, fn, arg in (("encode", vae.encode_fn(model), x), ("decode", vae.decode_fn(model), z)):
    first, per_call = _time(fn, arg, _REPEATS.value)
    print(f"{name}: first call (with compile) {first:.1f} s; then {per_call * 1e3:.1f} ms per "
          f"batch = {b / per_call:.1f} images/s")


if __name__ == "__main__":
  app.run(main)
