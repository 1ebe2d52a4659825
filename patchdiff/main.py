"""Entry point: flags only. Trains, or samples from the EMA weights of a workdir's checkpoint.

  python -m patchdiff.main --config=configs/demo.py --workdir=runs/demo
  python -m patchdiff.main --config=configs/demo.py --workdir=runs/demo --mode=sample
Any config value can be overridden: --config.train.steps=50.
"""
from __future__ import annotations

import logging as pylogging
import os
import time

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints, logs and samples")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "sample"], "what to do")
_STEP = flags.DEFINE_integer("step", None, "checkpoint step to sample from (default: latest)")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"],
    "join a multi-process JAX job: 'on' calls jax.distributed.initialize() (it detects SLURM, "
    "Cloud TPU and GKE by itself), 'auto' does so when SLURM_NTASKS > 1 or a coordinator flag "
    "is given, 'off' never")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0, for clusters JAX does not detect")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "with --coordinator_address")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "with --coordinator_address")
flags.mark_flags_as_required(["config", "workdir"])


def init_distributed() -> None:
  """Joins the job's other processes through JAX's own runtime, before any device is used."""
  if _DISTRIBUTED.value == "off":
    return
  if _COORDINATOR.value:
    if _NUM_PROCESSES.value is None or _PROCESS_ID.value is None:
      raise app.UsageError("--coordinator_address needs --num_processes and --process_id")
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value)
  elif _DISTRIBUTED.value == "on" or int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    jax.distributed.initialize()


def sample_from_checkpoint(cfg, workdir: str, step: int | None = None) -> tuple[str, np.ndarray]:
  """Restores EMA weights from `workdir` and writes cfg.sample.num_images PNGs and a grid."""
  from patchdiff import checkpoint, config_lib, images_io, train  # pylint: disable=import-outside-toplevel
  run = train.Run(cfg)
  mgr = checkpoint.manager(workdir, create=False)
  step = mgr.latest_step() if step is None else step
  if step is None or step not in mgr.all_steps():
    raise FileNotFoundError(f"no checkpoint{'' if step is None else f' at step {step}'} in "
                            f"{mgr.directory}; available: {list(mgr.all_steps())}")
  config_lib.check_compatible(checkpoint.restore_config(mgr, step), cfg,
                              where=f"{mgr.directory}/{step}")
  restored = checkpoint.restore(mgr, step, ema_target=run.abstract_ema())
  mgr.close()
  denoiser = run.denoiser(restored["ema"]["params"], restored["ema"]["buffers"])
  n, seed = cfg.sample.num_images, cfg.sample.seed
  t0 = time.perf_counter()
  images = run.sample(denoiser, n, seed)
  dt = time.perf_counter() - t0
  outdir = os.path.join(workdir, "samples", f"step_{step:08d}")
  images_io.save_pngs(images, range(seed, seed + n), outdir)
  images_io.save_grid(images[:cfg.sample.grid_size], os.path.join(outdir, "grid.png"))
  logging.info("wrote %d samples to %s (%.2f images/s)", n, outdir, n / dt)
  return outdir, images


class _QuietLibraries(pylogging.Filter):
  """Drops the INFO chatter of orbax (several lines per save); warnings and errors pass."""

  def filter(self, record: pylogging.LogRecord) -> bool:
    return record.levelno >= pylogging.WARNING or "/orbax/" not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  init_distributed()
  cfg = _CONFIG.value
  workdir = _WORKDIR.value
  logging.info("JAX %s, process %d of %d, %d %s device(s) in all", jax.__version__,
               jax.process_index(), jax.process_count(), jax.device_count(),
               jax.devices()[0].platform)
  if _MODE.value == "train":
    from patchdiff import train  # pylint: disable=import-outside-toplevel
    train.train_and_evaluate(cfg, workdir)
  else:
    outdir, _ = sample_from_checkpoint(cfg, workdir, _STEP.value)
    print(f"samples written to {outdir}")


if __name__ == "__main__":
  app.run(main)
