"""Tests of patchdiff.data.build_input: folders, zips, TFDS, latents, bad input, hosts."""
from __future__ import annotations

import io
import json
import logging
import os
import zipfile

import numpy as np
import pytest
from PIL import Image

from reference_draws import posterior_eps_reference

from patchdiff import config_lib, data
from patchdiff.data import decode, latents, pipeline, png, sources, twemoji
from patchdiff.patches import PatchSchedule, coord_grid

R = 16
SIZES, PROBS = (4, 8, 16), (0.2, 0.3, 0.5)
BATCH, STEPS = 2, 8


def sched(seed: int = 1) -> PatchSchedule:
  return PatchSchedule(SIZES, PROBS, R, seed=seed)


def smooth(rng, h=R, w=R, c=3) -> np.ndarray:
  """Smooth random uint8 image (bilinear-upsampled 4x4 noise)."""
  small = rng.integers(0, 256, (4, 4, c), dtype=np.uint8)
  mode = {1: "L", 3: "RGB", 4: "RGBA"}[c]
  im = Image.fromarray(small if c > 1 else small[..., 0], mode=mode)
  out = np.array(im.resize((w, h), Image.Resampling.BILINEAR))
  return out if out.ndim == 3 else out[..., None]


def encode(arr: np.ndarray, fmt: str = "PNG", mode: str | None = None) -> bytes:
  im = Image.fromarray(arr.squeeze(-1) if arr.ndim == 3 and arr.shape[-1] == 1 else arr)
  if mode:
    im = im.convert(mode)
  buf = io.BytesIO()
  kw = dict(lossless=True) if fmt == "WEBP" else {}
  im.save(buf, format=fmt, **kw)
  return buf.getvalue()


def build(cfg: dict, steps: int = STEPS, batch: int = BATCH, label_dim: int = 0, **kw):
  return data.build_input(dict(cfg, resolution=cfg.get("resolution", R)), kw.pop("schedule",
                                                                                    sched()),
                             batch, steps, label_dim=label_dim, **kw)


def collect(it) -> list[dict[str, np.ndarray]]:
  return list(it)


def check_crops(batches, full: np.ndarray, labels=None, label_dim=0, uint8=True):
  """Every sample is the crop (after its flip) of full[index] at its offsets; pos agrees."""
  for b in batches:
    n, s = b["image"].shape[:2]
    oi, oj, idx, flips = b["offset_i"], b["offset_j"], b["index"], b["flip"]
    assert ((0 <= oi) & (oi <= R - s)).all() and ((0 <= oj) & (oj <= R - s)).all()
    for m in range(n):
      src = full[idx[m]][:, ::-1] if flips[m] else full[idx[m]]
      want = src[oi[m]:oi[m] + s, oj[m]:oj[m] + s]
      if uint8:
        assert b["image"].dtype == np.uint8
        np.testing.assert_array_equal(b["image"][m], want)  # the pixels as decoded
      else:
        np.testing.assert_allclose(b["image"][m], want, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(b["pos"], coord_grid(oi, oj, s, R))
    if labels is not None:
      np.testing.assert_array_equal(b["label"], np.eye(label_dim, dtype=np.float32)[labels[idx]])


def assert_same(a_list, b_list):
  assert len(a_list) == len(b_list)
  for a, b in zip(a_list, b_list):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


# --- fixtures: small datasets written by the tests --------------------------------------------


@pytest.fixture(scope="module")
def rgb_images():
  rng = np.random.default_rng(0)
  return np.stack([smooth(rng) for _ in range(7)])


@pytest.fixture(scope="module")
def class_folder(tmp_path_factory, rgb_images):
  """Folder with class subfolders 'cat' (4 images, one nested deeper) and 'dog' (3)."""
  root = tmp_path_factory.mktemp("classes")
  names = ["cat/a.png", "cat/b.PNG", "cat/deep/c.png", "cat/d.bmp", "dog/e.png", "dog/f.webp",
           "dog/g.png"]
  for name, img in zip(names, rgb_images):
    p = root / name
    p.parent.mkdir(parents=True, exist_ok=True)
    fmt = {"bmp": "BMP", "webp": "WEBP"}.get(name.rsplit(".", 1)[1].lower(), "PNG")
    p.write_bytes(encode(img, fmt))
  (root / "dog" / "notes.txt").write_text("not an image")
  order = sorted(names)  # relative POSIX paths, as the source sorts them
  return root, order, np.asarray([0 if n.startswith("cat") else 1 for n in order])


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory):
  """Mixed sizes and modes: RGBA, gray, gray+alpha, palette, JPEG, non-square, larger/smaller."""
  rng = np.random.default_rng(1)
  root = tmp_path_factory.mktemp("mixed")
  rgba = smooth(rng, c=4)
  rgba[:4, :, 3] = 0  # transparent top rows -> white
  files = {
      "a_rgba.png": encode(rgba),
      "b_gray.png": encode(smooth(rng, c=1)),
      "c_gray_alpha.png": encode(smooth(rng, c=4), mode="LA"),
      "d_palette.png": encode(smooth(rng), mode="P"),
      "e_photo.jpg": encode(smooth(rng, 24, 24), "JPEG"),
      "f_wide.png": encode(smooth(rng, 16, 28)),
      "g_small.png": encode(smooth(rng, 8, 8)),
      "h_rgb.png": encode(smooth(rng)),
  }
  for name, blob in files.items():
    (root / name).write_bytes(blob)
  return root, rgba


