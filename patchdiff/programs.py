"""The train step's programs, compiled ahead of time: a gradient program per patch-size bucket (its
batch shape and accumulation rounds) and the update program that every bucket shares, with each
program's compile time, FLOPs and memory.

The trainer (`patchdiff.train`) compiles them all at start-up (`Programs.compile_steps`); its
loop only dispatches them. The functions they compile are `patchdiff.train_step`'s.
"""
from __future__ import annotations

import concurrent.futures
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from patchdiff import config_lib, patches, train_step


class Step:
  """One bucket's train step as the loop calls it, step(state, batch, hyper) -> (state,
  metrics): the bucket's gradient program `grad`, then the update program `apply` that all
  buckets share (it donates the state), given the step's [lr, ema_beta] (`train.Run.hyper`)."""

  def __init__(self, grad, apply):
    self.grad, self.apply = grad, apply

  def __call__(self, state, batch, hyper: jax.Array):
    grads, loss = self.grad(state, batch)
    return self.apply(state, grads, loss, hyper)


class Programs:
  """The programs of `run`'s step (a `train.Run`: its mesh, state layout, optimizer and
  gradient functions), traced and compiled for its mesh. The update program is compiled once
  per `Programs`, on the first call that needs it."""

  def __init__(self, run):
    self.run = run
    self._apply = None  # the compiled update program, once compiled
    self.compile_wall_seconds = None  # of the last `compile_steps`

  def batch_spec(self, size: int) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch of a step of `size` px patches, sharded over the mesh."""
    run = self.run
    b = run.cfg.train.batch_size * patches.batch_mul(size, run.schedule.resolution)
    c = run.model_cfg["img_channels"]
    shard = run.batch_sharding
    # Pixel sources send uint8 pixels (the step maps them to [-1, 1]); latents send float32.
    dtype = jnp.uint8 if run.cfg.data.source in config_lib.PIXEL_SOURCES else jnp.float32
    spec = dict(image=jax.ShapeDtypeStruct((b, size, size, c), dtype, sharding=shard),
                pos=jax.ShapeDtypeStruct((b, size, size, 2), jnp.float32, sharding=shard))
    if run.model_cfg["label_dim"]:
      spec["label"] = jax.ShapeDtypeStruct((b, run.model_cfg["label_dim"]), jnp.float32,
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
                                     self.run.schedule.resolution)
    return host

  def trace_grad(self, size: int):
    """The gradient program of `size` px patches, traced for the mesh: `.jaxpr` for counting
    FLOPs, `.lower()` for compiling; one trace serves both."""
    run = self.run
    jitted = run.jit(run.grad_step_fn(size),
                     out_shardings=(run.state_shardings["params"], run.replicated))
    return jitted.trace(run.abstract_state, self.batch_spec(size))

  def trace_apply(self):
    """The update program that every bucket shares, traced for the mesh (state donated; the
    gradients have no output of their shape left to reuse)."""
    run = self.run
    jitted = run.jit(train_step.make_apply_step(run.optimizer, run.cfg.train),
                     donate_argnums=0, out_shardings=(run.state_shardings, run.replicated))
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=run.replicated)
    hyper = jax.ShapeDtypeStruct((2 + len(run.phema_stds),), jnp.float32,
                                 sharding=run.replicated)
    return jitted.trace(run.abstract_state, run.abstract_state["params"], scalar, hyper)

  def update_program(self):
    """The compiled update program, compiled on the first call (or by `compile_steps`)."""
    if self._apply is None:
      self._apply = self.trace_apply().lower().compile()
    return self._apply

  def compile_step(self, size: int) -> Step:
    """The train step of `size` px patches, compiled (the update program once)."""
    return Step(self.trace_grad(size).lower().compile(), self.update_program())

  def compile_steps(self) -> tuple[dict[int, Step], dict[str, dict[str, float]]]:
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
    sizes = list(self.run.schedule.active_sizes)
    threads = self.run.cfg.train.compile_threads or len(sizes) + 1
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
      compiled, stats = {}, {}
      for name, size in names.items():
        compiled[name], seconds = jobs[name].result()
        traced, trace_seconds = traced_at[name]
        stats[name] = s = dict(compile_seconds=trace_seconds + seconds,
                               model_flops=jaxpr_flops(traced.jaxpr),
                               **program_stats(compiled[name]))
        what = ("the update program" if size is None else
                f"the {size}px gradient program (batch {self.batch_spec(size)['image'].shape[0]}, "
                f"{s['model_flops'] / 1e9:.4g} GFLOP per step)")
        logging.info("compiled %s in %.1f s (tracing %.1f s); memory per device: arguments "
                     "%.1f MiB, outputs %.1f MiB, temporaries %.1f MiB", what,
                     s["compile_seconds"], trace_seconds, s["argument_bytes"] / 2**20,
                     s["output_bytes"] / 2**20, s["temp_bytes"] / 2**20)
    self._apply = compiled["update"]
    steps = {size: Step(compiled[f"{size}px"], self._apply) for size in sizes}
    self.compile_wall_seconds = time.perf_counter() - t_all
    logging.info("compiled %d programs (%d buckets and the update) in %.1f s (%d at a time)",
                 len(names), len(sizes), self.compile_wall_seconds, threads)
    return steps, stats


def jaxpr_flops(closed_jaxpr) -> float:
  """FLOPs of the convolutions and matrix products of a traced program's (closed) jaxpr (2 per
  multiply-add), forward and backward passes included: the count that MFU is defined with, the
  same on every platform (XLA's own counts skip the cuDNN calls on GPU)."""
  from jax.extend import core as jcore  # pylint: disable=import-outside-toplevel

  def count(jaxpr) -> float:
    total = 0.0
    for eqn in jaxpr.eqns:
      name = eqn.primitive.name
      if name in ("dot_general", "conv_general_dilated"):
        out = float(np.prod(eqn.outvars[0].aval.shape))
        if name == "dot_general":
          (lc, _), _ = eqn.params["dimension_numbers"]
          shape = eqn.invars[0].aval.shape
          total += 2 * out * float(np.prod([shape[d] for d in lc]))
        else:
          rhs = eqn.invars[1].aval.shape
          out_dim = eqn.params["dimension_numbers"].rhs_spec[0]
          total += 2 * out * float(np.prod(rhs)) / rhs[out_dim]
      times = float(eqn.params.get("length", 1)) if name == "scan" else 1.0
      for value in eqn.params.values():
        subs = value if isinstance(value, (tuple, list)) else (value,)
        found = [count(v.jaxpr if isinstance(v, jcore.ClosedJaxpr) else v) for v in subs
                 if isinstance(v, (jcore.ClosedJaxpr, jcore.Jaxpr))]
        if found:
          total += times * (max(found) if name == "cond" else sum(found))
    return total
  return count(closed_jaxpr.jaxpr)


def program_stats(compiled) -> dict[str, float]:
  """XLA's memory analysis of a compiled program (bytes per device).

  XLA's cost analysis is left out: its FLOP count is not reliable on GPU (after compilation,
  convolutions are cuDNN custom calls that it counts as zero: 712 GFLOP for a 64 TFLOP step of
  the FFHQ-64 model on an H100; the lowered module's analysis gave 0 there, JAX 0.11.2), and on
  the lowered module it converts the whole program to HLO first (a second per bucket of a tiny
  model on CPU, paid at every start). `jaxpr_flops` is the count to use.
  """
  mem = compiled.memory_analysis()
  get = lambda name: float(getattr(mem, name, 0) or 0) if mem is not None else 0.0  # noqa: E731
  return dict(argument_bytes=get("argument_size_in_bytes"),
              output_bytes=get("output_size_in_bytes"),
              temp_bytes=get("temp_size_in_bytes"),
              alias_bytes=get("alias_size_in_bytes"))
