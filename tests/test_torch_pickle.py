"""Tests of the torch-archive reader (`patchdiff.weights.torch_pickle`) on archives written by the tests
(`torch_archive`, no torch): tensors, TorchScript objects, pytorch-fid's state-dict layout,
damaged files, malicious pickles, errors that name the file. (Hostile files that test the
reader's bounds: test_hostile.py.)"""
import collections
import lzma
import os
import pickle
import struct
import zipfile
import zlib

import numpy as np
import pytest

from patchdiff.weights import files, torch_pickle
from torch_archive import (LEGACY_MAGIC, SYS_INFO, Call, Reduce, Script, Tensor, dumps, records,
                           write_zip)


def _write(path, obj, prefix="archive"):
  write_zip(path, records(obj, prefix))
  return path


def test_torch_save_layout(tmp_path):
  storage = np.arange(24, dtype=np.float32)
  obj = {
      "w": np.arange(6, dtype=np.float32).reshape(2, 3),
      "h": np.array([0.5, -2.0], np.float16),
      "steps": np.array(7, np.int64),
      "mask": np.array([True, False, True]),
      # A transposed view with an offset: element [i, j] = storage[2 + i + 3 j].
      "view": Tensor(storage, 2, (3, 2), (1, 3), key="s"),
      "same_storage": Tensor(storage, 0, (24,), (1,), key="s"),
      "param": Call("torch._utils", "_rebuild_parameter",
                    (np.ones((2, 2), np.float32), True, Call("collections", "OrderedDict"))),
      "nested": [1, (2.5, "x"), {"k": None}],
      "empty": np.zeros((0, 3), np.float32),
  }
  path = _write(tmp_path / "model.pt", obj, prefix="model")
  for source in (path, path.read_bytes()):
    got = torch_pickle.read_archive(source)
    assert set(got) == set(obj)
    np.testing.assert_array_equal(got["w"], obj["w"])
    assert got["h"].dtype == np.float16 and got["h"].tolist() == [0.5, -2.0]
    assert got["steps"].dtype == np.int64 and got["steps"].shape == () and got["steps"] == 7
    assert got["mask"].dtype == np.bool_ and got["mask"].tolist() == [True, False, True]
    want = np.array([[2 + i + 3 * j for j in range(2)] for i in range(3)], np.float32)
    np.testing.assert_array_equal(got["view"], want)
    assert got["view"].flags.c_contiguous and got["view"].flags.owndata
    np.testing.assert_array_equal(got["same_storage"], storage)
    np.testing.assert_array_equal(got["param"], np.ones((2, 2)))
    assert got["nested"] == [1, (2.5, "x"), {"k": None}]
    assert got["empty"].shape == (0, 3)


def test_torchscript_layout_and_state_dict(tmp_path):
  conv = Script("__torch__.net.Conv", {
      "weight": np.ones((4, 3, 1, 1), np.float32), "training": False, "stride": 1,
      "padding": Call("torch.jit._pickle", "build_intlist", ([0, 3],))})
  root = Script("__torch__.wrap.Wrap", {"net": Script("__torch__.net.Net", {
      "layers": Script("__torch__.torch.nn.modules.container.___torch_mangle_9.Sequential",
                       {"conv": conv, "pool": Script("__torch__.x.MaxPool2d", {})})}),
      "training": False})
  recs = records(root, prefix="out_jit_module")
  recs["out_jit_module/code/__torch__/net.py"] = b"raise SystemExit('never read')\n"
  recs["out_jit_module/constants.pkl"] = pickle.dumps(())
  path = tmp_path / "scripted.pt"
  write_zip(path, recs)
  got = torch_pickle.read_archive(path)
  assert isinstance(got, torch_pickle.ScriptObject) and got.qualname == "__torch__.wrap.Wrap"
  layers = got["net"]["layers"]
  assert layers.qualname.endswith("___torch_mangle_9.Sequential")
  assert layers["conv"]["padding"] == [0, 3] and layers["conv"]["stride"] == 1
  assert layers["pool"].qualname == "__torch__.x.MaxPool2d"
  state = torch_pickle.state_dict(got)
  assert list(state) == ["net.layers.conv.weight"]
  np.testing.assert_array_equal(state["net.layers.conv.weight"], 1.0)
  assert list(torch_pickle.state_dict({"a": [np.zeros(1), {"b": np.ones(2)}]}, "p")) == [
      "p.a.0", "p.a.1.b"]


