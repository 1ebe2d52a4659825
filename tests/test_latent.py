"""Latent Patch Diffusion end to end: images -> VAE posteriors (encode_latents) -> the latent
source -> a class-conditional ADM trained a few steps -> samples decoded to PNG by the VAE."""
import io
import json
import zipfile

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from patchdiff import data, encode_latents, generate, patches, train
from patchdiff.data import decode, latents as latent_files, sources
from patchdiff.nn import vae
from test_configs import load

RES = 32  # pixels; the tiny VAE downsamples 4x: 8x8 latents
CLASSES = 3


@pytest.fixture(scope="module")
def image_zip(tmp_path_factory):
  """A dataset_tool zip: 7 labelled 32x32 images and one corrupt PNG (also labelled)."""
  rng = np.random.default_rng(0)
  path = tmp_path_factory.mktemp("images") / "ds.zip"
  names, labels = [], []
  with zipfile.ZipFile(path, "w") as zf:
    for i in range(8):
      name = f"00000/img{i:08d}.png"
      if i == 5:
        zf.writestr(name, b"\x89PNG\r\n\x1a\n truncated")
      else:
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (RES, RES, 3), dtype=np.uint8)).save(buf, "PNG")
        zf.writestr(name, buf.getvalue())
      names.append(name)
      labels.append(i % CLASSES)
    zf.writestr("dataset.json", json.dumps({"labels": [[n, l] for n, l in zip(names, labels)]}))
  return path, np.asarray(labels)


@pytest.fixture(scope="module")
def latents(vae_dir, image_zip, tmp_path_factory):
  path, _ = image_zip
  out = tmp_path_factory.mktemp("latents") / "latents"
  summary = encode_latents.encode_dataset(
      dict(source="zip", path=str(path), resolution=RES, labels=True), str(vae_dir), str(out),
      batch=3, chunk=2, shard_size=3)  # shards of 3, 2 (image 5 is corrupt) and 2 latents
  return out, summary


