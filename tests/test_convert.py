"""Official weights -> orbax checkpoint -> `--mode=sample`, end to end."""
import os
import subprocess
import sys

import numpy as np
import jax
import jax.numpy as jnp
from PIL import Image

from conftest import DDPMPP_TINY, REPO
from patchdiff import convert, images_io, sampling

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


def test_convert_cli_then_sample_reproduces_the_official_network(reference, tmp_path):
  weights = reference / "parity" / "ddpmpp_tiny_weights.npz"
  workdir = str(tmp_path / "converted")
  out = _run("patchdiff.convert", f"--input={weights}", f"--output={workdir}", *TINY_FLAGS)
  assert "wrote" in out.stdout and os.path.isdir(os.path.join(workdir, "checkpoints", "0"))
  _run("patchdiff.main", f"--workdir={workdir}", "--mode=sample", *TINY_FLAGS)

  # The PNG of seed 6 is the sampler's output for that seed's latents with the official weights.
  denoiser = convert.load_torch_state_dict(convert.read_state_dict(str(weights)), DDPMPP_TINY)
  latents = jax.random.normal(jax.random.key(jnp.uint32(6)), (16, 16, 3))[None]
  expected = images_io.to_uint8(np.asarray(sampling.heun_sample(denoiser, latents, num_steps=4)))
  png = np.asarray(Image.open(os.path.join(workdir, "samples", "step_00000000", "000000",
                                           "000006.png")))
  assert np.abs(png.astype(int) - expected[0].astype(int)).max() <= 1


def test_read_state_dict_errors(tmp_path):
  import pytest
  with pytest.raises(FileNotFoundError, match="does not exist"):
    convert.read_state_dict(str(tmp_path / "none.npz"))
  (tmp_path / "w.bin").write_bytes(b"x")
  with pytest.raises(ValueError, match="expected .npz, .pt or .pth"):
    convert.read_state_dict(str(tmp_path / "w.bin"))
