"""Dispatch: the routed expert FFN, by three interchangeable paths.

Given a :class:`~models.moe.routing.Routing` ``(weights, experts)`` over
``E`` experts with weights ``W_in [E, d, f]`` and ``W_out [E, f, d]``,

    y_t = Σ_{j kept} weights[t, j] · FFN_{experts[t, j]}(x_t),
    FFN_e(x) = act(x W_in[e]) W_out[e],

where a slot is kept iff it is active (weight ≠ 0) and, with a capacity
``C``, it is among the first ``C`` assignments of its expert in slot-major
order (every token's first choice before any second choice, tokens in order;
GShard, Algorithm 1). Dropped assignments contribute nothing and are counted.
The paths compute the same function:

=================  ===========================================================
path               evaluation
=================  ===========================================================
``"one_hot"``      dense dispatch/combine tensors ``[T, E, C]`` and einsums
                   (the oracle; ``O(T·E·C·d)`` extra work)
``"ragged_dot"``   sort the assignments by expert, ``jax.lax.ragged_dot``
``"pallas"``       the same sort, :func:`kernels.grouped_matmul`
=================  ===========================================================

The sorted paths are dropless unless a capacity is given, in which case the
over-capacity assignments are sent to no group; none of them pads to ``C``.

References:
  Lepikhin et al., *GShard*, ICLR 2021, §2.2 and Algorithm 1 (capacity,
  one-hot dispatch and combine tensors).
  Gale et al., *MegaBlocks*, MLSys 2023, §4 (sort-based dropless dispatch
  with grouped matmuls).
"""

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

import kernels
from models.moe.routing import Routing

DISPATCH_PATHS = ("one_hot", "ragged_dot", "pallas")
_F32 = jnp.float32

Activation = Callable[[jax.Array], jax.Array]


class MoeOutput(NamedTuple):
  """Output of a routed expert FFN.

  Attributes:
    y: ``[T, d]`` the combined expert outputs, in the dtype of ``x``.
    num_dropped: int32, active assignments dropped by the capacity (``0``
      when dropless).
  """

  y: jax.Array
  num_dropped: jax.Array


def check_ffn_shapes(x: jax.Array, routing: Routing, w_in: jax.Array,
                     w_out: jax.Array) -> None:
  """Raises ``ValueError`` naming the shapes unless they fit together."""
  if x.ndim != 2 or w_in.ndim != 3 or w_out.ndim != 3:
    raise ValueError(f"expected x [T, d], w_in [E, d, f], w_out [E, f, d]; "
                     f"got {x.shape=}, {w_in.shape=}, {w_out.shape=}")
  (num_experts, dim, hidden) = w_in.shape
  if x.shape[1] != dim or w_out.shape != (num_experts, hidden, dim):
    raise ValueError(f"x [T, d], w_in [E, d, f] and w_out [E, f, d] disagree: "
                     f"{x.shape=}, {w_in.shape=}, {w_out.shape=}")
  weights, experts = routing.weights, routing.experts
  if (weights.ndim != 2 or weights.shape != experts.shape
      or weights.shape[0] != x.shape[0]):
    raise ValueError(f"routing weights and experts must be [T, k_max] with "
                     f"T = {x.shape[0]}, got {weights.shape=}, "
                     f"{experts.shape=}")


def check_capacity(capacity: int | None) -> None:
  """Raises ``ValueError`` unless ``capacity`` is ``None`` or an int ≥ 1."""
  if capacity is not None and (not isinstance(capacity, int) or capacity < 1):
    raise ValueError(f"{capacity=} must be a positive int or None (dropless)")


