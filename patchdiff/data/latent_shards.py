"""The folder of latent shards as `patchdiff.encode_latents` writes it (the format is described in
`data.latents`, its reader): spec.json claimed by the first process and checked by the others,
shards and JSON files written under temporary names and renamed whole, finished shards checked
against their shard.json, the temporary files and folders of killed processes removed, and
manifest.json written once every shard is there. Uses numpy only, no TensorFlow.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable

import numpy as np
from absl import logging

from patchdiff.data import latents as latent_files

# The spec keys a rerun must match, in the order they are checked (what was given before what
# follows from it); then any other key but the informative `vae_path`.
_SPEC_KEYS = ("format", "source", "source_fingerprint", "num_images", "labels", "resolution",
              "vae", "vae_dtype", "xla_backend_optimization_level", "shard_size", "num_shards",
              "shape", "scaling_factor")
_INFO_KEYS = ("vae_path",)
# What the source is: a mismatch in any is reported as both sources and image counts.
_SOURCE_KEYS = ("source", "source_fingerprint", "num_images")
# Keys that an older spec.json lacks; there they are not checked.
_LATER_KEYS = ("xla_backend_optimization_level",)


def _write_json(path: Path, obj: Any) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=1, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())


def _temp_name(final: Path) -> Path:
  return final.with_name(f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def publish_json(path: Path, obj: Any, replace: bool) -> None:
  """Writes `obj` to a temporary file and renames it to `path` (replace=True), or links it there
  (False: FileExistsError if `path` exists). A rerun starting meanwhile removes temporary files
  (`remove_temporary`): one gone before its rename is written again."""
  for attempt in range(3):
    tmp = _temp_name(path)
    try:
      _write_json(tmp, obj)
      (os.replace if replace else os.link)(tmp, path)
      return
    except FileNotFoundError:
      if attempt == 2 or not path.parent.is_dir():
        raise
    finally:
      if not replace:
        tmp.unlink(missing_ok=True)


def remove_temporary(out: Path) -> None:
  """Removes the temporary spec.json and manifest.json files that a killed process left."""
  for name in (latent_files.SPEC, latent_files.MANIFEST):
    for stale in out.glob(f".{name}.tmp-*"):
      stale.unlink(missing_ok=True)


def _check_spec(path: Path, found: dict[str, Any], want: dict[str, Any]) -> None:
  if any(found.get(key) != want.get(key) for key in _SOURCE_KEYS):
    same = all(found.get(key) == want.get(key) for key in ("source", "num_images"))
    raise ValueError(
        f"{path.parent} holds an encoding of {found.get('num_images')} images of "
        f"source={found.get('source')!r} ({path}), but this run has {want.get('num_images')} "
        f"images of source={want.get('source')!r}"
        + (" whose listing differs (the source changed since)" if same else "")
        + ": resume with the flags it was started with (--path, --limit, --tfds_name...), or "
        "write to another --out")
  rest = sorted(set(found) | set(want) - set(_SPEC_KEYS))
  for key in _SPEC_KEYS + tuple(rest):
    if (key in _INFO_KEYS or found.get(key) == want.get(key)
        or (key in _LATER_KEYS and key not in found)):
      continue
    hint = ""
    if key == "xla_backend_optimization_level":
      hint = (" (the level of XLA_FLAGS' --xla_backend_optimization_level, else the package's "
              "for the platform: other levels change the latents' last bits)")
    raise ValueError(f"{path.parent} holds an encoding with {key}={found.get(key)!r} "
                     f"({path}), but this run has {key}={want.get(key)!r}{hint}: resume with "
                     "the flags it was started with, or write to another --out")


def claim_spec(out: Path, spec: dict[str, Any]) -> dict[str, Any]:
  """Writes out/spec.json, or checks the one there against `spec`; returns the one there. The
  first process to link its complete file there wins; the others compare."""
  path = out / latent_files.SPEC
  spec = json.loads(json.dumps(spec))  # tuples as lists, as read back
  if not path.exists():
    try:
      publish_json(path, spec, replace=False)  # fails if the file exists: never two specs
    except FileExistsError:
      pass
  try:
    found = json.loads(path.read_text())
  except (ValueError, OSError) as e:
    raise ValueError(f"cannot read {path}: {e}") from e
  _check_spec(path, found, spec)
  return found


def write_shard(out: Path, k: int, arrays: dict[str, np.ndarray], info: dict[str, Any]) -> Path:
  """Shard k's arrays and shard.json, written into a temporary folder renamed to shard-KKKKK."""
  final = out / latent_files.shard_name(k)
  tmp = _temp_name(final)
  tmp.mkdir()
  try:
    for name, a in arrays.items():
      with open(tmp / f"{name}.npy", "wb") as f:
        np.save(f, a, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    _write_json(tmp / latent_files.SHARD_INFO, info)
    try:
      os.rename(tmp, final)
    except OSError as e:
      raise ValueError(f"{final} appeared while this process wrote it: another process encodes "
                       "the same shard (check --process_index and --process_count)") from e
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return final


def shard_done(out: Path, k: int) -> bool:
  """Whether shard k is in place (its folder, renamed whole, holds shard.json)."""
  return (out / latent_files.shard_name(k) / latent_files.SHARD_INFO).is_file()


def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
  """(shape, dtype, size in bytes the file must have) from an .npy file's header alone."""
  readers = {(1, 0): np.lib.format.read_array_header_1_0,
             (2, 0): np.lib.format.read_array_header_2_0}
  with open(path, "rb") as f:
    version = np.lib.format.read_magic(f)
    if version not in readers:
      raise ValueError(f"unknown .npy format version {version}")
    shape, _, dtype = readers[version](f)
    return shape, dtype, f.tell() + int(np.prod(shape)) * dtype.itemsize


def shard_damage(out: Path, k: int, spec: dict[str, Any]) -> str | None:
  """What is wrong with the finished shard k, or None: its shard.json must cover the spec's image
  range, and each array file hold the shape, dtype and size of the count it records. Reads the
  files' headers, not their data."""
  d = out / latent_files.shard_name(k)
  try:
    info = json.loads((d / latent_files.SHARD_INFO).read_text())
    count = int(info["count"])
  except (OSError, ValueError, KeyError, TypeError) as e:
    return f"cannot read {d / latent_files.SHARD_INFO}: {e!r}"
  size = spec["shard_size"]
  start, stop = k * size, min((k + 1) * size, spec["num_images"])
  if (info.get("start"), info.get("stop")) != (start, stop):
    return (f"{d / latent_files.SHARD_INFO} covers images [{info.get('start')}, "
            f"{info.get('stop')}), but shard {k} of {out / latent_files.SPEC} is [{start}, {stop})")
  want = dict(mean=((count, *spec["shape"]), np.float32), std=((count, *spec["shape"]), np.float32))
  if spec["labels"]:
    want["labels"] = ((count,), np.int64)
  for name, (shape, dtype) in want.items():
    path = d / f"{name}.npy"
    try:
      found, found_dtype, nbytes = _npy_header(path)
      actual = path.stat().st_size
    except (OSError, ValueError, EOFError, SyntaxError) as e:
      return f"cannot read latent shard file {path}: {e!r}"
    if found != tuple(shape) or found_dtype != np.dtype(dtype):
      return (f"latent shard file {path} holds {found_dtype} {found}, but "
              f"{d / latent_files.SHARD_INFO} says {np.dtype(dtype)} {tuple(shape)}")
    if actual != nbytes:
      return f"latent shard file {path} has {actual} bytes, its header says {nbytes}"
  return None


def write_manifest(out: Path, spec: dict[str, Any], origin: str,
            owner: Callable[[int], str]) -> dict[str, Any] | None:
  """Writes manifest.json once every shard is there (checking each against the spec); None while
  some shard is missing. `owner(k)`: which process encodes shard k, for a damaged one's error."""
  k_all = spec["num_shards"]
  if not all(shard_done(out, k) for k in range(k_all)):
    return None
  shards, skipped, total = [], {}, 0
  size = spec["shard_size"]
  for k in range(k_all):
    damage = shard_damage(out, k, spec)
    if damage is not None:
      raise ValueError(f"shard {k} is damaged: {damage}. Rerun the command ({owner(k)}): it "
                       f"encodes a damaged shard again")
    d = out / latent_files.shard_name(k)
    info = json.loads((d / latent_files.SHARD_INFO).read_text())
    start, stop = k * size, min((k + 1) * size, spec["num_images"])
    count = int(info["count"])
    shards.append(dict(name=d.name, start=start, stop=stop, count=count))
    skipped.update(info.get("skipped", {}))
    total += count
  if not total:
    raise ValueError(f"no usable images in {origin}: all {spec['num_images']} are unreadable or "
                     "corrupt")
  shape = spec["shape"]
  manifest = dict(format=latent_files.SHARDS_FORMAT, spec=spec, num_latents=total,
                  shape=list(shape), dtype="float32", layout="NCHW",
                  scaling_factor=spec["scaling_factor"], shards=shards,
                  num_skipped=len(skipped), skipped=skipped)
  publish_json(out / latent_files.MANIFEST, manifest, replace=True)
  return manifest


def prepare_slice(out: Path, shards: range, spec: dict[str, Any]) -> list[int]:
  """Readies `shards` of `out` for encoding and returns those still to encode: each finished one
  that `shard_damage` finds damaged is removed, with a warning, and the temporary folders that
  killed processes left for the shards to encode are removed."""
  for k in [k for k in shards if shard_done(out, k)]:
    damage = shard_damage(out, k, spec)
    if damage is not None:  # moved away whole, then removed: never half a shard in place
      logging.warning("shard %d is damaged (%s): encoding it again", k, damage)
      final = out / latent_files.shard_name(k)
      aside = _temp_name(final)
      os.rename(final, aside)
      shutil.rmtree(aside)
  todo = [k for k in shards if not shard_done(out, k)]
  for k in todo:  # temporary folders of a killed run
    for stale in out.glob(f".{latent_files.shard_name(k)}.tmp-*"):
      shutil.rmtree(stale, ignore_errors=True)
  return todo


def slice_totals(out: Path, shards: range) -> tuple[int, dict[str, str]]:
  """(latents, {name: reason} of the skipped images) of the finished `shards`, from their
  shard.json files."""
  infos = [json.loads((out / latent_files.shard_name(k) / latent_files.SHARD_INFO).read_text())
           for k in shards]
  total = sum(int(i["count"]) for i in infos)
  skipped = {name: why for i in infos for name, why in i["skipped"].items()}
  return total, skipped
