"""The entry point end to end: train a few steps, checkpoint, restore, sample PNGs."""
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO

TINY = [
    "--config.data.limit=64", "--config.model.model_channels=16", "--config.model.num_blocks=1",
    "--config.train.batch_size=4", "--config.train.steps=6", "--config.train.log_every=3",
    "--config.train.checkpoint_every=3", "--config.sample.num_steps=3",
    "--config.sample.batch_size=5", "--config.sample.grid_size=4",
]


def run_main(*args, check=True):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "patchdiff.main", "--config=configs/demo.py", *args],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  if check and proc.returncode:
    raise AssertionError(f"exit {proc.returncode}\n{proc.stderr[-4000:]}")
  return proc


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A workdir trained for 6 steps with checkpoints at 3 and 6 (shared: training compiles)."""
  workdir = str(tmp_path_factory.mktemp("main") / "run")
  run_main(f"--workdir={workdir}", *TINY)
  return workdir


def test_train_checkpoint_restore_sample(trained):
  workdir = trained
  steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
  assert steps == [3, 6]
  assert os.path.exists(os.path.join(workdir, "samples_00000006.png"))
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir))

  proc = run_main(f"--workdir={workdir}", "--mode=sample", "--config.sample.num_images=7", *TINY)
  outdir = os.path.join(workdir, "samples", "step_00000006")
  assert outdir in proc.stdout
  pngs = sorted(os.listdir(os.path.join(outdir, "000000")))
  assert pngs == [f"{i:06d}.png" for i in range(7)]
  img = np.asarray(Image.open(os.path.join(outdir, "000000", "000003.png")))
  assert img.shape == (32, 32, 3) and img.dtype == np.uint8 and img.std() > 0
  # An earlier step can be sampled too, and a missing one is a clear error.
  run_main(f"--workdir={workdir}", "--mode=sample", "--step=3", "--config.sample.num_images=2",
           *TINY)
  bad = run_main(f"--workdir={workdir}", "--mode=sample", "--step=4", *TINY, check=False)
  assert bad.returncode != 0 and "no checkpoint at step 4" in bad.stderr


def test_sampling_with_a_mismatched_config_is_refused(trained):
  bad = run_main(f"--workdir={trained}", "--mode=sample", *TINY, "--config.model.model_channels=32",
                 check=False)
  assert bad.returncode != 0
  assert "model.model_channels: checkpoint 16 vs config 32" in bad.stderr


def test_sigterm_saves_and_the_same_command_resumes(tmp_path):
  import signal
  import time
  workdir = str(tmp_path / "preempted")
  args = [sys.executable, "-m", "patchdiff.main", "--config=configs/demo.py",
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

  # The same command resumes from there (here with a reachable end).
  done = run_main(f"--workdir={workdir}", *TINY, f"--config.train.steps={steps[0] + 2}",
                  "--config.train.checkpoint_every=100000", "--config.train.log_every=1")
  assert f"resumed from step {steps[0]}" in done.stderr
  assert f"step {steps[0] + 2}/" in done.stderr and f"step {steps[0]}/" not in done.stderr
