"""biroute bilevel: bi-level solvers as optax transformations.

A bi-level problem is

    min_x F(x, y*(x))  s.t.  y*(x) ∈ argmin_y f(x, y)  [and c(x, y) ≤ 0 | = 0]

with ``x`` the *upper* (outer) variables and ``y`` the *lower* (inner) ones,
both arbitrary pytrees held together in ``Params(upper, lower)``. The losses
are plain functions ``outer_loss(upper, lower, batch)`` and
``inner_loss(upper, lower, batch)`` (optionally ``constraints``), collected in
a ``Problem``. Every solver is an optax transformation over ``Params``:

    updates, state = tx.update(outer_grads, state, params, *,
                               outer_loss=F, inner_loss=f, constraints=c,
                               outer_batch=..., inner_batch=...)

``outer_grads`` is ``∇F`` at ``params``. ``scale_by_<method>`` turns it into
directions ``Params(upper=d_x, lower=d_y)`` that the per-level optimizers of
:func:`per_level` negate and scale; ``<method>(...)`` is the ready chain.
Missing required extra arguments raise ``TypeError``; unknown ones are
ignored. Solver states are NamedTuples of arrays (jit, shard, checkpoint).

How each method maps onto the contract (state beyond the per-level
optimizers in the last column):

===============  =========================  ===========  ====================
method           upper                      lower        solver state
===============  =========================  ===========  ====================
BiP              mask scores m (capped      weights θ    —
                 simplex / top-k)
LV-HBA           x                          y            θ (LL copy), λ, z, k
ScaleBiO         source logits p (softmax   model w      copy u, α
                 weights)
CommFormer       edge logits α (Gumbel      policy ω     alternation phase
                 top-k graph)
DARTS, PC-DARTS  architecture logits α      supernet     count, L_train; 2nd
                 (softmax over ops)         weights w    order: ξ, FD ε, ‖v‖,
                                                         L_val(w′), ‖ξHv‖
implicit         x                          y → y*       count, ‖∇_y f‖,
                                                         solve residual
unrolled         x                          y → y_T      count, ‖∇_y f‖
===============  =========================  ===========  ====================

``implicit`` and ``unrolled`` give the exact hypergradient (up to the inner
solve) and are the references the contract test checks every fast solver
against on ``reference_problems``; ``custom_root`` and the linear solvers are
the implicit-differentiation engine behind ``implicit``.
"""

from bilevel import reference_problems
from bilevel._base import (
    OuterGradsNotUsed,
    Params,
    PerLevelState,
    Problem,
    cast_like,
    check_params,
    per_level,
    require_extra_args,
    upcast,
    uses_outer_grads,
)
from bilevel._bip import BiPState, SequentialBiPState, bip, scale_by_bip
from bilevel._darts import (
    DARTSState,
    SecondOrderDARTSState,
    darts,
    scale_by_darts,
)
from bilevel._implicit import (
    ImplicitState,
    implicit,
    scale_by_implicit,
    unroll_horizon_solve,
)
from bilevel._implicit_diff import (
    custom_fixed_point,
    custom_root,
    kkt_optimality_fn,
    root_jvp,
    root_vjp,
)
from bilevel._linear_solve import (
    linear_solve_residual,
    solve_bicgstab,
    solve_cg,
    solve_gmres,
    solve_hessian,
    solve_identity,
    solve_minres,
    solve_neumann,
    solve_normal_cg,
)
from bilevel._lisa import Lisa
from bilevel._lisa import blocks_by_index as lisa_blocks_by_index
from bilevel._lisa import frozen_aware as lisa_frozen_aware
from bilevel._lv_hba import LVHBAState, lv_hba, scale_by_lv_hba
from bilevel._masks import (
    binarize,
    straight_through_topk,
    straight_through_topk_per_leaf,
    topk_mask,
    topk_mask_per_leaf,
)
from bilevel._projected_step import project_params
from bilevel._projections import (
    DykstraInfo,
    dykstra,
    dykstra_with_info,
    projection_box,
    projection_capped_simplex,
    projection_halfspace,
    projection_hyperplane,
    projection_polyhedron,
    projection_polyhedron_with_info,
    projection_simplex,
)
from bilevel._scalebio import (
    ScaleBiOState,
    per_source_means,
    scale_by_scalebio,
    scalebio,
    source_weighted_loss,
)
from bilevel._step import make_step
from bilevel._unrolled import UnrolledState, scale_by_unrolled, unrolled
from bilevel._wrappers import (
    AccumulateState,
    ApplyIfFiniteState,
    accumulate,
    apply_if_finite,
    inject_hyperparams,
    mean_over_chunks,
)

__all__ = (
    "AccumulateState",
    "ApplyIfFiniteState",
    "BiPState",
    "DARTSState",
    "DykstraInfo",
    "ImplicitState",
    "LVHBAState",
    "Lisa",
    "OuterGradsNotUsed",
    "Params",
    "PerLevelState",
    "Problem",
    "ScaleBiOState",
    "SecondOrderDARTSState",
    "SequentialBiPState",
    "UnrolledState",
    "accumulate",
    "apply_if_finite",
    "binarize",
    "bip",
    "cast_like",
    "check_params",
    "custom_fixed_point",
    "custom_root",
    "darts",
    "dykstra",
    "dykstra_with_info",
    "implicit",
    "inject_hyperparams",
    "kkt_optimality_fn",
    "linear_solve_residual",
    "lisa_blocks_by_index",
    "lisa_frozen_aware",
    "lv_hba",
    "make_step",
    "mean_over_chunks",
    "per_level",
    "per_source_means",
    "project_params",
    "projection_box",
    "projection_capped_simplex",
    "projection_halfspace",
    "projection_hyperplane",
    "projection_polyhedron",
    "projection_polyhedron_with_info",
    "projection_simplex",
    "reference_problems",
    "require_extra_args",
    "root_jvp",
    "root_vjp",
    "scale_by_bip",
    "scale_by_darts",
    "scale_by_implicit",
    "scale_by_lv_hba",
    "scale_by_scalebio",
    "scale_by_unrolled",
    "scalebio",
    "solve_bicgstab",
    "solve_cg",
    "solve_gmres",
    "solve_hessian",
    "solve_identity",
    "solve_minres",
    "solve_neumann",
    "solve_normal_cg",
    "source_weighted_loss",
    "straight_through_topk",
    "straight_through_topk_per_leaf",
    "topk_mask",
    "topk_mask_per_leaf",
    "unroll_horizon_solve",
    "unrolled",
    "upcast",
    "uses_outer_grads",
)
