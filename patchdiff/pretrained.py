"""The weights a run starts from (`train.init_from`), read and checked against the model config
before anything is compiled. `train.init_from` is one of:

- `WORKDIR` or `WORKDIR@STEP`: the EMA weights of a patchdiff checkpoint (default: the latest);
- a weights file of official tensor names: a `Patch_EDMPrecond` or EDM `EDMPrecond` state dict
  (`.npz`, `.pt`/`.pth`, `.safetensors`) or an official `network-snapshot-*.pkl` (its `ema`
  network, read without torch and without running anything from the file).

An EDM network has no coordinate inputs: its input layers read `img_channels` channels. Their
weights for the two coordinate channels start at zero (`models.pretrained_values`), so the patch
network computes the EDM network's function at step 0, whatever the coordinates.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Mapping

import ml_collections
import numpy as np
from absl import logging

from patchdiff import checkpoint, config_lib
from patchdiff.nn import models
from patchdiff.weights import files

# The official preconditionings that are this denoiser's (EDM's c_skip, c_out, c_in, c_noise).
PRECONDITIONINGS = ("Patch_EDMPrecond", "EDMPrecond")
BACKBONE_ARCHS = {"SongUNet": ("ddpmpp", "ncsnpp"), "DhariwalUNet": ("adm",)}
# Keyword arguments of the official networks compared with the model config, for the messages.
_SNAPSHOT_KEYS = ("img_resolution", "out_channels", "label_dim", "augment_dim", "model_channels",
                  "channel_mult", "channel_mult_emb", "num_blocks", "attn_resolutions",
                  "embedding_type", "channel_mult_noise", "encoder_type", "decoder_type",
                  "resample_filter")


@dataclasses.dataclass(frozen=True)
class InitWeights:
  """Checked weights for the run's denoiser.

  `values`: {official tensor name: array in our layout} for every variable but those in `fresh`;
  `zeroed`: the input weights whose coordinate-channel columns were added as zeros;
  `fresh`: the variables that keep their fresh initialisation (the label embedding, reset).
  """
  source: str
  values: dict[str, np.ndarray]
  zeroed: list[str]
  fresh: list[str]

  def summary(self) -> str:
    n = sum(int(np.prod(v.shape)) for v in self.values.values())
    out = f"{len(self.values)} tensors ({n:,} values) from {self.source}"
    if self.zeroed:
      out += f"; zero weights for the coordinate channels in {', '.join(self.zeroed)}"
    if self.fresh:
      out += f"; freshly initialised: {', '.join(self.fresh)}"
    return out


def parse(spec: str) -> tuple[str, str, int | None]:
  """("checkpoint", workdir, step or None) or ("file", path, None) for a `train.init_from`
  value; FileNotFoundError naming it when it is neither an existing file nor a directory."""
  spec = os.path.expanduser(spec)
  if os.path.isdir(spec):
    return "checkpoint", spec, None
  m = re.fullmatch(r"(.+)@(\d+)", spec)
  if m and os.path.isdir(m.group(1)) and not os.path.exists(spec):
    return "checkpoint", m.group(1), int(m.group(2))
  if os.path.isfile(spec):
    return "file", spec, None
  raise FileNotFoundError(
      f"train.init_from={spec}: no such file or directory (expected a weights file: .npz, "
      ".pt/.pth or .safetensors state dict, or a network-snapshot .pkl; or a patchdiff workdir, "
      "WORKDIR or WORKDIR@STEP)")


def load(spec: str, cfg: ml_collections.ConfigDict) -> InitWeights:
  """The weights of `spec` (see the module docstring) for `cfg.model`, checked: any tensor that
  does not fit raises ValueError naming `train.init_from`, the tensors and the config keys;
  `cfg.train.init_reset_labels` leaves the label embedding fresh (see
  `models.pretrained_values`)."""
  kind, path, step = parse(spec)
  where = f"train.init_from={spec}"
  reset = bool(cfg.train.get("init_reset_labels", False))
  if kind == "checkpoint":
    state_dict, notes, source = _read_checkpoint(path, step, cfg, where)
  else:
    state_dict, notes, source = _read_file(path, cfg, where)
  values, zeroed, fresh = models.pretrained_values(state_dict, cfg.model, reset_labels=reset,
                                                   where=where, notes=tuple(notes))
  weights = InitWeights(source, values, zeroed, fresh)
  logging.info("initial weights: %s", weights.summary())
  return weights


def _read_checkpoint(workdir: str, step: int | None, cfg: ml_collections.ConfigDict,
                     where: str) -> tuple[dict[str, np.ndarray], list[str], str]:
  """The EMA weights of a checkpoint as an official state dict, read with the checkpoint's own
  model config; notes name the model config keys on which it differs from `cfg`."""
  mgr = checkpoint.manager(workdir, create=False)
  try:
    step = checkpoint.check_step(mgr, step)
    saved = checkpoint.restore_config(mgr, step)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"{where}: {e}") from None
  finally:
    mgr.close()
  try:
    notes = checkpoint.model_differences(saved["model"], cfg.model)
  except (KeyError, ValueError) as e:
    raise ValueError(f"{where}: checkpoint step {step} has an unreadable model config: "
                     f"{e}") from None
  denoiser, step = checkpoint.load_ema(workdir, ml_collections.ConfigDict(saved), step)
  return models.torch_state_dict(denoiser), notes, f"the EMA weights of {workdir} step {step}"


def _read_file(path: str, cfg: ml_collections.ConfigDict,
               where: str) -> tuple[dict[str, np.ndarray], list[str], str]:
  """A weights file's state dict; for a network snapshot, its network's class and arguments
  are checked (preconditioning, sigma_data) and compared with `cfg.model` for the notes."""
  try:
    if os.path.splitext(path)[1].lower() == ".pkl":
      state_dict, info = files.read_snapshot(path)
    else:
      state_dict, info = files.read_state_dict(path), None
  except (OSError, ValueError, ImportError) as e:  # the reader's TorchPickleError is a ValueError
    raise type(e)(f"{where}: {e}") from e
  except Exception as e:  # pylint: disable=broad-except  (whatever else a damaged file raises)
    raise ValueError(f"{where}: {type(e).__name__}: {e}") from e
  c = models.resolve(cfg.model)
  notes = _tensor_notes(state_dict, c)
  if info is None:
    return state_dict, notes, path
  name = info["class_name"]
  if name not in PRECONDITIONINGS:
    raise ValueError(f"{where}: the snapshot's network is a {name}; only {PRECONDITIONINGS} "
                     "networks have this denoiser's preconditioning (EDM's)")
  sigma_data = info["attributes"].get("sigma_data", c["sigma_data"])
  if not np.isclose(sigma_data, c["sigma_data"]):
    raise ValueError(f"{where}: the snapshot's network has sigma_data={sigma_data}, the config's "
                     f"model.sigma_data={c['sigma_data']}")
  return state_dict, notes + _snapshot_notes(info, c), f"{path} ({name})"


def _tensor_notes(state_dict: Mapping[str, Any], c: Mapping[str, Any]) -> list[str]:
  """Model config values that the file's tensors show to differ from `c`."""
  notes = []
  names = {k[len("model."):] if k.startswith("model.") else k: v for k, v in state_dict.items()}
  for name in names:
    m = re.fullmatch(r"enc\.(\d+)x\1_conv\.weight", name)
    if m and int(m.group(1)) != c["img_resolution"]:
      notes.append(f"the file's network is for {m.group(1)} px ({name}), the config's "
                   f"model.img_resolution={c['img_resolution']}")
  augment = names.get("map_augment.weight")
  if augment is not None and np.ndim(augment) == 2 and augment.shape[1] != c["augment_dim"]:
    notes.append(f"the file's network takes {augment.shape[1]} augmentation labels "
                 f"(map_augment.weight {augment.shape}): set model.augment_dim="
                 f"{augment.shape[1]} (augmentation labels are never fed here, so these weights "
                 "do not change the function)")
  return notes


