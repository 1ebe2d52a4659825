"""train.init_from: starting a run from a patchdiff checkpoint, official Patch Diffusion weights,
or an EDM network without coordinate inputs (whose coordinate weights start at zero)."""
import logging

import numpy as np
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from conftest import ADM_TINY, DDPMPP_TINY
from test_train import watch_compiles
from tiny import tiny_config
from patchdiff import checkpoint, config_lib, generate, patches, pretrained, train
from patchdiff.nn import edm, models, torch_io
from patchdiff.weights import files


def nhwc(a):
  return np.transpose(a, (0, 2, 3, 1))


def network_part(out, x, sigma):
  """D - c_skip x = c_out F: the part of the output that the network computes, compared as the
  parity tests compare it (tests/test_networks.py: it is only 2-6% of D)."""
  c_skip = edm.SIGMA_DATA ** 2 / (np.asarray(sigma, np.float64) ** 2 + edm.SIGMA_DATA ** 2)
  return np.asarray(out, np.float64) - c_skip.reshape(-1, 1, 1, 1) * x


def rel_l2(a, b):
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def coordinates(batch: int, size: int = 16):
  """Three different coordinate inputs: the full grid, a grid of shifted crops, random values."""
  zeros = np.zeros(batch, np.int64)
  full = patches.coord_grid(zeros, zeros, size, size)
  shifted = patches.coord_grid(zeros + 3, zeros + 5, size, 3 * size)
  noise = np.random.default_rng(0).uniform(-3, 3, (batch, size, size, 2))
  return [np.asarray(p, np.float32) for p in (full, shifted, noise)]


def init(cfg):
  """(run, the checked weights, the run's initial state) of `cfg` with `train.init_from`."""
  run = train.Run(cfg)
  weights = pretrained.load(cfg.train.init_from, cfg)
  return run, weights, run.init_state(weights.values)


def denoiser(run, state, which="params"):
  return nnx.merge(run.graphdef, state[which], state["buffers"])


def forward(graphdef):
  """D(states, x, sigma, pos) of the denoiser `graphdef`, jitted: one program serves every
  set of weights and coordinates (running the network op by op takes much longer)."""
  return jax.jit(lambda states, x, sigma, pos: nnx.merge(graphdef, *states)(x, sigma, pos))


def labelled_config(model: dict, **overrides):
  """tiny_config with `model`'s network, on synthetic labelled data where it is conditional."""
  c = tiny_config()
  for key, value in model.items():
    c.model[key] = value
  if c.model.get("label_dim"):
    c.data.source = "synthetic"
    c.data.labels = True
  return config_lib.override(c, overrides)


# ---------------------------------------------------------------------------------------------
# An EDM network without coordinate inputs: the same function, whatever the coordinates.

@pytest.mark.parametrize("file", ["edm_ddpmpp_tiny_weights.npz", "edm_ddpmpp_tiny_snapshot.pkl"])
def test_edm_network_is_the_same_function_for_any_coordinates(reference, file):
  cfg = tiny_config(**{"train.init_from": str(reference / "parity" / file)})
  run, weights, state = init(cfg)
  assert weights.zeroed == ["model.enc.16x16_conv.weight"] and weights.fresh == []
  with np.load(reference / "parity" / "edm_ddpmpp_tiny_io.npz") as f:
    x, sigma, expected = nhwc(f["x"]), f["sigma"], nhwc(f["D"])
  apply = forward(run.graphdef)
  for which in ("params", "ema"):
    w = np.asarray(denoiser(run, state, which).model.enc["16x16_conv"].weight[...])
    # HWIO: input channels 0-2 the image's, 3-4 the coordinates (x, y).
    assert w.shape == (3, 3, 5, 16) and not w[:, :, 3:].any() and w[:, :, :3].all()
    outs = [np.asarray(apply((state[which], state["buffers"]), x, sigma, pos))
            for pos in coordinates(3)]
    for out in outs:  # the tolerance of the parity tests (tests/test_networks.py)
      assert rel_l2(network_part(out, x, sigma), network_part(expected, x, sigma)) < 1e-6
      np.testing.assert_allclose(out, outs[0], rtol=0, atol=1e-6)


