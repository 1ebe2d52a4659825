"""Post-hoc EMA in training and after it (`train.phema`, `patchdiff.posthoc`): the EMAs a real
short run tracks against their definition on its recorded parameter trajectory, the snapshots,
an interrupted run's resume (kill -9 during a snapshot write), reconstruction of a tracked
length, `--mode=phema` / `--mode=sample` / `--mode=eval` with `--ema_std`, and the errors.

One uninterrupted run (module fixture) serves most tests: 10 steps of the tiny network on two
buckets (8 and 16 px, 6 images counted a step), stds 0.05 and 0.10, a snapshot every 15 images:
at steps 3, 5, 8 (the count crosses 15, 30, 45) and 10 (the end).
"""
from __future__ import annotations

import json
import os
import shutil
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import app
from flax import nnx
from PIL import Image

from conftest import main_in_process
from patchdiff import checkpoint, config_lib, phema, posthoc, programs, train, train_step
from patchdiff.nn import models
from test_train import _Scale, _restore_train, watch_compiles
from tiny import tiny_config

STDS = (0.05, 0.10)
SNAPSHOT_STEPS = [3, 5, 8, 10]
PER_STEP = 6  # int(batch 4 x mean batch_mul 1.5)


def phema_config(**overrides):
  cfg = tiny_config(**{"train.steps": 10, "train.log_every": 5, "train.checkpoint_every": 4,
                       "sample.grid_size": 0, "patch.sizes": (8, 16), "patch.probs": (0.5, 0.5),
                       **overrides})
  cfg.train.phema.stds = STDS
  cfg.train.phema.every_kimg = 0.015
  return cfg


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """The uninterrupted run, its parameters after every step and the [lr, ema_beta, betas...] it
  gave each step, and its programs."""
  workdir = tmp_path_factory.mktemp("phema") / "run"
  trajectory, hypers, compiled = [], [], []
  call, compile_steps = programs.Step.__call__, programs.Programs.compile_steps

  def recording(self, state, batch, hyper):
    out = call(self, state, batch, hyper)
    trajectory.append(jax.device_get(jax.tree_util.tree_leaves(out[0]["params"])))
    hypers.append(jax.device_get(hyper))
    return out

  def kept(self):
    out = compile_steps(self)
    compiled.append(out[0])
    return out

  cfg = phema_config()
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(programs.Step, "__call__", recording)
    patch.setattr(programs.Programs, "compile_steps", kept)
    train.train_and_evaluate(cfg, str(workdir))
  return dict(cfg=cfg, workdir=workdir, trajectory=trajectory, hypers=np.asarray(hypers),
              programs=compiled)


def snapshot_arrays(workdir, cfg) -> dict[int, dict]:
  """{step: {"record": ..., "ema": [leaves of each std's EMA]}} of a run's snapshots."""
  run = train.Run(cfg)
  snaps = posthoc.Snapshots(str(workdir))
  try:
    return {s: dict(record=snaps.record(s), ema=[
        jax.device_get(jax.tree_util.tree_leaves(snaps.load(s, i, run.abstract_state["params"])))
        for i in range(len(STDS))]) for s in snaps.steps()}
  finally:
    snaps.close()


def rel_err(a, b) -> float:
  num = sum(np.sum((np.float64(x) - np.float64(y)) ** 2) for x, y in zip(a, b))
  return float(np.sqrt(num / sum(np.sum(np.float64(y) ** 2) for y in b)))


