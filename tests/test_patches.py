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


def _official_loop(sizes, probs, resolution, batch, total_kimg, progressive, start_nimg=0):
  """The official training loop's count, step by step, as its code reads: a progressive step
  takes the first bucket with (cur_nimg // 1000) / total_kimg <= its cumulative probability (the
  last without bound); the step adds int(batch * batch_mul_avg) images (the schedule's mean
  batch_mul, or the progressive bucket's own); the loop stops once cur_nimg >= total_kimg * 1000.
  Returns [(size or None, cur_nimg before the step)]."""
  muls = np.asarray([resolution // s for s in sizes])
  avg = np.sum(np.asarray(probs) * muls)
  edges = np.cumsum(probs)
  edges[-1] = 10.0
  nimg, out = start_nimg, []
  while nimg < total_kimg * 1000:
    size = None
    if progressive:
      size = int(np.asarray(sizes)[(nimg // 1000 / total_kimg) <= edges][0])
      avg = resolution // size
    out.append((size, nimg))
    nimg += int(batch * avg)
  return out, nimg


@pytest.mark.parametrize("start_nimg", [0, 2345])
def test_progressive_schedule_follows_the_official_loop(start_nimg):
  probs = (0.2, 0.3, 0.5)
  sched = patches.PatchSchedule((16, 32, 64), probs, 64, kind="progressive", batch_size=24,
                                total_kimg=30, start_nimg=start_nimg)
  official, end = _official_loop((16, 32, 64), probs, 64, 24, 30, True, start_nimg)
  steps = np.arange(len(official) + 1)
  sizes = sched.sizes_at(steps)
  assert list(sizes[:-1]) == [s for s, _ in official] and sizes[-1] == 64
  np.testing.assert_array_equal(sched.nimg_before(steps), [n for _, n in official] + [end])
  assert sched.nimg_before(steps).dtype == np.int64
  assert sched.steps_for(30_000) == len(official)
  # The images, not the steps, are split about 20/30/50 (to the kimg the rule reads).
  for size, share in zip((16, 32, 64), probs):
    counted = sum(sched.step_images(size) for s in sizes[:-1] if s == size)
    assert abs(counted - share * (30_000 - start_nimg)) <= 2000
  # Without a duration, the buckets split the images of total_steps steps.
  by_steps = patches.PatchSchedule((16, 32, 64), probs, 64, kind="progressive", total_steps=1000,
                                   batch_size=256)
  sizes = by_steps.sizes_at(np.arange(1000))
  assert [int((sizes == s).sum()) for s in (16, 32, 64)] == pytest.approx([72, 214, 714], abs=2)
  with pytest.raises(ValueError, match="total_steps or total_kimg"):
    patches.PatchSchedule((16, 32, 64), probs, 64, kind="progressive")


def test_stochastic_schedule_counts_whole_images_as_the_official_loop():
  """int(256 x 1.9) = 486 images a step at p = 0.5, not 486.4: 4,860 in 10 steps; the EMA's
  exponent keeps the untruncated 486.4."""
  sched = patches.PatchSchedule((16, 32, 64), patches.default_patch_probs(0.5, 3), 64,
                                batch_size=256)
  assert sched.step_images(16) == sched.step_images(64) == 486
  assert sched.ema_images(32) == 256 * sched.mean_batch_mul == pytest.approx(486.4)
  np.testing.assert_array_equal(sched.nimg_before([0, 1, 10]), [0, 486, 4860])
  official, _ = _official_loop((16, 32, 64), sched.probs, 64, 256, 5, False)
  np.testing.assert_array_equal(sched.nimg_before(np.arange(len(official))),
                                [n for _, n in official])
  assert sched.steps_for(5000) == len(official) == 11
  resumed = patches.PatchSchedule((16, 32, 64), sched.probs, 64, batch_size=256, start_nimg=1000)
  assert resumed.nimg_before([0, 2]).tolist() == [1000, 1972] and resumed.steps_for(1000) == 0


def test_a_2500_mimg_run_counts_whole_images_to_its_last_step():
  """ImageNet's 2,500 Mimg at batch 4096 (latents, 6,144 images a step): the count is exact, in
  int64, to its last step (float32's spacing is 256 images at 2.5e9)."""
  sched = patches.PatchSchedule((16, 32), patches.default_patch_probs(0.5, 2), 32,
                                batch_size=4096)
  per = sched.step_images(16)
  assert per == 6144
  steps = sched.steps_for(2_500_000_000)
  last = sched.nimg_before([steps - 2, steps - 1, steps])
  assert last.tolist() == [(steps - 2) * per, (steps - 1) * per, steps * per]
  assert last[1] < 2_500_000_000 <= last[2] and np.diff(last).tolist() == [per, per]
  assert last.dtype == np.int64


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
