"""Matrix-free linear solvers over pytrees.

Every solver has the signature ``solve(matvec, b, **options) -> x`` with
``matvec(x) = A x`` a linear function from a pytree to a pytree of the same
structure, so that :func:`functools.partial` fixes the options and the result
plugs into :func:`bilevel.custom_root` as its ``solve`` argument. Dtypes are
kept leaf by leaf; the scalars of the Krylov recursions take the widest leaf
dtype.

The CG solvers are wrapped in :func:`jax.lax.custom_linear_solve`, so their
solution can itself be differentiated (forward and reverse, w.r.t. ``b`` and
whatever ``matvec`` closes over) as if the solve were exact; Neumann is a
fixed-length loop, differentiated as the truncated series it is.
"""

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax.tree_utils as otu

PyTree = Any
MatVec = Callable[[PyTree], PyTree]


def _axpy(alpha: jax.Array, x: PyTree, y: PyTree) -> PyTree:
  """``y + alpha * x``, leaf by leaf, in the dtypes of ``y``."""
  return jax.tree.map(lambda xi, yi: (yi + alpha * xi).astype(yi.dtype), x, y)


def _scalar_dtype(tree: PyTree) -> jnp.dtype:
  return jnp.result_type(*jax.tree.leaves(tree))


def _with_ridge(matvec: MatVec, ridge: float) -> MatVec:
  if isinstance(ridge, int | float) and ridge == 0:
    return matvec
  return lambda v: _axpy(ridge, v, matvec(v))


def _cg(matvec: MatVec, b: PyTree, *, tol: float, maxiter: int | None,
        stop_on_negative_curvature: bool = True) -> PyTree:
  """Conjugate gradient from ``x₀ = 0``, stopping on non-positive curvature.

  Stops when ``‖r_k‖ ≤ tol·‖b‖``, after ``maxiter`` iterations, or (if
  ``stop_on_negative_curvature``) when the search direction has
  ``pᵀAp ≤ 0`` — then the current iterate is returned (truncated CG,
  Nocedal & Wright, *Numerical Optimization*, Alg. 7.1).
  """
  if maxiter is None:
    maxiter = otu.tree_size(b)
  dtype = _scalar_dtype(b)
  bb = otu.tree_vdot(b, b).astype(dtype)
  threshold = jnp.asarray(tol, dtype) ** 2 * bb

  def cond(carry):
    k, _, _, _, rr, stopped = carry
    return (k < maxiter) & (rr > threshold) & ~stopped

  def body(carry):
    k, x, r, p, rr, _ = carry
    ap = matvec(p)
    pap = otu.tree_vdot(p, ap).astype(dtype)
    stopped = (pap <= 0) & stop_on_negative_curvature
    alpha = jnp.where(stopped, 0, rr / jnp.where(stopped, 1, pap))
    x = _axpy(alpha, p, x)
    r = _axpy(-alpha, ap, r)
    rr_new = otu.tree_vdot(r, r).astype(dtype)
    p = _axpy(rr_new / rr, p, r)
    return k + 1, x, r, p, rr_new, stopped

  init = (0, otu.tree_zeros_like(b), b, b, bb, jnp.asarray(False))
  return jax.lax.while_loop(cond, body, init)[1]


def solve_cg(
    matvec: MatVec,
    b: PyTree,
    *,
    ridge: float = 0.0,
    tol: float = 1e-10,
    maxiter: int | None = None,
    stop_on_negative_curvature: bool = True,
) -> PyTree:
  """Solves ``(A + ridge·I) x = b`` by conjugate gradient, curvature-safe.

  For symmetric ``A``. On an indefinite ``A`` (a non-convex lower level, seen
  at the points an implicit method visits) plain CG divides by ``pᵀAp ≈ 0``
  or steps along negative curvature and the hypergradient blows up; this CG
  instead stops at the first direction with ``pᵀ(A + ridge·I)p ≤ 0`` and
  returns the iterate reached so far (``0`` if that is the first direction,
  i.e. the implicit correction is dropped). ``ridge > 0`` damps small
  curvature as well.

  Args:
    matvec: ``x -> A x``, linear, symmetric.
    b: right-hand side, any pytree (the output structure of ``matvec``).
    ridge: Tikhonov damping added to ``A``.
    tol: relative tolerance, ``‖b − (A + ridge·I) x‖ ≤ tol·‖b‖``.
    maxiter: iteration cap; ``None`` means the number of entries of ``b``
      (where exact-arithmetic CG terminates).
    stop_on_negative_curvature: ``False`` gives plain CG (with ``tol=0``
      exactly ``maxiter`` matrix-vector products, as hand-written CG(k)
      baselines do); keep ``True`` on non-convex lower levels.

  Returns:
    ``x``, structured and typed like ``b``.

  References:
    Hestenes & Stiefel, 1952; Nocedal & Wright, 2006, Alg. 5.2 and 7.1.
  """
  solve = functools.partial(_cg, tol=tol, maxiter=maxiter,
                            stop_on_negative_curvature=stop_on_negative_curvature)
  return jax.lax.custom_linear_solve(
      _with_ridge(matvec, ridge), b, solve, symmetric=True)