def _payloads(marker):
  """(name, data.pkl bytes, what the error names): each would create `marker` if it ran."""
  cmd = f"touch {marker}"
  return [
      ("os.system protocol 2", pickle.dumps(Reduce(os.system, cmd), protocol=2),
       f"{os.system.__module__}.system"),
      ("os.system protocol 4", pickle.dumps({"w": Reduce(os.system, cmd)}, protocol=4),
       f"{os.system.__module__}.system"),
      ("posix system", b"\x80\x02cposix\nsystem\nX" + len(cmd).to_bytes(4, "little")
       + cmd.encode() + b"\x85R.", "posix.system"),
      ("os system via INST", b"(S'" + cmd.encode() + b"'\nios\nsystem\n.", "os.system"),
      ("builtins eval", pickle.dumps(Reduce(eval, f"open({str(marker)!r}, 'w')"), protocol=2),
       ".eval"),
      ("builtins exec after a tensor", records({"w": np.zeros(2, np.float32),
                                                "x": Call("builtins", "exec",
                                                          (f"open({str(marker)!r}, 'w')",))}
                                               )["archive/data.pkl"], "builtins.exec"),
      ("unknown class", records(Call("torch.nn.modules.conv", "Conv2d", (3, 3, 1)))[
          "archive/data.pkl"], "torch.nn.modules.conv.Conv2d"),
      ("numpy reconstruct", pickle.dumps(np.zeros(2), protocol=2), "numpy"),
      ("a TorchScript class called with arguments",
       records(Call("__torch__.m", "M", (cmd,)))["archive/data.pkl"], "called with arguments"),
  ]


@pytest.mark.parametrize("index", range(9))
def test_malicious_pickles_are_refused_and_nothing_runs(tmp_path, index):
  marker = tmp_path / "pwned"
  name, pkl, named = _payloads(marker)[index]
  path = tmp_path / "evil.pt"
  write_zip(path, {"archive/data.pkl": pkl, "archive/data/0": np.zeros(2, np.float32).tobytes()})
  with pytest.raises(torch_pickle.TorchPickleError) as err:
    torch_pickle.read_archive(path)
  assert str(path) in str(err.value) and named in str(err.value), (name, str(err.value))
  with pytest.raises(torch_pickle.TorchPickleError):
    torch_pickle.unpickle(pkl, source="evil.pkl")
  assert not marker.exists(), name


def test_persistent_ids_are_checked(tmp_path):
  bad_pid = b"\x80\x02X\x04\x00\x00\x00evilQ."
  path = tmp_path / "pid.pt"
  write_zip(path, {"archive/data.pkl": bad_pid})
  with pytest.raises(torch_pickle.TorchPickleError, match="unrecognised persistent id"):
    torch_pickle.read_archive(path)
  plain = records({"w": np.zeros(2, np.float32)})["archive/data.pkl"]
  with pytest.raises(torch_pickle.TorchPickleError, match="outside a torch archive"):
    torch_pickle.unpickle(plain)


