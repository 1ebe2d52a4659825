"""The trainer: mesh, input, state, one compiled gradient program per patch-size bucket and one
update program that they share, and the loop.

The programs are compiled ahead of time at start-up; the loop only dispatches. The step itself
is `patchdiff.train_step`; checkpoints are `patchdiff.checkpoint`.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import signal
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from patchdiff import (checkpoint, config_lib, data, evaluation, generate, images_io, metrics,
                       patches, phema, posthoc, pretrained, sharding, train_step, xla_options)
from patchdiff.nn import models

# ---------------------------------------------------------------------------------------------
# The loop.


class Run:
  """Everything derived from the config that the loop needs: mesh, schedule, state layout, and
  the programs of the step.

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
    self.rounds = config_lib.accumulation_rounds(cfg, self.mesh.devices.size)
    if max(self.rounds.values()) > 1:
      logging.info("gradient accumulation (train.batch_per_device=%d): rounds per bucket %s",
                   cfg.train.batch_per_device, self.rounds)
    self.replicated = NamedSharding(self.mesh, P())
    self._apply = None  # the compiled update program, once compiled
    self.batch_sharding = NamedSharding(self.mesh, sharding.BATCH)
    self.optimizer = train_step.make_optimizer(cfg.train)
    self._init_graphdef, self._init_fn = models.initializer(self.model_cfg, seed=cfg.seed)
    # The step's graphdef splits trainable params from buffers (constants such as Fourier freqs).
    self.graphdef = nnx.split(models.abstract_denoiser(self.model_cfg), nnx.Param, ...)[0]
    shapes = jax.eval_shape(self._fresh_state)
    self.state_shardings = sharding.state_shardings(self.mesh, shapes, cfg.mesh.param_sharding)
    self.abstract_state = jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes,
        self.state_shardings)

  def _fresh_state(self, weights=None):
    variables = self._init_fn()
    if weights:
      variables = models.set_variables(self._init_graphdef, variables, weights)
    return train_step.init_train_state(self._init_graphdef, variables, self.optimizer,
                                      self.cfg.train.loss_scale, len(self.phema_stds))

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

  def batch_spec(self, size: int) -> dict[str, jax.ShapeDtypeStruct]:
    b = self.cfg.train.batch_size * patches.batch_mul(size, self.schedule.resolution)
    c = self.model_cfg["img_channels"]
    shard = self.batch_sharding
    # Pixel sources send uint8 pixels (the step maps them to [-1, 1]); latents send float32.
    dtype = jnp.uint8 if self.cfg.data.source in config_lib.PIXEL_SOURCES else jnp.float32
    spec = dict(image=jax.ShapeDtypeStruct((b, size, size, c), dtype, sharding=shard),
                pos=jax.ShapeDtypeStruct((b, size, size, 2), jnp.float32, sharding=shard))
    if self.model_cfg["label_dim"]:
      spec["label"] = jax.ShapeDtypeStruct((b, self.model_cfg["label_dim"]), jnp.float32,
                                           sharding=shard)
    return spec

  def random_batch(self, size: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A host batch of `batch_spec(size)` with random content (for benchmarks): pixels as the
    pipeline sends them (uint8 for pixel sources), the coordinates of patches at (0, 0)."""
    spec = self.batch_spec(size)
    host = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in spec.items()}
    if spec["image"].dtype == np.uint8:
      host["image"] = rng.integers(0, 256, spec["image"].shape, dtype=np.uint8)
    b = spec["image"].shape[0]
    host["pos"] = patches.coord_grid(np.zeros(b, np.int32), np.zeros(b, np.int32), size,
                                     self.schedule.resolution)
    return host

  def nimg(self, step: int) -> int:
    """Images counted before `step`, exactly as the official loop counts them
    (`patches.PatchSchedule`)."""
    return int(self.schedule.nimg_before([step])[0])

  def grad_step_fn(self, size: int) -> Callable:
    n = self.mesh.devices.size
    rounds = self.rounds.get(size) or config_lib.accumulation_rounds(  # a bucket never drawn
        self.cfg, n, sizes=(size,))[size]
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

  def trace_grad(self, size: int):
    """The gradient program of `size` px patches, traced for the mesh: `.jaxpr` for counting
    FLOPs, `.lower()` for compiling; one trace serves both."""
    jitted = self.jit(self.grad_step_fn(size),
                      out_shardings=(self.state_shardings["params"], self.replicated))
    return jitted.trace(self.abstract_state, self.batch_spec(size))

  def trace_apply(self):
    """The update program that every bucket shares, traced for the mesh (state donated; the
    gradients have no output of their shape left to reuse)."""
    jitted = self.jit(train_step.make_apply_step(self.optimizer, self.cfg.train),
                      donate_argnums=0, out_shardings=(self.state_shardings, self.replicated))
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=self.replicated)
    hyper = jax.ShapeDtypeStruct((2 + len(self.phema_stds),), jnp.float32,
                                 sharding=self.replicated)
    return jitted.trace(self.abstract_state, self.abstract_state["params"], scalar, hyper)

  def bind_step(self, size: int, grad, apply) -> "Step":
    """The step of `size` px patches from its compiled gradient and update programs."""
    return Step(grad, apply)

  def update_program(self):
    """The compiled update program, compiled on the first call (or by `compile_steps`)."""
    if self._apply is None:
      self._apply = self.trace_apply().lower().compile()
    return self._apply

  def compile_step(self, size: int) -> "Step":
    """The train step of `size` px patches, compiled (the update program once per Run)."""
    return self.bind_step(size, self.trace_grad(size).lower().compile(), self.update_program())

  def compile_steps(self) -> tuple[dict[int, "Step"], dict[str, dict[str, float]]]:
    """Every bucket's train step, compiled ahead of time (the loop never compiles again), and
    each program's compile time, FLOPs per step and memory (bytes), keyed "16px", ...,
    "update".

    A step is two programs: the bucket's gradient program and the update program (optimizer,
    EMA, loss scaling), which is the same for every bucket and so compiled once. The programs
    are traced and lowered one after the other (Python, under the GIL) and handed to XLA as each
    is ready, `train.compile_threads` at a time (0: all at once): XLA compiles outside the GIL,
    so one program's compile overlaps the next one's tracing and the other compiles. The
    programs are the same as compiled one by one.
    """
    sizes = list(self.schedule.active_sizes)
    threads = self.cfg.train.compile_threads or len(sizes) + 1
    t_all = time.perf_counter()
    jobs, traced_at = {}, {}

    def compile_one(lowered):
      t0 = time.perf_counter()
      return lowered.compile(), time.perf_counter() - t0

    names = {"update": None, **{f"{size}px": size for size in sizes}}
    with concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="compile") as pool:
      for name, size in names.items():
        t0 = time.perf_counter()
        traced = self.trace_apply() if size is None else self.trace_grad(size)
        lowered = traced.lower()
        traced_at[name] = (traced, time.perf_counter() - t0)
        jobs[name] = pool.submit(compile_one, lowered)
      programs, stats = {}, {}
      for name, size in names.items():
        programs[name], seconds = jobs[name].result()
        traced, trace_seconds = traced_at[name]
        stats[name] = s = dict(compile_seconds=trace_seconds + seconds,
                               model_flops=train_step.jaxpr_flops(traced.jaxpr),
                               **train_step.program_stats(programs[name]))
        what = ("the update program" if size is None else
                f"the {size}px gradient program (batch {self.batch_spec(size)['image'].shape[0]}, "
                f"{s['model_flops'] / 1e9:.4g} GFLOP per step)")
        logging.info("compiled %s in %.1f s (tracing %.1f s); memory per device: arguments "
                     "%.1f MiB, outputs %.1f MiB, temporaries %.1f MiB", what,
                     s["compile_seconds"], trace_seconds, s["argument_bytes"] / 2**20,
                     s["output_bytes"] / 2**20, s["temp_bytes"] / 2**20)
    self._apply = programs["update"]
    steps = {size: self.bind_step(size, programs[f"{size}px"], self._apply) for size in sizes}
    self.compile_wall_seconds = time.perf_counter() - t_all
    logging.info("compiled %d programs (%d buckets and the update) in %.1f s (%d at a time)",
                 len(names), len(sizes), self.compile_wall_seconds, threads)
    return steps, stats

  def to_device(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """This host's slice of the step's batch -> global arrays sharded over the mesh."""
    keys = ("image", "pos", "label") if self.model_cfg["label_dim"] else ("image", "pos")
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, batch[k])
            for k in keys}


class Step:
  """One bucket's train step as the loop calls it, step(state, batch, hyper) -> (state,
  metrics): the bucket's gradient program `grad`, then the update program `apply` that all
  buckets share (it donates the state), given the step's [lr, ema_beta] (`Run.hyper`)."""

  def __init__(self, grad, apply):
    self.grad, self.apply = grad, apply

  def __call__(self, state, batch, hyper: jax.Array):
    grads, loss = self.grad(state, batch)
    return self.apply(state, grads, loss, hyper)


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
  cfg = config_lib.finalize(cfg)
  tcfg = cfg.train
  run = Run(cfg, devices)
  os.makedirs(workdir, exist_ok=True)
  use_compilation_cache(tcfg.compilation_cache_dir, workdir)
  from clu import metric_writers  # pylint: disable=import-outside-toplevel
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)

  # ---- Where we start: the latest complete checkpoint of the workdir, if any.
  mgr = checkpoint.manager(workdir, max_to_keep=tcfg.keep_checkpoints)
  start = mgr.latest_step()
  if start is not None:
    saved_cfg = checkpoint.restore_config(mgr, start)
    config_lib.check_compatible(saved_cfg, cfg, where=f"{mgr.directory}/{start}")
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

  # ---- FID during training: the Inception weights load here, before anything is compiled.
  monitor = None
  if tcfg.fid_every:
    if jax.process_count() > 1:
      logging.warning("train.fid_every: FID during training runs with one process only; use "
                      "--mode=eval on the checkpoints")
    else:
      monitor = evaluation.QualityMonitor(cfg, workdir)

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
  compiled, stats = run.compile_steps()
  scalars = {}
  for name, st in stats.items():
    scalars.update({f"compile_seconds_{name}": st["compile_seconds"],
                    f"temp_mib_{name}": st["temp_bytes"] / 2**20})
    if name != "update":
      scalars[f"gflop_per_step_{name}"] = st["model_flops"] / 1e9
  writer.write_scalars(first, scalars)

  # ---- Loop. Nothing here waits for the device except the metrics fetched every log_every.
  pending, last = [], dict(loss=float("nan"))
  reference: list[np.ndarray] = []  # full-size training images, for SWD of the sample grids
  pixels = evaluation.pixel_model(cfg)
  want_reference = jax.process_count() == 1 and cfg.sample.grid_size >= 2 and pixels
  decoder = evaluation.latent_decoder(cfg)  # None for a pixel model
  show_samples = pixels or decoder is not None
  if not show_samples:
    logging.info("no sample grids: a latent model needs vae.path to decode its samples")
  t_log = t_loop = time.perf_counter()
  paused = 0.0  # seconds of the loop spent sampling and measuring
  clock = lambda: train_seconds + time.perf_counter() - t_loop - paused  # noqa: E731
  step = first
  watch = PreemptionWatch()
  try:
    for step in range(first, tcfg.steps):
      batch = next(batches)
      size = int(batch["image"].shape[1])
      if (want_reference and size == run.schedule.resolution
          and sum(len(r) for r in reference) < cfg.sample.grid_size):
        reference.append(images_io.to_uint8(batch["image"]))  # uint8 already, unless synthetic
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
      # Sample grids need every host's devices; sharded multi-host sampling is still to come.
      want_grid = jax.process_count() == 1 and cfg.sample.grid_size and show_samples and (
          (tcfg.sample_every and done % tcfg.sample_every == 0) or done == tcfg.steps)
      want_fid = monitor is not None and (done % tcfg.fid_every == 0 or done == tcfg.steps)
      if want_grid or want_fid:
        jax.block_until_ready(state)  # the steps dispatched so far count as training time
        seconds, t_pause = clock(), time.perf_counter()
        sampler = generate.Sampler(nnx.merge(run.graphdef, state["ema"], state["buffers"]),
                                   run.model_cfg, cfg.sample, mesh=run.mesh, decoder=decoder)
        num = max(cfg.sample.grid_size if want_grid else 0, monitor.num if want_fid else 0)
        images = images_io.to_uint8(sampler.sample(list(range(cfg.sample.seed,
                                                              cfg.sample.seed + num))))
        if want_fid:
          scores = monitor.measure(images)
          writer.write_scalars(done, dict(scores, train_seconds=seconds))
          logging.info("step %d: FID %.2f of %d EMA samples against the training set; SWD %s",
                       done, scores["fid"], len(images), ", ".join(
                           f"{k} {v:.1f}" for k, v in scores.items() if k.startswith("swd")))
        if want_grid:
          grid = images[:cfg.sample.grid_size]
          images_io.save_grid(grid, os.path.join(workdir, f"samples_{done:08d}.png"))
          writer.write_images(done, {"ema_samples": images_io.make_grid(grid)[None]})
          if reference:
            _log_swd(writer, done, grid, np.concatenate(reference))
        paused += time.perf_counter() - t_pause
        t_log += time.perf_counter() - t_pause  # the interval's rates are of steps only
  finally:
    watch.close()
    if snapshots is not None:
      snapshots.close()
    mgr.wait_until_finished()
    mgr.close()
    writer.flush()
  return last


def _log_swd(writer, step: int, samples: np.ndarray, reference: np.ndarray) -> None:
  """Sliced Wasserstein distance of the EMA grid to as many training images: a rough, offline
  quality signal (small sets are noisy; `--mode=eval` measures on thousands)."""
  n = min(len(samples), len(reference))
  try:
    swd = metrics.sliced_wasserstein(samples[:n], reference[:n],
                                     min_resolution=min(16, samples.shape[1]))
  except ValueError as e:
    logging.warning("no SWD for the sample grid: %s", e)
    return
  writer.write_scalars(step, {f"grid_{k}": v for k, v in swd.items()})
  logging.info("SWD of %d EMA samples to %d training images: %s", n, n,
               ", ".join(f"{k} {v:.1f}" for k, v in swd.items()))


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
