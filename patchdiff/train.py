"""Training: the pure step factory and the loop (mesh, input, model, compile, checkpoint, loop).

One program per patch-size bucket is compiled ahead of time at start-up; the loop only dispatches.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from patchdiff import checkpoint, config_lib, data, edm, images_io, models, patches, sampling

# ---------------------------------------------------------------------------------------------
# Pure pieces: learning rate, EMA, the step.


def learning_rate_fn(lr: float, rampup_kimg: float, images_per_step: float) -> Callable:
  """lr * min(nimg / rampup, 1), nimg counted before the step (EDM: the first step has lr 0)."""
  rampup = max(rampup_kimg * 1000.0, 1e-8)

  def fn(count):
    return lr * jnp.minimum(count * images_per_step / rampup, 1.0)
  return fn


def ema_beta(step, ema_mimg: float, rampup_ratio: float | None, images_per_step: float):
  """0.5 ** (images per step / half-life), the half-life ramped up as min(ema, ratio * nimg)."""
  nimg = step * images_per_step
  half_life = jnp.asarray(ema_mimg * 1e6, jnp.float32)
  if rampup_ratio is not None and rampup_ratio > 0:
    half_life = jnp.minimum(half_life, nimg * rampup_ratio)
  return 0.5 ** (images_per_step / jnp.maximum(half_life, 1e-8))


def make_optimizer(tcfg: ml_collections.ConfigDict, lr_fn: Callable):
  return optax.adam(lr_fn, b1=tcfg.adam_b1, b2=tcfg.adam_b2, eps=tcfg.adam_eps)


def sanitize_grads(grads):
  """EDM's gradient guard: NaN -> 0, +-inf -> +-1e5."""
  return jax.tree_util.tree_map(lambda g: jnp.nan_to_num(g, nan=0.0, posinf=1e5, neginf=-1e5),
                                grads)


def init_train_state(graphdef, variables, optimizer) -> dict[str, Any]:
  model = nnx.merge(graphdef, variables)
  _, params, buffers = nnx.split(model, nnx.Param, ...)
  return dict(params=params, buffers=buffers, ema=jax.tree_util.tree_map(jnp.copy, params),
              opt_state=optimizer.init(params), step=jnp.zeros((), jnp.int32))


def make_train_step(graphdef, optimizer, tcfg: ml_collections.ConfigDict,
                    images_per_step: float, seed: int) -> Callable:
  """train_step(state, batch) -> (state, metrics); the step's key is folded from (seed, step)."""
  base_key = jax.random.key(seed)

  def train_step(state, batch):
    key = jax.random.fold_in(base_key, state["step"])

    def loss_fn(params):
      model = nnx.merge(graphdef, params, state["buffers"])
      per_sample = edm.denoising_loss(model, batch["image"], batch["pos"], batch.get("label"),
                                      key, train=True, p_mean=tcfg.p_mean, p_std=tcfg.p_std)
      return per_sample.mean()

    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    grads = sanitize_grads(grads)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    beta = ema_beta(state["step"], tcfg.ema_mimg, tcfg.ema_rampup, images_per_step)
    ema = jax.tree_util.tree_map(lambda e, p: p + beta * (e - p), state["ema"], params)
    new_state = dict(state, params=params, ema=ema, opt_state=opt_state, step=state["step"] + 1)
    metrics = dict(loss=loss, grad_norm=optax.tree.norm(grads), ema_beta=beta)
    return new_state, metrics

  return train_step


# ---------------------------------------------------------------------------------------------
# The loop.


