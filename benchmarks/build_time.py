"""What building costs before any step runs, in CPU seconds of this process:

1. Each network built abstractly (`models.abstract_denoiser`: shapes only, as the trainer, a
   checkpoint restore and the sampler build it), for the tiny test network and the paper's
   FFHQ-64 DDPM++ and ImageNet-256 ADM, then the FID Inception; `--draw` makes the layers draw
   initial values anyway, as they did before an abstract build skipped them
   (`networks.building_abstractly`).
2. The patch pipeline's tf.data graph (`pipeline.make_patch_dataset`, 64 images of 16 px),
   built `--pipelines` times; `--autograph` traces its map function through AutoGraph, as it
   was before `pipeline.as_written`.

  python benchmarks/build_time.py [--draw] [--autograph] [--pipelines 20]

Each build runs once in a fresh process (the builds are memoised per process), so compare runs
of this command, alternated.
"""
import argparse
import importlib.util
import os
import sys
import time

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, REPO)


def _config(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
  parser.add_argument("--draw", action="store_true")
  parser.add_argument("--autograph", action="store_true")
  parser.add_argument("--pipelines", type=int, default=20)
  args = parser.parse_args()

  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from patchdiff.data import pipeline  # pylint: disable=import-outside-toplevel
  from patchdiff.nn import inception, models, networks  # pylint: disable=import-outside-toplevel
  from patchdiff.patches import PatchSchedule  # pylint: disable=import-outside-toplevel
  jax.numpy.zeros(1).block_until_ready()  # the backend's start-up, outside the timings
  if args.draw:
    networks.building_abstractly = lambda: False
  tiny = dict(arch="ddpmpp", img_resolution=16, img_channels=3, model_channels=16,
              channel_mult=(1, 2), num_blocks=1, attn_resolutions=(8,), dropout=0.0)
  for name, cfg in (("tiny DDPM++", tiny), ("FFHQ-64 DDPM++", _config("ffhq64").model),
                    ("ImageNet-256 ADM", _config("imagenet256").model)):
    t = time.process_time()
    models.abstract_denoiser(cfg)
    print(f"abstract {name}: {time.process_time() - t:.2f} s")
  t = time.process_time()
  inception._abstract()  # pylint: disable=protected-access
  print(f"abstract Inception: {time.process_time() - t:.2f} s")

  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  if args.autograph:
    pipeline.as_written = lambda _, fn: fn
  images = np.random.default_rng(0).integers(0, 256, (64, 16, 16, 3), dtype=np.uint8)
  schedule = PatchSchedule((4, 8, 16), (0.3, 0.3, 0.4), 16, seed=0)
  tf.constant(0)  # TensorFlow's start-up, outside the timings
  t = time.process_time()
  for _ in range(args.pipelines):
    pipeline.make_patch_dataset(images, schedule, batch_size=4, total_steps=100)
  print(f"{args.pipelines} patch pipelines: {time.process_time() - t:.2f} s")


if __name__ == "__main__":
  main()
