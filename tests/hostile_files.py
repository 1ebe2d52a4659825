"""Hostile weight files, one small file per class of attack the reader refuses (`corpus`), and a
fuzzer's mutations of real files (`mutate`). Run as a script, it reads every file in a folder
through `files.read_state_dict` under an address-space limit and prints, per file, the
outcome, the seconds and the added peak memory as JSON (test_hostile.py runs it):

  python tests/hostile_files.py DIR [FUZZ_SOURCE ...] --seeds N [--first SEED]

Each corpus file is written here from its opcodes and zip records (`zip_bytes` writes any record
headers, duplicate names, flags and sizes included), never by torch.
"""
from __future__ import annotations

import base64
import functools
import json
import random
import struct
import sys
import zlib
from typing import NamedTuple

import numpy as np

from torch_archive import Call, Script, Shared, Storage, Tensor, View, dumps, legacy_save, records

MIB = 1 << 20
STORED, DEFLATED, BZIP2, LZMA = 0, 8, 12, 14
# bz2.compress(bytes(256 * MIB), 9): 208 bytes that inflate to 256 MiB of zeros (compressing
# them takes seconds, so the result is kept here).
BZIP2_256MIB = base64.b64decode(
    "QlpoOTFBWSZTWQ4J4t8BX45AAMAAAAggADCATUZCoCWpCoCXMUFZJlNZDgni3wFfjkAAwAAACCAAMIBNRkKgJakK"
    "gJcxQVkmU1kOCeLfAV+OQADAAAAIIAAwgE1GQqAlqQqAlzFBWSZTWQ4J4t8BX45AAMAAAAggADCATUZCoCWpCoCX"
    "MUFZJlNZDgni3wFfjkAAwAAACCAAMIBNRkKgJakKgJcxQVkmU1kezuTbASo/wADABAAIIAAwzAUppqqoSRsAIkjx"
    "dyRThQkGsXyvAA==")


class Record(NamedTuple):
  """A zip record as `zip_bytes` writes it: `data` as stored (compressed already where `method`
  says so); `file_size` and `crc` as the headers declare them; `flags` the general-purpose bits."""
  name: str
  data: bytes
  method: int = STORED
  file_size: int | None = None  # default len(data)
  crc: int | None = None  # default crc32(data)
  flags: int = 0
  compress_size: int | None = None  # default len(data)


def zip_bytes(recs: list[Record]) -> bytes:
  """A zip archive of `recs`, headers exactly as given (no zip64, no data descriptors)."""
  out, central = [], []
  at = 0
  for r in recs:
    name = r.name.encode()
    size = len(r.data) if r.file_size is None else r.file_size
    crc = zlib.crc32(r.data) if r.crc is None else r.crc
    packed = len(r.data) if r.compress_size is None else r.compress_size
    local = struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, r.flags, r.method, 0, 33, crc,
                        packed, size, len(name), 0) + name
    central.append(struct.pack("<4s4B4HL2L5H2L", b"PK\x01\x02", 20, 0, 20, 0, r.flags, r.method,
                               0, 33, crc, packed, size, len(name), 0, 0, 0, 0, 0, at) + name)
    out += [local, r.data]
    at += len(local) + len(r.data)
  directory = b"".join(central)
  end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(recs), len(recs), len(directory), at, 0)
  return b"".join(out) + directory + end


def _archive(obj, extra: list[Record] = (), replace: dict[str, Record] | None = None,
             numel: tuple[bytes, bytes] | None = None) -> bytes:
  """A torch zip archive of `obj` (`torch_archive.records`), with records replaced or added,
  and in data.pkl the opcodes `numel[0]` replaced by `numel[1]`."""
  recs = [Record(n, d.replace(*numel) if numel and n.endswith("data.pkl") else d)
          for n, d in records(obj).items()]
  recs = [(replace or {}).get(r.name, r) for r in recs]
  return zip_bytes(recs + list(extra))


def _deflated_zeros(mib: int) -> tuple[bytes, int]:
  """Raw deflate data that inflates to `mib` MiB of zeros (one full-flushed MiB repeated), and
  its CRC-32."""
  co = zlib.compressobj(9, zlib.DEFLATED, -15)
  piece = co.compress(bytes(MIB)) + co.flush(zlib.Z_FULL_FLUSH)
  crc = 0
  for _ in range(mib):
    crc = zlib.crc32(bytes(MIB), crc)
  return piece * mib + b"\x03\x00", crc


def _tensor_ops(array: np.ndarray) -> tuple[bytes, dict[str, np.ndarray]]:
  """The opcodes of one tensor (no PROTO, no STOP) and its storages."""
  pkl, storages = dumps(array)
  return pkl[2:-1], storages