class Run:
  """Everything derived from the config that the loop, sampling and the tests need."""

  def __init__(self, cfg: ml_collections.ConfigDict):
    config_lib.validate(cfg)
    self.cfg = cfg
    self.model_cfg = models.resolve(cfg.model)
    self.schedule = config_lib.patch_schedule(cfg)
    self.images_per_step = cfg.train.batch_size * self.schedule.mean_batch_mul
    # Auto axes: XLA propagates shardings (make_mesh defaults to Explicit axes in new JAX).
    self.mesh = jax.make_mesh((jax.device_count(),), ("data",),
                              axis_types=(jax.sharding.AxisType.Auto,))
    self.replicated = NamedSharding(self.mesh, P())
    self.batch_sharding = NamedSharding(self.mesh, P("data"))
    self.lr_fn = learning_rate_fn(cfg.train.lr, cfg.train.lr_rampup_kimg, self.images_per_step)
    self.optimizer = make_optimizer(cfg.train, self.lr_fn)
    # The step's graphdef splits trainable params from buffers (constants such as Fourier freqs).
    self.graphdef = nnx.split(models.abstract_denoiser(self.model_cfg), nnx.Param, ...)[0]

  def init_state(self):
    graphdef, variables = models.init_state(self.model_cfg, seed=self.cfg.seed,
                                            out_shardings=self.replicated)
    state = jax.jit(lambda v: init_train_state(graphdef, v, self.optimizer),
                    out_shardings=self.replicated)(variables)
    return state

  def batch_spec(self, size: int) -> dict[str, jax.ShapeDtypeStruct]:
    b = self.cfg.train.batch_size * patches.batch_mul(size, self.schedule.resolution)
    c = self.model_cfg["img_channels"]
    spec = dict(image=jax.ShapeDtypeStruct((b, size, size, c), jnp.float32, sharding=self.batch_sharding),
                pos=jax.ShapeDtypeStruct((b, size, size, 2), jnp.float32, sharding=self.batch_sharding))
    if self.model_cfg["label_dim"]:
      spec["label"] = jax.ShapeDtypeStruct((b, self.model_cfg["label_dim"]), jnp.float32,
                                           sharding=self.batch_sharding)
    return spec

  def compile_steps(self, state) -> dict[int, Any]:
    """One ahead-of-time compiled program per bucket; the loop never compiles again."""
    step_fn = make_train_step(self.graphdef, self.optimizer, self.cfg.train,
                              self.images_per_step, self.cfg.seed)
    jitted = jax.jit(step_fn, donate_argnums=0,
                     out_shardings=(self.replicated, self.replicated))
    abstract_state = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    compiled = {}
    for size in self.schedule.active_sizes:
      t0 = time.perf_counter()
      compiled[size] = jitted.lower(abstract_state, self.batch_spec(size)).compile()
      logging.info("compiled the %dpx step (batch %d) in %.1f s", size,
                   self.batch_spec(size)["image"].shape[0], time.perf_counter() - t0)
    return compiled

  def to_device(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """This host's slice of the step's batch -> global arrays sharded over the mesh."""
    keys = ("image", "pos", "label") if self.model_cfg["label_dim"] else ("image", "pos")
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, batch[k])
            for k in keys}

  def denoiser(self, ema, buffers) -> nnx.Module:
    return nnx.merge(self.graphdef, ema, buffers)

  def sample(self, denoiser, num: int, seed: int) -> np.ndarray:
    """`num` images from seeds seed..seed+num-1 as uint8 (num, R, R, C)."""
    scfg = self.cfg.sample
    r = self.model_cfg["img_resolution"]
    c = self.model_cfg["img_channels"]
    out = []
    for start in range(0, num, scfg.batch_size):
      seeds = np.arange(seed + start, seed + min(start + scfg.batch_size, num))
      keys = jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))
      latents = jax.vmap(lambda k: jax.random.normal(k, (r, r, c)))(keys)
      labels = None
      if self.model_cfg["label_dim"]:
        cls = jax.vmap(lambda k: jax.random.randint(jax.random.fold_in(k, 1), (), 0,
                                                    self.model_cfg["label_dim"]))(keys)
        labels = jax.nn.one_hot(cls, self.model_cfg["label_dim"])
      x = sampling.heun_sample(denoiser, latents, num_steps=scfg.num_steps,
                               s_churn=scfg.s_churn, s_min=scfg.s_min, s_max=scfg.s_max,
                               s_noise=scfg.s_noise, labels=labels, guidance=scfg.guidance,
                               key=jax.vmap(lambda k: jax.random.fold_in(k, 2))(keys))
      out.append(images_io.to_uint8(np.asarray(x)))
    return np.concatenate(out)


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


