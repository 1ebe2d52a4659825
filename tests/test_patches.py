"""Patch geometry: coordinates, batch multipliers, schedules, counter hashes."""
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from patchdiff import patches


def test_coordinates_at_corners_and_centre():
  r = 64
  pos = patches.coord_grid(np.array([0]), np.array([0]), r, r)[0]
  assert pos.shape == (64, 64, 2)
  np.testing.assert_allclose(pos[0, 0], [-1, -1])        # [x, y] at the top-left
  np.testing.assert_allclose(pos[0, -1], [1, -1])        # top-right: x (column) = 1
  np.testing.assert_allclose(pos[-1, 0], [-1, 1])        # bottom-left: y (row) = 1
  np.testing.assert_allclose(pos[-1, -1], [1, 1])
  # Centre between pixels 31 and 32: (31.5 / 63 - 0.5) * 2 = 0.
  np.testing.assert_allclose((pos[31, 31] + pos[32, 32]) / 2, [0, 0], atol=1e-7)
  np.testing.assert_allclose(pos[5, 9], [(9 / 63 - 0.5) * 2, (5 / 63 - 0.5) * 2], rtol=1e-6)


def test_patch_coordinates_are_the_full_grid_cropped():
  full = patches.coord_grid(np.array([0]), np.array([0]), 32, 32)[0]
  crop = patches.coord_grid(np.array([5, 16]), np.array([11, 0]), 16, 32)
  np.testing.assert_array_equal(crop[0], full[5:21, 11:27])
  np.testing.assert_array_equal(crop[1], full[16:32, 0:16])


def test_batch_mul_rule_matches_official_table():
  table = {512: 1, 256: 2, 128: 4, 64: 16, 32: 32, 16: 64}
  for r, sizes in ((64, (16, 32, 64)), (32, (16, 32))):
    for s in sizes:
      assert patches.batch_mul(s, r) == table[s] // table[r]
  sched = patches.PatchSchedule((16, 32, 64), patches.default_patch_probs(0.5, 3), 64)
  assert sched.mean_batch_mul == pytest.approx(1.9)
  with pytest.raises(ValueError, match="does not divide"):
    patches.batch_mul(24, 64)


def test_stochastic_schedule_probabilities_over_10000_steps():
  probs = patches.default_patch_probs(0.5, 3)
  np.testing.assert_allclose(probs, [0.2, 0.3, 0.5])
  sched = patches.PatchSchedule((16, 32, 64), probs, 64, seed=7)
  sizes = sched.sizes_at(np.arange(10000))
  for s, p in zip((16, 32, 64), probs):
    assert abs(np.mean(sizes == s) - p) < 0.02
  assert sched.size_at(1234) == sizes[1234]
  other = patches.PatchSchedule((16, 32, 64), probs, 64, seed=8).sizes_at(np.arange(10000))
  assert np.mean(other != sizes) > 0.4


def test_schedule_is_identical_in_another_process():
  code = ("import numpy as np; from patchdiff import patches;"
          "s = patches.PatchSchedule((16, 32, 64), (0.2, 0.3, 0.5), 64, seed=3);"
          "print(','.join(map(str, s.sizes_at(np.arange(500)))))")
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       check=True).stdout.strip()
  here = patches.PatchSchedule((16, 32, 64), (0.2, 0.3, 0.5), 64, seed=3).sizes_at(np.arange(500))
  assert out == ",".join(map(str, here))


def _official_progressive(sizes, probs, resolution, total_batches):
  """The official training loop's progressive walk, step by step: a step takes the first bucket
  whose cumulative probability is >= the fraction of images counted so far, and counts its own
  batch_mul; training ends once the count reaches the total."""
  edges = np.cumsum(probs)
  edges[-1] = 10.0
  count, out = 0.0, []
  while count < total_batches:
    size = sizes[int(np.argmax(count / total_batches <= edges))]
    out.append((size, count))
    count += resolution // size
  return out


def test_progressive_schedule_follows_the_official_loop():
  probs = (0.2, 0.3, 0.5)
  sched = patches.PatchSchedule((16, 32, 64), probs, 64, kind="progressive", total_steps=1000)
  sizes = sched.sizes_at(np.arange(1000))
  # The images, not the steps, are split 20/30/50: 72 steps of 4 batches, 214 of 2, 714 of 1.
  assert [int((sizes == s).sum()) for s in (16, 32, 64)] == [72, 214, 714]
  assert np.all(np.diff(sizes) >= 0) and sched.size_at(5000) == 64
  counts = sched.counted_before(np.arange(1000))
  official = _official_progressive((16, 32, 64), probs, 64, 1000 / (0.2 / 4 + 0.3 / 2 + 0.5))
  # The official loop stops once the count reaches its total (999 steps here); the schedule's
  # length is total_steps, and the last bucket takes the step left over.
  assert len(official) == 999 and [s for s, _ in official] == list(sizes[:999])
  np.testing.assert_allclose(counts[:999], [c for _, c in official])
  # Each bucket's program counts its own batch_mul, on a line through the bucket's steps.
  for size in (16, 32, 64):
    a, c = sched.count_line(size)
    steps = np.flatnonzero(sizes == size)
    assert c == 64 // size
    np.testing.assert_allclose(a + c * steps, counts[steps])
  assert sched.steps_for(float(counts[-1]) + 1) == 1001
  with pytest.raises(ValueError, match="total_steps"):
    patches.PatchSchedule((16, 32, 64), probs, 64, kind="progressive")


def test_stochastic_schedule_counts_the_mean_batch_mul_every_step():
  sched = patches.PatchSchedule((16, 32, 64), (0.2, 0.3, 0.5), 64)
  np.testing.assert_allclose(sched.counted_before([0, 10]), [0.0, 19.0])
  assert sched.count_line(16) == sched.count_line(64) == (0.0, pytest.approx(1.9))
  assert sched.steps_for(19.0) == 10 and sched.steps_for(19.1) == 11


def test_p_one_is_the_edm_baseline_and_p_zero_never_sees_full_images():
  full = patches.PatchSchedule((16, 32, 64), patches.default_patch_probs(1.0, 3), 64)
  assert full.active_sizes == (64,) and set(full.sizes_at(np.arange(1000))) == {64}
  none = patches.PatchSchedule((16, 32, 64), patches.default_patch_probs(0.0, 3), 64)
  assert none.active_sizes == (16, 32) and 64 not in set(none.sizes_at(np.arange(1000)))


def test_latent_defaults():
  assert patches.default_patch_sizes(32, latent=True) == (16, 32)
  assert patches.default_patch_probs(0.5, 2) == (0.5, 0.5)
  with pytest.raises(ValueError, match="not divisible by 4"):
    patches.default_patch_sizes(66)


def test_patch_sizes_must_survive_downsampling():
  patches.check_patch_sizes((16, 32, 64), 4, 64)
  with pytest.raises(ValueError, match="patch size 4 is not divisible by 8"):
    patches.check_patch_sizes((4, 32, 64), 4, 64)


def test_uniform_counter_is_uniform_and_pure():
  u = patches.uniform_from_counter(1, np.arange(100000))
  assert 0 <= u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.005
  np.testing.assert_array_equal(u[10:20], patches.uniform_from_counter(1, np.arange(10, 20)))
