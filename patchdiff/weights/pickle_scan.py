"""The scan of each pickle, opcode by opcode (`pickletools.genops`), before it is unpickled: it
follows the unpickler's stack, so what the pickle would build is bounded before anything is
built.

Refused: the extension registry (EXT1/2/4, which bypasses the allow-list), memo indices beyond
the pickle's opcode count, lengths beyond the bytes that remain, more than `OBJECT_BUDGET` bytes
of Python objects (estimated per opcode, strings and bytes apart: those are the file's own
bytes), dict and set keys that are tuples nested deeper than `KEY_DEPTH`, and more than
`RISKY_KEYS` keys whose hashes a file can make collide (tuples, frozensets, integers of 61 bits
and more, objects a call returns). Object bytes and risky keys are counted per file, across its
pickles (the read's budget).
"""
from __future__ import annotations

import pickletools
import sys
from typing import BinaryIO

from patchdiff.weights.read_context import TorchPickleError, _describe, _is_int, _Read


OBJECT_BUDGET = 128 << 20  # estimated bytes of the Python objects one file's pickles make
KEY_DEPTH = 32  # deepest tuple nesting of a dict or set key
RISKY_KEYS = 4096  # dict and set keys whose hashes a file can make collide, per file

_HASH_MODULUS = sys.hash_info.modulus  # integers this large or larger can share a hash

# What the scan does for an opcode: one of these actions, then for the generic ones how the
# pushed item's key depth follows and which popped items are dict or set keys.
_PUSH0, _PUSH1, _PUSH_INT, _GET, _PUT, _MEMOIZE, _DUP, _MARK, _POP, _EXT, _GENERIC = range(11)
_ZERO, _TUPLE, _FIRST, _ARGS, _INT = range(5)  # the pushed item's key depth
_NO_KEYS, _SECOND, _PAIRS, _ALL = range(4)  # keys: none, popped[1], items[0::2], items
_MARKED = frozenset({"APPENDS", "LIST", "TUPLE", "DICT", "SETITEMS", "ADDITEMS", "FROZENSET",
                     "POP_MARK", "INST", "OBJ"})
_ACTIONS = {"GET": _GET, "BINGET": _GET, "LONG_BINGET": _GET, "PUT": _PUT, "BINPUT": _PUT,
            "LONG_BINPUT": _PUT, "MEMOIZE": _MEMOIZE, "DUP": _DUP, "MARK": _MARK, "POP": _POP,
            "EXT1": _EXT, "EXT2": _EXT, "EXT4": _EXT}
_KINDS = {"TUPLE": _TUPLE, "TUPLE1": _TUPLE, "TUPLE2": _TUPLE, "TUPLE3": _TUPLE,
          "EMPTY_TUPLE": _TUPLE, "FROZENSET": _TUPLE, "OBJ": _TUPLE, "INST": _TUPLE,
          "APPEND": _FIRST, "APPENDS": _FIRST, "SETITEM": _FIRST, "SETITEMS": _FIRST,
          "ADDITEMS": _FIRST, "BUILD": _FIRST, "REDUCE": _ARGS, "NEWOBJ": _ARGS,
          "NEWOBJ_EX": _ARGS, "INT": _INT, "LONG": _INT, "LONG1": _INT, "LONG4": _INT}
_KEYS = {"SETITEM": _SECOND, "SETITEMS": _PAIRS, "DICT": _PAIRS, "ADDITEMS": _ALL,
         "FROZENSET": _ALL}
# Estimated bytes of Python objects an opcode makes (a stack slot, a container entry, the
# object), measured on CPython 3.11 (an empty set takes 216 bytes, a dict 64, an object 350).
_OBJECT_BYTES = {"EMPTY_SET": 320, "FROZENSET": 320, "EMPTY_DICT": 128, "DICT": 128,
                 "EMPTY_LIST": 128, "LIST": 128, "REDUCE": 512, "NEWOBJ": 512, "NEWOBJ_EX": 512,
                 "OBJ": 512, "INST": 512, "PROTO": 0, "FRAME": 0, "STOP": 0, "MARK": 8}


def _rule(op: pickletools.OpcodeInfo) -> tuple[int, bool, int, int, int, int, int]:
  """(action, pops to a mark, fixed pops, pushes, key depth rule, keys rule, object bytes)."""
  name, before = op.name, op.stack_before
  marked = name in _MARKED
  pops = before.index(pickletools.markobject) if marked else len(before)
  if name == "OBJ":
    pops = 0  # OBJ's class is above its mark
  pushes = len(op.stack_after)
  kind = _KINDS.get(name, _ZERO)
  push = {_ZERO: _PUSH0, _TUPLE: _PUSH1, _INT: _PUSH_INT}.get(kind, _GENERIC)  # EMPTY_TUPLE: 1
  action = _ACTIONS.get(name, push if not marked and not pops and pushes == 1 else _GENERIC)
  return (action, marked, pops, pushes, kind, _KEYS.get(name, _NO_KEYS),
          _OBJECT_BYTES.get(name, 64))


