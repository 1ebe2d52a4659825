"""The tf.data patch pipeline: step plans, host slices, stateless draws, crops, coordinates.

The pipeline is a pure function of (seed, step): every sample of the run has a global counter k
(samples are numbered in the order the steps consume them), and everything about sample k (which
image, where the crop sits, whether it is flipped) is drawn statelessly from (seed, k). A run
resumed at `start_step` therefore sees exactly the batches an uninterrupted run would have seen,
and so does every host that builds the same dataset.

Multi-host: step t's global batch is the b_t samples with counters [c_t, c_t + b_t); host p of P
yields the contiguous slice [c_t + p * b_t / P, c_t + (p + 1) * b_t / P). The hosts together see
*exactly* what one host with the global batch sees: the data order does not depend on the number
of hosts (a run can resume on another topology and get the same samples), every epoch still visits
every example once, and no per-host state exists that could drift. The cost is that every host
can reach every example (a decoded array, encoded bytes, or a memory-mapped latent file); each
decodes only its own b_t / P samples per step. Every bucket's b_t must be divisible by P.
"""
from __future__ import annotations

import atexit
import threading
import time

import numpy as np
from absl import logging

from patchdiff.patches import PatchSchedule, batch_mul, coord_grid, mix64

# Independent random streams per sample counter k, each keyed by a seed derived from (seed, tag).
STREAM_SHUFFLE = 0x5348554646  # which image: the epoch permutation
STREAM_OFFSET_I = 0x4F46465F49  # crop row
STREAM_OFFSET_J = 0x4F46465F4A  # crop column
STREAM_FLIP = 0x464C4950  # horizontal flip

_GOLDEN = 0x9E3779B97F4A7C15
_INC = 0x632BE59BD9B4E019


def stream_seed(seed: int, stream: int) -> int:
  """A 64-bit seed for one random stream, a pure function of (seed, stream)."""
  with np.errstate(over="ignore"):
    z = mix64(np.uint64(seed & 0xFFFFFFFFFFFFFFFF) + np.uint64(_GOLDEN))
    return int(mix64(z ^ np.uint64(stream)))


def _signed64(v: int) -> int:
  v &= 0xFFFFFFFFFFFFFFFF
  return v - (1 << 64) if v >= (1 << 63) else v


def _tf_mix64(tf, z):
  for shift, mul in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB), (31, None)):
    z = tf.bitwise.bitwise_xor(z, tf.bitwise.right_shift(z, tf.constant(shift, tf.uint64)))
    z = z * tf.constant(mul, tf.uint64) if mul else z
  return z


def tf_uniform_from_counter(tf, seed: int, counters):
  """TF twin of `patches.uniform_from_counter` (bit-identical): float64 uniforms in [0, 1)."""
  with np.errstate(over="ignore"):
    key = int(mix64(np.uint64(seed & 0xFFFFFFFFFFFFFFFF) + np.uint64(_GOLDEN)))
  c = tf.bitcast(tf.cast(counters, tf.int64), tf.uint64)
  z = c * tf.constant(_GOLDEN, tf.uint64) + tf.constant(_INC, tf.uint64)
  z = _tf_mix64(tf, tf.bitwise.bitwise_xor(tf.constant(key, tf.uint64), z))
  top = tf.bitwise.right_shift(z, tf.constant(11, tf.uint64))
  return tf.cast(top, tf.float64) * (1.0 / (1 << 53))


# ---------------------------------------------------------------------------------------------
# Checks and plans
# ---------------------------------------------------------------------------------------------


def check_steps(batch_size: int, total_steps: int, start_step: int) -> None:
  """The batch size and the step range of a pipeline (ValueError naming the bad value)."""
  if int(batch_size) <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  if int(start_step) < 0:
    raise ValueError(f"start_step must be >= 0, got {start_step}")
  if int(start_step) > int(total_steps):
    raise ValueError(f"start_step {start_step} is past total_steps {total_steps}")


def check_images(images, resolution: int) -> np.ndarray:
  """`images` as an (N, R, R, C) uint8 or float array (ValueError otherwise)."""
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
  if h != resolution:
    raise ValueError(
        f"image resolution {h} does not match the patch schedule's resolution {resolution}")
  if images.dtype != np.uint8 and not np.issubdtype(images.dtype, np.floating):
    raise ValueError(f"images must be uint8 in [0, 255] or float in [-1, 1], got dtype {images.dtype}")
  return images


def check_labels(labels, num_examples: int, label_dim: int) -> None:
  """Labels (N,) integer class ids in [0, label_dim), or None with label_dim = 0."""
  if int(label_dim) < 0:
    raise ValueError(f"label_dim must be >= 0, got {label_dim}")
  if labels is None:
    if int(label_dim) > 0:
      raise ValueError(f"label_dim={label_dim} but no labels were given")
    return
  labels = np.asarray(labels)
  if labels.ndim != 1 or labels.shape[0] != num_examples:
    raise ValueError(f"labels must have shape (N,) = ({num_examples},) to match the images, got "
                     f"shape {labels.shape}")
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels must be integer class ids, got dtype {labels.dtype}")
  if int(label_dim) <= 0:
    raise ValueError("labels were given but label_dim is 0: pass the number of classes")
  if labels.min() < 0:
    raise ValueError(f"labels must be >= 0, found {labels.min()}")
  if labels.max() >= int(label_dim):
    raise ValueError(f"label {labels.max()} is out of range for label_dim={label_dim}")


