"""Prints how closely our networks and sampler reproduce the official PyTorch code's fixtures.

  python benchmarks/parity.py [--reference ../shared/reference]

For each fixture: relative L2 error of D(x, sigma, pos, labels) per patch size and of the
network's part of it, D - c_skip x (D is mostly c_skip x, which hides the network's error); of
the Heun sampler's output after 3 and 6 steps (the reference ran in float64; we run float32);
and of the VAE's posterior mean, std and decoding against diffusers' AutoencoderKL (`vae_tiny`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from patchdiff import convert, sampling  # noqa: E402  pylint: disable=wrong-import-position
from patchdiff.nn import vae  # noqa: E402  pylint: disable=wrong-import-position

FIXTURES = {
    "ddpmpp_tiny": dict(arch="ddpmpp", img_resolution=16, img_channels=3, model_channels=16,
                        channel_mult=(1, 2), num_blocks=1, attn_resolutions=(8,), dropout=0.0),
    "adm_tiny_cond": dict(arch="adm", img_resolution=16, img_channels=3, model_channels=32,
                          channel_mult=(1, 2), num_blocks=1, attn_resolutions=(8,), dropout=0.0,
                          label_dim=5),
}


def nhwc(a):
  return np.transpose(a, (0, 2, 3, 1))


def rel(a, b):
  return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--reference", default=os.environ.get("PATCHDIFF_REFERENCE",
                                                            "../shared/reference"))
  args = parser.parse_args()
  parity = os.path.join(args.reference, "parity")
  print(f"{'fixture':<15} {'what':<12} {'rel. L2 error':>14}")
  for name, cfg in FIXTURES.items():
    d = convert.load_torch_state_dict(
        convert.read_state_dict(os.path.join(parity, f"{name}_weights.npz")), cfg)
    with np.load(os.path.join(parity, f"{name}_io.npz")) as io:
      for s in (16, 8, 4):
        lab = io[f"labels_{s}"] if f"labels_{s}" in io.files else None
        x, sigma, ref = nhwc(io[f"x_{s}"]), io[f"sigma_{s}"], nhwc(io[f"D_{s}"])
        out = d(x, sigma, nhwc(io[f"pos_{s}"]), lab)
        skip = (0.25 / (sigma.astype(np.float64) ** 2 + 0.25)).reshape(-1, 1, 1, 1) * x
        print(f"{name:<15} {f'D {s}px':<12} {rel(out, ref):>14.2e}")
        net = rel(np.asarray(out, np.float64) - skip, ref - skip)
        print(f"{name:<15} {f'D-cskip {s}px':<12} {net:>14.2e}")
      lab = io["sampler_labels"] if "sampler_labels" in io.files else None
      for n in (3, 6):
        out = sampling.heun_sample(d, nhwc(io["sampler_latents"]), num_steps=n, labels=lab)
        print(f"{name:<15} {f'Heun {n} st.':<12} {rel(out, nhwc(io[f'heun_{n}_steps'])):>14.2e}")
  with open(os.path.join(parity, "vae_tiny_config.json"), encoding="utf-8") as f:
    config = json.load(f)
  model = vae.load_vae_from_arrays(config, dict(np.load(os.path.join(parity,
                                                                     "vae_tiny_weights.npz"))))
  with np.load(os.path.join(parity, "vae_tiny_io.npz")) as io:
    mean, std = model.encode(nhwc(io["x"]))
    out = model.decode(nhwc(io["z"]))
    for what, ours, ref in (("mean", mean, io["posterior_mean"]), ("std", std, io["posterior_std"]),
                            ("decode", out, io["decoded"])):
      print(f"{'vae_tiny':<15} {what:<12} {rel(ours, nhwc(ref)):>14.2e}")


if __name__ == "__main__":
  main()
