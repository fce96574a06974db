"""Graph-of-tokens routers: similarity-aware and attention-aware routing.

Softmax gating picks each token's experts independently. These routers let
a token borrow the routing distributions of the tokens it is similar to,
through a row-stochastic token graph ``S [T, T]``:

    p_t = Σ_s S[t, s] · softmax(W_r x_s),

then select top-k on ``p`` (which is again a distribution), which lowers
the entropy of expert selection and the late-training routing fluctuation.

These equations are as recalled from the paper's §2–3, not checked against
its text: the temperature ``τ``, the bilinear similarity ``X W_s Xᵀ`` and
the use of ``p`` as the combine weights should be verified before relying
on them.

References:
  Nguyen, Tran, Nguyen, Baraniuk, *Improving Routing in Sparse Mixture of
  Experts with Graph of Tokens*, ICML 2025, arXiv 2505.00792, §2
  (Similarity-Aware MoE) and §3 (Attention-Aware MoE).
"""

import jax
import jax.numpy as jnp

from models.moe.routers import route_top_k
from models.moe.routing import Routing, router_logits


def _graph_route(probs, graph, *, k, renormalize, capacity_factor,
                 min_capacity, aux) -> Routing:
  mixed = graph.astype(jnp.float32) @ probs
  return route_top_k(mixed, k=k, renormalize=renormalize,
                     capacity_factor=capacity_factor,
                     min_capacity=min_capacity,
                     aux={**aux, "probs": mixed, "token_probs": probs})


def similarity_aware_routing(
    x: jax.Array,
    w_router: jax.Array,
    w_similarity: jax.Array,
    *,
    k: int,
    tau: float = 1.0,
    causal: bool = False,
    renormalize: bool = False,
    capacity_factor: float | None = None,
    min_capacity: int = 1,
) -> Routing:
  """Similarity-Aware MoE (S-MoE) routing.

  ``S = softmax_rows(X W_s Xᵀ / τ)`` (causal: token ``t`` sees ``s ≤ t``),
  ``p_t = Σ_s S[t, s] softmax(W_r x_s)``, then top-k on ``p`` as in
  :func:`~models.moe.routers.top_k_routing` with ``order='softmax_topk'``.
  Costs ``O(T² d)``.

  Args:
    x: ``[T, d]`` tokens of one sequence.
    w_router: ``[d, E]`` router weights.
    w_similarity: ``[d, d]`` similarity weights ``W_s``.
    k: experts per token.
    tau: temperature of the similarity softmax.
    causal: mask future tokens (decoders).
    renormalize: rescale the ``k`` weights to sum to 1.
    capacity_factor: ``None`` (dropless) or ``cf > 0``.
    min_capacity: lower bound on the capacity.

  Returns:
    A :class:`Routing` ``[T, k]`` whose ``aux`` holds ``'logits'``,
    ``'probs'`` (the mixed ``p``, what was selected on), ``'token_probs'``
    (the per-token ``softmax(W_r x)``), ``'similarity'`` ``[T, T]``,
    ``'choice_mask'`` and ``'num_dropped'``.

  Raises:
    ValueError: bad shapes or ``k``.
  """
  num_tokens, dim = x.shape
  if w_similarity.shape != (dim, dim):
    raise ValueError(f"{w_similarity.shape=} must be ({dim}, {dim})")
  logits = router_logits(x, w_router)
  xf = x.astype(jnp.float32)
  scores = xf @ w_similarity.astype(jnp.float32) @ xf.T / tau
  if causal:
    allowed = jnp.tril(jnp.ones((num_tokens, num_tokens), jnp.bool_))
    scores = jnp.where(allowed, scores, -jnp.inf)
  similarity = jax.nn.softmax(scores, axis=-1)
  return _graph_route(
      jax.nn.softmax(logits, axis=-1), similarity, k=k,
      renormalize=renormalize, capacity_factor=capacity_factor,
      min_capacity=min_capacity,
      aux={"logits": logits, "similarity": similarity})


def attention_aware_routing(
    x: jax.Array,
    w_router: jax.Array,
    attention: jax.Array,
    *,
    k: int,
    renormalize: bool = False,
    capacity_factor: float | None = None,
    min_capacity: int = 1,
) -> Routing:
  """Attention-Aware MoE (A-MoE) routing.

  Reuses the attention matrix ``A`` of the preceding attention layer
  (averaged over heads) as the token graph:
  ``p_t = Σ_s A[t, s] softmax(W_r x_s)``, then top-k on ``p``. Causality is
  inherited from ``A``. The mixing is an attention call whose values are
  the router probabilities, so a fused kernel can replace the ``[T, T]``
  matrix.

  Args:
    x: ``[T, d]`` tokens of one sequence.
    w_router: ``[d, E]`` router weights.
    attention: ``[T, T]`` or ``[H, T, T]`` row-stochastic attention weights.
    k: experts per token.
    renormalize: rescale the ``k`` weights to sum to 1.
    capacity_factor: ``None`` (dropless) or ``cf > 0``.
    min_capacity: lower bound on the capacity.

  Returns:
    A :class:`Routing` ``[T, k]`` with ``aux`` as in
    :func:`similarity_aware_routing` minus ``'similarity'``.

  Raises:
    ValueError: bad shapes or ``k``.
  """
  num_tokens = x.shape[0]
  if attention.shape[-2:] != (num_tokens, num_tokens) or attention.ndim > 3:
    raise ValueError(
        f"{attention.shape=} must be [T, T] or [H, T, T] with T={num_tokens}")
  if attention.ndim == 3:
    attention = jnp.mean(attention.astype(jnp.float32), axis=0)
  logits = router_logits(x, w_router)
  return _graph_route(
      jax.nn.softmax(logits, axis=-1), attention, k=k,
      renormalize=renormalize, capacity_factor=capacity_factor,
      min_capacity=min_capacity, aux={"logits": logits})
