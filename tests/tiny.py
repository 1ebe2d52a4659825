"""The one tiny run that the tests share, as a function (`tiny_config`) and as a config file for
the entry point (`python -m patchdiff.main --config=tests/tiny.py`).

Its network is the `ddpmpp_tiny` parity fixture's (conftest.DDPMPP_TINY: 16 px, 16 channels, two
levels, attention at 8 px), which the parity tests need anyway. One network, one batch size, one
sampler step count and one set of loss constants make every test's programs the same programs, so
that the suite's persistent compilation cache serves a program compiled by one test (or one
subprocess) to all the others. A test that needs another value overrides it, at the price of its
own programs.
"""
import ml_collections

from patchdiff import config_lib

PATH = "tests/tiny.py"  # this file, for --config (relative to the repository root)

# The ddpmpp_tiny parity fixture's network (conftest.DDPMPP_TINY is this).
MODEL = dict(arch="ddpmpp", img_resolution=16, img_channels=3, model_channels=16,
             channel_mult=(1, 2), num_blocks=1, attn_resolutions=(8,), dropout=0.0)

# The network at one level of 32 channels (its second level's width, so that the fsdp layout
# splits most of its weights), without attention (overrides): for programs that no other test can
# share, which then compile in half the time: those of other topologies (8 devices, several
# processes) and those a test compiles without the persistent cache.
ONE_LEVEL = {"model.model_channels": 32, "model.channel_mult": (1,), "model.attn_resolutions": ()}


def get_config() -> ml_collections.ConfigDict:
  c = config_lib.base_config()
  c.data.source = "twemoji"
  c.data.resolution = 16
  c.data.limit = 40
  c.model.update(MODEL)
  c.train.batch_size = 4
  c.train.steps = 40
  c.train.lr = 1e-3
  c.train.lr_rampup_kimg = 0.1
  c.train.log_every = 10
  c.train.checkpoint_every = 1000
  c.sample.num_steps = 2
  c.sample.batch_size = 4
  c.sample.grid_size = 4
  c.sample.num_images = 4
  return c


def tiny_config(**overrides) -> ml_collections.ConfigDict:
  """The tiny run's config with `overrides` ({"train.steps": 2, ...})."""
  return config_lib.override(get_config(), overrides)


def flags(**overrides) -> list[str]:
  """`--config.KEY=VALUE` flags of `overrides`, for the entry point (after --config)."""
  return [f"--config.{k}={v}".replace(" ", "") for k, v in overrides.items()]
