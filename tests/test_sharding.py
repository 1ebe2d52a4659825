"""The mesh and the state layouts: config errors and the fsdp rule. (Sharded steps against one
device and checkpoints restored on other topologies, with 8 fake CPU devices: test_eight_devices.py.)"""

import ml_collections
import pytest
from jax.sharding import PartitionSpec as P

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
