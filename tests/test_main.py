"""The entry point end to end: train a few steps, checkpoint, restore, sample PNGs."""
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
from absl import app
from PIL import Image

import tiny
from conftest import REPO, main_in_process

CONFIG = f"--config={tiny.PATH}"  # the tiny run the tests share (its programs are cached)
TINY = tiny.flags(**{"train.steps": 6, "train.log_every": 3, "train.checkpoint_every": 3})


def in_process(*args):
  """The entry point in this process, with the tiny config, TINY and then ARGS."""
  main_in_process(CONFIG, *TINY, *args)


class _Lines(logging.Handler):
  """Keeps the messages logged while it is attached."""

  def __init__(self):
    super().__init__(logging.INFO)
    self.lines = []

  def emit(self, record):
    self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A workdir trained for 6 steps with checkpoints at 3 and 6 (shared: training compiles), by
  the entry point in this process (the SIGTERM test trains in a new interpreter), and its log."""
  workdir = str(tmp_path_factory.mktemp("main") / "run")
  absl_logger, lines = logging.getLogger("absl"), _Lines()
  absl_logger.addHandler(lines)
  try:
    in_process(f"--workdir={workdir}", "--verbosity=0")  # absl's INFO
  finally:
    absl_logger.removeHandler(lines)
  with open(os.path.join(workdir, "train_log.txt"), "w", encoding="utf-8") as f:
    f.write("\n".join(lines.lines))
  return workdir


def test_train_checkpoint_restore_sample(trained, capsys):
  workdir = trained
  steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
  assert steps == [3, 6]
  assert os.path.exists(os.path.join(workdir, "samples_00000006.png"))
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir))
  log = open(os.path.join(workdir, "train_log.txt"), encoding="utf-8").read()
  assert "step 6/6 (100.0%)" in log and "ETA" in log
  assert "SWD of 4 EMA samples to 4 training images: swd_16px" in log

  # Sampling in this process (the subprocess of test_layout.py samples as a fresh interpreter).
  in_process(f"--workdir={workdir}", "--mode=sample", "--config.sample.num_images=7")
  outdir = os.path.join(workdir, "samples", "step_00000006")
  assert outdir in capsys.readouterr().out
  pngs = sorted(os.listdir(os.path.join(outdir, "000000")))
  assert pngs == [f"{i:06d}.png" for i in range(7)]
  img = np.asarray(Image.open(os.path.join(outdir, "000000", "000003.png")))
  assert img.shape == (16, 16, 3) and img.dtype == np.uint8 and img.std() > 0
  # An earlier step can be sampled too, and a missing one is a clear error (in this process:
  # the entry point's own flags and dispatch, without another interpreter).
  in_process(f"--workdir={workdir}", "--mode=sample", "--step=3", "--config.sample.num_images=2")
  pngs = os.listdir(os.path.join(workdir, "samples", "step_00000003", "000000"))
  assert sorted(pngs) == ["000000.png", "000001.png"]
  with pytest.raises(app.UsageError, match="no checkpoint at step 4"):
    in_process(f"--workdir={workdir}", "--mode=sample", "--step=4")


def test_sampling_with_a_mismatched_config_is_refused(trained):
  with pytest.raises(ValueError, match="model.model_channels: checkpoint 16 vs config 32"):
    in_process(f"--workdir={trained}", "--mode=sample", "--config.model.model_channels=32")


def test_sigterm_saves_and_the_same_command_resumes(tmp_path, caplog):
  import signal
  import time
  workdir = str(tmp_path / "preempted")
  args = [sys.executable, "-m", "patchdiff.main", CONFIG,
          f"--workdir={workdir}", *TINY, "--config.train.steps=100000",
          "--config.train.checkpoint_every=100000", "--config.train.log_every=1"]
  log = open(tmp_path / "log.txt", "w+")
  proc = subprocess.Popen(args, cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                          stdout=log, stderr=subprocess.STDOUT)
  deadline = time.time() + 300
  while "[2] " not in open(tmp_path / "log.txt").read():  # two steps done: the loop runs
    assert proc.poll() is None and time.time() < deadline, open(tmp_path / "log.txt").read()[-3000:]
    time.sleep(0.5)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=120) == 0
  text = open(tmp_path / "log.txt").read()
  assert "stopped at step" in text
  steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
  assert len(steps) == 1 and steps[0] >= 2  # saved at the step boundary after the signal

  # The same command resumes from there (here with a reachable end; in this process).
  with caplog.at_level(logging.INFO):
    in_process(f"--workdir={workdir}", f"--config.train.steps={steps[0] + 2}",
               "--config.train.checkpoint_every=100000", "--config.train.log_every=1",
               "--verbosity=0")  # absl's INFO, which the flags set when parsed
  assert f"resumed from step {steps[0]}" in caplog.text
  assert f"step {steps[0] + 2}/" in caplog.text and f"step {steps[0]}/" not in caplog.text


def test_sample_cli_seeds_npz_and_outpainting(trained, tmp_path):
  rng = np.random.default_rng(0)
  known = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
  Image.fromarray(known).save(tmp_path / "known.png")
  out = tmp_path / "out"
  in_process(f"--workdir={trained}", "--mode=sample", "--seeds=4-6", "--batch=2", "--format=npz",
             "--canvas=24", f"--outpaint={tmp_path / 'known.png'}", f"--outdir={out}")
  data = np.load(out / "samples.npz")
  assert data.files == ["arr_0", "seeds"]  # ADM's evaluator reads arr_0; no labels: unconditional
  assert data["arr_0"].shape == (3, 24, 24, 3) and data["arr_0"].dtype == np.uint8
  assert data["seeds"].tolist() == [4, 5, 6]
  for img in data["arr_0"]:
    np.testing.assert_array_equal(img[4:20, 4:20], known)  # held fixed, exactly
    assert img[:4].std() > 0
  # Bad requests fail before the checkpoint is read or anything compiles.
  for flag, message in (("--seeds=9-3", "is reversed"), ("--canvas=41", "even number"),
                        ("--inpaint=x.png", "--inpaint and --mask go together")):
    with pytest.raises((ValueError, app.UsageError), match=message):
      in_process(f"--workdir={trained}", "--mode=sample", flag)


def test_eval_reports_swd_and_fid_against_the_training_data(trained, inception_weights,
                                                             user_xla_flags, capsys):
  """With the installed Inception weights and no --ref, FID is against the statistics of every
  training image, made once and kept in the workdir (the demo's FID command). The command runs
  as a user's does, compiled with the package's CPU options (`user_xla_flags`), in this process
  (the entry point's own flags and dispatch; a new interpreter would add its start-up only)."""
  import json  # pylint: disable=import-outside-toplevel
  # Eight training images are the reference (data settings may differ from the checkpoint's).
  in_process(f"--workdir={trained}", "--mode=eval", "--seeds=0-7", "--batch=4",
             "--config.data.limit=8")
  out = capsys.readouterr().out
  assert "SWD x1e3 (lower is better): swd_16px" in out and "FID " in out
  result = json.load(open(os.path.join(trained, "samples", "step_00000006", "eval.json")))
  assert result["num_images"] == 8
  assert set(result) == {"num_images", "swd_16px", "swd_mean", "fid", "fid_sets", "kid"}
  assert result["swd_mean"] > 0 and result["fid"] > 0
  from patchdiff import metrics  # pylint: disable=import-outside-toplevel
  made_from = json.loads(metrics.statistics_source(os.path.join(trained, "fid_ref.npz")))
  assert made_from["limit"] == 8 and made_from["source"] == "twemoji"
