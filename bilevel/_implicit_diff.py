"""Implicit differentiation of roots and fixed points.

If ``sol(θ)`` solves ``G(sol, θ) = 0`` and ``A = ∂₁G(sol, θ)`` is invertible,
the implicit function theorem gives ``∂sol/∂θ = −A⁻¹ ∂₂G``, so a
vector-Jacobian product needs one linear solve with ``Aᵀ``:

    vᵀ ∂sol/∂θ = uᵀ ∂₂G   with   Aᵀ u = −v.

The solver producing ``sol`` is never differentiated: it may be an optax loop,
a ``while_loop`` or a closed form. The linear solver is injected as
``solve(matvec, b)`` (see :mod:`bilevel._linear_solve`).

References:
  Blondel et al., *Efficient and Modular Implicit Differentiation*, NeurIPS
  2022 (the ``custom_root`` design of JAXopt, re-implemented here).
"""

import functools
from collections.abc import Callable
from typing import Any

import jax
import optax.tree_utils as otu

from bilevel._linear_solve import (
  linear_solve_residual,
  solve_cg,
  solve_normal_cg,
)

PyTree = Any
Solve = Callable[[Callable[[PyTree], PyTree], PyTree], PyTree]


def root_vjp(
    optimality_fn: Callable[..., PyTree],
    sol: PyTree,
    args: tuple[Any, ...],
    cotangent: PyTree,
    solve: Solve = solve_cg,
) -> tuple[tuple[PyTree, ...], PyTree, jax.Array]:
  """Vector-Jacobian product of a root ``sol`` of ``optimality_fn(·, *args)``.

  Args:
    optimality_fn: ``G(sol, *args) -> pytree like sol``, zero at the root.
    sol: the root.
    args: the arguments to differentiate ``sol`` against.
    cotangent: ``v``, a pytree like ``sol``.
    solve: linear solver; it receives ``matvec(u) = Aᵀu``.

  Returns:
    ``(vjps, optimality, residual)``: ``vᵀ∂sol/∂args[i]`` for each argument,
    ``G(sol, *args)`` (how far ``sol`` is from a root) and the relative
    residual of the adjoint solve ``‖Aᵀu + v‖/‖v‖``.
  """
  optimality, vjp_sol = jax.vjp(lambda s: optimality_fn(s, *args), sol)
  matvec = lambda u: vjp_sol(u)[0]
  minus_v = otu.tree_scale(-1.0, cotangent)
  u = solve(matvec, minus_v)
  _, vjp_args = jax.vjp(lambda *a: optimality_fn(sol, *a), *args)
  residual = linear_solve_residual(matvec, u, minus_v)
  return vjp_args(u), optimality, residual


def custom_root(
    optimality_fn: Callable[..., PyTree],
    solve: Solve = solve_cg,
    has_aux: bool = False,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
  """Decorator making a root solver differentiable by implicit differentiation.

  ``custom_root(G)(solver)`` has the signature of ``solver(init_params,
  *args) -> sol`` (or ``(sol, aux)`` with ``has_aux``) and a custom VJP:
  ``init_params`` get a zero cotangent, ``args`` the implicit one, ``aux``
  is not differentiated. Reverse mode only (``jax.custom_vjp``); it composes
  with ``jit``, ``vmap`` and higher-order reverse derivatives (the forward
  pass re-enters the wrapped solver, so a second ``grad`` also goes through
  the implicit rule rather than through the solver's iterations).

  Args:
    optimality_fn: ``G(params, *args) -> pytree like params``, zero at the
      solution. For minimisation of ``f(params, *args)`` this is ``∇₁f``.
    solve: linear solver ``solve(matvec, b)``; ``matvec`` applies ``Aᵀ`` with
      ``A = ∂₁G``. CG needs ``A`` symmetric (a Hessian); use
      :func:`bilevel.solve_normal_cg` otherwise (KKT systems).
    has_aux: whether the solver returns ``(sol, aux)``.

  Returns:
    A decorator. The decorated solver takes ``args`` positionally, as arrays
    (pytrees of arrays); close over anything else.
  """
  def decorator(solver):
    @jax.custom_vjp
    def wrapped(init_params, *args):
      return solver(init_params, *args)

    def fwd(init_params, *args):
      out = wrapped(init_params, *args)
      return out, (out, args)

    def bwd(residuals, cotangent):
      out, args = residuals
      sol, v = (out[0], cotangent[0]) if has_aux else (out, cotangent)
      vjps, _, _ = root_vjp(optimality_fn, sol, args, v, solve)
      return (None, *vjps)

    wrapped.defvjp(fwd, bwd)

    @functools.wraps(solver)
    def solver_with_implicit_diff(init_params, *args):
      return wrapped(init_params, *args)

    return solver_with_implicit_diff

  return decorator


def custom_fixed_point(
    fixed_point_fn: Callable[..., PyTree],
    solve: Solve = solve_normal_cg,
    has_aux: bool = False,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
  """Decorator for solvers of ``x = T(x, *args)``; see :func:`custom_root`.

  The optimality function is ``x − T(x, *args)`` (the sign flip of
  ``T(x) − x`` leaves the derivative unchanged and makes ``A = I − ∂₁T``
  positive definite for a gradient step ``T(x) = x − η∇f(x)``, so CG also
  applies there). The default is normal CG because ``∂₁T`` is in general
  not symmetric.

  Args:
    fixed_point_fn: ``T(params, *args) -> pytree like params``.
    solve: linear solver ``solve(matvec, b)``.
    has_aux: whether the solver returns ``(sol, aux)``.

  Returns:
    A decorator, as :func:`custom_root`.
  """
  def optimality_fn(params, *args):
    return otu.tree_sub(params, fixed_point_fn(params, *args))

  return custom_root(optimality_fn, solve=solve, has_aux=has_aux)


def kkt_optimality_fn(
    inner_loss: Callable[..., jax.Array],
    eq_constraints: Callable[..., jax.Array],
) -> Callable[..., tuple[PyTree, jax.Array]]:
  """KKT optimality function of an equality-constrained lower level.

  For ``min_y f(x, y)  s.t.  h(x, y) = 0`` with Lagrangian
  ``f + νᵀh``, returns

      G((y, ν), x, *rest) = (∇_y f(x, y, *rest) + J_yᵀν,  h(x, y, *rest)).

  ``A = ∂G/∂(y, ν)`` is the symmetric, indefinite KKT matrix
  ``[[∇²_yy L, J_yᵀ], [J_y, 0]]``: pair it with
  :func:`bilevel.solve_normal_cg`.

  Args:
    inner_loss: ``f(upper, lower, *rest) -> scalar``.
    eq_constraints: ``h(upper, lower, *rest) -> [m]``.

  Returns:
    ``optimality_fn((lower, multipliers), upper, *rest)`` returning
    ``(stationarity, feasibility)``, structured like ``(lower, multipliers)``
    when ``multipliers`` has shape ``[m]``.

  References:
    Nocedal & Wright, 2006, §12.3; Blondel et al., NeurIPS 2022, §2.3.
  """
  def optimality_fn(primal_dual, upper, *rest):
    lower, multipliers = primal_dual
    grad = jax.grad(inner_loss, argnums=1)(upper, lower, *rest)
    h, h_vjp = jax.vjp(lambda y: eq_constraints(upper, y, *rest), lower)
    return otu.tree_add(grad, h_vjp(multipliers)[0]), h

  return optimality_fn
