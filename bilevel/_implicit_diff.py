"""Implicit differentiation of roots and fixed points.

If ``sol(θ)`` solves ``G(sol, θ) = 0`` and ``A = ∂₁G(sol, θ)`` is invertible,
the implicit function theorem gives ``∂sol/∂θ = −A⁻¹ ∂₂G``: a
Jacobian-vector product needs one linear solve with ``A``, a vector-Jacobian
product one with ``Aᵀ``:

    ∂sol·dθ = t   with   A t = −∂₂G·dθ,
    vᵀ ∂sol/∂θ = uᵀ ∂₂G   with   Aᵀ u = −v.

The solver producing ``sol`` is never differentiated: it may be an optax loop,
a ``while_loop`` or a closed form. The linear solver is injected as
``solve(matvec, b)`` (see :mod:`bilevel._linear_solve`).

References:
  Blondel et al., *Efficient and Modular Implicit Differentiation*, NeurIPS
  2022 (the ``custom_root`` design of JAXopt, re-implemented here).
"""

import functools
import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax.tree_utils as otu

from bilevel._linear_solve import linear_solve_residual, solve_gmres

PyTree = Any
Solve = Callable[[Callable[[PyTree], PyTree], PyTree], PyTree]


def _tracks_residual(solve: Solve) -> bool:
  try:
    return "return_residual" in inspect.signature(solve).parameters
  except (TypeError, ValueError):  # builtins and C callables
    return False


def solve_differentiable(solve: Solve, matvec, b) -> PyTree:
  """``A⁻¹b`` by ``solve``, differentiable whatever ``solve`` is."""
  if _tracks_residual(solve):
    return solve(matvec, b)  # ours: already a custom_linear_solve
  return _implicit_linear_solve(solve, matvec, b)


def solve_with_residual(solve: Solve, matvec, b) -> tuple[PyTree, jax.Array]:
  """``(x, ‖A x − b‖/‖b‖)``, the solver's own residual where it has one.

  Our solvers track the residual for free and are differentiable; any other
  ``solve`` goes through :func:`_implicit_linear_solve` (so ``x`` can be
  differentiated even when ``solve`` is a ``while_loop``) and its residual
  costs one more ``matvec``.
  """
  if _tracks_residual(solve):
    return solve(matvec, b, return_residual=True)
  x = _implicit_linear_solve(solve, matvec, b)
  return x, jax.lax.stop_gradient(linear_solve_residual(matvec, x, b))


def _implicit_linear_solve(solve: Solve, matvec, b: PyTree) -> PyTree:
  """``A⁻¹b`` by ``solve``, transposed by ``solve`` on ``Aᵀ``.

  The user's ``solve`` need not be transposable itself (a ``while_loop``):
  :func:`jax.lax.custom_linear_solve` applies it to ``Aᵀ`` for reverse mode.
  """
  plain = lambda mv, rhs: (solve(mv, rhs, return_residual=False)
                           if _tracks_residual(solve) else solve(mv, rhs))
  return jax.lax.custom_linear_solve(matvec, b, plain, transpose_solve=plain)


def root_vjp(
    optimality_fn: Callable[..., PyTree],
    sol: PyTree,
    args: tuple[Any, ...],
    cotangent: PyTree,
    solve: Solve = solve_gmres,
) -> tuple[tuple[PyTree, ...], PyTree, jax.Array]:
  """Vector-Jacobian product of a root ``sol`` of ``optimality_fn(·, *args)``.

  Args:
    optimality_fn: ``G(sol, *args) -> pytree like sol``, zero at the root.
    sol: the root.
    args: the arguments to differentiate ``sol`` against.
    cotangent: ``v``, a pytree like ``sol``.
    solve: linear solver; it receives ``matvec(u) = Aᵀu`` (``A = ∂₁G``).

  Returns:
    ``(vjps, optimality, residual)``: ``vᵀ∂sol/∂args[i]`` for each argument,
    ``G(sol, *args)`` (how far ``sol`` is from a root) and the relative
    residual of the adjoint solve ``Aᵀu = −v``: the one ``solve`` tracked when
    it takes ``return_residual`` (no extra ``matvec``; with damping, that of
    the damped system), else ``‖Aᵀu + v‖/‖v‖`` at one extra ``matvec``.
  """
  optimality, vjp_sol = jax.vjp(lambda s: optimality_fn(s, *args), sol)
  matvec = lambda u: vjp_sol(u)[0]
  u, residual = solve_with_residual(solve, matvec,
                                     otu.tree_scale(-1.0, cotangent))
  _, vjp_args = jax.vjp(lambda *a: optimality_fn(sol, *a), *args)
  return vjp_args(u), optimality, residual


def root_jvp(
    optimality_fn: Callable[..., PyTree],
    sol: PyTree,
    args: tuple[Any, ...],
    tangents: tuple[Any, ...],
    solve: Solve = solve_gmres,
) -> PyTree:
  """Jacobian-vector product of a root ``sol`` of ``optimality_fn(·, *args)``.

  Args:
    optimality_fn: ``G(sol, *args) -> pytree like sol``, zero at the root.
    sol: the root.
    args: the arguments ``sol`` depends on.
    tangents: ``dθ``, one tangent per argument (``float0`` for integers).
    solve: linear solver; it receives ``matvec(t) = A t`` (``A = ∂₁G``), and
      ``Aᵀ`` when the result is differentiated in reverse mode.

  Returns:
    ``∂sol·dθ = −A⁻¹(∂₂G·dθ)``, a pytree like ``sol``. It is linear and
    transposable in ``tangents`` (the solve goes through
    :func:`jax.lax.custom_linear_solve`), so reverse mode follows from it.
  """
  _, matvec = jax.linearize(lambda s: optimality_fn(s, *args), sol)
  _, rhs = jax.jvp(lambda *a: optimality_fn(sol, *a), tuple(args),
                   tuple(tangents))
  # custom_linear_solve transposes only if every leaf of b is linear in the
  # tangents; a block of G that ignores args (e.g. KKT feasibility) has a
  # constant zero there, so tie each leaf to them by 0·Σ dθ.
  leaves = [jnp.asarray(t) for t in jax.tree.leaves(tangents)]
  link = sum((0 * jnp.sum(t) for t in leaves
              if jnp.issubdtype(t.dtype, jnp.inexact)), jnp.zeros([]))
  rhs = jax.tree.map(lambda r: -r + link.astype(r.dtype), rhs)
  t = _implicit_linear_solve(solve, matvec, rhs)
  return jax.tree.map(lambda ti, si: ti.astype(jnp.asarray(si).dtype), t, sol)


