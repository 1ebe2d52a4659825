"""Official `network-snapshot-*.pkl` files (EDM / Patch Diffusion training): read without torch and
without running anything from the file (`torch_pickle.read_file`, `files.read_snapshot`,
`convert.read_state_dict`); hand-made snapshots (`torch_archive`) for shared storages, the
legacy `torch.save` format, malicious and damaged files."""
import os
import pickle

import numpy as np
import jax.numpy as jnp
import pytest

from conftest import DDPMPP_TINY
from patchdiff import convert
from patchdiff.nn import edm
from patchdiff.weights import torch_pickle
from test_networks import nhwc, rel_l2
from torch_archive import (Call, Global, Reduce, LEGACY_MAGIC, Script, Shared, Storage, Tensor, View, dumps,
                           legacy_save, records, write_zip)

SNAPSHOTS = {"ddpmpp_tiny": "Patch_EDMPrecond", "adm_tiny_cond": "Patch_EDMPrecond",
             "edm_ddpmpp_tiny": "EDMPrecond"}
OrderedDict = Call("collections", "OrderedDict")


@pytest.mark.parametrize("name", sorted(SNAPSHOTS))
def test_snapshot_reads_to_the_official_weights(reference, name):
  parity = reference / "parity"
  got = convert.read_state_dict(parity / f"{name}_snapshot.pkl")
  with np.load(parity / f"{name}_weights.npz") as f:
    assert list(got) == f.files  # the names of torch's state_dict, in its order
    for key in f.files:
      assert got[key].dtype == f[key].dtype and got[key].shape == f[key].shape, key
      assert got[key].tobytes() == f[key].tobytes(), key


@pytest.mark.parametrize("name", sorted(SNAPSHOTS))
def test_read_snapshot_info(reference, name):
  _, info = convert.read_snapshot(reference / "parity" / f"{name}_snapshot.pkl")
  adm = name.startswith("adm")
  assert info["class_name"] == SNAPSHOTS[name]
  assert info["model_class"] == ("DhariwalUNet" if adm else "SongUNet")
  attrs, kwargs = info["attributes"], info["init_kwargs"]
  channels = 3 if name.startswith("edm") else 5  # + the two coordinate channels
  assert attrs["img_resolution"] == 16 and attrs["img_channels"] == channels
  assert attrs["label_dim"] == (5 if adm else 0) and attrs["sigma_data"] == 0.5
  assert kwargs["model_channels"] == (32 if adm else 16) and kwargs["channel_mult"] == [1, 2]
  assert kwargs["img_channels"] == channels and info["init_args"] == []
  assert not any(k.startswith("_") for k in attrs)


def test_snapshot_object_graph(reference):
  graph = torch_pickle.read_file(reference / "parity" / "ddpmpp_tiny_snapshot.pkl")
  assert set(graph) == {"ema", "loss_fn", "augment_pipe", "dataset_kwargs"}
  ema, loss = graph["ema"], graph["loss_fn"]
  assert isinstance(ema, torch_pickle.PersistentObject) and ema.qualname == "Patch_EDMPrecond"
  assert ema.version == 6 and not hasattr(ema, "module_src")
  assert loss.qualname == "Patch_EDMLoss" and loss["P_mean"] == -1.2 and loss["P_std"] == 1.2
  assert graph["augment_pipe"] is None and graph["dataset_kwargs"]["use_labels"] is False
  enc = ema["_modules"]["model"]["_modules"]["enc"]
  assert isinstance(enc, torch_pickle.TorchModule)
  assert enc.qualname == "torch.nn.modules.container.ModuleDict"
  block = enc["_modules"]["16x16_block0"]
  # EDM's UNetBlock default skip_scale=np.sqrt(0.5) is pickled as a NumPy scalar.
  assert isinstance(block["skip_scale"], np.float64) and block["skip_scale"] == np.sqrt(0.5)


