"""Fixed-k routers: top-k token choice, expert choice and hash routing.

Each returns a :class:`~models.moe.routing.Routing`; see that module for the
conventions (inactive slots carry weight 0 and expert 0, f32 router maths).

References:
  Shazeer et al., *Outrageously Large Neural Networks: The Sparsely-Gated
  Mixture-of-Experts Layer*, ICLR 2017 (softmax gating, top-k).
  Lepikhin et al., *GShard*, ICLR 2021, §2.2 and Algorithm 1 (capacity,
  slot-major priority).
  Fedus, Zoph, Shazeer, *Switch Transformers*, JMLR 2022, §2.2 (capacity
  factor, dropped tokens).
  Jiang et al., *Mixtral of Experts*, 2024, eq. 1 (``softmax(TopK(h))``).
  Zhou et al., *Mixture-of-Experts with Expert Choice Routing*, NeurIPS
  2022, §3.1 (each expert picks its top-C tokens).
  Roller et al., *Hash Layers For Large Sparse Models*, NeurIPS 2021, §3
  (fixed token-id hash to experts).
"""

import math

import jax
import jax.numpy as jnp
from jax import lax

from models.moe.routing import (
    Routing,
    apply_capacity,
    check_k,
    dense_mask,
    expert_capacity,
    mask_slots,
    router_logits,
    top_k_of_probs,
)

TOP_K_ORDERS = ("softmax_topk", "topk_softmax")


def route_top_k(
    probs: jax.Array,
    *,
    k: int,
    renormalize: bool = False,
    capacity_factor: float | None = None,
    min_capacity: int = 1,
    aux: dict[str, jax.Array] | None = None,
) -> Routing:
  """Top-k token choice on given probabilities, with an optional capacity.

  The selection step shared by the linear top-k router and the graph-of-
  tokens routers: ``weights = P[TopK(P)]`` (optionally renormalised), then,
  if ``capacity_factor`` is set, at most
  ``C = expert_capacity(T, E, k, capacity_factor, min_capacity)``
  assignments per expert (:func:`~models.moe.routing.apply_capacity`).

  Args:
    probs: ``[T, E]`` routing probabilities.
    k: experts per token.
    renormalize: rescale the ``k`` weights to sum to 1 (before any drop).
    capacity_factor: ``None`` for dropless routing, else ``cf > 0``.
    min_capacity: lower bound on ``C``.
    aux: entries copied into the routing's ``aux``.

  Returns:
    A :class:`Routing` ``[T, k]``; ``aux`` gains ``'choice_mask'`` and
    ``'num_dropped'`` (plus ``'dropped_load'`` and ``'capacity'`` with a
    capacity).
  """
  num_tokens, num_experts = probs.shape
  weights, experts = top_k_of_probs(probs, k, renormalize=renormalize)
  routing = Routing(weights, experts, dict(aux or {}))
  routing.aux["choice_mask"] = dense_mask(routing, num_experts)
  routing.aux["num_dropped"] = jnp.zeros((), jnp.int32)
  if capacity_factor is None:
    return routing
  capacity = expert_capacity(num_tokens, num_experts, k, capacity_factor,
                             min_capacity)
  return apply_capacity(routing, num_experts, capacity)


