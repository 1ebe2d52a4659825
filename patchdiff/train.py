"""The trainer: mesh, input, state, and the loop.

The step's programs (one gradient program per patch-size bucket and one update program that
they share, `patchdiff.programs`) are compiled ahead of time at start-up; the loop only
dispatches. The step itself is `patchdiff.train_step`; checkpoints are `patchdiff.checkpoint`;
the sample grids and FID it logs, `evaluation.QualityMonitor`.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from patchdiff import (accumulation, checkpoint, config_lib, data, evaluation, patches, phema,
                       posthoc, pretrained, programs, sharding, train_step, xla_options)
from patchdiff.nn import models

# ---------------------------------------------------------------------------------------------
# The loop.


class Run:
  """Everything derived from the config that the loop needs: mesh, schedule, state layout, and
  the step's functions (`programs.Programs` compiles them).

  `devices` (default: all) is the set the mesh spans; the tests use subsets to compare layouts.
  """

  def __init__(self, cfg: ml_collections.ConfigDict, devices=None):
    cfg = config_lib.finalize(cfg)
    config_lib.validate(cfg, num_devices=len(jax.devices() if devices is None else devices))
    self.cfg = cfg
    self.model_cfg = models.resolve(cfg.model)
    self.schedule = config_lib.patch_schedule(cfg)
    # Post-hoc EMA (train.phema): the relative stds tracked and their exponents.
    self.phema_stds = config_lib.phema_stds(cfg.train)
    self.phema_gammas = np.asarray([phema.exponent(s) for s in self.phema_stds], np.float64)
    self.mesh = sharding.make_mesh(cfg.mesh, devices)
    sharding.check_batch(cfg.train.batch_size, self.mesh, jax.process_count(),
                         "train.batch_size")
    # Gradient-accumulation rounds per bucket (train.batch_per_device; 1: none).
    self.rounds = accumulation.rounds_per_bucket(self.schedule, cfg.train,
                                                 self.mesh.devices.size)
    if max(self.rounds.values()) > 1:
      logging.info("gradient accumulation (train.batch_per_device=%d): rounds per bucket %s",
                   cfg.train.batch_per_device, self.rounds)
    self.replicated = NamedSharding(self.mesh, P())
    self.batch_sharding = NamedSharding(self.mesh, sharding.BATCH)
    self.optimizer = train_step.make_optimizer(cfg.train)
    self._fresh_state = train_step.make_fresh_state(
        *models.initializer(self.model_cfg, seed=cfg.seed), self.optimizer,
        cfg.train.loss_scale, len(self.phema_stds))
    # The step's graphdef splits trainable params from buffers (constants such as Fourier freqs).
    self.graphdef = nnx.split(models.abstract_denoiser(self.model_cfg), nnx.Param, ...)[0]
    shapes = jax.eval_shape(self._fresh_state)
    self.state_shardings = sharding.state_shardings(self.mesh, shapes, cfg.mesh.param_sharding)
    self.abstract_state = jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes,
        self.state_shardings)

  def init_state(self, weights: dict[str, np.ndarray] | None = None):
    """A freshly initialised training state, laid out on the mesh. `weights` ({official tensor
    name: host array in our layout, the same on every process}, see `pretrained.load`) replace
    the fresh values of the variables they name; the EMA starts as a copy of the result, the
    optimizer state, step and counters fresh."""
    if not weights:
      return self.jit(self._fresh_state, out_shardings=self.state_shardings)()
    placed = sharding.put(weights, sharding.state_shardings(self.mesh, weights,
                                                            self.cfg.mesh.param_sharding))
    return self.jit(self._fresh_state, out_shardings=self.state_shardings)(placed)

  def jit(self, fun, **jit_kwargs):
    """`jax.jit` with the compile options of the mesh's platform (`xla_options`)."""
    return xla_options.jit(fun, self.mesh.devices.flat[0].platform, **jit_kwargs)

  def nimg(self, step: int) -> int:
    """Images counted before `step`, exactly as the official loop counts them
    (`patches.PatchSchedule`)."""
    return int(self.schedule.nimg_before([step])[0])

  def grad_step_fn(self, size: int) -> Callable:
    n = self.mesh.devices.size
    rounds = self.rounds.get(size) or accumulation.rounds_per_bucket(  # a bucket never drawn
        self.schedule, self.cfg.train, n, sizes=(size,))[size]
    # Replicated state: each device sums its rounds' gradients, then one all-reduce per step.
    local = self.mesh if self.cfg.mesh.param_sharding == "replicated" else None
    return train_step.make_grad_step(self.graphdef, self.cfg.train, self.cfg.seed,
                                     rounds=rounds, shards=n, mesh=local)

  def hyper_values(self, step: int, size: int) -> np.ndarray:
    """[lr, ema_beta, then a beta per post-hoc EMA] of step `step` (`size` px), in float64 from
    the exact image count: lr and ema_beta as `train_step.step_hyperparameters`, the post-hoc
    betas `phema.beta(gamma, nimg after the step, the step's images)`, with nimg counting
    train.start_kimg too (the EMAs start as the first parameters, standing for the trajectory
    before; with start_kimg 0 the first step's betas are 0)."""
    lr, beta = train_step.step_hyperparameters(self.cfg.train, self.schedule, self.nimg(step),
                                               size)
    values = [lr, beta]
    if self.phema_stds:
      after, images = self.nimg(step + 1), self.schedule.step_images(size)
      values += np.atleast_1d(phema.beta(self.phema_gammas, after, images)).tolist()
    return np.asarray(values, np.float64)

  def hyper(self, step: int, size: int) -> jax.Array:
    """`hyper_values` as float32, replicated on the mesh: the update program's per-step input
    ([lr, ema_beta] and the post-hoc betas; its shape is fixed for the run)."""
    values = self.hyper_values(step, size).astype(np.float32)
    return jax.make_array_from_callback(values.shape, self.replicated, lambda index: values[index])

  def to_device(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """This host's slice of the step's batch -> global arrays sharded over the mesh."""
    keys = ("image", "pos", "label") if self.model_cfg["label_dim"] else ("image", "pos")
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, batch[k])
            for k in keys}


