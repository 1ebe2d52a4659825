"""Images in and out: [-1, 1] floats to uint8, sample grids, numbered PNG files, and sample
sets written to one .npz as they arrive."""
from __future__ import annotations

import math
import os
import zipfile

import numpy as np
from PIL import Image


def to_uint8(x: np.ndarray) -> np.ndarray:
  """(..., C) floats in [-1, 1] -> uint8 exactly as EDM writes images: (x * 127.5 + 128) clipped
  to [0, 255] and truncated, so an image read as v / 127.5 - 1 comes back as v. uint8 input
  (the training batches of pixel sources) is returned as it is."""
  if isinstance(x, np.ndarray) and x.dtype == np.uint8:
    return x
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


class NpzStream:
  """Writes an uncompressed `.npz` whose first array, `name` of `shape` and `dtype`, arrives in
  batches of rows; the other arrays, small, are given to `close`.

  Memory: one batch; the file is written under a temporary name and renamed when `close` has
  checked that every row arrived, so a run that stops early leaves no `.npz` behind. Each member is
  a plain `.npy` (ZIP64 where it passes 4 GiB), so `np.load` and any `.npz` reader read it, e.g.
  with `name="arr_0"` the sample files of OpenAI's ADM evaluation suite.
  """

  def __init__(self, path: str, name: str, shape: tuple[int, ...], dtype):
    self.path, self.name = path, name
    self.shape, self.dtype = tuple(int(n) for n in shape), np.dtype(dtype)
    self.rows = 0
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    self._tmp = f"{path}.partial"
    self._zip = zipfile.ZipFile(self._tmp, "w", zipfile.ZIP_STORED, allowZip64=True)
    self._member = self._zip.open(f"{name}.npy", "w", force_zip64=True)
    np.lib.format.write_array_header_2_0(
        self._member, dict(descr=np.lib.format.dtype_to_descr(self.dtype), fortran_order=False,
                           shape=self.shape))

  def append(self, rows: np.ndarray) -> None:
    rows = np.ascontiguousarray(rows, self.dtype)
    if rows.shape[1:] != self.shape[1:] or self.rows + len(rows) > self.shape[0]:
      self.abort()
      raise ValueError(f"{self.path}: rows of shape {rows.shape} do not fit {self.name} "
                       f"{self.shape} after {self.rows} rows")
    self._member.write(rows.data)
    self.rows += len(rows)

  def close(self, **arrays: np.ndarray) -> str:
    """Adds `arrays` next to the streamed one and puts the file in place; returns its path."""
    if self.rows != self.shape[0]:
      self.abort()
      raise ValueError(f"{self.path}: {self.name} got {self.rows} of {self.shape[0]} rows")
    self._member.close()
    for key, value in arrays.items():
      with self._zip.open(f"{key}.npy", "w", force_zip64=True) as f:
        np.lib.format.write_array(f, np.asarray(value), allow_pickle=False)
    self._zip.close()
    os.replace(self._tmp, self.path)
    return self.path

  def abort(self) -> None:
    """Drops the partial file."""
    try:
      self._member.close()
      self._zip.close()
    finally:
      if os.path.exists(self._tmp):
        os.remove(self._tmp)

  def __enter__(self) -> "NpzStream":
    return self

  def __exit__(self, exc_type, *_) -> None:
    if exc_type is not None and os.path.exists(self._tmp):
      self.abort()