def _randomised(cfg: dict, seed: int):
  """A patch denoiser of `cfg` whose every weight is random (also those a fresh network starts
  at zero or 1e-5), so that the coordinates and every layer count in its output."""
  graphdef, state = models.init_denoiser_state(cfg, seed=seed)
  rng = np.random.default_rng(seed)
  return graphdef, jax.tree_util.tree_map(
      lambda x: jnp.asarray(x + 0.2 * rng.standard_normal(x.shape), jnp.float32), state)


NCSNPP = dict(arch="ncsnpp", img_resolution=16, img_channels=3, model_channels=16,
              channel_mult=(1, 2, 2), num_blocks=1, attn_resolutions=(8,), dropout=0.0)


@pytest.mark.parametrize("cfg,inputs", [
    (DDPMPP_TINY, ["16x16_conv"]),
    # The residual encoder's first aux conv reads the input; the next one the sum before it.
    (NCSNPP, ["16x16_conv", "8x8_aux_residual"]),
    (dict(NCSNPP, encoder_type="skip"), ["16x16_conv", "8x8_aux_skip", "4x4_aux_skip"]),
    (ADM_TINY, ["16x16_conv"]),
], ids=["ddpmpp", "ncsnpp_residual", "ncsnpp_skip", "adm"])
def test_every_layer_reading_the_input_starts_at_zero_for_the_coordinates(cfg, inputs):
  """A random patch network's weights, saved without their coordinate inputs as an EDM network
  would have them and loaded back: the result is the network at zero coordinates, whatever the
  coordinates."""
  graphdef, state = _randomised(cfg, seed=1)
  original = nnx.merge(graphdef, state)
  names = [f"model.enc.{n}.weight" for n in inputs]
  assert models.input_weights(original) == names
  sd = models.torch_state_dict(original)
  for name in names:
    sd[name] = sd[name][:, :cfg["img_channels"]]  # (out, in, kh, kw): EDM's inputs
  values, zeroed, fresh = models.pretrained_values(sd, cfg)
  assert zeroed == names and fresh == []
  blank = jax.tree_util.tree_map(jnp.zeros_like, state)  # every value must come from the file
  loaded = models.set_variables(graphdef, blank, values)
  apply = forward(graphdef)
  x = np.asarray(jax.random.normal(jax.random.key(3), (2, 16, 16, 3)))
  sigma = np.array([0.3, 4.0], np.float32)
  reference = np.asarray(apply((state,), x, sigma, np.zeros((2, 16, 16, 2), np.float32)))
  pos = coordinates(2)
  assert rel_l2(network_part(apply((state,), x, sigma, pos[2]), x, sigma),
                network_part(reference, x, sigma)) > 1e-2  # the coordinates do count there
  for p in pos:
    out = np.asarray(apply((loaded,), x, sigma, p))
    assert rel_l2(network_part(out, x, sigma), network_part(reference, x, sigma)) < 1e-6


# ---------------------------------------------------------------------------------------------
# Official patch weights and patchdiff checkpoints load as they are.

def _assert_state_holds(run, state, expected: dict):
  for which in ("params", "ema"):
    got = models.torch_state_dict(denoiser(run, state, which))
    assert set(got) == set(expected)
    for name in got:
      np.testing.assert_array_equal(got[name], expected[name], err_msg=f"{which} {name}")