def step_plan(schedule: PatchSchedule, batch_size: int, total_steps: int):
  """Per step t in [0, total_steps): patch size s_t, sample count b_t, first sample counter c_t.

  b_t = batch_size * batch_mul(s_t, R); c_t = sum_{u<t} b_u (int64, c_0 = 0).
  """
  steps = np.arange(int(total_steps), dtype=np.int64)
  sizes = schedule.sizes_at(steps).astype(np.int64)
  counts = np.zeros_like(sizes)
  for s in np.unique(sizes):
    counts[sizes == s] = int(batch_size) * batch_mul(int(s), schedule.resolution)
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


# ---------------------------------------------------------------------------------------------
# Pieces for `fetch` functions
# ---------------------------------------------------------------------------------------------


def crop_patches(tf, source, box_ind, oi, oj, flip, s, res):
  """(b, s, s, C) float32 crops of `source` (M, R, R, C) rows `box_ind`, mirrored where `flip`.

  The crop of sample m covers rows oi..oi+s-1 and, in the (optionally) mirrored image, columns
  oj..oj+s-1, i.e. source columns R-1-oj-c when flipped. `crop_and_resize(method="nearest")`
  copies whole pixels exactly when each box is shrunk by a quarter pixel at both ends: the
  sampling positions then lie within +-0.25 of the wanted pixels and strictly inside the image.
  """
  q, last = 0.25, float(res - 1)
  y1 = tf.cast(oi, tf.float32) + q
  x1 = tf.cast(oj, tf.float32) + q
  y2 = y1 + tf.cast(s, tf.float32) - 1.0 - 2 * q
  x2 = x1 + tf.cast(s, tf.float32) - 1.0 - 2 * q
  x1, x2 = tf.where(flip, last - x1, x1), tf.where(flip, last - x2, x2)
  boxes = tf.stack([y1, x1, y2, x2], axis=1) / max(last, 1.0)
  return tf.image.crop_and_resize(source, boxes, tf.cast(box_ind, tf.int32), tf.stack([s, s]),
                                  method="nearest")


def as_written(tf, fn):
  """`fn` for `Dataset.map`, traced into a graph as written: without AutoGraph's conversion of its
  Python source (and of every function it calls), which would make a third of building a
  pipeline's graph. The functions here branch on Python values only, so the graph is the same."""
  return tf.autograph.experimental.do_not_convert(fn)


def host_tensor(tf, array: np.ndarray):
  """A large array as a host-memory (CPU) tf.Variable for tf.data functions to capture.

  A captured eager *constant* is serialized into the dataset graph when the iterator is created
  (tf.data's graph rewrites): seconds per GB and another copy in memory. A captured variable is
  passed by handle. The functions that capture it keep it alive.
  """
  with tf.device("/CPU:0"):
    return tf.Variable(array, trainable=False)


class _PyCallGuard:
  """Keeps Python called from tf.data's threads (`tf.numpy_function`) out of interpreter exit.

  A tf.data thread that asks for the GIL once the interpreter finalizes is terminated (CPython
  3.11), and the destructor of its iterator then waits for it forever: the process hangs at exit
  whenever a pipeline with a Python function is still live and running. The atexit hook (atexit
  runs before finalization) waits until no wrapped function has run for `quiet_s`: by then every
  live pipeline has filled its buffers and stopped calling Python, as nothing consumes it any more.
  """

  def __init__(self, quiet_s: float = 0.5, timeout_s: float = 60.0):
    self._lock, self._active, self._last = threading.Lock(), 0, -float("inf")
    self.quiet_s, self.timeout_s = quiet_s, timeout_s
    atexit.register(self.wait_quiet)

  def wrap(self, fn):
    def guarded(*args):
      with self._lock:
        self._active += 1
      try:
        return fn(*args)
      finally:
        with self._lock:
          self._active -= 1
          self._last = time.monotonic()
    return guarded

  def wait_quiet(self) -> None:
    deadline = time.monotonic() + self.timeout_s
    while time.monotonic() < deadline:
      with self._lock:
        if not self._active and time.monotonic() - self._last >= self.quiet_s:
          return
      time.sleep(0.02)
    logging.warning("tf.data pipelines still call Python after %.0f s at exit; exit may hang",
                    self.timeout_s)


_PY_CALL_GUARD: list = []  # the process's one `_PyCallGuard`, created on first use


def exit_safe(fn):
  """`fn` for `tf.numpy_function` in a tf.data pipeline, such that the process can exit while the
  pipeline is live (see `_PyCallGuard`)."""
  if not _PY_CALL_GUARD:
    _PY_CALL_GUARD.append(_PyCallGuard())
  return _PY_CALL_GUARD[0].wrap(fn)


