"""Matmul work and op counts read from optimized HLO text (no JAX needed).

Every ``dot`` costs ``2·M·N·K`` flops (the product of the output dimensions
times the contracted sizes, times 2). A dot inside a ``while`` body counts
once per iteration (XLA's ``known_trip_count``), inside a fusion or a call
once per call. Work is reported in units of one ``2000×784×256`` matmul, the
first layer's forward at the compute shape.
"""

import math
import re

UNIT_FLOPS = 2 * 2000 * 784 * 256

_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\(.*?\)|[\w]+\[[\d,]*\]"
    r"(?:\{[^}]*\})?)\s+([\w\-]+)\((.*?)\)(.*)$")
_SHAPE = re.compile(r"^\w+\[([\d,]*)\]")
_CALLEE = re.compile(
    r"\b(?:calls|to_apply|body|condition|branch_computations)=\{?%?([\w.\-]+)")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')


def _dims(shape: str) -> list[int]:
  match = _SHAPE.match(shape)
  if not match or not match.group(1):
    return []
  return [int(d) for d in match.group(1).split(",")]


def _parse(hlo_text: str):
  """``({computation: [(name, shape, opcode, operands, attrs)]}, entry)``."""
  computations, entry, current = {}, None, None
  for line in hlo_text.splitlines():
    if current is None or line.startswith(("ENTRY", "%")) or (
        line and not line[0].isspace() and line.rstrip().endswith("{")):
      match = _COMPUTATION.match(line)
      if match:
        current = match.group(2)
        computations[current] = []
        if match.group(1):
          entry = current
        continue
    if line.strip() == "}":
      current = None
      continue
    match = _INSTRUCTION.match(line)
    if match and current is not None:
      computations[current].append(match.groups())
  return computations, entry


def _operand_shape(operand: str, shapes: dict[str, str]) -> str:
  operand = operand.strip()
  if "[" in operand.split("%")[0]:
    return operand.split()[0]
  return shapes.get(operand.lstrip("%").split()[0], "")


def _dot_flops(shape, operands, attrs, shapes) -> int:
  lhs = _dims(_operand_shape(_split_operands(operands)[0], shapes))
  match = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", attrs)
  contract = [int(d) for d in match.group(1).split(",")] if (
      match and match.group(1)) else []
  return 2 * math.prod(_dims(shape)) * math.prod(lhs[d] for d in contract)


def _split_operands(operands: str) -> list[str]:
  parts, depth, current = [], 0, ""
  for ch in operands:
    if ch in "({[":
      depth += 1
    elif ch in ")}]":
      depth -= 1
    if ch == "," and depth == 0:
      parts.append(current)
      current = ""
    else:
      current += ch
  return parts + [current]


def _walk(hlo_text: str, visit, unknown_trip_count: int = 1) -> None:
  """Calls ``visit(instruction, times, shapes, fused)`` for every executed op.

  ``times`` is how often the instruction runs per call of the entry
  computation; ``fused`` whether it sits inside a fusion. A ``while`` whose
  trip count XLA does not know (a Krylov loop with a data-dependent stop)
  runs ``unknown_trip_count`` times: the caller states it.
  """
  computations, entry = _parse(hlo_text)
  shapes = {name: shape for instrs in computations.values()
            for name, shape, *_ in instrs}

  def go(name, times, fused):
    for instr in computations.get(name, []):
      _, _, opcode, _, attrs = instr
      visit(instr, times, shapes, fused)
      trip = _TRIP.search(attrs)
      inner = times
      if opcode == "while":
        inner *= int(trip.group(1)) if trip else unknown_trip_count
      for callee in _CALLEE.findall(attrs):
        go(callee, inner, fused or opcode == "fusion")

  go(entry, 1, False)


def matmul_flops(hlo_text: str, unknown_trip_count: int = 1) -> int:
  """Total ``2·M·N·K`` flops of the dots executed by one call.

  ``unknown_trip_count``: see :func:`_walk`.
  """
  total = 0

  def visit(instr, times, shapes, fused):
    nonlocal total
    del fused
    _, shape, opcode, operands, attrs = instr
    if opcode == "dot":
      total += times * _dot_flops(shape, operands, attrs, shapes)

  _walk(hlo_text, visit, unknown_trip_count)
  return total


def matmul_work(hlo_text: str, unknown_trip_count: int = 1) -> float:
  """:func:`matmul_flops` in units of one ``2000×784×256`` matmul."""
  return matmul_flops(hlo_text, unknown_trip_count) / UNIT_FLOPS


_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast"}


def op_count(hlo_text: str) -> int:
  """Ops executed per call: unfused instructions that do work, × trip count.

  A fusion counts as one op; parameters, constants, tuples and bitcasts
  (no kernel) are not counted; a while loop's body and condition count once
  per iteration.
  """
  total = 0

  def visit(instr, times, shapes, fused):
    nonlocal total
    del shapes
    if not fused and instr[2] not in _FREE:
      total += times

  _walk(hlo_text, visit)
  return total
