"""Sampling: seed ranges, per-seed determinism, extrapolated canvases, in- and outpainting."""
import numpy as np
import pytest

from conftest import DDPMPP_TINY
from patchdiff import config_lib, generate, patches
from patchdiff.nn import models


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
  grid = generate.canvas_grid(1, 24, 16)[0]
  step = 2 / 15
  np.testing.assert_allclose(grid[0, 0], [-1 - 4 * step, -1 - 4 * step], rtol=1e-6)
  np.testing.assert_allclose(grid[-1, -1], [1 + 4 * step, 1 + 4 * step], rtol=1e-6)
  np.testing.assert_allclose(np.diff(grid[0, :, 0]), step, rtol=1e-5)
  np.testing.assert_array_equal(grid[4:20, 4:20], patches.full_grid(1, 16)[0])
  with pytest.raises(ValueError, match="even number"):
    generate.canvas_grid(1, 23, 16)


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


def test_bad_sampling_requests_fail_before_sampling(sampler):
  with pytest.raises(ValueError, match="model is unconditional"):
    sampler.sample([0], class_idx=0)
