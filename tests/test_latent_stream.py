"""The streaming latent encoder (`patchdiff.encode_latents`): shards, resuming, several processes,
and the latent source reading its folder memory-mapped. A tiny VAE on 16 px images (4x4 latents)."""
import io
import json
import logging
import shutil
import zipfile

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from patchdiff import data, encode_latents, patches
from patchdiff.data import decode, latent_shards, latents, sources
from patchdiff.nn import vae

RES = 16
N = 20
CORRUPT = (5, 11)
KW = dict(batch=4, chunk=3, shard_size=5)  # 4 shards of 5 source images, chunks of 3, 2, 3, ...


@pytest.fixture(scope="module")
def image_zip(tmp_path_factory):
  """A dataset_tool zip of N labelled 16x16 PNGs, two of them corrupt."""
  rng = np.random.default_rng(1)
  path = tmp_path_factory.mktemp("images") / "ds.zip"
  names = [f"00000/img{i:08d}.png" for i in range(N)]
  with zipfile.ZipFile(path, "w") as zf:
    for i, name in enumerate(names):
      if i in CORRUPT:
        zf.writestr(name, b"\x89PNG\r\n\x1a\n truncated")
        continue
      buf = io.BytesIO()
      Image.fromarray(rng.integers(0, 256, (RES, RES, 3), dtype=np.uint8)).save(buf, "PNG")
      zf.writestr(name, buf.getvalue())
    zf.writestr("dataset.json", json.dumps({"labels": [[n, i % 3] for i, n in enumerate(names)]}))
  return path


def config(path, labels: bool = True):
  return dict(source="zip", path=str(path), resolution=RES, labels=labels)


def read(out):
  mean, std, labels, manifest = latents.read_shards(out)
  return np.asarray(mean), np.asarray(std), labels, manifest


@pytest.fixture(scope="module")
def encoded(vae_dir, image_zip, tmp_path_factory):
  """One uninterrupted single-process run: (folder, summary)."""
  out = tmp_path_factory.mktemp("enc") / "latents"
  return out, encode_latents.encode_dataset(config(image_zip), str(vae_dir), str(out), **KW)


def test_streaming_equals_in_memory_encoding(encoded, vae_dir, image_zip):
  out, summary = encoded
  assert summary["complete"] and summary["num_shards"] == 4 and summary["shards_written"] == 4
  assert summary["num_images"] == N - len(CORRUPT) and summary["shape"] == (18, 4, 4, 4)
  assert sorted(summary["skipped"]) == [f"{image_zip}:00000/img{i:08d}.png" for i in CORRUPT]
  assert sorted(p.name for p in out.iterdir()) == [
      "manifest.json", "shard-00000", "shard-00001", "shard-00002", "shard-00003", "spec.json"]
  mean, std, labels, manifest = read(out)
  assert [s["count"] for s in manifest["shards"]] == [5, 4, 4, 5]
  assert manifest["num_latents"] == 18 and manifest["shape"] == [4, 4, 4]
  assert manifest["dtype"] == "float32" and manifest["scaling_factor"] == pytest.approx(0.18215)
  np.testing.assert_array_equal(labels, np.delete(np.arange(N) % 3, CORRUPT))
  # The whole dataset decoded in memory and encoded in batches of the same size (what the
  # encoder did before it streamed): the same bits.
  model = vae.load_vae(vae_dir)
  pixels, kept, _ = decode.decode_all(sources.scan_zip(image_zip), RES)
  assert list(kept) == [i for i in range(N) if i not in CORRUPT]
  encode, b = vae.encode_fn(model), KW["batch"]
  ref_mean, ref_std = [], []
  for s in range(0, len(pixels), b):
    x = pixels[s:s + b]
    x = np.concatenate([x, np.zeros((b - len(x), RES, RES, 3), np.uint8)])
    m, sd = encode(jnp.asarray(x, jnp.float32) / 127.5 - 1.0)
    ref_mean.append(np.asarray(model.scaling_factor * m)[:len(pixels) - s])
    ref_std.append(np.asarray(model.scaling_factor * sd)[:len(pixels) - s])
  np.testing.assert_array_equal(mean, np.concatenate(ref_mean).transpose(0, 3, 1, 2))
  np.testing.assert_array_equal(std, np.concatenate(ref_std).transpose(0, 3, 1, 2))


