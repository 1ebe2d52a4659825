"""The training state and the pure train step: learning-rate ramp, EMA, loss scaling, Adam.

The step has two halves: `make_grad_step` (the loss and its gradient, which depend on the
bucket's batch shape) and `make_apply_step` (everything after the gradient, the same for every
bucket, so the trainer compiles it once; `patchdiff.programs` compiles both). The step's
learning rate and EMA decay are computed on the host, in float64 from the exact image count, as
the official loop computes them (`step_hyperparameters`), and enter as arguments.
tests/test_official_steps.py replays the official loop's recorded steps through these
functions.

The state is one dict of arrays. `train_state_of` defines its keys and the step returns the
same dict, so the keys are written here only; `patchdiff.checkpoint` stores the EMA weights and
buffers as the `ema` item (enough to sample) and every other key as the `train` item. With
post-hoc EMA (train.phema.stds) the state holds `phema`, a list of power-function EMAs of the
parameters (`patchdiff.phema`), one per std, each moved by its own beta of `hyper`.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P

from patchdiff import phema
from patchdiff.nn import edm, models


def learning_rate(tcfg: ml_collections.ConfigDict, nimg: int) -> float:
  """The official loop's learning rate, in float64 on the host: lr * min(nimg / rampup, 1) with
  nimg the images counted before the step (so the first step's lr is 0)."""
  return tcfg.lr * min(nimg / max(tcfg.lr_rampup_kimg * 1000, 1e-8), 1)


def ema_beta(tcfg: ml_collections.ConfigDict, nimg: int, images: float) -> float:
  """The official loop's EMA decay, in float64 on the host: 0.5 ** (images / half-life), the
  half-life ema_mimg ramped up as min(ema_mimg, ema_rampup * nimg) (in images; nimg counted
  before the step), `images` the step's batch_size * batch_mul_avg
  (`PatchSchedule.ema_images`)."""
  half_life = tcfg.ema_mimg * 1e6
  if tcfg.ema_rampup is not None and tcfg.ema_rampup > 0:
    half_life = min(half_life, nimg * tcfg.ema_rampup)
  return 0.5 ** (images / max(half_life, 1e-8))


def step_hyperparameters(tcfg: ml_collections.ConfigDict, schedule, nimg: int,
                         size: int) -> tuple[float, float]:
  """(lr, ema_beta) of a step of `size` px patches after `nimg` images were counted
  (`schedule`: the run's `patches.PatchSchedule`), as the official loop computes them."""
  return learning_rate(tcfg, nimg), ema_beta(tcfg, nimg, schedule.ema_images(size))


# The train-config fields that each half of the step (and the optimizer) reads. They are memoised
# on these fields and their other arguments, so runs whose configs differ elsewhere (steps,
# logging, data) get the same function, which JAX's caches recognise: a second trainer in one
# process (a resumed run, a notebook's next run) neither traces nor compiles the step again. The
# functions are given these fields only: reading another is an error, never a stale program.
ADAM_FIELDS = ("adam_b1", "adam_b2", "adam_eps")
GRAD_FIELDS = ("p_mean", "p_std")
APPLY_FIELDS = ("loss_scaling", "loss_scale_period")
_MEMO = 64  # functions of each kind kept


def _fields(tcfg, names: tuple[str, ...]) -> ml_collections.FrozenConfigDict:
  return ml_collections.FrozenConfigDict({k: tcfg[k] for k in names})


def make_optimizer(tcfg: ml_collections.ConfigDict):
  """Adam's update direction; the step scales it by the learning rate of the images counted.
  Equal Adam settings give the same optimizer object."""
  return _optimizer(_fields(tcfg, ADAM_FIELDS))


@functools.lru_cache(maxsize=_MEMO)
def _optimizer(tcfg: ml_collections.FrozenConfigDict):
  return optax.scale_by_adam(b1=tcfg.adam_b1, b2=tcfg.adam_b2, eps=tcfg.adam_eps)


def sanitize_grads(grads):
  """EDM's gradient guard: NaN -> 0, +-inf -> +-1e5."""
  return jax.tree_util.tree_map(lambda g: jnp.nan_to_num(g, nan=0.0, posinf=1e5, neginf=-1e5),
                                grads)


def train_state_of(graphdef, variables, optimizer, loss_scale: float = 1.0,
                   phema_count: int = 0) -> dict[str, Any]:
  """The training state that starts from `variables` (the state of the denoiser `graphdef`;
  traceable inside a jit): the EMA (and, with `phema_count` > 0, as many post-hoc EMAs under
  `phema`) start as copies of the parameters, the optimizer state, step and counters fresh."""
  model = nnx.merge(graphdef, variables)
  _, params, buffers = nnx.split(model, nnx.Param, ...)
  state = dict(params=params, buffers=buffers, ema=jax.tree_util.tree_map(jnp.copy, params),
               opt_state=optimizer.init(params), step=jnp.zeros((), jnp.int32),
               loss_scale=jnp.asarray(loss_scale, jnp.float32),
               good_steps=jnp.zeros((), jnp.int32),      # finite steps since the scale changed
               nonfinite_streak=jnp.zeros((), jnp.int32),  # consecutive non-finite losses
               nonfinite_total=jnp.zeros((), jnp.int32))
  if phema_count:
    state["phema"] = [jax.tree_util.tree_map(jnp.copy, params) for _ in range(phema_count)]
  return state


def make_fresh_state(init_graphdef, init: Callable, optimizer, loss_scale: float = 1.0,
                     phema_count: int = 0) -> Callable:
  """fresh_state(weights=None) -> the training state (`train_state_of`) of a fresh denoiser
  (`models.initializer`'s graphdef and init), `weights` ({official tensor name: array}) in place
  of the fresh values they name; trace it inside a jit. Equal arguments give the same
  function."""
  return _fresh_state(init_graphdef, init, optimizer, float(loss_scale), int(phema_count))


@functools.lru_cache(maxsize=_MEMO)
def _fresh_state(init_graphdef, init, optimizer, loss_scale, phema_count) -> Callable:
  def fresh_state(weights=None):
    variables = init()
    if weights:
      variables = models.set_variables(init_graphdef, variables, weights)
    return train_state_of(init_graphdef, variables, optimizer, loss_scale, phema_count)
  return fresh_state


def _all_finite(tree):
  return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree_util.tree_leaves(tree)]))