def write_zip(path, images: dict[str, bytes], meta=None, extra: dict[str, bytes] | None = None):
  with zipfile.ZipFile(path, "w") as zf:
    for name, blob in images.items():
      zf.writestr(name, blob)
    if meta is not None:
      zf.writestr("dataset.json", json.dumps(meta))
    for name, blob in (extra or {}).items():
      zf.writestr(name, blob)
  return path


@pytest.fixture(scope="module")
def tool_zip(tmp_path_factory, rgb_images):
  """dataset_tool layout with labels."""
  root = tmp_path_factory.mktemp("zip")
  names = [f"{i // 4:05d}/img{i:08d}.png" for i in range(len(rgb_images))]
  labels = [(i * 2) % 3 for i in range(len(names))]
  path = write_zip(root / "ds.zip", {n: encode(im) for n, im in zip(names, rgb_images)},
                   meta={"labels": [[n, l] for n, l in zip(names, labels)]})
  return path, names, np.asarray(labels)


# --- folder -----------------------------------------------------------------------------------


def test_folder_with_class_labels(class_folder, rgb_images):
  root, order, labels = class_folder
  it = build(dict(source="folder", path=str(root), labels=True, hflip=True), label_dim=2)
  assert it.num_examples == 7 and it.num_skipped == 0 and it.class_names == ["cat", "dog"]
  batches = collect(it)
  assert [int(b["step"]) for b in batches] == list(range(STEPS))
  written = {n: im for n, im in zip(["cat/a.png", "cat/b.PNG", "cat/deep/c.png", "cat/d.bmp",
                                     "dog/e.png", "dog/f.webp", "dog/g.png"], rgb_images)}
  full = np.stack([written[n] for n in order])  # R x R RGB: decoded exactly as written
  check_crops(batches, full, labels, 2)
  assert any(b["flip"].any() for b in batches)


def test_folder_preprocessing_and_cache_modes_agree(mixed_folder):
  root, rgba = mixed_folder
  cfg = dict(source="folder", path=str(root), hflip=True)
  enc = sources.scan_folder(root)
  pixels, kept, bad = decode.decode_all(enc, R)
  assert len(kept) == 8 and not bad and pixels.shape == (8, R, R, 3)
  by_name = {n.rsplit("/", 1)[1]: p for n, p in zip(enc.names, pixels)}
  # RGBA composited on white: transparent rows are white, opaque pixels kept.
  a = by_name["a_rgba.png"]
  assert (a[:4] == 255).all()
  opaque = rgba[..., 3] == 255
  np.testing.assert_array_equal(a[opaque], rgba[..., :3][opaque])
  # Gray -> three equal channels.
  g = by_name["b_gray.png"]
  assert (g[..., 0] == g[..., 1]).all() and (g[..., 1] == g[..., 2]).all()
  # Non-square: centre crop (columns 6..21 of 28) - at 16 px no resize, so exact.
  with Image.open(root / "f_wide.png") as im:
    wide = np.asarray(im.convert("RGB"))
  np.testing.assert_array_equal(by_name["f_wide.png"], wide[:, 6:22])
  # Resized ones are close to PIL's LANCZOS (same filter family, not bit-identical).
  for name in ("e_photo.jpg", "g_small.png"):
    with Image.open(root / name) as im:
      ref = np.asarray(im.convert("RGB").resize((R, R), Image.Resampling.LANCZOS), np.float32)
    assert np.abs(by_name[name].astype(np.float32) - ref).mean() < 3.0, name

  cached = build(dict(cfg, cache=True))
  assert cached.num_examples == 8 and cached.cache
  cached_batches = collect(cached)
  check_crops(cached_batches, pixels)
  streamed = collect(build(dict(cfg, cache=False)))
  assert_same(cached_batches, streamed)


def test_folder_errors(tmp_path, class_folder):
  with pytest.raises(ValueError, match=f"{tmp_path}.*contains no images"):
    build(dict(source="folder", path=str(tmp_path)))
  (tmp_path / "loose.png").write_bytes(encode(np.zeros((R, R, 3), np.uint8)))
  (tmp_path / "cls").mkdir()
  (tmp_path / "cls" / "x.png").write_bytes(encode(np.zeros((R, R, 3), np.uint8)))
  with pytest.raises(ValueError, match="loose.png lies directly in"):
    build(dict(source="folder", path=str(tmp_path), labels=True), label_dim=1)
  root, _, _ = class_folder
  with pytest.raises(ValueError, match="label 1 of .*dog.* is out of range for label_dim=1"):
    build(dict(source="folder", path=str(root), labels=True), label_dim=1)
  with pytest.raises(ValueError, match="not a folder"):
    build(dict(source="folder", path=str(tmp_path / "nope")))


# --- zip --------------------------------------------------------------------------------------


