"""Images in and out: [-1, 1] floats to uint8, sample grids and numbered PNG files."""
from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image


def to_uint8(x: np.ndarray) -> np.ndarray:
  """(..., C) floats in [-1, 1] -> uint8 exactly as EDM writes images: (x * 127.5 + 128) clipped
  to [0, 255] and truncated, so an image read as v / 127.5 - 1 comes back as v."""
  return np.floor(np.clip(np.asarray(x, np.float32) * 127.5 + 128, 0, 255)).astype(np.uint8)


def make_grid(images: np.ndarray, cols: int | None = None) -> np.ndarray:
  """(N, H, W, C) uint8 -> one (rows*H, cols*W, C) image, filled row by row."""
  n, h, w, c = images.shape
  cols = cols or int(math.ceil(math.sqrt(n)))
  rows = int(math.ceil(n / cols))
  grid = np.full((rows * h, cols * w, c), 255, np.uint8)
  for k in range(n):
    r, q = divmod(k, cols)
    grid[r * h:(r + 1) * h, q * w:(q + 1) * w] = images[k]
  return grid


def _pil(image: np.ndarray) -> Image.Image:
  return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def save_grid(images: np.ndarray, path: str, cols: int | None = None) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  _pil(make_grid(images, cols)).save(path)


def save_pngs(images: np.ndarray, seeds, outdir: str, per_folder: int = 1000) -> list[str]:
  """One PNG per image, named by seed, in subfolders of `per_folder` seeds (as EDM does)."""
  paths = []
  for image, seed in zip(images, seeds):
    sub = os.path.join(outdir, f"{seed - seed % per_folder:06d}")
    os.makedirs(sub, exist_ok=True)
    path = os.path.join(sub, f"{seed:06d}.png")
    _pil(image).save(path)
    paths.append(path)
  return paths