def _colliding_pairs(count: int) -> list[tuple[int, int]]:
  """`count` pairs (a, b) of integers below 2**61 whose tuples share one hash (CPython's 64-bit
  xxHash-based tuple hash; such integers hash to themselves)."""
  mask, p1, p2, p5 = (1 << 64) - 1, 11400714785074694791, 14029467366897019727, \
      2870177450012600261
  rotl = lambda x: ((x << 31) | (x >> 33)) & mask  # noqa: E731
  rotr = lambda x: ((x >> 31) | (x << 33)) & mask  # noqa: E731
  target = (1234567 - (2 ^ (p5 ^ 3527539))) & mask  # the accumulator before the length is added
  want = rotr(target * pow(p1, -1, 1 << 64) & mask)
  inv_p2 = pow(p2, -1, 1 << 64)
  pairs, a = [], 1
  while len(pairs) < count:
    acc = rotl((p5 + a * p2) & mask) * p1 & mask
    b = (want - acc) * inv_p2 & mask
    if b < sys.hash_info.modulus:
      pairs.append((a, b))
    a += 1
  assert len({hash(t) for t in pairs[:64]}) == 1, "not CPython's 64-bit tuple hash"
  return pairs


class Case(NamedTuple):
  """A corpus file: its name, the attack, what the refusal says (None: it reads, as `reads`)."""
  name: str
  attack: str
  expect: str | None
  data: bytes
  reads: tuple[str, ...] = ()