def _zero_tangent(x: Any) -> Any:
  x = jnp.asarray(x)
  if jnp.issubdtype(x.dtype, jnp.inexact):
    return jnp.zeros_like(x)
  return np.zeros(x.shape, jax.dtypes.float0)


def custom_root(
    optimality_fn: Callable[..., PyTree],
    solve: Solve = solve_gmres,
    has_aux: bool = False,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
  """Decorator making a root solver differentiable by implicit differentiation.

  ``custom_root(G)(solver)`` has the signature of ``solver(init_params,
  *args, **kwargs) -> sol`` (or ``(sol, aux)`` with ``has_aux``) and a
  :func:`jax.custom_jvp` rule, :func:`root_jvp`: the tangent solves
  ``A t = −∂₂G·dθ`` through :func:`jax.lax.custom_linear_solve`, whose
  transpose applies ``solve`` to ``Aᵀ``, so reverse mode comes from JAX's
  transposition of the same rule. One rule thus gives ``jvp``, ``jacfwd``,
  ``grad``, ``jacrev``, any order (the rule calls the decorated solver
  again, so a second derivative also goes through the implicit rule rather
  than through the solver's iterations) and composes with ``jit`` and
  ``vmap``. ``init_params`` get a zero derivative; ``aux`` is not
  differentiated; ``args`` and ``kwargs`` are both differentiated, and both
  are passed on to ``optimality_fn`` as they came (``G(sol, *args,
  **kwargs)``).

  The default linear solve is GMRES because ``A`` may be anything here:
  symmetric positive definite (``∇f`` of a minimisation), negative definite
  (``−∇f``, a maximisation, or the residual form ``T(x) − x``), indefinite
  (KKT) or non-symmetric (fixed points). CG, the cheaper choice, is only
  right for the first: it returns an exactly zero Jacobian on a
  negative-definite ``A`` (its first direction has ``pᵀAp < 0``). With a
  symmetric ``A`` pass :func:`bilevel.solve_cg` (positive definite) or
  :func:`bilevel.solve_minres` / :func:`bilevel.solve_hessian` (any sign,
  O(1) memory).

  Args:
    optimality_fn: ``G(params, *args, **kwargs) -> pytree like params``, zero
      at the solution. For minimisation of ``f(params, *args)`` this is
      ``∇₁f``.
    solve: linear solver ``solve(matvec, b)``, called with ``matvec = A``
      (forward mode) or ``Aᵀ`` (reverse mode).
    has_aux: whether the solver returns ``(sol, aux)``.

  Returns:
    A decorator. ``args`` and ``kwargs`` of the decorated solver are arrays
    (pytrees of arrays; integers get ``float0`` tangents); close over
    anything else.
  """
  def decorator(solver):
    @jax.custom_jvp
    def wrapped(init_params, args, kwargs):
      return solver(init_params, *args, **kwargs)

    @wrapped.defjvp
    def wrapped_jvp(primals, tangents):
      init_params, args, kwargs = primals
      _, d_args, d_kwargs = tangents
      out = wrapped(init_params, args, kwargs)
      sol = out[0] if has_aux else out
      packed = lambda s, a, kw: optimality_fn(s, *a, **kw)
      d_sol = root_jvp(packed, sol, (args, kwargs), (d_args, d_kwargs), solve)
      if has_aux:
        return out, (d_sol, jax.tree.map(_zero_tangent, out[1]))
      return out, d_sol

    @functools.wraps(solver)
    def solver_with_implicit_diff(init_params, *args, **kwargs):
      return wrapped(init_params, args, kwargs)

    return solver_with_implicit_diff

  return decorator


def custom_fixed_point(
    fixed_point_fn: Callable[..., PyTree],
    solve: Solve = solve_gmres,
    has_aux: bool = False,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
  """Decorator for solvers of ``x = T(x, *args)``; see :func:`custom_root`.

  The optimality function is ``x − T(x, *args)``, so ``A = I − ∂₁T``: in
  general not symmetric, hence GMRES by default (for a gradient step
  ``T(x) = x − η∇f(x)``, ``A = η∇²f`` and :func:`bilevel.solve_cg` applies).

  Args:
    fixed_point_fn: ``T(params, *args, **kwargs) -> pytree like params``.
    solve: linear solver ``solve(matvec, b)``.
    has_aux: whether the solver returns ``(sol, aux)``.

  Returns:
    A decorator, as :func:`custom_root`.
  """
  def optimality_fn(params, *args, **kwargs):
    return otu.tree_sub(params, fixed_point_fn(params, *args, **kwargs))

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
  :func:`bilevel.solve_minres` (symmetric, any sign) or
  :func:`bilevel.solve_gmres`.

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