def test_interrupted_run_leaves_whole_shards_and_resumes(encoded, vae_dir, image_zip, tmp_path,
                                                         monkeypatch):
  out = tmp_path / "latents"

  def stop_after(k):
    if k == 1:
      raise KeyboardInterrupt("stopped after shard 1")

  with pytest.raises(KeyboardInterrupt):
    encode_latents.encode_dataset(config(image_zip), str(vae_dir), str(out), on_shard=stop_after,
                                  **KW)
  assert sorted(p.name for p in out.iterdir()) == ["shard-00000", "shard-00001", "spec.json"]
  with pytest.raises(ValueError, match=r"no manifest.json: its encoding is unfinished \(2 of 4 "
                                       r"shards written\)"):
    latents.load_latents(out, RES // 4)
  # Interrupted in the middle of shard 2 (its second chunk fails to decode): nothing of it.
  real, calls = decode.decode_all, []

  def failing(*args, **kw):
    calls.append(1)
    if len(calls) == 2:
      raise RuntimeError("interrupted while decoding")
    return real(*args, **kw)

  monkeypatch.setattr(decode, "decode_all", failing)
  with pytest.raises(RuntimeError, match="interrupted while decoding"):
    encode_latents.encode_dataset(config(image_zip), str(vae_dir), str(out), **KW)
  monkeypatch.setattr(decode, "decode_all", real)
  assert sorted(p.name for p in out.iterdir()) == ["shard-00000", "shard-00001", "spec.json"]
  # A process killed while writing shard 3 leaves its temporary folder: the rerun removes it.
  stale = out / ".shard-00003.tmp-999-dead"
  stale.mkdir()
  (stale / "mean.npy").write_bytes(b"half")
  resumed = encode_latents.encode_dataset(config(image_zip), str(vae_dir), str(out), **KW)
  assert resumed["complete"] and (resumed["shards_resumed"], resumed["shards_written"]) == (2, 2)
  assert not stale.exists()
  for a, b in zip(read(out)[:3], read(encoded[0])[:3]):
    np.testing.assert_array_equal(a, b)
  # Rerunning a finished encoding writes nothing.
  again = encode_latents.encode_dataset(config(image_zip), str(vae_dir), str(out), **KW)
  assert (again["shards_resumed"], again["shards_written"], again["num_images"]) == (4, 0, 18)


def test_two_processes_write_disjoint_slices(encoded, vae_dir, image_zip, tmp_path):
  out = tmp_path / "latents"
  second = encode_latents.encode_dataset(config(image_zip), str(vae_dir), str(out),
                                         process_index=1, process_count=2, **KW)
  assert not second["complete"] and second["shards_written"] == 2
  assert sorted(p.name for p in out.glob("shard-*")) == ["shard-00002", "shard-00003"]
  assert second["num_images"] == 9 and list(second["skipped"]) == [f"{image_zip}:00000/img"
                                                                   "00000011.png"]
  first = encode_latents.encode_dataset(config(image_zip), str(vae_dir), str(out),
                                        process_index=0, process_count=2, **KW)
  assert first["complete"] and first["shards_written"] == 2 and first["num_images"] == 18
  for a, b in zip(read(out)[:3], read(encoded[0])[:3]):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match=r"process_index=2 must lie in \[0, process_count=2\)"):
    encode_latents.encode_dataset(config(image_zip), str(vae_dir), str(out), process_index=2,
                                  process_count=2, **KW)


