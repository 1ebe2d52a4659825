"""Records JAX's compile events of every Python process that starts with this folder on its
path (the suite and the subprocesses its tests start, which inherit PYTHONPATH): one JSON line
per event in $SUITE_COMPILES/PID.jsonl, with the test that ran (PYTEST_CURRENT_TEST, which
subprocesses inherit too) and the process's command line. `report.py` sums them.

  PYTHONPATH=benchmarks/suite_compiles SUITE_COMPILES=/tmp/compiles python -m pytest -q
  python benchmarks/suite_compiles/report.py /tmp/compiles

A subprocess started with its own PYTHONPATH (tests/conftest.py's 8-device worker) is not
recorded. The listeners attach when JAX's monitoring module is first imported, so a process that
never imports JAX pays nothing.
"""
import importlib.abc
import importlib.machinery
import json
import os
import sys
import time

_OUT = os.environ.get("SUITE_COMPILES")
_EVENTS = ("/jax/core/compile/backend_compile_duration", "/jax/core/compile/jaxpr_trace_duration",
           "/jax/core/compile/jaxpr_to_mlir_module_duration",
           "/jax/compilation_cache/cache_retrieval_time_sec")
_COUNTS = ("/jax/compilation_cache/cache_hits", "/jax/compilation_cache/cache_misses")


def _attach(monitoring) -> None:
  path = os.path.join(_OUT, f"{os.getpid()}.jsonl")

  def write(event, seconds, name=""):
    record = dict(event=event.rsplit("/", 1)[-1], seconds=seconds, name=str(name),
                  test=os.environ.get("PYTEST_CURRENT_TEST", "").split(" (")[0],
                  argv=" ".join(sys.argv)[:200], time=time.time())
    with open(path, "a", encoding="utf-8") as f:
      f.write(json.dumps(record) + "\n")

  monitoring.register_event_duration_secs_listener(
      lambda event, seconds, **kw: event in _EVENTS and write(event, seconds, kw.get("fun_name")))
  monitoring.register_event_listener(lambda event, **kw: event in _COUNTS and write(event, 0.0))


class _Finder(importlib.abc.MetaPathFinder):
  """Attaches the listeners right after jax._src.monitoring is imported."""

  def find_spec(self, fullname, path, target=None):
    if fullname != "jax._src.monitoring":
      return None
    spec = importlib.machinery.PathFinder.find_spec(fullname, path)
    load = spec.loader.exec_module

    def exec_module(module):
      load(module)
      _attach(module)
    spec.loader.exec_module = exec_module
    return spec


if _OUT:
  os.makedirs(_OUT, exist_ok=True)
  sys.meta_path.insert(0, _Finder())
