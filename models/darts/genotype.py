"""Genotype derivation: the discrete cell read off the architecture logits.

For each intermediate node, an incoming edge's strength is the largest
weight of its non-``none`` operations (DARTS: ``softmax(α_e)``; PC-DARTS:
``softmax(α_e) · softmax(β)_e`` with ``β`` normalised over the node's
incoming edges); the two strongest edges are kept, each with its arg-max
non-``none`` operation. The cell's output concatenates nodes 2–5.

References:
  Liu et al., *DARTS*, ICLR 2019, §2.4 (and ``model_search.py::genotype``).
  Xu et al., *PC-DARTS*, ICLR 2020, §3.3.
"""

from typing import NamedTuple

import numpy as np

from models.darts.ops import PRIMITIVES
from models.darts.search import steps_of

_NONE = PRIMITIVES.index("none")


class Genotype(NamedTuple):
  """A derived architecture, as the official ``genotypes.py`` writes it.

  Attributes:
    normal: ``(op name, input node)`` pairs, two per intermediate node, the
      stronger edge first.
    normal_concat: the nodes concatenated into the cell's output.
    reduce: the same for the reduction cell.
    reduce_concat: likewise.
  """
  normal: tuple[tuple[str, int], ...]
  normal_concat: tuple[int, ...]
  reduce: tuple[tuple[str, int], ...]
  reduce_concat: tuple[int, ...]


def _softmax(x, axis=-1):
  x = np.asarray(x, np.float64)
  e = np.exp(x - x.max(axis=axis, keepdims=True))
  return e / e.sum(axis=axis, keepdims=True)


def edge_weights(alphas, betas=None) -> np.ndarray:
  """``[edges, 8]`` op weights (``[14, 8]`` in the papers' cells), times
  PC-DARTS's normalised edge weights when ``betas [edges]`` is given."""
  weights = _softmax(alphas)
  if weights.ndim != 2 or weights.shape[1] != len(PRIMITIVES):
    raise ValueError(f"alphas must be [edges, {len(PRIMITIVES)}], got"
                     f" {weights.shape}")
  steps = steps_of(weights.shape[0])
  if betas is None:
    return weights
  betas = np.asarray(betas, np.float64)
  scale, start = np.empty(weights.shape[0]), 0
  for j in range(steps):
    n = 2 + j
    scale[start:start + n] = _softmax(betas[start:start + n])
    start += n
  return weights * scale[:, None]


def derive_cell(weights: np.ndarray) -> tuple[tuple[str, int], ...]:
  """Two ``(op, input)`` pairs per intermediate node from ``[edges, 8]``."""
  cell, start = [], 0
  for j in range(steps_of(weights.shape[0])):
    n = 2 + j
    block = weights[start:start + n]
    strength = np.delete(block, _NONE, axis=1).max(axis=1)
    # Strongest first, as the official stable sort on -strength (ties keep
    # the lower input).
    for i in np.argsort(-strength, kind="stable")[:2]:
      ops = np.delete(np.arange(len(PRIMITIVES)), _NONE)
      best = ops[np.argmax(block[i, ops])]
      cell.append((PRIMITIVES[best], int(i)))
    start += n
  return tuple(cell)


def derive_genotype(alphas_normal, alphas_reduce, betas_normal=None,
                    betas_reduce=None) -> Genotype:
  """The :class:`Genotype` of the architecture logits (module docstring)."""
  concat = tuple(range(2, 2 + steps_of(np.shape(alphas_normal)[0])))
  return Genotype(
      derive_cell(edge_weights(alphas_normal, betas_normal)), concat,
      derive_cell(edge_weights(alphas_reduce, betas_reduce)), concat)
