"""Router losses: load balancing (three scopes), z-loss, entropies, DynMoLE.

Every loss is computed in f32 and returned *unscaled* unless it bundles the
coefficients of one method (:func:`dynmole_loss`); the usual coefficients
are: load balancing 1e-2 (Switch, top-p), 1e-3 (CoE's ``aux_loss_alpha``,
DynMoLE); z-loss 1e-3 (ST-MoE); top-p's entropy 1e-4 (unverified).

Notation: ``N`` experts, ``P[t, i]`` router probabilities, ``m[t, i] ∈
{0, 1}`` the assignment mask (the experts each token chose, e.g.
``Routing.aux['choice_mask']``), ``f_i = Σ_t m[t, i] / Σ_{t, j} m[t, j]``
the fraction of routed slots that went to expert ``i`` and ``P̄_i`` the mean
probability of expert ``i`` over the same tokens.

References:
  Fedus, Zoph, Shazeer, *Switch Transformers*, JMLR 2022, eq. 4
  (``N Σ_i f_i P̄_i``).
  Qiu et al., *Demons in the Detail: On Implementing Load Balancing Loss for
  Training Specialized Mixture-of-Expert Models*, arXiv 2501.11873
  (global-batch scope: counts all-reduced and accumulated, ``P̄`` local).
  Dai et al., *DeepSeekMoE*, 2024 (expert-level balance loss per sequence,
  the scope CoE uses).
  Zoph et al., *ST-MoE: Designing Stable and Transferable Sparse Expert
  Models*, 2022 (router z-loss).
  Tsallis, *Possible generalization of Boltzmann-Gibbs statistics*, J. Stat.
  Phys. 1988 (``S_q``); DynMoLE, arXiv 2504.00661 (normalised ``S_q``,
  the entropy + balance loss).
"""

import jax
import jax.numpy as jnp

LBL_SCOPES = ("micro_batch", "sequence", "global")


def _balance(counts: jax.Array, mean_probs: jax.Array) -> jax.Array:
  """``N Σ_i f_i P̄_i`` with ``f = counts / Σ counts`` (0 if no counts)."""
  total = jnp.sum(counts, axis=-1, keepdims=True)
  fraction = counts / jnp.maximum(total, 1.0)
  return mean_probs.shape[-1] * jnp.sum(fraction * mean_probs, axis=-1)


def load_balancing_loss(
    probs: jax.Array,
    mask: jax.Array,
    *,
    scope: str = "micro_batch",
    axis_name: str | None = None,
    accumulated_counts: jax.Array | None = None,
) -> jax.Array:
  """Switch-style auxiliary load-balancing loss ``N Σ_i f_i P̄_i``.

  It equals 1 under perfect balance and ``N`` when every token goes to one
  expert. ``f`` is a count, so no gradient flows through it
  (``stop_gradient``); the gradient reaches the router through ``P̄``.
  Scopes (the set of tokens ``f`` and ``P̄`` average over):

  * ``'micro_batch'``: all tokens of the input;
  * ``'sequence'``: each row of the leading axes separately, then the mean
    over rows, ``mean_b N Σ_i f_{b,i} P̄_{b,i}`` (DeepSeek's sequence-wise
    loss, as in CoE; MaxText's is ``k`` times this);
  * ``'global'``: ``N Σ_i f̄_i P̄_i`` where ``f̄`` counts the assignments of
    the *global* batch, i.e. of this micro-batch, plus
    ``accumulated_counts`` from earlier gradient-accumulation micro-batches,
    summed over the devices of ``axis_name`` with ``lax.psum``; ``P̄``
    stays local (Qiu et al., 2025). Averaging this loss over devices and
    micro-batches, as gradient averaging does, gives their
    ``(1/N_P) Σ_j N Σ_i f̄_i P̄_i^j``. With one device and no accumulated
    counts it equals ``'micro_batch'``. Under ``jit`` with sharded inputs
    (no ``shard_map``) ``'micro_batch'`` already sees the global batch.

  Args:
    probs: ``[..., T, E]`` router probabilities; leading axes index sequences
      for ``'sequence'`` and are pooled otherwise.
    mask: ``[..., T, E]`` assignments (bool or 0/1), shaped like ``probs``.
    scope: one of ``LBL_SCOPES``.
    axis_name: ``'global'`` only: a mapped axis (``shard_map``, ``vmap``)
      to sum the counts over.
    accumulated_counts: ``'global'`` only: ``[E]`` counts of earlier
      micro-batches on this device (the sum of
      :func:`~models.moe.metrics.expert_load` over their masks).

  Returns:
    A scalar f32.

  Raises:
    ValueError: unknown scope, mismatched shapes, or global-only arguments
      with another scope.
  """
  if scope not in LBL_SCOPES:
    raise ValueError(f"{scope=} is not one of {LBL_SCOPES}")
  if probs.shape != mask.shape:
    raise ValueError(f"{probs.shape=} and {mask.shape=} must match")
  if scope != "global" and (axis_name is not None
                            or accumulated_counts is not None):
    raise ValueError(
        f"axis_name and accumulated_counts need scope='global', not {scope=}")
  probs = probs.astype(jnp.float32)
  mask = jax.lax.stop_gradient(mask.astype(jnp.float32))
  if scope == "sequence":
    seq_probs = probs.reshape(-1, *probs.shape[-2:])
    seq_mask = mask.reshape(seq_probs.shape)
    return jnp.mean(_balance(seq_mask.sum(-2), seq_probs.mean(-2)))
  num_experts = probs.shape[-1]
  counts = mask.reshape(-1, num_experts).sum(0)
  mean_probs = probs.reshape(-1, num_experts).mean(0)
  if accumulated_counts is not None:
    counts = counts + jax.lax.stop_gradient(
        accumulated_counts.astype(jnp.float32))
  if axis_name is not None:
    counts = jax.lax.psum(counts, axis_name)
  return _balance(counts, mean_probs)


