"""Tests of the FID Inception-v3 feature extractor (random weights; no weight file needed).

The 299x299 network is heavy on CPU, so one randomly initialised model is shared and the forward
passes are few, at batch sizes 2 and 3 (each compiles once; models of the same structure share
the compiled programs).
"""
import importlib.util

import jax.numpy as jnp
import numpy as np
import pytest

from patchdiff import inception


# The architecture as a table, written out independently of the module: PyTorch name ->
# (out, in, kh, kw) of each BasicConv2d (OIHW, as in the weight file).
def _a(name, c_in, pool):
  return {f"{name}.branch1x1": (64, c_in, 1, 1), f"{name}.branch5x5_1": (48, c_in, 1, 1),
          f"{name}.branch5x5_2": (64, 48, 5, 5), f"{name}.branch3x3dbl_1": (64, c_in, 1, 1),
          f"{name}.branch3x3dbl_2": (96, 64, 3, 3), f"{name}.branch3x3dbl_3": (96, 96, 3, 3),
          f"{name}.branch_pool": (pool, c_in, 1, 1)}


def _b(name, c_in):
  return {f"{name}.branch3x3": (384, c_in, 3, 3), f"{name}.branch3x3dbl_1": (64, c_in, 1, 1),
          f"{name}.branch3x3dbl_2": (96, 64, 3, 3), f"{name}.branch3x3dbl_3": (96, 96, 3, 3)}


def _c(name, c_in, c7):
  return {f"{name}.branch1x1": (192, c_in, 1, 1), f"{name}.branch7x7_1": (c7, c_in, 1, 1),
          f"{name}.branch7x7_2": (c7, c7, 1, 7), f"{name}.branch7x7_3": (192, c7, 7, 1),
          f"{name}.branch7x7dbl_1": (c7, c_in, 1, 1), f"{name}.branch7x7dbl_2": (c7, c7, 7, 1),
          f"{name}.branch7x7dbl_3": (c7, c7, 1, 7), f"{name}.branch7x7dbl_4": (c7, c7, 7, 1),
          f"{name}.branch7x7dbl_5": (192, c7, 1, 7), f"{name}.branch_pool": (192, c_in, 1, 1)}


def _d(name, c_in):
  return {f"{name}.branch3x3_1": (192, c_in, 1, 1), f"{name}.branch3x3_2": (320, 192, 3, 3),
          f"{name}.branch7x7x3_1": (192, c_in, 1, 1), f"{name}.branch7x7x3_2": (192, 192, 1, 7),
          f"{name}.branch7x7x3_3": (192, 192, 7, 1), f"{name}.branch7x7x3_4": (192, 192, 3, 3)}


def _e(name, c_in):
  return {f"{name}.branch1x1": (320, c_in, 1, 1), f"{name}.branch3x3_1": (384, c_in, 1, 1),
          f"{name}.branch3x3_2a": (384, 384, 1, 3), f"{name}.branch3x3_2b": (384, 384, 3, 1),
          f"{name}.branch3x3dbl_1": (448, c_in, 1, 1), f"{name}.branch3x3dbl_2": (384, 448, 3, 3),
          f"{name}.branch3x3dbl_3a": (384, 384, 1, 3), f"{name}.branch3x3dbl_3b": (384, 384, 3, 1),
          f"{name}.branch_pool": (192, c_in, 1, 1)}


CONVS = {"Conv2d_1a_3x3": (32, 3, 3, 3), "Conv2d_2a_3x3": (32, 32, 3, 3),
         "Conv2d_2b_3x3": (64, 32, 3, 3), "Conv2d_3b_1x1": (80, 64, 1, 1),
         "Conv2d_4a_3x3": (192, 80, 3, 3),
         **_a("Mixed_5b", 192, 32), **_a("Mixed_5c", 256, 64), **_a("Mixed_5d", 288, 64),
         **_b("Mixed_6a", 288),
         **_c("Mixed_6b", 768, 128), **_c("Mixed_6c", 768, 160), **_c("Mixed_6d", 768, 160),
         **_c("Mixed_6e", 768, 192),
         **_d("Mixed_7a", 768), **_e("Mixed_7b", 1280), **_e("Mixed_7c", 2048)}

