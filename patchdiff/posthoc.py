"""Post-hoc EMA on disk (EDM2, Karras et al. 2024, section 3): the snapshots a run keeps, the EMA
of any length reconstructed from them after training, and its evaluation per length. The math
(exponents, betas, profile inner products, the least-squares fit) is `patchdiff.phema`.

Training with `train.phema.stds=(0.05, 0.10)` tracks one power-function EMA of the parameters
per relative std, over the images counted (`train_step`: the betas enter the update program
with the learning rate), and saves them as a snapshot each time the count crosses a multiple of
`train.phema.every_kimg` kimg, and at the end of training:

  WORKDIR/phema/STEP/              a snapshot: an orbax CheckpointManager step, never rotated
      ema_0/ .. ema_{k-1}/         the EMA of stds[i] (orbax arrays, sharded like the params)
      buffers/                     the network's untrained variables (if it has any)
      record/                      JSON: step, nimg (images counted), stds, every_kimg
      config/                      JSON: the run's config
  WORKDIR/phema_ema/std_0.0800/    one reconstructed EMA length: a weights-only workdir, as
      checkpoints/STEP/            `checkpoint.save_weights` writes it (STEP: the target
                                   snapshot's step), which sampling reads as any workdir
      reconstruction_STEP.json     the coefficients, the snapshots used, the target image
                                   count and the fit's relative residual
  WORKDIR/phema_ema/eval_STEP.json, eval_STEP.png
                                   `--mode=eval --ema_std=...`: FID and SWD per length, and
                                   FID (SWD without Inception weights) against the length

A snapshot is written under a temporary name and renamed once complete (orbax), and the trainer
waits for a pending snapshot before it writes a training checkpoint: a run killed during a
snapshot write resumes from a checkpoint before it, and writes it again, bit for bit (the
resumed run is the same run); a snapshot that already exists complete is kept.

Commands:

  python -m patchdiff.main --config=C --workdir=DIR --config.train.phema.stds='(0.05,0.1)' \\
      --config.train.phema.every_kimg=500                          # train, keeping snapshots
  python -m patchdiff.main --mode=phema --workdir=DIR --ema_std=0.05,0.08,0.12
  python -m patchdiff.main --mode=sample --workdir=DIR --ema_std=0.08
  python -m patchdiff.main --mode=eval --workdir=DIR --ema_std=0.03,0.05,0.08,0.12 --seeds=0-9999

`--step=N` picks the snapshot of step N as the target (default: the last snapshot); the fit
then uses the snapshots up to N. Sample and eval reconstruct the lengths they do not find. A
reconstruction streams the snapshots: it holds the sum and one snapshot's EMA (two copies of the
parameters, plus one tensor), and reads each snapshot it uses once.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx

from patchdiff import checkpoint, phema, sharding
from patchdiff.nn import models

SNAPSHOT_DIR = "phema"
RECONSTRUCTION_DIR = "phema_ema"
DECIMALS = 4  # reconstructions are kept per 0.0001 of relative std


class NoSnapshots(FileNotFoundError):
  """A workdir without post-hoc EMA snapshots (or without the one asked for)."""


def snapshot_due(nimg_before: int, nimg_after: int, every_images: int) -> bool:
  """Whether a step that took the count from `nimg_before` to `nimg_after` images crossed (or
  reached) a multiple of `every_images`."""
  return nimg_after // every_images > nimg_before // every_images


def std_name(std: float) -> str:
  """The folder of a reconstructed length: std_0.0800."""
  return f"std_{std:.{DECIMALS}f}"


def weights_dir(workdir: str, std: float) -> str:
  """WORKDIR/phema_ema/std_S: the weights-only workdir of the EMA of relative std `std`."""
  return os.path.join(os.path.abspath(workdir), RECONSTRUCTION_DIR, std_name(std))


def parse_stds(text: str, flag: str = "--ema_std") -> tuple[float, ...]:
  """'0.05,0.08' -> (0.05, 0.08): each in (0, phema.MAX_STD], at most DECIMALS decimals,
  distinct (ValueError naming the flag and the value)."""
  out = []
  for token in (t.strip() for t in str(text).split(",")):
    try:
      value = float(token)
    except ValueError:
      raise ValueError(f"{flag}={text}: {token!r} is not a number") from None
    if not 0 < value <= phema.MAX_STD:
      raise ValueError(f"{flag}={text}: {token} is outside (0, {phema.MAX_STD:.4f}] (a relative "
                       "std of the EMA's length, e.g. 0.05)")
    if abs(value - round(value, DECIMALS)) > 1e-12:
      raise ValueError(f"{flag}={text}: {token} has more than {DECIMALS} decimals (lengths are "
                       f"kept per {10.0 ** -DECIMALS:g})")
    if round(value, DECIMALS) in out:
      raise ValueError(f"{flag}={text}: {token} is given twice")
    out.append(round(value, DECIMALS))
  return tuple(out)


class Snapshots:
  """The snapshots of WORKDIR/phema: written by the trainer (`create=True`: the folder is made,
  temporary folders of killed writes removed), read by reconstruction (`create=False`: the
  folder must exist, nothing is removed, a run may be writing meanwhile)."""

  def __init__(self, workdir: str, create: bool = False, async_save: bool = True):
    self.directory = os.path.join(os.path.abspath(workdir), SNAPSHOT_DIR)
    if not create and not os.path.isdir(self.directory):
      raise NoSnapshots(f"no post-hoc EMA snapshots in {workdir}: {self.directory} does not "
                        "exist (train with --config.train.phema.stds='(0.05,0.1)' and "
                        "--config.train.phema.every_kimg=K to keep them)")
    options = ocp.CheckpointManagerOptions(max_to_keep=None, create=create,
                                           cleanup_tmp_directories=create,
                                           enable_async_checkpointing=async_save)
    self.mgr = ocp.CheckpointManager(self.directory, options=options)
    self._records: dict[int, dict] = {}

  def steps(self) -> list[int]:
    """The steps of the complete snapshots, in order."""
    return sorted(int(s) for s in self.mgr.all_steps())

  def record(self, step: int) -> dict:
    """{step, nimg, stds, every_kimg} of the snapshot of `step`."""
    if step not in self._records:
      self._records[step] = self.mgr.restore(
          step, args=ocp.args.Composite(record=ocp.args.JsonRestore()))["record"]
    return self._records[step]

  def config(self, step: int) -> ml_collections.ConfigDict:
    """The config the run that wrote the snapshot of `step` had."""
    return ml_collections.ConfigDict(self.mgr.restore(
        step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"])

  def save(self, step: int, nimg: int, state: dict[str, Any], stds: Sequence[float],
           cfg: ml_collections.ConfigDict) -> bool:
    """Saves the post-hoc EMAs of `state` (in the background) as the snapshot of `step`, after
    `nimg` images; False (and nothing written) where that snapshot exists complete already, as
    when a resumed run passes a step its killed predecessor had saved."""
    if step in self.mgr.all_steps():
      record = self.record(step)
      if record["stds"] != list(stds) or record["nimg"] != nimg:
        raise ValueError(f"post-hoc EMA snapshot {self.directory}/{step} holds stds "
                         f"{record['stds']} at {record['nimg']} images, this run has "
                         f"{list(stds)} at {nimg}: it is another run's; move {self.directory} "
                         "away")
      logging.info("post-hoc EMA snapshot of step %d exists complete: kept", step)
      return False
    items = {f"ema_{i}": ocp.args.StandardSave(tree) for i, tree in enumerate(state["phema"])}
    record = dict(step=int(step), nimg=int(nimg), stds=[float(s) for s in stds],
                  every_kimg=cfg.train.phema.every_kimg,
                  buffers=bool(jax.tree_util.tree_leaves(state["buffers"])))
    if record["buffers"]:  # orbax writes no empty item: a network without buffers has none
      items["buffers"] = ocp.args.StandardSave(state["buffers"])
    items.update(record=ocp.args.JsonSave(record), config=ocp.args.JsonSave(cfg.to_dict()))
    # force: a step below the latest one (a snapshot removed by hand) is written too.
    self.mgr.save(step, args=ocp.args.Composite(**items), force=True)
    self._records[step] = record
    return True

  def load(self, step: int, index: int, target: Any) -> Any:
    """The EMA of the snapshot's stds[index], restored into `target`'s shapes and shardings."""
    name = f"ema_{index}"
    return self.mgr.restore(step, args=ocp.args.Composite(
        **{name: ocp.args.StandardRestore(target)}))[name]

  def load_buffers(self, step: int, target: Any) -> Any:
    """The network's buffers (untrained variables), restored into `target`."""
    if not self.record(step).get("buffers", True):
      return target
    return self.mgr.restore(step, args=ocp.args.Composite(
        buffers=ocp.args.StandardRestore(target)))["buffers"]

  def wait(self) -> None:
    """Returns once the snapshot being written (if any) is complete."""
    self.mgr.wait_until_finished()

  def close(self) -> None:
    self.mgr.wait_until_finished()
    self.mgr.close()


