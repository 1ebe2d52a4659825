"""Turns the official PyTorch weights into an orbax checkpoint that `--mode=sample` restores: an
official `network-snapshot-*.pkl` (its `ema` network, read without torch and without running
anything from the file), or a Patch_EDMPrecond / EDMPrecond state dict as `.npz`, `.pt`, `.pth`
or `.safetensors`:

  python -m patchdiff.convert --input=network-snapshot.pkl --output=DIR
  python -m patchdiff.convert --config=configs/ffhq64.py --input=weights.npz --output=DIR
  python -m patchdiff.main --mode=sample --workdir=DIR --seeds=0-63

A snapshot records its network's arguments, so it needs no config: the checkpoint stores the one
derived from them (`pretrained.network_config`). A state dict records none: --config gives the
model. An EDM network (no coordinate inputs) gets zero weights for the coordinate channels.
"""
from __future__ import annotations

from patchdiff.nn.models import count_params, load_torch_state_dict  # noqa: F401
from patchdiff.weights.files import read_snapshot, read_state_dict  # noqa: F401


def convert(path: str, output: str, cfg=None, vae: str | None = None):
  """Writes the weights of `path` into a sampling-only checkpoint in `output`; returns the
  denoiser. `cfg`: the model's config, else (a snapshot only) the one the snapshot records."""
  from patchdiff import checkpoint, pretrained  # pylint: disable=import-outside-toplevel
  from patchdiff.nn import models  # pylint: disable=import-outside-toplevel
  if cfg is None:
    cfg, denoiser = pretrained.load_network(path, vae)
  else:
    if vae:
      raise ValueError("--vae goes without --config (give --config.vae.path instead)")
    values, _, _ = models.pretrained_values(read_state_dict(path), cfg.model, where=path)
    denoiser = models.denoiser_from_values(cfg.model, values)
  checkpoint.save_weights(output, denoiser, cfg, step=0)
  return denoiser


def main(argv):
  from absl import app, flags  # pylint: disable=import-outside-toplevel
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  try:
    denoiser = convert(f.input, f.output, f.config, f.vae)
  except (OSError, ValueError) as e:
    raise app.UsageError(str(e)) from None
  print(f"wrote {count_params(denoiser):,} parameters to {f.output}")


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  config_flags.DEFINE_config_file("config", None, "experiment config file (default, for a .pkl: "
                                  "the one its network's recorded arguments give)",
                                  lock_config=True)
  flags.DEFINE_string("input", None, "official weights: a network-snapshot .pkl (its ema "
                      "network), or a .npz, .pt/.pth or .safetensors state dict (with --config)")
  flags.DEFINE_string("output", None, "workdir to write the orbax checkpoint into")
  flags.DEFINE_string("vae", None, "a latent snapshot without --config: the diffusers-format VAE "
                      "folder that decodes its samples (stored as vae.path)")
  flags.mark_flags_as_required(["input", "output"])
  app.run(main)
