"""The one image decoder of the pixel sources, used by both cache modes so that they give
bit-identical pixels, and the decoding of a whole source at build time.

Preprocessing, one TensorFlow function `decode_image_tf` used by both cache modes, so that they
produce bit-identical pixels:
  decode (`tf.io.decode_image`: PNG incl. 16-bit and palette, JPEG, WebP, BMP, GIF first frame)
  -> grayscale to 3 channels; alpha (RGBA, gray+alpha) composited on white:
     rint(rgb * a/255 + 255 * (1 - a/255)) in float32 -> uint8
  -> centre crop to a square of side min(H, W) (top/left offsets (H-side)//2, (W-side)//2)
  -> if side != R: `tf.image.resize(method="lanczos3", antialias=True)` (Lanczos-3 scaled by the
     resize factor when shrinking, as PIL's LANCZOS; the results agree with PIL up to rounding,
     they are not bit-identical), rounded half-to-even, clipped to [0, 255] -> uint8 (R, R, 3).
"""
from __future__ import annotations

import numpy as np
from absl import logging

from patchdiff.data import pipeline
from patchdiff.data.sources import Encoded

def decode_image_tf(encoded, resolution: int):
  """Encoded image bytes (scalar tf.string) -> (R, R, 3) uint8; see the module docstring."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  res = int(resolution)
  img = tf.io.decode_image(encoded, channels=0, dtype=tf.uint8, expand_animations=False)
  channels = tf.shape(img)[2]

  def composite(rgb, alpha):
    a = tf.cast(alpha, tf.float32) / 255.0
    out = tf.cast(rgb, tf.float32) * a + 255.0 * (1.0 - a)
    return tf.cast(tf.clip_by_value(tf.round(out), 0.0, 255.0), tf.uint8)

  def gray():
    return tf.tile(img[:, :, :1], [1, 1, 3])

  def gray_alpha():
    return composite(tf.tile(img[:, :, :1], [1, 1, 3]), img[:, :, 1:2])

  def rgb():
    return img[:, :, :3]

  def rgba():
    return composite(img[:, :, :3], img[:, :, 3:4])

  check = tf.debugging.assert_less_equal(channels, 4, message="image has more than 4 channels")
  with tf.control_dependencies([check]):
    x = tf.switch_case(tf.clip_by_value(channels - 1, 0, 3), [gray, gray_alpha, rgb, rgba])
  h, w = tf.shape(x)[0], tf.shape(x)[1]
  side = tf.minimum(h, w)
  top, left = (h - side) // 2, (w - side) // 2
  x = x[top:top + side, left:left + side]

  def resize():
    y = tf.image.resize(tf.cast(x, tf.float32), [res, res], method="lanczos3", antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(y), 0.0, 255.0), tf.uint8)

  x = tf.cond(side == res, lambda: x, resize)
  return tf.ensure_shape(x, [res, res, 3])


def _decode_reason(blob: bytes, resolution: int) -> str:
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  try:
    decode_image_tf(tf.constant(blob), resolution)
  except tf.errors.OpError as e:
    return e.message.strip().splitlines()[0] if e.message else type(e).__name__
  return "decoding failed"


def decode_all(enc: Encoded, resolution: int, skip_corrupt: bool = True,
               keep_pixels: bool = True, allow_none: bool = False
               ) -> tuple[np.ndarray | None, np.ndarray, dict[int, str]]:
  """Decodes every example once (tf.data, parallel).

  Returns (pixels, kept, bad): pixels (len(kept), R, R, 3) uint8 (None unless keep_pixels), the
  indices of the examples that decoded, and {index: reason} of those that did not (unreadable or
  corrupt). With skip_corrupt=False the first bad example raises a ValueError naming it; else
  each is logged (absl warning) with its name and reason. No usable example at all is an error
  unless `allow_none` (a part of a dataset).
  """
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  res = int(resolution)
  bad = dict(enc.errors)
  readable = np.asarray([i for i, b in enumerate(enc.data) if b is not None], dtype=np.int64)
  ok = np.zeros(len(enc.data), dtype=bool)
  pixels = np.empty((len(readable), res, res, 3), np.uint8) if keep_pixels else None
  if len(readable):
    blobs = pipeline.host_tensor(tf, np.asarray([enc.data[i] for i in readable], dtype=object))
    ds = tf.data.Dataset.range(len(readable))

    def dec(i):
      x = decode_image_tf(tf.gather(blobs, i), res)
      return (i, x) if keep_pixels else (i, tf.reduce_max(x))

    ds = ds.map(pipeline.as_written(tf, dec), num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=True)
    ds = ds.ignore_errors().batch(512).prefetch(2)
    for idx, x in ds.as_numpy_iterator():
      ok[readable[idx]] = True
      if keep_pixels:
        pixels[idx] = x
    for i in readable:
      if not ok[i]:
        bad[int(i)] = "corrupt: " + _decode_reason(enc.data[i], res)
    if keep_pixels:
      pixels = pixels[ok[readable]]
  kept = np.flatnonzero(ok)
  if bad:
    first = min(bad)
    if not skip_corrupt:
      raise ValueError(f"cannot use image {enc.names[first]}: {bad[first]} ({len(bad)} bad "
                       f"image(s) in {enc.origin}; set data.skip_corrupt=True to skip them)")
    for i in sorted(bad):
      logging.warning("skipping image %s: %s", enc.names[i], bad[i])
    logging.warning("skipped %d of %d images of %s as unreadable or corrupt", len(bad),
                    len(enc.data), enc.origin)
  if not len(kept) and not allow_none:
    raise ValueError(f"no usable images in {enc.origin}: all {len(enc.data)} are unreadable or "
                     "corrupt")
  return pixels, kept, bad


def load_image(path, size: int) -> np.ndarray:
  """An image file as (size, size, 3) uint8, preprocessed exactly as training images are."""
  with open(path, "rb") as f:
    return np.asarray(decode_image_tf(f.read(), size))