def _open(workdir: str) -> Snapshots:
  snaps = Snapshots(workdir)
  if not snaps.steps():
    snaps.close()
    raise NoSnapshots(f"no complete post-hoc EMA snapshot in {snaps.directory} (a run killed "
                      "during its first snapshot leaves none: resume it)")
  return snaps


def stored_config(workdir: str) -> ml_collections.ConfigDict:
  """The config of `workdir`'s last post-hoc EMA snapshot (the run's)."""
  snaps = _open(workdir)
  try:
    return snaps.config(snaps.steps()[-1])
  finally:
    snaps.close()


def _target(snaps: Snapshots, step: int | None) -> int:
  steps = snaps.steps()
  step = steps[-1] if step is None else int(step)
  if step not in steps:
    raise NoSnapshots(f"no post-hoc EMA snapshot at step {step} in {snaps.directory}; "
                      f"available: {steps}")
  return step


def _fit(snaps: Snapshots, target: int, std: float) -> dict:
  """The reconstruction record of `std` at the snapshot of step `target`, from every snapshot
  up to it (no arrays read)."""
  used, pairs = [], []
  for s in snaps.steps():
    if s > target:
      break
    rec = snaps.record(s)
    for i, snap_std in enumerate(rec["stds"]):
      used.append(dict(step=s, nimg=int(rec["nimg"]), std=float(snap_std), index=i))
      pairs.append((float(snap_std), float(rec["nimg"])))
  nimg = int(snaps.record(target)["nimg"])
  coefficients, residual = phema.solve(pairs, std, nimg)
  for u, c in zip(used, coefficients.tolist()):
    u["coefficient"] = c
  return dict(std=std, step=target, nimg=nimg, residual=residual, snapshots=used)