def router_z_loss(logits: jax.Array) -> jax.Array:
  """ST-MoE's router z-loss ``mean_t (log Σ_i exp h_{t,i})²``.

  Args:
    logits: ``[..., E]`` router logits.

  Returns:
    A scalar f32; penalises large logits, which destabilise the softmax.
  """
  z = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
  return jnp.mean(z**2)


def router_entropy(probs: jax.Array) -> jax.Array:
  """Mean Shannon entropy ``mean_t −Σ_i P_{t,i} log P_{t,i}`` (nats).

  Top-p routing's dynamic loss ``L_dyn``; ``0 log 0 = 0``.

  Args:
    probs: ``[..., E]`` router probabilities.

  Returns:
    A scalar f32.
  """
  entropy = jax.scipy.special.entr(probs.astype(jnp.float32))
  return jnp.mean(jnp.sum(entropy, axis=-1))


def tsallis_entropy(probs: jax.Array, *, q: float = 1.1, eps: float = 1e-5,
                    normalize: bool = True) -> jax.Array:
  """Tsallis entropy per token, as DynMoLE computes it.

  ``S_q(P) = (1 − Σ_i (P_i + ε)^q) / (q − 1)``, divided by its maximum
  ``(1 − N^{1−q}) / (q − 1)`` when ``normalize`` (so ``H̃ ∈ [0, 1]`` up to
  the ``ε`` shift). ``q = 1`` is the Shannon limit
  ``−Σ (P_i + ε) log(P_i + ε)``, normalised by ``log N``.

  Args:
    probs: ``[..., N]`` probabilities.
    q: entropic index ``> 0``.
    eps: shift that keeps ``P_i^q`` smooth at 0.
    normalize: divide by the entropy of the uniform distribution.

  Returns:
    ``[...]`` f32; with ``normalize`` and ``N = 1`` (no choice to be
    uncertain about) zeros.
  """
  num = probs.shape[-1]
  if normalize and num == 1:
    return jnp.zeros(probs.shape[:-1], jnp.float32)
  p = probs.astype(jnp.float32) + eps
  if q == 1.0:
    entropy = jnp.sum(jax.scipy.special.entr(p), axis=-1)
    maximum = jnp.log(num)
  else:
    entropy = (1.0 - jnp.sum(p**q, axis=-1)) / (q - 1.0)
    maximum = (1.0 - num ** (1.0 - q)) / (q - 1.0)
  return entropy / maximum if normalize else entropy


def dynmole_loss(
    probs: jax.Array,
    gates: jax.Array,
    entropy: jax.Array,
    *,
    entropy_coef: float = 1e-2,
    balance_coef: float = 1e-3,
) -> jax.Array:
  """DynMoLE's router loss, coefficients included.

  ``L = 1e-2 · mean_t H̃_t + 1e-3 · N Σ_i f_i P̄_i`` where, unlike
  :func:`load_balancing_loss`, ``f_i = mean_t G[t, i]`` is the mean of the
  *masked probabilities* (not normalised, and differentiable), as in the
  released ``_dynamic_load_balancing_loss_func``.

  Args:
    probs: ``[T, N]`` router probabilities ``P``.
    gates: ``[T, N]`` routing weights ``P · mask``
      (:func:`~models.moe.routing.dense_weights` of the routing).
    entropy: ``[T]`` normalised Tsallis entropies
      (``Routing.aux['tsallis_entropy']``).
    entropy_coef: weight of the entropy term.
    balance_coef: weight of the balance term.

  Returns:
    A scalar f32.
  """
  probs = probs.astype(jnp.float32).reshape(-1, probs.shape[-1])
  gates = gates.astype(jnp.float32).reshape(probs.shape)
  balance = probs.shape[-1] * jnp.sum(gates.mean(0) * probs.mean(0))
  return entropy_coef * jnp.mean(entropy) + balance_coef * balance