def test_snapshot_network_matches_official_outputs(reference):
  parity = reference / "parity"
  denoiser = convert.load_torch_state_dict(
      convert.read_state_dict(parity / "ddpmpp_tiny_snapshot.pkl"), DDPMPP_TINY)
  size = 8
  with np.load(parity / "ddpmpp_tiny_io.npz") as f:
    x, sigma, pos, want = (nhwc(f[f"x_{size}"]), f[f"sigma_{size}"], nhwc(f[f"pos_{size}"]),
                           nhwc(f[f"D_{size}"]))
  out = np.asarray(denoiser(jnp.asarray(x), jnp.asarray(sigma), jnp.asarray(pos), None),
                   np.float64)
  # As in test_networks: the network's part D - c_skip x, to the float32 rounding of the stored D.
  skip = (edm.SIGMA_DATA ** 2 / (sigma.astype(np.float64) ** 2 + edm.SIGMA_DATA ** 2)
          ).reshape(-1, 1, 1, 1) * x
  assert rel_l2(out - skip, want - skip) < 1e-6


# ---------------------------------------------------------------------------------------------
# Hand-made snapshots.


def _storage(array) -> Shared:
  """A storage as plain pickle embeds it: `_load_from_bytes(<legacy torch.save of it>)`."""
  return Shared(Call("torch.storage", "_load_from_bytes", (legacy_save(Storage(array)),)))


def _param(storage, offset, size, stride):
  return Call("torch._utils", "_rebuild_parameter",
              (View(storage, offset, size, stride), False, OrderedDict))


def _persistent(class_name, state, source="raise SystemExit('never run')\n"):
  meta = {"type": "class", "version": 6, "module_src": source, "class_name": class_name,
          "state": state}
  return Call("torch_utils.persistence", "_reconstruct_persistent_obj", (meta,))


def _module(params=None, buffers=None, modules=None, transient=(), **attrs):
  return {"training": False, "_parameters": params or {}, "_buffers": buffers or {},
          "_non_persistent_buffers_set": set(transient), "_modules": modules or {}, **attrs}


def _snapshot(tmp_path, ema, name="snap.pkl", **others):
  path = tmp_path / name
  path.write_bytes(dumps(dict(ema=ema, **others))[0])
  return path


def test_shared_storages_offsets_and_module_names(tmp_path):
  marker = tmp_path / "ran"
  flat = np.arange(20, dtype=np.float32)
  shared = _storage(flat)  # one storage, four views of it
  inner = _persistent("Conv2d", _module(
      params={"weight": _param(shared, 2, (2, 3), (1, 2)), "bias": None},
      buffers={"resample_filter": _param(shared, 0, (4,), (1,)),
               "cache": _param(shared, 0, (1,), (1,))},
      transient=["cache"], skip_scale=Call("numpy._core.multiarray", "scalar", (
          Call("numpy", "dtype", ("f8", False, True)), np.float64(0.5).tobytes()))))
  layers = Script("torch.nn.modules.container.ModuleList", _module(modules={
      "0": inner, "1": None,
      "2": Script("torch.nn.modules.dropout.Dropout", _module(p=0.1, inplace=False))}))
  ema = _persistent("Patch_EDMPrecond", _module(
      params={"scale": _param(shared, 19, (), ())},
      modules={"layers": layers, "enc": Script("torch.nn.modules.container.ModuleDict", _module(
          modules={"16x16_conv": inner}))},
      img_resolution=16, dtype=Global("torch", "float32"), label_dim=0,
      _init_kwargs={"img_resolution": 16, "model_type": "SongUNet"}),
      source=f"open({str(marker)!r}, 'w')\n")
  path = _snapshot(tmp_path, ema, loss_fn=_persistent("Patch_EDMLoss", {"P_mean": -1.2}))
  state, info = convert.read_snapshot(path)
  assert not marker.exists()  # the class source was not run
  weight = np.array([[2, 4, 6], [3, 5, 7]], np.float32)  # storage[2 + i + 2 j]
  want = {"scale": np.float32(19), "layers.0.weight": weight,
          "layers.0.resample_filter": flat[:4], "enc.16x16_conv.weight": weight,
          "enc.16x16_conv.resample_filter": flat[:4]}
  assert list(state) == list(want)  # bias None and the non-persistent buffer left out
  for key, value in want.items():
    np.testing.assert_array_equal(state[key], value, err_msg=key)
    assert state[key].flags.c_contiguous and state[key].flags.owndata
  assert info["class_name"] == "Patch_EDMPrecond" and info["model_class"] is None
  assert info["attributes"] == {"training": False, "img_resolution": 16, "label_dim": 0}
  assert info["init_kwargs"] == {"img_resolution": 16, "model_type": "SongUNet"}
  graph = torch_pickle.read_file(path)
  conv = graph["ema"]["_modules"]["layers"]["_modules"]["0"]
  assert conv["skip_scale"] == 0.5 and isinstance(conv["skip_scale"], np.float64)
  assert repr(graph["ema"]["dtype"]) == "torch.float32"


