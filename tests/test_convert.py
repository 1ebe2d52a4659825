"""Official weights -> orbax checkpoint -> `--mode=sample`, end to end."""
import importlib.util
import os
import subprocess
import sys

import numpy as np
import jax
import jax.numpy as jnp
from PIL import Image

from conftest import DDPMPP_TINY, REPO, main_in_process
from patchdiff import checkpoint, config_lib, convert, images_io, sampling
from patchdiff.nn import models, torch_io

# configs/demo.py reshaped into the ddpmpp_tiny fixture's network.
TINY_FLAGS = ["--config.data.resolution=16", "--config.model.img_resolution=16",
              "--config.model.model_channels=16", "--config.model.channel_mult=(1,2)",
              "--config.model.num_blocks=1", "--config.model.attn_resolutions=(8,)",
              "--config.sample.num_steps=4", "--config.sample.num_images=3",
              "--config.sample.batch_size=2", "--config.sample.seed=5"]


def _run(module, *args):
  proc = subprocess.run([sys.executable, "-m", module, "--config=configs/demo.py", *args],
                        cwd=REPO, capture_output=True, text=True, timeout=600,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc


def test_convert_cli_then_sample_reproduces_the_official_network(reference, tmp_path,
                                                                  user_xla_flags):
  """The two commands as a user runs them, compiled with the package's CPU options
  (`user_xla_flags`): the converter in a new interpreter, then --mode=sample in this one (the
  entry point's own flags and dispatch; test_layout.py samples in a new interpreter)."""
  weights = reference / "parity" / "ddpmpp_tiny_weights.npz"
  workdir = str(tmp_path / "converted")
  out = _run("patchdiff.convert", f"--input={weights}", f"--output={workdir}", *TINY_FLAGS)
  assert "wrote" in out.stdout and os.path.isdir(os.path.join(workdir, "checkpoints", "0"))
  main_in_process("--config=configs/demo.py", f"--workdir={workdir}", "--mode=sample",
                  *TINY_FLAGS)

  # The PNG of seed 6 is the sampler's output for that seed's latents with the official weights.
  denoiser = convert.load_torch_state_dict(convert.read_state_dict(str(weights)), DDPMPP_TINY)
  latents = jax.random.normal(jax.random.key(jnp.uint32(6)), (16, 16, 3))[None]
  expected = images_io.to_uint8(np.asarray(sampling.heun_sample(denoiser, latents, num_steps=4)))
  png = np.asarray(Image.open(os.path.join(workdir, "samples", "step_00000000", "000000",
                                           "000006.png")))
  assert np.abs(png.astype(int) - expected[0].astype(int)).max() <= 1


def test_convert_cli_reads_an_official_snapshot(reference, tmp_path):
  parity = reference / "parity"
  workdir = str(tmp_path / "converted")
  out = _run("patchdiff.convert", f"--input={parity / 'ddpmpp_tiny_snapshot.pkl'}",
             f"--output={workdir}", *TINY_FLAGS)
  assert "wrote" in out.stdout
  spec = importlib.util.spec_from_file_location("demo", REPO / "configs" / "demo.py")
  demo = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(demo)
  cfg = config_lib.override(demo.get_config(), {f"model.{k}": v for k, v in DDPMPP_TINY.items()
                                                if k != "arch"})
  denoiser, step = checkpoint.load_ema(workdir, cfg)
  got = torch_io.state_dict(denoiser, models.TORCH_LAYERS)
  with np.load(parity / "ddpmpp_tiny_weights.npz") as f:
    # The resampling filters are EDM's buffers; here the config builds them.
    assert step == 0 and set(got) == {n for n in f.files if not n.endswith(".resample_filter")}
    for name in got:
      np.testing.assert_array_equal(got[name], f[name], err_msg=name)


def test_read_state_dict_errors(tmp_path):
  import pytest
  with pytest.raises(FileNotFoundError, match="does not exist"):
    convert.read_state_dict(str(tmp_path / "none.npz"))
  (tmp_path / "w.bin").write_bytes(b"x")
  with pytest.raises(ValueError, match="expected .npz, .pt or .pth"):
    convert.read_state_dict(str(tmp_path / "w.bin"))
