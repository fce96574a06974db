"""Implicit (AID) hypergradients as an optax transformation.

One update solves the lower level from the current ``y`` (warm start), then
differentiates ``Φ(x) = F(x, y*(x))`` by the implicit function theorem:

    ∇Φ(x) = ∇_x F(x, y*) + (∂_x G)ᵀ u,   (∂_y G)ᵀ u = −∇_y F(x, y*),

with ``G = ∇_y f`` (unconstrained) or the KKT map of
:func:`bilevel.kkt_optimality_fn` (equality constraints), through the same
VJP rule as :func:`bilevel.custom_root`.

References:
  Pedregosa, *Hyperparameter optimization with approximate gradient*, ICML
  2016; Rajeswaran et al., *Meta-Learning with Implicit Gradients*, NeurIPS
  2019; Blondel et al., NeurIPS 2022.
"""

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
import optax.tree_utils as otu

from bilevel._base import (
  Params,
  cast_like,
  per_level,
  require_extra_args,
  upcast,
)
from bilevel._implicit_diff import kkt_optimality_fn, root_vjp
from bilevel._inner import inner_solve
from bilevel._linear_solve import solve_cg, solve_normal_cg

PyTree = Any
Solve = Callable[[Callable[[PyTree], PyTree], PyTree], PyTree]

# Curvature-safe CG (stops on pᵀHp ≤ 0): on non-convex lower levels undamped
# CG returns hypergradients anti-correlated with the unrolled ones
# (reference/bilevel_methods.md, last section).
DEFAULT_LINEAR_SOLVE = functools.partial(solve_cg, tol=1e-6, maxiter=100)
DEFAULT_KKT_SOLVE = functools.partial(solve_normal_cg, tol=1e-8, maxiter=200)


class ImplicitState(NamedTuple):
  """State of :func:`scale_by_implicit`: diagnostics of the last step.

  Attributes:
    count: int32 scalar, number of updates.
    inner_grad_norm: float32 scalar, ``‖G(y*)‖`` — the lower-level gradient
      norm (KKT residual when constrained) at the solution used.
    linear_solve_residual: float32 scalar, ``‖Aᵀu + ∇_y F‖/‖∇_y F‖`` of the
      adjoint solve; large when CG stopped on negative curvature or
      ``maxiter``.
  """
  count: jax.Array
  inner_grad_norm: jax.Array
  linear_solve_residual: jax.Array


def _multipliers(constraints, upper, lower, batch, grad_y):
  """Least-squares multipliers ``ν = argmin ‖∇_y f + J_yᵀν‖`` at ``lower``."""
  h_fn = lambda y: constraints(upper, y, batch)
  _, h_vjp = jax.vjp(h_fn, lower)
  jac = lambda w: jax.jvp(h_fn, (lower,), (w,))[1]
  jac_t = lambda nu: h_vjp(nu)[0]
  return solve_cg(lambda nu: jac(jac_t(nu)), -jac(grad_y))