def top_k_routing(
    x: jax.Array,
    w_router: jax.Array,
    *,
    k: int,
    order: str = "softmax_topk",
    renormalize: bool = False,
    capacity_factor: float | None = None,
    min_capacity: int = 1,
) -> Routing:
  """Top-k token-choice routing with a linear router.

  With ``h = x W_r`` and ``P = softmax(h)``:

  * ``order='softmax_topk'`` (Shazeer et al., 2017; Switch; GShard;
    DeepSeek): ``weights = P[TopK(P)]``, unnormalised unless
    ``renormalize`` (``P[TopK] / Σ_{TopK} P``, Qwen3's ``norm_topk_prob``);
  * ``order='topk_softmax'`` (Mixtral, eq. 1): ``weights =
    softmax(h[TopK(h)])``, which already sums to 1.

  ``capacity_factor=None`` is dropless; otherwise each expert serves at most
  ``C = max(min_capacity, ⌈cf · T · k / E⌉)`` assignments in slot-major
  order and the rest are dropped (weight 0) and counted.

  Args:
    x: ``[T, d]`` tokens.
    w_router: ``[d, E]`` router weights.
    k: experts per token, ``1 <= k <= E``.
    order: one of ``TOP_K_ORDERS``.
    renormalize: see above (no effect on ``'topk_softmax'``).
    capacity_factor: ``None`` (dropless) or ``cf > 0``.
    min_capacity: lower bound on ``C``.

  Returns:
    A :class:`Routing` ``[T, k]`` with ``aux`` keys ``'logits'``,
    ``'probs'`` ``[T, E]``, ``'choice_mask'`` ``[T, E]``, ``'num_dropped'``
    and, with a capacity, ``'dropped_load'`` ``[E]`` and ``'capacity'``.

  Raises:
    ValueError: unknown ``order``, ``k`` out of range, bad shapes.
  """
  if order not in TOP_K_ORDERS:
    raise ValueError(f"{order=} is not one of {TOP_K_ORDERS}")
  logits = router_logits(x, w_router)
  probs = jax.nn.softmax(logits, axis=-1)
  # softmax(h[TopK(h)]) is P renormalised over its top-k, and TopK(h) is
  # TopK(P): both orders select on P.
  renormalize = renormalize or order == "topk_softmax"
  return route_top_k(probs, k=k, renormalize=renormalize,
                     capacity_factor=capacity_factor,
                     min_capacity=min_capacity,
                     aux={"logits": logits, "probs": probs})


def expert_choice_capacity(num_tokens: int, num_experts: int,
                           capacity_factor: float) -> int:
  """Tokens per expert in expert choice, ``C = ⌈cf · T / E⌉`` in ``[1, T]``.

  ``cf`` is the average number of experts per token (Zhou et al., 2022, §3.1:
  ``k = n · c / e``).
  """
  if capacity_factor <= 0:
    raise ValueError(f"{capacity_factor=} must be positive")
  wanted = math.ceil(capacity_factor * num_tokens / num_experts)
  return min(num_tokens, max(1, wanted))


