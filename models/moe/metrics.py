"""Routing diagnostics: expert load, drop rate, local routing consistency.

SRP and SCH measure how *locally consistent* routing is, i.e. how well the
experts a segment of ``L`` consecutive tokens uses can be predicted or cached
as a whole; they are computed from logged assignment masks and need no
model. Both slide the segment with stride 1 inside each sequence and pool
over sequences, as the reference code does.

References:
  *Not All Models Suit Expert Offloading: On Local Routing Consistency of
  Mixture-of-Expert Models*, arXiv 2505.16056; code
  ljcleo/moe-lrc (``src/30_srp_calc.py``, ``src/31_srp_refine.py``, and the
  segment-fixed oracle cache of ``src/40_sch_calc.py`` @ 61c86cf).
"""

import jax
import jax.numpy as jnp

from models.moe.routing import Routing, num_active


def expert_load(mask: jax.Array) -> jax.Array:
  """Assignments per expert, ``load_i = Σ_t m[t, i]``.

  Args:
    mask: ``[..., T, E]`` assignments (bool or 0/1), e.g.
      :func:`~models.moe.routing.dense_mask` of a routing (what was kept) or
      ``Routing.aux['choice_mask']`` (what was asked for).

  Returns:
    ``[E]`` f32, summed over all leading axes. Summed over micro-batches it
    is the ``accumulated_counts`` of the global-batch balance loss.
  """
  return jnp.sum(mask.astype(jnp.float32).reshape(-1, mask.shape[-1]), 0)


def drop_rate(routing: Routing) -> jax.Array:
  """Fraction of wanted assignments a capacity dropped.

  ``dropped / (dropped + kept)`` with ``dropped = aux['num_dropped']``
  (0 if the router reports none) and ``kept`` the active slots.

  Args:
    routing: any :class:`Routing`.

  Returns:
    A scalar f32 in ``[0, 1]``.
  """
  dropped = jnp.asarray(routing.aux.get("num_dropped", 0), jnp.float32)
  kept = jnp.sum(num_active(routing)).astype(jnp.float32)
  return dropped / jnp.maximum(dropped + kept, 1.0)


def segment_counts(mask: jax.Array, segment_length: int) -> jax.Array:
  """Per-segment activation counts ``c[s, i] = Σ_{t=s}^{s+L−1} m[t, i]``.

  Args:
    mask: ``[..., T, E]`` assignments.
    segment_length: ``L`` with ``1 <= L <= T``.

  Returns:
    ``[..., T − L + 1, E]`` int32, one row per stride-1 segment.

  Raises:
    ValueError: ``L`` outside ``[1, T]``.
  """
  num_tokens = mask.shape[-2]
  if not 1 <= segment_length <= num_tokens:
    raise ValueError(f"{segment_length=} must lie in [1, {num_tokens=}]")
  m = mask.astype(jnp.int32)
  zero = jnp.zeros((*m.shape[:-2], 1, m.shape[-1]), jnp.int32)
  total = jnp.concatenate([zero, jnp.cumsum(m, axis=-2)], axis=-2)
  return total[..., segment_length:, :] - total[..., :-segment_length, :]


def segment_routing_performance(mask: jax.Array,
                                segment_length: int) -> jax.Array:
  """SRP(L): best F1 of predicting token routing from segment routing.

  For each segment ``s`` of ``L`` tokens and expert ``i``, predict that
  *every* token of ``s`` activates ``i`` iff ``c[s, i] ≥ m``. Against the
  true per-token activations this has ``TP = Σ_{c ≥ m} c``,
  ``predicted = L · #{c ≥ m}`` and ``actual = Σ c`` over all
  (segment, expert) pairs, so ``F1(m) = 2 TP / (predicted + actual)``.
  SRP is ``max_{m ∈ {0..L}} F1(m)`` (without the paper's bootstrap CIs).

  Args:
    mask: ``[..., T, E]`` per-token activations (leading axes: sequences).
    segment_length: ``L``.

  Returns:
    A scalar f32 in ``[0, 1]``; 1 when each segment's tokens all use the
    same experts.
  """
  counts = segment_counts(mask, segment_length).ravel()
  histogram = jnp.bincount(counts, length=segment_length + 1)
  value = jnp.arange(segment_length + 1)
  # Suffix sums over m: pairs with c >= m, and their activations.
  at_least = jnp.cumsum(histogram[::-1])[::-1]
  true_positive = jnp.cumsum((value * histogram)[::-1])[::-1]
  actual = true_positive[0]
  f1 = 2.0 * true_positive / jnp.maximum(
      segment_length * at_least + actual, 1)
  return jnp.max(f1).astype(jnp.float32)


def segment_cache_hit_rate(mask: jax.Array,
                           segment_length: int) -> jax.Array:
  """SCH(L, S): hit rate of the best per-segment expert cache of size S.

  With oracle knowledge of segment ``s`` the best fixed cache of ``S``
  experts holds its ``S`` most used experts, so it serves the ``S`` largest
  ``c[s, i]``; SCH pools the hits over segments and divides by all
  activations, ``Σ_s Σ_{top S} c[s, ·] / Σ_s Σ_i c[s, i]``.

  Args:
    mask: ``[..., T, E]`` per-token activations (leading axes: sequences).
    segment_length: ``L``.

  Returns:
    ``[E]`` f32: entry ``S − 1`` is the hit rate of a cache of ``S``
    experts (non-decreasing, 1 at ``S = E`` when any expert is active).
  """
  counts = segment_counts(mask, segment_length)
  num_experts = counts.shape[-1]
  ranked = -jnp.sort(-counts.reshape(-1, num_experts), axis=-1)
  hits = jnp.cumsum(jnp.sum(ranked, axis=0))
  return (hits / jnp.maximum(hits[-1], 1)).astype(jnp.float32)