def _snapshot_notes(info: Mapping[str, Any], c: Mapping[str, Any]) -> list[str]:
  """The snapshot network's arguments that differ from the model config `c`."""
  kwargs = info["init_kwargs"]
  notes = []
  archs = BACKBONE_ARCHS.get(info.get("model_class") or kwargs.get("model_type"))
  if archs and c["arch"] not in archs:
    notes.append(f"the snapshot's backbone is {info.get('model_class')} (model.arch "
                 f"{' or '.join(map(repr, archs))}), the config's model.arch={c['arch']!r}")
  channels = kwargs.get("img_channels")
  if isinstance(channels, int):
    data = channels - (models.COORD_CHANNELS if info["class_name"] == "Patch_EDMPrecond" else 0)
    if data != c["img_channels"]:
      notes.append(f"the snapshot's network takes {data} image channels (img_channels="
                   f"{channels}), the config's model.img_channels={c['img_channels']}")
  for key in _SNAPSHOT_KEYS:
    if key in kwargs and key in c and _plain(kwargs[key]) != _plain(c[key]):
      notes.append(f"the snapshot's network has {key}={kwargs[key]!r}, the config's "
                   f"model.{key}={_plain(c[key])!r}")
  return notes


# Official network keywords that configure nothing here: the preconditioning's noise range
# (sampling takes its own) and the class names, which `official_model_config` reads.
_IGNORED_KWARGS = ("model_type", "sigma_min", "sigma_max")


