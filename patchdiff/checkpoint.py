"""Orbax checkpoints of a run: the training state, the EMA denoiser and the config (JSON).

Items per step: `train` (params, optimizer state, step, loss-scale state, non-finite counters),
`ema` (the EMA denoiser's variables, enough to sample on its own), `config` and `progress` (JSON:
step, images seen, data position, the layout that wrote it). Converted official weights carry
`ema` and `config` only. Arrays are restored into the caller's shardings, so a checkpoint written
on one mesh restores on any other. A save runs in the background and appears under its final
name only once complete: a process killed mid-save leaves the previous step as the latest.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

CHECKPOINT_DIR = "checkpoints"


def manager(workdir: str, max_to_keep: int | None = 3, async_save: bool = True,
            create: bool = True) -> ocp.CheckpointManager:
  directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create,
                                         cleanup_tmp_directories=create,
                                         enable_async_checkpointing=async_save)
  return ocp.CheckpointManager(directory, options=options)


def _abstract(tree):
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
      tree)


def save(mgr: ocp.CheckpointManager, step: int, *, config: ml_collections.ConfigDict,
         ema: Any, train: Any | None = None, progress: dict | None = None,
         force: bool = False) -> bool:
  items = dict(ema=ocp.args.StandardSave(ema), config=ocp.args.JsonSave(config.to_dict()))
  if train is not None:
    items["train"] = ocp.args.StandardSave(train)
  if progress is not None:
    items["progress"] = ocp.args.JsonSave(progress)
  return mgr.save(step, args=ocp.args.Composite(**items), force=force)


def save_weights(workdir: str, ema: Any, config: ml_collections.ConfigDict, step: int = 0):
  """Writes a sampling-only checkpoint (EMA weights and config), synchronously."""
  mgr = manager(workdir, max_to_keep=None, async_save=False)
  save(mgr, step, config=config, ema=ema, force=True)
  mgr.wait_until_finished()
  mgr.close()


def restore_config(mgr: ocp.CheckpointManager, step: int) -> dict:
  return mgr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]


def restore(mgr: ocp.CheckpointManager, step: int, *, ema_target: Any,
            train_target: Any | None = None) -> dict:
  """Restores `ema` (and `train` when a target is given) into the targets' shapes and shardings."""
  items = dict(ema=ocp.args.StandardRestore(_abstract(ema_target)))
  saved = mgr.item_metadata(step) or {}
  if train_target is not None:
    if "train" not in saved:
      raise ValueError(f"checkpoint step {step} in {mgr.directory} holds weights only (no "
                       "training state); it can be sampled from but not resumed")
    items["train"] = ocp.args.StandardRestore(_abstract(train_target))
    if "progress" in saved:
      items["progress"] = ocp.args.JsonRestore()
  return mgr.restore(step, args=ocp.args.Composite(**items))
