"""What the readers of a weight file share: the error (`TorchPickleError`), how values and
exceptions from a file are shown in messages (`short_repr`, `_cut`, `_describe`), `reading` (a
context in which any failure becomes a `TorchPickleError` naming the file), and one file's read
(`_Read`: its name, and the budget that the pickles nested in it share).

Every failure is a `TorchPickleError` whose message begins with the file's name (`source`):
damage, refused content, and whatever the standard library raises on a damaged file
(`RecursionError`, `MemoryError`, `zlib.error`, ...). Messages show values from the file by type
name or `reprlib`, cut short.

The tensors' copies together may not exceed `COPY_FACTOR` times the bytes of the storages read,
plus `COPY_SLACK` (`_Read.copy`).
"""
from __future__ import annotations

import contextlib
import reprlib
from typing import Any, Iterator


class TorchPickleError(ValueError):
  """A file that is damaged, not in a format read here, or that names a refused global."""


COPY_FACTOR, COPY_SLACK = 4, 1 << 20  # tensor copies <= COPY_FACTOR * storage bytes + COPY_SLACK

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlong = 3, 60, 60, 40
_REPR.maxtuple = _REPR.maxlist = _REPR.maxdict = _REPR.maxset = _REPR.maxfrozenset = 6


def short_repr(value: Any) -> str:
  """A short repr of a value from a file (`reprlib`, bounded in depth and length)."""
  try:
    return _REPR.repr(value)
  except Exception:  # pylint: disable=broad-except  (an int too long for str, say)
    return f"<{type(value).__name__}>"


def _cut(text: str, limit: int = 80) -> str:
  """A string from a file, cut to `limit` characters."""
  return text if len(text) <= limit else text[:limit - 3] + "..."


def _describe(e: BaseException) -> str:
  """An exception as `Type: message`, from its first argument where that is a string (never the
  repr of another argument, which may be an object from the file), cut short."""
  text = e.args[0] if e.args and isinstance(e.args[0], str) else ""
  return f"{type(e).__name__}: {_cut(text, 200)}" if text else type(e).__name__


def _is_int(value: Any) -> bool:
  """Whether `value` is a Python int (not a bool)."""
  return isinstance(value, int) and not isinstance(value, bool)


class _Budget:
  """What one file's read has spent, across its nested pickles: estimated object bytes, risky
  keys, bytes of the storages read and of the tensors copied out of them, and the bytes objects
  given to `_load_from_bytes` (kept, so that their ids stay theirs)."""
  __slots__ = ("objects", "risky_keys", "storage_bytes", "copied", "decoded")

  def __init__(self):
    self.objects = self.risky_keys = self.storage_bytes = self.copied = 0
    self.decoded: dict[int, bytes] = {}


class _Read:
  """One read: the name its errors begin with, its budget (shared with the reads nested in it)
  and whether it is nested (a storage's bytes)."""
  __slots__ = ("source", "budget", "nested")

  def __init__(self, source: str, budget: _Budget | None = None, nested: bool = False):
    self.source, self.budget, self.nested = source, budget or _Budget(), nested

  def error(self, problem: str) -> TorchPickleError:
    return TorchPickleError(f"{self.source}: {problem}")

  def add_storage(self, nbytes: int) -> None:
    self.budget.storage_bytes += nbytes

  def copy(self, nbytes: int, size: tuple[int, ...]) -> None:
    """Spends `nbytes` of copies on a tensor of `size`; refuses what the storages read do not
    cover."""
    budget = self.budget
    limit = COPY_FACTOR * budget.storage_bytes + COPY_SLACK
    if budget.copied + nbytes > limit:
      raise TorchPickleError(
          f"a tensor of size {short_repr(size)} would bring the tensors' copies to "
          f"{budget.copied + nbytes} bytes; the storages read hold {budget.storage_bytes} (at "
          f"most {COPY_FACTOR}x that plus {COPY_SLACK} is copied)")
    budget.copied += nbytes


@contextlib.contextmanager
def reading(source: str) -> Iterator[None]:
  """Any failure inside as a TorchPickleError whose message begins with `source` (a missing
  file stays a FileNotFoundError)."""
  try:
    yield
  except FileNotFoundError:
    raise
  except TorchPickleError as e:
    if str(e).startswith(source):
      raise
    raise TorchPickleError(f"{source}: {e}") from None
  except RecursionError:
    raise TorchPickleError(f"{source}: the file nests objects too deeply to be read") from None
  except MemoryError:
    raise TorchPickleError(f"{source}: reading the file ran out of memory") from None
  except Exception as e:  # pylint: disable=broad-except  (zlib.error, OSError, ... on damage)
    raise TorchPickleError(f"{source}: damaged ({_describe(e)})") from None
