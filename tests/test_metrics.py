"""Image-quality metrics: Frechet distance, statistics files, KID and multi-scale SWD."""
import itertools

import numpy as np
import pytest
import scipy.linalg

from patchdiff import metrics

# Small SWD settings: the paper's defaults (128 patches per image, 4 x 512 projections) are
# only needed for stable absolute numbers, not for these relative checks.
FAST_SWD = dict(patches_per_image=32, num_projections=128, repeats=2)


def _scipy_frechet(mu1, sigma1, mu2, sigma2) -> float:
  """The FID formula as pytorch-fid and EDM compute it, in float64."""
  covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2)
               - 2 * np.trace(covmean).real)


def _random_statistics(rng: np.random.Generator, n: int, d: int = 64, shift: float = 0.0):
  """Statistics of n correlated, non-centred d-dimensional features."""
  mix = rng.standard_normal((d, d)) / np.sqrt(d)
  features = rng.standard_normal((n, d)) @ mix + rng.standard_normal(d) + shift
  return metrics.feature_statistics(features)


@pytest.mark.parametrize("n1,n2", [(500, 500), (40, 50)], ids=["full_rank", "rank_deficient"])
def test_frechet_distance_matches_scipy_sqrtm(n1, n2):
  rng = np.random.default_rng(0)
  mu1, sigma1 = _random_statistics(rng, n1, shift=0.3)
  mu2, sigma2 = _random_statistics(rng, n2)
  if n1 < 64:
    assert np.linalg.matrix_rank(sigma1) < 64 and np.linalg.matrix_rank(sigma2) < 64
  expected = _scipy_frechet(mu1, sigma1, mu2, sigma2)
  got = metrics.frechet_distance(mu1, sigma1, mu2, sigma2)
  assert isinstance(got, float)
  assert got == pytest.approx(expected, rel=1e-6)
  # Symmetric in its two arguments.
  assert metrics.frechet_distance(mu2, sigma2, mu1, sigma1) == pytest.approx(got, rel=1e-9)


@pytest.mark.parametrize("n", [500, 40], ids=["full_rank", "rank_deficient"])
def test_frechet_distance_of_identical_statistics_is_zero(n):
  mu, sigma = _random_statistics(np.random.default_rng(1), n)
  assert abs(metrics.frechet_distance(mu, sigma, mu, sigma)) < 1e-8 * np.trace(sigma)


def test_frechet_distance_of_a_mean_shift_is_its_squared_norm():
  rng = np.random.default_rng(2)
  mu, sigma = _random_statistics(rng, 500)
  direction = rng.standard_normal(64)
  previous = 0.0
  for scale in (0.01, 0.1, 1.0, 10.0):
    shift = scale * direction
    fd = metrics.frechet_distance(mu, sigma, mu + shift, sigma)
    assert fd == pytest.approx(shift @ shift, rel=1e-9, abs=1e-8 * np.trace(sigma))
    assert fd > previous
    previous = fd


def test_frechet_distance_rejects_bad_shapes():
  mu, sigma = np.zeros(4), np.eye(4)
  with pytest.raises(ValueError, match=r"mu must be 1-D, got shape \(1, 4\)"):
    metrics.frechet_distance(mu[None], sigma, mu, sigma)
  with pytest.raises(ValueError, match=r"got \(4, 3\)"):
    metrics.frechet_distance(mu, sigma[:, :3], mu, sigma)
  with pytest.raises(ValueError, match=r"mu1 has shape \(4,\), mu2 has shape \(3,\)"):
    metrics.frechet_distance(mu, sigma, mu[:3], sigma[:3, :3])


def test_feature_statistics_match_numpy():
  features = np.random.default_rng(3).standard_normal((50, 7)).astype(np.float32)
  mu, sigma = metrics.feature_statistics(features)
  assert mu.dtype == np.float64 and sigma.dtype == np.float64
  np.testing.assert_allclose(mu, features.astype(np.float64).mean(axis=0), rtol=1e-12)
  np.testing.assert_allclose(sigma, np.cov(features.astype(np.float64), rowvar=False),
                             rtol=1e-12, atol=1e-14)
  with pytest.raises(ValueError, match="at least 2"):
    metrics.feature_statistics(features[:1])
  with pytest.raises(ValueError, match=r"\(N, D\)"):
    metrics.feature_statistics(features[0])