def test_storage_bytes_in_zip_format(tmp_path):
  zipped = tmp_path / "storage.zip"
  write_zip(zipped, records(Storage(np.arange(6, dtype=np.float64))))
  storage = Call("torch.storage", "_load_from_bytes", (zipped.read_bytes(),))
  path = _snapshot(tmp_path, _persistent("Net", _module(params={
      "w": _param(storage, 1, (2, 2), (2, 1))})))
  state = convert.read_state_dict(path)
  assert state["w"].dtype == np.float64
  np.testing.assert_array_equal(state["w"], [[1, 2], [3, 4]])


def test_numpy_scalars(tmp_path):
  # numpy.dtype('i4') with BUILD state byte order '>', then scalar(dtype, raw big-endian bytes).
  dtype = (b"cnumpy\ndtype\n(X\x02\x00\x00\x00i4\x89\x88tR(K\x03X\x01\x00\x00\x00>NNNJ\xff"
           b"\xff\xff\xffJ\xff\xff\xff\xffK\x00tb")
  raw = (b"\x80\x02cnumpy._core.multiarray\nscalar\n(" + dtype + b"C\x04" + (7).to_bytes(4, "big")
         + b"tR.")
  value = torch_pickle.unpickle(raw)
  assert value == 7 and isinstance(value, np.int32)
  assert torch_pickle.unpickle(pickle.dumps(np.float16(-2.5), protocol=4)) == -2.5
  assert torch_pickle.unpickle(pickle.dumps(np.bool_(True), protocol=2)) is np.True_
  for bad in (pickle.dumps(np.str_("x"), protocol=2), pickle.dumps(np.zeros(2), protocol=2),
              pickle.dumps(np.dtype("O"), protocol=2)):
    with pytest.raises(torch_pickle.TorchPickleError):
      torch_pickle.unpickle(bad, source="scalar.pkl")


def test_legacy_torch_save_file(tmp_path):
  storage = np.arange(12, dtype=np.float32)
  obj = {"a": Tensor(storage, 0, (3, 4), (4, 1), key="k"),
         "t": Tensor(storage, 0, (4, 3), (1, 4), key="k"),  # the transpose, same storage
         "i": Tensor(np.array([5, -6], np.int64), 0, (2,), (1,)),
         "h": Tensor(np.array([1.5], np.float16), 0, (), ())}
  data = legacy_save(obj)
  for source in (data, _write(tmp_path / "legacy.pt", data)):
    got = torch_pickle.read_file(source)
    np.testing.assert_array_equal(got["a"], storage.reshape(3, 4))
    np.testing.assert_array_equal(got["t"], storage.reshape(3, 4).T)
    assert got["i"].dtype == np.int64 and got["i"].tolist() == [5, -6]
    assert got["h"].dtype == np.float16 and got["h"] == 1.5
  assert set(torch_pickle.read_legacy(data)) == set(obj)
  # A legacy .pth state dict (pytorch-fid's Inception is one) reads without torch.
  sd = convert.read_state_dict(_write(tmp_path / "legacy.pth", data))
  np.testing.assert_array_equal(sd["t"], storage.reshape(3, 4).T)


def _write(path, data: bytes):
  path.write_bytes(data)
  return path


# ---------------------------------------------------------------------------------------------
# Malicious and damaged files.


def _payloads(marker):
  """(name, pickle bytes, the global the error names): each would create `marker` if it ran."""
  cmd = f"touch {marker}"
  code = f"open({str(marker)!r}, 'w')"
  nested = legacy_save({"w": Call("posix", "system", (cmd,))})
  return [
      ("posix.system", dumps({"ema": Call("posix", "system", (cmd,))})[0], "posix.system"),
      ("os.system", dumps({"ema": Call("os", "system", (cmd,))})[0], "os.system"),
      ("os.system by pickle", pickle.dumps({"ema": Reduce(os.system, cmd)}, protocol=4),
       f"{os.system.__module__}.system"),
      ("builtins.eval", dumps({"ema": Call("builtins", "eval", (code,))})[0], "builtins.eval"),
      ("unknown class", dumps({"ema": Script("training.networks.SongUNet", {})})[0],
       "training.networks.SongUNet"),
      ("persistence decorator", dumps({"ema": Call("torch_utils.persistence", "persistent_class",
                                                   (code,))})[0],
       "torch_utils.persistence.persistent_class"),
      ("nested in _load_from_bytes", dumps({"ema": _persistent("Net", _module(params={
          "w": _param(Call("torch.storage", "_load_from_bytes", (nested,)), 0, (1,), (1,))}))}
      )[0], "posix.system"),
      ("nested in a storage header", dumps({"ema": Call("torch.storage", "_load_from_bytes", (
          legacy_save(Storage(np.zeros(1, np.float32)), magic=Call("builtins", "exec",
                                                                   (code,))),))})[0],
       "builtins.exec"),
  ]