@pytest.mark.parametrize("file", ["ddpmpp_tiny_weights.npz", "ddpmpp_tiny_snapshot.pkl"])
def test_official_patch_weights_are_the_files(reference, file):
  cfg = tiny_config(**{"train.init_from": str(reference / "parity" / file)})
  run, weights, state = init(cfg)
  assert weights.zeroed == [] and weights.fresh == []
  with np.load(reference / "parity" / "ddpmpp_tiny_weights.npz") as f:
    _assert_state_holds(run, state, {k: f[k] for k in f.files})
  # The optimizer, the step and the counters start fresh.
  assert int(state["step"]) == 0 and int(state["nonfinite_total"]) == 0
  assert not any(np.any(np.asarray(x)) for x in jax.tree_util.tree_leaves(state["opt_state"]))
  # Laid out with the run's shardings.
  for x, s in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(
      run.state_shardings)):
    assert x.sharding == s


def test_init_from_a_patchdiff_checkpoint_and_a_step(tmp_path):
  cfg = tiny_config()
  nets = {step: models.create_denoiser(cfg.model, seed=step) for step in (7, 9)}
  for step, net in nets.items():
    checkpoint.save_weights(str(tmp_path / "src"), net, cfg, step=step)
  for spec, step in ((str(tmp_path / "src"), 9), (f"{tmp_path / 'src'}@7", 7)):
    run, weights, state = init(config_lib.override(cfg.copy_and_resolve_references(),
                                                   {"train.init_from": spec}))
    assert f"step {step}" in weights.source
    _assert_state_holds(run, state, models.torch_state_dict(nets[step]))
  with pytest.raises(FileNotFoundError, match=r"train.init_from=.*src@8: no checkpoint at step 8"
                     r".*available: \[7, 9\]"):
    pretrained.load(f"{tmp_path / 'src'}@8", cfg)
  with pytest.raises(FileNotFoundError, match=r"train.init_from=.*empty: no checkpoint in"):
    (tmp_path / "empty").mkdir()
    pretrained.load(str(tmp_path / "empty"), cfg)


def _fresh_label_embedding(cfg):
  """The label embedding of a fresh run of `cfg`."""
  run = train.Run(cfg)
  fresh = models.torch_state_dict(denoiser(run, run.init_state()))
  return {k: v for k, v in fresh.items() if k.startswith(models.LABEL_PREFIX)}


@pytest.mark.parametrize("source,model", [
    ("adm_tiny_cond_weights.npz", dict(ADM_TINY, label_dim=7)),  # 5 classes -> 7
    ("ddpmpp_tiny_snapshot.pkl", dict(DDPMPP_TINY, label_dim=3)),  # unconditional -> 3 classes
    ("checkpoint", dict(DDPMPP_TINY, label_dim=3)),
])
def test_another_label_dimension_needs_the_reset(reference, tmp_path, source, model):
  if source == "checkpoint":  # a patchdiff checkpoint of the unconditional fixture network
    path = str(tmp_path / "ckpt")
    sd = files.read_state_dict(reference / "parity" / "ddpmpp_tiny_weights.npz")
    checkpoint.save_weights(path, models.load_torch_state_dict(sd, DDPMPP_TINY), tiny_config(),
                            step=3)
  else:
    path = str(reference / "parity" / source)
  cfg = labelled_config(model, **{"train.init_from": path})
  file_dim = 5 if source.startswith("adm") else 0
  compiles = watch_compiles()
  with pytest.raises(ValueError, match=rf"(?s)train.init_from={path}: .*label dimension: the "
                     rf"file's label embedding takes {file_dim} labels.*model.label_dim="
                     rf"{model['label_dim']}; set train.init_reset_labels=True"):
    train.train_and_evaluate(cfg, str(tmp_path / "run"))
  assert not compiles, f"compiled {len(compiles)} program(s) before the error"

  cfg.train.init_reset_labels = True
  run, weights, state = init(cfg)
  fresh = _fresh_label_embedding(cfg)
  assert sorted(weights.fresh) == sorted(fresh) and fresh
  got = models.torch_state_dict(denoiser(run, state))
  for name, value in fresh.items():  # the run's own fresh init
    np.testing.assert_array_equal(got[name], value, err_msg=name)
  fixture = "adm_tiny_cond" if source.startswith("adm") else "ddpmpp_tiny"
  with np.load(reference / "parity" / f"{fixture}_weights.npz") as f:
    for name in f.files:  # every other tensor is the file's
      if not name.startswith(models.LABEL_PREFIX):
        np.testing.assert_array_equal(got[name], f[name], err_msg=name)