def official_model_config(kwargs: Mapping[str, Any], *, coordinates: bool = True) -> dict[str, Any]:
  """Our model config (`models.resolve`'s keys) of an official network built with keyword
  arguments `kwargs` (`Patch_EDMPrecond` / `EDMPrecond` with their SongUNet / DhariwalUNet
  keywords, in the official names, as train.py passes them and a snapshot records them).

  `img_channels` counts the coordinate channels when `coordinates` (a `Patch_EDMPrecond`'s, as
  its snapshot records it) and not otherwise. `model_type` picks the backbone: DhariwalUNet is
  `adm`; SongUNet is `ncsnpp` with a Fourier embedding, else `ddpmpp` (train.py's two
  presets); every keyword given overrides the preset's value. `use_fp16` sets the float16
  compute dtype. Raises ValueError naming any keyword patchdiff does not support.
  """
  kw = dict(kwargs)
  model_type = kw.get("model_type", "SongUNet")
  if model_type not in BACKBONE_ARCHS:
    raise ValueError(f"model_type={model_type!r}: patchdiff has {sorted(BACKBONE_ARCHS)}")
  arch = ("adm" if model_type == "DhariwalUNet" else
          "ncsnpp" if kw.get("embedding_type") == "fourier" else "ddpmpp")
  for key in ("img_resolution", "img_channels"):
    if key not in kw:
      raise ValueError(f"the network's keyword arguments have no {key}")
  out: dict[str, Any] = dict(arch=arch, img_resolution=int(kw.pop("img_resolution")))
  channels = int(kw.pop("img_channels")) - (models.COORD_CHANNELS if coordinates else 0)
  out["img_channels"] = channels
  if kw.pop("use_fp16", False):
    out["dtype"] = "float16"
  if kw.pop("implicit_mlp", False):
    raise ValueError("implicit_mlp=True: the official coordinate MLP variant is not supported")
  for key in _IGNORED_KWARGS:
    kw.pop(key, None)
  known = set(models.ARCH_DEFAULTS[arch]) | {"out_channels", "sigma_data"}
  unknown = sorted(set(kw) - known)
  if unknown:
    raise ValueError(f"network keyword arguments patchdiff does not support: {unknown}")
  out.update({k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()})
  if out.get("out_channels") == channels:
    del out["out_channels"]
  models.resolve(out)  # the values' own checks
  return out


# The latent networks' VAE scale (Stable Diffusion's, which the official latent models use).
SD_VAE_SCALE = 0.18215