@pytest.mark.parametrize("index", range(8))
def test_malicious_snapshots_are_refused_by_name_and_nothing_runs(tmp_path, index):
  marker = tmp_path / "pwned"
  name, data, named = _payloads(marker)[index]
  path = _write(tmp_path / "network-snapshot-evil.pkl", data)
  with pytest.raises(torch_pickle.TorchPickleError) as err:
    convert.read_state_dict(path)
  message = str(err.value)
  assert str(path) in message and f"refusing the global {named}" in message, (name, message)
  assert not marker.exists(), name


def test_a_torch_module_called_with_arguments_is_refused(tmp_path):
  path = _write(tmp_path / "args.pkl", dumps(
      {"ema": Call("torch.nn.modules.container", "ModuleDict", ("x",))})[0])
  with pytest.raises(torch_pickle.TorchPickleError, match="ModuleDict is called with arguments"):
    convert.read_state_dict(path)


def test_damaged_snapshots(reference, tmp_path):
  full = (reference / "parity" / "ddpmpp_tiny_snapshot.pkl").read_bytes()

  def check(data: bytes, match: str):
    path = _write(tmp_path / "network-snapshot-bad.pkl", data)
    with pytest.raises(torch_pickle.TorchPickleError, match=match) as err:
      convert.read_state_dict(path)
    assert str(path) in str(err.value)

  check(full[:len(full) // 2], "not a readable pickle")
  check(b"", "the file is empty")
  payload = legacy_save(Storage(np.arange(4, dtype=np.float32)))

  def snapshot(storage_bytes: bytes) -> bytes:
    return dumps({"ema": _persistent("Net", _module(params={"w": _param(
        Call("torch.storage", "_load_from_bytes", (storage_bytes,)), 0, (4,), (1,))}))})[0]

  _write(tmp_path / "good.pkl", snapshot(payload))
  np.testing.assert_array_equal(convert.read_state_dict(tmp_path / "good.pkl")["w"], np.arange(4))
  check(snapshot(payload[:-4]), "storage bytes: storage 0 is truncated: 12 bytes, expected 16")
  check(snapshot(payload[:-16]), "storage 0 is truncated: 0 bytes")
  check(snapshot(payload[:-20]), "storage 0 is missing")
  check(snapshot(legacy_save(Storage(np.zeros(1, np.float32)), magic=LEGACY_MAGIC + 1)),
        "not a torch.save file .* not the magic number 0x1950a86a20f9469cfc6c")
  check(snapshot(b"garbage!"), "not a torch.save file")
  check(snapshot(legacy_save(Storage(np.zeros(1, np.float32)), protocol=1000)),
        "protocol version 1000, expected 1001")
  assert payload.count(b"NtQ") == 1  # the persistent id's sixth item, None
  check(snapshot(payload.replace(b"NtQ", b"K\x00\x85tQ")), "storage 0 is a view of another storage")
  count = len(payload) - 16 - 8
  check(snapshot(payload[:count] + (5).to_bytes(8, "little") + payload[count + 8:]),
        "storage 0 holds 5 elements; its reference says 4")
  # A tensor reaching past its storage, and a storage that is not one.
  check(dumps({"ema": _persistent("Net", _module(params={"w": _param(
      Call("torch.storage", "_load_from_bytes", (payload,)), 2, (3,), (1,))}))})[0],
        "reaches element 4 of storage 0, which has 4")
  check(snapshot(legacy_save([1, 2])), "storage bytes hold a list, not a storage")


def test_a_pickle_without_an_ema_network(tmp_path):
  path = _snapshot(tmp_path, None, G_ema=1)
  with pytest.raises(ValueError, match=r"holds no network under 'ema' \(keys \['G_ema', 'ema'\]"):
    convert.read_state_dict(path)