def _record_path(workdir: str, std: float, step: int) -> str:
  return os.path.join(weights_dir(workdir, std), f"reconstruction_{step:08d}.json")


def _existing(workdir: str, fit: dict) -> dict | None:
  """The record of a complete reconstruction of `fit` (same std, target and snapshots), else
  None."""
  path = _record_path(workdir, fit["std"], fit["step"])
  if not os.path.isfile(path):
    return None
  with open(path, encoding="utf-8") as f:
    old = json.load(f)
  key = lambda r: [(u["step"], u["nimg"], u["std"]) for u in r["snapshots"]]  # noqa: E731
  if old.get("std") != fit["std"] or key(old) != key(fit):
    return None
  if not os.path.isdir(os.path.join(weights_dir(workdir, fit["std"]), checkpoint.CHECKPOINT_DIR)):
    return None
  mgr = checkpoint.manager(weights_dir(workdir, fit["std"]), create=False)
  try:
    return old if fit["step"] in mgr.all_steps() else None
  finally:
    mgr.close()


def reconstruct(cfg: ml_collections.ConfigDict, workdir: str, stds: Sequence[float],
                step: int | None = None, again: bool = False) -> list[dict]:
  """Reconstructs the EMA of each relative std of `stds` at the snapshot of `step` (default:
  the last) from `workdir`'s snapshots up to it, and writes it as a weights-only workdir
  (`weights_dir`) with its record; a complete reconstruction of the same fit is kept (unless
  `again`). Returns the records (coefficients, snapshots used, target nimg, relative residual,
  `dir`), in the order of `stds`.

  `cfg` must build weights of the shapes the snapshots hold (ValueError naming the difference);
  it is stored with the weights, for sampling. Each snapshot's EMA is read once and added to
  the sum (float32), one at a time.
  """
  snaps = _open(workdir)
  out = []
  try:
    target = _target(snaps, step)
    checkpoint.check_compatible(snaps.config(target).to_dict(), cfg,
                                where=f"{snaps.directory}/{target}")
    graphdef, params, buffers = nnx.split(models.abstract_denoiser(cfg.model), nnx.Param, ...)
    placed = jax.sharding.NamedSharding(sharding.data_mesh(), jax.sharding.PartitionSpec())
    params_target = checkpoint._abstract(params, placed)  # pylint: disable=protected-access
    buffers_target = checkpoint._abstract(buffers, placed)  # pylint: disable=protected-access
    for std in stds:
      fit = _fit(snaps, target, float(std))
      old = None if again else _existing(workdir, fit)
      if old is not None:
        logging.info("post-hoc EMA std %.4f at step %d: reconstructed already (%s)", std,
                     target, weights_dir(workdir, std))
        out.append(dict(old, dir=weights_dir(workdir, std)))
        continue
      t0 = time.perf_counter()
      used = fit["snapshots"]
      tree = phema.reconstruct([u["coefficient"] for u in used], lambda i: snaps.load(
          used[i]["step"], used[i]["index"], params_target))
      buffer_values = snaps.load_buffers(target, buffers_target)
      directory = weights_dir(workdir, std)
      if os.path.isdir(os.path.join(directory, checkpoint.CHECKPOINT_DIR)):
        # It only reads and deletes: create=False (see checkpoint.manager).
        mgr = checkpoint.manager(directory, max_to_keep=None, async_save=False, create=False)
        if target in mgr.all_steps():  # a reconstruction from other snapshots: made again
          mgr.delete(target)
        mgr.close()
      checkpoint.save_weights(directory, nnx.merge(graphdef, tree, buffer_values), cfg, target)
      del tree
      fit["seconds"] = time.perf_counter() - t0
      if jax.process_index() == 0:
        path = _record_path(workdir, std, target)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
          json.dump(fit, f, indent=1)
        os.replace(path + ".tmp", path)
      logging.info("post-hoc EMA std %.4f at step %d (%.3f kimg): %d snapshot EMAs, relative "
                   "residual %.3g, %.1f s -> %s", std, target, fit["nimg"] / 1000, len(used),
                   fit["residual"], fit["seconds"], directory)
      out.append(dict(fit, dir=directory))
  finally:
    snaps.close()
  return out


