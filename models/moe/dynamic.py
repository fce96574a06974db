"""Dynamic-k routers: top-p routing and DynMoLE's entropy-switched router.

The number of experts varies per token, so the :class:`Routing` is padded to
a static ``k_max`` (default ``E``) and the unused slots carry weight 0.
Slots are sorted by decreasing router probability.

References:
  Huang et al., *Harder Tasks Need More Experts: Dynamic Routing in MoE
  Models*, ACL 2024, arXiv 2403.07652, §3 (top-p routing, dynamic loss);
  code ZhenweiAn/Dynamic_MoE @ f56bc20,
  ``top_p_sampling_batched_all_sequence``.
  *DynMoLE: Boosting Mixture of LoRA Experts Fine-Tuning with a Hybrid
  Routing Mechanism*, arXiv 2504.00661; code mikecovlee/DynMoLE @
  9354b27, ``moe_peft/adapters/dynmole/model.py::_dynamic_routing``.
"""

import jax
import jax.numpy as jnp
from jax import lax

from models.moe.losses import router_entropy, tsallis_entropy
from models.moe.routing import (
    Routing,
    check_k,
    dense_mask,
    mask_slots,
    router_logits,
)


def _sorted_probs(x, w_router):
  logits = router_logits(x, w_router)
  probs = jax.nn.softmax(logits, axis=-1)
  sorted_probs, order = lax.top_k(probs, probs.shape[-1])
  return logits, probs, sorted_probs, order.astype(jnp.int32)


def _finish(weights, experts, keep, aux, num_experts) -> Routing:
  routing = mask_slots(weights, experts, keep, aux)
  routing.aux["choice_mask"] = dense_mask(routing, num_experts)
  routing.aux["num_dropped"] = jnp.zeros((), jnp.int32)
  return routing


def top_p_routing(
    x: jax.Array,
    w_router: jax.Array,
    *,
    p: float = 0.4,
    k_max: int | None = None,
    renormalize: bool = False,
) -> Routing:
  """Top-p ("dynamic") routing: the fewest experts whose mass reaches ``p``.

  With ``P = softmax(x W_r)`` sorted decreasingly, ``P_(1) ≥ … ≥ P_(E)``,
  token ``t`` keeps experts ``(1) … (n_t)`` where

      n_t = min { n : Σ_{j ≤ n} P_(j) ≥ p },

  so at least one expert, the one that crosses ``p`` included (Huang et al.,
  2024, §3; default ``p = 0.4``). Weights are the unrenormalised ``P``
  unless ``renormalize``. The released code keeps until the sum *exceeds*
  ``p`` (``>``); the two differ only when a prefix sums to ``p`` exactly.
  A token that needs more than ``k_max`` experts keeps its top ``k_max``;
  those are counted in ``aux['num_truncated']``.

  Args:
    x: ``[T, d]`` tokens.
    w_router: ``[d, E]`` router weights.
    p: probability threshold in ``(0, 1]``.
    k_max: slots per token, ``None`` for ``E``.
    renormalize: rescale the kept weights to sum to 1.

  Returns:
    A :class:`Routing` ``[T, k_max]`` with ``aux`` keys ``'logits'``,
    ``'probs'``, ``'choice_mask'``, ``'num_dropped'`` (0),
    ``'num_truncated'`` and ``'entropy'``: the mean router entropy
    ``−Σ_i P_i log P_i``, the paper's dynamic loss ``L_dyn`` (weight
    β ≈ 1e-4, not verified against the paper), which stops the router from
    flattening ``P`` to activate many experts.

  Raises:
    ValueError: ``p`` outside ``(0, 1]``, ``k_max`` out of range.
  """
  if not 0 < p <= 1:
    raise ValueError(f"{p=} must lie in (0, 1]")
  logits, probs, sorted_probs, order = _sorted_probs(x, w_router)
  num_experts = probs.shape[-1]
  k_max = num_experts if k_max is None else k_max
  check_k(k_max, num_experts, "k_max")
  # Mass of the strictly better experts; the first slot always sees 0 < p.
  before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
  wanted = before < p
  num_truncated = jnp.sum(
      jnp.maximum(jnp.sum(wanted, axis=-1) - k_max, 0), dtype=jnp.int32)
  keep = wanted[:, :k_max]
  weights = sorted_probs[:, :k_max]
  if renormalize:
    weights = weights / jnp.sum(weights * keep, axis=-1, keepdims=True)
  aux = {"logits": logits, "probs": probs, "num_truncated": num_truncated,
         "entropy": router_entropy(probs)}
  return _finish(weights, order[:, :k_max], keep, aux, num_experts)


def dynmole_routing(
    x: jax.Array,
    w_router: jax.Array,
    *,
    threshold: float = 0.9,
    q: float = 1.1,
    eps: float = 1e-5,
    top_p: float = 0.75,
    min_experts: int = 2,
) -> Routing:
  """DynMoLE's hybrid router: all experts when unsure, else top-p (≥ 2).

  With ``P = softmax(x W_r)`` and the normalised Tsallis entropy
  ``H̃_q(P)`` (:func:`~models.moe.losses.tsallis_entropy`, ``P`` shifted by
  ``eps``):

  * ``H̃ > threshold``: the token uses every expert (soft routing);
  * otherwise, with ``P`` sorted decreasingly and ``c_n = Σ_{j ≤ n} P_(j)``,
    it keeps the experts with ``c_n ≤ top_p`` and never fewer than
    ``min_experts`` (the crossing expert is *not* kept, unlike
    :func:`top_p_routing`).

  Weights are ``P · mask``, not renormalised. Defaults are the released
  config's (``entropy_threshold 0.9``, ``entropy_index 1.1``,
  ``entropy_eps 1e-5``, ``top_p 0.75``, ``keep_top_k 2``).

  Args:
    x: ``[T, d]`` tokens.
    w_router: ``[d, E]`` router weights.
    threshold: entropy threshold ``τ`` of the switch.
    q: Tsallis entropic index.
    eps: probability shift inside the entropy.
    top_p: cumulative-probability budget of the top-p mode.
    min_experts: minimum experts per token in the top-p mode.

  Returns:
    A :class:`Routing` ``[T, E]`` with ``aux`` keys ``'logits'``,
    ``'probs'``, ``'choice_mask'``, ``'num_dropped'`` (0),
    ``'tsallis_entropy'`` ``[T]`` (``H̃``, the input of DynMoLE's entropy
    loss) and ``'soft'`` ``[T]`` bool (tokens routed to all experts).

  Raises:
    ValueError: ``min_experts`` out of range.
  """
  logits, probs, sorted_probs, order = _sorted_probs(x, w_router)
  num_experts = probs.shape[-1]
  check_k(min_experts, num_experts, "min_experts")
  entropy = tsallis_entropy(probs, q=q, eps=eps)
  soft = entropy > threshold
  rank = jnp.arange(num_experts)
  keep = (jnp.cumsum(sorted_probs, axis=-1) <= top_p) | (rank < min_experts)
  keep = keep | soft[:, None]
  aux = {"logits": logits, "probs": probs, "tsallis_entropy": entropy,
         "soft": soft}
  return _finish(sorted_probs, order, keep, aux, num_experts)
