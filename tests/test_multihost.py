"""Two processes x 4 CPU devices on 127.0.0.1, joined by jax.distributed (launch/local.sh), train
the same run as one process x 8 devices: same bucket sequence, same parameters at the end."""
import importlib.util
import os
import re
import socket
import subprocess
import sys

import jax
import numpy as np

from conftest import REPO
from patchdiff import checkpoint, config_lib, train

# A 16 px model without attention, two buckets (8 and 16 px: each process compiles what it runs,
# ~10 s of CPU a program here), a global batch of 8 (one full-size sample per device).
OVERRIDES = {"data.limit": 64, "data.resolution": 16, "model.img_resolution": 16,
             "patch.sizes": (8, 16), "patch.probs": (0.5, 0.5), "model.attn_resolutions": (),
             "model.channel_mult": (1, 2), "model.model_channels": 16, "model.num_blocks": 1,
             "train.batch_size": 8, "train.steps": 6, "train.log_every": 3,
             "train.checkpoint_every": 6, "sample.grid_size": 0}
FLAGS = [f"--config.{k}={v}".replace(" ", "") for k, v in OVERRIDES.items()]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def demo_config():
  spec = importlib.util.spec_from_file_location("demo", REPO / "configs" / "demo.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return config_lib.override(module.get_config(), OVERRIDES)


def restore_params(workdir, cfg):
  run = train.Run(cfg)  # this process: 1 device, whatever layout wrote the checkpoint
  mgr = checkpoint.manager(str(workdir), create=False)
  state, _ = checkpoint.restore_state(mgr, 6, run.abstract_state)
  mgr.close()
  return jax.device_get(state["params"]), jax.device_get(state["ema"])


def test_two_processes_train_the_same_run_as_one(tmp_path):
  multi, single = tmp_path / "2x4", tmp_path / "1x8"
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHON=sys.executable)
  procs = [subprocess.Popen(["bash", "launch/local.sh", "2", "configs/demo.py", str(multi), *FLAGS],
                            cwd=REPO, env=dict(env, PORT=str(free_port()), DEVICES_PER_PROCESS="4")),
           subprocess.Popen([sys.executable, "-m", "patchdiff.main", "--config=configs/demo.py",
                             f"--workdir={single}", *FLAGS], cwd=REPO,
                            env=dict(env, XLA_FLAGS=os.environ.get("XLA_FLAGS", "")
                                     + " --xla_force_host_platform_device_count=8"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)]
  _, single_log = procs[1].communicate(timeout=600)
  procs[0].wait(timeout=600)
  logs = [(multi / f"process_{i}.log").read_text() for i in range(2)]
  assert procs[0].returncode == 0, "\n".join(log[-3000:] for log in logs)
  assert procs[1].returncode == 0, single_log[-3000:]
  for i, log in enumerate(logs):
    assert f"process {i} of 2, 8 cpu device(s) in all" in log
  assert "process 0 of 1, 8 cpu device(s) in all" in single_log
  assert "step 6/6" in logs[0]  # process 0 writes the metrics

  # Every process ran the same bucket sequence (the digest also passed a cross-process check).
  plans = [re.search(r"steps 0\.\.6, per bucket (\{.*?\}), schedule digest (\w+)", log).groups()
           for log in (*logs, single_log)]
  assert plans[0] == plans[1] == plans[2], plans
  assert set(eval(plans[0][0])) == {8, 16}  # pylint: disable=eval-used

  cfg = demo_config()
  for a, b in zip(restore_params(multi, cfg), restore_params(single, cfg)):
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6),
                           a, b)
