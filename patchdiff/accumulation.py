"""Gradient accumulation arithmetic: how many micro-batches each patch bucket's step runs in,
given train.batch_per_device (the most samples a device computes at once) and the devices.

`config_lib.validate` checks these numbers before anything is compiled; the trainer
(`train.Run`) and the step benchmark read them. Every error names the key and the value.
"""
from __future__ import annotations

import ml_collections
import numpy as np

from patchdiff import patches


def batch_per_device(tcfg: ml_collections.ConfigDict) -> int | None:
  """train.batch_per_device as an int, or None when unset; ValueError unless it is a positive
  integer or None."""
  m = tcfg.get("batch_per_device")
  if m is not None and (isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m <= 0):
    raise ValueError(f"train.batch_per_device={m!r} must be a positive integer or None")
  return None if m is None else int(m)


def rounds_per_bucket(schedule: patches.PatchSchedule, tcfg: ml_collections.ConfigDict,
                      num_devices: int, sizes: tuple[int, ...] | None = None) -> dict[int, int]:
  """{patch size: k} for the buckets `sizes` (default: those `schedule`, the run's patch
  schedule, draws): each bucket's step accumulates gradients over k micro-batches.

  A bucket's per-device batch is b = train.batch_size * batch_mul / num_devices. With
  train.batch_per_device = m unset or b <= m the bucket is one round (k = 1); otherwise it runs
  k = ceil(b / m) rounds of b / k samples per device, and k must divide b (else a ValueError
  naming the key, the bucket and a value that works). The results are those of k = 1: the
  rounds sum the gradient of the mean loss over the whole batch.
  """
  m = batch_per_device(tcfg)
  sizes = schedule.active_sizes if sizes is None else tuple(sizes)
  if m is None:
    return {s: 1 for s in sizes}
  per_device = {}  # full images first: their batch is the smallest
  for s in sorted(sizes, reverse=True):
    total = tcfg.batch_size * patches.batch_mul(s, schedule.resolution)
    if total % num_devices:
      raise ValueError(f"train.batch_size={tcfg.batch_size}: the {total} samples of the "
                       f"{s}px bucket do not split over the {num_devices} devices")
    per_device[s] = total // num_devices
  rounds = {}
  for s, b in per_device.items():
    k = -(-b // m)
    if b % k:
      common = int(np.gcd.reduce(list(per_device.values())))
      fits = max(d for d in range(1, min(m, common) + 1) if common % d == 0)
      raise ValueError(f"train.batch_per_device={m}: the {s}px bucket has {b} samples per "
                       f"device, which do not split into {k} equal micro-batches of at most "
                       f"{m}; train.batch_per_device={fits} (a divisor of every bucket's "
                       "per-device batch) would")
    rounds[s] = k
  return rounds