def network_config(info: Mapping[str, Any], path: str,
                   vae: str | None = None) -> ml_collections.ConfigDict:
  """The config that samples the network a snapshot describes (`info`, as `files.read_snapshot`
  returns it), with no config file: the model from the network's recorded keyword arguments
  (`official_model_config`), the sampler the paper used for its architecture (DDPM++ / NCSN++:
  `config_lib.pixel64_config`'s 50 deterministic Heun steps; ADM: `latent256_config`'s 256
  steps with S_churn 40, S_min 0.05, S_max 50, S_noise 1.003), no guidance, and no training data
  (`data.source='none'`). A network of 4 channels is a latent one: its samples are decoded by
  the diffusers-format VAE folder `vae` (Stable Diffusion's scale, 0.18215), which it needs.

  Raises ValueError naming `path` and the field: another preconditioning than EDM's, positional
  constructor arguments, a network keyword patchdiff does not support, a latent network
  without `vae`, or `vae` for a pixel network.
  """
  name = info.get("class_name")
  if name not in PRECONDITIONINGS:
    raise ValueError(f"{path}: class_name={name!r}: only {' and '.join(PRECONDITIONINGS)} networks "
                     "have this denoiser's preconditioning (EDM's)")
  if info.get("init_args"):
    raise ValueError(f"{path}: the network was built with positional arguments "
                     f"{info['init_args']!r}; patchdiff reads keyword arguments only")
  kwargs = dict(info.get("init_kwargs") or {})
  attributes = info.get("attributes") or {}
  for key in ("img_resolution", "img_channels", "label_dim", "sigma_data", "use_fp16"):
    if key not in kwargs and isinstance(attributes.get(key), (int, float)):
      kwargs[key] = attributes[key]
  if kwargs.get("sigma_data") == 0.5:
    del kwargs["sigma_data"]
  try:
    model = official_model_config(kwargs, coordinates=name == "Patch_EDMPrecond")
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from None
  latent = model["img_channels"] == 4
  if latent and not vae:
    raise ValueError(f"{path}: a latent network (img_channels={model['img_channels']}): its "
                     "samples are decoded by a VAE; give --vae=DIR, a diffusers-format folder "
                     "(Stable Diffusion's sd-vae-ft-mse or sd-vae-ft-ema)")
  if vae and not latent:
    raise ValueError(f"{path}: --vae={vae}, but the network takes {model['img_channels']} image "
                     "channels: a VAE decodes latent networks' samples only")
  c = config_lib.base_config()
  c.model.update(model)
  r = model["img_resolution"]
  c.data.source = "none"
  c.data.resolution = r
  c.data.labels = bool(model.get("label_dim"))
  c.patch.latent = latent
  if latent:
    c.vae.path = vae
    c.vae.scale = SD_VAE_SCALE
  paper = config_lib.latent256_config() if model["arch"] == "adm" else config_lib.pixel64_config()
  for key in ("num_steps", "s_churn", "s_min", "s_max", "s_noise"):
    c.sample[key] = paper.sample[key]
  return c


def load_network(path: str, vae: str | None = None) -> tuple[ml_collections.ConfigDict, Any]:
  """(`network_config` of an official `network-snapshot-*.pkl`, the denoiser holding its `ema`
  weights). An `EDMPrecond` network (EDM's, no coordinate inputs) gets zero weights for the
  coordinate channels, so the denoiser computes its function whatever the coordinates."""
  if os.path.splitext(path)[1].lower() != ".pkl":
    raise ValueError(f"{path}: not a network snapshot (.pkl); a state dict records no network "
                     "arguments: convert it with `python -m patchdiff.convert --config=...`")
  try:
    state_dict, info = files.read_snapshot(path)
  except (OSError, ValueError) as e:
    raise type(e)(str(e) if path in str(e) else f"{path}: {e}") from e
  cfg = network_config(info, path, vae)
  values, _, _ = models.pretrained_values(state_dict, cfg.model, where=path)
  return cfg, models.denoiser_from_values(cfg.model, values)


def _plain(v: Any) -> Any:
  return list(v) if isinstance(v, (list, tuple)) else v
