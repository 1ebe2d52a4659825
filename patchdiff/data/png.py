"""Fast decoding of plain PNGs for data.cache=False: libspng, as shipped in the `pyspng` wheel.

Only PNGs that `images.decode_image_tf` passes through untouched take this path: 8-bit RGB (colour
type 2), not interlaced, exactly R x R, no tRNS chunk. For those, preprocessing is the identity on
the decoded pixels, and a lossless decode is the same array whichever library inflates it, so the
result is bit-identical to TensorFlow's. Everything else (JPEG/WebP/BMP, gray, alpha, palette,
16-bit, other sizes) and any image libspng refuses goes through `decode_image_tf` in the graph.
Corrupt files never get here: `images.decode_all` has already removed them (or failed) at build
time, with TensorFlow's decoder.

libspng is called through ctypes on the symbols of pyspng's extension module, which releases the
GIL for the duration of each decode, so the tf.data map's parallel calls decode on every core;
pyspng's own `load` holds the GIL (one core at most) and is the fallback if that binding fails its
self-test. Without pyspng, everything goes through `decode_image_tf` (logged once).
"""
from __future__ import annotations

import struct

import numpy as np
from absl import logging

ENABLED = True  # False: data.cache=False decodes every image with TensorFlow's decoder
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_SPNG_FMT_RGB8 = 4  # spng.h, enum spng_format
_SPNG_CHUNK_LIMIT = 64 << 20  # bytes of ancillary chunks libspng may store (pyspng's limit)
_SPNG_CTX_IGNORE_ADLER32 = 1  # spng.h, enum spng_ctx_flags
_SPNG_CRC_USE = 2  # spng.h, enum spng_crc_action
_SPNG: list = []  # memo of `decoder()`: empty until looked up, then [(name, fn) or None]


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


def _tiny_png(pixels: np.ndarray) -> bytes:
  """An (H, W, 3) uint8 array as a minimal PNG (for the decoder self-test)."""
  import zlib  # pylint: disable=import-outside-toplevel

  def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

  h, w = pixels.shape[:2]
  rows = b"".join(b"\x00" + pixels[r].tobytes() for r in range(h))
  return (_PNG_SIGNATURE + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
          + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def _spng_ctypes(module_file: str):
  """Batch decoder on libspng's C API in pyspng's extension module (GIL released per call).

  Chunk CRCs and the zlib Adler-32 are not verified (about 8% faster): these exact bytes have
  already been decoded by TensorFlow's libpng at build time, which verifies both.
  """
  import ctypes  # pylint: disable=import-outside-toplevel

  lib = ctypes.CDLL(module_file)
  new, free = lib.spng_ctx_new, lib.spng_ctx_free
  new.restype, new.argtypes = ctypes.c_void_p, [ctypes.c_int]
  free.restype, free.argtypes = None, [ctypes.c_void_p]
  limits, source, decode = lib.spng_set_chunk_limits, lib.spng_set_png_buffer, lib.spng_decode_image
  crc = lib.spng_set_crc_action
  limits.restype, limits.argtypes = ctypes.c_int, [ctypes.c_void_p, ctypes.c_size_t,
                                                   ctypes.c_size_t]
  crc.restype, crc.argtypes = ctypes.c_int, [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
  source.restype, source.argtypes = ctypes.c_int, [ctypes.c_void_p, ctypes.c_char_p,
                                                   ctypes.c_size_t]
  decode.restype, decode.argtypes = ctypes.c_int, [ctypes.c_void_p, ctypes.c_void_p,
                                                   ctypes.c_size_t, ctypes.c_int, ctypes.c_int]

  def run(blobs: list, usable, index: list, out: np.ndarray) -> list[int]:
    failed = []
    size = out[0].nbytes if len(out) else 0
    base = out.ctypes.data
    for m, i in enumerate(index):
      ok = False
      if usable[i]:
        ctx = new(_SPNG_CTX_IGNORE_ADLER32)
        if ctx:
          try:
            blob = blobs[i]
            ok = (limits(ctx, _SPNG_CHUNK_LIMIT, _SPNG_CHUNK_LIMIT) == 0
                  and crc(ctx, _SPNG_CRC_USE, _SPNG_CRC_USE) == 0
                  and source(ctx, blob, len(blob)) == 0
                  and decode(ctx, base + m * size, size, _SPNG_FMT_RGB8, 0) == 0)
          finally:
            free(ctx)
      if not ok:
        failed.append(m)
    return failed

  return run


def _spng_load(load):
  """Batch decoder on `pyspng.load` (holds the GIL)."""

  def run(blobs: list, usable, index: list, out: np.ndarray) -> list[int]:
    failed = []
    for m, i in enumerate(index):
      try:
        x = load(blobs[i]) if usable[i] else None
      except Exception:  # pylint: disable=broad-except  (RuntimeError from libspng)
        x = None
      if x is not None and x.shape == out.shape[1:] and x.dtype == np.uint8:
        out[m] = x
      else:
        failed.append(m)
    return failed

  return run


def decoder():
  """(name, batch decoder) of the best libspng binding that passes a self-test, or None.

  A batch decoder `fn(blobs, usable, index, out) -> failed` decodes blobs[i] for i in `index`
  (where usable[i]) into out[m] (m = position in `index`) and returns the positions it did not
  decode. Looked up once per process; a missing pyspng is logged once.
  """
  if _SPNG:
    return _SPNG[0]
  found = None
  try:
    import pyspng  # pylint: disable=import-outside-toplevel
    from pyspng import _pyspng_c  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    logging.warning("pyspng is not available (%s): data.cache=False decodes PNGs with "
                    "TensorFlow's decoder (slower; pip install pyspng)", e)
  else:
    version = getattr(pyspng, "__version__", "?")
    probe = (np.arange(5 * 4 * 3, dtype=np.uint8) * 37).reshape(5, 4, 3)
    blob = _tiny_png(probe)
    candidates = []
    try:
      candidates.append((f"libspng {_pyspng_c.spng_version_string()} (pyspng {version}, ctypes, "
                         "GIL released)", _spng_ctypes(_pyspng_c.__file__)))
    except (OSError, AttributeError) as e:
      logging.info("libspng's C API is not reachable in %s (%s)", _pyspng_c.__file__, e)
    candidates.append((f"pyspng {version} (pyspng.load, holds the GIL)", _spng_load(pyspng.load)))
    for name, fn in candidates:
      out = np.zeros((1,) + probe.shape, np.uint8)
      try:
        failed = fn([blob], [True], [0], out)
      except Exception as e:  # pylint: disable=broad-except
        failed = [repr(e)]
      if not failed and np.array_equal(out[0], probe):
        found = (name, fn)
        break
      logging.warning("PNG decoder %s failed its self-test (%s); not used", name, failed)
  _SPNG.append(found)
  return found


def decoder_name() -> str:
  """The decoder of plain R x R RGB PNGs with data.cache=False ("tensorflow" without pyspng)."""
  found = decoder() if ENABLED else None
  return found[0] if found else "tensorflow"