# Cross-checks of the figures below: torchvision's Inception3 has 27,161,264 parameters, of which
# AuxLogits (1x1 768->128 + BN, 5x5 128->768 + BN, fc 768->1000) are 3,326,696 and fc (2048->1000)
# 2,049,000, leaving 21,785,568 (conv weights + BN weight and bias). Keras' InceptionV3 (BN
# without scale) reports 23,817,352 trainable, i.e. 21,768,352 without its fc: conv weights + BN
# bias only, which is 17,216 (the BN channel count) less.
CONV_WEIGHTS = 21_751_136
BN_CHANNELS = 17_216
PARAMS = 21_785_568

IMAGES = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def model():
  return inception.create(seed=0)


@pytest.fixture(scope="module")
def feats(model):
  """Features of IMAGES at batch size 3 (one full batch)."""
  return inception.features(model, IMAGES, batch_size=3)


def _torch_state(model):
  """A PyTorch-style state dict with the extra entries of the real weight file."""
  state = inception.state_dict(model)
  for name in list(state):
    if name.endswith(".bn.running_var"):
      state[name.replace("running_var", "num_batches_tracked")] = np.array(0, np.int64)
  state["fc.weight"] = np.zeros((1008, 2048), np.float32)
  state["fc.bias"] = np.zeros((1008,), np.float32)
  return state


def test_avg_pool_excludes_padding():
  x = jnp.full((1, 4, 5, 2), 3.0)
  np.testing.assert_allclose(inception.avg_pool_exclude_pad(x), 3.0, rtol=1e-6)
  # Not the include-padding average, which would give 3 * 4 / 9 at the corners.
  y = np.arange(16, dtype=np.float32).reshape(1, 4, 4, 1)
  out = np.asarray(inception.avg_pool_exclude_pad(jnp.asarray(y)))
  assert out[0, 0, 0, 0] == pytest.approx(np.mean([0, 1, 4, 5]))
  assert out[0, 1, 1, 0] == pytest.approx(np.mean(y[0, :3, :3, 0]))


def test_max_pool_pads_with_minus_infinity():
  x = jnp.full((1, 4, 4, 1), -2.0)
  np.testing.assert_array_equal(inception.max_pool(x, stride=1, padding=1), -2.0)
  assert inception.max_pool(jnp.zeros((1, 35, 35, 1))).shape == (1, 17, 17, 1)


def test_preprocess():
  images = np.array([0, 255], np.uint8).reshape(2, 1, 1, 1) * np.ones((1, 8, 6, 3), np.uint8)
  x = inception.preprocess(images)
  assert x.shape == (2, 299, 299, 3) and x.dtype == jnp.float32
  np.testing.assert_allclose(x[0], -1.0, atol=1e-6)
  np.testing.assert_allclose(x[1], 1.0, atol=1e-6)


def test_inventory(model):
  state = inception.state_dict(model)
  convs = {name[:-len(".conv.weight")]: tuple(v.shape) for name, v in state.items()
           if name.endswith(".conv.weight")}
  assert convs == CONVS
  expected = {f"{name}.{suffix}" for name in CONVS
              for suffix in ("conv.weight", "bn.weight", "bn.bias", "bn.running_mean",
                             "bn.running_var")}
  assert set(state) == expected
  for name, (out, _, _, _) in CONVS.items():
    for suffix in ("bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"):
      assert state[f"{name}.{suffix}"].shape == (out,)
  # The figures from the table, and from the module's own tensors.
  assert sum(np.prod(s) for s in CONVS.values()) == CONV_WEIGHTS
  assert sum(s[0] for s in CONVS.values()) == BN_CHANNELS
  assert CONV_WEIGHTS + 2 * BN_CHANNELS == PARAMS
  assert CONV_WEIGHTS + BN_CHANNELS == 21_768_352
  trainable = sum(v.size for name, v in state.items() if not name.endswith(("running_mean",
                                                                              "running_var")))
  assert trainable == PARAMS


