"""The per-step fetch of the uncached mode (`data.cache=False`).

Cache modes (`data.cache`): True decodes every image once at build time (tf.data, parallel) into
an (N, R, R, 3) uint8 array in memory. False keeps only the encoded bytes and decodes each step's
samples: plain R x R 8-bit RGB PNGs (what dataset_tool writes) by `png.decoder()` with the GIL
released, everything else by `decode_image_tf` in the graph, the same pixels either way. The build
still decodes every image once to find corrupt files, so that no error can surface mid-training.
"""
from __future__ import annotations

import numpy as np
from absl import logging

from patchdiff.data import pipeline, png
from patchdiff.data.decode import decode_image_tf

def encoded_fetch(blobs: list[bytes], res: int):
  """The pipeline's `fetch` for data.cache=False: each step decodes its samples' images."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  found = png.decoder() if png.ENABLED else None
  usable = [png.plain_rgb8(b, res) for b in blobs] if found else []
  if not any(usable):
    return _encoded_fetch_tf(tf, blobs, res)
  name, decode = found
  logging.info("data.cache=False: %d of %d images decoded by %s, the rest by TensorFlow",
               sum(usable), len(blobs), name)
  blobs = list(blobs)  # the only copy of the encoded bytes

  def decode_step(index):
    index = index.tolist()
    out = np.empty((len(index), res, res, 3), np.uint8)
    miss = decode(blobs, usable, index, out)
    rest = np.empty(len(miss), dtype=object)
    rest[:] = [blobs[index[m]] for m in miss]
    return out, np.asarray(miss, np.int32), rest

  def fetch(d: pipeline.SampleDraws):
    full, miss, rest = tf.numpy_function(pipeline.exit_safe(decode_step), [d.index],
                                         [tf.uint8, tf.int32, tf.string], stateful=False)
    full = tf.ensure_shape(full, [None, res, res, 3])
    miss, rest = tf.ensure_shape(miss, [None]), tf.ensure_shape(rest, [None])

    def patch():  # the images the fast decoder did not take, as `decode_image_tf` has them
      x = tf.map_fn(lambda e: decode_image_tf(e, res), rest,
                    fn_output_signature=tf.TensorSpec([res, res, 3], tf.uint8),
                    parallel_iterations=4)
      return tf.tensor_scatter_nd_update(full, miss[:, None], x)

    full = tf.cond(tf.size(miss) > 0, patch, lambda: full)
    b = tf.shape(d.index)[0]
    return pipeline.crop_patches(tf, full, tf.range(b), d.offset_i, d.offset_j, d.flip,
                                 d.size, res)

  return fetch


def _encoded_fetch_tf(tf, blobs: list[bytes], res: int):
  enc = pipeline.host_tensor(tf, np.asarray(blobs, dtype=object))

  def fetch(d: pipeline.SampleDraws):
    e = tf.gather(enc, d.index)
    full = tf.map_fn(lambda x: decode_image_tf(x, res), e,
                     fn_output_signature=tf.TensorSpec([res, res, 3], tf.uint8),
                     parallel_iterations=4)
    b = tf.shape(d.index)[0]
    return pipeline.crop_patches(tf, full, tf.range(b), d.offset_i, d.offset_j, d.flip,
                                 d.size, res)

  return fetch
