"""Two processes on 127.0.0.1 form one JAX job (launch/local.sh) and train to a checkpoint."""
import os
import socket
import subprocess

from conftest import REPO
from test_main import TINY


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_train_one_run(tmp_path):
  workdir = tmp_path / "run"
  env = dict(os.environ, JAX_PLATFORMS="cpu", PORT=str(free_port()), DEVICES_PER_PROCESS="2")
  proc = subprocess.run(["bash", "launch/local.sh", "2", "configs/demo.py", str(workdir), *TINY,
                         "--config.train.steps=4", "--config.train.log_every=2",
                         "--config.train.checkpoint_every=2",
                         # One bucket of a 16 px model: the mechanics, not the schedule, are
                         # under test here, and each process compiles what it runs.
                         "--config.patch.real_p=1.0", "--config.data.resolution=16",
                         "--config.model.img_resolution=16", "--config.model.channel_mult=(1,2)"],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  logs = [(workdir / f"process_{i}.log").read_text() for i in range(2)]
  assert proc.returncode == 0, "\n".join(log[-3000:] for log in logs)
  for i, log in enumerate(logs):
    assert f"process {i} of 2, 4 cpu device(s) in all" in log
  assert "[4] " in logs[0]  # process 0 writes the metrics
  steps = sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
  assert steps == [2, 4]
