"""Tests of the tf.data patch pipeline (patchdiff.data.pipeline) and the Twemoji set."""
from __future__ import annotations

import os

import jax
import numpy as np
import pytest

from reference_draws import reference_flips, reference_offsets

from patchdiff import train_step
from patchdiff.data import pipeline, twemoji
from patchdiff.patches import PatchSchedule, batch_mul, coord_grid, uniform_from_counter

N, R, BATCH = 10, 16, 3
SIZES, PROBS = (4, 8, 16), (0.2, 0.3, 0.5)


def synthetic_images(n: int = N, res: int = R) -> np.ndarray:
  """uint8 images where every pixel spells out where it came from.

  channel 0: row * R + col (unique per pixel for R = 16), channel 1: image index,
  channel 2: 255 - image index.
  """
  rows, cols = np.meshgrid(np.arange(res), np.arange(res), indexing="ij")
  img = np.zeros((n, res, res, 3), dtype=np.uint8)
  img[..., 0] = (rows * res + cols).astype(np.uint8)
  img[..., 1] = np.arange(n, dtype=np.uint8)[:, None, None]
  img[..., 2] = (255 - np.arange(n)).astype(np.uint8)[:, None, None]
  return img


def schedule(seed: int = 1, kind: str = "stochastic", total_steps=None, **kw) -> PatchSchedule:
  return PatchSchedule(SIZES, PROBS, R, seed=seed, kind=kind, total_steps=total_steps, **kw)


def collect(*args, **kwargs) -> list[dict[str, np.ndarray]]:
  return list(pipeline.make_patch_dataset(*args, **kwargs).as_numpy_iterator())


@pytest.fixture(scope="module")
def images():
  return synthetic_images()


@pytest.fixture(scope="module")
def labels():
  return (np.arange(N) * 7) % 5


@pytest.fixture(scope="module")
def flipped_run(images, labels):
  return collect(images, schedule(), BATCH, 16, seed=5, labels=labels, label_dim=5, hflip=True)


@pytest.fixture(scope="module")
def plain_run(images):
  return collect(images, schedule(), BATCH, 16, seed=5)


# --- the pipeline ------------------------------------------------------------------------------


