"""XLA compile options for the project's programs, by platform.

On CPU, LLVM optimises the kernels that XLA generates (the fused elementwise and reduction loops;
convolutions and matrix products run in precompiled libraries) at level 1 instead of XLA's
default 3: the programs compile faster and run as fast (`benchmarks/compile_time.py` and
`benchmarks/train_step.py`; the README's performance section has the figures). The results are
the default level's to rounding: the levels contract and order some floating-point operations
differently, so some of a gradient's entries differ in their last bits (tests/test_xla_options.py
bounds the difference). Other platforms compile with XLA's defaults.

An explicit `--xla_backend_optimization_level` in XLA_FLAGS wins over this choice.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Callable

import jax

# XLA DebugOptions field -> value, for programs compiled for CPU.
CPU_OPTIONS = {"xla_backend_optimization_level": 1}


def for_platform(platform: str) -> dict[str, Any]:
  """The compile options for a program that runs on `platform` ("cpu", "gpu", "tpu"...)."""
  if platform != "cpu":
    return {}
  flags = os.environ.get("XLA_FLAGS", "")
  return {k: v for k, v in CPU_OPTIONS.items() if f"--{k}=" not in flags}


def jit(fun: Callable, platform: str | None = None, **jit_kwargs) -> Callable:
  """`jax.jit(fun, **jit_kwargs)` with the options for `platform` (default: JAX's default
  backend)."""
  platform = jax.default_backend() if platform is None else platform
  return jax.jit(fun, compiler_options=for_platform(platform) or None, **jit_kwargs)


def lazy_jit(fun: Callable, **jit_kwargs) -> Callable:
  """A module-level `jit(fun, **jit_kwargs)` that picks its platform at the first call, not at
  import (when the backend may not be chosen yet): one jitted program per default backend."""
  @functools.cache
  def program(platform: str) -> Callable:
    return jit(fun, platform, **jit_kwargs)

  @functools.wraps(fun)
  def call(*args, **kwargs):
    return program(jax.default_backend())(*args, **kwargs)

  call.program = program
  return call
