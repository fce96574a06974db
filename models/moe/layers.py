"""Pure layer-level functions around a router: CoE, shared and LoRA experts.

Experts are evaluated by a caller-supplied callable (the dispatch backend),
so these functions only fix how routing, experts and residuals compose.

References:
  Wang et al., *Chain-of-Experts: Unlocking the Communication Power of
  Mixture-of-Experts Models*, arXiv 2506.18945; code ZihanWang314/CoE @
  d2af562 (``CoeMoE``: one gate per iteration, inner residual, shared
  expert at every iteration).
  Dai et al., *DeepSeekMoE*, 2024 (always-on shared experts);
  Qwen2-MoE (a sigmoid gate on the shared expert).
  Hu et al., *LoRA*, ICLR 2022 (``W + (α/r) A B``); *LoRA-Mixer*, arXiv
  2507.00029 and DynMoLE, arXiv 2504.00661 (routed LoRA experts on a
  projection).
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from models.moe.routers import top_k_routing
from models.moe.routing import Routing, dense_weights

ExpertsFn = Callable[[jax.Array, Routing], jax.Array]
SharedFn = Callable[[jax.Array], jax.Array]


def coe_routing_step(x: jax.Array, w_router: jax.Array, *, k: int) -> Routing:
  """One CoE iteration's router: greedy top-k of ``softmax(W_t x)``.

  Raw softmax weights, no renormalisation, dropless (the released config:
  ``norm_topk_prob=false``, scaling factor 1).

  Args:
    x: ``[T, d]`` the previous iteration's output ``x⁽ᵗ⁻¹⁾``.
    w_router: ``[d, E]`` this iteration's gate ``W_t``.
    k: experts per iteration ``K_iter``.

  Returns:
    A :class:`Routing` ``[T, k]`` as from
    :func:`~models.moe.routers.top_k_routing`.
  """
  return top_k_routing(x, w_router, k=k)


def chain_of_experts(
    x: jax.Array,
    w_routers: jax.Array,
    *,
    k: int,
    experts_fn: ExpertsFn,
    shared_fn: SharedFn | None = None,
) -> tuple[jax.Array, Routing]:
  """A Chain-of-Experts layer: ``C`` sequential routed iterations.

  With ``x⁽⁰⁾ = x`` and one gate ``W_t`` per iteration,

      x⁽ᵗ⁾ = Σ_{i ∈ TopK(s_t)} s_{t,i} E_i(x⁽ᵗ⁻¹⁾) + Shared(x⁽ᵗ⁻¹⁾) + x⁽ᵗ⁻¹⁾,
      s_t = softmax(W_t x⁽ᵗ⁻¹⁾),

  and the output is ``x⁽ᶜ⁾``. The experts are the same at every iteration;
  the inner residual is part of the method (an outer residual is no better
  than plain MoE, and a gate shared by all iterations is worse).

  Args:
    x: ``[T, d]`` tokens (post-attention-normed hidden states).
    w_routers: ``[C, d, E]`` one gate per iteration.
    k: experts per iteration.
    experts_fn: ``(x [T, d], routing) -> [T, d]``, the routed mixture
      ``Σ_j weights[t, j] E_{experts[t, j]}(x_t)`` (any dispatch).
    shared_fn: ``x [T, d] -> [T, d]`` shared expert(s), or ``None``.

  Returns:
    ``(y [T, d], routings)`` where ``routings`` is a :class:`Routing` with
    arrays stacked on a leading ``C`` axis, for the per-gate losses (CoE:
    a sequence-scope balance loss per gate, α = 1e-3).
  """
  def step(h, w_router):
    routing = coe_routing_step(h, w_router, k=k)
    out = h + experts_fn(h, routing)
    if shared_fn is not None:
      out = out + shared_fn(h)
    return out.astype(h.dtype), routing
  return lax.scan(step, x, w_routers)


def add_shared_experts(routed: jax.Array, shared: jax.Array, *,
                       gate: jax.Array | None = None) -> jax.Array:
  """Adds always-on shared experts to the routed output.

  ``y_t = routed_t + Σ_s g_{t,s} · shared_{s,t}`` with ``g = 1``
  (DeepSeekMoE) or a per-token gate such as ``sigmoid(x W_g)`` (Qwen2-MoE).

  Args:
    routed: ``[T, d]`` routed-expert output.
    shared: ``[S, T, d]`` outputs of the ``S`` shared experts.
    gate: ``[T, S]`` gates, or ``None`` for 1.

  Returns:
    ``[T, d]`` in the dtype of ``routed``.

  Raises:
    ValueError: mismatched shapes.
  """
  if shared.ndim != 3 or shared.shape[1:] != routed.shape:
    raise ValueError(
        f"shared must be [S, *routed.shape], got {shared.shape=} and"
        f" {routed.shape=}")
  if gate is None:
    total = jnp.sum(shared, axis=0)
  elif gate.shape != (routed.shape[0], shared.shape[0]):
    raise ValueError(f"{gate.shape=} must be [T, S] = "
                     f"{(routed.shape[0], shared.shape[0])}")
  else:
    total = jnp.einsum("ts,std->td", gate, shared)
  return (routed + total).astype(routed.dtype)


def routed_lora(
    x: jax.Array,
    routing: Routing,
    lora_a: jax.Array,
    lora_b: jax.Array,
    *,
    scale: float = 1.0,
) -> jax.Array:
  """Routed low-rank deltas of a projection (LoRA experts).

  ``Δ_t = scale · Σ_j w_{t,j} · x_t A_{e_{t,j}} B_{e_{t,j}}`` with
  ``scale = α / r`` in LoRA's convention (DynMoLE: ``r = 24, α = 48``).
  Computed densely over experts, ``O(T · E · r · (d + d_out))``, which is
  cheap because ``r`` is small; LoRA dropout belongs to the caller.

  Args:
    x: ``[T, d]`` inputs of the projection.
    routing: a :class:`Routing` over the ``E`` adapters.
    lora_a: ``[E, d, r]`` down-projections.
    lora_b: ``[E, r, d_out]`` up-projections.
    scale: ``α / r``.

  Returns:
    ``[T, d_out]`` in the dtype of ``x``.

  Raises:
    ValueError: mismatched shapes.
  """
  num_experts, dim, rank = lora_a.shape
  if (x.shape[-1] != dim or lora_b.shape[:2] != (num_experts, rank)):
    raise ValueError(
        f"expected x [T, d], A [E, d, r], B [E, r, d_out]; got {x.shape=},"
        f" {lora_a.shape=}, {lora_b.shape=}")
  gates = dense_weights(routing, num_experts)
  hidden = jnp.einsum("td,edr->ter", x, lora_a) * gates[..., None]
  delta = jnp.einsum("ter,erf->tf", hidden, lora_b)
  return (scale * delta).astype(x.dtype)


def routed_lora_linear(
    x: jax.Array,
    kernel: jax.Array,
    routing: Routing,
    lora_a: jax.Array,
    lora_b: jax.Array,
    *,
    scale: float = 1.0,
    bias: jax.Array | None = None,
) -> jax.Array:
  """A projection with routed LoRA experts, ``y = x W (+ b) + Δ``.

  Args:
    x: ``[T, d]`` inputs.
    kernel: ``[d, d_out]`` base weights ``W``, usually frozen.
    routing: a :class:`Routing` over the ``E`` adapters.
    lora_a: ``[E, d, r]``.
    lora_b: ``[E, r, d_out]``.
    scale: ``α / r``.
    bias: ``[d_out]`` or ``None``.

  Returns:
    ``[T, d_out]`` in the dtype of ``x``; ``Δ`` is :func:`routed_lora`.
  """
  y = x @ kernel.astype(x.dtype)
  if bias is not None:
    y = y + bias.astype(x.dtype)
  return y + routed_lora(x, routing, lora_a, lora_b, scale=scale)