# uint8 pixel value v -> v / 127.5 - 1 in float32, as a table: the value numpy and TensorFlow
# compute (correctly rounded), bit for bit; XLA's division on CPU differs by 1 ulp for some v.
_PIXEL_VALUES = np.arange(256, dtype=np.float32) / np.float32(127.5) - np.float32(1)


def model_images(x: jax.Array) -> jax.Array:
  """A batch's images as the network takes them: uint8 pixels (what pixel sources send to the
  device, a quarter of float32's bytes) -> v / 127.5 - 1 in float32; float images (latents,
  synthetic data) as they are."""
  if x.dtype == jnp.uint8:
    return jnp.asarray(_PIXEL_VALUES)[x.astype(jnp.int32)]
  return x


# Draws a batch may carry to replace the step's own (`edm.training_draws`): replaying another
# loop's recorded steps (tests/test_official_steps.py) feeds its noise levels and noise here.
RECORDED_DRAWS = ("rnd_normal", "noise")


def make_grad_fn(graphdef, tcfg: ml_collections.ConfigDict, rounds: int = 1, shards: int = 1,
                 mesh: Mesh | None = None) -> Callable:
  """grad_fn(params, buffers, batch, key, scale) -> (grads, loss): the gradient of scale times
  the mean per-sample loss of the batch, and that mean (unscaled).

  Sample i of the batch (its row in the global batch) draws its noise level, noise and dropout
  from `edm.sample_keys(key, i)`, whatever micro-batch computes it; a batch that carries
  `RECORDED_DRAWS` (rows like the images') uses those instead.

  `rounds` > 1 accumulates the gradient over that many micro-batches in one `lax.scan`. The
  batch is taken as `shards` contiguous blocks, one per device of the mesh in order (how the
  batch is sharded), and micro-batch j holds the j-th `rounds`-th of every block: each device
  computes on rows it holds, and reshaping the batch to (shards, rounds, micro) moves no data
  between devices. Each round adds the gradient of scale * (its per-sample losses summed) / B,
  so the sum is the gradient of the mean over the whole batch.

  With `mesh` (the batch split over all its axes, the parameters replicated on it), the rounds
  run under `shard_map`: every device sums the gradients of its own micro-batches and the
  devices add their sums once, after the last round (one all-reduce per step). Without it (the
  fsdp layout), XLA partitions the scan; the CPU backend then reduces every round's gradient
  inside the loop.
  """
  if rounds < 1 or shards < 1:
    raise ValueError(f"rounds={rounds} and shards={shards} must be positive")
  if mesh is not None and shards != mesh.devices.size:
    raise ValueError(f"shards={shards} differs from the mesh's {mesh.devices.size} devices")

  def accumulate(params, buffers, batch, index, key, scale, b, blocks):
    """The gradient and the summed per-sample losses of the rows of `batch` (global row numbers
    `index`), in `rounds` rounds over `blocks` contiguous blocks; B = b."""

    def loss_fn(params, part, idx):  # scale * (the part's per-sample losses summed) / B
      model = nnx.merge(graphdef, params, buffers)
      images = model_images(part["image"])
      draws = edm.training_draws(edm.sample_keys(key, idx), images.shape, p_mean=tcfg.p_mean,
                                 p_std=tcfg.p_std)
      draws.update({k: part[k] for k in RECORDED_DRAWS if k in part})
      per_sample = edm.loss_of_draws(model, images, part["pos"], part.get("label"), draws,
                                     train=True, p_mean=tcfg.p_mean, p_std=tcfg.p_std)
      total = per_sample.sum()
      return total * (scale / b), total

    value_and_grad = jax.value_and_grad(loss_fn, has_aux=True)
    if rounds == 1:
      (_, total), grads = value_and_grad(params, batch, index)
      return grads, total
    rows = index.shape[0]
    if rows % (blocks * rounds):
      raise ValueError(f"a batch of {rows} does not split into {blocks} blocks x {rounds} rounds")
    micro = rows // (blocks * rounds)

    def split(x):  # (rows, ...) -> (rounds, blocks * micro, ...); a device's rows stay on it
      x = x.reshape(blocks, rounds, micro, *x.shape[1:])
      return jnp.swapaxes(x, 0, 1).reshape(rounds, blocks * micro, *x.shape[3:])

    def body(carry, xs):
      grads, total = carry
      (_, t), g = value_and_grad(params, *xs)
      return (jax.tree_util.tree_map(jnp.add, grads, g), total + t), None

    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    (grads, total), _ = jax.lax.scan(body, (zeros, jnp.zeros((), jnp.float32)),
                                     (jax.tree_util.tree_map(split, batch), split(index)))
    return grads, total

  def grad_fn(params, buffers, batch, key, scale):
    b = batch["image"].shape[0]
    index = jnp.arange(b, dtype=jnp.int32)
    if rounds == 1 or mesh is None:
      grads, total = accumulate(params, buffers, batch, index, key, scale, b, shards)
      return grads, total / b
    axes = tuple(mesh.axis_names)

    def per_device(params, buffers, batch, index, key, scale):
      grads, total = accumulate(params, buffers, batch, index, key, scale, b, 1)
      return jax.lax.psum((grads, total), axes)

    grads, total = jax.shard_map(
        per_device, mesh=mesh, in_specs=(P(), P(), P(axes), P(axes), P(), P()),
        out_specs=P(), check_vma=False)(params, buffers, batch, index, key, scale)
    return grads, total / b

  return grad_fn