# ---------------------------------------------------------------------------------------------
# What does not fit fails before anything is compiled, naming the file, tensors and config keys.

def _renamed(reference, tmp_path):
  with np.load(reference / "parity" / "ddpmpp_tiny_weights.npz") as f:
    sd = {k: f[k] for k in f.files}
  sd["model.map_layer9.weight"] = sd.pop("model.map_layer0.weight")
  np.savez(tmp_path / "renamed.npz", **sd)
  return tmp_path / "renamed.npz"


@pytest.mark.parametrize("case", ["missing", "format", "shapes", "snapshot_shapes", "names",
                                  "edm_channels"])
def test_weights_that_do_not_fit_fail_before_compiling(reference, tmp_path, case):
  parity = reference / "parity"
  overrides = {}
  if case == "missing":
    path, error = tmp_path / "none.npz", FileNotFoundError
    match = r"train.init_from=.*none.npz: no such file or directory"
  elif case == "format":
    (tmp_path / "w.bin").write_bytes(b"x")
    path, error, match = tmp_path / "w.bin", ValueError, r"train.init_from=.*w.bin: .*expected .npz"
  elif case in ("shapes", "snapshot_shapes"):
    path = parity / ("ddpmpp_tiny_weights.npz" if case == "shapes" else "ddpmpp_tiny_snapshot.pkl")
    overrides, error = {"model.model_channels": 32}, ValueError
    match = (rf"(?s)train.init_from={path}: the tensors do not match the model config \("
             r"arch='ddpmpp', img_resolution=16, img_channels=3, label_dim=0, model_channels=32.*"
             r"0 missing, 0 unexpected, 141 mis-shaped.*model.dec.16x16_aux_conv.weight: expected "
             r"shape \(3, 32, 3, 3\), got \(3, 16, 3, 3\).*and 136 more like these")
    if case == "snapshot_shapes":
      match += (r".*the snapshot's network has model_channels=16, the config's "
                r"model.model_channels=32")
  elif case == "names":
    path, error = _renamed(reference, tmp_path), ValueError
    match = (r"(?s)1 missing, 1 unexpected, 0 mis-shaped.*missing tensor model.map_layer0.weight "
             r"\(64, 16\).*unexpected tensor model.map_layer9.weight \(64, 16\)")
  else:  # an EDM network of 3 image channels for a 4-channel model: not the coordinate case
    path, error = parity / "edm_ddpmpp_tiny_snapshot.pkl", ValueError
    overrides = {"model.img_channels": 4, "data.source": "synthetic"}
    match = (r"(?s)model.enc.16x16_conv.weight: expected shape \(16, 6, 3, 3\), got \(16, 3, 3, "
             r"3\).*the snapshot's network takes 3 image channels \(img_channels=3\), the "
             r"config's model.img_channels=4")
  cfg = tiny_config(**{"train.init_from": str(path), **overrides})
  compiles = watch_compiles()
  with pytest.raises(error, match=match):
    train.train_and_evaluate(cfg, str(tmp_path / "run"))
  assert not compiles, f"compiled {len(compiles)} program(s) before the error"


def test_other_preconditionings_are_refused(reference, monkeypatch):
  read = files.read_snapshot

  def as_vp(path):
    sd, info = read(path)
    return sd, dict(info, class_name="VPPrecond")
  monkeypatch.setattr(files, "read_snapshot", as_vp)
  path = reference / "parity" / "edm_ddpmpp_tiny_snapshot.pkl"
  with pytest.raises(ValueError, match=r"network is a VPPrecond; only \('Patch_EDMPrecond', "
                     r"'EDMPrecond'\)"):
    pretrained.load(str(path), tiny_config())


