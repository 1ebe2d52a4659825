"""`--network=X.pkl`: sampling and evaluating an official snapshot with no config file, and
`patchdiff.convert` without --config. Run in-process through the entry point's own flags."""
import json
import os

import numpy as np
import pytest
from absl import app

from conftest import ADM_TINY, DDPMPP_TINY, main_in_process
from patchdiff import checkpoint, config_lib, convert, metrics, pretrained
from patchdiff.nn import models

SNAPSHOTS = {"ddpmpp_tiny": DDPMPP_TINY, "adm_tiny_cond": dict(ADM_TINY, label_dim=5),
             "edm_ddpmpp_tiny": DDPMPP_TINY}
# The sampler the paper used per architecture (config_lib's presets for its 64 px and latent
# configs): (num_steps, s_churn, s_min, s_max, s_noise).
PAPER_SAMPLER = {"ddpmpp": (50, 0.0, 0.0, float("inf"), 1.0), "adm": (256, 40.0, 0.05, 50.0, 1.003)}
SAMPLE = ["--seeds=0-2", "--steps=4", "--format=npz"]


run_main = main_in_process


def snapshot(reference, name):
  return str(reference / "parity" / f"{name}_snapshot.pkl")


@pytest.mark.parametrize("name", sorted(SNAPSHOTS))
def test_a_snapshot_samples_as_its_converted_checkpoint_bit_for_bit(reference, tmp_path, name):
  path = snapshot(reference, name)
  run_main("--mode=sample", f"--network={path}", f"--outdir={tmp_path / 'network'}", *SAMPLE)
  workdir = str(tmp_path / "converted")
  convert.convert(path, workdir)  # no config: the snapshot's own
  stored = checkpoint.stored_config(workdir)
  assert checkpoint.model_differences(stored.model, SNAPSHOTS[name]) == []
  assert stored.data.source == "none"
  run_main("--mode=sample", f"--workdir={workdir}", f"--outdir={tmp_path / 'checkpoint'}", *SAMPLE)
  with np.load(tmp_path / "network" / "samples.npz") as a, \
       np.load(tmp_path / "checkpoint" / "samples.npz") as b:
    assert a["arr_0"].shape == (3, 16, 16, 3)
    np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
    np.testing.assert_array_equal(a["seeds"], [0, 1, 2])
    assert a["arr_0"].std() > 10  # images, not a constant
    if SNAPSHOTS[name].get("label_dim"):
      np.testing.assert_array_equal(a["arr_1"], b["arr_1"])


@pytest.mark.parametrize("name", sorted(SNAPSHOTS))
def test_the_config_comes_from_the_snapshot_and_the_papers_sampler(reference, name):
  cfg, denoiser = pretrained.load_network(snapshot(reference, name))
  assert checkpoint.model_differences(cfg.model, SNAPSHOTS[name]) == []
  s = cfg.sample
  assert (s.num_steps, s.s_churn, s.s_min, s.s_max, s.s_noise) == PAPER_SAMPLER[cfg.model.arch]
  assert s.guidance == 1.0 and not cfg.patch.latent and cfg.data.source == "none"
  # The weights are the file's (EDM's network: its input layers widened with zero columns).
  got = models.torch_state_dict(denoiser)
  with np.load(reference / "parity" / f"{name}_weights.npz") as f:
    for key in f.files:
      if key.endswith(".resample_filter"):
        continue
      want = f[key]
      if got[key].shape != want.shape:  # a coordinate-less input layer
        assert name.startswith("edm") and got[key].shape[1] == want.shape[1] + 2
        np.testing.assert_array_equal(got[key][:, want.shape[1]:], 0)
        got[key] = got[key][:, :want.shape[1]]
      np.testing.assert_array_equal(got[key], want, err_msg=key)
  with pytest.raises(ValueError, match="data.source='none'"):
    config_lib.validate(cfg)  # it samples; it cannot train


def _info(**kwargs):
  """A snapshot description, as `files.read_snapshot` returns one."""
  init = dict(img_resolution=32, img_channels=6, out_channels=4, label_dim=1000,
              model_type="DhariwalUNet", model_channels=64, channel_mult=[1, 2], num_blocks=1,
              attn_resolutions=[16], dropout=0.1, use_fp16=True)
  init.update(kwargs.pop("init_kwargs", {}))
  return dict(dict(class_name="Patch_EDMPrecond", model_class="DhariwalUNet", init_args=[],
                   init_kwargs=init, attributes=dict(sigma_data=0.5)), **kwargs)