def expert_choice_routing(
    x: jax.Array,
    w_router: jax.Array,
    *,
    capacity_factor: float = 2.0,
    k_max: int | None = None,
) -> Routing:
  """Expert-choice routing: each expert takes its top-``C`` tokens.

  ``S = softmax(x W_r)`` over experts; ``G, I = TopK(Sᵀ, C)`` per expert
  (Zhou et al., 2022, eq. 1) with ``C`` from :func:`expert_choice_capacity`.
  Token ``t`` is served by every expert that picked it, with weight
  ``S[t, i]``; in the token-major :class:`Routing` it keeps at most
  ``k_max`` of them (the largest weights), and picks cut by ``k_max`` are
  counted as drops. A token nobody picked gets no expert (residual only).
  Expert choice sees the whole group of tokens, so it leaks future tokens
  in a causal decoder.

  Args:
    x: ``[T, d]`` tokens (one routing group).
    w_router: ``[d, E]`` router weights.
    capacity_factor: average experts per token ``c`` (2.0 is the paper's
      EC-CF2).
    k_max: slots per token; ``None`` means ``E`` (never drops).

  Returns:
    A :class:`Routing` ``[T, k_max]`` with ``aux`` keys ``'logits'``,
    ``'probs'`` ``[T, E]``, ``'capacity'`` (``C``), ``'capacity_use'``
    ``[E]`` int32 (tokens each expert serves after the ``k_max`` cut, at most
    ``C``), ``'num_dropped'`` (picks cut by ``k_max``) and
    ``'num_unrouted'`` (tokens with no expert).
  """
  logits = router_logits(x, w_router)
  probs = jax.nn.softmax(logits, axis=-1)
  num_tokens, num_experts = probs.shape
  k_max = num_experts if k_max is None else k_max
  check_k(k_max, num_experts, "k_max")
  capacity = expert_choice_capacity(num_tokens, num_experts, capacity_factor)
  _, tokens = lax.top_k(probs.T, capacity)
  picked = jnp.zeros((num_tokens, num_experts), jnp.bool_)
  picked = picked.at[tokens, jnp.arange(num_experts)[:, None]].set(True)
  # Probabilities are >= 0, so -1 ranks every unpicked expert last.
  _, experts = lax.top_k(jnp.where(picked, probs, -1.0), k_max)
  keep = jnp.take_along_axis(picked, experts, axis=-1)
  weights = jnp.take_along_axis(probs, experts, axis=-1)
  one_hot = jax.nn.one_hot(experts, num_experts, dtype=jnp.int32)
  capacity_use = jnp.sum(one_hot * keep[..., None], axis=(0, 1))
  aux = {
      "logits": logits,
      "probs": probs,
      "capacity": jnp.asarray(capacity, jnp.int32),
      "capacity_use": capacity_use,
      "num_dropped": num_experts * capacity - jnp.sum(keep, dtype=jnp.int32),
      "num_unrouted": jnp.sum(~jnp.any(keep, axis=-1), dtype=jnp.int32),
  }
  return mask_slots(weights, experts, keep, aux)


def _mix32(h: jax.Array) -> jax.Array:
  """MurmurHash3's 32-bit finaliser: an avalanching bijection of uint32."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def hash_routing(token_ids: jax.Array, num_experts: int, *, k: int = 1,
                 seed: int = 0) -> Routing:
  """Routes each token by a fixed hash of its vocabulary id.

  Hash Layers (Roller et al., 2021) send token id ``v`` to expert
  ``hash(v) mod E``, with no learned router and no balancing loss. For
  ``k > 1`` this uses rendezvous hashing: token ``v`` scores each expert by
  ``mix(v, i, seed)`` and takes the ``k`` highest, so its ``k`` experts are
  distinct and each marginal is uniform. Weights are ``1 / k``.

  Args:
    token_ids: ``[T]`` integer vocabulary ids (not positions).
    num_experts: ``E``.
    k: experts per token.
    seed: selects the hash function (a different fixed mapping).

  Returns:
    A :class:`Routing` ``[T, k]`` that depends on ``token_ids`` only, with
    ``aux`` keys ``'choice_mask'`` and ``'num_dropped'`` (0).

  Raises:
    ValueError: ``token_ids`` not 1-D, ``k`` out of range.
  """
  check_k(k, num_experts)
  if token_ids.ndim != 1:
    raise ValueError(f"token_ids must be [T], got {token_ids.shape=}")
  ids = jnp.asarray(token_ids).astype(jnp.uint32)[:, None]
  expert = jnp.arange(num_experts, dtype=jnp.uint32)[None, :]
  key = _mix32(jnp.uint32(seed) * jnp.uint32(0x9E3779B9) + jnp.uint32(1))
  scores = _mix32(_mix32(ids ^ key) + expert * jnp.uint32(0x27D4EB2F))
  # The top 24 bits are exact in f32, so the ranking is a pure function of
  # the hash (rare 24-bit ties go to the lower expert).
  _, experts = lax.top_k((scores >> 8).astype(jnp.float32), k)
  weights = jnp.full(experts.shape, 1.0 / k, jnp.float32)
  routing = Routing(weights, experts.astype(jnp.int32), {})
  routing.aux["choice_mask"] = dense_mask(routing, num_experts)
  routing.aux["num_dropped"] = jnp.zeros((), jnp.int32)
  return routing
