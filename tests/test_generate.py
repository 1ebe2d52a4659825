"""Sampling: seed ranges, per-seed determinism, extrapolated canvases, in- and outpainting."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import DDPMPP_TINY
from patchdiff import config_lib, generate, patches, sampling
from patchdiff.nn import models
from patchdiff.nn import vae as vae_lib
from test_sampling import recording_denoiser


@pytest.fixture(scope="module")
def sampler():
  scfg = config_lib.base_config().sample
  scfg.num_steps = 3
  scfg.s_churn = 2.0  # stochastic: the churn noise must follow the seed too
  denoiser = models.create_denoiser(DDPMPP_TINY, seed=1)
  return generate.Sampler(denoiser, models.resolve(DDPMPP_TINY), scfg)


def test_seed_ranges():
  assert generate.parse_seeds("0-3") == [0, 1, 2, 3]
  assert generate.parse_seeds("7") == [7]
  assert generate.parse_seeds("0,5,10-12") == [0, 5, 10, 11, 12]
  for bad, match in (("5-2", "reversed"), ("", "is not N"), ("a-b", "is not N"),
                     ("-3", "is not N")):
    with pytest.raises(ValueError, match=match):
      generate.parse_seeds(bad)


def test_each_image_depends_on_its_seed_alone(sampler):
  seeds = [3, 4, 5, 6, 7]
  a = sampler.sample(seeds, batch_size=5)
  b = sampler.sample(seeds, batch_size=2)  # other batches, a padded last one
  c = sampler.sample([6], batch_size=1)
  assert a.shape == (5, 16, 16, 3)
  np.testing.assert_allclose(a, b, atol=1e-5)
  np.testing.assert_allclose(a[3:4], c, atol=1e-5)
  assert np.abs(a[0] - a[1]).mean() > 0.05  # different seeds, different images


def test_extrapolated_canvas_continues_the_coordinates():
  grid = sampling.canvas_grid(1, 24, 16)[0]
  step = 2 / 15
  np.testing.assert_allclose(grid[0, 0], [-1 - 4 * step, -1 - 4 * step], rtol=1e-6)
  np.testing.assert_allclose(grid[-1, -1], [1 + 4 * step, 1 + 4 * step], rtol=1e-6)
  np.testing.assert_allclose(np.diff(grid[0, :, 0]), step, rtol=1e-5)
  zeros = np.zeros(1, np.int32)
  np.testing.assert_array_equal(grid[4:20, 4:20], patches.coord_grid(zeros, zeros, 16, 16)[0])
  with pytest.raises(ValueError, match="even number"):
    sampling.canvas_grid(1, 23, 16)


@pytest.mark.parametrize("canvas,resolution", [(16, 16), (24, 16), (12, 8), (7, 7)])
def test_canvas_grid_is_the_coordinate_grid_at_its_offsets(canvas, resolution):
  """One definition of coordinates: a canvas is patches.coord_grid at offset -(canvas - R) / 2
  (0 for the full image, the sampler's default), bit for bit."""
  off = np.full(3, -((canvas - resolution) // 2))
  expected = patches.coord_grid(off, off, canvas, resolution)
  np.testing.assert_array_equal(sampling.canvas_grid(3, canvas, resolution), expected)


def test_outpainting_keeps_the_known_pixels_and_fills_the_rest(sampler):
  rng = np.random.default_rng(0)
  image = rng.uniform(-1, 1, (16, 16, 3)).astype(np.float32)
  known = generate.Known.centred(image, 24)
  out = sampler.sample([0, 1], batch_size=2, canvas=24, known=known)
  assert out.shape == (2, 24, 24, 3)
  for x in out:
    np.testing.assert_array_equal(x[4:20, 4:20], image)
    border = np.concatenate([x[:4].ravel(), x[20:].ravel(), x[:, :4].ravel(), x[:, 20:].ravel()])
    assert np.isfinite(border).all() and border.std() > 0.05
  assert np.abs(out[0, :4] - out[1, :4]).mean() > 0.01  # the generated part follows the seed


def test_inpainting_with_any_mask(sampler):
  rng = np.random.default_rng(1)
  image = rng.uniform(-1, 1, (16, 16, 3)).astype(np.float32)
  mask = (rng.uniform(size=(16, 16, 1)) < 0.5).astype(np.float32)
  out = sampler.sample([9], batch_size=1, known=generate.Known(image, mask))[0]
  keep = mask[..., 0] > 0
  np.testing.assert_array_equal(out[keep], image[keep])
  assert np.abs(out[~keep] - image[~keep]).mean() > 0.05


def stub_sampler(output, label_dim=0, channels=3, resolution=8, num_steps=3, decoder=None):
  """A Sampler around a recording stub denoiser: (sampler, the denoiser's calls)."""
  scfg = config_lib.base_config().sample
  scfg.num_steps = num_steps
  stub, calls = recording_denoiser(output)
  cfg = dict(img_resolution=resolution, img_channels=channels, label_dim=label_dim)
  return generate.Sampler(stub, cfg, scfg, decoder=decoder), calls


@pytest.mark.parametrize("kind", ["outpainting", "inpainting"])
def test_known_region_is_noised_to_each_evaluations_sigma(kind):
  """At every evaluation the known region is `known + sigma * n`, n standard normal and fresh
  at every step. The stub is the ideal denoiser of the known image there (D = known), under
  which the ODE keeps `known + sigma * n` within a step, so any other level, or the same n step
  after step (no re-noising), shows in its inputs, whatever is pasted back at the end."""
  rng = np.random.default_rng(0)
  image = rng.uniform(-1, 1, (8, 8, 3)).astype(np.float32)
  if kind == "outpainting":
    known = generate.Known.centred(image, 12)
  else:
    known = generate.Known(image, (rng.uniform(size=(8, 8, 1)) < 0.5).astype(np.float32))
  target = jnp.asarray(known.image * known.mask)
  n = 4
  sampler, calls = stub_sampler(lambda x, s, p, l: target + 0 * x, num_steps=n)
  sampler.sample([0, 1], batch_size=2, known=known)
  jax.effects_barrier()
  assert len(calls) == 2 * n - 1
  keep = np.broadcast_to(known.mask > 0, (2, *known.image.shape))
  t = sampling.noise_levels(n)
  sigmas = [t[0]] + [t[i] for i in range(1, n) for _ in range(2)]
  noises = []
  for k, (x, sigma, _, _) in enumerate(calls):
    np.testing.assert_allclose(sigma, sigmas[k], rtol=1e-6)
    noise = (x - known.image)[keep] / sigmas[k]
    if k % 2 == 0:  # the first evaluation of a step: its noise is new
      assert abs(noise.std() - 1) < 5 / np.sqrt(2 * noise.size), k
      assert abs(noise.mean()) < 5 / np.sqrt(noise.size), k
      if noises:
        assert abs(np.corrcoef(noise, noises[-1])[0, 1]) < 5 / np.sqrt(noise.size), k
      noises.append(noise)
    else:  # the corrector's evaluation: the same noise at the next level
      np.testing.assert_allclose(noise, noises[-1], atol=1e-5 * max(1, 1 / sigmas[k]))


def test_class_idx_gives_every_seed_that_class():
  sampler, calls = stub_sampler(lambda x, s, p, l: 0.5 * x, label_dim=5, num_steps=2)
  sampler.sample([0, 1, 2], batch_size=3, class_idx=3)
  jax.effects_barrier()
  assert len(calls) == 3
  for *_, labels in calls:
    np.testing.assert_array_equal(labels, np.eye(5)[[3, 3, 3]])


def test_drawn_classes_follow_the_seed():
  seeds = list(range(12))
  drawn = []
  for batch_size in (12, 5):  # other batches, a padded last one
    sampler, calls = stub_sampler(lambda x, s, p, l: 0.5 * x, label_dim=5, num_steps=1)
    sampler.sample(seeds, batch_size=batch_size)
    jax.effects_barrier()
    labels = np.concatenate([c[3] for c in calls])[:len(seeds)]
    np.testing.assert_array_equal(labels.sum(1), 1)  # one-hot
    np.testing.assert_array_equal(labels, np.eye(5)[labels.argmax(1)])
    drawn.append(labels.argmax(1))
  np.testing.assert_array_equal(drawn[0], drawn[1])
  assert len(set(drawn[0])) >= 3  # drawn per seed, not one class for all
  # What the sample files record as each sample's class (`arr_1`) is the class it was drawn with.
  np.testing.assert_array_equal(generate.seed_classes(seeds, 5), drawn[0])
  np.testing.assert_array_equal(generate.seed_classes(seeds, 5, class_idx=3), [3] * len(seeds))


def test_latent_decoder_divides_by_the_vae_scale():
  """A latent model's samples are scale * (z - shift): the decoder sees samples / scale + shift."""
  config = dict(down_block_types=["DownEncoderBlock2D"] * 2,
                up_block_types=["UpDecoderBlock2D"] * 2,
                block_out_channels=[8, 8], layers_per_block=1, norm_num_groups=4,
                latent_channels=4, scaling_factor=0.25, shift_factor=0.1)
  vae = vae_lib.create(config, seed=0)
  decode = vae_lib.decode_fn(vae)
  lat = jax.random.normal(jax.random.key(0), (2, 4, 4, 4))
  np.testing.assert_allclose(vae_lib.latent_decoder(vae)(lat), decode(lat / 0.25 + 0.1),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(vae_lib.latent_decoder(vae, 0.5)(lat), decode(lat / 0.5 + 0.1),
                             rtol=1e-5, atol=1e-6)
  assert np.abs(decode(lat / 0.25 + 0.1) - decode(lat + 0.1)).mean() > 1e-2  # the scale shows
  # The Sampler hands its samples to the decoder (so latents / scale reach the VAE).
  output = lambda x, s, p, l: 0.5 * x
  plain, _ = stub_sampler(output, channels=4, resolution=4, num_steps=2)
  latent, _ = stub_sampler(output, channels=4, resolution=4, num_steps=2,
                           decoder=vae_lib.latent_decoder(vae))
  samples = plain.sample([0, 1], batch_size=2)
  np.testing.assert_allclose(latent.sample([0, 1], batch_size=2),
                             decode(jnp.asarray(samples) / 0.25 + 0.1), rtol=1e-5, atol=1e-6)


def test_bad_sampling_requests_fail_before_sampling(sampler):
  with pytest.raises(ValueError, match="model is unconditional"):
    sampler.sample([0], class_idx=0)