def test_an_empty_init_from_is_refused_by_the_config_check():
  for value in ("", "  "):
    with pytest.raises(ValueError, match=f"train.init_from='{value}' must be a path"):
      config_lib.validate(tiny_config(**{"train.init_from": value}))


# ---------------------------------------------------------------------------------------------
# Fine-tuning end to end: trains from the EDM network, checkpoints, resumes, samples.

def test_fine_tuning_an_edm_network(reference, tmp_path, caplog):
  edm_pkl = str(reference / "parity" / "edm_ddpmpp_tiny_snapshot.pkl")
  cfg = tiny_config(**{"train.init_from": edm_pkl, "train.steps": 1, "train.log_every": 1,
                       "train.checkpoint_every": 2, "train.keep_checkpoints": 5,
                       "sample.grid_size": 0})
  workdir = tmp_path / "finetune"
  train.train_and_evaluate(cfg, str(workdir))
  with np.load(reference / "parity" / "edm_ddpmpp_tiny_weights.npz") as f:
    edm_sd = {k: f[k] for k in f.files}
  run = train.Run(cfg)
  mgr = checkpoint.manager(str(workdir), create=False)
  state, progress = checkpoint.restore_state(mgr, 1, run.abstract_state)
  mgr.close()
  # Step 0 runs at learning rate 0 (the ramp starts again from 0 images) and the EMA copies the
  # weights: after it, both are the EDM network's, the coordinate weights zero.
  assert progress["nimg"] == run.nimg(1) and int(state["step"]) == 1
  for which in ("params", "ema"):
    got = models.torch_state_dict(denoiser(run, state, which))
    w = got["model.enc.16x16_conv.weight"]
    np.testing.assert_array_equal(w[:, :3], edm_sd["model.enc.16x16_conv.weight"])
    assert not w[:, 3:].any()
    for name in edm_sd:
      if name != "model.enc.16x16_conv.weight":
        np.testing.assert_array_equal(got[name], edm_sd[name], err_msg=name)
  assert any(np.any(np.asarray(x)) for x in jax.tree_util.tree_leaves(state["opt_state"]))

  # Resumed with more steps: init_from is ignored (here it names no file at all) and logged.
  cfg.train.steps = 6
  cfg.train.init_from = str(tmp_path / "gone.pkl")
  with caplog.at_level(logging.INFO):
    metrics = train.train_and_evaluate(cfg, str(workdir))
  assert ("is ignored: the workdir holds a checkpoint, the run resumes from its step 1"
          in caplog.text)
  assert np.isfinite(metrics["loss"])
  mgr = checkpoint.manager(str(workdir), create=False)
  assert list(mgr.all_steps()) == [1, 2, 4, 6]
  state, _ = checkpoint.restore_state(mgr, 6, run.abstract_state)
  mgr.close()
  assert int(state["step"]) == 6
  params = denoiser(run, state)
  assert np.asarray(params.model.enc["16x16_conv"].weight[...])[:, :, 3:].any()  # trained
  # A run initialised from this workdir takes its EMA weights (our layout), not its parameters.
  weights = pretrained.load(str(workdir), cfg)
  ema = torch_io.variables(denoiser(run, state, "ema"), models.TORCH_LAYERS)
  assert set(weights.values) == set(ema)
  for name, (var, _) in ema.items():
    np.testing.assert_array_equal(weights.values[name], var[...], err_msg=name)
  conv = weights.values["model.enc.16x16_conv.weight"]
  assert not np.array_equal(conv, params.model.enc["16x16_conv"].weight[...])

  _, images = generate.sample_from_checkpoint(cfg, str(workdir), seeds=[0, 1, 2],
                                              keep_all=True)
  assert images.shape == (3, 16, 16, 3) and images.dtype == np.uint8 and images.std() > 0