def scale_by_implicit(
    inner_optimizer: optax.GradientTransformation | None,
    inner_steps: int,
    linear_solve: Solve | None = None,
    inner_solver: Callable[[PyTree, PyTree, Any], PyTree] | None = None,
    *,
    equality_constrained: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """Turns the outer problem into implicit hypergradient directions.

  ``update(outer_grads, state, params, *, outer_loss, inner_loss,
  outer_batch=None, inner_batch=None, constraints=None)`` returns
  ``Params(upper=∇Φ(x), lower=y − y*)``: after ``per_level(upper_opt,
  optax.sgd(1.0))`` the lower level sits exactly at ``y*``. ``outer_grads`` is
  unused (it is taken at the old ``y``). Work runs in at least float32;
  directions come back in the dtypes of ``params``.

  Args:
    inner_optimizer: optax transformation for the lower level, run for
      ``inner_steps`` steps from ``params.lower`` with a fresh state.
    inner_steps: number of inner steps.
    linear_solve: ``solve(matvec, b)`` for the adjoint system; default
      :data:`DEFAULT_LINEAR_SOLVE` (curvature-safe CG, ``tol=1e-6``,
      ``maxiter=100``), or normal CG when ``equality_constrained``. On
      non-convex lower levels near-zero curvature can still lengthen CG's
      steps: when ``linear_solve_residual`` stays near 1, add ``ridge``.
    inner_solver: optional exact solver ``(upper, lower_init, inner_batch) ->
      y*`` replacing the optax loop (required with constraints).
    equality_constrained: treat ``constraints(upper, lower, inner_batch) =
      0`` (a required extra argument) as equality constraints of the lower
      level and differentiate its KKT system; multipliers are recovered by
      least squares at ``y*``.

  Returns:
    A transformation whose state is an :class:`ImplicitState`.

  Raises:
    ValueError: if neither ``inner_optimizer`` nor ``inner_solver`` is given,
      or ``equality_constrained`` without ``inner_solver``.
  """
  if inner_solver is None and (inner_optimizer is None or
                               equality_constrained):
    raise ValueError("scale_by_implicit needs an inner_solver with "
                     "equality_constrained=True, else an inner_optimizer.")
  if linear_solve is None:
    linear_solve = (DEFAULT_KKT_SOLVE if equality_constrained
                    else DEFAULT_LINEAR_SOLVE)
  required = ("outer_loss", "inner_loss") + (
      ("constraints",) if equality_constrained else ())

  def solve_lower(inner_loss, upper, lower, batch):
    if inner_solver is not None:
      return cast_like(inner_solver(upper, lower, batch), lower)
    return inner_solve(inner_loss, inner_optimizer, inner_steps, upper, lower,
                       batch)

  def init_fn(params):
    del params
    # Distinct arrays per field, so a donating jit never sees one buffer twice.
    return ImplicitState(jnp.zeros([], jnp.int32), jnp.zeros([], jnp.float32),
                         jnp.zeros([], jnp.float32))

  def update_fn(outer_grads, state, params=None, **extra_args):
    del outer_grads  # at the old lower; the hypergradient is taken at y*.
    if params is None:
      raise ValueError("scale_by_implicit.update() needs params.")
    outer_loss, inner_loss, *constraints = require_extra_args(
        "implicit", extra_args, *required)
    outer_batch = extra_args.get("outer_batch")
    inner_batch = extra_args.get("inner_batch")
    x, y0 = upcast(params.upper), upcast(params.lower)
    y_star = jax.lax.stop_gradient(solve_lower(inner_loss, x, y0, inner_batch))
    grad_x, grad_y = jax.grad(outer_loss, argnums=(0, 1))(x, y_star,
                                                         outer_batch)
    if constraints:
      kkt = kkt_optimality_fn(inner_loss, constraints[0])
      optimality = lambda s, x: kkt(s, x, inner_batch)
      nu = _multipliers(constraints[0], x, y_star, inner_batch,
                        jax.grad(inner_loss, argnums=1)(x, y_star, inner_batch))
      sol, v = (y_star, nu), (grad_y, jnp.zeros_like(nu))
    else:
      optimality = lambda y, x: jax.grad(inner_loss, argnums=1)(x, y,
                                                                inner_batch)
      sol, v = y_star, grad_y
    (vjp_x,), optimality_value, residual = root_vjp(
        optimality, sol, (x,), v, linear_solve)
    directions = Params(
        upper=cast_like(otu.tree_add(grad_x, vjp_x), params.upper),
        lower=cast_like(otu.tree_sub(y0, y_star), params.lower))
    state = ImplicitState(
        count=optax.safe_int32_increment(state.count),
        inner_grad_norm=otu.tree_norm(optimality_value).astype(jnp.float32),
        linear_solve_residual=residual.astype(jnp.float32))
    return directions, state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def implicit(
    upper_optimizer: optax.GradientTransformation,
    inner_optimizer: optax.GradientTransformation | None,
    inner_steps: int,
    *,
    linear_solve: Solve | None = None,
    inner_solver: Callable[[PyTree, PyTree, Any], PyTree] | None = None,
    equality_constrained: bool = False,
    lower_optimizer: optax.GradientTransformation | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Implicit-differentiation bilevel solver (the AID reference).

  ``chain(scale_by_implicit(...), per_level(upper_optimizer,
  lower_optimizer))``; the default ``lower_optimizer = optax.sgd(1.0)`` moves
  the lower level to ``y*`` at every step.

  Args:
    upper_optimizer: optax transformation applied to ``∇Φ(x)``.
    inner_optimizer: see :func:`scale_by_implicit`.
    inner_steps: see :func:`scale_by_implicit`.
    linear_solve: see :func:`scale_by_implicit`.
    inner_solver: see :func:`scale_by_implicit`.
    equality_constrained: see :func:`scale_by_implicit`.
    lower_optimizer: applied to ``y − y*``.

  Returns:
    A transformation over :class:`bilevel.Params`.
  """
  return optax.chain(
      scale_by_implicit(inner_optimizer, inner_steps, linear_solve,
                        inner_solver,
                        equality_constrained=equality_constrained),
      per_level(upper_optimizer,
                optax.sgd(1.0) if lower_optimizer is None else lower_optimizer))
