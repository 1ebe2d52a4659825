"""Image-quality metrics in numpy: Frechet distance, KID and multi-scale sliced Wasserstein.

The Frechet distance and KID take features from some feature extractor (e.g. Inception-v3's
2048-d pool features, as EDM and StyleGAN3 use); this module does not compute those features.
Reference statistics are stored as EDM stores them: an `.npz` with keys `mu` and `sigma`.

The sliced Wasserstein distance (SWD) works on the pixels themselves, following Karras et al.
2018, "Progressive Growing of GANs for Improved Quality, Stability, and Variation", appendix D.
"""
from __future__ import annotations

import os

import numpy as np

# 5-tap binomial kernel, the separable factor of the 5x5 Gaussian of the Laplacian pyramid.
_BINOMIAL5 = np.array([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0
# Projected values per set held at once by the sliced Wasserstein distance.
_SWD_CHUNK = 1 << 24


# ----------------------------------------------------------------------------------------------
# Gaussian statistics and the Frechet distance.


def _check_statistics(mu, sigma, what: str) -> tuple[np.ndarray, np.ndarray]:
  """Returns (mu, sigma) as float64 after checking mu is (D,) and sigma is (D, D)."""
  mu = np.asarray(mu, np.float64)
  sigma = np.asarray(sigma, np.float64)
  if mu.ndim != 1:
    raise ValueError(f"{what}: mu must be 1-D, got shape {mu.shape}")
  if sigma.shape != (mu.shape[0], mu.shape[0]):
    raise ValueError(f"{what}: sigma must have shape {(mu.shape[0], mu.shape[0])} to match mu "
                     f"of shape {mu.shape}, got {sigma.shape}")
  return mu, sigma


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
  """Symmetric square root of a symmetric PSD matrix; negative eigenvalues (round-off) -> 0."""
  w, v = np.linalg.eigh((sigma + sigma.T) / 2)
  return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """Frechet (2-Wasserstein squared) distance between N(mu1, sigma1) and N(mu2, sigma2).

  Computes |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2}) in float64, the FID formula
  when the statistics are those of Inception features.

  tr((S1 S2)^{1/2}) is computed without a general matrix square root: S1 S2 is similar to
  S1^{1/2} S2 S1^{1/2} = A A^T with A = S1^{1/2} S2^{1/2}, so its square root's eigenvalues are
  the singular values of A and the trace is their sum. The symmetric square roots come from
  eigendecompositions, with round-off negative eigenvalues clipped at 0, so singular
  (rank-deficient) covariances need no regularising offset. The covariances are symmetrised.

  Args:
    mu1, mu2: (D,) means.
    sigma1, sigma2: (D, D) symmetric positive semi-definite covariances.

  Returns:
    The distance as a Python float (>= 0 up to round-off).

  Raises:
    ValueError: if a mean is not 1-D, a covariance is not (D, D) for its mean's D, or the two
      distributions have different feature sizes.
  """
  mu1, sigma1 = _check_statistics(mu1, sigma1, "first distribution")
  mu2, sigma2 = _check_statistics(mu2, sigma2, "second distribution")
  if mu1.shape != mu2.shape:
    raise ValueError(f"feature sizes differ: mu1 has shape {mu1.shape}, mu2 has shape {mu2.shape}")
  diff = mu1 - mu2
  a = _psd_sqrt(sigma1) @ _psd_sqrt(sigma2)
  tr_covmean = np.linalg.svd(a, compute_uv=False).sum()
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
  """Mean and covariance (float64) of the rows of an (N, D) feature array.

  The covariance is the unbiased one (divides by N - 1), as numpy.cov(features, rowvar=False).

  Raises:
    ValueError: if features is not 2-D or has fewer than 2 rows.
  """
  x = np.asarray(features, np.float64)
  if x.ndim != 2:
    raise ValueError(f"features must be (N, D), got shape {x.shape}")
  if x.shape[0] < 2:
    raise ValueError(f"need at least 2 feature vectors for a covariance, got shape {x.shape}")
  mu = x.mean(axis=0)
  centred = x - mu
  sigma = centred.T @ centred / (x.shape[0] - 1)
  return mu, sigma


def save_statistics(path: str | os.PathLike, mu, sigma, resolution: int | None = None,
                    source: str | None = None) -> None:
  """Writes (mu, sigma) to `path` as an .npz with keys `mu` and `sigma` (EDM's format), plus
  the image `resolution` and a `source` text (what the statistics were made from) when given
  (extra keys EDM's readers ignore).

  The file is written at exactly `path` (numpy.savez would append `.npz` to other names); the
  arrays keep their dtype.
  """
  mu_arr, sigma_arr = np.asarray(mu), np.asarray(sigma)
  _check_statistics(mu_arr, sigma_arr, os.fspath(path))
  extra = {} if resolution is None else {"resolution": np.asarray(int(resolution))}
  if source is not None:
    extra["source"] = np.asarray(str(source))
  with open(path, "wb") as f:
    np.savez(f, mu=mu_arr, sigma=sigma_arr, **extra)


def statistics_source(path: str | os.PathLike) -> str | None:
  """The `source` text that save_statistics recorded in `path`, None where it recorded none."""
  with np.load(path, allow_pickle=False) as data:
    return str(data["source"]) if "source" in data.files else None


def load_statistics(path: str | os.PathLike, feature_dim: int | None = None,
                    resolution: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Reads (mu, sigma) as float64 from an .npz with keys `mu` and `sigma` (EDM's format).

  Args:
    path: the .npz file, e.g. one of EDM's reference statistics (fid-refs/*.npz).
    feature_dim: if given, the feature size the statistics must have (2048 for Inception).
    resolution: if given and the file records one (files written by save_statistics with a
      resolution), the image resolution the statistics must come from.

  Raises:
    ValueError (naming the file): if the file is not an .npz archive, lacks a key, holds
      inconsistent shapes, or has another feature size than feature_dim.
  """
  name = os.fspath(path)
  data = np.load(path, allow_pickle=False)
  if not isinstance(data, np.lib.npyio.NpzFile):
    raise ValueError(f"{name} is not an .npz archive with keys 'mu' and 'sigma'")
  with data:
    missing = [k for k in ("mu", "sigma") if k not in data.files]
    if missing:
      raise ValueError(f"{name} lacks key(s) {missing}; it has {sorted(data.files)}, "
                       "expected 'mu' and 'sigma'")
    mu, sigma = data["mu"], data["sigma"]
    saved_res = int(data["resolution"]) if "resolution" in data.files else None
  if resolution is not None and saved_res is not None and saved_res != resolution:
    raise ValueError(f"{name} holds statistics of {saved_res} px images, but the model makes "
                     f"{resolution} px images")
  mu, sigma = _check_statistics(mu, sigma, name)
  if feature_dim is not None and mu.shape[0] != feature_dim:
    raise ValueError(f"{name} has {mu.shape[0]}-d features, expected {feature_dim}")
  return mu, sigma


# ----------------------------------------------------------------------------------------------
# Kernel inception distance.


def kernel_inception_distance(feat1, feat2, num_subsets: int = 100, max_subset_size: int = 1000,
                              seed: int = 0) -> float:
  """Kernel inception distance: an unbiased estimate of the squared MMD between two feature sets.

  Uses the cubic polynomial kernel k(x, y) = (x.y / D + 1)^3 of Binkowski et al. 2018 and, as
  StyleGAN3's metric does, averages the unbiased MMD^2 estimate

    1/(m(m-1)) sum_{i!=j} [k(x_i, x_j) + k(y_i, y_j)] - 2/m^2 sum_{i,j} k(x_i, y_j)

  over `num_subsets` pairs of subsets of size m = min(N1, N2, max_subset_size), each drawn
  without replacement from its set. Computed in float64; deterministic given `seed`.

  Args:
    feat1, feat2: (N1, D) and (N2, D) feature arrays.
    num_subsets: how many subset pairs to average over.
    max_subset_size: the largest subset size.
    seed: seed of the numpy Generator drawing the subsets.

  Returns:
    The KID estimate as a Python float (can be slightly negative: the estimate is unbiased).

  Raises:
    ValueError: for arrays that are not 2-D, different feature sizes, m < 2 or num_subsets < 1.
  """
  x_all = np.asarray(feat1, np.float64)
  y_all = np.asarray(feat2, np.float64)
  if x_all.ndim != 2 or y_all.ndim != 2 or x_all.shape[1] != y_all.shape[1]:
    raise ValueError(f"need (N, D) feature arrays of the same D, got {x_all.shape} and "
                     f"{y_all.shape}")
  m = min(x_all.shape[0], y_all.shape[0], max_subset_size)
  if m < 2:
    raise ValueError(f"need subsets of at least 2 features, got m = {m} from {x_all.shape}, "
                     f"{y_all.shape} and max_subset_size={max_subset_size}")
  if num_subsets < 1:
    raise ValueError(f"num_subsets must be >= 1, got {num_subsets}")
  d = x_all.shape[1]

  def kernel(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    k = u @ v.T
    k /= d
    k += 1.0
    cube = k * k
    cube *= k
    return cube

  rng = np.random.default_rng(seed)
  total = 0.0
  for _ in range(num_subsets):
    x = x_all[rng.choice(x_all.shape[0], m, replace=False)]
    y = y_all[rng.choice(y_all.shape[0], m, replace=False)]
    kxx, kyy = kernel(x, x), kernel(y, y)
    within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    total += within - 2.0 * kernel(x, y).sum() / (m * m)
  return float(total / num_subsets)


# ----------------------------------------------------------------------------------------------
# Multi-scale sliced Wasserstein distance.


def _blur_axis(x: np.ndarray, axis: int) -> np.ndarray:
  """Convolves x with the 5-tap binomial kernel along `axis`, reflecting at the borders."""
  n = x.shape[axis]
  pad = [(0, 0)] * x.ndim
  pad[axis] = (2, 2)
  # "reflect" mirrors about the edge pixel without repeating it; it needs n >= 3.
  xp = np.pad(x, pad, mode="reflect" if n >= 3 else "edge")
  out = np.zeros_like(x)
  for k, weight in enumerate(_BINOMIAL5):
    out += weight * np.take(xp, np.arange(k, k + n), axis=axis)
  return out


def _blur(x: np.ndarray) -> np.ndarray:
  """Separable 5x5 binomial (Gaussian) blur of (N, H, W, C) images."""
  return _blur_axis(_blur_axis(x, 1), 2)


def _pyr_down(x: np.ndarray) -> np.ndarray:
  """Blur, then keep every other row and column: (N, H, W, C) -> (N, ceil(H/2), ceil(W/2), C)."""
  return _blur(x)[:, ::2, ::2]


def _pyr_up(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """Upsamples by 2 to `shape`: zeros between the samples, then the blur times 4."""
  up = np.zeros((x.shape[0], 2 * x.shape[1], 2 * x.shape[2], x.shape[3]), x.dtype)
  up[:, ::2, ::2] = x
  return 4.0 * _blur(up)[:, :shape[1], :shape[2]]


def laplacian_pyramid(images: np.ndarray, num_levels: int) -> list[np.ndarray]:
  """Laplacian pyramid of (N, H, W, C) images, finest level first, as float64.

  Level i (i < num_levels - 1) is G_i - up(G_{i+1}), where G_0 is the images and
  G_{i+1} = down(G_i); the last level is the Gaussian level G_{num_levels - 1} itself.
  """
  gauss = np.asarray(images, np.float64)
  pyramid = []
  for _ in range(num_levels - 1):
    coarser = _pyr_down(gauss)
    pyramid.append(gauss - _pyr_up(coarser, gauss.shape))
    gauss = coarser
  pyramid.append(gauss)
  return pyramid


def _sample_patches(level: np.ndarray, rows: np.ndarray, cols: np.ndarray,
                    patch_size: int) -> np.ndarray:
  """(N, H, W, C) level, (N, P) top-left corners -> (N * P, patch_size, patch_size, C)."""
  offsets = np.arange(patch_size)
  n = level.shape[0]
  img = np.arange(n)[:, None, None, None]
  r = rows[:, :, None, None] + offsets[None, None, :, None]
  c = cols[:, :, None, None] + offsets[None, None, None, :]
  patches = level[img, r, c]                               # (N, P, ps, ps, C)
  return patches.reshape(-1, patch_size, patch_size, level.shape[-1])


def _normalise(desc: np.ndarray) -> np.ndarray:
  """Per channel: subtract the mean and divide by the std over all descriptors and positions.

  (M, ps, ps, C) float32 -> (M, ps * ps * C) float32; the mean and std are accumulated in
  float64. A constant channel (std 0) is only centred.
  """
  mean = desc.mean(axis=(0, 1, 2), dtype=np.float64)
  std = np.sqrt(np.mean(np.square(desc - mean.astype(np.float32), dtype=np.float64),
                        axis=(0, 1, 2)))
  std = np.where(std > 0, std, 1.0)
  out = desc - mean.astype(np.float32)
  out /= std.astype(np.float32)
  return out.reshape(desc.shape[0], -1)


def _sliced_wasserstein_1d(a: np.ndarray, b: np.ndarray, num_projections: int, repeats: int,
                           rng: np.random.Generator) -> float:
  """Mean over repeats of the mean |sorted(a @ u) - sorted(b @ u)| over random unit vectors u."""
  m, dim = a.shape
  chunk = max(1, _SWD_CHUNK // m)    # projections per matmul, to bound memory
  results = []
  for _ in range(repeats):
    dirs = rng.standard_normal((num_projections, dim))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    dirs = dirs.astype(np.float32)
    total = 0.0
    for start in range(0, num_projections, chunk):
      d = dirs[start:start + chunk]
      pa = d @ a.T                                         # (chunk, M): one row per direction
      pb = d @ b.T
      pa.sort(axis=1)
      pb.sort(axis=1)
      pa -= pb
      np.abs(pa, out=pa)
      total += pa.sum(dtype=np.float64)
    results.append(total / (num_projections * m))
  return float(np.mean(results))


def sliced_wasserstein(images_a, images_b, *, patches_per_image: int = 128, patch_size: int = 7,
                       num_projections: int = 512, repeats: int = 4, min_resolution: int = 16,
                       seed: int = 0) -> dict[str, float]:
  """Multi-scale sliced Wasserstein distance (SWD) of Karras et al. 2018 between two image sets.

  Each image set is decomposed into a Laplacian pyramid (5-tap binomial blur, factor-2 steps)
  from the full resolution down to `min_resolution` (clipped to the image size). From every
  level, `patches_per_image` random patch_size x patch_size neighbourhoods per image become
  descriptors, normalised per channel by their set's mean and std at that level. The distance
  between the two descriptor sets is the sliced Wasserstein distance: the mean absolute
  difference of the sorted projections onto `num_projections` random unit directions, averaged
  over `repeats` draws of directions. Values are reported times 1e3, as in the paper.

  The patch positions for image k at a level are the same in both sets, and when the sets differ
  in size the larger set's descriptors are subsampled (without replacement) to the smaller
  set's count; all draws come from numpy Generators seeded by (seed, level), so the result is
  deterministic given `seed` and identical sets give exactly 0. The pyramid is computed in
  float64; descriptors, projections and sorting are float32 (the normalisation's mean and std
  and the sums of differences accumulate in float64).

  Args:
    images_a, images_b: (N, H, W, C) uint8 or float images; same H, W, C (N may differ).
    patches_per_image: neighbourhoods per image and level (128 in the paper).
    patch_size: side of the neighbourhoods (7 in the paper).
    num_projections: random directions per repeat (512 in the paper).
    repeats: independent draws of directions (4 in the paper).
    min_resolution: the coarsest pyramid level's height (16 in the paper).
    seed: seed of the patch positions, subsampling and directions.

  Returns:
    {"swd_{res}px": SWD * 1e3 for each level, named by its height, finest first,
     "swd_mean": the mean over the levels}.

  Raises:
    ValueError: for arrays that are not (N, H, W, C), mismatched image shapes, fewer than 2
      images in a set, or a level smaller than patch_size.
  """
  a = np.asarray(images_a)
  b = np.asarray(images_b)
  if a.ndim != 4 or b.ndim != 4:
    raise ValueError(f"need (N, H, W, C) image arrays, got shapes {a.shape} and {b.shape}")
  if a.shape[1:] != b.shape[1:]:
    raise ValueError(f"image shapes differ: {a.shape[1:]} vs {b.shape[1:]} (from {a.shape} and "
                     f"{b.shape})")
  if a.shape[0] < 2 or b.shape[0] < 2:
    raise ValueError(f"need at least 2 images per set, got shapes {a.shape} and {b.shape}")
  if min(patches_per_image, patch_size, num_projections, repeats, min_resolution) < 1:
    raise ValueError("patches_per_image, patch_size, num_projections, repeats and "
                     "min_resolution must be >= 1")
  h, w = a.shape[1:3]
  min_resolution = min(min_resolution, h, w)
  num_levels = 1
  while -(-h // 2 ** num_levels) >= min_resolution and -(-w // 2 ** num_levels) >= min_resolution:
    num_levels += 1
  pyr_a = laplacian_pyramid(a, num_levels)
  pyr_b = laplacian_pyramid(b, num_levels)

  na, nb = a.shape[0], b.shape[0]
  n_max, m = max(na, nb), min(na, nb) * patches_per_image
  result = {}
  for level, (la, lb) in enumerate(zip(pyr_a, pyr_b)):
    lh, lw = la.shape[1:3]
    if lh < patch_size or lw < patch_size:
      raise ValueError(f"pyramid level {level} is {lh}x{lw}, smaller than patch_size="
                       f"{patch_size}; raise min_resolution")
    rng = np.random.default_rng((seed, level))
    rows = rng.integers(0, lh - patch_size + 1, size=(n_max, patches_per_image))
    cols = rng.integers(0, lw - patch_size + 1, size=(n_max, patches_per_image))
    desc_a = _sample_patches(la.astype(np.float32), rows[:na], cols[:na], patch_size)
    desc_b = _sample_patches(lb.astype(np.float32), rows[:nb], cols[:nb], patch_size)
    if desc_a.shape[0] > m:
      desc_a = desc_a[np.sort(rng.choice(desc_a.shape[0], m, replace=False))]
    if desc_b.shape[0] > m:
      desc_b = desc_b[np.sort(rng.choice(desc_b.shape[0], m, replace=False))]
    swd = _sliced_wasserstein_1d(_normalise(desc_a), _normalise(desc_b), num_projections,
                                 repeats, rng)
    result[f"swd_{lh}px"] = swd * 1e3
  result["swd_mean"] = float(np.mean(list(result.values())))
  return result
