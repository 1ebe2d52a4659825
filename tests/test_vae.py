"""The VAE is diffusers' AutoencoderKL: parity with the fixture, exact SD VAE names and shapes.

Also loading from diffusers-format folders (current and old attention names) and its errors.
"""
import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from conftest import state_dict_shapes
from patchdiff.nn import torch_io, vae as vae_lib

SD_VAE_CONFIG = vae_lib.SD_VAE_CONFIG
SD_VAE_PARAMS = 83_653_863


def nhwc(a):
  return np.transpose(a, (0, 2, 3, 1))


def rel_l2(a, b):
  return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def tiny(reference):
  parity = reference / "parity"
  config = json.loads((parity / "vae_tiny_config.json").read_text())
  with np.load(parity / "vae_tiny_weights.npz") as f:
    weights = {k: f[k] for k in f.files}
  with np.load(parity / "vae_tiny_io.npz") as f:
    io = {k: f[k] for k in f.files}
  return config, weights, io


@pytest.fixture(scope="module")
def tiny_outputs(tiny):
  """(mean, std, decoded) of the fixture's inputs through the VAE loaded from arrays."""
  config, weights, io = tiny
  vae = vae_lib.load_vae_from_arrays(config, weights)
  return _run(vae, io)


def _run(vae, io):
  mean, std = vae_lib.encode_fn(vae)(jnp.asarray(nhwc(io["x"])))
  decoded = vae_lib.decode_fn(vae)(jnp.asarray(nhwc(io["z"])))
  return np.asarray(mean), np.asarray(std), np.asarray(decoded)


def _write_folder(folder, config, weights):
  folder.mkdir(parents=True, exist_ok=True)
  (folder / "config.json").write_text(json.dumps(config))
  save_file({k: np.ascontiguousarray(v) for k, v in weights.items()},
            str(folder / "diffusion_pytorch_model.safetensors"))
  return folder


def test_matches_diffusers(tiny, tiny_outputs):
  _, _, io = tiny
  mean, std, decoded = tiny_outputs
  assert mean.shape == std.shape == (2, 8, 8, 4) and mean.dtype == np.float32
  assert decoded.shape == (2, 32, 32, 3)
  # Measured on the CPU: 2e-7, 4e-8 and 5e-7.
  assert rel_l2(mean, nhwc(io["posterior_mean"])) < 1e-6
  assert rel_l2(std, nhwc(io["posterior_std"])) < 1e-6
  assert rel_l2(decoded, nhwc(io["decoded"])) < 2e-6


def test_state_dict_round_trips_the_fixture(tiny):
  config, weights, _ = tiny
  vae = vae_lib.load_vae_from_arrays(config, weights)
  sd = vae_lib.state_dict(vae)
  assert sorted(sd) == sorted(weights)
  for name, array in weights.items():
    np.testing.assert_array_equal(sd[name], array, err_msg=name)
  assert torch_io.count_params(vae) == sum(a.size for a in weights.values())
  assert vae.scaling_factor == pytest.approx(0.18215)
  assert vae.downsample_factor == 4 and vae.latent_channels == 4


def test_sd_vae_names_and_shapes_match_diffusers(reference):
  vae = vae_lib.abstract_vae(SD_VAE_CONFIG)  # no memory is allocated
  ours = {name: tuple(v.shape) for name, v in vae_lib.state_dict(vae).items()}
  assert ours == state_dict_shapes(reference / "sd_vae_state_dict.txt")
  assert torch_io.count_params(vae) == SD_VAE_PARAMS
  assert vae.downsample_factor == 8 and vae.scaling_factor == pytest.approx(0.18215)


def test_missing_config_keys_take_diffusers_defaults():
  full = vae_lib.resolve_config({})
  assert full == dict(vae_lib.DEFAULT_CONFIG, down_block_types=("DownEncoderBlock2D",),
                      up_block_types=("UpDecoderBlock2D",), block_out_channels=(64,))
  assert full["norm_num_groups"] == 32 and full["layers_per_block"] == 1
  assert full["use_quant_conv"] and full["use_post_quant_conv"]
  assert full["mid_block_add_attention"] and full["act_fn"] == "silu"


def test_loads_a_diffusers_folder(tiny, tiny_outputs, tmp_path):
  config, weights, io = tiny
  folder = _write_folder(tmp_path / "vae", config, weights)
  for path in (folder, tmp_path, folder / "diffusion_pytorch_model.safetensors"):  # pipeline too
    vae = vae_lib.load_vae(path)
    for ours, expected in zip(_run(vae, io), tiny_outputs):
      np.testing.assert_array_equal(ours, expected)