def test_damaged_archives(tmp_path):
  recs = records({"a": np.arange(10, dtype=np.float32), "b": np.ones((2, 3), np.float64)})
  path = tmp_path / "w.pt"
  write_zip(path, recs)
  assert set(torch_pickle.read_archive(path)) == {"a", "b"}
  full = path.read_bytes()
  for name, data in (("pickle", b"\x80\x02}q\x00."), ("half", full[:len(full) // 2])):
    bad = tmp_path / f"{name}.pt"
    bad.write_bytes(data)
    with pytest.raises(torch_pickle.TorchPickleError, match="not a torch zip archive") as err:
      torch_pickle.read_archive(bad)
    assert str(bad) in str(err.value)

  def check(recs, match):
    bad = tmp_path / "bad.pt"
    write_zip(bad, recs)
    with pytest.raises(torch_pickle.TorchPickleError, match=match) as err:
      torch_pickle.read_archive(bad)
    assert str(bad) in str(err.value)

  check({k: v for k, v in recs.items() if k != "archive/data/1"},
        "record archive/data/1 is missing")
  check({**recs, "archive/data/0": recs["archive/data/0"][:-4]},
        "storage archive/data/0 holds 36 bytes; its reference declares 40")
  check({k: v for k, v in recs.items() if k != "archive/data.pkl"}, "one <name>/data.pkl")
  check({**recs, "other/data.pkl": recs["archive/data.pkl"]}, "one <name>/data.pkl, found 2")
  check({**recs, "archive/data.pkl": recs["archive/data.pkl"][:-20]}, "not a readable pickle")
  check({**recs, "archive/byteorder": b"middle"}, "unknown byte order")
  check(records({"t": Tensor(np.zeros(6, np.float32), 2, (2, 3), (3, 1))}),
        "reaches element 7 of storage 0, which has 6")

  # A flipped byte inside a stored record: the zip's CRC-32 catches it.
  data = bytearray(full)
  at = data.find(recs["archive/data/1"])
  data[at + 5] ^= 0xFF
  bad = tmp_path / "crc.pt"
  bad.write_bytes(bytes(data))
  with pytest.raises(torch_pickle.TorchPickleError, match="archive/data/1 is damaged") as err:
    torch_pickle.read_archive(bad)
  assert str(bad) in str(err.value)


def test_big_endian_archive(tmp_path):
  recs = records({"a": np.arange(3, dtype=np.float32)})
  recs["archive/data/0"] = np.arange(3, dtype=">f4").tobytes()
  recs["archive/byteorder"] = b"big"
  path = tmp_path / "be.pt"
  write_zip(path, recs)
  got = torch_pickle.read_archive(path)["a"]
  assert got.dtype == np.float32 and got.tolist() == [0.0, 1.0, 2.0]


def test_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.pt"):
    torch_pickle.read_archive(tmp_path / "nope.pt")
  assert zipfile.is_zipfile(_write(tmp_path / "ok.pt", collections.OrderedDict(a=np.zeros(1))))


@pytest.mark.parametrize("module,name", [("torch._utils", "_rebuild_tensor_v2"),
                                         ("torch.nn.modules.container", "ModuleDict"),
                                         ("torch", "float32"), ("collections", "OrderedDict")])
def test_a_pickle_cannot_change_what_later_pickles_get(module, name):
  # BUILD with (None, {"__defaults__": ()}) on the global itself: setattr on it if it were allowed.
  pkl = (b"\x80\x02c" + module.encode() + b"\n" + name.encode() + b"\nN}X\x0c\x00\x00\x00"
         b"__defaults__)s\x86b.")
  rebuild = torch_pickle._rebuild_tensor_v2  # pylint: disable=protected-access
  defaults = rebuild.__defaults__
  with pytest.raises(torch_pickle.TorchPickleError):
    torch_pickle.unpickle(pkl)
  assert rebuild.__defaults__ == defaults


def _pytorch_fid_layout(arrays: dict) -> bytes:
  """A legacy `torch.save(model.state_dict())`, as pytorch-fid's `.pth` is: an OrderedDict of
  tensors whose `_metadata` attribute (an OrderedDict of {"version": 1} per module) BUILD sets."""
  body, storages = dumps(arrays, legacy=True)  # b"\x80\x02}" + SETITEMS + b"."
  od = b"ccollections\nOrderedDict\n)R"
  metadata = (b"}X\t\x00\x00\x00_metadata" + od + b"(X\x00\x00\x00\x00}X\x07\x00\x00\x00version"
              b"K\x01sX\x05\x00\x00\x00blockK\x01us")
  pkl = b"\x80\x02" + od + body[3:-1] + metadata + b"b."
  parts = [dumps(LEGACY_MAGIC)[0], dumps(1001)[0], dumps(SYS_INFO)[0], pkl,
           dumps(list(storages))[0]]
  for array in storages.values():
    parts += [struct.pack("<q", array.size), array.astype(array.dtype.newbyteorder("<")).tobytes()]
  return b"".join(parts)


def test_pytorch_fid_state_dict_layout_reads_exactly(tmp_path):
  arrays = {"Conv2d_1a_3x3.conv.weight": np.arange(54, dtype=np.float32).reshape(2, 3, 3, 3),
            "Conv2d_1a_3x3.bn.running_mean": np.array([0.5, -1.5], np.float32),
            "fc.bias": np.arange(3, dtype=np.float64)}
  path = tmp_path / "pt_inception.pth"
  path.write_bytes(_pytorch_fid_layout(arrays))
  graph = torch_pickle.read_file(path)
  assert isinstance(graph, dict) and not hasattr(graph, "__dict__")  # _metadata dropped
  got = files.read_state_dict(path)
  assert list(got) == list(arrays)
  for name, value in arrays.items():
    assert got[name].dtype == value.dtype and got[name].tobytes() == value.tobytes(), name


def test_ordered_dict_is_called_without_arguments():
  pkl = b"\x80\x02ccollections\nOrderedDict\n]X\x01\x00\x00\x00aK\x01\x86a\x85R."
  with pytest.raises(torch_pickle.TorchPickleError, match="od.pkl: .*OrderedDict is called with "
                     "arguments"):
    torch_pickle.unpickle(pkl, source="od.pkl")


def test_views_within_the_copy_budget_and_int_keys_read(tmp_path):
  storage = np.arange(12, dtype=np.float32)
  obj = {"w": Tensor(storage, 0, (3, 4), (4, 1), key="s"),
         "tied": Tensor(storage, 0, (3, 4), (4, 1), key="s"),  # a second full view
         "t": Tensor(storage, 0, (4, 3), (1, 4), key="s"),
         "optimizer": {"state": {0: {"step": 3}, 1: {"step": 3}}}}  # small int keys
  got = torch_pickle.read_archive(_write(tmp_path / "tied.pt", obj))
  np.testing.assert_array_equal(got["tied"], storage.reshape(3, 4))
  np.testing.assert_array_equal(got["t"], storage.reshape(3, 4).T)
  assert got["optimizer"]["state"][1] == {"step": 3}


@pytest.mark.parametrize("error", [RecursionError("maximum recursion depth exceeded"),
                                   MemoryError(), zlib.error("invalid distance too far back"),
                                   lzma.LZMAError("Corrupt input data"),
                                   RuntimeError("File 'x' is encrypted"), KeyError(("a", 1))])
def test_any_failure_while_reading_names_the_file(error):
  with pytest.raises(torch_pickle.TorchPickleError, match=r"^weights\.pt: ") as err:
    with torch_pickle.reading("weights.pt"):
      raise error
  assert "('a', 1)" not in str(err.value)  # no repr of what the file made
  with pytest.raises(FileNotFoundError):
    with torch_pickle.reading("weights.pt"):
      raise FileNotFoundError("weights.pt: no such file")
