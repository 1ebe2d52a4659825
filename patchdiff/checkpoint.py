"""Orbax checkpoints of a run: the item layout, saving and restoring the training state, and
`load_ema`, which gives the EMA denoiser of a workdir to sampling without any training code.

Items per step: `ema` ({"params": EMA params, "buffers": buffers}: enough to sample on its own),
`train` (every other key of the training state), `config` and `progress` (JSON: step, images
seen, data position, the layout that wrote it). Converted official weights carry `ema` and
`config` only. Arrays are restored into the caller's shardings, so a checkpoint written on one
mesh restores on any other. A save runs in the background and appears under its final name only
once complete: a process killed mid-save leaves the previous step as the latest.
`check_compatible` refuses a checkpoint (or post-hoc EMA snapshot) whose model config builds
weights of other shapes than the config's (the model keys of SHAPE_KEYS).
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

from patchdiff.nn import models

CHECKPOINT_DIR = "checkpoints"
# Keys of the model config that fix the shapes of the weights: a checkpoint must agree on them.
SHAPE_KEYS = ("arch", "img_resolution", "img_channels", "out_channels", "label_dim", "augment_dim",
              "model_channels", "channel_mult", "channel_mult_emb", "num_blocks",
              "attn_resolutions", "embedding_type", "channel_mult_noise", "encoder_type",
              "decoder_type")


def manager(workdir: str, max_to_keep: int | None = 3, async_save: bool = True,
            create: bool = True) -> ocp.CheckpointManager:
  """The orbax manager of WORKDIR/checkpoints. With `create` it makes the folder and clears
  temporary folders of unfinished saves in the background: its own save() waits for that, but
  close() does not, so a manager that only reads or deletes is opened with create=False (else
  its clean-up can remove the temporary folder of a save another manager starts next)."""
  directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create,
                                         cleanup_tmp_directories=create,
                                         enable_async_checkpointing=async_save)
  return ocp.CheckpointManager(directory, options=options)


def _ema_item(params: Any, buffers: Any) -> dict[str, Any]:
  return dict(params=params, buffers=buffers)


def split_state(state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
  """A training state (or its abstract shapes) -> the `ema` and `train` items."""
  ema = _ema_item(state["ema"], state["buffers"])
  return ema, {k: v for k, v in state.items() if k not in ("ema", "buffers")}


def join_state(ema: dict[str, Any], train: dict[str, Any]) -> dict[str, Any]:
  """The inverse of `split_state`."""
  return dict(train, ema=ema["params"], buffers=ema["buffers"])


def _abstract(tree, sharding: jax.sharding.Sharding | None = None):
  """Restore targets of `tree`'s leaves, laid out with `sharding` (default: their own)."""
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                     sharding=sharding or getattr(x, "sharding", None)), tree)


def _save(mgr: ocp.CheckpointManager, step: int, config: ml_collections.ConfigDict, ema: Any,
          train: Any | None = None, progress: dict | None = None, force: bool = False) -> bool:
  items = dict(ema=ocp.args.StandardSave(ema), config=ocp.args.JsonSave(config.to_dict()))
  if train is not None:
    items["train"] = ocp.args.StandardSave(train)
  if progress is not None:
    items["progress"] = ocp.args.JsonSave(progress)
  return mgr.save(step, args=ocp.args.Composite(**items), force=force)


def save_state(mgr: ocp.CheckpointManager, step: int, config: ml_collections.ConfigDict,
               state: dict[str, Any], progress: dict) -> bool:
  """Saves a training state (in the background) with its config and progress record."""
  ema, train = split_state(state)
  return _save(mgr, step, config, ema, train, progress)


def save_weights(workdir: str, denoiser: nnx.Module, config: ml_collections.ConfigDict,
                 step: int = 0) -> None:
  """Writes a sampling-only checkpoint (the denoiser's weights as the `ema` item, and the
  config), synchronously."""
  _, params, buffers = nnx.split(denoiser, nnx.Param, ...)
  mgr = manager(workdir, max_to_keep=None, async_save=False)
  _save(mgr, step, config, _ema_item(params, buffers), force=True)
  mgr.wait_until_finished()
  mgr.close()


