"""Sample files: the streamed .npz that OpenAI's ADM evaluation suite and np.load read."""
import tracemalloc
import zipfile

import numpy as np
import pytest

from patchdiff import images_io


def test_streamed_npz_round_trip(tmp_path):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (7, 5, 4, 3), dtype=np.uint8)
  path = tmp_path / "out" / "samples.npz"
  w = images_io.NpzStream(str(path), "arr_0", images.shape, np.uint8)
  for start in (0, 3, 4):
    w.append(images[start:{0: 3, 3: 4, 4: 7}[start]])
  assert not path.exists()  # only complete files appear under their name
  w.close(arr_1=np.arange(7), seeds=np.arange(10, 17))
  with np.load(path) as data:
    assert data.files == ["arr_0", "arr_1", "seeds"]
    np.testing.assert_array_equal(data["arr_0"], images)
    assert data["arr_0"].dtype == np.uint8
    np.testing.assert_array_equal(data["arr_1"], np.arange(7))
    np.testing.assert_array_equal(data["seeds"], np.arange(10, 17))
  with zipfile.ZipFile(path) as z:  # stored, as np.savez writes: readable without inflating
    assert {i.compress_type for i in z.infolist()} == {zipfile.ZIP_STORED}
  assert not (tmp_path / "out" / "samples.npz.partial").exists()


def test_streamed_npz_refuses_missing_or_extra_rows_and_leaves_no_file(tmp_path):
  path = tmp_path / "samples.npz"
  w = images_io.NpzStream(str(path), "arr_0", (4, 2, 2, 3), np.uint8)
  w.append(np.zeros((3, 2, 2, 3), np.uint8))
  with pytest.raises(ValueError, match=r"samples.npz: arr_0 got 3 of 4 rows"):
    w.close()
  assert list(tmp_path.iterdir()) == []
  w = images_io.NpzStream(str(path), "arr_0", (4, 2, 2, 3), np.uint8)
  with pytest.raises(ValueError, match=r"rows of shape \(5, 2, 2, 3\) do not fit arr_0"):
    w.append(np.zeros((5, 2, 2, 3), np.uint8))
  assert list(tmp_path.iterdir()) == []
  with pytest.raises(RuntimeError, match="stopped"):  # an interrupted run: no partial file
    with images_io.NpzStream(str(path), "arr_0", (4, 2, 2, 3), np.uint8) as w:
      w.append(np.zeros((2, 2, 2, 3), np.uint8))
      raise RuntimeError("stopped")
  assert list(tmp_path.iterdir()) == []


def test_streamed_npz_memory_is_one_batch(tmp_path):
  """64 MiB of samples in 1 MiB batches: Python's allocations peak near one batch, not the file."""
  batch = np.ones((64, 64, 64, 4), np.uint8)  # 1 MiB
  w = images_io.NpzStream(str(tmp_path / "big.npz"), "arr_0", (64 * 64, 64, 64, 4), np.uint8)
  tracemalloc.start()
  for _ in range(64):
    w.append(batch)
  w.close(seeds=np.arange(64 * 64))
  _, peak = tracemalloc.get_traced_memory()
  tracemalloc.stop()
  assert peak < 4 * batch.nbytes, peak
  assert (tmp_path / "big.npz").stat().st_size > 64 * batch.nbytes
  with np.load(tmp_path / "big.npz") as data:
    assert data["arr_0"].shape == (4096, 64, 64, 4) and int(data["arr_0"][-1].min()) == 1


def test_pixels_go_to_the_network_range_and_back_exactly():
  """What the step feeds the network for pixel v (`train_step.model_images`) is written back as
  v by `to_uint8`, for every v; uint8 batches pass through `to_uint8` as they are."""
  from patchdiff import train_step  # pylint: disable=import-outside-toplevel
  pixels = np.arange(256, dtype=np.uint8)
  unit = np.asarray(train_step.model_images(pixels))
  assert unit.dtype == np.float32 and unit[0] == -1.0 and unit[-1] == 1.0
  np.testing.assert_array_equal(images_io.to_uint8(unit), pixels)
  assert images_io.to_uint8(pixels) is pixels