def test_the_tracked_emas_are_the_power_averages_of_the_trajectory(straight):
  """Each step's betas are phema.beta of the count after it (0 at the first step); the EMAs of
  the final state and of every snapshot equal sum_k w_k theta_k over the recorded parameters,
  with w_k = (t_k / T)^(gamma + 1) - (t_{k-1} / T)^(gamma + 1) (t_k the count after step k, T
  the snapshot's), and so the phema.update replayed on the host."""
  cfg, hypers, thetas = straight["cfg"], straight["hypers"], straight["trajectory"]
  run = train.Run(cfg)
  counts = np.asarray([run.nimg(k + 1) for k in range(10)], np.float64)
  np.testing.assert_array_equal(np.diff(counts, prepend=0), PER_STEP)
  gammas = np.asarray([phema.exponent(s) for s in STDS])
  assert hypers.shape == (10, 4)
  for k in range(10):
    np.testing.assert_array_equal(hypers[k, 2:], np.float32(phema.beta(gammas, counts[k],
                                                                        PER_STEP)))
  assert np.all(hypers[0, 2:] == 0) and np.all(hypers[1:, 2:] > 0)
  snaps = snapshot_arrays(straight["workdir"], cfg)
  assert sorted(snaps) == SNAPSHOT_STEPS
  final, _ = _restore_train(straight["workdir"], cfg, 10)
  for step, snap in snaps.items():
    assert snap["record"] == dict(step=step, nimg=int(counts[step - 1]), stds=list(STDS),
                                  every_kimg=0.015, buffers=False)
    for i, g in enumerate(gammas):
      cum = (counts[:step] / counts[step - 1]) ** (g + 1)
      w = np.diff(cum, prepend=0.0)
      defined = [sum(w[k] * np.float64(thetas[k][j]) for k in range(step))
                 for j in range(len(thetas[0]))]
      replayed = None
      for k in range(step):
        leaves = [np.float64(x) for x in thetas[k]]
        beta = phema.beta(g, counts[k], PER_STEP)
        replayed = leaves if replayed is None else phema.update(replayed, leaves, beta)
      assert rel_err(snap["ema"][i], defined) < 1e-6
      assert rel_err(replayed, defined) < 1e-12
      if step == 10:
        for x, y in zip(jax.tree_util.tree_leaves(final["train"]["phema"][i]), snap["ema"][i]):
          np.testing.assert_array_equal(x, y)
  # The two stds differ, and differ from the EDM1 EMA and the last parameters.
  last = snaps[10]["ema"]
  assert rel_err(last[0], last[1]) > 1e-4 and rel_err(last[1], thetas[-1]) > 1e-5
  # One update program for both buckets, its hyper [lr, ema_beta, beta_0.05, beta_0.10].
  [steps] = straight["programs"]
  assert sorted(steps) == [8, 16] and steps[8].apply is steps[16].apply


def test_the_update_moves_each_phema_by_its_beta():
  """In the update program each post-hoc EMA moves by its own beta of `hyper`, to the step's new
  parameters; a hyper without a beta per EMA is refused when the program is traced."""
  tcfg = tiny_config().train
  opt = train_step.make_optimizer(tcfg)
  graphdef, variables = nnx.split(_Scale())
  state = train_step.train_state_of(graphdef, variables, opt, phema_count=2)
  assert len(state["phema"]) == 2
  state["phema"] = [jax.tree_util.tree_map(lambda x, v=v: jnp.full_like(x, v), state["params"])
                    for v in (3.0, -1.0)]
  grads = jax.tree_util.tree_map(lambda p: jnp.asarray([1.0, -2.0, 0.5, 3.0]), state["params"])
  apply = jax.jit(train_step.make_apply_step(opt, tcfg))
  new, _ = apply(state, grads, jnp.float32(1.0), np.float32([0.1, 0.5, 0.25, 0.0]))
  w1 = np.asarray(new["params"]["w"][...])
  np.testing.assert_allclose(np.asarray(new["phema"][0]["w"][...]), 0.25 * 3.0 + 0.75 * w1,
                             rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(new["phema"][1]["w"][...]), w1)  # beta 0: params
  with pytest.raises(ValueError, match=r"hyper has shape \(2,\), the step needs \(4,\)"):
    apply(new, grads, jnp.float32(1.0), np.float32([0.1, 0.5]))


def test_a_run_killed_during_a_snapshot_resumes_to_the_same_run(straight, tmp_path):
  """Preempted at step 7 (checkpoint 7), then its checkpoint 7 removed: as if killed after
  snapshot 5 was complete and before a checkpoint followed it, so the resumed run starts at
  checkpoint 4 with snapshot 5 on disk already (kept, not a failure), and a temporary folder of
  a snapshot 8 whose write was cut off (never read, removed). The resumed run's state and
  snapshots equal the uninterrupted run's bit for bit, and no training checkpoint was ever
  written before the snapshots up to its step were complete."""
  cfg = straight["cfg"]
  workdir = tmp_path / "resumed"

  def preempt(step, size):  # pylint: disable=unused-argument
    if step == 6:
      os.kill(os.getpid(), signal.SIGTERM)
  train.train_and_evaluate(cfg, str(workdir), on_step=preempt)
  assert sorted(os.listdir(workdir / "phema")) == ["3", "5"]
  mgr = checkpoint.manager(str(workdir), create=False)
  assert mgr.all_steps() == [4, 7]
  mgr.close()
  shutil.rmtree(workdir / "checkpoints" / "7")
  partial = workdir / "phema" / "8.orbax-checkpoint-tmp-1234567890"
  shutil.copytree(workdir / "phema" / "5", partial)
  shutil.rmtree(partial / "ema_1")  # cut off mid-write

  save_state, written = checkpoint.save_state, []

  def checked(mgr, step, *args, **kwargs):
    done = sorted(int(d) for d in os.listdir(workdir / "phema") if d.isdigit())
    assert [s for s in SNAPSHOT_STEPS if s <= step] == [s for s in done if s <= step], (step, done)
    written.append(step)
    return save_state(mgr, step, *args, **kwargs)
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(checkpoint, "save_state", checked)
    train.train_and_evaluate(cfg, str(workdir))
  assert written == [8, 10] and not partial.exists()

  a = snapshot_arrays(straight["workdir"], cfg)
  b = snapshot_arrays(workdir, cfg)
  assert sorted(b) == SNAPSHOT_STEPS
  for step in SNAPSHOT_STEPS:
    assert b[step]["record"] == a[step]["record"]
    for x, y in zip(a[step]["ema"], b[step]["ema"]):
      for u, v in zip(x, y):
        np.testing.assert_array_equal(u, v, err_msg=f"snapshot {step}")
  sa, _ = _restore_train(straight["workdir"], cfg, 10)
  sb, _ = _restore_train(workdir, cfg, 10)
  for x, y in zip(jax.tree_util.tree_leaves((sa["train"], sa["ema"])),
                  jax.tree_util.tree_leaves((sb["train"], sb["ema"]))):
    np.testing.assert_array_equal(x, y)