def restore_config(mgr: ocp.CheckpointManager, step: int) -> dict:
  return mgr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]


def stored_config(workdir: str, step: int | None = None) -> ml_collections.ConfigDict:
  """The config checkpoint `step` (default: the latest) of `workdir` was written with."""
  mgr = manager(workdir, create=False)
  try:
    return ml_collections.ConfigDict(restore_config(mgr, check_step(mgr, step)))
  finally:
    mgr.close()


def check_step(mgr: ocp.CheckpointManager, step: int | None) -> int:
  """`step` (default: the latest) if the manager holds it; FileNotFoundError naming what exists."""
  step = mgr.latest_step() if step is None else step
  if step is None or step not in mgr.all_steps():
    raise FileNotFoundError(f"no checkpoint{'' if step is None else f' at step {step}'} in "
                            f"{mgr.directory}; available: {list(mgr.all_steps())}")
  return step


def restore_state(mgr: ocp.CheckpointManager, step: int,
                  abstract_state: dict[str, Any]) -> tuple[dict[str, Any], dict]:
  """(training state laid out as `abstract_state`'s shardings, progress record) of `step`."""
  saved = mgr.item_metadata(step) or {}
  if "train" not in saved:
    raise ValueError(f"checkpoint step {step} in {mgr.directory} holds weights only (no "
                     "training state); it can be sampled from but not resumed")
  ema, train = split_state(abstract_state)
  items = dict(ema=ocp.args.StandardRestore(_abstract(ema)),
               train=ocp.args.StandardRestore(_abstract(train)))
  if "progress" in saved:
    items["progress"] = ocp.args.JsonRestore()
  restored = mgr.restore(step, args=ocp.args.Composite(**items))
  return join_state(restored["ema"], restored["train"]), dict(restored.get("progress") or {})


def load_ema(workdir: str, cfg: ml_collections.ConfigDict, step: int | None = None,
             sharding: jax.sharding.Sharding | None = None) -> tuple[nnx.Module, int]:
  """(the EMA denoiser of `workdir`'s checkpoint `step` (default: the latest), its step).

  The config the checkpoint was written with must build weights of the same shapes as `cfg`'s
  (ValueError naming every difference). Weights are placed with `sharding` (default: on the
  first device); no optimizer or training state is built or read.
  """
  mgr = manager(workdir, create=False)
  try:
    step = check_step(mgr, step)
    check_compatible(restore_config(mgr, step), cfg, where=f"{mgr.directory}/{step}")
    graphdef, params, buffers = nnx.split(models.abstract_denoiser(cfg.model), nnx.Param, ...)
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = _abstract(_ema_item(params, buffers), sharding)
    ema = mgr.restore(step, args=ocp.args.Composite(ema=ocp.args.StandardRestore(target)))["ema"]
  finally:
    mgr.close()
  return nnx.merge(graphdef, ema["params"], ema["buffers"]), step


def check_compatible(saved: Mapping[str, Any], cfg: ml_collections.ConfigDict, where: str) -> None:
  """A checkpoint's config must build weights of the same shapes as `cfg`."""
  try:
    old = models.resolve(saved["model"])
  except (KeyError, ValueError) as e:
    raise ValueError(f"checkpoint {where} has an unreadable model config: {e}") from None
  diffs = model_differences(old, cfg.model)
  if diffs:
    raise ValueError(f"checkpoint {where} was written by an incompatible model config:\n  "
                     + "\n  ".join(diffs))


def model_differences(saved_model: Mapping[str, Any], model_cfg: Mapping[str, Any]) -> list[str]:
  """`model.KEY: checkpoint A vs config B` for each of SHAPE_KEYS on which a checkpoint's model
  config and `model_cfg` differ."""
  old, new = models.resolve(saved_model), models.resolve(model_cfg)
  return [f"model.{k}: checkpoint {old.get(k)!r} vs config {new.get(k)!r}"
          for k in SHAPE_KEYS if _norm(old.get(k)) != _norm(new.get(k))]


def _norm(v):
  return tuple(v) if isinstance(v, (list, tuple)) else v
