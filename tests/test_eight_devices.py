"""Every check that needs 8 fake CPU devices, run by one subprocess (the device count is fixed
when JAX starts): sharded steps against one device, the fsdp split, checkpoints of the fsdp
layout restored on other topologies, sharded sampling, and gradient accumulation on 8 devices
against the unsplit step (tests/eight_devices_worker.py); and the multi-host test: two processes
x 4 CPU devices on 127.0.0.1, joined by jax.distributed (launch/local.sh), train the same run as
the worker's one process x 8 devices."""
import os
import re
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

import tiny
from conftest import REPO, run_on_eight_devices
from eight_devices_worker import MULTIHOST
from patchdiff import checkpoint, train


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory):
  """The worker's results; its multi-host reference run is in results["multihost_workdir"]."""
  workdir = tmp_path_factory.mktemp("eight_devices") / "1x8"
  results = run_on_eight_devices("eight_devices_worker.py", 900, str(workdir))
  return dict(results, multihost_workdir=workdir)


@pytest.mark.parametrize("layout", ["data8", "data2_fsdp4"])
def test_sharded_step_matches_one_device(eight_devices, layout):
  r = eight_devices
  assert r[f"{layout}_step"] == 3
  # Only the order of the float32 reductions differs; Adam's first steps (g / (|g| + eps))
  # magnify that on near-zero gradients, hence the updates' looser bound.
  assert r[f"{layout}_param_rel_err"] < 1e-4
  assert r[f"{layout}_ema_rel_err"] < 1e-4
  assert r[f"{layout}_update_rel_err"] < 1e-3


def test_fsdp_layout_splits_the_state(eight_devices):
  r = eight_devices
  assert r["data2_fsdp4_sharded_fraction"] > 0.5
  assert r["data2_fsdp4_biggest_shape"] == [3, 3, 64, 32]
  assert r["data2_fsdp4_biggest_shard_shape"] == [3, 3, 16, 32]  # 64 / fsdp 4


@pytest.mark.parametrize("target,devices", [("restore_1", [0]), ("restore_data4", [0, 1, 2, 3])])
def test_checkpoint_of_fsdp_layout_restores_on_other_topologies(eight_devices, target, devices):
  r = eight_devices
  for part in ("train", "opt", "ema", "sample_ema"):
    assert r[f"{target}_{part}_err"] == 0.0, part
  assert r[f"{target}_devices"] == devices
  assert r[f"{target}_progress"]["data_position"] == 3
  assert r[f"{target}_progress"]["mesh"] == {"data": 2, "fsdp": 4}


def test_sharded_sampling_matches_one_device(eight_devices):
  assert eight_devices["sample_8_vs_1_max_abs"] < 1e-4
  assert eight_devices["sample_distinct_seeds"] > 0.01


def test_sharded_accumulated_step_matches_the_unsplit_step(eight_devices):
  """train.batch_per_device=1 on 8 devices (2 rounds of the R/2 bucket) against the unsplit
  8-device step, dropout on: three steps of the same batches reach the same state."""
  r = eight_devices
  assert r["accumulated_rounds"] == 2 and r["accumulated_step"] == 3
  assert r["accumulated_param_rel_err"] < 1e-4
  assert r["accumulated_ema_rel_err"] < 1e-4
  assert r["accumulated_update_rel_err"] < 1e-3
  assert r["accumulated_loss_rel_err"] < 1e-5


def test_micro_batches_move_no_batch_data_between_devices(eight_devices):
  """Each device slices its micro-batches from its own rows: the accumulated program holds no
  all-to-all, collective-permute or all-gather that the unsplit one does not. With the state
  replicated, the devices sum their rounds' gradients locally and all-reduce once, after the
  loop (one all-reduce in the entry computation, none in the loop body)."""
  got, ref = eight_devices["accumulated_collectives"], eight_devices["plain_collectives"]
  for op in ("all-to-all", "collective-permute", "all-gather"):
    total = lambda c: c[f"{op}_entry"] + c[f"{op}_nested"]  # noqa: E731
    assert total(got) <= total(ref), (op, got, ref)
  assert got["all-reduce_nested"] == 0 and got["all-reduce_entry"] >= 1, got
  assert sum(v for k, v in got.items() if not k.startswith("all-reduce")) == 0, got


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def restore_params(workdir, cfg):
  run = train.Run(cfg)  # this process: 1 device, whatever layout wrote the checkpoint
  mgr = checkpoint.manager(str(workdir), create=False)
  state, _ = checkpoint.restore_state(mgr, 6, run.abstract_state)
  mgr.close()
  return jax.device_get(state["params"]), jax.device_get(state["ema"])


def test_two_processes_train_the_same_run_as_one(eight_devices, tmp_path):
  """The worker's 1 x 8 run, here trained by 2 processes x 4 devices: the same bucket sequence
  (its digest is also checked across the processes) and the same parameters at the end."""
  multi = tmp_path / "2x4"
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHON=sys.executable, PORT=str(free_port()),
             DEVICES_PER_PROCESS="4")
  proc = subprocess.run(["bash", "launch/local.sh", "2", tiny.PATH, str(multi),
                         *tiny.flags(**MULTIHOST)], cwd=REPO, env=env, timeout=600, check=False)
  logs = [(multi / f"process_{i}.log").read_text() for i in range(2)]
  assert proc.returncode == 0, "\n".join(log[-3000:] for log in logs)
  for i, log in enumerate(logs):
    assert f"process {i} of 2, 8 cpu device(s) in all" in log
  assert "step 6/6" in logs[0]  # process 0 writes the metrics

  # Every process ran the reference's bucket sequence.
  pattern = r"steps 0\.\.6, per bucket (\{.*?\}), schedule digest (\w+)"
  texts = (*logs, *eight_devices["multihost_plans"])
  plans = [re.search(pattern, text).groups() for text in texts]
  assert len(plans) == 3 and plans[0] == plans[1] == plans[2], plans
  assert set(eval(plans[0][0])) == {8, 16}  # pylint: disable=eval-used

  cfg = tiny.tiny_config(**dict(MULTIHOST, **{"mesh.data": -1}))  # restored on this 1 device
  single = eight_devices["multihost_workdir"]
  for a, b in zip(restore_params(multi, cfg), restore_params(single, cfg)):
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6),
                           a, b)