def queue_positions(weights: jax.Array, experts: jax.Array,
                    num_experts: int) -> jax.Array:
  """Place of each active assignment in its expert's slot-major queue.

  ``position[t, j] = #{(t', j') active on experts[t, j] : j' < j or
  (j' = j and t' < t)}``; a capacity ``C`` keeps ``position < C``.

  Args:
    weights: ``[T, k]`` routing weights (``0``: inactive slot).
    experts: ``[T, k]`` int expert indices.
    num_experts: ``E``.

  Returns:
    ``[T, k]`` int32; meaningless where the slot is inactive.
  """
  one_hot = jax.nn.one_hot(experts, num_experts, dtype=jnp.int32)
  one_hot = one_hot * (weights != 0)[..., None]
  slot_major = jnp.swapaxes(one_hot, 0, 1).reshape(-1, num_experts)
  # Exclusive cumsum: the assignments already queued before this one.
  queue = jnp.cumsum(slot_major, axis=0) - slot_major
  position = jnp.sum(queue * slot_major, axis=-1)
  return jnp.swapaxes(position.reshape(experts.shape[1], -1), 0, 1)


def batched_expert_ffn(buffers: jax.Array, w_in: jax.Array, w_out: jax.Array,
                       activation: Activation) -> jax.Array:
  """``out[e, c] = act(buffers[e, c] W_in[e]) W_out[e]``, f32-accumulated.

  Args:
    buffers: ``[E, C, d]`` tokens queued per expert.
    w_in: ``[E, d, f]``.
    w_out: ``[E, f, d]``.
    activation: elementwise nonlinearity.

  Returns:
    ``[E, C, d]`` in the dtype of ``buffers``.
  """
  dtype = buffers.dtype
  hidden = jnp.einsum("ecd,edf->ecf", buffers, w_in.astype(dtype),
                      preferred_element_type=_F32)
  hidden = activation(hidden.astype(dtype))
  out = jnp.einsum("ecf,efd->ecd", hidden, w_out.astype(dtype),
                   preferred_element_type=_F32)
  return out.astype(dtype)


def _one_hot_ffn(x, weights, experts, w_in, w_out, activation, capacity):
  """GShard dispatch: ``D[t, e, c] = 1`` iff a kept slot of ``t`` sits at
  place ``c`` of expert ``e``'s queue; ``Cmb = D`` scaled by its weight."""
  num_tokens, num_experts = x.shape[0], w_in.shape[0]
  # A token's active experts are distinct, so no expert queues more than T.
  capacity = num_tokens if capacity is None else capacity
  active = weights != 0
  position = queue_positions(weights, experts, num_experts)
  # one_hot of a position >= capacity is all zeros: the drop.
  slots = (jax.nn.one_hot(experts, num_experts, dtype=_F32)[..., None]
           * jax.nn.one_hot(position, capacity, dtype=_F32)[..., None, :]
           * active[..., None, None])
  dispatch = jnp.sum(slots, axis=1)
  combine = jnp.einsum("tk,tkec->tec", weights.astype(_F32), slots)
  dtype = jnp.result_type(x, w_in, w_out)
  buffers = jnp.einsum("tec,td->ecd", dispatch.astype(dtype), x.astype(dtype))
  out = batched_expert_ffn(buffers, w_in, w_out, activation)
  y = jnp.einsum("tec,ecd->td", combine, out.astype(_F32))
  num_dropped = jnp.sum(active & (position >= capacity), dtype=jnp.int32)
  return MoeOutput(y.astype(x.dtype), num_dropped)


def _ragged_dot(lhs, rhs, group_sizes):
  return lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=_F32)


def _sort_keys(weights, experts, num_experts, capacity):
  """Flat slot-major group keys, ``E`` for no group, and the drop count."""
  active = (weights != 0).T.reshape(-1)
  keys = jnp.where(active, experts.T.reshape(-1), num_experts)
  if capacity is None:
    return keys.astype(jnp.int32), jnp.zeros((), jnp.int32)
  # A stable sort keeps slot-major order inside each expert's group, so the
  # rank in the group is the place in the queue.
  order = jnp.argsort(keys, stable=True)
  starts = jnp.searchsorted(keys[order], keys[order], side="left")
  rank = jnp.zeros_like(keys).at[order].set(jnp.arange(keys.size) - starts)
  kept = active & (rank < capacity)
  num_dropped = jnp.sum(active & ~kept, dtype=jnp.int32)
  return jnp.where(kept, keys, num_experts).astype(jnp.int32), num_dropped