def test_latent_source_reads_shards_memory_mapped(encoded, tmp_path):
  out, _ = encoded
  lat = latents.load_latents(out, RES // 4, use_labels=True, scale=0.18215)
  assert isinstance(lat.mean, latents.ShardedArray) and len(lat.mean.parts) == 4
  assert all(isinstance(p, np.memmap) for p in lat.mean.parts + lat.std.parts)
  mean, std, labels, _ = read(out)
  index = np.asarray([17, 0, 4, 5, 9, 13, 17, 2])
  np.testing.assert_array_equal(lat.mean[index], mean[index])
  np.testing.assert_array_equal(lat.std[3:11][np.arange(8)], std[3:11])
  # Training input from the folder = from the same arrays in one .npz (the single-file format).
  np.savez(tmp_path / "one.npz", mean=mean, std=std, labels=labels,
           scaling_factor=np.float32(0.18215))
  schedule = patches.PatchSchedule(sizes=(2, 4), probs=(0.5, 0.5), resolution=4, seed=0)
  cfg = dict(source="latents", path=str(out), resolution=4, labels=True, hflip=True,
             latent_scale=0.18215)

  def batches(c):
    it = data.build_input(c, schedule, 4, 5, seed=3, label_dim=3, channels=4)
    return [next(it) for _ in range(5)]

  ours = batches(dict(cfg, cache=False))
  for other in (batches(dict(cfg, path=str(tmp_path / "one.npz"), cache=False)),
                batches(dict(cfg, cache=True))):
    for a, b in zip(ours, other):
      assert a.keys() == b.keys()
      for key in a:
        np.testing.assert_array_equal(a[key], b[key])
  with pytest.raises(ValueError, match=r"latents scaled by 0\.18215.*latent_scale is 0\.13025"):
    latents.load_latents(out, 4, scale=0.13025)
  with pytest.raises(ValueError, match="holds NCHW latents.*latent_layout is 'NHWC'"):
    latents.load_latents(out, 4, layout="NHWC")


def test_damaged_shards_are_errors_naming_the_file(encoded, tmp_path):
  out = tmp_path / "latents"
  shutil.copytree(encoded[0], out)
  latents.load_latents(out, 4, use_labels=True)
  missing = out / "shard-00001" / "std.npy"
  missing.unlink()
  with pytest.raises(ValueError, match=f"latent shard file {missing} is missing"):
    latents.load_latents(out, 4)
  shutil.copy(encoded[0] / "shard-00001" / "std.npy", missing)
  truncated = out / "shard-00002" / "mean.npy"
  truncated.write_bytes(truncated.read_bytes()[:-100])
  for cache in (False, True):
    with pytest.raises(ValueError, match=f"cannot read latent shard file {truncated}"):
      latents.load_latents(out, 4, cache=cache)
  np.save(truncated, np.zeros((3, 4, 4, 4), np.float32))
  with pytest.raises(ValueError, match=rf"latent shard file {truncated} holds float32 "
                                       r"\(3, 4, 4, 4\), but .*manifest.json says float32 "
                                       r"\(4, 4, 4, 4\)"):
    latents.load_latents(out, 4)
  shutil.rmtree(out / "shard-00002")
  with pytest.raises(ValueError, match=f"latent shard file {truncated} is missing"):
    latents.load_latents(out, 4)


def test_mismatched_rerun_is_an_error(encoded, vae_dir, image_zip, tmp_path, monkeypatch):
  out, _ = encoded
  spec = out / "spec.json"
  before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
  with pytest.raises(ValueError, match=rf"holds an encoding with shard_size=5 \({spec}\), but "
                                       "this run has shard_size=4"):
    encode_latents.encode_dataset(config(image_zip), str(vae_dir), str(out),
                                  **dict(KW, shard_size=4))
  with pytest.raises(ValueError, match="with labels=True .* has labels=False"):
    encode_latents.encode_dataset(config(image_zip, labels=False), str(vae_dir), str(out), **KW)
  other_zip = tmp_path / "other.zip"
  shutil.copy(image_zip, other_zip)
  with pytest.raises(ValueError, match=f"holds an encoding of 20 images of source='zip:"
                                       f"{image_zip}' .*, but this run has 20 images of "
                                       f"source='zip:{other_zip}': resume"):
    encode_latents.encode_dataset(config(other_zip), str(vae_dir), str(out), **KW)
  # Another --limit: the counts differ (and the fingerprints, which the message leaves out).
  with pytest.raises(ValueError, match=rf"holds an encoding of 20 images of source='zip:"
                                       rf"{image_zip}' \({spec}\), but this run has 12 images "
                                       rf"of source='zip:{image_zip}': resume with the flags it "
                                       r"was started with \(--path, --limit"):
    encode_latents.encode_dataset(dict(config(image_zip), limit=12), str(vae_dir), str(out),
                                  **KW)
  # Another compile level: other last bits.
  monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=2")
  with pytest.raises(ValueError, match=r"with xla_backend_optimization_level=0 .* this run has "
                                       r"xla_backend_optimization_level=2 \(the level of "
                                       r"XLA_FLAGS'"):
    encode_latents.encode_dataset(config(image_zip), str(vae_dir), str(out), **KW)
  monkeypatch.undo()
  # The same VAE elsewhere is the same VAE; other weights are not.
  moved = tmp_path / "vae"
  shutil.copytree(vae_dir, moved)
  encode_latents.encode_dataset(config(image_zip), str(moved), str(out), **KW)
  from safetensors.numpy import load_file, save_file  # pylint: disable=import-outside-toplevel
  weights = load_file(str(moved / "diffusion_pytorch_model.safetensors"))
  weights["encoder.conv_in.bias"] = weights["encoder.conv_in.bias"] + 1
  save_file(weights, str(moved / "diffusion_pytorch_model.safetensors"))
  with pytest.raises(ValueError, match=r"with vae='[0-9a-f]{64}'.*this run has vae='[0-9a-f]{64}'"):
    encode_latents.encode_dataset(config(image_zip), str(moved), str(out), **KW)
  with pytest.raises(ValueError, match="written as a folder of shards, named without a suffix"):
    encode_latents.encode_dataset(config(image_zip), str(vae_dir), str(tmp_path / "x.npz"), **KW)
  # Nothing in the folder changed but manifest.json (rewritten by the matching rerun).
  after = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
  assert {p for p in after if after[p] != before.get(p)} <= {out / "manifest.json"}


def test_encoding_with_the_package_options_resumes_bit_for_bit(encoded, vae_dir, image_zip,
                                                              tmp_path, user_xla_flags):
  """The encoder as a user runs it (`patchdiff.encode_latents`' body): no level in XLA_FLAGS, so
  it compiles with the package's CPU options, its program calling the VAE's. In-process
  (`user_xla_flags`): the same programs as a subprocess with a clean XLA_FLAGS, without its
  start. Resumed from its first two shards (what a run killed after shard 1 leaves; the
  interruption itself is tested above), it equals the uninterrupted run bit for bit, and the
  suite's level-0 encoding to rounding."""
  whole = tmp_path / "whole"
  summary = encode_latents.encode_dataset(config(image_zip), str(vae_dir), str(whole), **KW)
  assert summary["complete"] and summary["num_images"] == 18
  assert json.loads((whole / "spec.json").read_text())["xla_backend_optimization_level"] == 1
  out = tmp_path / "latents"
  out.mkdir()
  for name in ("spec.json", "shard-00000", "shard-00001"):
    (shutil.copytree if name.startswith("shard") else shutil.copy)(whole / name, out / name)
  resumed = encode_latents.encode_dataset(config(image_zip), str(vae_dir), str(out), **KW)
  assert (resumed["shards_resumed"], resumed["shards_written"]) == (2, 2)
  for a, b, c in zip(read(out)[:3], read(whole)[:3], read(encoded[0])[:3]):
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-6)


