"""Mixture-of-Experts: routers, losses, metrics and dispatch, pure functions.

A router maps token representations ``x [T, d]`` (and router weights passed
as arrays) to a :class:`Routing` ``(weights [T, k_max], experts [T, k_max],
aux)``; dispatch, which evaluates the experts, is separate. Slots with weight
0 are unused. Token-choice routers put the router ``'logits'``, ``'probs'``
and ``'choice_mask'`` in ``aux`` for the losses:

    routing = top_k_routing(x, w_router, k=2, capacity_factor=1.25)
    # Inside jax.shard_map over a 'data' axis:
    lbl = load_balancing_loss(routing.aux["probs"],
                              routing.aux["choice_mask"], scope="global",
                              axis_name="data")
    z = router_z_loss(routing.aux["logits"])

=================================  ==========================================
router                             selection
=================================  ==========================================
``top_k_routing``                  top-k of softmax / softmax of top-k,
                                   capacity with counted drops or dropless
``expert_choice_routing``          each expert its top-C tokens
``top_p_routing``                  fewest experts with mass ≥ p
``dynmole_routing``                all experts if Tsallis entropy > τ,
                                   else top-p with ≥ 2 experts
``coe_routing_step``               one Chain-of-Experts iteration
``similarity_aware_routing``       top-k of similarity-mixed probabilities
``attention_aware_routing``        top-k of attention-mixed probabilities
``hash_routing``                   fixed hash of the token id
=================================  ==========================================

Dispatch evaluates the experts ``y_t = Σ_j w_{t,j} FFN_{e_{t,j}}(x_t)``:
:func:`moe_ffn` with ``path`` one of ``DISPATCH_PATHS`` (one-hot capacity
oracle, sorted ``ragged_dot``, sorted Pallas grouped matmul), and
:func:`expert_parallel_ffn` with experts sharded over a mesh axis
(``jax.shard_map`` + ``all_to_all``):

    y, num_dropped = moe_ffn(x, routing, w_in, w_out, path="ragged_dot")
"""

from models.moe.dispatch import DISPATCH_PATHS, MoeOutput, moe_ffn
from models.moe.dynamic import dynmole_routing, top_p_routing
from models.moe.expert_parallel import (
    expert_parallel_ffn,
    expert_parallel_ffn_local,
)
from models.moe.graph import attention_aware_routing, similarity_aware_routing
from models.moe.layers import (
    ExpertsFn,
    SharedFn,
    add_shared_experts,
    chain_of_experts,
    coe_routing_step,
    routed_lora,
    routed_lora_linear,
)
from models.moe.losses import (
    LBL_SCOPES,
    dynmole_loss,
    load_balancing_loss,
    router_entropy,
    router_z_loss,
    tsallis_entropy,
)
from models.moe.metrics import (
    drop_rate,
    expert_load,
    segment_cache_hit_rate,
    segment_counts,
    segment_routing_performance,
)
from models.moe.routers import (
    TOP_K_ORDERS,
    expert_choice_capacity,
    expert_choice_routing,
    hash_routing,
    route_top_k,
    top_k_routing,
)
from models.moe.routing import (
    Routing,
    apply_capacity,
    dense_mask,
    dense_weights,
    expert_capacity,
    num_active,
    router_logits,
    top_k_of_probs,
)

__all__ = (
    "DISPATCH_PATHS",
    "LBL_SCOPES",
    "TOP_K_ORDERS",
    "ExpertsFn",
    "MoeOutput",
    "Routing",
    "SharedFn",
    "add_shared_experts",
    "apply_capacity",
    "attention_aware_routing",
    "chain_of_experts",
    "coe_routing_step",
    "dense_mask",
    "dense_weights",
    "drop_rate",
    "dynmole_loss",
    "dynmole_routing",
    "expert_capacity",
    "expert_choice_capacity",
    "expert_choice_routing",
    "expert_load",
    "expert_parallel_ffn",
    "expert_parallel_ffn_local",
    "hash_routing",
    "load_balancing_loss",
    "moe_ffn",
    "num_active",
    "route_top_k",
    "routed_lora",
    "routed_lora_linear",
    "router_entropy",
    "router_logits",
    "router_z_loss",
    "segment_cache_hit_rate",
    "segment_counts",
    "segment_routing_performance",
    "similarity_aware_routing",
    "top_k_of_probs",
    "top_k_routing",
    "top_p_routing",
    "tsallis_entropy",
)