def _sorted_ffn(x, weights, experts, w_in, w_out, activation, capacity, gmm):
  """Dropless dispatch: sort (slot, token) pairs by expert, grouped matmuls,
  unsort, combine. Unkept pairs sort last, past every group."""
  (num_tokens, k), num_experts = weights.shape, w_in.shape[0]
  keys, num_dropped = _sort_keys(weights, experts, num_experts, capacity)
  order = jnp.argsort(keys, stable=True)
  group_sizes = jnp.zeros(num_experts, jnp.int32).at[keys].add(1, mode="drop")
  dtype = jnp.result_type(x, w_in, w_out)
  rows = x.astype(dtype)[order % num_tokens]
  hidden = activation(gmm(rows, w_in.astype(dtype), group_sizes).astype(dtype))
  out = gmm(hidden, w_out.astype(dtype), group_sizes)
  # Select, not multiply: rows in no group must not leak inf/nan.
  in_group = jnp.arange(keys.size) < jnp.sum(group_sizes)
  out = jnp.where(in_group[:, None], out.astype(_F32), 0.0)
  inverse = jnp.zeros_like(order).at[order].set(jnp.arange(keys.size))
  per_slot = out[inverse].reshape(k, num_tokens, -1)
  kept = (keys != num_experts).reshape(k, num_tokens)
  combine = jnp.where(kept, weights.T.astype(_F32), 0.0)
  y = jnp.einsum("kt,ktd->td", combine, per_slot)
  return MoeOutput(y.astype(x.dtype), num_dropped)


def moe_ffn(
    x: jax.Array,
    routing: Routing,
    w_in: jax.Array,
    w_out: jax.Array,
    *,
    activation: Activation = jax.nn.gelu,
    path: str = "one_hot",
    capacity: int | None = None,
    tiling: kernels.GroupedMatmulTiling | None = None,
) -> MoeOutput:
  """The routed expert FFN ``y_t = Σ_j w_{t,j} act(x_t W_in[e]) W_out[e]``.

  Every path gives the same ``y`` and ``num_dropped`` (up to float rounding)
  and the same gradients in ``x``, ``routing.weights``, ``w_in`` and
  ``w_out``; see the module docstring for the capacity rule. Expert matmuls
  run in ``result_type(x, w_in, w_out)`` with f32 accumulation; the combine
  is in f32.

  Args:
    x: ``[T, d]`` tokens.
    routing: a :class:`Routing` ``[T, k_max]`` over ``E`` experts; slots of
      weight 0 contribute nothing. ``aux`` is not read.
    w_in: ``[E, d, f]`` expert input projections.
    w_out: ``[E, f, d]`` expert output projections.
    activation: elementwise nonlinearity between the two projections.
    path: one of ``DISPATCH_PATHS``.
    capacity: assignments each expert serves (static), or ``None``:
      dropless (the ``"one_hot"`` buffers then hold ``C = T`` slots).
    tiling: tile sizes of ``path="pallas"`` (default
      :class:`kernels.GroupedMatmulTiling`); an error on the other paths.

  Returns:
    :class:`MoeOutput` ``(y [T, d] in x.dtype, num_dropped int32)``.

  Raises:
    ValueError: unknown path, shapes that disagree, a non-positive capacity,
      a tiling on a path other than ``"pallas"``.
  """
  check_ffn_shapes(x, routing, w_in, w_out)
  check_capacity(capacity)
  if path not in DISPATCH_PATHS:
    raise ValueError(f"{path=} is not one of {DISPATCH_PATHS}")
  if tiling is not None and path != "pallas":
    raise ValueError(f"tiling applies to path='pallas' only, got {path=}")
  args = (x, routing.weights, routing.experts, w_in, w_out, activation,
          capacity)
  if path == "one_hot":
    return _one_hot_ffn(*args)
  if path == "ragged_dot":
    return _sorted_ffn(*args, gmm=_ragged_dot)
  tiling = kernels.GroupedMatmulTiling() if tiling is None else tiling
  gmm = lambda lhs, rhs, sizes: kernels.grouped_matmul(lhs, rhs, sizes,
                                                       tiling=tiling)
  return _sorted_ffn(*args, gmm=gmm)
