"""The routing contract every router returns, and the helpers routers share.

A router maps token representations ``x [T, d]`` to a :class:`Routing`:
``weights [T, k_max]`` and ``experts [T, k_max]`` (int32) list, for each
token, the experts it goes to and their combine weights, so that an MoE layer
computes

    y_t = Σ_j weights[t, j] · E_{experts[t, j]}(x_t).

Dispatch (which evaluates the ``E_i``) is separate; it only needs this pair.
``k_max`` is static, so dynamic-k routers (top-p, DynMoLE, expert choice)
pad. The conventions:

* a slot is *active* iff its weight is non-zero; inactive slots (top-p's
  unused tail, assignments dropped by a capacity, expert choice's empty
  slots) carry weight ``0`` and expert ``0``, a valid index;
* the active slots of a token name distinct experts;
* ``aux`` is a dict of arrays for losses and metrics. Learned routers put
  the router ``'logits'`` and ``'probs'`` ``[T, E]`` there (f32); token-choice
  routers add ``'choice_mask'`` ``[T, E]`` (the experts each token chose,
  before any capacity: what Switch-style load balancing counts) and
  ``'num_dropped'`` (assignments removed by a capacity, ``0`` if dropless).

Router logits, probabilities and weights are computed in f32 whatever the
dtype of ``x``: the softmax and the top-k decisions are the part of an MoE
that bf16 rounding hurts most.
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax


class Routing(NamedTuple):
  """Per-token expert assignment.

  Attributes:
    weights: ``[T, k_max]`` f32 combine weights; ``0`` marks an unused slot.
    experts: ``[T, k_max]`` int32 expert indices in ``[0, E)``.
    aux: dict of arrays for losses and metrics (see the module docstring).
  """

  weights: jax.Array
  experts: jax.Array
  aux: dict[str, jax.Array]


def router_logits(x: jax.Array, w_router: jax.Array) -> jax.Array:
  """Linear router ``h = x W_r`` in f32.

  Args:
    x: ``[T, d]`` token representations.
    w_router: ``[d, E]`` router weights.

  Returns:
    ``[T, E]`` f32 logits.

  Raises:
    ValueError: if the shapes do not match.
  """
  if x.ndim != 2 or w_router.ndim != 2 or x.shape[1] != w_router.shape[0]:
    raise ValueError(
        f"router expects x [T, d] and w_router [d, E], got {x.shape=} and"
        f" {w_router.shape=}")
  return x.astype(jnp.float32) @ w_router.astype(jnp.float32)


def check_k(k: int, num_experts: int, name: str = "k") -> None:
  """Raises ``ValueError`` unless ``1 <= k <= num_experts``."""
  if not 1 <= k <= num_experts:
    raise ValueError(f"{name}={k} must lie in [1, {num_experts=}]")


def mask_slots(weights: jax.Array, experts: jax.Array, keep: jax.Array,
               aux: dict[str, jax.Array]) -> Routing:
  """A :class:`Routing` whose slots outside ``keep`` get weight 0, expert 0."""
  return Routing(
      jnp.where(keep, weights, 0.0).astype(jnp.float32),
      jnp.where(keep, experts, 0).astype(jnp.int32), aux)


def dense_weights(routing: Routing, num_experts: int) -> jax.Array:
  """Combine weights scattered to a dense matrix.

  ``G[..., t, i] = Σ_j weights[..., t, j] · [experts[..., t, j] = i]``.

  Args:
    routing: a :class:`Routing` with arrays ``[..., T, k_max]``.
    num_experts: ``E``.

  Returns:
    ``[..., T, E]`` f32.
  """
  one_hot = jax.nn.one_hot(routing.experts, num_experts, dtype=jnp.float32)
  return jnp.einsum("...k,...ke->...e", routing.weights, one_hot)


def dense_mask(routing: Routing, num_experts: int) -> jax.Array:
  """``[..., T, E]`` bool, true where a token has an active slot on expert i."""
  one_hot = jax.nn.one_hot(routing.experts, num_experts, dtype=jnp.bool_)
  return jnp.any(one_hot & (routing.weights != 0)[..., None], axis=-2)


def num_active(routing: Routing) -> jax.Array:
  """``[..., T]`` int32, the number of experts each token is sent to."""
  return jnp.sum(routing.weights != 0, axis=-1, dtype=jnp.int32)


def top_k_of_probs(probs: jax.Array, k: int, *,
                   renormalize: bool = False) -> tuple[jax.Array, jax.Array]:
  """The ``k`` largest probabilities per token and their experts.

  ``weights = P[TopK]``, or ``P[TopK] / Σ_{TopK} P`` with ``renormalize``.
  Ties go to the lower expert index (``lax.top_k``).

  Args:
    probs: ``[T, E]`` router probabilities.
    k: experts per token.
    renormalize: whether the selected weights are rescaled to sum to 1.

  Returns:
    ``(weights [T, k] f32, experts [T, k] int32)``, sorted by weight.
  """
  check_k(k, probs.shape[-1])
  weights, experts = lax.top_k(probs, k)
  if renormalize:
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  return weights.astype(jnp.float32), experts.astype(jnp.int32)


def expert_capacity(num_tokens: int, num_experts: int, k: int,
                    capacity_factor: float, min_capacity: int = 1) -> int:
  """Slots per expert, ``C = max(min_capacity, ⌈cf · T · k / E⌉)``, ≤ ``T``.

  ``cf = 1`` gives each expert exactly its share of the ``T · k``
  assignments; Switch and GShard train with ``cf`` 1.0–1.25 (Fedus et al.,
  2022, §2.2; Lepikhin et al., 2021, §2.2). An expert never needs more than
  ``T`` slots because a token's experts are distinct.
  """
  if capacity_factor <= 0:
    raise ValueError(f"{capacity_factor=} must be positive (None: dropless)")
  wanted = math.ceil(capacity_factor * num_tokens * k / num_experts)
  return min(num_tokens, max(min_capacity, wanted))


def apply_capacity(routing: Routing, num_experts: int,
                   capacity: int) -> Routing:
  """Keeps at most ``capacity`` assignments per expert, drops the rest.

  Priority is slot-major, as in GShard and Switch: every token's first
  choice is served before any second choice, tokens in order within a slot
  (Lepikhin et al., 2021, Algorithm 1). An assignment whose position in its
  expert's queue is ``>= capacity`` gets weight 0 (the token keeps only its
  residual path for it).

  Args:
    routing: a token-choice :class:`Routing` ``[T, k]``.
    num_experts: ``E``.
    capacity: slots per expert, e.g. from :func:`expert_capacity`.

  Builds ``[T, k, E]`` one-hot queues: the dense reference, fine for
  routers and tests; a sort-based dispatch needs no such tensor.

  Returns:
    The routing with dropped slots zeroed and, in ``aux``: ``'num_dropped'``
    (int32, active assignments removed), ``'dropped_load'`` ``[E]`` (the same
    per expert) and ``'capacity'`` (int32).
  """
  active = routing.weights != 0
  one_hot = jax.nn.one_hot(routing.experts, num_experts, dtype=jnp.int32)
  one_hot = one_hot * active[..., None]
  slot_major = jnp.swapaxes(one_hot, 0, 1).reshape(-1, num_experts)
  # Exclusive cumsum: how many earlier assignments already sit in the queue.
  queue = jnp.cumsum(slot_major, axis=0) - slot_major
  position = jnp.sum(queue * slot_major, axis=-1)
  position = jnp.swapaxes(position.reshape(one_hot.shape[1], -1), 0, 1)
  keep = active & (position < capacity)
  dropped = active & ~keep
  aux = dict(routing.aux)
  aux["num_dropped"] = jnp.sum(dropped, dtype=jnp.int32)
  aux["dropped_load"] = jnp.sum(
      one_hot * dropped[..., None], axis=(0, 1), dtype=jnp.int32)
  aux["capacity"] = jnp.asarray(capacity, jnp.int32)
  return mask_slots(routing.weights, routing.experts, keep, aux)