@functools.cache
def corpus() -> tuple[Case, ...]:
  """One small file per class of hostile file."""
  f32 = np.float32
  cases = []

  def case(name, attack, expect, data, reads=()):
    cases.append(Case(name, attack, expect, data, tuple(reads)))

  # --- Memory.
  case("zero_stride.pt", "one element viewed with zero strides as an (8192, 16384) tensor",
       "has 134217728 elements; its storage",
       _archive({"w": Tensor(np.zeros(1, f32), 0, (8192, 16384), (0, 0))}))
  full = Tensor(np.zeros(240_000, f32), 0, (240_000,), (1,), key="s")
  case("full_views.pt", "one 960 KB storage with 256 full views (245 MB of copies)",
       "would bring the tensors' copies to", _archive({f"v{i}": full for i in range(256)}))
  # The storage's element count in its persistent id, 4, made 2**26 (256 MiB of float32).
  case("bzip2_storage.pt", "a bzip2 storage record that inflates to 256 MiB",
       "is compressed with bzip2", _archive(
           {"w": Tensor(np.zeros(4, f32), 0, (4,), (1,))}, replace={"archive/data/0": Record(
               "archive/data/0", BZIP2_256MIB, BZIP2, 256 * MIB)},
           numel=(b"J\x04\x00\x00\x00tQ", b"J\x00\x00\x00\x04tQ")))
  zeros, crc = _deflated_zeros(256)
  case("deflate_storage.pt", "a deflated storage record of 256 MiB for a 16-byte storage",
       "holds 268435456 bytes; its reference declares 16", _archive(
           {"w": np.zeros(4, f32)}, replace={"archive/data/0": Record(
               "archive/data/0", zeros, DEFLATED, 256 * MIB, crc)}))
  case("deflate_lying_size.pt", "a deflated storage record that says 16 bytes and inflates to "
       "256 MiB", "archive/data/0 is damaged", _archive(
           {"w": np.zeros(4, f32)}, replace={"archive/data/0": Record(
               "archive/data/0", zeros, DEFLATED, 16, crc)}))
  case("deflate_pickle.pt", "a deflated data.pkl that inflates to 256 MiB",
       "holds 268435456 bytes (at most", _archive(
           {"w": np.zeros(4, f32)}, replace={"archive/data.pkl": Record(
               "archive/data.pkl", zeros, DEFLATED, 256 * MIB, crc)}))
  # The storage's element count in its persistent id, 1, made 2**28 (1 GiB of float32).
  case("stored_beyond_file.pt", "a stored 1 GiB storage record in a 1 KB file",
       "beyond the file's", _archive(
           {"w": Tensor(np.zeros(1, f32), 0, (1,), (1,))}, replace={"archive/data/0": Record(
               "archive/data/0", bytes(4), file_size=1 << 30, compress_size=1 << 30)},
           numel=(b"J\x01\x00\x00\x00tQ", b"J\x00\x00\x00\x10tQ")))
  case("memo_index.pkl", "a LONG_BINPUT index of 2**25 (CPython zero-fills its memo to it)",
       "memo index 33554432 is beyond its 4 opcodes",
       b"\x80\x02Nr" + struct.pack("<I", 1 << 25) + b".")
  inner = io_zip({"archive/data.pkl": dumps(Storage(np.zeros(4 * MIB, f32)))[0]},
                 {"archive/data/0": bytes(16 * MIB)})
  shared = Shared(inner)
  case("load_from_bytes_memo.pkl", "a deflated storage archive (16 MiB) kept in the memo and "
       "passed 16 times to _load_from_bytes", "the same bytes twice",
       dumps({"ema": {f"w{i}": View(Call("torch.storage", "_load_from_bytes", (shared,)), 0,
                                    (4,), (1,)) for i in range(16)}})[0])
  case("set_bomb.pkl", "a 1 MB pickle of empty sets (240 bytes each)",
       "its objects would take more than", b"\x80\x02](" + b"\x8f" * 1_000_000 + b"e.")
  case("long_length.pkl", "a BINBYTES8 that declares 2**40 bytes",
       "not a readable pickle", b"\x80\x04\x8e" + struct.pack("<Q", 1 << 40) + b"x.")
  case("ext_opcode.pkl", "EXT2, a global by the extension registry (bypasses find_class)",
       "extension registry", b"\x80\x02\x83\x01\x00.")

  # --- Time.
  level = Shared([np.zeros(1, f32)])
  for _ in range(20):
    level = Shared([level, level])
  case("dag_lists.pt", "a DAG of lists 20 deep (1,048,576 state-dict paths)",
       "shared containers reached by many paths", _archive({"x": level}))
  wide = Shared([np.zeros(1, f32)] + [0] * 190_000)
  for _ in range(20):
    wide = Shared([wide, wide])
  case("dag_wide_lists.pt", "a list of 190,001 entries at the bottom of a DAG 20 deep",
       "shared containers reached by many paths", _archive({"x": wide}))
  leaf = legacy_save(Storage(np.zeros(1, f32)))
  fan = legacy_save({f"s{i}": Call("torch.storage", "_load_from_bytes", (leaf,))
                     for i in range(10)})
  case("load_from_bytes_fanout.pkl", "_load_from_bytes fanned out 10 per level",
       "inside storage bytes", dumps({"ema": [Call("torch.storage", "_load_from_bytes", (fan,))
                                              for _ in range(10)]})[0])
  dag = ()
  for _ in range(40):
    dag = Shared((dag, dag))
  case("numpy_dtype_dag.pkl", "numpy.dtype given a tuple whose repr is 2**40 items long",
       "is not read: only plain numeric", dumps({"ema": Call("numpy", "dtype", (dag,))})[0])
  net = Call("torch_utils.persistence", "_reconstruct_persistent_obj", ({
      "type": "class", "version": 6, "module_src": "", "class_name": "EDMPrecond", "state": {
          "_parameters": {"w": View(Call("torch.storage", "_load_from_bytes", (leaf,)), 0,
                                    (1,), (1,))}, "_buffers": {}, "_modules": {},
          "_init_kwargs": {"channel_mult": dag, "img_resolution": 64}, "label_dim": dag}},))
  case("snapshot_kwargs_dag.pkl", "a network snapshot whose init kwargs and attributes hold a "
       "tuple whose copy has 2**40 items", None, dumps({"ema": net})[0], reads=("w",))
  pairs = _colliding_pairs(8192)
  keys = b"".join(b"\x8a\x08" + struct.pack("<q", a) + b"\x8a\x08" + struct.pack("<q", b)
                  + b"\x86N" for a, b in pairs)
  case("hash_collision.pkl", "a dict of 8192 tuple keys that share one hash (quadratic insertion)",
       "keys whose hashes a file can make collide", b"\x80\x02}(" + keys + b"u.")
  depth = 200_000
  case("deep_tuple_key.pkl", f"a dict key nested {depth} tuples deep (hashing it overflows "
       "CPython's C stack)", "a dict or set key is a tuple nested",
       b"\x80\x02}" + b")" + b"\x85" * depth + b"Ns.")

  # --- Read wrong without a word.
  case("same_name.pt", 'two tensors under one name: {"a.b": t1, "a": {"b": t2}}',
       "two tensors are named 'a.b'",
       _archive({"a.b": np.zeros(2, f32), "a": {"b": np.ones(2, f32)}}))
  seq = "torch.nn.modules.container.Sequential"
  case("param_and_submodule.pt", "a parameter x.weight next to a submodule x",
       "two tensors are named 'x.weight'", _archive(Script(seq, {
           "_parameters": {"x.weight": np.zeros(2, f32)}, "_buffers": {}, "_modules": {
               "x": Script(seq, {"_parameters": {"weight": np.ones(2, f32)}, "_buffers": {},
                                 "_modules": {}})}})))
  recs = [Record(n, d) for n, d in records({"w": np.zeros(2, f32)}).items()]
  case("duplicate_records.pt", "two zip records named archive/data/0", "appears twice",
       zip_bytes(recs + [Record("archive/data/0", np.ones(2, f32).tobytes())]))
  case("non_string_key.pt", "a tensor under an integer key", "is under a key of type int",
       _archive({"a": np.zeros(2, f32), 7: np.ones(2, f32)}))

  # --- Errors that did not name the file.
  case("encrypted_record.pt", "an encrypted record", "archive/data/0 is encrypted",
       zip_bytes([r._replace(flags=1) if r.name == "archive/data/0" else r for r in recs]))
  case("corrupt_deflate.pt", "corrupt deflate data", "archive/data/0 is damaged",
       zip_bytes([r._replace(data=b"\xff" * 8, method=DEFLATED, file_size=8)
                  if r.name == "archive/data/0" else r for r in recs]))
  case("lzma_record.pt", "an LZMA record (corrupt)", "is compressed with LZMA",
       zip_bytes([r._replace(data=b"\x00" * 8, method=LZMA, file_size=8)
                  if r.name == "archive/data/0" else r for r in recs]))
  ops, storages = _tensor_ops(np.zeros(2, f32))
  nested = b"\x80\x02" + b"]" * 100_000 + ops + b"a" * 100_000 + b"."
  case("nested_lists.pt", "a tensor under 100,000 nested lists", "containers nest deeper than",
       io_zip({"archive/data.pkl": nested}, {f"archive/data/{k}": v.tobytes()
                                             for k, v in storages.items()}, method=STORED))
  attrs = {"w": np.zeros(2, f32)}
  pkl, storages = dumps(attrs)
  # An OrderedDict given the attribute `items` by BUILD: dropped, the dict reads as it is.
  od = (b"\x80\x02ccollections\nOrderedDict\n)R" + pkl[3:-1] + b"}X\x05\x00\x00\x00itemsK\x05sb.")
  case("ordered_dict_attributes.pt", "an OrderedDict given the attribute `items` by BUILD",
       None, io_zip({"archive/data.pkl": od}, {f"archive/data/{k}": v.tobytes()
                                               for k, v in storages.items()}, method=STORED),
       reads=("w",))
  bad = od.replace(b"}X\x05\x00\x00\x00itemsK\x05sb.", b"]K\x05ab.")
  case("ordered_dict_bad_state.pt", "an OrderedDict given a list as its state by BUILD",
       "the state of an OrderedDict is a list", io_zip(
           {"archive/data.pkl": bad}, {f"archive/data/{k}": v.tobytes()
                                       for k, v in storages.items()}, method=STORED))
  legacy = legacy_save({"w": np.zeros(2, f32)})
  case("legacy_trailing.pth", "a legacy storage with more payload than it declares",
       "bytes follow the last storage", legacy + bytes(1000))
  return tuple(cases)


