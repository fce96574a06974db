"""Expert parallelism: the routed expert FFN with experts sharded over devices.

``n`` devices on a mesh axis (``"expert"`` by default) each hold ``T / n``
tokens and ``E / n`` experts (device ``s`` owns experts ``[s E/n, (s+1)
E/n)``), as in GShard and MaxText's capacity path. On each device:

1. queue its local assignments per expert in slot-major order and keep the
   first ``C`` per expert (the per-device capacity);
2. pack them into a buffer ``[E, C, d]``, zeros in unused slots;
3. ``all_to_all``: device ``s`` receives ``[n, E/n, C, d]``, the slots every
   device packed for its experts;
4. run its experts on ``[E/n, n·C, d]``;
5. ``all_to_all`` back and combine ``y_t = Σ_{j kept} w_{t,j} out[e, c]``.

Capacity semantics: ``C`` bounds the assignments that *one device* sends to
*one expert*, so an expert serves at most ``n·C``. The result therefore
equals, exactly, the single-device one-hot layer applied to each device's
block of ``T / n`` tokens on its own:

    expert_parallel_ffn(x, r, ..., capacity=C).y
      == concat_s moe_ffn(x_s, r_s, ..., path="one_hot", capacity=C).y,

with the drop counts summed over devices. ``capacity=None`` takes
``C = T / n``, which never drops (a token's active experts are distinct), so
the layer then equals the dropless ``moe_ffn`` on all ``T`` tokens. Buffers
are fixed-size because ``ragged_all_to_all`` does not run on CPU.

References:
  Lepikhin et al., *GShard*, ICLR 2021, §2.2–3.1 (token groups per device,
  per-group expert capacity, all-to-all dispatch).
"""

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, PartitionSpec

from models.moe.dispatch import (
    Activation,
    MoeOutput,
    batched_expert_ffn,
    check_capacity,
    check_ffn_shapes,
    queue_positions,
)
from models.moe.routing import Routing

_F32 = jnp.float32


def _shard_map(fn, *, mesh, in_specs, out_specs):
  if hasattr(jax, "shard_map"):
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs,
                         out_specs=out_specs)
  # Only for jax versions that predate jax.shard_map.
  from jax.experimental.shard_map import shard_map
  return shard_map(fn, mesh, in_specs, out_specs)


def _exchange(buffers: jax.Array, axis_name: str) -> jax.Array:
  """Block ``s`` of axis 0 goes to device ``s``; received blocks are stacked
  by source device on axis 0."""
  return lax.all_to_all(buffers, axis_name, 0, 0, tiled=True)