def train_and_evaluate(cfg: ml_collections.ConfigDict, workdir: str,
                       on_step: Callable[[int, int], None] | None = None) -> dict[str, Any]:
  """Trains (or resumes) the run in `workdir`; returns the last logged metrics.

  `on_step(step, patch_size)` is called after each step is dispatched (tests use it).
  """
  run = Run(cfg)
  tcfg = cfg.train
  os.makedirs(workdir, exist_ok=True)
  from clu import metric_writers  # pylint: disable=import-outside-toplevel
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)

  # ---- Where we start: the latest checkpoint of the workdir, if any.
  mgr = checkpoint.manager(workdir, max_to_keep=tcfg.keep_checkpoints)
  start = mgr.latest_step()
  if start is not None:
    config_lib.check_compatible(checkpoint.restore_config(mgr, start), cfg,
                                where=f"{mgr.directory}/{start}")

  # ---- Input from that step; a bad dataset fails here, before anything is compiled.
  batches = data.build_input(cfg.data, run.schedule, tcfg.batch_size, tcfg.steps,
                             start_step=start or 0, seed=cfg.seed,
                             process_index=jax.process_index(),
                             process_count=jax.process_count(),
                             label_dim=run.model_cfg["label_dim"])

  # ---- State: fresh, or restored.
  state = run.init_state()
  if start is not None:
    restored = checkpoint.restore(mgr, start, ema_target=dict(params=state["ema"],
                                                              buffers=state["buffers"]),
                                  train_target=dict(params=state["params"],
                                                    opt_state=state["opt_state"],
                                                    step=state["step"]))
    state = dict(restored["train"], ema=restored["ema"]["params"],
                 buffers=restored["ema"]["buffers"])
    logging.info("resumed from step %d", start)
  start = start or 0

  # ---- Programs, one per bucket.
  compiled = run.compile_steps(state)

  # ---- Loop.
  pending, last = [], dict(loss=float("nan"))
  t_log, step = time.perf_counter(), start
  watch = PreemptionWatch()
  for step in range(start, tcfg.steps):
    batch = next(batches)
    size = int(batch["image"].shape[1])
    state, metrics = compiled[size](state, run.to_device(batch))
    pending.append((size, metrics))
    if on_step is not None:
      on_step(step, size)
    done = step + 1
    if done % tcfg.log_every == 0 or done == tcfg.steps:
      fetched = jax.device_get([m for _, m in pending])
      losses = {}
      for (s, _), m in zip(pending, fetched):
        losses.setdefault(s, []).append(float(m["loss"]))
      dt = time.perf_counter() - t_log
      last = dict(loss=float(np.mean([float(m["loss"]) for m in fetched])),
                  steps_per_sec=len(pending) / dt,
                  kimg=done * run.images_per_step / 1000,
                  lr=float(run.lr_fn(done - 1)))
      last.update({f"loss_{s}px": float(np.mean(v)) for s, v in losses.items()})
      writer.write_scalars(done, last)
      pending, t_log = [], time.perf_counter()
    if watch.should_stop(done):
      _save(mgr, done, cfg, state)
      logging.warning("stopped at step %d on a preemption notice; the checkpoint is saved, "
                      "run the same command again to resume", done)
      break
    if done % tcfg.checkpoint_every == 0 or done == tcfg.steps:
      _save(mgr, done, cfg, state)
    # Sample grids need every host's devices; sharded multi-host sampling is still to come.
    if jax.process_count() == 1 and (
        (tcfg.sample_every and done % tcfg.sample_every == 0) or done == tcfg.steps):
      grid = run.sample(run.denoiser(state["ema"], state["buffers"]), cfg.sample.grid_size,
                        cfg.sample.seed)
      path = os.path.join(workdir, f"samples_{done:08d}.png")
      images_io.save_grid(grid, path)
      writer.write_images(done, {"ema_samples": images_io.make_grid(grid)[None]})
  watch.close()
  mgr.wait_until_finished()
  mgr.close()
  writer.flush()
  return last


def _save(mgr, step: int, cfg, state) -> None:
  checkpoint.save(mgr, step, config=cfg,
                  ema=dict(params=state["ema"], buffers=state["buffers"]),
                  train=dict(params=state["params"], opt_state=state["opt_state"],
                             step=state["step"]))