def test_statistics_file_round_trip(tmp_path):
  mu, sigma = _random_statistics(np.random.default_rng(4), 100)
  path = tmp_path / "ref.npz"
  metrics.save_statistics(path, mu, sigma)
  with np.load(path) as data:
    assert sorted(data.files) == ["mu", "sigma"]
  loaded_mu, loaded_sigma = metrics.load_statistics(path, feature_dim=64)
  np.testing.assert_array_equal(loaded_mu, mu)
  np.testing.assert_array_equal(loaded_sigma, sigma)
  # A name without the .npz suffix is written as given.
  metrics.save_statistics(tmp_path / "stats", mu, sigma)
  np.testing.assert_array_equal(metrics.load_statistics(tmp_path / "stats")[1], sigma)


def test_load_statistics_rejects_bad_files(tmp_path):
  mu, sigma = np.zeros(64), np.eye(64)
  wrong_key = tmp_path / "wrong_key.npz"
  np.savez(wrong_key, mu=mu, cov=sigma)
  with pytest.raises(ValueError, match=r"wrong_key\.npz.*sigma"):
    metrics.load_statistics(wrong_key)
  ok = tmp_path / "small.npz"
  metrics.save_statistics(ok, mu, sigma)
  metrics.load_statistics(ok, feature_dim=64)
  with pytest.raises(ValueError, match=r"small\.npz has 64-d features, expected 2048"):
    metrics.load_statistics(ok, feature_dim=2048)
  inconsistent = tmp_path / "inconsistent.npz"
  np.savez(inconsistent, mu=mu, sigma=sigma[:63, :63])
  with pytest.raises(ValueError, match=r"inconsistent\.npz"):
    metrics.load_statistics(inconsistent)
  not_npz = tmp_path / "mu.npy"
  np.save(not_npz, mu)
  with pytest.raises(ValueError, match=r"mu\.npy is not an \.npz"):
    metrics.load_statistics(not_npz)


def _naive_kid(x: np.ndarray, y: np.ndarray) -> float:
  """Unbiased MMD^2 with the cubic polynomial kernel, by explicit sums over pairs."""
  d = x.shape[1]
  k = lambda u, v: (u @ v / d + 1) ** 3
  m = len(x)
  xx = sum(k(x[i], x[j]) for i, j in itertools.permutations(range(m), 2))
  yy = sum(k(y[i], y[j]) for i, j in itertools.permutations(range(m), 2))
  xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
  return (xx + yy) / (m * (m - 1)) - 2 * xy / (m * m)


def test_kid_matches_the_unbiased_mmd_formula():
  rng = np.random.default_rng(5)
  x, y = rng.standard_normal((12, 5)), rng.standard_normal((12, 5)) + 0.3
  # One subset of all features: a permutation of each set, which the estimate ignores.
  got = metrics.kernel_inception_distance(x, y, num_subsets=1, max_subset_size=12)
  assert got == pytest.approx(_naive_kid(x, y), rel=1e-10)


def test_kid_near_zero_for_one_distribution_and_positive_for_a_shift():
  rng = np.random.default_rng(6)
  # At this scale the estimate's spread over draws of x and y is ~2e-4 (measured on 20 seeds).
  x, y = 0.5 * rng.standard_normal((1500, 64)), 0.5 * rng.standard_normal((1000, 64))
  kwargs = dict(num_subsets=10, max_subset_size=500)
  same = metrics.kernel_inception_distance(x, y, **kwargs)
  assert abs(same) < 1e-3
  shifted = metrics.kernel_inception_distance(x, y + 0.2, **kwargs)
  assert shifted > 0.05
  assert metrics.kernel_inception_distance(x, y + 0.4, **kwargs) > shifted
  # Deterministic given the seed; the seed does choose the subsets.
  assert metrics.kernel_inception_distance(x, y, **kwargs) == same
  assert metrics.kernel_inception_distance(x, y, seed=1, **kwargs) != same


def test_kid_rejects_bad_inputs():
  x = np.zeros((10, 4))
  with pytest.raises(ValueError, match="same D"):
    metrics.kernel_inception_distance(x, np.zeros((10, 3)))
  with pytest.raises(ValueError, match="at least 2"):
    metrics.kernel_inception_distance(x, np.zeros((1, 4)))


