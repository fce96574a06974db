"""Top-k masks for pruning: hard, per-layer and straight-through.

A mask is a pytree of *scores* whose leaves broadcast against the weights
they prune. Unstructured pruning uses scores shaped like the weights;
structured pruning uses fewer entries, e.g. for a ``[h, w, in, out]``
convolution kernel ``[1, 1, 1, out]`` scores prune whole filters and
``[1, 1, in, 1]`` scores whole input channels. The helpers rank score
*entries* whatever their shapes, so a budget ``k`` counts filters or channels
in the structured case.

Ties are broken deterministically: among equal scores the entry that comes
first in ``jax.flatten_util.ravel_pytree`` order (leaf order, then row-major
index) is kept, as ``lax.top_k`` prefers the lower index.

References:
  Zhang, Yao, Ram, Zhao, Chen, Hong, Wang, Liu, *Advancing Model Pruning via
  Bi-level Optimization*, NeurIPS 2022 (the released code's global top-k of
  scores with a straight-through backward).
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.flatten_util import ravel_pytree

PyTree = Any


def _topk_flat(flat: jax.Array, k: int) -> jax.Array:
  """``{0, 1}`` vector, ones at the ``k`` largest entries of ``flat``."""
  if not 0 <= k <= flat.size:
    raise ValueError(f"{k=} must lie in [0, {flat.size}] (number of scores)")
  _, index = lax.top_k(flat, k)
  return jnp.zeros(flat.shape, flat.dtype).at[index].set(1)


def topk_mask(scores: PyTree, k: int) -> PyTree:
  """Hard mask keeping the ``k`` largest scores across *all* leaves.

  ``mask_i = 1`` if ``s_i`` is among the ``k`` largest entries of the
  concatenated leaves (a global budget, as in BiP's unstructured pruning),
  else ``0``. Not differentiable (zero gradient almost everywhere); see
  :func:`straight_through_topk`.

  Args:
    scores: pytree of score arrays of any shapes.
    k: number of entries kept, a Python int in ``[0, n]``.

  Returns:
    A pytree like ``scores`` (structure, shapes, dtypes) holding exactly ``k``
    ones.

  Raises:
    ValueError: if ``k`` is outside ``[0, n]``.
  """
  flat, unravel = ravel_pytree(scores)
  return unravel(_topk_flat(flat, k))


def _leaf_budget(size: int, fraction: float) -> int:
  return min(size, max(0, int(fraction * size + 0.5)))


def topk_mask_per_leaf(scores: PyTree, fraction: float) -> PyTree:
  """Hard mask keeping a ``fraction`` of the scores of *each* leaf.

  Leaf ``l`` with ``n_l`` entries keeps its ``k_l = round(fraction · n_l)``
  largest scores (a per-layer budget; halves round up).

  Args:
    scores: pytree of score arrays of any shapes.
    fraction: kept fraction in ``[0, 1]``.

  Returns:
    A pytree like ``scores`` with ``k_l`` ones in leaf ``l``.
  """
  def leaf(s):
    s = jnp.asarray(s)
    flat = jnp.ravel(s)
    return _topk_flat(flat, _leaf_budget(flat.size, fraction)).reshape(s.shape)
  return jax.tree.map(leaf, scores)


# Straight-through estimators as custom_jvp rules: the primal output is the
# exact hard mask (``s + stop_gradient(mask − s)`` can round away from
# {0, 1}), the tangent passes through unchanged, and because that tangent map
# is linear JAX transposes it, so reverse mode gets the identity VJP too.
@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def straight_through_topk(scores: PyTree, k: int) -> PyTree:
  """Global top-``k`` mask with a straight-through (identity) derivative.

  Forward: :func:`topk_mask` ``(scores, k)``. Derivative: ``∂mask/∂s := I``,
  so a cotangent reaches ``scores`` unchanged (a ``custom_jvp`` whose tangent
  map is the identity; forward and reverse mode both work).

  Args:
    scores: pytree of score arrays of any shapes.
    k: number of entries kept, a Python int.

  Returns:
    The hard mask, a pytree like ``scores``.
  """
  return topk_mask(scores, k)


@straight_through_topk.defjvp
def _straight_through_topk_jvp(k, primals, tangents):
  (scores,), (tangent,) = primals, tangents
  return topk_mask(scores, k), tangent


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def straight_through_topk_per_leaf(scores: PyTree, fraction: float) -> PyTree:
  """Per-leaf top-``fraction`` mask with a straight-through derivative.

  Forward: :func:`topk_mask_per_leaf`; derivative: the identity, as in
  :func:`straight_through_topk`.

  Args:
    scores: pytree of score arrays of any shapes.
    fraction: kept fraction of each leaf, in ``[0, 1]``.

  Returns:
    The hard mask, a pytree like ``scores``.
  """
  return topk_mask_per_leaf(scores, fraction)


@straight_through_topk_per_leaf.defjvp
def _straight_through_topk_per_leaf_jvp(fraction, primals, tangents):
  (scores,), (tangent,) = primals, tangents
  return topk_mask_per_leaf(scores, fraction), tangent


def binarize(scores: PyTree, k: int) -> PyTree:
  """Final binarisation of a relaxed mask: keep its ``k`` largest entries.

  BiP's last step (Zhang et al., 2022, Sec. 4): ``m ∈ [0, 1]ⁿ`` after
  training becomes ``m ∈ {0, 1}ⁿ`` with ``1ᵀm = k``. No gradient flows.

  Args:
    scores: pytree of relaxed mask (or score) arrays.
    k: number of entries kept (global budget).

  Returns:
    A pytree like ``scores`` with exactly ``k`` ones.
  """
  return topk_mask(jax.lax.stop_gradient(scores), k)