def io_zip(first: dict[str, bytes], rest: dict[str, bytes], method: int = DEFLATED) -> bytes:
  """A zip archive (`zipfile`) of `first` stored and `rest` compressed with `method`."""
  import io  # pylint: disable=import-outside-toplevel
  import zipfile  # pylint: disable=import-outside-toplevel
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, "w") as z:
    for name, data in first.items():
      z.writestr(name, data, compress_type=zipfile.ZIP_STORED)
    for name, data in rest.items():
      z.writestr(name, data, compress_type=method)
  return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# The fuzzer.

# Opcode runs spliced into pickles: memo and stack abuse, huge lengths, deep nesting, globals.
SPLICES = [b"r\x00\x00\x00\x02", b"h\xff", b"j\xff\xff\xff\x7f", b"\x83\x01\x00", b"2" * 64,
           b"(" * 64, b"t" * 8, b"\x8e" + struct.pack("<Q", 1 << 40), b"B\xff\xff\xff\x7f",
           b"\x8f" * 256, b"\x85" * 256, b"cos\nsystem\n", b"\x93", b"R", b"b", b"s", b"u",
           b"e", b"0", b"1", b"N", b"}", b"]", b")", b"\x94", b".", b"\x95" + bytes(8)]


def mutate(data: bytes, seed: int) -> bytes:
  """`data` with one to three of: flipped bytes, a truncation, a spliced opcode run, a copied
  chunk; chosen by `seed`."""
  rng = random.Random(seed)
  out = bytearray(data)
  for _ in range(rng.randint(1, 3)):
    kind = rng.choice(("flip", "flip", "truncate", "splice", "splice", "chunk"))
    at = rng.randrange(len(out)) if out else 0
    if rng.random() < 0.5:  # the pickles' opcodes lie near the start or between payloads
      at = min(at, rng.randrange(min(len(out), 4096)) if out else 0)
    if kind == "flip":
      for _ in range(rng.randint(1, 8)):
        out[rng.randrange(len(out))] ^= rng.randrange(1, 256)
    elif kind == "truncate":
      del out[at:]
    elif kind == "splice":
      out[at:at] = rng.choice(SPLICES)
    else:
      start = rng.randrange(len(out))
      out[at:at] = out[start:start + rng.randint(1, 256)]
    if not out:
      out = bytearray(b"\x80")
  return bytes(out)


