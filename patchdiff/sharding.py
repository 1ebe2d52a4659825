"""The device mesh and the layouts of the training state and the batch.

The mesh has two axes, `data` and `fsdp`. The batch is split over both (every device gets
`global_batch / device_count` samples). The parameters, optimizer state and EMA are either
replicated on every device (`mesh.param_sharding = "replicated"`, plain data parallelism) or
split along `fsdp` (`"fsdp"`: each tensor's largest dimension that the axis divides is sharded;
XLA gathers it where a layer needs it, and reduce-scatters its gradient).
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp")
BATCH = P(AXES)  # the leading (batch) dimension over both axes
PARAM_SHARDINGS = ("replicated", "fsdp")


def mesh_shape(mcfg: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int]:
  """(data, fsdp) sizes with -1 resolved to "the rest"; errors name the values."""
  sizes = {"data": mcfg.data, "fsdp": mcfg.fsdp}
  for name, size in sizes.items():
    if not isinstance(size, int) or (size < 1 and size != -1):
      raise ValueError(f"mesh.{name}={size!r} must be a positive integer or -1 (the rest)")
  if mcfg.param_sharding not in PARAM_SHARDINGS:
    raise ValueError(f"mesh.param_sharding={mcfg.param_sharding!r} is not one of "
                     f"{list(PARAM_SHARDINGS)}")
  rest = [n for n, s in sizes.items() if s == -1]
  if len(rest) > 1:
    raise ValueError("only one of mesh.data and mesh.fsdp may be -1")
  fixed = int(np.prod([s for s in sizes.values() if s != -1]))
  if num_devices % fixed:
    raise ValueError(f"mesh.data={mcfg.data} x mesh.fsdp={mcfg.fsdp} does not divide the "
                     f"{num_devices} devices")
  if rest:
    sizes[rest[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise ValueError(f"mesh.data={mcfg.data} x mesh.fsdp={mcfg.fsdp} = {fixed} devices, but "
                     f"there are {num_devices}; set one of them to -1 to take the rest")
  return sizes["data"], sizes["fsdp"]


def make_mesh(mcfg: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The (data, fsdp) mesh over `devices` (default: every device of every process)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mcfg, len(devices))
  # Auto axes: XLA propagates the shardings (jax.make_mesh defaults to Explicit in new JAX).
  return jax.make_mesh(shape, AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2,
                       devices=devices)


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Every device on the data axis: the mesh of sampling and encoding (weights replicated)."""
  return make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, param_sharding="replicated")),
                   devices)


def param_spec(shape: Sequence[int], fsdp: int, min_size: int) -> P:
  """Shard the largest dimension divisible by `fsdp`; small or indivisible tensors replicate."""
  if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % fsdp == 0:
      spec = [None] * len(shape)
      spec[dim] = "fsdp"
      return P(*spec)
  return P()


def state_shardings(mesh: Mesh, tree: Any, mode: str, min_size: int = 2 ** 12) -> Any:
  """A NamedSharding for every leaf of `tree` (arrays or ShapeDtypeStructs)."""
  fsdp = mesh.shape["fsdp"] if mode == "fsdp" else 1

  def one(x):
    shape = getattr(x, "shape", ())
    return NamedSharding(mesh, param_spec(shape, fsdp, min_size))
  return jax.tree_util.tree_map(one, tree)


def put(tree: Any, shardings: Any) -> Any:
  """Host arrays (the same on every process) -> global arrays laid out as `shardings` (a tree of
  the same structure); each device receives only its shard."""
  return jax.tree_util.tree_map(
      lambda a, s: jax.make_array_from_callback(np.shape(a), s, lambda index: a[index]),
      tree, shardings)


def check_batch(global_batch: int, mesh: Mesh, process_count: int, what: str) -> None:
  """The global batch must split evenly over the devices and the processes."""
  n = mesh.devices.size
  if global_batch % n:
    raise ValueError(f"{what}={global_batch} is not divisible by the {n} devices of the mesh "
                     f"(data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']})")
  if global_batch % process_count:
    raise ValueError(f"{what}={global_batch} is not divisible by the {process_count} processes")