def test_rerun_removes_temporary_files_and_encodes_damaged_shards_again(encoded, vae_dir,
                                                                       image_zip, tmp_path,
                                                                       caplog):
  out = tmp_path / "latents"
  shutil.copytree(encoded[0], out)
  # Killed between writing spec.json's or manifest.json's temporary file and its rename.
  (out / "manifest.json").unlink()
  stale = [out / ".spec.json.tmp-999-dead", out / ".manifest.json.tmp-999-dead"]
  for path in stale:
    path.write_text("{")
  truncated = out / "shard-00001" / "mean.npy"
  size = truncated.stat().st_size
  truncated.write_bytes(truncated.read_bytes()[:-100])
  empty = out / "shard-00002" / "labels.npy"
  empty.write_bytes(b"")
  with caplog.at_level(logging.WARNING):
    summary = encode_latents.encode_dataset(config(image_zip), str(vae_dir), str(out), **KW)
  assert summary["complete"] and (summary["shards_resumed"], summary["shards_written"]) == (2, 2)
  assert (f"shard 1 is damaged (latent shard file {truncated} has {size - 100} bytes, its "
          f"header says {size}): encoding it again") in caplog.text
  assert f"shard 2 is damaged (cannot read latent shard file {empty}: " in caplog.text
  assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in encoded[0].iterdir())
  for a, b in zip(read(out)[:3], read(encoded[0])[:3]):
    np.testing.assert_array_equal(a, b)
  # A damaged shard of another process's slice: an error naming the file and the process.
  truncated = out / "shard-00003" / "std.npy"
  truncated.write_bytes(truncated.read_bytes()[:-4])
  with pytest.raises(ValueError, match=rf"shard 3 is damaged: latent shard file {truncated} has "
                                       r"\d+ bytes, its header says \d+\. Rerun the command "
                                       r"\(--process_index=1 --process_count=2\): it encodes a "
                                       "damaged shard again"):
    encode_latents.encode_dataset(config(image_zip), str(vae_dir), str(out), process_index=0,
                                  process_count=2, **KW)