def test_shapes_and_dtypes_per_bucket(flipped_run):
  sched = schedule()
  assert [int(b["step"]) for b in flipped_run] == list(range(16))
  seen = set()
  for b in flipped_run:
    s = sched.size_at(int(b["step"]))
    n = BATCH * (R // s)
    assert n == BATCH * batch_mul(s, R)
    seen.add(s)
    assert b["image"].shape == (n, s, s, 3) and b["image"].dtype == np.uint8  # as stored
    assert b["pos"].shape == (n, s, s, 2) and b["pos"].dtype == np.float32
    assert b["label"].shape == (n, 5) and b["label"].dtype == np.float32
    assert b["step"].shape == () and b["step"].dtype == np.int64
    assert b["offset_i"].shape == (n,) and b["offset_i"].dtype == np.int32
    assert b["offset_j"].shape == (n,) and b["offset_j"].dtype == np.int32
    assert b["index"].shape == (n,) and b["index"].dtype == np.int64
  assert seen == set(SIZES), "16 steps of this seed should visit every bucket"


@pytest.mark.parametrize("run_name", ["plain_run", "flipped_run"])
def test_pixels_pos_offsets_labels(run_name, request, images, labels):
  run = request.getfixturevalue(run_name)
  any_flip = False
  for b in run:
    n, s = b["image"].shape[:2]
    oi, oj, idx = b["offset_i"], b["offset_j"], b["index"]
    assert ((0 <= idx) & (idx < N)).all()
    assert ((0 <= oi) & (oi <= R - s)).all() and ((0 <= oj) & (oj <= R - s)).all()
    if s == R:
      assert (oi == 0).all() and (oj == 0).all()
    flips = b["flip"]
    if run_name == "plain_run":
      assert not flips.any()
    any_flip |= bool(flips.any())
    for m in range(n):
      src = images[idx[m]]
      if flips[m]:
        src = src[:, ::-1]
      want = src[oi[m]:oi[m] + s, oj[m]:oj[m] + s]
      np.testing.assert_array_equal(b["image"][m], want)  # the stored pixels, exactly
    # Coordinates: patches.coord_grid of the (unflipped) crop offsets, bit for bit.
    np.testing.assert_array_equal(b["pos"], coord_grid(oi, oj, s, R))
    if "label" in b:
      np.testing.assert_array_equal(b["label"], np.eye(5, dtype=np.float32)[labels[idx]])
  if run_name == "flipped_run":
    assert any_flip


def test_offsets_and_flips_match_numpy_reference(flipped_run):
  """The draws are a pure function of (seed, k) that numpy reproduces bit for bit."""
  sizes, counts, starts = pipeline.step_plan(schedule(), BATCH, 16)
  for b in flipped_run:
    t = int(b["step"])
    k = starts[t] + np.arange(counts[t])
    oi, oj = reference_offsets(5, k, int(sizes[t]), R)
    np.testing.assert_array_equal(b["offset_i"], oi)
    np.testing.assert_array_equal(b["offset_j"], oj)
    np.testing.assert_array_equal(b["flip"], reference_flips(5, k))


def test_offsets_cover_range():
  """Over many samples every legal offset occurs, roughly uniformly."""
  k = np.arange(20000)
  oi, oj = reference_offsets(0, k, 4, R)
  for o in (oi, oj):
    counts = np.bincount(o, minlength=R - 4 + 1)
    assert len(counts) == R - 4 + 1 and counts.min() > 0.8 * len(k) / len(counts)
  assert abs(np.corrcoef(oi, oj)[0, 1]) < 0.05


def test_tf_hash_matches_uniform_from_counter():
  import tensorflow as tf
  c = np.array([0, 1, 2, 12345, 2**40 + 3, 2**62], dtype=np.int64)
  for seed in (0, 7, 2**64 - 5):
    got = pipeline.tf_uniform_from_counter(tf, seed, tf.constant(c)).numpy()
    np.testing.assert_array_equal(got, uniform_from_counter(seed, c))


def test_step_plan_counters():
  sizes, counts, starts = pipeline.step_plan(schedule(), 4, 50)
  np.testing.assert_array_equal(sizes, schedule().sizes_at(np.arange(50)))
  np.testing.assert_array_equal(counts, 4 * (R // sizes))
  assert starts.dtype == np.int64 and starts[0] == 0
  np.testing.assert_array_equal(starts[1:], np.cumsum(counts)[:-1])


def test_resume_gives_identical_batches(images, labels):
  kw = dict(seed=9, labels=labels, label_dim=5, hflip=True)
  full = collect(images, schedule(), BATCH, 12, **kw)
  resumed = collect(images, schedule(), BATCH, 12, start_step=5, **kw)
  assert [int(b["step"]) for b in resumed] == list(range(5, 12))
  for a, b in zip(full[5:], resumed):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  assert collect(images, schedule(), BATCH, 12, start_step=12, **kw) == []


def test_every_image_once_per_epoch(images):
  run = collect(images, schedule(seed=2), BATCH, 30, seed=4)
  order = np.concatenate([b["index"] for b in run])  # counter order
  assert len(order) >= 5 * N
  epochs = [order[e * N:(e + 1) * N] for e in range(len(order) // N)]
  for e, idx in enumerate(epochs):
    np.testing.assert_array_equal(np.sort(idx), np.arange(N), err_msg=f"epoch {e}")
  assert len({tuple(e) for e in epochs}) > 1, "each epoch should use its own permutation"
  other = np.concatenate([b["index"] for b in collect(images, schedule(seed=2), BATCH, 30, seed=5)])
  assert not np.array_equal(order[:len(other)], other[:len(order)]), "seed must change the order"


def test_float_images_pass_through_and_the_step_maps_pixels_to_them(images):
  """Float sources are cropped as stored; uint8 sources leave as uint8, and the step's mapping
  (`train_step.model_images`) gives exactly x / 127.5 - 1 of those pixels in float32."""
  floats = images.astype(np.float32) / 127.5 - 1.0
  a = collect(images, schedule(), BATCH, 4, seed=1)
  b = collect(floats, schedule(), BATCH, 4, seed=1)
  for x, y in zip(a, b):
    assert x["image"].dtype == np.uint8 and y["image"].dtype == np.float32
    np.testing.assert_array_equal(np.asarray(train_step.model_images(x["image"])), y["image"])
  np.testing.assert_array_equal(
      np.asarray(jax.jit(train_step.model_images)(np.arange(256, dtype=np.uint8))),
      np.arange(256, dtype=np.float32) / np.float32(127.5) - np.float32(1))
  np.testing.assert_array_equal(train_step.model_images(y["image"]), y["image"])  # floats as is


def test_progressive_schedule_and_dataset_object(images):
  import tensorflow as tf
  # The walk as if each step counted batches of 256 images over 3 kimg (the official rule reads
  # whole kimg): 4 px below 1 kimg, 8 px below 2 kimg, then full images.
  sched = schedule(kind="progressive", total_kimg=3, batch_size=256)
  ds = pipeline.make_patch_dataset(images, sched, 2, 10)
  assert isinstance(ds, tf.data.Dataset)
  sizes = [b["image"].shape[1] for b in ds.as_numpy_iterator()]
  assert sizes == [4, 8, 8, 16, 16, 16, 16, 16, 16, 16] == list(sched.sizes_at(range(10)))


@pytest.mark.parametrize("kwargs, match", [
    (dict(images=np.zeros((3, R, R + 2, 3), np.uint8)), "square"),
    (dict(images=np.zeros((3, 32, 32, 3), np.uint8)), "resolution 32 does not match"),
    (dict(images=np.zeros((0, R, R, 3), np.uint8)), "empty"),
    (dict(images=np.zeros((3, R, R), np.uint8)), "shape"),
    (dict(images=np.zeros((3, R, R, 3), np.int64)), "dtype"),
    (dict(labels=np.zeros(N - 1, np.int64), label_dim=5), "labels must have shape"),
    (dict(labels=np.full(N, 5), label_dim=5), "out of range for label_dim=5"),
    (dict(labels=np.full(N, -1), label_dim=5), ">= 0"),
    (dict(labels=np.zeros(N, np.int64)), "label_dim is 0"),
    (dict(label_dim=3), "no labels"),
    (dict(start_step=11), "start_step 11 is past total_steps 10"),
    (dict(start_step=-1), "start_step must be >= 0"),
    (dict(batch_size=0), "batch_size"),
])
def test_bad_inputs(kwargs, match, images):
  args = dict(images=images, schedule=schedule(), batch_size=2, total_steps=10)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    pipeline.make_patch_dataset(**args)


# --- Twemoji -----------------------------------------------------------------------------------


def test_load_twemoji_and_cache(tmp_path, monkeypatch):
  imgs = twemoji.load_twemoji(16, limit=20, cache_dir=tmp_path)
  assert imgs.shape == (20, 16, 16, 3) and imgs.dtype == np.uint8
  corners = imgs[:, [0, 0, -1, -1], [0, -1, 0, -1]]  # (20, 4, 3)
  # 1f004 (mahjong tile) and 1f0cf (joker) have transparent corners; the square buttons after
  # them fill theirs (their rounded corners blend to grey at 16 px).
  assert (corners[:2] == 255).all(), "transparent corners must come out white"
  assert imgs.std() > 10, "images should not be blank"
  files = list(tmp_path.glob("*.npz"))
  assert len(files) == 1 and "16px" in files[0].name
  assert not list(tmp_path.glob("*.tmp"))

  def fail(*a, **k):
    raise AssertionError("decoded again instead of reading the cache")

  monkeypatch.setattr(twemoji, "_decode_twemoji", fail)
  again = twemoji.load_twemoji(16, limit=20, cache_dir=tmp_path)
  np.testing.assert_array_equal(again, imgs)
  # Deterministic order: the same files in sorted order.
  names = [p.name for p in twemoji.twemoji_files(20)]
  assert names == sorted(names)


def test_twemoji_alpha_blend_on_white(tmp_path):
  """At 72 px (no resize) fully transparent pixels are exactly white, opaque ones unchanged."""
  from PIL import Image
  imgs = twemoji.load_twemoji(72, limit=3, cache_dir=tmp_path)
  for img, path in zip(imgs, twemoji.twemoji_files(3)):
    with Image.open(path) as im:
      rgba = np.asarray(im.convert("RGBA"))
    clear, opaque = rgba[..., 3] == 0, rgba[..., 3] == 255
    assert clear.any() and opaque.any()
    assert (img[clear] == 255).all()
    np.testing.assert_array_equal(img[opaque], rgba[..., :3][opaque])


def test_twemoji_cache_dir_from_env(tmp_path, monkeypatch):
  monkeypatch.setenv("PATCHDIFF_CACHE", str(tmp_path / "env_cache"))
  imgs = twemoji.load_twemoji(8, limit=3)
  assert imgs.shape == (3, 8, 8, 3)
  assert len(list((tmp_path / "env_cache").glob("*.npz"))) == 1
  # A full-set cache serves any limit without decoding.
  full_name = [p for p in (tmp_path / "env_cache").glob("*.npz")][0].name.replace("_first3", "")
  fake = np.arange(5 * 8 * 8 * 3, dtype=np.uint8).reshape(5, 8, 8, 3)
  np.savez(tmp_path / "env_cache" / full_name, images=fake)
  np.testing.assert_array_equal(twemoji.load_twemoji(8, limit=2), fake[:2])
  assert twemoji.load_twemoji(8).shape == (5, 8, 8, 3)
  assert os.environ["PATCHDIFF_CACHE"].endswith("env_cache")


def test_twemoji_bad_args(tmp_path):
  with pytest.raises(ValueError, match="resolution"):
    twemoji.load_twemoji(0, limit=1, cache_dir=tmp_path)
  with pytest.raises(ValueError, match="limit"):
    twemoji.load_twemoji(8, limit=0, cache_dir=tmp_path)
  with pytest.raises(ValueError, match="'Smileys' is not one of"):
    twemoji.load_twemoji(8, category="Smileys", cache_dir=tmp_path)
  with pytest.raises(ValueError, match="needs its size, limit"):
    twemoji.load_twemoji(8, subset_seed=0, cache_dir=tmp_path)


def test_twemoji_category_and_random_subset(tmp_path):
  full = twemoji.load_twemoji(8, cache_dir=tmp_path)
  names = [p.name for p in twemoji.twemoji_files()]
  faces = twemoji.load_twemoji(8, category="Smileys & Emotion", cache_dir=tmp_path)
  want = [names.index(n) for n in ("1f600.png", "1f60d.png", "1f62d.png", "2639.png", "1f494.png",
                                   "1f49c.png")]  # faces and hearts, listed by hand
  cats = twemoji.twemoji_category_of(names)
  assert all(cats[i] == "Smileys & Emotion" for i in want)
  assert cats[names.index("1f1fa-1f1f8.png")] == "Flags" and cats[names.index("1f1e6.png")] is None
  keep = [i for i, c in enumerate(cats) if c == "Smileys & Emotion"]
  assert len(faces) == len(keep) == 168
  np.testing.assert_array_equal(faces, full[keep])
  picked = twemoji.twemoji_selection(limit=400, subset_seed=0)
  np.testing.assert_array_equal(twemoji.load_twemoji(8, limit=400, subset_seed=0, cache_dir=tmp_path),
                                full[picked])
  np.testing.assert_array_equal(picked, twemoji.twemoji_selection(limit=400, subset_seed=0))
  assert len(set(picked)) == 400 and list(picked) == sorted(picked)  # distinct, in file order
  # Spread over the set, not its first 400 files (which are flags and letters).
  assert picked.min() < 400 and picked.max() > 3600 and np.sum(picked >= 400) > 300
  assert not np.array_equal(picked, twemoji.twemoji_selection(limit=400, subset_seed=1))
  np.testing.assert_array_equal(twemoji.twemoji_selection("Smileys & Emotion", 10), keep[:10])


# --- hosts and exact crops ---------------------------------------------------------------------


def test_two_hosts_slice_the_global_batch(images, labels):
  kw = dict(seed=3, labels=labels, label_dim=5, hflip=True)
  one = collect(images, schedule(), 4, 6, **kw)
  hosts = [collect(images, schedule(), 4, 6, process_index=p, process_count=2, **kw)
           for p in (0, 1)]
  sizes, counts, starts = pipeline.step_plan(schedule(), 4, 6)
  for t, (g, h0, h1) in enumerate(zip(one, *hosts)):
    np.testing.assert_array_equal(g["counter"], starts[t] + np.arange(counts[t]))
    assert not set(h0["counter"]) & set(h1["counter"])
    for key in g:
      if key != "step":
        np.testing.assert_array_equal(np.concatenate([h0[key], h1[key]]), g[key], err_msg=key)
  with pytest.raises(ValueError, match=r"16 px bucket \(3 samples = batch_size 3 x batch_mul 1\)"
                     r" is not divisible by process_count 2"):
    pipeline.make_patch_dataset(images, schedule(), 3, 4, process_index=1, process_count=2)
  with pytest.raises(ValueError, match="process_count must be >= 1"):
    pipeline.make_patch_dataset(images, schedule(), 4, 4, process_count=0)


def test_crops_exact_at_large_resolution():
  """Nearest-neighbour crop boxes copy whole pixels exactly, also far from R = 16."""
  res = 512
  rng = np.random.default_rng(0)
  imgs = rng.integers(0, 256, (2, res, res, 3), dtype=np.uint8)
  sched = PatchSchedule((128, 256, 512), (0.4, 0.4, 0.2), res, seed=0)
  run = collect(imgs, sched, 1, 6, seed=2, hflip=True)
  for b in run:
    n, s = b["image"].shape[:2]
    for m in range(n):
      src = imgs[b["index"][m]]
      src = src[:, ::-1] if b["flip"][m] else src
      oi, oj = b["offset_i"][m], b["offset_j"][m]
      np.testing.assert_array_equal(b["image"][m], src[oi:oi + s, oj:oj + s])
    np.testing.assert_array_equal(b["pos"], coord_grid(b["offset_i"], b["offset_j"], s, res))


def test_pos_is_coord_grid_of_the_offsets_bit_for_bit():
  """The pipeline computes `pos` with `patches.coord_grid` itself (on TF tensors): the same bits
  as numpy's, also where 1 / (R - 1) is inexact (R = 24) and for flipped samples."""
  res = 24
  imgs = np.zeros((5, res, res, 1), np.uint8)
  sched = PatchSchedule((6, 12, 24), (0.4, 0.4, 0.2), res, seed=3)
  for b in collect(imgs, sched, 2, 8, seed=1, hflip=True):
    s = b["image"].shape[1]
    np.testing.assert_array_equal(b["pos"], coord_grid(b["offset_i"], b["offset_j"], s, res))