def test_loads_old_attention_names_stored_as_1x1_convs(tiny, tiny_outputs, tmp_path):
  config, weights, io = tiny
  old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
  renamed = {}
  for name, array in weights.items():
    for new, legacy in old.items():
      if f".attentions.0.{new}." in name:
        name = name.replace(f".{new}.", f".{legacy}.")
        array = array[:, :, None, None] if array.ndim == 2 else array
    renamed[name] = array
  assert "encoder.mid_block.attentions.0.proj_attn.weight" in renamed
  vae = vae_lib.load_vae(_write_folder(tmp_path, config, renamed))
  for ours, expected in zip(_run(vae, io), tiny_outputs):
    np.testing.assert_array_equal(ours, expected)
  # Saving writes the current names.
  assert "encoder.mid_block.attentions.0.to_out.0.weight" in vae_lib.state_dict(vae)


def test_reports_every_bad_tensor_in_one_error(tiny, tmp_path):
  config, weights, _ = tiny
  bad = dict(weights)
  del bad["decoder.conv_in.bias"]
  bad["encoder.extra.weight"] = np.zeros((2, 2), np.float32)
  bad["encoder.conv_in.weight"] = np.zeros((32, 3, 1, 1), np.float32)
  _write_folder(tmp_path, config, bad)
  with pytest.raises(ValueError) as e:
    vae_lib.load_vae(tmp_path)
  msg = str(e.value)
  assert str(tmp_path / "diffusion_pytorch_model.safetensors") in msg
  assert "missing tensor decoder.conv_in.bias (64,)" in msg
  assert "unexpected tensor encoder.extra.weight (2, 2)" in msg
  assert "encoder.conv_in.weight: expected shape (32, 3, 3, 3), got (32, 3, 1, 1)" in msg
  assert "1 missing, 1 unexpected, 1 mis-shaped" in msg
  # Each on its own, from arrays.
  for name, value in (("decoder.conv_in.bias", None),
                      ("encoder.extra.weight", np.zeros((2,), np.float32)),
                      ("quant_conv.bias", np.zeros((9,), np.float32))):
    one = dict(weights)
    if value is None:
      del one[name]
    else:
      one[name] = value
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
      vae_lib.load_vae_from_arrays(config, one, source="one.npz")


def test_reports_missing_files(tiny, tmp_path):
  config, weights, _ = tiny
  with pytest.raises(FileNotFoundError, match="nowhere"):
    vae_lib.load_vae(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="config.json"):
    vae_lib.load_vae(tmp_path)
  folder = _write_folder(tmp_path / "vae", config, {"x": np.zeros((1,), np.float32)})
  (folder / "diffusion_pytorch_model.safetensors").unlink()
  with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
    vae_lib.load_vae(folder)
  shutil.rmtree(folder)


@pytest.mark.parametrize("key,value,match", [
    ("act_fn", "gelu", "act_fn='gelu'"),
    ("down_block_types", ["DownEncoderBlock2D", "AttnDownEncoderBlock2D", "DownEncoderBlock2D"],
     "AttnDownEncoderBlock2D"),
    ("up_block_types", ["UpDecoderBlock2D"] * 2 + ["AttnUpDecoderBlock2D"], "AttnUpDecoderBlock2D"),
    ("block_out_channels", [32, 32, 60], "norm_num_groups=8"),
    ("use_linear_projection", True, "unknown keys"),
    ("_class_name", "UNet2DConditionModel", "UNet2DConditionModel"),
])
def test_rejects_unsupported_configs(tiny, tmp_path, key, value, match):
  config, weights, _ = tiny
  bad = dict(config, **{key: value})
  with pytest.raises(ValueError, match=match):
    vae_lib.abstract_vae(bad)
  _write_folder(tmp_path, bad, weights)
  with pytest.raises(ValueError, match="config.json"):  # the file is named
    vae_lib.load_vae(tmp_path)


def test_shapes_and_variants(tiny):
  config, _, _ = tiny
  vae = vae_lib.create(config, seed=0)
  # Batch 2, as in the parity test: the jitted programs compiled there are reused.
  x = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  mean, std = vae_lib.encode_fn(vae)(x)
  assert mean.shape == std.shape == (2, 8, 8, 4)
  assert np.all(np.asarray(std) > 0) and np.all(np.isfinite(mean))
  decoded = vae_lib.decode_fn(vae)(mean)
  assert decoded.shape == (2, 32, 32, 3) and np.all(np.isfinite(decoded))
  with pytest.raises(ValueError, match=r"\(B, H, W, 3\)"):
    vae.encode(jnp.zeros((1, 3, 32, 32)))
  # Without the mid-block attention and the quant convs, the names follow.
  lean = vae_lib.abstract_vae(dict(config, mid_block_add_attention=False, use_quant_conv=False,
                                   use_post_quant_conv=False))
  names = set(vae_lib.state_dict(lean))
  assert not any(".attentions." in n or "quant_conv" in n for n in names)
  assert "decoder.mid_block.resnets.1.conv2.weight" in names
