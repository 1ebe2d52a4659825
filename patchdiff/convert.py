"""Turns the official PyTorch weights into an orbax checkpoint that `--mode=sample` restores: a
Patch_EDMPrecond state dict as `.npz`, `.pt` or `.pth`, or an official `network-snapshot-*.pkl`
(its `ema` network, read without torch and without running anything from the file):

  python -m patchdiff.convert --config=configs/ffhq64.py --input=weights.npz --output=DIR
  python -m patchdiff.convert --config=configs/ffhq64.py --input=network-snapshot.pkl --output=DIR
"""
from __future__ import annotations

from patchdiff.nn.models import count_params, load_torch_state_dict  # noqa: F401
from patchdiff.nn.torch_io import read_snapshot, read_state_dict  # noqa: F401


def main(argv):
  from absl import flags  # pylint: disable=import-outside-toplevel
  from patchdiff import checkpoint  # pylint: disable=import-outside-toplevel
  cfg = flags.FLAGS.config
  sd = read_state_dict(flags.FLAGS.input)
  denoiser = load_torch_state_dict(sd, cfg.model)
  checkpoint.save_weights(flags.FLAGS.output, denoiser, cfg, step=0)
  print(f"wrote {count_params(denoiser):,} parameters to {flags.FLAGS.output}")


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  config_flags.DEFINE_config_file("config", None, "experiment config file", lock_config=True)
  flags.DEFINE_string("input", None, "official weights: a .npz or .pt/.pth state dict, or a "
                      "network-snapshot .pkl (its ema network)")
  flags.DEFINE_string("output", None, "workdir to write the orbax checkpoint into")
  flags.mark_flags_as_required(["config", "input", "output"])
  app.run(main)