def expert_parallel_ffn_local(
    x: jax.Array,
    routing: Routing,
    w_in: jax.Array,
    w_out: jax.Array,
    *,
    axis_name: str,
    capacity: int | None = None,
    activation: Activation = jax.nn.gelu,
) -> MoeOutput:
  """One device's share of :func:`expert_parallel_ffn`, inside ``shard_map``.

  Call it from a ``jax.shard_map`` body over ``axis_name``, e.g. right after
  routing the local tokens with any router (see the module docstring for the
  steps and the capacity semantics).

  Args:
    x: ``[T_local, d]`` this device's tokens.
    routing: a :class:`Routing` ``[T_local, k_max]`` with global expert
      indices in ``[0, E)``; ``aux`` is not read.
    w_in: ``[E / n, d, f]`` this device's experts.
    w_out: ``[E / n, f, d]``.
    axis_name: the mesh axis of size ``n`` the experts are sharded over.
    capacity: assignments this device may send to each expert, or ``None``
      for ``T_local`` (never drops).
    activation: elementwise nonlinearity of the experts.

  Returns:
    :class:`MoeOutput` with ``y [T_local, d]`` and ``num_dropped`` summed
    over the axis (the same on every device).
  """
  check_ffn_shapes(x, routing, w_in, w_out)
  check_capacity(capacity)
  num_devices = lax.axis_size(axis_name)
  local_experts, dim = w_in.shape[0], x.shape[1]
  num_experts = num_devices * local_experts
  capacity = x.shape[0] if capacity is None else capacity
  weights, experts = routing.weights, routing.experts
  active = weights != 0
  position = queue_positions(weights, experts, num_experts)
  kept = active & (position < capacity)
  # Out-of-range rows make the scatter skip, and the gather fill, unkept slots.
  rows = jnp.where(kept, experts, num_experts)
  dtype = jnp.result_type(x, w_in, w_out)
  tokens = jnp.broadcast_to(x.astype(dtype)[:, None], (*weights.shape, dim))
  packed = jnp.zeros((num_experts, capacity, dim), dtype)
  packed = packed.at[rows, position].add(tokens, mode="drop")

  received = _exchange(packed, axis_name)
  received = received.reshape(num_devices, local_experts, capacity, dim)
  received = jnp.swapaxes(received, 0, 1).reshape(local_experts, -1, dim)
  out = batched_expert_ffn(received, w_in, w_out, activation)
  out = out.reshape(local_experts, num_devices, capacity, dim)
  out = jnp.swapaxes(out, 0, 1).reshape(num_experts, capacity, dim)
  returned = _exchange(out, axis_name)

  per_slot = returned.at[rows, position].get(mode="fill", fill_value=0)
  combine = jnp.where(kept, weights.astype(_F32), 0.0)
  y = jnp.einsum("tk,tkd->td", combine, per_slot.astype(_F32))
  num_dropped = lax.psum(jnp.sum(active & ~kept, dtype=jnp.int32), axis_name)
  return MoeOutput(y.astype(x.dtype), num_dropped)


def expert_parallel_ffn(
    x: jax.Array,
    routing: Routing,
    w_in: jax.Array,
    w_out: jax.Array,
    *,
    mesh: Mesh,
    axis_name: str = "expert",
    capacity: int | None = None,
    activation: Activation = jax.nn.gelu,
) -> MoeOutput:
  """The routed expert FFN with tokens and experts sharded over ``axis_name``.

  Same contract as :func:`~models.moe.dispatch.moe_ffn`, computed with
  ``jax.shard_map`` and two ``all_to_all`` exchanges of fixed-capacity
  buffers (module docstring). Rows of ``x`` and ``routing`` are split into
  ``n`` contiguous blocks, one per device, experts likewise.

  Args:
    x: ``[T, d]`` tokens, ``T`` a multiple of ``n = mesh.shape[axis_name]``.
    routing: a :class:`Routing` ``[T, k_max]`` over ``E`` experts; ``aux`` is
      not read.
    w_in: ``[E, d, f]``, ``E`` a multiple of ``n``.
    w_out: ``[E, f, d]``.
    mesh: a mesh with axis ``axis_name`` (other axes replicate).
    axis_name: the expert-parallel mesh axis.
    capacity: per-device, per-expert capacity (static), or ``None`` for
      ``T / n`` (dropless).
    activation: elementwise nonlinearity of the experts.

  Returns:
    :class:`MoeOutput` ``(y [T, d] sharded like x, num_dropped)``, where
    ``num_dropped`` counts the drops on all devices.

  Raises:
    ValueError: shapes that disagree, or ``T`` or ``E`` not a multiple of
      ``n``.
  """
  check_ffn_shapes(x, routing, w_in, w_out)
  num_devices = mesh.shape[axis_name]
  if x.shape[0] % num_devices or w_in.shape[0] % num_devices:
    raise ValueError(
        f"tokens T={x.shape[0]} and experts E={w_in.shape[0]} must be "
        f"multiples of the {num_devices} devices on axis {axis_name!r}")
  check_capacity(capacity)

  def local(x, weights, experts, w_in, w_out):
    return expert_parallel_ffn_local(
        x, Routing(weights, experts, {}), w_in, w_out, axis_name=axis_name,
        capacity=capacity, activation=activation)

  shard = PartitionSpec(axis_name)
  fn = _shard_map(local, mesh=mesh, in_specs=(shard,) * 5,
                  out_specs=MoeOutput(shard, PartitionSpec()))
  return fn(x, routing.weights, routing.experts, w_in, w_out)