def _transpose(matvec: MatVec, example: PyTree) -> MatVec:
  transpose = jax.linear_transpose(matvec, example)
  return lambda y: transpose(y)[0]


def solve_normal_cg(
    matvec: MatVec,
    b: PyTree,
    *,
    ridge: float = 0.0,
    tol: float = 1e-10,
    maxiter: int | None = None,
) -> PyTree:
  """Solves ``A x = b`` by CG on ``(AᵀA + ridge·I) x = Aᵀb`` (normal CG).

  For non-symmetric or indefinite square ``A`` (KKT systems, fixed points):
  ``AᵀA`` is positive semi-definite, so CG applies, at the price of squaring
  the condition number. ``Aᵀ`` comes from :func:`jax.linear_transpose` of
  ``matvec``, so ``matvec`` must be linear and traceable.

  Args:
    matvec: ``x -> A x``, linear.
    b: right-hand side, a pytree like ``matvec``'s output.
    ridge: Tikhonov damping added to ``AᵀA``.
    tol: relative tolerance on the normal-equation residual.
    maxiter: iteration cap; ``None`` means the number of entries of ``b``.

  Returns:
    ``x``, structured and typed like ``b``.
  """
  def normal_solve(matvec, b):
    rmatvec = _transpose(matvec, b)
    normal = _with_ridge(lambda v: rmatvec(matvec(v)), ridge)
    return _cg(normal, rmatvec(b), tol=tol, maxiter=maxiter)

  # (AAᵀ + ridge·I)⁻¹A = A(AᵀA + ridge·I)⁻¹, so the same routine applied to
  # Aᵀ is the exact transpose of this solve, damping included.
  return jax.lax.custom_linear_solve(
      matvec, b, normal_solve, transpose_solve=normal_solve)


def solve_neumann(
    matvec: MatVec,
    b: PyTree,
    *,
    step: float = 1.0,
    maxiter: int = 20,
) -> PyTree:
  """Truncated Neumann series ``x = step·Σ_{k<maxiter} (I − step·A)^k b``.

  Equivalently ``maxiter`` Richardson iterations ``x ← x + step·(b − A x)``
  from ``x₀ = 0``. Converges to ``A⁻¹b`` iff the spectral radius of
  ``I − step·A`` is below 1 (e.g. ``0 < step < 2/λ_max`` for ``A ≻ 0``); with
  ``step`` the lower-level learning rate it is the hypergradient of an
  ``maxiter``-step unroll around the solution.

  Args:
    matvec: ``x -> A x``, linear.
    b: right-hand side.
    step: scaling ``η`` of ``A`` (a preconditioner ``η·I``).
    maxiter: number of terms (one ``matvec`` each).

  Returns:
    ``x``, structured and typed like ``b``.

  References:
    Lorraine, Vicol & Duvenaud, *Optimizing Millions of Hyperparameters by
    Implicit Differentiation*, AISTATS 2020, Alg. 3; Ghadimi & Wang, 2018.
  """
  def body(_, x):
    residual = jax.tree.map(lambda bi, ai: bi - ai, b, matvec(x))
    return _axpy(step, residual, x)

  return jax.lax.fori_loop(0, maxiter, body, otu.tree_zeros_like(b))


def linear_solve_residual(matvec: MatVec, x: PyTree, b: PyTree) -> jax.Array:
  """Relative residual ``‖A x − b‖ / ‖b‖`` (``‖A x‖`` when ``b = 0``).

  Args:
    matvec: ``x -> A x``.
    x: a candidate solution.
    b: the right-hand side.

  Returns:
    A scalar of the widest dtype of ``b``.
  """
  residual = jax.tree.map(lambda ai, bi: ai - bi, matvec(x), b)
  r_norm, b_norm = otu.tree_norm(residual), otu.tree_norm(b)
  return jnp.where(b_norm > 0, r_norm / jnp.where(b_norm > 0, b_norm, 1),
                   r_norm)