def test_phema_reconstructs_tracked_lengths_and_sample_reads_them(straight, capsys):
  """`--mode=phema` (the config from the snapshots): a tracked std at the last snapshot, and at
  an earlier one with --step, is that snapshot's EMA within 1e-4 relative (residual ~0); an
  untracked one reports its residual. `--mode=sample --ema_std` then samples the reconstructed
  weights without reconstructing them again."""
  workdir, cfg = str(straight["workdir"]), straight["cfg"]
  snaps = snapshot_arrays(workdir, cfg)
  main_in_process("--mode=phema", f"--workdir={workdir}", "--ema_std=0.05,0.1,0.07")
  out = capsys.readouterr().out
  assert "EMA std 0.0700 at step 10 (0.06 kimg): relative residual" in out
  main_in_process("--mode=phema", f"--workdir={workdir}", "--ema_std=0.1", "--step=5")
  for std, step, index in ((0.05, 10, 0), (0.1, 10, 1), (0.1, 5, 1)):
    directory = posthoc.weights_dir(workdir, std)
    denoiser, got_step = checkpoint.load_ema(directory, cfg, step)
    assert got_step == step
    leaves = jax.device_get(jax.tree_util.tree_leaves(nnx.state(denoiser, nnx.Param)))
    assert rel_err(leaves, snaps[step]["ema"][index]) < 1e-4
    with open(os.path.join(directory, f"reconstruction_{step:08d}.json")) as f:
      record = json.load(f)
    assert record["residual"] < 1e-8 and record["nimg"] == PER_STEP * step
    assert len(record["snapshots"]) == 2 * SNAPSHOT_STEPS.index(step) + 2
    chosen = [u for u in record["snapshots"] if abs(u["coefficient"]) > 1e-4]
    assert [(u["step"], u["std"]) for u in chosen] == [(step, std)]
  with open(os.path.join(posthoc.weights_dir(workdir, 0.07), "reconstruction_00000010.json")) as f:
    untracked = json.load(f)
  assert 0 < untracked["residual"] < 0.1
  assert sum(u["coefficient"] for u in untracked["snapshots"]) == pytest.approx(1, abs=0.05)
  assert rel_err(*(snaps[10]["ema"][i] for i in (0, 1))) > 1e-4  # the two tracked EMAs differ

  record_file = os.path.join(posthoc.weights_dir(workdir, 0.05), "reconstruction_00000010.json")
  made = os.stat(record_file).st_mtime_ns
  main_in_process("--mode=sample", f"--workdir={workdir}", "--ema_std=0.05", "--seeds=0-1",
           "--format=npz")
  assert os.stat(record_file).st_mtime_ns == made  # read, not made again
  outdir = os.path.join(posthoc.weights_dir(workdir, 0.05), "samples", "step_00000010")
  assert outdir in capsys.readouterr().out
  with np.load(os.path.join(outdir, "samples.npz")) as f:
    assert f["arr_0"].shape == (2, 16, 16, 3) and f["seeds"].tolist() == [0, 1]