def test_zip_with_labels_limit_and_cache_modes(tool_zip, rgb_images):
  path, names, labels = tool_zip
  cfg = dict(source="zip", path=str(path), labels=True, hflip=True)
  cached = collect(build(cfg, label_dim=3))
  check_crops(cached, rgb_images, labels, 3)
  assert_same(cached, collect(build(dict(cfg, cache=False), label_dim=3)))
  limited = build(dict(cfg, limit=3), label_dim=3)
  assert limited.num_examples == 3
  batches = collect(limited)
  assert max(b["index"].max() for b in batches) == 2
  check_crops(batches, rgb_images[:3], labels[:3], 3)


def test_zip_without_labels(tmp_path, rgb_images):
  imgs = {f"00000/img{i:08d}.png": encode(im) for i, im in enumerate(rgb_images[:4])}
  for meta in (None, {"labels": None}):
    path = write_zip(tmp_path / f"z{meta is None}.zip", imgs, meta=meta)
    it = build(dict(source="zip", path=str(path)))
    batches = collect(it)
    assert "label" not in batches[0] and it.num_examples == 4
    check_crops(batches, rgb_images[:4])
    with pytest.raises(ValueError, match="(no dataset.json|has no labels)"):
      build(dict(source="zip", path=str(path), labels=True), label_dim=2)


def test_zip_errors(tmp_path, rgb_images):
  img = encode(rgb_images[0])
  empty = write_zip(tmp_path / "empty.zip", {}, meta={"labels": None}, extra={"a.txt": b"x"})
  with pytest.raises(ValueError, match=f"{empty}.*contains no images"):
    build(dict(source="zip", path=str(empty)))
  missing = write_zip(tmp_path / "missing.zip", {"00000/img00000000.png": img},
                      meta={"labels": [["00000/img00000000.png", 0],
                                       ["00000/img00000001.png", 1]]})
  with pytest.raises(ValueError, match="missing.zip:dataset.json names '00000/img00000001.png', "
                     "which is not an image in the archive"):
    build(dict(source="zip", path=str(missing), labels=True), label_dim=2)
  out_of_range = write_zip(tmp_path / "range.zip", {"a.png": img, "b.png": img},
                           meta={"labels": [["a.png", 0], ["b.png", 7]]})
  with pytest.raises(ValueError, match="label 7 of .*b.png is out of range for label_dim=3"):
    build(dict(source="zip", path=str(out_of_range), labels=True), label_dim=3)
  unlabelled = write_zip(tmp_path / "unl.zip", {"a.png": img, "b.png": img},
                         meta={"labels": [["a.png", 0]]})
  with pytest.raises(ValueError, match="no label for 'b.png'"):
    build(dict(source="zip", path=str(unlabelled), labels=True), label_dim=3)
  (tmp_path / "notzip.zip").write_bytes(b"definitely not a zip")
  with pytest.raises(ValueError, match="notzip.zip is not a readable zip"):
    build(dict(source="zip", path=str(tmp_path / "notzip.zip")))


def test_zip_listing_reads_what_zipfile_reads(tmp_path, monkeypatch, rgb_images):
  """`sources.list_zip` reads the central directory itself: stored, deflated and bzip2 members, a
  name entered twice (its last entry counts), a non-ASCII name, a comment, zip64 records and data
  before the archive read as `zipfile` reads them."""
  members = [("b/x.png", encode(rgb_images[0]), zipfile.ZIP_DEFLATED),
             ("a.png", encode(rgb_images[1]), zipfile.ZIP_STORED),
             ("c.PNG", encode(rgb_images[2]), zipfile.ZIP_BZIP2),
             ("d.png", b"first entry", zipfile.ZIP_STORED),
             ("\u00e9t\u00e9.png", encode(rgb_images[3]), zipfile.ZIP_DEFLATED),
             ("notes.txt", b"not an image", zipfile.ZIP_DEFLATED),
             ("d.png", encode(rgb_images[4]), zipfile.ZIP_DEFLATED)]
  images_in = ["a.png", "b/x.png", "c.PNG", "d.png", "\u00e9t\u00e9.png"]
  meta = {"labels": [[n, i] for i, n in enumerate(images_in)] + [["d.png", 9]]}

  def write(path, prefix=b""):
    with open(path, "wb") as f:
      f.write(prefix)
      with zipfile.ZipFile(f, "w") as zf, pytest.warns(UserWarning, match="Duplicate name"):
        for name, blob, method in members:
          zf.writestr(name, blob, compress_type=method)
        zf.writestr("dataset.json", json.dumps(meta))
        zf.comment = b"a comment"
    return path

  plain = write(tmp_path / "plain.zip")
  with monkeypatch.context() as m:  # zip64 records for every size and offset, and the count
    m.setattr(zipfile, "ZIP64_LIMIT", 2)
    m.setattr(zipfile, "ZIP_FILECOUNT_LIMIT", 1)
    z64 = write(tmp_path / "z64.zip", prefix=b"data before the archive" * 3)
  for path in (plain, z64):
    listing = sources.list_zip(path, use_labels=True)
    enc = listing.read(0, len(listing))
    with zipfile.ZipFile(path) as zf:
      assert enc.names == [f"{path}:{n}" for n in images_in]
      assert enc.data == [zf.read(n) for n in images_in] and not enc.errors
    np.testing.assert_array_equal(enc.labels, [0, 1, 2, 9, 4])
    part = listing.read(1, 3)
    assert part.names == enc.names[1:3] and part.data == enc.data[1:3]
    np.testing.assert_array_equal(part.labels, [1, 2])
    assert sources.list_zip(path, limit=2).read(0, 2).names == enc.names[:2]
  # The fingerprint follows the members' names and contents, not the file.
  assert sources.list_zip(plain).fingerprint == sources.list_zip(z64).fingerprint
  members[1] = ("a.png", encode(rgb_images[5]), zipfile.ZIP_STORED)
  assert sources.list_zip(write(tmp_path / "other.zip")).fingerprint != sources.list_zip(
      plain).fingerprint