def test_temporary_json_removed_before_its_rename_is_written_again(tmp_path, monkeypatch):
  link, calls = latent_shards.os.link, []

  def removed_first(src, dst):  # another process's start removes the temporary file
    calls.append(src)
    if len(calls) == 1:
      src.unlink()
    return link(src, dst)

  monkeypatch.setattr(latent_shards.os, "link", removed_first)
  latent_shards.publish_json(tmp_path / "spec.json", {"a": 1}, replace=False)
  assert len(calls) == 2 and json.loads((tmp_path / "spec.json").read_text()) == {"a": 1}
  assert [p.name for p in tmp_path.iterdir()] == ["spec.json"]


def test_spec_records_the_compile_level(encoded, vae_dir, image_zip, tmp_path, caplog):
  out, _ = encoded
  spec = json.loads((out / "spec.json").read_text())
  assert spec["xla_backend_optimization_level"] == 0  # conftest.py's XLA_FLAGS
  assert read(out)[3]["spec"]["xla_backend_optimization_level"] == 0
  # An encoding started before the level was recorded resumes, saying that it cannot check it;
  # its manifest records no level.
  old = tmp_path / "old"
  shutil.copytree(out, old)
  (old / "manifest.json").unlink()
  del spec["xla_backend_optimization_level"]
  (old / "spec.json").write_text(json.dumps(spec))
  with caplog.at_level(logging.WARNING):
    summary = encode_latents.encode_dataset(config(image_zip), str(vae_dir), str(old), **KW)
  assert summary["complete"] and summary["shards_written"] == 0
  assert f"{old / 'spec.json'} does not record the LLVM level" in caplog.text
  assert "xla_backend_optimization_level" not in read(old)[3]["spec"]
  # The same source path and count, other images: the listing's fingerprint differs.
  (old / "spec.json").write_text(json.dumps(dict(spec, source_fingerprint="0" * 64)))
  with pytest.raises(ValueError, match=r"but this run has 20 images of source='zip:.*' whose "
                                       r"listing differs \(the source changed since\)"):
    encode_latents.encode_dataset(config(image_zip), str(vae_dir), str(old), **KW)


def test_sharded_array_indexing():
  rng = np.random.default_rng(0)
  parts = [rng.normal(size=(n, 2)) for n in (3, 1, 4)]
  whole = np.concatenate(parts)
  a = latents.ShardedArray(parts)
  assert a.shape == (8, 2) and a.ndim == 2 and len(a) == 8 and a.dtype == whole.dtype
  for index in ([7, 0, 3, 3, -1], [[1, 5], [6, 2]], []):
    np.testing.assert_array_equal(a[np.asarray(index, np.int64)], whole[np.asarray(index,
                                                                                   np.int64)])
  for s in (slice(2, 6), slice(None, 3), slice(4, None), slice(5, 5)):
    np.testing.assert_array_equal(np.asarray(a[s]), whole[s])
  with pytest.raises(IndexError, match="out of range"):
    a[np.asarray([8])]