def test_encode_latents_writes_scaled_posteriors(latents, vae_dir, image_zip):
  out, summary = latents
  path, labels = image_zip
  assert summary["num_images"] == 7 and summary["shape"] == (7, 4, 8, 8)
  assert list(summary["skipped"]) == [f"{path}:00000/img00000005.png"]
  mean, std, stored, manifest = latent_files.read_shards(out)
  assert [s["count"] for s in manifest["shards"]] == [3, 2, 2]
  mean, std, scale = np.asarray(mean), np.asarray(std), manifest["scaling_factor"]
  np.testing.assert_array_equal(stored, np.delete(labels, 5))
  model = vae.load_vae(vae_dir)
  assert scale == pytest.approx(model.scaling_factor)
  # The same images through the training decoder and the VAE directly.
  enc = sources.scan_zip(path)
  pixels, kept, _ = decode.decode_all(enc, RES)
  m, s = model.encode(jnp.asarray(pixels, jnp.float32) / 127.5 - 1)
  np.testing.assert_allclose(mean, scale * np.transpose(np.asarray(m), (0, 3, 1, 2)),
                             rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(std, scale * np.transpose(np.asarray(s), (0, 3, 1, 2)),
                             rtol=1e-4, atol=1e-6)
  # Training memory-maps the shards.
  lat = latent_files.load_latents(out, 8)
  assert all(isinstance(a, np.memmap) for a in lat.mean.parts + lat.std.parts)


def test_latent_source_labels_and_bad_input(latents):
  out, _ = latents
  schedule = patches.PatchSchedule(sizes=(4, 8), probs=(0.5, 0.5), resolution=8, seed=0)
  cfg = dict(source="latents", path=str(out), resolution=8, labels=True, latent_scale=0.18215)
  it = data.build_input(cfg, schedule, 4, 6, label_dim=CLASSES, channels=4)
  stored = latent_files.read_shards(out)[2]
  for batch in (next(it) for _ in range(6)):
    assert batch["image"].shape[-1] == 4 and batch["label"].shape[-1] == CLASSES
    # Each sample's one-hot label is its latent's class.
    np.testing.assert_array_equal(batch["label"].argmax(-1), stored[batch["index"]])
  with pytest.raises(ValueError, match=r"latents scaled by 0\.18215.*latent_scale is 0\.13025"):
    data.build_input(dict(cfg, latent_scale=0.13025), schedule, 4, 6, label_dim=CLASSES)
  with pytest.raises(ValueError, match=f"latent file {out} has 4 channels, but the model takes 3"):
    data.build_input(cfg, schedule, 4, 6, label_dim=CLASSES, channels=3)
  with pytest.raises(ValueError, match="is not 16x16"):
    data.build_input(dict(cfg, resolution=16), patches.PatchSchedule(
        sizes=(8, 16), probs=(0.5, 0.5), resolution=16), 4, 6, label_dim=CLASSES)
  with pytest.raises(ValueError, match=r"label 2 of .*\[\d+\] is out of range for label_dim=2"):
    data.build_input(cfg, schedule, 4, 6, label_dim=2, channels=4)


def test_encode_latents_bad_input(vae_dir, image_zip, tmp_path):
  path, _ = image_zip
  data = dict(source="zip", path=str(path), resolution=RES)
  out = tmp_path / "x"
  with pytest.raises(FileNotFoundError, match="no config.json"):
    encode_latents.encode_dataset(data, str(tmp_path), str(out))
  with pytest.raises(ValueError, match="resolution 30 is not divisible by the VAE's downsampling"):
    encode_latents.encode_dataset(dict(data, resolution=30), str(vae_dir), str(out))
  with pytest.raises(ValueError, match="img00000005.png"):
    encode_latents.encode_dataset(dict(data, skip_corrupt=False), str(vae_dir), str(out))
  assert [p.name for p in out.iterdir()] == ["spec.json"]  # nothing half-written


def latent_config(latent_path, vae_path):
  """ImageNet-256's smoke run (a class-conditional latent ADM in float16 with a static loss scale
  of 100 and 1000 classes, sampled with guidance 1.3: the config and programs that
  test_configs.py's smoke run trains) on the encoded latents, decoded by the tiny VAE."""
  c = load("imagenet256", "smoke")
  c.data.source = "latents"
  c.data.path = str(latent_path)
  c.data.latent_scale = 0.18215
  c.vae.path = str(vae_path)
  c.train.steps = 2
  c.train.checkpoint_every = 2
  assert (c.model.arch, c.model.dtype, c.train.loss_scale, c.sample.guidance, c.data.resolution,
          c.model.img_channels) == ("adm", "float16", 100.0, 1.3, RES // 4, 4)
  return c


def test_latent_training_and_decoded_samples(latents, vae_dir, tmp_path):
  out, _ = latents
  cfg = latent_config(out, vae_dir)
  sizes = []
  train.train_and_evaluate(cfg, str(tmp_path), on_step=lambda s, size: sizes.append(size))
  assert sizes and set(sizes) <= {4, 8}
  # The training grid is decoded to pixels by the VAE (4x the latent size).
  grid = np.asarray(Image.open(next(tmp_path.glob("samples_*.png"))))
  assert grid.ndim == 3 and grid.shape[-1] == 3 and min(grid.shape[:2]) >= 2 * RES
  outdir, images = generate.sample_from_checkpoint(cfg, str(tmp_path), seeds=[0, 1, 2],
                                                      class_idx=1)
  assert images.shape == (3, RES, RES, 3) and images.dtype == np.uint8
  pngs = sorted((tmp_path / "samples").rglob("*.png"))
  assert len([p for p in pngs if p.name != "grid.png"]) == 3
  assert np.asarray(Image.open(pngs[0])).shape == (RES, RES, 3)
  # --format=npz of a conditional model: the images as ADM's evaluator reads them (arr_0) and
  # each one's class (arr_1), the class the sampler drew for its seed.
  seeds = list(range(10, 18))
  generate.sample_from_checkpoint(cfg, str(tmp_path), seeds=seeds, fmt="npz",
                                  outdir=str(tmp_path / "npz"))
  with np.load(tmp_path / "npz" / "samples.npz") as f:
    assert f.files == ["arr_0", "arr_1", "seeds"]
    assert f["arr_0"].shape == (8, RES, RES, 3) and f["arr_0"].dtype == np.uint8
    np.testing.assert_array_equal(f["arr_1"], generate.seed_classes(seeds, 1000))
    assert f["seeds"].tolist() == seeds
  # Without the VAE a latent model's samples cannot become PNGs: a clear error first.
  cfg.vae.path = None
  with pytest.raises(Exception, match="set --config.vae.path"):
    generate.sample_from_checkpoint(cfg, str(tmp_path), seeds=[0])


def test_encode_latents_command_line(vae_dir, image_zip, tmp_path):
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  path, _ = image_zip
  out = tmp_path / "l"
  cmd = [sys.executable, "-m", "patchdiff.encode_latents", f"--vae={vae_dir}", "--source=zip",
         f"--path={path}", f"--resolution={RES}", "--limit=3", f"--out={out}"]
  done = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  assert f"wrote {out}: 3 latents of shape (4, 8, 8)" in done.stdout
  mean, _, labels, _ = latent_files.read_shards(out)
  assert mean.shape == (3, 4, 8, 8) and labels is None
  missing = subprocess.run(cmd[:-1], capture_output=True, text=True, check=False, timeout=300)
  assert missing.returncode != 0 and "--out is required" in missing.stderr