# --- corrupt files ----------------------------------------------------------------------------


@pytest.fixture()
def corrupt_folder(tmp_path, rgb_images):
  good = encode(rgb_images[0])
  (tmp_path / "a_good.png").write_bytes(good)
  (tmp_path / "b_truncated.png").write_bytes(good[:len(good) // 2])
  (tmp_path / "c_garbage.jpg").write_bytes(b"this is not a jpeg at all" * 10)
  (tmp_path / "d_good.png").write_bytes(encode(rgb_images[1]))
  return tmp_path


@pytest.mark.parametrize("cache", [True, False])
def test_corrupt_images_skipped_counted_logged(corrupt_folder, rgb_images, caplog, cache):
  with caplog.at_level(logging.WARNING):
    it = build(dict(source="folder", path=str(corrupt_folder), cache=cache))
  assert it.num_examples == 2 and it.num_skipped == 2
  assert [p.rsplit("/", 1)[1] for p in it.names] == ["a_good.png", "d_good.png"]
  assert sorted(p.rsplit("/", 1)[1] for p in it.skipped) == ["b_truncated.png", "c_garbage.jpg"]
  log = caplog.text
  assert "b_truncated.png" in log and "c_garbage.jpg" in log and "skipped 2 of 4" in log
  batches = collect(it)
  check_crops(batches, rgb_images[:2])  # only the good ones, never a zero image
  assert all(b["image"].std() > 0 for b in batches)


def test_corrupt_images_fatal(corrupt_folder):
  with pytest.raises(ValueError, match="b_truncated.png: corrupt.*2 bad image"):
    build(dict(source="folder", path=str(corrupt_folder), skip_corrupt=False))


def test_all_corrupt_and_corrupt_zip_member(tmp_path, rgb_images):
  (tmp_path / "x.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
  with pytest.raises(ValueError, match="no usable images"):
    build(dict(source="folder", path=str(tmp_path)))
  path = write_zip(tmp_path / "c.zip", {"a.png": encode(rgb_images[0]), "b.png": b"garbage",
                                         "c.png": encode(rgb_images[1])})
  # Damage c.png's stored bytes inside the archive: a CRC error when read.
  with zipfile.ZipFile(path) as zf:
    info = zf.getinfo("c.png")
  raw = bytearray(path.read_bytes())
  start = info.header_offset + 30 + len("c.png") + 40
  raw[start:start + 8] = bytes(8)
  path.write_bytes(bytes(raw))
  it = build(dict(source="zip", path=str(path)))
  assert it.num_examples == 1 and sorted(it.skipped) == [f"{path}:b.png", f"{path}:c.png"]
  assert it.skipped[f"{path}:b.png"].startswith("corrupt")
  assert "unreadable zip member" in it.skipped[f"{path}:c.png"]


# --- TFDS -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_tfds(tmp_path_factory, rgb_images):
  import tensorflow as tf
  import tensorflow_datasets as tfds
  data_dir = tmp_path_factory.mktemp("tfds")
  features = tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=(R, R, 3)),
      "label": tfds.features.ClassLabel(names=["a", "b", "c"])})
  labels = np.arange(len(rgb_images)) % 3
  split = tf.data.Dataset.from_tensor_slices({"image": rgb_images, "label": labels})
  tfds.dataset_builders.store_as_tfds_dataset(
      "patchdiff_tiny_test", "1.0.0", features, {"train": split}, data_dir=str(data_dir),
      disable_shuffling=True)
  return data_dir, labels


def test_tfds_by_name_and_from_directory(tiny_tfds, rgb_images):
  data_dir, labels = tiny_tfds
  by_name = dict(source="tfds", tfds_name="patchdiff_tiny_test", tfds_data_dir=str(data_dir),
                 labels=True, hflip=True)
  it = build(by_name, label_dim=3)
  assert it.num_examples == len(rgb_images) and it.class_names == ["a", "b", "c"]
  batches = collect(it)
  check_crops(batches, rgb_images, labels, 3)
  from_dir = dict(source="tfds", path=str(data_dir / "patchdiff_tiny_test" / "1.0.0"),
                  labels=True, hflip=True, cache=False)
  assert_same(batches, collect(build(from_dir, label_dim=3)))
  with pytest.raises(ValueError, match="no split 'test'"):
    build(dict(by_name, tfds_split="test"), label_dim=3)
  with pytest.raises(ValueError, match="not prepared.*tfds_download is False"):
    build(dict(source="tfds", tfds_name="mnist", tfds_data_dir=str(data_dir)))


