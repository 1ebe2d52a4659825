"""Start-up: the step's programs (one per bucket, and the update they share) compiled at once,
kept in the workdir's persistent cache, and loaded from it on a restart instead of compiled
again."""
import jax
import pytest

from patchdiff import config_lib, train
from tiny import ONE_LEVEL, tiny_config


class CacheEvents:
  """Counts JAX's persistent-cache hits and XLA compilations from now on."""
  _live: list["CacheEvents"] = []

  def __init__(self):
    self.hits = 0
    self.compiles = 0
    if not CacheEvents._live:
      jax.monitoring.register_event_listener(CacheEvents._event)
      jax.monitoring.register_event_duration_secs_listener(CacheEvents._duration)
    CacheEvents._live.append(self)

  @staticmethod
  def _event(name, **_):
    if name == "/jax/compilation_cache/cache_hits":
      for w in CacheEvents._live:
        w.hits += 1

  @staticmethod
  def _duration(name, *_, **__):
    if "backend_compile" in name:
      for w in CacheEvents._live:
        w.compiles += 1


@pytest.fixture
def no_process_cache():
  """The process without a persistent cache, and without the programs that earlier tests left in
  memory (as a fresh `python -m patchdiff.main`); the session's cache comes back afterwards."""
  before = jax.config.jax_compilation_cache_dir
  jax.config.update("jax_compilation_cache_dir", None)
  jax.clear_caches()
  yield
  train.use_compilation_cache(before, "unused")


def test_a_restart_loads_every_bucket_from_the_workdir_cache(tmp_path, no_process_cache):
  # Two buckets (8 and 16 px; a gradient program each) and the update program, compiled at once
  # on the first start (of the one-level network: compiled without the session's cache).
  cfg = tiny_config(**{"train.steps": 2, "sample.grid_size": 0, "train.checkpoint_every": 2,
                       "patch.sizes": (8, 16), "patch.probs": (0.5, 0.5), **ONE_LEVEL})
  train.train_and_evaluate(cfg, str(tmp_path))
  entries = list((tmp_path / "xla_cache").iterdir())
  assert len(entries) >= 3, entries  # at least the three programs of the step
  # The restart (a new process: nothing in memory) compiles the programs one at a time: the same
  # programs, found in the cache.
  jax.clear_caches()
  restart = CacheEvents()
  train.train_and_evaluate(config_lib.override(cfg, {"train.steps": 4,
                                                     "train.compile_threads": 1}), str(tmp_path))
  assert restart.hits >= 3, (restart.hits, restart.compiles)


def test_the_cache_can_be_turned_off_or_moved(tmp_path, no_process_cache):
  assert train.use_compilation_cache(str(tmp_path / "elsewhere"), str(tmp_path)) == str(
      tmp_path / "elsewhere")
  assert jax.config.jax_compilation_cache_dir == str(tmp_path / "elsewhere")
  # Unset: a cache the process already has is kept (JAX_COMPILATION_CACHE_DIR, or the caller's).
  assert train.use_compilation_cache(None, str(tmp_path / "run")) == str(tmp_path / "elsewhere")
  try:
    assert train.use_compilation_cache("", str(tmp_path)) is None
    assert not jax.config.jax_enable_compilation_cache
  finally:
    jax.config.update("jax_enable_compilation_cache", True)


def test_compile_threads_is_checked_before_compiling(tmp_path):
  with pytest.raises(ValueError, match=r"train.compile_threads=-1 must be an integer >= 0"):
    train.train_and_evaluate(tiny_config(**{"train.compile_threads": -1}), str(tmp_path))