class SampleDraws:
  """What the pipeline draws for the samples of one step (graph tensors), for `fetch` functions."""

  def __init__(self, step, size, counters, index, offset_i, offset_j, flip):
    self.step, self.size, self.k = step, size, counters
    self.index, self.offset_i, self.offset_j, self.flip = index, offset_i, offset_j, flip


# ---------------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------------


def build_patch_pipeline(fetch, num_examples: int, resolution: int, is_uint8: bool,
                         schedule: PatchSchedule, batch_size: int, total_steps: int,
                         start_step: int = 0, seed: int = 0, labels: np.ndarray | None = None,
                         label_dim: int = 0, hflip: bool = False, process_index: int = 0,
                         process_count: int = 1, num_parallel_calls=None):
  """The patch pipeline around `fetch(draws) -> (b, s, s, C) float32 crops` (unscaled values).

  Everything but the pixels is decided here: the steps' buckets and sample counters (this host's
  slice), which image each sample takes, its crop offsets and flip, coordinates and labels.
  `fetch` turns those draws into pixel crops (from an in-memory array, from encoded bytes, or
  from memory-mapped latents). The crops of uint8 sources (`is_uint8`) leave as uint8 (a quarter
  of float32's bytes to the device); the train step maps them to [-1, 1]. Elements: see
  `make_patch_dataset`.
  """
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  check_steps(batch_size, total_steps, start_step)
  n, res = int(num_examples), int(resolution)
  start_step, total_steps, seed = int(start_step), int(total_steps), int(seed)
  sizes, counts, starts = host_plan(schedule, batch_size, total_steps, process_index,
                                    process_count)
  sizes_t = tf.constant(sizes[start_step:].astype(np.int32))
  counts_t = tf.constant(counts[start_step:])
  starts_t = tf.constant(starts[start_step:])
  labels_t = tf.constant(np.asarray(labels).astype(np.int32)) if labels is not None else None

  shuffle_key = stream_seed(seed, STREAM_SHUFFLE)
  shuffle_seed = (_signed64(shuffle_key), _signed64(shuffle_key >> 32 ^ 0xA5A5A5A5))
  seed_i = stream_seed(seed, STREAM_OFFSET_I)
  seed_j = stream_seed(seed, STREAM_OFFSET_J)
  seed_f = stream_seed(seed, STREAM_FLIP)
  n64 = tf.constant(n, tf.int64)
  # The coordinates of the whole image by the one definition; a patch's are their exact crop
  # (computing them per patch in the graph made the cached pipeline 30% slower).
  grid = tf.constant(coord_grid(np.zeros(1), np.zeros(1), res, res))

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
    oi = tf.cast(tf.floor(tf_uniform_from_counter(tf, seed_i, k) * hi), tf.int32)
    oj = tf.cast(tf.floor(tf_uniform_from_counter(tf, seed_j, k) * hi), tf.int32)
    if hflip:
      flip = tf_uniform_from_counter(tf, seed_f, k) < 0.5
    else:
      flip = tf.zeros([b], tf.bool)

    x = fetch(SampleDraws(step, s, k, index, oi, oj, flip))
    if is_uint8:  # whole pixel values, copied exactly: back to the 1-byte type they came in
      x = tf.cast(x, tf.uint8)
    out = {"image": x, "pos": crop_patches(tf, grid, tf.zeros([b], tf.int32), oi, oj,
                                            tf.zeros([b], tf.bool), s, res), "step": step,
           "offset_i": oi, "offset_j": oj, "index": index, "flip": flip, "counter": k}
    if labels_t is not None:
      out["label"] = tf.one_hot(tf.gather(labels_t, index), int(label_dim), dtype=tf.float32)
    return out

  if num_parallel_calls is None:
    num_parallel_calls = tf.data.AUTOTUNE
  ds = tf.data.Dataset.range(start_step, total_steps)
  ds = ds.map(as_written(tf, fn), num_parallel_calls=num_parallel_calls, deterministic=True)
  return ds.prefetch(tf.data.AUTOTUNE)


def make_patch_dataset(images: np.ndarray, schedule: PatchSchedule, batch_size: int,
                       total_steps: int, start_step: int = 0, seed: int = 0,
                       labels: np.ndarray | None = None, label_dim: int = 0, hflip: bool = False,
                       process_index: int = 0, process_count: int = 1):
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
    image    (b, s, s, C) uint8 pixels for uint8 input (the step maps them to [-1, 1]:
             `train_step.model_images`), float32 as stored for float input
    pos      (b, s, s, 2) float32, channels [x, y] (patches.coord_grid of the offsets)
    label    (b, label_dim) float32 one-hot (only when labels are given)
    step     () int64
    offset_i, offset_j (b,) int32;  index (b,) int64 image indices;  flip (b,) bool
    counter  (b,) int64 global sample counters k (what every draw of the sample is keyed by)
  """
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  images = check_images(images, schedule.resolution)
  check_labels(labels, len(images), label_dim)
  check_steps(batch_size, total_steps, start_step)
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
