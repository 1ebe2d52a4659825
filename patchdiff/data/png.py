"""Fast decoding of plain PNGs for data.cache=False: libspng through `imagecodecs`, GIL released.

Only PNGs that `images.decode_image_tf` passes through untouched take this path: 8-bit RGB (colour
type 2), not interlaced, exactly R x R, no tRNS chunk. For those, preprocessing is the identity on
the decoded pixels, and a lossless decode is the same array whichever library inflates it, so the
result is bit-identical to TensorFlow's. Everything else (JPEG/WebP/BMP, gray, alpha, palette,
16-bit, other sizes) and any image the decoder refuses goes through `decode_image_tf` in the
graph. Corrupt files never get here: `images.decode_all` has already removed them (or failed) at
build time, with TensorFlow's decoder. imagecodecs releases the GIL while it decodes, so the
tf.data map's parallel calls decode on every core. Without imagecodecs, everything goes through
`decode_image_tf` (logged once).

Measured with `python benchmarks/input_pipeline.py --seconds 4 --repeats 3 --stat median` on 2
idle cores (uncached zip, p=0.5 mix): 16,946 samples/s with this decoder; 18,151 with the ctypes
binding into pyspng's private module that it replaced (the same command at commit e27627d), which
skipped the checksum verification that imagecodecs does.
"""
from __future__ import annotations

import struct

import numpy as np
from absl import logging

ENABLED = True  # False: data.cache=False decodes every image with TensorFlow's decoder
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_DECODER: list = []  # memo of `decoder()`: empty until looked up, then [(name, fn) or None]


def plain_rgb8(blob, resolution: int) -> bool:
  """Whether `blob` is a PNG that `decode_image_tf` returns exactly as decoded (see above)."""
  if not isinstance(blob, bytes) or len(blob) < 45 or blob[:8] != _PNG_SIGNATURE:
    return False
  length, kind, w, h, depth, ctype, comp, filt, lace = struct.unpack(">I4sIIBBBBB", blob[8:29])
  if (length != 13 or kind != b"IHDR" or w != resolution or h != resolution or depth != 8
      or ctype != 2 or comp or filt or lace):
    return False
  pos = 33  # chunks up to the first IDAT: none may be tRNS (colour-key transparency)
  while pos + 8 <= len(blob):
    length, kind = struct.unpack(">I4s", blob[pos:pos + 8])
    if kind == b"IDAT":
      return True
    if kind in (b"tRNS", b"IEND"):
      return False
    pos += 12 + length
  return False


def decoder():
  """(name, batch decoder), or None where imagecodecs is missing (logged once).

  A batch decoder `fn(blobs, usable, index, out) -> failed` decodes blobs[i] for i in `index`
  (where usable[i]) into out[m] (m = position in `index`) and returns the positions it did not
  decode.
  """
  if not _DECODER:
    try:
      import imagecodecs  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      logging.warning("imagecodecs is not available (%s): data.cache=False decodes PNGs with "
                      "TensorFlow's decoder (slower; pip install imagecodecs)", e)
      _DECODER.append(None)
    else:
      def run(blobs: list, usable, index: list, out: np.ndarray) -> list[int]:
        failed = []
        for m, i in enumerate(index):
          try:
            if usable[i] and imagecodecs.spng_decode(blobs[i], out=out[m]) is not None:
              continue
          except (RuntimeError, ValueError):  # imagecodecs.SpngError, a shape it did not expect
            pass
          failed.append(m)
        return failed

      _DECODER.append((f"{imagecodecs.spng_version()} (imagecodecs {imagecodecs.__version__})",
                       run))
  return _DECODER[0]


def decoder_name() -> str:
  """The decoder of plain R x R RGB PNGs with data.cache=False ("tensorflow" without one)."""
  found = decoder() if ENABLED else None
  return found[0] if found else "tensorflow"