def evaluate(cfg: ml_collections.ConfigDict, workdir: str, stds: Sequence[float],
             step: int | None = None, outdir: str | None = None, **kwargs) -> dict:
  """`evaluation.evaluate` of the EMA of each std of `stds` (reconstructed where missing), FID
  against WORKDIR/fid_ref.npz unless `kwargs` give `ref`; samples into `outdir`/std_S (default:
  each length's own workdir). Writes WORKDIR/phema_ema/eval_STEP.json (the table) and
  eval_STEP.png (FID, or SWD without Inception weights, against the std) and returns the table:
  {step, nimg, metric, best_std, rows: [{std, residual, fid, swd_mean, ...}]}."""
  from patchdiff import evaluation  # pylint: disable=import-outside-toplevel
  made = reconstruct(cfg, workdir, stds, step)
  rows = []
  for rec in made:
    result = evaluation.evaluate(
        cfg, rec["dir"], rec["step"], fid_ref_path=os.path.join(workdir, "fid_ref.npz"),
        outdir=None if outdir is None else os.path.join(outdir, std_name(rec["std"])), **kwargs)
    rows.append(dict(std=rec["std"], residual=rec["residual"], **result))
  metric = "fid" if all("fid" in r for r in rows) else "swd_mean"
  if not all(metric in r for r in rows):
    raise evaluation.UsageError("no FID and no SWD to compare the lengths by: give Inception "
                                "weights and --ref, or evaluate a model with training data")
  best = min(rows, key=lambda r: r[metric])
  table = dict(step=made[0]["step"], nimg=made[0]["nimg"], metric=metric, best_std=best["std"],
               rows=rows)
  base = os.path.join(os.path.abspath(workdir), RECONSTRUCTION_DIR, f"eval_{table['step']:08d}")
  if jax.process_index() == 0:
    with open(base + ".json", "w", encoding="utf-8") as f:
      json.dump(table, f, indent=1)
    label = "FID" if metric == "fid" else "SWD x1e3 (mean)"
    line_plot([r["std"] for r in rows], [r[metric] for r in rows], base + ".png",
              xlabel="EMA length (relative std)", ylabel=label,
              title=f"{label} against EMA length, step {table['step']} "
                    f"({table['nimg'] / 1000:g} kimg)")
  table["json"], table["plot"] = base + ".json", base + ".png"
  return table