def _images(rng: np.random.Generator, n: int, size: int = 32) -> np.ndarray:
  """(n, size, size, 3) floats with structure at several scales: blocks plus fine texture."""
  coarse = rng.standard_normal((n, size // 8, size // 8, 3)).repeat(8, 1).repeat(8, 2)
  middle = rng.standard_normal((n, size // 2, size // 2, 3)).repeat(2, 1).repeat(2, 2)
  return coarse + 0.5 * middle + 0.2 * rng.standard_normal((n, size, size, 3))


def _box_blur(x: np.ndarray, times: int) -> np.ndarray:
  """Applies a 3x3 box blur (wrapping at the borders) `times` times."""
  for _ in range(times):
    x = sum(np.roll(x, (di, dj), axis=(1, 2)) for di in (-1, 0, 1) for dj in (-1, 0, 1)) / 9
  return x


def test_swd_keys_and_zero_for_identical_sets():
  images = np.clip(_images(np.random.default_rng(7), 16) * 40 + 128, 0, 255).astype(np.uint8)
  result = metrics.sliced_wasserstein(images, images.copy(), min_resolution=16, **FAST_SWD)
  assert list(result) == ["swd_32px", "swd_16px", "swd_mean"]
  assert all(abs(v) < 1e-9 for v in result.values())
  # A coarser floor adds levels; one above the image size is clipped to it (one level).
  assert list(metrics.sliced_wasserstein(images, images, min_resolution=8, **FAST_SWD)) == [
      "swd_32px", "swd_16px", "swd_8px", "swd_mean"]
  assert list(metrics.sliced_wasserstein(images, images, min_resolution=64, **FAST_SWD)) == [
      "swd_32px", "swd_mean"]


@pytest.mark.parametrize("distortion", ["noise", "blur"])
def test_swd_grows_with_the_distortion(distortion):
  rng = np.random.default_rng(8)
  images = _images(rng, 64)
  noise = rng.standard_normal(images.shape)
  means = []
  for amount in (1, 2, 4):
    other = images + 0.15 * amount * noise if distortion == "noise" else _box_blur(images, amount)
    result = metrics.sliced_wasserstein(images, other, **FAST_SWD)
    means.append(result["swd_mean"])
    assert result["swd_mean"] == pytest.approx(np.mean([result["swd_32px"], result["swd_16px"]]))
  assert 0 < means[0] < means[1] < means[2], means


def test_swd_sets_of_different_sizes():
  rng = np.random.default_rng(9)
  a, b = _images(rng, 64), _images(rng, 40)
  # More descriptors than FAST_SWD: two samples of one distribution differ by the sampling
  # noise of the sorted projections, which falls as 1 / sqrt(descriptors).
  kwargs = dict(FAST_SWD, patches_per_image=128)
  same = metrics.sliced_wasserstein(a, b, **kwargs)
  assert metrics.sliced_wasserstein(a, b, **kwargs) == same   # deterministic
  assert metrics.sliced_wasserstein(a, b, seed=1, **kwargs) != same
  assert metrics.sliced_wasserstein(b, a, **kwargs)["swd_mean"] == pytest.approx(
      same["swd_mean"], rel=0.2)
  # Two samples of one distribution are clearly closer than a sample and a blurred one.
  blurred = metrics.sliced_wasserstein(a, _box_blur(b, 2), **kwargs)
  assert 0 < same["swd_mean"] < 0.75 * blurred["swd_mean"]


def test_swd_rejects_bad_inputs():
  images = np.zeros((4, 32, 32, 3), np.uint8)
  with pytest.raises(ValueError, match="image shapes differ"):
    metrics.sliced_wasserstein(images, np.zeros((4, 16, 16, 3), np.uint8))
  with pytest.raises(ValueError, match="image shapes differ"):
    metrics.sliced_wasserstein(images, np.zeros((4, 32, 32, 1), np.uint8))
  with pytest.raises(ValueError, match="at least 2 images"):
    metrics.sliced_wasserstein(images, images[:1])
  with pytest.raises(ValueError, match=r"\(N, H, W, C\)"):
    metrics.sliced_wasserstein(images[0], images[0])


def test_laplacian_pyramid_of_a_constant_image():
  image = np.full((2, 32, 32, 3), 7.0)
  pyramid = metrics.laplacian_pyramid(image, 3)
  assert [level.shape for level in pyramid] == [(2, 32, 32, 3), (2, 16, 16, 3), (2, 8, 8, 3)]
  np.testing.assert_allclose(pyramid[0], 0, atol=1e-12)
  np.testing.assert_allclose(pyramid[1], 0, atol=1e-12)
  np.testing.assert_allclose(pyramid[2], 7.0, rtol=1e-12)


def test_statistics_of_another_resolution_are_refused(tmp_path):
  path = tmp_path / "ref64.npz"
  metrics.save_statistics(path, np.zeros(4), np.eye(4), resolution=64)
  mu, _ = metrics.load_statistics(path, feature_dim=4, resolution=64)
  assert mu.shape == (4,)
  with pytest.raises(ValueError, match="statistics of 64 px images, but the model makes 32 px"):
    metrics.load_statistics(path, resolution=32)