def test_tfds_listing_reads_slices(tiny_tfds, rgb_images):
  data_dir, labels = tiny_tfds
  cfg = config_lib.data_config(dict(source="tfds", tfds_name="patchdiff_tiny_test",
                                    tfds_data_dir=str(data_dir), labels=True, limit=6), 3)
  listing = sources.list_tfds(cfg, use_labels=True)
  whole = sources.scan_tfds(cfg, use_labels=True)
  assert len(listing) == 6 == len(whole.data) and listing.class_names == ["a", "b", "c"]
  part = listing.read(2, 5)
  assert part.names == whole.names[2:5] and part.data == whole.data[2:5]
  np.testing.assert_array_equal(part.labels, labels[2:5])


# --- latents ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def latent_files(tmp_path_factory):
  rng = np.random.default_rng(3)
  root = tmp_path_factory.mktemp("latents")
  nchw = rng.standard_normal((6, 4, R, R)).astype(np.float32)
  np.save(root / "lat.npy", nchw)
  mean = rng.standard_normal((6, R, R, 4)).astype(np.float16)
  std = rng.uniform(0.1, 1.0, (6, R, R, 4)).astype(np.float32)
  labels = np.arange(6) % 2
  np.savez(root / "post.npz", mean=mean, std=std, labels=labels)
  np.savez_compressed(root / "packed.npz", latents=nchw.transpose(0, 2, 3, 1))
  return root, nchw, mean, std, labels


def test_latents_npy_nchw_memmap_and_cached(latent_files):
  root, nchw, _, _, _ = latent_files
  lat = latents.load_latents(root / "lat.npy", R, "NCHW", cache=False)
  assert isinstance(lat.mean, np.memmap) and lat.channels == 4
  cfg = dict(source="latents", path=str(root / "lat.npy"), hflip=True, cache=False)
  it = build(cfg)
  assert it.channels == 4
  batches = collect(it)
  full = nchw.transpose(0, 2, 3, 1)
  check_crops(batches, full, uint8=False)
  assert batches[0]["image"].dtype == np.float32 and batches[0]["image"].shape[-1] == 4
  assert_same(batches, collect(build(dict(cfg, cache=True))))
  # Compressed NHWC .npz (read into memory) gives the same batches.
  packed = dict(source="latents", path=str(root / "packed.npz"), latent_layout="NHWC",
                hflip=True)
  assert_same(batches, collect(build(packed)))


