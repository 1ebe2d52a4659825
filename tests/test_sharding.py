"""The mesh and the state layouts: config errors, the fsdp rule, and (with 8 fake CPU devices in a
subprocess) sharded steps against one device and checkpoints restored on other topologies."""

import ml_collections
import pytest
from jax.sharding import PartitionSpec as P

from conftest import run_on_eight_devices
from patchdiff import sharding


def mesh_cfg(data=-1, fsdp=1, param_sharding="replicated"):
  return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, param_sharding=param_sharding))


def test_mesh_shape_resolves_the_rest():
  assert sharding.mesh_shape(mesh_cfg(), 8) == (8, 1)
  assert sharding.mesh_shape(mesh_cfg(data=2, fsdp=-1), 8) == (2, 4)
  assert sharding.mesh_shape(mesh_cfg(data=4, fsdp=2), 8) == (4, 2)


@pytest.mark.parametrize("data,fsdp,mode,match", [
    (3, -1, "replicated", r"mesh.data=3 x mesh.fsdp=-1 does not divide the 8 devices"),
    (2, 2, "replicated", r"= 4 devices, but there are 8"),
    (-1, -1, "replicated", "only one of"),
    (0, 1, "replicated", r"mesh.data=0 must be"),
    (-1, 1, "zero3", r"mesh.param_sharding='zero3'"),
])
def test_bad_meshes_are_named(data, fsdp, mode, match):
  with pytest.raises(ValueError, match=match):
    sharding.mesh_shape(mesh_cfg(data, fsdp, mode), 8)


def test_fsdp_shards_the_largest_divisible_dimension():
  assert sharding.param_spec((3, 3, 128, 256), 8, 1024) == P(None, None, None, "fsdp")
  assert sharding.param_spec((3, 3, 128, 12), 8, 1024) == P(None, None, "fsdp", None)
  assert sharding.param_spec((256,), 8, 1024) == P()        # small: replicated
  assert sharding.param_spec((3, 3, 7, 9), 8, 1) == P()     # nothing divides: replicated
  assert sharding.param_spec((3, 3, 128, 256), 1, 1) == P()  # no fsdp axis


def test_batch_must_split_over_devices_and_processes():
  import jax  # pylint: disable=import-outside-toplevel
  mesh = sharding.make_mesh(mesh_cfg(), jax.devices()[:1])
  sharding.check_batch(6, mesh, 2, "train.batch_size")
  with pytest.raises(ValueError, match="train.batch_size=7 is not divisible by the 2 processes"):
    sharding.check_batch(7, mesh, 2, "train.batch_size")


@pytest.fixture(scope="module")
def eight_devices():
  return run_on_eight_devices("sharded_worker.py", timeout=600)


@pytest.mark.parametrize("layout", ["data8", "data2_fsdp4"])
def test_sharded_step_matches_one_device(eight_devices, layout):
  r = eight_devices
  assert r[f"{layout}_step"] == 3
  # Only the order of the float32 reductions differs; Adam's first steps (g / (|g| + eps))
  # magnify that on near-zero gradients, hence the updates' looser bound.
  assert r[f"{layout}_param_rel_err"] < 1e-4
  assert r[f"{layout}_ema_rel_err"] < 1e-4
  assert r[f"{layout}_update_rel_err"] < 1e-3


def test_fsdp_layout_splits_the_state(eight_devices):
  r = eight_devices
  assert r["data2_fsdp4_sharded_fraction"] > 0.5
  assert r["data2_fsdp4_biggest_shape"] == [3, 3, 64, 32]
  assert r["data2_fsdp4_biggest_shard_shape"] == [3, 3, 16, 32]  # 64 / fsdp 4


@pytest.mark.parametrize("target,devices", [("restore_1", [0]), ("restore_data4", [0, 1, 2, 3])])
def test_checkpoint_of_fsdp_layout_restores_on_other_topologies(eight_devices, target, devices):
  r = eight_devices
  for part in ("train", "opt", "ema", "sample_ema"):
    assert r[f"{target}_{part}_err"] == 0.0, part
  assert r[f"{target}_devices"] == devices
  assert r[f"{target}_progress"]["data_position"] == 3
  assert r[f"{target}_progress"]["mesh"] == {"data": 2, "fsdp": 4}


def test_sharded_sampling_matches_one_device(eight_devices):
  assert eight_devices["sample_8_vs_1_max_abs"] < 1e-4
  assert eight_devices["sample_distinct_seeds"] > 0.01