def test_features(model, feats):
  assert feats.shape == (3, 2048) and feats.dtype == np.float64
  assert np.all(np.isfinite(feats)) and np.all(feats >= 0) and np.any(feats > 0)
  assert not np.allclose(feats[0], feats[1]) and not np.allclose(feats[1], feats[2])
  # Batch size 2: one full batch and one padded one, same program for both.
  np.testing.assert_allclose(inception.features(model, IMAGES, batch_size=2), feats,
                             rtol=1e-5, atol=1e-7)
  assert inception.features(model, IMAGES[:0]).shape == (0, 2048)
  with pytest.raises(ValueError, match="uint8"):
    inception.features(model, IMAGES.astype(np.float32))


def test_load_state_dict_round_trip(model, feats):
  other = inception.create(seed=1)
  inception.load_state_dict(other, _torch_state(model))  # fc.* and num_batches_tracked ignored
  # Same structure and batch size as test_features' batch-2 call: no new compile.
  np.testing.assert_array_equal(inception.features(other, IMAGES[:2], batch_size=2),
                                inception.features(model, IMAGES[:2], batch_size=2))
  np.testing.assert_allclose(inception.features(other, IMAGES[:2], batch_size=2), feats[:2],
                             rtol=1e-5, atol=1e-7)


def test_load_state_dict_reports_every_problem(model):
  state = _torch_state(model)
  del state["Mixed_6c.branch7x7_2.conv.weight"]
  state["Mixed_5b.branch9x9.conv.weight"] = np.zeros((1,), np.float32)
  state["Mixed_7c.branch_pool.bn.running_var"] = np.ones((193,), np.float32)
  state["Conv2d_1a_3x3.conv.weight"] = np.zeros((32, 3, 3, 3, 1), np.float32)
  target = inception.create(seed=2)
  before = np.asarray(target.Conv2d_2a_3x3.conv.kernel.get_value())
  with pytest.raises(ValueError) as err:
    inception.load_state_dict(target, state)
  msg = str(err.value)
  for name in ("Mixed_6c.branch7x7_2.conv.weight", "Mixed_5b.branch9x9.conv.weight",
               "Mixed_7c.branch_pool.bn.running_var", "(192,)", "(193,)",
               "Conv2d_1a_3x3.conv.weight", "(32, 3, 3, 3)", "(32, 3, 3, 3, 1)"):
    assert name in msg
  assert "fc." not in msg and "num_batches_tracked" not in msg
  # Nothing is loaded when the dict does not match.
  np.testing.assert_array_equal(target.Conv2d_2a_3x3.conv.kernel.get_value(), before)


def test_load_weights(model, tmp_path):
  missing = tmp_path / "nope.npz"
  with pytest.raises(FileNotFoundError, match="nope.npz"):
    inception.load_weights(missing)
  path = tmp_path / "inception.npz"
  np.savez(path, **_torch_state(model))
  loaded = inception.load_weights(path)
  want, got = inception.state_dict(model), inception.state_dict(loaded)
  assert set(want) == set(got)
  for name, value in want.items():
    np.testing.assert_array_equal(got[name], value, err_msg=name)
  bad = tmp_path / "inception.bin"
  bad.write_bytes(b"")
  with pytest.raises(ValueError, match="unsupported"):
    inception.load_weights(bad)


@pytest.mark.skipif(importlib.util.find_spec("torch") is not None, reason="torch is installed")
def test_load_weights_pth_without_torch(tmp_path):
  path = tmp_path / "pt_inception.pth"
  path.write_bytes(b"not read")
  with pytest.raises(ImportError, match="npz"):
    inception.load_weights(path)


def test_a_damaged_weight_file_is_refused_by_its_name_hash(tmp_path):
  path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
  path.write_bytes(b"not the published file")
  with pytest.raises(ValueError, match="SHA-256 begins .* but its name says 6726825d"):
    inception.load_weights(path)
