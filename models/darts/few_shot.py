"""The DARTS supernet seen by GM-NAS: edge labels and the masked loss.

:mod:`models.darts.gradient_matching` is independent of any supernet; it
needs to know which weights sit on which edge (a labels pytree) and a
gradient ``grad_fn(weights, masks, batch)`` of a loss in which disabled ops
get zero weight. This module provides both for :class:`SearchNetwork`,
whose edges into one node are stacked (``EdgeStack`` leaves
``[n_edges, ...]``), so an edge's label is one row of a stacked leaf.

Sub-supernet op weights: a disabled op gets weight 0 and the softmax runs
over the enabled ones (:func:`models.darts.op_weights_of`), so a lone op
has weight 1. The official code keeps the softmax over all 8 ops and zeroes
the disabled ones (a lone op weighs ``softmax(α)_o``, 1/8 with uniform α);
the paper does not say. Every op's output ends in a BatchNorm, so the
scale changes the sum of ops only through identity and pooling edges.

References:
  Hu et al., *Generalizing Few-Shot NAS with Gradient Matching*, ICLR 2022,
  §3 (sub-supernets as op subsets per edge).
"""

from typing import Any

import jax
import numpy as np
import optax

import bilevel
from models.darts import gradient_matching as gm
from models.darts.search import SearchNetwork, node_edges
from models.levels import merge_levels


def _keys(path) -> list:
  return [getattr(k, "key", getattr(k, "name", None)) for k in path]


def edge_labels(network: SearchNetwork, lower: Any,
                off_edge: int = gm.SHARED) -> Any:
  """GM-NAS labels of the supernet's weights (``split_levels(...).params
  .lower``): ``edge_label(kind, e)`` for the rows of edge ``e`` of every
  cell of that kind, ``off_edge`` for the stem, the preprocessing and the
  classifier (:data:`gm.SHARED`, the paper; :data:`gm.EXCLUDED`, the
  official code).
  """

  edges = network.alphas_normal.shape[0]

  def label(path, leaf):
    keys = _keys(path)
    if keys[:1] != ["cells"] or keys[2] != "stacks":
      return off_edge
    cell = network.cells[keys[1]]
    node, group = keys[3], keys[4]
    inputs, _ = cell.groups(node)[group]
    kind = "reduce" if cell.reduction else "normal"
    rows = [gm.edge_label(kind, node_edges(node)[i], edges) for i in inputs]
    return np.reshape(rows, (-1,) + (1,) * (np.ndim(leaf) - 1))

  return gm.label_leaves(lower, label)


def cross_entropy_grad_fn(graphdef, upper: Any, rest: Any):
  """``grad_fn(lower, masks, batch)``: ``∇_w`` of the mean cross-entropy of
  the supernet in training mode (batch statistics) with ``op_masks=masks``;
  ``batch = {"images": [B, H, W, 3], "labels": [B]}``; ``upper`` (α) and
  ``rest`` (BN statistics) fixed. Build it once per scoring round: the
  gradient-matching jit is keyed on this function.
  """

  def loss(lower, masks, batch):
    net = merge_levels(graphdef, bilevel.Params(upper, lower), rest)
    logits = net(batch["images"], train=True, op_masks=masks)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, batch["labels"]).mean()

  return jax.grad(loss)