def line_plot(xs: Sequence[float], ys: Sequence[float], path: str, xlabel: str, ylabel: str,
              title: str, size: tuple[int, int] = (640, 420)) -> None:
  """A line plot of ys against xs (sorted by x) with ticks and the least y circled, written as
  a PNG with PIL (no plotting library needed)."""
  from PIL import Image, ImageDraw, ImageFont  # pylint: disable=import-outside-toplevel
  order = np.argsort(xs)
  x, y = np.asarray(xs, np.float64)[order], np.asarray(ys, np.float64)[order]
  w, h = size
  left, right, top, bottom = 70, 20, 40, 55
  image = Image.new("RGB", size, "white")
  draw = ImageDraw.Draw(image)
  try:
    font = ImageFont.load_default(size=13)  # Pillow >= 10.1: a scalable font
  except TypeError:
    font = ImageFont.load_default()

  def span(v):
    lo, hi = float(v.min()), float(v.max())
    pad = (hi - lo) * 0.08 or abs(hi) * 0.05 or 1.0
    return lo - pad, hi + pad
  (x0, x1), (y0, y1) = span(x), span(y)
  px = lambda v: left + (v - x0) / (x1 - x0) * (w - left - right)  # noqa: E731
  py = lambda v: h - bottom - (v - y0) / (y1 - y0) * (h - top - bottom)  # noqa: E731
  draw.rectangle([left, top, w - right, h - bottom], outline="black")
  for v in (np.unique(x) if len(np.unique(x)) <= 12 else np.linspace(x0, x1, 6)[1:-1]):
    draw.line([px(v), h - bottom, px(v), h - bottom + 4], fill="black")
    draw.text((px(v) - 14, h - bottom + 7), f"{v:.4g}", fill="black", font=font)
  for v in np.linspace(y0, y1, 6)[1:-1]:
    draw.line([left - 4, py(v), left, py(v)], fill="black")
    draw.text((4, py(v) - 6), f"{v:.4g}", fill="black", font=font)
  points = [(px(a), py(b)) for a, b in zip(x, y)]
  if len(points) > 1:
    draw.line(points, fill=(31, 119, 180), width=2)
  for a, b in points:
    draw.ellipse([a - 3, b - 3, a + 3, b + 3], fill=(31, 119, 180))
  k = int(np.argmin(y))
  draw.ellipse([points[k][0] - 7, points[k][1] - 7, points[k][0] + 7, points[k][1] + 7],
               outline=(214, 39, 40), width=2)
  draw.text((points[k][0] + 9, points[k][1] - 14), f"{x[k]:g}: {y[k]:.4g}", fill=(214, 39, 40),
            font=font)
  draw.text((left, 12), title, fill="black", font=font)
  draw.text(((w - left - right) // 2, h - 22), xlabel, fill="black", font=font)
  draw.text((4, top - 20), ylabel, fill="black", font=font)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  image.save(path)
