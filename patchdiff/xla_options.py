"""XLA compile options for the project's programs, by platform.

On CPU, LLVM optimises the kernels that XLA generates (the fused elementwise and reduction loops;
convolutions and matrix products run in precompiled libraries) at level 1 instead of XLA's
default 3: the programs compile faster and run as fast (`benchmarks/compile_time.py` and
`benchmarks/train_step.py`; the README's performance section has the figures). The results are
the default level's to rounding: the levels contract and order some floating-point operations
differently, so some of a gradient's entries differ in their last bits (tests/test_xla_options.py
bounds the difference). Other platforms compile with XLA's defaults.

An explicit `--xla_backend_optimization_level` in XLA_FLAGS wins over this choice.

JAX takes compile options on a top-level program only (a jit with options inside another program
is a ValueError at trace time), so `jit` and `lazy_jit` return a `Jitted`: called at the top
level it runs the program compiled with the options; called while JAX traces another program it
is a plain `jax.jit` there, part of the enclosing program, which carries its own options.
"""
from __future__ import annotations

import functools
import os
import re
from typing import Any, Callable

import jax

try:  # private; the fallback looks for tracers among the arguments
  from jax._src.core import trace_state_clean as _trace_state_clean
except ImportError:  # pragma: no cover
  _trace_state_clean = None

# XLA DebugOptions field -> value, for programs compiled for CPU.
CPU_OPTIONS = {"xla_backend_optimization_level": 1}
# XLA's own level where neither XLA_FLAGS nor CPU_OPTIONS sets one.
XLA_DEFAULT_LEVEL = 3

_LEVEL_FLAG = re.compile(r"--xla_backend_optimization_level=(\S*)")


def for_platform(platform: str) -> dict[str, Any]:
  """The compile options for a program that runs on `platform` ("cpu", "gpu", "tpu"...), read
  with the XLA_FLAGS of the moment."""
  if platform != "cpu":
    return {}
  flags = os.environ.get("XLA_FLAGS", "")
  return {k: v for k, v in CPU_OPTIONS.items() if f"--{k}=" not in flags}


def optimization_level(platform: str) -> int:
  """The LLVM level a program for `platform` compiles with: XLA_FLAGS' (the last
  `--xla_backend_optimization_level` there), else the package's (`for_platform`), else XLA's
  default."""
  found = _LEVEL_FLAG.findall(os.environ.get("XLA_FLAGS", ""))
  if found:
    return int(found[-1])
  return int(for_platform(platform).get("xla_backend_optimization_level", XLA_DEFAULT_LEVEL))


def tracing(*args, **kwargs) -> bool:
  """Whether JAX is tracing now (inside `jax.jit`, `jax.eval_shape`, `jax.grad`...), where a call
  of a jitted function becomes part of the traced computation. Without JAX's trace state (a
  private function), whether any leaf of the arguments is a tracer."""
  if _trace_state_clean is not None:
    return not _trace_state_clean()
  return any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves((args, kwargs)))


class Jitted:
  """`jax.jit(fun, **jit_kwargs)` compiled with the options of `platform` (`for_platform`; None:
  JAX's default backend), both read at each call, one jitted program per set of options
  (`program`). Called while JAX traces (`tracing`), it is a plain `jax.jit(fun, **jit_kwargs)`:
  the enclosing program's options apply to it, and a transformation outside any jit
  (`jax.grad(f)(x)` run eagerly) compiles it without options. Other attributes (`lower`,
  `trace`, `eval_shape`...) are the optioned jit's."""

  def __init__(self, fun: Callable, platform: str | None = None, **jit_kwargs):
    self._fun, self._platform, self._jit_kwargs = fun, platform, jit_kwargs
    self._plain = jax.jit(fun, **jit_kwargs)
    self.program = functools.cache(self._make)
    functools.update_wrapper(self, fun)

  def _make(self, options: tuple[tuple[str, Any], ...]) -> Callable:
    return jax.jit(self._fun, compiler_options=dict(options) or None, **self._jit_kwargs)

  def optioned(self) -> Callable:
    """The jitted function with the options of this moment's platform and XLA_FLAGS."""
    platform = jax.default_backend() if self._platform is None else self._platform
    return self.program(tuple(sorted(for_platform(platform).items())))

  def __call__(self, *args, **kwargs):
    if tracing(*args, **kwargs):
      return self._plain(*args, **kwargs)
    return self.optioned()(*args, **kwargs)

  def __getattr__(self, name: str):
    if name.startswith("__") or name in ("_fun", "_platform", "_jit_kwargs", "_plain", "program"):
      raise AttributeError(name)  # not set yet (copying, unpickling): no recursion
    return getattr(self.optioned(), name)


def jit(fun: Callable, platform: str | None = None, **jit_kwargs) -> Jitted:
  """`jax.jit(fun, **jit_kwargs)` with the options for `platform` (default: JAX's default
  backend at each call), and without them inside another program (`Jitted`)."""
  return Jitted(fun, platform, **jit_kwargs)


def lazy_jit(fun: Callable, **jit_kwargs) -> Jitted:
  """A module-level `jit(fun, **jit_kwargs)`: its platform is JAX's default backend at each call,
  not at import (when the backend may not be chosen yet)."""
  return Jitted(fun, None, **jit_kwargs)