def test_a_latent_snapshot_takes_its_vae_and_the_papers_latent_sampler():
  cfg = pretrained.network_config(_info(), "latent.pkl", vae="sd-vae")
  assert cfg.patch.latent and cfg.vae.path == "sd-vae" and cfg.vae.scale == 0.18215
  m = models.resolve(cfg.model)
  assert (m["img_channels"], m["out_channels"], m["label_dim"], m["dtype"]) == (4, 4, 1000,
                                                                                "float16")
  assert cfg.sample.num_steps == 256 and cfg.sample.s_churn == 40.0
  with pytest.raises(ValueError, match=r"latent\.pkl: a latent network.*--vae=DIR"):
    pretrained.network_config(_info(), "latent.pkl")


@pytest.mark.parametrize("info, match", [
    (_info(class_name="VPPrecond"), r"x\.pkl: class_name='VPPrecond'"),
    (_info(init_kwargs=dict(implicit_mlp=True)), r"x\.pkl: implicit_mlp=True"),
    (_info(init_kwargs=dict(channel_mult_wow=2)), r"x\.pkl: .*not support.*channel_mult_wow"),
    (_info(init_kwargs=dict(model_type="UNet2D")), r"x\.pkl: model_type='UNet2D'"),
    (_info(init_args=[16]), r"x\.pkl: .*positional arguments \[16\]"),
    (_info(init_kwargs=dict(img_channels=5, out_channels=3)), r"x\.pkl: --vae=v.*3 image channels"),
])
def test_a_snapshot_patchdiff_cannot_sample_is_named_with_its_field(info, match):
  with pytest.raises(ValueError, match=match):
    pretrained.network_config(info, "x.pkl", vae="v")


@pytest.mark.parametrize("args, match", [
    (["--mode=sample", "--network=x.pkl"], "needs --outdir"),
    (["--mode=eval", "--network=x.pkl", "--outdir=o", "--workdir=w"],
     "leave out --config, --workdir"),
    (["--mode=sample", "--vae=v", "--workdir=w"], "--vae goes with --network"),
    (["--mode=sample"], "needs --workdir .* or --network"),
    (["--mode=train", "--workdir=w"], "--mode=train needs --config"),
    (["--mode=fid_ref", "--steps=3"], "--mode=fid_ref needs --config"),
])
def test_flags_that_do_not_go_together_are_refused_before_anything_runs(args, match):
  with pytest.raises(app.UsageError, match=match):
    run_main(*args)


def test_a_state_dict_as_network_asks_for_convert_and_a_config(reference, tmp_path):
  with pytest.raises(app.UsageError, match=r"weights\.npz: not a network snapshot .*--config"):
    run_main("--mode=sample", f"--network={reference / 'parity' / 'ddpmpp_tiny_weights.npz'}",
             f"--outdir={tmp_path}")


def test_eval_of_a_snapshot_scores_its_samples_against_ref(reference, tmp_path, stub_inception,
                                                          capsys):
  """The plumbing of `--mode=eval --network`: the Inception is a stub (conftest's
  `stub_inception`), so FID here is the Frechet distance of pixel features; there is no SWD (no
  data)."""
  path, out = snapshot(reference, "ddpmpp_tiny"), tmp_path / "eval"
  with pytest.raises(app.UsageError, match="--ref"):
    run_main("--mode=eval", f"--network={path}", f"--outdir={out}", *SAMPLE)
  ref = str(tmp_path / "ref.npz")
  metrics.save_statistics(ref, np.zeros(2048), np.eye(2048), resolution=16)
  run_main("--mode=eval", f"--network={path}", f"--outdir={out}", f"--ref={ref}", *SAMPLE)
  printed = capsys.readouterr().out
  assert "FID " in printed and "SWD" not in printed
  with open(out / "eval.json", encoding="utf-8") as f:
    result = json.load(f)
  with np.load(out / "samples.npz") as f:
    mu, sigma = metrics.feature_statistics(stub_inception(None, f["arr_0"]))
  assert result["num_images"] == 3 and not any(k.startswith("swd") for k in result)
  assert result["fid"] == pytest.approx(metrics.frechet_distance(mu, sigma, np.zeros(2048),
                                                                 np.eye(2048)))
  assert os.path.isfile(out / "grid.png")