def test_latents_posterior_sampling(latent_files):
  root, _, mean, std, labels = latent_files
  assert isinstance(latents.load_latents(root / "post.npz", R, "NHWC").mean, np.memmap)
  cfg = dict(source="latents", path=str(root / "post.npz"), latent_layout="NHWC", hflip=True,
             labels=True, cache=False)
  batches = collect(build(cfg, label_dim=2))
  _, counts, starts = pipeline.step_plan(sched(), BATCH, STEPS)
  for b in batches:
    t = int(b["step"])
    k = starts[t] + np.arange(counts[t])
    np.testing.assert_array_equal(b["counter"], k)
    n, s = b["image"].shape[:2]
    oi, oj, idx, flips = b["offset_i"], b["offset_j"], b["index"], b["flip"]
    rows = oi[:, None] + np.arange(s)[None]
    cols = oj[:, None] + np.arange(s)[None]
    src_cols = np.where(flips[:, None], R - 1 - cols, cols)
    eps = posterior_eps_reference(0, k, rows, src_cols, 4, R)
    for m in range(n):
      mu = mean[idx[m]].astype(np.float32)[rows[m]][:, src_cols[m]]
      sd = std[idx[m]][rows[m]][:, src_cols[m]]
      np.testing.assert_allclose(b["image"][m], mu + sd * eps[m], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(b["pos"], coord_grid(oi, oj, s, R))
    np.testing.assert_array_equal(b["label"], np.eye(2, dtype=np.float32)[labels[idx]])
  all_eps = np.concatenate([(b["image"]).ravel() for b in batches])
  assert np.isfinite(all_eps).all()
  # The draw is a pure function of (seed, k): rebuilt, the same; another seed, another draw.
  again = collect(build(cfg, label_dim=2))
  assert_same(batches, again)
  other = collect(build(cfg, label_dim=2, seed=1))
  assert not np.array_equal(batches[0]["image"], other[0]["image"])
  # The noise is standard normal.
  e = posterior_eps_reference(0, np.arange(200), np.tile(np.arange(R), (200, 1)),
                                      np.tile(np.arange(R), (200, 1)), 4, R)
  assert abs(e.mean()) < 0.02 and abs(e.std() - 1) < 0.02


def test_latent_errors(tmp_path, latent_files):
  root, nchw, _, _, _ = latent_files
  with pytest.raises(ValueError, match=r"lat.npy: latents of shape \(6, 4, 16, 16\) is not "
                     r"16x16 in layout NHWC.*latent_layout='NCHW'"):
    build(dict(source="latents", path=str(root / "lat.npy"), latent_layout="NHWC"))
  np.save(tmp_path / "three.npy", nchw[0])
  with pytest.raises(ValueError, match="three.npy: latents must be 4-d"):
    build(dict(source="latents", path=str(tmp_path / "three.npy")))
  np.save(tmp_path / "ints.npy", np.zeros((2, 4, R, R), np.int32))
  with pytest.raises(ValueError, match="ints.npy: latents must be a float array"):
    build(dict(source="latents", path=str(tmp_path / "ints.npy")))
  np.savez(tmp_path / "odd.npz", foo=nchw)
  with pytest.raises(ValueError, match=r"odd.npz holds arrays \['foo'\]"):
    build(dict(source="latents", path=str(tmp_path / "odd.npz")))
  np.savez(tmp_path / "mismatch.npz", mean=nchw, std=nchw[:, :2])
  with pytest.raises(ValueError, match="mismatch.npz: std"):
    build(dict(source="latents", path=str(tmp_path / "mismatch.npz")))
  with pytest.raises(ValueError, match="resolution"):
    build(dict(source="latents", path=str(root / "lat.npy"), resolution=8),
          schedule=PatchSchedule((8,), (1.0,), 8))
  with pytest.raises(ValueError, match="cannot hold labels"):
    build(dict(source="latents", path=str(root / "lat.npy"), labels=True), label_dim=2)


# --- hosts, restarts, config ------------------------------------------------------------------


@pytest.mark.parametrize("cache", [True, False])
def test_two_hosts_split_the_global_batch(tool_zip, cache):
  path, _, labels = tool_zip
  cfg = dict(source="zip", path=str(path), labels=True, hflip=True, cache=cache)
  one = collect(build(cfg, label_dim=3))
  hosts = [collect(build(cfg, label_dim=3, process_index=p, process_count=2)) for p in (0, 1)]
  for g, h0, h1 in zip(one, *hosts):
    assert int(h0["step"]) == int(h1["step"]) == int(g["step"])
    n = g["image"].shape[0]
    assert h0["image"].shape[0] == h1["image"].shape[0] == n // 2
    # Disjoint sample sets whose union is the global batch's.
    assert not set(h0["counter"]) & set(h1["counter"])
    assert set(h0["counter"]) | set(h1["counter"]) == set(g["counter"])
    for key in g:
      if key == "step":
        continue
      np.testing.assert_array_equal(np.concatenate([h0[key], h1[key]]), g[key], err_msg=key)


def test_hosts_latents_and_indivisible_batch(latent_files):
  root = latent_files[0]
  cfg = dict(source="latents", path=str(root / "post.npz"), latent_layout="NHWC", hflip=True)
  one = collect(build(cfg))
  hosts = [collect(build(cfg, process_index=p, process_count=2)) for p in (0, 1)]
  for g, h0, h1 in zip(one, *hosts):
    np.testing.assert_array_equal(np.concatenate([h0["image"], h1["image"]]), g["image"])
  with pytest.raises(ValueError, match=r"16 px bucket \(3 samples.*process_count 2"):
    build(cfg, batch=3, process_index=0, process_count=2)
  with pytest.raises(ValueError, match="process_index 2 is outside"):
    build(cfg, process_index=2, process_count=2)


@pytest.mark.parametrize("cfg_fn", [
    lambda z, lat: dict(source="zip", path=str(z), cache=False, hflip=True),
    lambda z, lat: dict(source="zip", path=str(z), cache=True, hflip=True),
    lambda z, lat: dict(source="latents", path=str(lat / "post.npz"), latent_layout="NHWC"),
])
def test_restart_gives_identical_batches(tool_zip, latent_files, cfg_fn):
  cfg = cfg_fn(tool_zip[0], latent_files[0])
  full = collect(build(cfg, steps=10, seed=4))
  resumed = collect(build(cfg, steps=10, seed=4, start_step=6))
  assert [int(b["step"]) for b in resumed] == [6, 7, 8, 9]
  assert_same(full[6:], resumed)


def test_twemoji_source(tmp_path):
  it = build(dict(source="twemoji", limit=5, cache_dir=str(tmp_path)), steps=2)
  batches = collect(it)
  assert it.num_examples == 5 and len(batches) == 2
  check_crops(batches, twemoji.load_twemoji(R, limit=5, cache_dir=tmp_path))


@pytest.mark.parametrize("cfg, label_dim, match", [
    (dict(source="lmdb"), 0, "data.source='lmdb' is not one of"),
    (dict(source="folder"), 0, "needs data.path"),
    (dict(source="zip", path="/nonexistent/x.zip"), 0, "/nonexistent/x.zip is not a file"),
    (dict(source="twemoji", typo_key=1), 0, r"unknown data config key\(s\) \['typo_key'\]"),
    (dict(source="twemoji", labels=True), 3, "twemoji' has no labels"),
    (dict(source="twemoji", cache=False), 0, "cache=False is not supported"),
    (dict(source="twemoji"), 3, "label_dim=3 but data.labels=False"),
    (dict(source="twemoji", labels=True), 0, "label_dim is 0"),
    (dict(source="twemoji", limit=0), 0, "data.limit"),
    (dict(source="twemoji", resolution=0), 0, "data.resolution"),
    (dict(source="twemoji", cache="yes"), 0, "data.cache must be a bool"),
    (dict(source="twemoji", resolution=32), 0, "differs from the patch schedule"),
    (dict(source="tfds"), 0, "needs data.tfds_name"),
    (dict(source="latents", path=__file__), 0, "must be .npy or .npz"),
    (dict(source="twemoji", latent_layout="CHW"), 0, "latent_layout"),
    (dict(source="twemoji", twemoji_category="Smileys"), 0, "twemoji_category='Smileys'"),
    (dict(source="synthetic", twemoji_category="Flags"), 0, "needs data.source='twemoji'"),
    (dict(source="twemoji", twemoji_subset_seed=0), 0, "needs data.source='twemoji' and data.limit"),
])
def test_config_validation(cfg, label_dim, match):
  with pytest.raises(ValueError, match=match):
    data.build_input(dict(dict(resolution=R), **cfg), sched(), BATCH, STEPS,
                        label_dim=label_dim)


def test_config_dict_or_partial_dict(tool_zip):
  """`base_config().data` and a dict of the keys that differ from the defaults are one input."""
  c = config_lib.base_config().data
  c.source, c.path, c.resolution = "zip", str(tool_zip[0]), R
  a = collect(data.build_input(c, sched(), BATCH, 3))
  b = collect(data.build_input(dict(source="zip", path=str(tool_zip[0]), resolution=R),
                               sched(), BATCH, 3))
  assert_same(a, b)


# --- fast PNG path of data.cache=False (imagecodecs) --------------------------------------------


def png_bytes(arr: np.ndarray, bit_depth: int = 8, color_type: int = 2,
              chunks: tuple[tuple[bytes, bytes], ...] = ()) -> bytes:
  """A PNG written by hand (for what PIL cannot write: 16-bit RGB, extra chunks)."""
  import struct
  import zlib

  def chunk(kind, body):
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

  h, w = arr.shape[:2]
  data = arr.astype(">u2" if bit_depth == 16 else np.uint8)
  rows = b"".join(b"\x00" + data[r].tobytes() for r in range(h))
  head = chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 0))
  extra = b"".join(chunk(kind, body) for kind, body in chunks)
  return (b"\x89PNG\r\n\x1a\n" + head + extra + chunk(b"IDAT", zlib.compress(rows))
          + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def kinds_folder(tmp_path_factory):
  """Every kind of image the uncached path meets; {name: expected fast-path use}."""
  rng = np.random.default_rng(5)
  root = tmp_path_factory.mktemp("kinds")
  rgba = smooth(rng, c=4)
  rgba[::3, :, 3] = 0
  rgba[1::3, :, 3] = 128
  rgb16 = rng.integers(0, 1 << 16, (R, R, 3))
  files = {
      "a_rgb.png": (encode(smooth(rng)), True),
      "b_rgb_chunks.png": (png_bytes(smooth(rng), chunks=(
          (b"gAMA", (45455).to_bytes(4, "big")), (b"sRGB", b"\x00"),
          (b"pHYs", bytes(9)), (b"tEXt", b"k\x00v"))), True),
      "c_rgba.png": (encode(rgba), False),
      "d_gray.png": (encode(smooth(rng, c=1)), False),
      "e_gray_alpha.png": (encode(smooth(rng, c=4), mode="LA"), False),
      "f_palette.png": (encode(smooth(rng), mode="P"), False),
      "g_gray16.png": (png_bytes(rng.integers(0, 1 << 16, (R, R)), 16, 0), False),
      "h_rgb16.png": (png_bytes(rgb16, 16, 2), False),
      "i_rgb_trns.png": (png_bytes(smooth(rng), chunks=((b"tRNS", bytes(6)),)), False),
      "j_rgb_big.png": (encode(smooth(rng, 40, 40)), False),
      "k_rgb_wide.png": (encode(smooth(rng, 16, 28)), False),
      "l_rgb_small.png": (encode(smooth(rng, 8, 8)), False),
      "m_photo.jpg": (encode(smooth(rng), "JPEG"), False),
      "n_rgb.png": (encode(smooth(rng)), True),
  }
  for name, (blob, _) in files.items():
    (root / name).write_bytes(blob)
  return root, {name: fast for name, (_, fast) in files.items()}


def full_batches(cfg: dict, n: int, steps: int = 2, **kw):
  """Batches of full-size samples, one epoch (all n images) per step."""
  return collect(build(dict(cfg, hflip=True), steps=steps, batch=n,
                       schedule=PatchSchedule((R,), (1.0,), R), **kw))


def require_png_decoder():
  """(name, batch decoder) of the pinned fast PNG decoder. Where it is missing the test skips,
  except under CI, where a missing pinned package fails it."""
  found = png.decoder()
  if found is None:
    msg = "the fast PNG decoder (imagecodecs, pinned in requirements.txt) is not installed"
    if os.environ.get("CI", "").lower() == "true":
      pytest.fail(msg)
    pytest.skip(msg)
  return found


def counting_decoder(monkeypatch, garble=()):
  """Wraps the fast PNG decoder: counts the images it decoded; positions in `garble` (of every
  call) are zeroed and reported as not decoded, as if the decoder had refused them."""
  name, fn = require_png_decoder()
  calls = []

  def wrapped(blobs, usable, index, out):
    failed = set(fn(blobs, usable, index, out))
    for m in garble:
      if m < len(index):
        out[m] = 0
        failed.add(m)
    calls.append(len(index) - len(failed))
    return sorted(failed)

  monkeypatch.setattr(png, "_DECODER", [(name, wrapped)])
  monkeypatch.setattr(png, "ENABLED", True)
  return calls


def test_png_fast_path_classification(kinds_folder):
  root, fast = kinds_folder
  plain = png.plain_rgb8
  for name, want in fast.items():
    assert plain((root / name).read_bytes(), R) == want, name
  blob = (root / "a_rgb.png").read_bytes()
  assert not plain(blob, R // 2) and not plain(blob[:40], R) and not plain(None, R)


@pytest.mark.parametrize("garble", [(), (0, 3, 5)])
def test_fast_png_path_equals_tensorflow_path(kinds_folder, monkeypatch, garble):
  root, fast = kinds_folder
  n, names = len(fast), sorted(fast)  # the folder source's order
  cfg = dict(source="folder", path=str(root), cache=False)
  calls = counting_decoder(monkeypatch, garble)
  streamed = full_batches(cfg, n)
  # Only the plain R x R RGB PNGs went through the fast decoder (less those it "refused").
  assert sum(calls) == sum(fast[names[i]] for b in streamed for m, i in enumerate(b["index"])
                           if m not in garble) > 0
  monkeypatch.setattr(png, "ENABLED", False)
  assert png.decoder_name() == "tensorflow"
  assert_same(streamed, full_batches(cfg, n))
  pixels, kept, _ = decode.decode_all(sources.scan_folder(root), R)
  assert len(kept) == n
  check_crops(streamed, pixels)
  assert_same(streamed, full_batches(dict(cfg, cache=True), n))


def test_corrupt_png_in_zip_uncached(tmp_path, rgb_images, caplog, monkeypatch):
  good = [encode(im) for im in rgb_images[:3]]
  blob = bytearray(good[1])
  at = blob.find(b"IDAT") + 4
  blob[at + 20] ^= 0xFF  # damaged image data: libpng refuses it (chunk CRC)
  path = write_zip(tmp_path / "c.zip", {"a.png": good[0], "b.png": bytes(blob),
                                         "c.png": good[2], "d.png": good[1][:60]})
  calls = counting_decoder(monkeypatch)
  with caplog.at_level(logging.WARNING):
    it = build(dict(source="zip", path=str(path), cache=False))
  assert it.num_examples == 2 and it.num_skipped == 2
  assert sorted(it.skipped) == [f"{path}:b.png", f"{path}:d.png"]
  assert all(why.startswith("corrupt") for why in it.skipped.values())
  assert f"{path}:b.png" in caplog.text and f"{path}:d.png" in caplog.text
  assert "skipped 2 of 4" in caplog.text
  batches = collect(it)
  check_crops(batches, rgb_images[[0, 2]])
  assert sum(calls) == sum(len(b["index"]) for b in batches)
  with pytest.raises(ValueError, match=r"c.zip:b.png: corrupt.*2 bad image"):
    build(dict(source="zip", path=str(path), cache=False, skip_corrupt=False))


def test_without_imagecodecs_uncached_is_unchanged(kinds_folder, tool_zip, rgb_images, monkeypatch,
                                             caplog):
  import sys
  root, fast = kinds_folder
  monkeypatch.setitem(sys.modules, "imagecodecs", None)  # import imagecodecs -> ImportError
  monkeypatch.setattr(png, "_DECODER", [])
  monkeypatch.setattr(png, "ENABLED", True)
  with caplog.at_level(logging.WARNING):
    assert png.decoder_name() == "tensorflow"
    cfg = dict(source="folder", path=str(root), cache=False)
    streamed = full_batches(cfg, len(fast))
    zipped = collect(build(dict(source="zip", path=str(tool_zip[0]), cache=False, hflip=True)))
  assert caplog.text.count("imagecodecs is not available") == 1
  assert_same(streamed, full_batches(dict(cfg, cache=True), len(fast)))
  check_crops(zipped, rgb_images)


def test_exit_with_a_live_uncached_pipeline(tmp_path):
  """The process exits while an uncached pipeline, whose decoding calls Python from tf.data's
  threads, is still running. (Without `pipeline.exit_safe` this setting hangs at exit every
  time, in the iterator's destructor.)"""
  import subprocess
  import sys
  from conftest import REPO
  require_png_decoder()
  rng = np.random.default_rng(7)
  path = write_zip(tmp_path / "many.zip", {f"{i:05d}.png": encode(
      rng.integers(0, 256, (R, R, 3), dtype=np.uint8)) for i in range(2000)})
  script = (
      "import sys\n"
      f"sys.path.insert(0, {str(REPO)!r})\n"
      "from patchdiff import data\n"
      "from patchdiff.data import png\n"
      "from patchdiff.patches import PatchSchedule\n"
      f"cfg = dict(source='zip', path={str(path)!r}, resolution={R}, cache=False)\n"
      f"it = data.build_input(cfg, PatchSchedule({SIZES}, {PROBS}, {R}), 256, 10**6)\n"
      "for _ in range(3):\n"
      "  next(it)\n"
      "print('decoder:', png.decoder_name())\n")
  done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                        timeout=120, check=False)
  assert done.returncode == 0, done.stderr[-2000:]
  assert f"decoder: {png.decoder_name()}" in done.stdout and "imagecodecs" in done.stdout