_RULES = {op: _rule(op) for op in pickletools.opcodes}


def _scan(file: BinaryIO, read: _Read, what: str) -> None:
  """Checks the pickle at `file`'s position, opcode by opcode to its STOP, and leaves `file` at
  its start; raises TorchPickleError naming `read.source` and `what`.

  It follows the unpickler's stack (and marks, as CPython's unpickler keeps them) with, for each
  item, how deeply the item may nest as a tuple: 0 for what hashes safely (strings, bytes, small
  integers, floats, None, containers), 1 for integers of 61 bits or more, 1 + its items' for
  tuples, its arguments' for what a call returns. A dict or set key with a depth of 1 or more is
  one whose hash a file can make collide (tuples of crafted integers, say).
  """
  def refuse(problem: str) -> TorchPickleError:
    return read.error(f"{what}: {problem}")

  start = file.tell()
  budget = read.budget
  stack: list[int] = []
  marks: list[int] = []
  memo: dict[int, int] = {}
  ops = objects = 0  # ops counts the opcodes read
  risky = budget.risky_keys
  top = -1
  room = OBJECT_BUDGET - budget.objects
  fence = 0  # the stack's length at the last mark: items below it are out of reach

  push = stack.append
  try:
    for ops, (op, arg, pos) in enumerate(pickletools.genops(file), 1):
      action, marked, pops, pushes, kind_rule, key_rule, weight = _RULES[op]
      objects += weight
      if objects > room:
        raise refuse(f"its objects would take more than {OBJECT_BUDGET} bytes (estimated from "
                     f"its opcodes, {ops} read)")
      if action == _GET:
        if arg not in memo:
          raise refuse(f"opcode {op.name} at byte {pos} fetches memo index {arg}, which is not "
                       "set")
        push(memo[arg])
        continue
      if action == _PUSH0:
        push(0)
        continue
      if action == _PUSH1:
        push(1)
        continue
      if action == _PUSH_INT:
        push(int(_is_int(arg) and abs(arg) >= _HASH_MODULUS))
        continue
      if action == _MARK:
        marks.append(len(stack))
        fence = len(stack)
        continue
      if action == _EXT:
        raise refuse(f"opcode {op.name} at byte {pos} names a global through the extension "
                     "registry, which is not read")
      if action in (_PUT, _MEMOIZE, _DUP, _POP):
        if action == _POP and marks and marks[-1] == len(stack):
          marks.pop()
          fence = marks[-1] if marks else 0
          continue
        if len(stack) <= fence:
          raise refuse(f"opcode {op.name} at byte {pos} finds an empty stack")
        if action == _DUP:
          stack.append(stack[-1])
        elif action == _POP:
          stack.pop()
        else:
          index = len(memo) if action == _MEMOIZE else arg
          if index < 0:
            raise refuse(f"opcode {op.name} at byte {pos} has a negative memo index")
          memo[index] = stack[-1]
          top = max(top, index)
        continue
      items = ()
      if marked:
        if not marks:
          raise refuse(f"opcode {op.name} at byte {pos} finds no MARK")
        at = marks.pop()
        fence = marks[-1] if marks else 0
        items = stack[at:]
        del stack[at:]
      popped = ()
      if pops:
        if len(stack) - pops < fence:
          raise refuse(f"opcode {op.name} at byte {pos} finds too few items on the stack")
        popped = stack[-pops:]
        del stack[-pops:]
      if key_rule != _NO_KEYS:
        keys = popped[1:2] if key_rule == _SECOND else items[0::2] if key_rule == _PAIRS else items
        for depth in keys:
          if depth:
            if depth > KEY_DEPTH:
              raise refuse(f"a dict or set key is a tuple nested {depth} deep (at most "
                           f"{KEY_DEPTH})")
            risky += 1
        if risky > RISKY_KEYS:
          raise refuse(f"more than {RISKY_KEYS} of its dict and set keys are tuples, large "
                       "integers or objects a call returns (keys whose hashes a file can make "
                       "collide)")
      if pushes:
        stack.append(1 + max(items or popped or (0,)) if kind_rule == _TUPLE else
                     popped[0] if kind_rule == _FIRST else popped[1] if kind_rule == _ARGS else
                     0)
  except (TorchPickleError, MemoryError, RecursionError):
    raise  # (the last two: `reading` says what they mean)
  except Exception as e:  # pylint: disable=broad-except  (genops on damaged data)
    raise refuse(f"not a readable pickle: {_describe(e)}") from None
  if top >= ops:
    raise refuse(f"memo index {top} is beyond its {ops} opcodes")
  budget.objects += objects
  budget.risky_keys = risky
  file.seek(start)
