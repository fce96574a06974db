"""Multiply-accumulate counts of matmuls and convolutions, read from HLO.

The convention of the papers' "FLOPs" columns (fvcore, and
``torch.utils.flop_counter`` halved): only contractions count, one MAC per
multiply-add,

    dot:          MACs = |out| · ∏ lhs contracting dims
    convolution:  MACs = |out| · |kernel| / kernel output features

(``|·|`` is the number of elements), so for ``Conv(k×k, C_in → C_out,
groups g)`` with output ``N×H×W×C_out`` it is ``N·H·W·C_out·k²·C_in/g``;
taps on zero padding count, as in fvcore (XLA's cost analysis skips them).
Elementwise ops, softmax, norms, reductions, gathers and Pallas calls are
not counted.

XLA's ``cost_analysis()`` gives one ``flops`` total for the whole module
(contractions plus elementwise), so it cannot be restricted to these ops;
the counts are read from the shapes of the ``dot`` and ``convolution``
instructions of the *unoptimised* HLO module of ``jax.jit(fn).lower(...)``.
Nothing is compiled, so no backend pass has rewritten small dots or convs
into other ops (XLA:CPU does that). Nested ``jit`` calls are counted once per
call site; a ``while`` body (``lax.scan``, ``fori_loop``) counts once, since
its trip count is not in the HLO; of a ``conditional`` the costliest branch
counts.
"""

import collections
import math
import re
from collections.abc import Callable
from typing import Any

import jax

_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_ARRAY = re.compile(r"^\w+\[([\d,]*)\]")
_OPCODE = re.compile(r"^([\w\-]+)\((.*?)\)(.*)$")
_CALLEES = re.compile(
    r"\b(?:to_apply|body|calls|true_computation|false_computation)"
    r"=%?([\w.\-]+)")
_BRANCHES = re.compile(r"\bbranch_computations=\{([^}]*)\}")


def _dims(attrs: str, key: str) -> list[int]:
  match = re.search(rf"\b{key}=\{{([\d,]*)\}}", attrs)
  return [int(d) for d in match.group(1).split(",") if d] if match else []


def _names(text: str) -> list[str]:
  return [name.strip().lstrip("%") for name in text.split(",")]


def _split_type(rest: str) -> tuple[str, str]:
  """``'f32[2,3]{1,0} dot(a, b), ...'`` → (type, ``'dot(a, b), ...'``)."""
  if rest.startswith("("):  # tuple type: skip to its closing parenthesis
    depth = 0
    for i, char in enumerate(rest):
      depth += {"(": 1, ")": -1}.get(char, 0)
      if depth == 0:
        return rest[:i + 1], rest[i + 1:].lstrip()
  type_, _, op = rest.partition(" ")
  return type_, op


def _shape(type_: str) -> tuple[int, ...] | None:
  match = _ARRAY.match(type_)
  if match is None:
    return None
  return tuple(int(d) for d in match.group(1).split(",") if d)


def _instruction_macs(opcode: str, shape, operands, attrs, shapes) -> int:
  """MACs of one ``dot`` / ``convolution`` instruction, else 0."""
  if opcode == "dot":
    lhs = shapes[operands[0]]
    return math.prod(shape) * math.prod(
        lhs[d] for d in _dims(attrs, "lhs_contracting_dims"))
  if opcode == "convolution":
    kernel = shapes[operands[1]]
    labels = re.search(r"dim_labels=\w+_(\w+)->", attrs).group(1)
    return math.prod(shape) * math.prod(kernel) // kernel[labels.index("o")]
  return 0


def _hlo_macs(hlo_text: str) -> int:
  """Dot and convolution MACs of an HLO module in text form.

  Args:
    hlo_text: an HLO module as printed by ``Lowered.as_text(dialect="hlo")``.

  Returns:
    MACs of the entry computation, callees included (see the module
    docstring for calls, loops and conditionals).
  """
  own = collections.Counter()
  calls = collections.defaultdict(list)  # computation → [(kind, callees)]
  entry = computation = None
  shapes = {}
  for line in hlo_text.splitlines():
    if not line.startswith(" ") and (header := _HEADER.match(line)):
      computation, shapes = header.group(1), {}
      if line.startswith("ENTRY"):
        entry = computation
      continue
    instruction = _INSTRUCTION.match(line)
    if computation is None or instruction is None:
      continue
    name, rest = instruction.groups()
    type_, op = _split_type(rest)
    shapes[name] = shape = _shape(type_)
    parsed = _OPCODE.match(op)
    if parsed is None:
      continue
    opcode, args, attrs = parsed.groups()
    operands = _names(args)
    own[computation] += _instruction_macs(opcode, shape, operands, attrs,
                                          shapes)
    if branches := _BRANCHES.search(attrs):
      calls[computation].append(("max", _names(branches.group(1))))
    calls[computation].extend(("sum", [c]) for c in _CALLEES.findall(attrs))
  if entry is None:
    raise ValueError("no ENTRY computation in the HLO text")
  totals = {}

  def total(name: str) -> int:
    if name not in totals:
      totals[name] = own[name] + sum(
          (max if kind == "max" else sum)(total(c) for c in callees)
          for kind, callees in calls[name])
    return totals[name]

  return total(entry)


def count_macs(fn: Callable[..., Any], *args: Any) -> int:
  """Dot and convolution MACs of one call ``fn(*args)``.

  Lowers ``jax.jit(fn)`` without compiling it and counts the contractions of
  the unoptimised HLO (module docstring: what counts and how). Arguments
  may be ``jax.ShapeDtypeStruct`` pytrees (e.g. the state of
  ``nnx.eval_shape``), so nothing is materialised.

  Args:
    fn: a jittable function; every argument is traced.
    *args: its arguments, arrays or ``jax.ShapeDtypeStruct`` pytrees.

  Returns:
    The number of multiply-accumulates (an ``int``).
  """
  return _hlo_macs(jax.jit(fn).lower(*args).as_text(dialect="hlo"))