def make_grad_step(graphdef, tcfg: ml_collections.ConfigDict, seed: int, rounds: int = 1,
                   shards: int = 1, mesh: Mesh | None = None) -> Callable:
  """grad_step(state, batch) -> (grads, loss): the half of the train step that depends on the
  bucket (its batch shape and accumulation rounds). `grads` is the gradient of
  `state["loss_scale"]` times the batch's mean per-sample loss (still scaled), `loss` that mean;
  the step's key is folded from (seed, step). See `make_grad_fn` for `rounds`, `shards` and
  `mesh`. Equal arguments (of `tcfg`, its `GRAD_FIELDS`) give the same function."""
  return _grad_step(graphdef, _fields(tcfg, GRAD_FIELDS), seed, rounds, shards, mesh)


@functools.lru_cache(maxsize=_MEMO)
def _grad_step(graphdef, tcfg: ml_collections.FrozenConfigDict, seed: int, rounds: int,
               shards: int, mesh: Mesh | None) -> Callable:
  base_key = jax.random.key(seed)
  grad_fn = make_grad_fn(graphdef, tcfg, rounds, shards, mesh)

  def grad_step(state, batch):
    key = jax.random.fold_in(base_key, state["step"])
    return grad_fn(state["params"], state["buffers"], batch, key, state["loss_scale"])

  return grad_step