class PreemptionWatch:
  """Asks the loop to save and stop at the next step boundary on SIGTERM (or, with several
  processes, at JAX's preemption sync point, which every host reaches at the same step)."""

  def __init__(self):
    self._flag = False
    self._previous = None
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    logging.warning("SIGTERM received: saving a checkpoint at the next step boundary")
    self._flag = True

  def should_stop(self, step: int) -> bool:
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      return bool(multihost_utils.reached_preemption_sync_point(step))
    return self._flag

  def close(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


def use_compilation_cache(path: str | None, workdir: str) -> str | None:
  """Points JAX's persistent compilation cache at `path` (None: WORKDIR/xla_cache, unless the
  process already has a cache, e.g. from JAX_COMPILATION_CACHE_DIR; "": no cache). Every
  program that takes a second or more to compile is kept there, so a restart loads the step's
  programs instead of compiling them. Returns the cache directory in use."""
  current = jax.config.jax_compilation_cache_dir
  if path is None:
    path = current or os.path.join(workdir, "xla_cache")
  if not path:
    jax.config.update("jax_enable_compilation_cache", False)
    return None
  if path != current:
    jax.config.update("jax_compilation_cache_dir", path)
    from jax.experimental.compilation_cache import compilation_cache  # pylint: disable=import-outside-toplevel
    compilation_cache.reset_cache()  # a cache opened earlier in the process keeps its directory
  logging.info("persistent compilation cache: %s", path)
  return path


def _schedule_digest(cfg: ml_collections.ConfigDict, sizes: np.ndarray) -> str:
  blob = json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode() + sizes.tobytes()
  return hashlib.sha256(blob).hexdigest()[:16]


def _check_processes_agree(digest: str) -> None:
  """Every process must run the same config and bucket sequence, or the collectives hang."""
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  multihost_utils.assert_equal(
      np.frombuffer(bytes.fromhex(digest), np.uint32),
      f"the processes disagree on the config or the patch schedule (this is process "
      f"{jax.process_index()}, digest {digest}): start them with the same config and flags")


def _fmt_duration(seconds: float) -> str:
  if not np.isfinite(seconds):
    return "?"
  m, s = divmod(int(seconds), 60)
  h, m = divmod(m, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def train_and_evaluate(cfg: ml_collections.ConfigDict, workdir: str,
                       on_step: Callable[[int, int], None] | None = None,
                       devices=None) -> dict[str, Any]:
  """Trains (or resumes) the run in `workdir`; returns the last logged metrics.

  `on_step(step, patch_size)` is called after each step is dispatched (tests use it);
  `devices` restricts the mesh to a subset of the devices.
  """
  run = Run(cfg, devices)
  cfg = run.cfg  # finalized: train.steps = 0 became the step count of train.duration_mimg
  tcfg = cfg.train
  os.makedirs(workdir, exist_ok=True)
  use_compilation_cache(tcfg.compilation_cache_dir, workdir)
  from clu import metric_writers  # pylint: disable=import-outside-toplevel
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)

  # ---- Where we start: the latest complete checkpoint of the workdir, if any.
  mgr = checkpoint.manager(workdir, max_to_keep=tcfg.keep_checkpoints)
  start = mgr.latest_step()
  if start is not None:
    saved_cfg = checkpoint.restore_config(mgr, start)
    checkpoint.check_compatible(saved_cfg, cfg, where=f"{mgr.directory}/{start}")
    saved_stds = config_lib.phema_stds(ml_collections.ConfigDict(saved_cfg).train)
    if saved_stds != run.phema_stds:
      raise ValueError(f"checkpoint {mgr.directory}/{start} was written with train.phema.stds="
                       f"{saved_stds}, the config has {run.phema_stds}: a run tracks the same "
                       "post-hoc EMAs from its first step to its last (start a new workdir, or "
                       "set them back)")
  # Post-hoc EMA snapshots (train.phema): WORKDIR/phema, every `every` images counted.
  snapshots, every = None, None
  if run.phema_stds:
    every = config_lib.snapshot_images(tcfg)
    snapshots = posthoc.Snapshots(workdir, create=True)
    logging.info("post-hoc EMA: stds %s tracked, snapshots every %d images counted and at the "
                 "end in %s", run.phema_stds, every, snapshots.directory)
  init_weights = None  # train.init_from: read and checked here, before anything is compiled
  if tcfg.get("init_from") and start is None:
    init_weights = pretrained.load(tcfg.init_from, cfg)
  elif tcfg.get("init_from"):
    logging.info("train.init_from=%s is ignored: the workdir holds a checkpoint, the run "
                 "resumes from its step %d", tcfg.init_from, start)
  first = start or 0
  sizes = run.schedule.sizes_at(np.arange(first, tcfg.steps))
  digest = _schedule_digest(cfg, sizes)
  _check_processes_agree(digest)
  counts = {int(s): int((sizes == s).sum()) for s in run.schedule.active_sizes}
  logging.info("steps %d..%d, per bucket %s, schedule digest %s", first, tcfg.steps, counts,
               digest)

  # ---- Grids and FID during training: the Inception weights load here, before anything is
  # compiled.
  monitor = evaluation.QualityMonitor(cfg, workdir, writer, run.graphdef, run.model_cfg, run.mesh)

  # ---- Input from that step; a bad dataset fails here, before anything is compiled.
  batches = data.build_input(cfg.data, run.schedule, tcfg.batch_size, tcfg.steps,
                             start_step=first, seed=cfg.seed,
                             process_index=jax.process_index(),
                             process_count=jax.process_count(),
                             label_dim=run.model_cfg["label_dim"],
                             channels=run.model_cfg["img_channels"])

  # ---- State: fresh, or restored into this run's layout (whatever layout wrote it).
  train_seconds = 0.0  # time spent in the loop's steps, without compiling, sampling and FID
  if start is None:
    state = run.init_state(init_weights.values if init_weights else None)
  else:
    state, progress = checkpoint.restore_state(mgr, start, run.abstract_state)
    if progress.get("data_position", start) != start:
      raise ValueError(f"checkpoint {mgr.directory}/{start} is inconsistent: its data position "
                       f"is {progress['data_position']}, its step {start}")
    train_seconds = float(progress.get("train_seconds", 0.0))
    nimg = run.nimg(start)
    logging.info("resumed from step %d (%.3f kimg)", start, nimg / 1000)
    if "nimg" in progress and float(progress["nimg"]) != nimg:
      logging.info("the checkpoint recorded %.1f images at step %d; this version counts %d "
                   "(whole images per step, as the official loop) and continues from that "
                   "count", float(progress["nimg"]), start, nimg)

  # ---- Programs: a gradient program per bucket, one update program for all.
  compiled, stats = programs.Programs(run).compile_steps()
  scalars = {}
  for name, st in stats.items():
    scalars.update({f"compile_seconds_{name}": st["compile_seconds"],
                    f"temp_mib_{name}": st["temp_bytes"] / 2**20})
    if name != "update":
      scalars[f"gflop_per_step_{name}"] = st["model_flops"] / 1e9
  writer.write_scalars(first, scalars)

  # ---- Loop. Nothing here waits for the device except the metrics fetched every log_every.
  pending, last = [], dict(loss=float("nan"))
  monitor.load_decoder()
  t_log = t_loop = time.perf_counter()
  paused = 0.0  # seconds of the loop spent sampling and measuring
  clock = lambda: train_seconds + time.perf_counter() - t_loop - paused  # noqa: E731
  step = first
  watch = PreemptionWatch()
  try:
    for step in range(first, tcfg.steps):
      batch = next(batches)
      size = int(batch["image"].shape[1])
      monitor.observe(batch)  # full-size training images, for SWD of the sample grids
      arrays = run.to_device(batch)  # the loop's explicit host-to-device transfers: the batch
      hyper = run.hyper(step, size)  # and the step's [lr, ema_beta]
      with jax.transfer_guard(tcfg.transfer_guard):
        state, metrics = compiled[size](state, arrays, hyper)
      pending.append((size, metrics))
      if on_step is not None:
        on_step(step, size)
      done = step + 1
      if done % tcfg.log_every == 0 or done == tcfg.steps:
        last = _log(run, writer, pending, done, first, t_log, t_loop, mgr, clock)
        pending, t_log = [], time.perf_counter()
      if snapshots is not None and (done == tcfg.steps or posthoc.snapshot_due(
          run.nimg(done - 1), run.nimg(done), every)):
        snapshots.save(done, run.nimg(done), state, run.phema_stds, cfg)
      if watch.should_stop(done):
        _save(mgr, done, run, state, clock(), snapshots)
        logging.warning("stopped at step %d on a preemption notice; the checkpoint is saved, "
                        "run the same command again to resume", done)
        break
      if done % tcfg.checkpoint_every == 0 or done == tcfg.steps:
        _save(mgr, done, run, state, clock(), snapshots)
      spent = monitor.after_step(done, state, clock)  # sample grids and FID, when due
      paused += spent
      t_log += spent  # the interval's rates are of steps only
  finally:
    watch.close()
    if snapshots is not None:
      snapshots.close()
    mgr.wait_until_finished()
    mgr.close()
    writer.flush()
  return last


class NonFiniteLossError(FloatingPointError):
  pass


def _log(run: Run, writer, pending, done: int, first: int, t_log: float, t_loop: float,
         mgr, clock: Callable[[], float]) -> dict[str, Any]:
  """Fetches the pending steps' metrics (the loop's only wait), writes them, checks for NaNs.

  Rates are taken after the fetch, when the steps have run (dispatching them takes less time).
  """
  tcfg = run.cfg.train
  fetched = jax.device_get([m for _, m in pending])
  now = time.perf_counter()
  dt, elapsed, train_seconds = now - t_log, now - t_loop, clock()
  losses, norms, samples = {}, {}, 0
  for (size, _), m in zip(pending, fetched):
    losses.setdefault(size, []).append(float(m["loss"]))
    norms.setdefault(size, []).append(float(m["grad_norm"]))
    samples += tcfg.batch_size * patches.batch_mul(size, run.schedule.resolution)
  n = len(pending)
  rate = (done - first) / max(elapsed, 1e-9)
  end = fetched[-1]
  nimg = run.nimg(done)
  out = dict(loss=float(np.mean([float(m["loss"]) for m in fetched])),
             lr=float(end["lr"]), grad_norm=float(np.mean([m["grad_norm"] for m in fetched])),
             kimg=nimg / 1000, steps_per_sec=n / dt,
             images_per_sec=(nimg - run.nimg(done - n)) / dt, samples_per_sec=samples / dt,
             eta_seconds=(tcfg.steps - done) / rate if rate > 0 else float("inf"),
             nonfinite_losses=int(end["nonfinite_total"]), train_seconds=train_seconds)
  if tcfg.loss_scaling == "dynamic":
    out.update(loss_scale=float(end["loss_scale"]),
               overflow_steps=int(sum(bool(m["overflow"]) for m in fetched)))
  out.update({f"loss_{s}px": float(np.mean(v)) for s, v in sorted(losses.items())})
  out.update({f"grad_norm_{s}px": float(np.mean(v)) for s, v in sorted(norms.items())})
  writer.write_scalars(done, out)
  logging.info("step %d/%d (%.1f%%)  %.1f kimg  loss %.4f  lr %.3g  %.2f steps/s  %.0f img/s  "
               "ETA %s", done, tcfg.steps, 100 * done / tcfg.steps, out["kimg"], out["loss"],
               out["lr"], out["steps_per_sec"], out["images_per_sec"],
               _fmt_duration(out["eta_seconds"]))
  bad = sum(not np.isfinite(float(m["loss"])) for m in fetched)
  if bad:
    logging.warning("%d of the last %d steps had a non-finite loss (%d in all)", bad, n,
                    out["nonfinite_losses"])
  streak = max(int(m["nonfinite_streak"]) for m in fetched)
  if tcfg.max_nonfinite_steps and streak >= tcfg.max_nonfinite_steps:
    raise NonFiniteLossError(
        f"{streak} consecutive steps up to step {done} had a non-finite loss "
        f"(train.max_nonfinite_steps={tcfg.max_nonfinite_steps}); stopping without saving. The "
        f"last checkpoint is step {mgr.latest_step()}: lower train.lr, use float32 or "
        f"dynamic loss scaling, and resume from it")
  return out


def _save(mgr, step: int, run: Run, state, train_seconds: float,
          snapshots: posthoc.Snapshots | None = None) -> None:
  """Saves the training checkpoint of `step`, once the post-hoc EMA snapshot being written (if
  any) is complete: a checkpoint is never ahead of a snapshot that a kill could still lose."""
  if snapshots is not None:
    snapshots.wait()
  checkpoint.save_state(mgr, step, run.cfg, state, progress=dict(
      step=step, nimg=run.nimg(step), data_position=step, train_seconds=train_seconds,
      process_count=jax.process_count(), mesh=dict(run.mesh.shape)))