# ---------------------------------------------------------------------------------------------
# The reader's side, in its own process.


def _memory_mb(field: str) -> float:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1]) / 1024
  raise KeyError(field)


def _reset_peak() -> None:
  """Returns freed heap memory to the system (so that the next read's allocations show), then
  resets the peak resident size to the current one."""
  import ctypes  # pylint: disable=import-outside-toplevel
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):  # not glibc
    pass
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # VmHWM := VmRSS


def _read_one(path: str) -> dict:
  """Reads `path` by `files.read_state_dict`: outcome, seconds, added peak MB."""
  import gc  # pylint: disable=import-outside-toplevel
  import time  # pylint: disable=import-outside-toplevel
  from patchdiff.weights import files  # pylint: disable=import-outside-toplevel
  gc.collect()  # fast: the imports' objects are frozen (see `main`)
  _reset_peak()
  base = _memory_mb("VmRSS")
  start = time.perf_counter()
  got = None
  try:
    got = files.read_state_dict(path)
    ok = isinstance(got, dict) and all(isinstance(k, str) and isinstance(v, np.ndarray)
                                       for k, v in got.items())
    outcome = {"error": None, "names": sorted(got)[:8] if ok else None, "ok": ok}
  except Exception as e:  # pylint: disable=broad-except  (reported, and checked by the test)
    outcome = {"error": type(e).__name__, "message": str(e)[:600]}
  outcome["seconds"] = time.perf_counter() - start
  del got
  outcome["added_mb"] = _memory_mb("VmHWM") - base
  return outcome


def main(argv: list[str]) -> None:
  import os  # pylint: disable=import-outside-toplevel
  import resource  # pylint: disable=import-outside-toplevel
  import time  # pylint: disable=import-outside-toplevel
  options = {k: int(argv[argv.index(k) + 1]) if k in argv else 0 for k in ("--seeds", "--first")}
  args = [a for i, a in enumerate(argv) if a not in options and argv[i - 1] not in options]
  folder, sources = args[0], args[1:]
  import gc  # pylint: disable=import-outside-toplevel
  start = time.perf_counter()
  # The reader's imports (jax, flax) before the limit and the measurements.
  from patchdiff.weights import files  # noqa: F401  pylint: disable=import-outside-toplevel,W0611
  gc.collect()
  gc.freeze()  # later collections skip the imports' objects
  imports = time.perf_counter() - start
  limit = int((_memory_mb("VmSize") + 1024) * MIB)  # 1 GiB over what the imports mapped
  resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
  report = {"corpus": {}, "fuzz": [], "limit_mb": limit / MIB, "import_seconds": imports}
  start = time.perf_counter()
  for name in sorted(os.listdir(folder)):
    report["corpus"][name] = _read_one(os.path.join(folder, name))
  report["corpus_seconds"] = time.perf_counter() - start
  start = time.perf_counter()
  originals = [open(s, "rb").read() for s in sources]
  for seed in range(options["--first"], options["--first"] + options["--seeds"]):
    source = sources[seed % len(sources)]
    path = os.path.join(folder, f"fuzz-{seed}{os.path.splitext(source)[1]}")
    with open(path, "wb") as f:
      f.write(mutate(originals[seed % len(sources)], seed))
    outcome = _read_one(path)
    os.remove(path)
    report["fuzz"].append({"seed": seed, "source": os.path.basename(source), "path": path,
                           **outcome})
  report["fuzz_seconds"] = time.perf_counter() - start
  json.dump(report, sys.stdout)


if __name__ == "__main__":
  main(sys.argv[1:])