def test_eval_reports_each_length_with_a_table_and_a_plot(straight, capsys, stub_inception):
  """`--mode=eval --ema_std=A,B`: each length reconstructed where missing and evaluated (FID
  against the run's WORKDIR/fid_ref.npz, made once); the table and the plot name the best.
  The Inception is a stub (conftest's `stub_inception`)."""
  workdir = str(straight["workdir"])
  main_in_process("--mode=eval", f"--workdir={workdir}", "--ema_std=0.1,0.03", "--seeds=0-2")
  out = capsys.readouterr().out
  with open(os.path.join(workdir, "phema_ema", "eval_00000010.json")) as f:
    table = json.load(f)
  assert [r["std"] for r in table["rows"]] == [0.1, 0.03] and table["metric"] == "fid"
  fids = {r["std"]: r["fid"] for r in table["rows"]}
  assert table["best_std"] == min(fids, key=fids.get) and fids[0.1] != fids[0.03]
  assert all(r["num_images"] == 3 and r["swd_mean"] > 0 for r in table["rows"])
  assert "EMA std 0.0300 (residual" in out and "best fid: EMA std" in out
  assert os.path.isfile(os.path.join(workdir, "fid_ref.npz"))
  assert not os.path.exists(os.path.join(posthoc.weights_dir(workdir, 0.03), "fid_ref.npz"))
  plot = np.asarray(Image.open(os.path.join(workdir, "phema_ema", "eval_00000010.png")))
  assert plot.shape == (420, 640, 3) and (plot < 128).any() and (plot == 255).any()


@pytest.mark.parametrize("stds,every,match", [
    ((0.5,), 1.0, r"train.phema.stds=\(0.5,\): 0.5 is outside \(0, 0.3003\]"),
    ((0.0, 0.1), 1.0, r"0.0 is outside"),
    ((0.05, 0.05), 1.0, r"train.phema.stds=\(0.05, 0.05\): each std is tracked once"),
    ((0.05,), None, r"train.phema.stds=\(0.05,\) needs train.phema.every_kimg, .*1/20 of the "
                    r"run's 0.06 kimg"),
    ((0.05,), 0.0, r"train.phema.every_kimg=0.0 must be > 0 and a whole number of images"),
    ((0.05,), 0.0005, r"train.phema.every_kimg=0.0005 must be > 0"),
])
def test_bad_phema_configs_fail_before_compiling(stds, every, match, tmp_path):
  cfg = phema_config()
  cfg.train.phema.stds = stds
  cfg.train.phema.every_kimg = every
  compiles = watch_compiles()
  with pytest.raises(ValueError, match=match):
    train.train_and_evaluate(cfg, str(tmp_path))
  assert not compiles
  assert config_lib.phema_stds(config_lib.base_config().train) == ()  # off by default


def test_a_run_keeps_its_stds_from_start_to_end(straight, tmp_path):
  """Resuming with other stds (or none) is refused, naming both, before anything is written."""
  for stds, shown in (((0.05,), r"\(0.05,\)"), ((), r"\(\)")):
    cfg = phema_config(**{"train.steps": 12})
    cfg.train.phema.stds = stds
    with pytest.raises(ValueError, match=r"written with train.phema.stds=\(0.05, 0.1\), the "
                       rf"config has {shown}"):
      train.train_and_evaluate(cfg, str(straight["workdir"]))
  assert sorted(os.listdir(straight["workdir"] / "phema")) == ["10", "3", "5", "8"]


def test_ema_std_errors_are_clear(straight, tmp_path):
  workdir = str(straight["workdir"])
  plain = str(tmp_path / "plain")  # a workdir without snapshots: weights only
  cfg = tiny_config()
  checkpoint.save_weights(plain, models.create_denoiser(cfg.model, seed=0), cfg)
  for args, match in [
      ([f"--workdir={plain}", "--mode=phema", "--ema_std=0.05"],
       r"no post-hoc EMA snapshots in .*plain: .*phema does not exist \(train with"),
      ([f"--workdir={plain}", "--mode=sample", "--ema_std=0.05"], "no post-hoc EMA snapshots"),
      ([f"--workdir={workdir}", "--mode=phema", "--ema_std=0.05", "--step=4"],
       r"no post-hoc EMA snapshot at step 4 in .*phema; available: \[3, 5, 8, 10\]"),
      ([f"--workdir={workdir}", "--mode=phema", "--ema_std=0.5"],
       r"--ema_std=0.5: 0.5 is outside \(0, 0.3003\]"),
      ([f"--workdir={workdir}", "--mode=phema", "--ema_std=0.05,x"], "'x' is not a number"),
      ([f"--workdir={workdir}", "--mode=phema", "--ema_std=0.08001"], "more than 4 decimals"),
      ([f"--workdir={workdir}", "--mode=phema", "--ema_std=0.05,0.05"], "0.05 is given twice"),
      ([f"--workdir={workdir}", "--mode=sample", "--ema_std=0.05,0.1"],
       "--mode=sample takes one --ema_std"),
      ([f"--workdir={workdir}", "--mode=phema"], "--mode=phema needs --workdir .* and --ema_std"),
      (["--mode=sample", "--network=x.pkl", "--outdir=o", "--ema_std=0.05"],
       "does not go with --network"),
      (["--mode=train", f"--workdir={workdir}", "--ema_std=0.05"],
       "--ema_std is a phema/sample/eval flag, not one of --mode=train"),
  ]:
    with pytest.raises(app.UsageError, match=match):
      main_in_process(*args)