def make_apply_step(optimizer, tcfg: ml_collections.ConfigDict) -> Callable:
  """apply_step(state, grads, loss, hyper) -> (state, metrics): the half of the train step that
  is the same for every bucket, so one program serves them all.

  `hyper` = [lr, ema_beta] (float32) of this step, computed on the host from the exact image
  count (`step_hyperparameters`), as the official loop computes them in Python; with post-hoc
  EMAs in the state (`state["phema"]`, k of them) it is followed by their k betas
  (`patchdiff.phema.beta`), and each EMA moves to beta * phema + (1 - beta) * params with the
  step's final params (a skipped step's are the old ones: the trajectory holds still).

  The gradients arrive multiplied by `state["loss_scale"]`. Static scaling hands them to Adam
  so, as the official loop does (its --ls; Adam's eps then meets the scaled gradient), after
  EDM's guard (NaN -> 0, inf -> 1e5). Dynamic scaling divides them by the scale, skips a step
  whose gradients overflowed, halves the scale, and doubles it after `loss_scale_period` finite
  steps. Adam's update is scaled by lr, and the EMA moves to beta * ema + (1 - beta) * params.
  The `grad_norm` metric is the unscaled gradient's. Equal arguments (of `tcfg`, its
  `APPLY_FIELDS`) give the same function.
  """
  return _apply_step(optimizer, _fields(tcfg, APPLY_FIELDS))


@functools.lru_cache(maxsize=_MEMO)
def _apply_step(optimizer, tcfg: ml_collections.FrozenConfigDict) -> Callable:
  dynamic = tcfg.loss_scaling == "dynamic"

  def apply_step(state, grads, loss, hyper):
    tracked = len(state.get("phema", ()))
    if hyper.shape != (2 + tracked,):
      raise ValueError(f"hyper has shape {hyper.shape}, the step needs ({2 + tracked},): "
                       f"[lr, ema_beta] and a beta per post-hoc EMA ({tracked} in the state)")
    lr, beta = hyper[0], hyper[1]
    scale = state["loss_scale"]
    if dynamic:
      grads = jax.tree_util.tree_map(lambda g: g / scale, grads)
    grads_finite = _all_finite(grads) if dynamic else None
    grads = sanitize_grads(grads)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = jax.tree_util.tree_map(lambda p, u: p - lr * u, state["params"], updates)
    ema = jax.tree_util.tree_map(lambda e, p: p + beta * (e - p), state["ema"], params)
    new = dict(params=params, ema=ema, opt_state=opt_state)
    good_steps = state["good_steps"]
    if dynamic:
      keep = lambda a, b: jax.tree_util.tree_map(  # noqa: E731
          lambda x, y: jnp.where(grads_finite, x, y), a, b)
      new = keep(new, dict(params=state["params"], ema=state["ema"],
                           opt_state=state["opt_state"]))
      grow = grads_finite & (good_steps + 1 >= tcfg.loss_scale_period)
      scale = jnp.where(grads_finite, jnp.where(grow, scale * 2, scale),
                        jnp.maximum(scale / 2, 1.0))
      good_steps = jnp.where(grads_finite & ~grow, good_steps + 1, 0)
    if tracked:
      new["phema"] = [phema.update(e, new["params"], hyper[2 + i])
                      for i, e in enumerate(state["phema"])]
    loss_finite = jnp.isfinite(loss)
    streak = jnp.where(loss_finite, 0, state["nonfinite_streak"] + 1)
    new_state = dict(state, **new, step=state["step"] + 1, loss_scale=scale,
                     good_steps=good_steps, nonfinite_streak=streak,
                     nonfinite_total=state["nonfinite_total"] + (~loss_finite).astype(jnp.int32))
    grad_norm = optax.tree.norm(grads) / (1.0 if dynamic else state["loss_scale"])
    metrics = dict(loss=loss, grad_norm=grad_norm, ema_beta=beta, lr=lr,
                   loss_scale=state["loss_scale"], nonfinite_streak=streak,
                   nonfinite_total=new_state["nonfinite_total"])
    if dynamic:
      metrics["overflow"] = ~grads_finite
    return new_state, metrics

  return apply_step
