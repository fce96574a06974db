"""The matrix-free linear solvers against dense solves (float64)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import bilevel

_TREE = {"w": jnp.zeros([3]), "b": jnp.zeros([2, 2])}  # 7 entries


def _spectral(key, eigenvalues):
  """``Q diag(eigenvalues) Qᵀ`` with a random orthogonal ``Q``."""
  n = len(eigenvalues)
  q, _ = jnp.linalg.qr(jax.random.normal(key, (n, n), jnp.float64))
  return (q * jnp.asarray(eigenvalues, jnp.float64)) @ q.T, q


def _tree_matvec(mat):
  """``mat`` acting on the pytrees shaped like ``_TREE``."""
  _, unravel = ravel_pytree(jax.tree.map(lambda x: x.astype(mat.dtype), _TREE))
  return lambda v: unravel(mat @ ravel_pytree(v)[0]), unravel


def _rel_err(got, want):
  got, want = ravel_pytree(got)[0], ravel_pytree(want)[0]
  return float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))


def test_cg_matches_dense_solve_on_pytrees():
  with jax.enable_x64(True):
    mat, _ = _spectral(jax.random.key(0), np.linspace(0.5, 10.0, 7))
    matvec, unravel = _tree_matvec(mat)
    b = jax.random.normal(jax.random.key(1), (7,), jnp.float64)
    x = jax.jit(lambda b: bilevel.solve_cg(matvec, b))(unravel(b))
    assert _rel_err(x, unravel(jnp.linalg.solve(mat, b))) < 1e-10
    assert jax.tree.structure(x) == jax.tree.structure(_TREE)


def test_cg_ridge_solves_the_damped_system():
  with jax.enable_x64(True):
    mat, _ = _spectral(jax.random.key(2), np.linspace(0.0, 4.0, 6))
    b = jax.random.normal(jax.random.key(3), (6,), jnp.float64)
    x = bilevel.solve_cg(lambda v: mat @ v, b, ridge=0.3)
    want = jnp.linalg.solve(mat + 0.3 * jnp.eye(6), b)
    assert _rel_err(x, want) < 1e-10


def _kkt_matrix(key):
  hessian, _ = _spectral(key, np.linspace(1.0, 3.0, 5))
  jac = jax.random.normal(jax.random.fold_in(key, 1), (2, 5), jnp.float64)
  return jnp.block([[hessian, jac.T], [jac, jnp.zeros((2, 2))]])


def _nonsymmetric_matrix(key):
  return jnp.eye(7) + 0.3 * jax.random.normal(key, (7, 7), jnp.float64)


@pytest.mark.parametrize("make", [_kkt_matrix, _nonsymmetric_matrix],
                         ids=["kkt", "nonsymmetric"])
def test_normal_cg_matches_dense_solve(make):
  with jax.enable_x64(True):
    mat = make(jax.random.key(4))
    b = jax.random.normal(jax.random.key(5), (mat.shape[0],), jnp.float64)
    x = bilevel.solve_normal_cg(lambda v: mat @ v, b, tol=1e-14)
    assert _rel_err(x, jnp.linalg.solve(mat, b)) < 1e-8


def test_normal_cg_ridge_is_tikhonov_least_squares():
  with jax.enable_x64(True):
    mat = _nonsymmetric_matrix(jax.random.key(6))
    b = jax.random.normal(jax.random.key(7), (7,), jnp.float64)
    x = bilevel.solve_normal_cg(lambda v: mat @ v, b, ridge=0.1)
    want = jnp.linalg.solve(mat.T @ mat + 0.1 * jnp.eye(7), mat.T @ b)
    assert _rel_err(x, want) < 1e-10


def test_neumann_is_the_truncated_series_and_converges():
  with jax.enable_x64(True):
    mat, _ = _spectral(jax.random.key(8), np.linspace(1.0, 4.0, 6))
    b = jax.random.normal(jax.random.key(9), (6,), jnp.float64)
    step, terms = 0.25, 7
    power = jnp.eye(6) - step * mat
    series = step * sum(jnp.linalg.matrix_power(power, k) @ b
                        for k in range(terms))
    x = bilevel.solve_neumann(lambda v: mat @ v, b, step=step, maxiter=terms)
    assert _rel_err(x, series) < 1e-12
    # The contraction factor is 1 − step·λ_min = 0.75.
    x = bilevel.solve_neumann(lambda v: mat @ v, b, step=step, maxiter=150)
    assert _rel_err(x, jnp.linalg.solve(mat, b)) < 1e-12


def test_cg_returns_zero_when_the_first_direction_has_negative_curvature():
  with jax.enable_x64(True):
    mat, q = _spectral(jax.random.key(10), [3.0, 2.0, 1.0, -0.5])
    x = bilevel.solve_cg(lambda v: mat @ v, q[:, 3])
    np.testing.assert_array_equal(x, jnp.zeros(4))


def _truncated_cg_reference(mat, b, iters=None, truncate=True):
  """Textbook CG in NumPy; ``truncate``: stop before pᵀAp ≤ 0."""
  mat, b = np.asarray(mat), np.asarray(b)
  x, r, p = np.zeros_like(b), b.copy(), b.copy()
  for _ in range(iters or len(b)):
    curvature = p @ mat @ p
    if truncate and curvature <= 0:
      break
    alpha = (r @ r) / curvature
    x, r_new = x + alpha * p, r - alpha * (mat @ p)
    p, r = r_new + (r_new @ r_new) / (r @ r) * p, r_new
  return x


def test_cg_stops_on_indefinite_matrix_without_diverging():
  with jax.enable_x64(True):
    mat, _ = _spectral(jax.random.key(11), [4.0, 3.0, 2.0, 1.0, -1.0])
    b = jax.random.normal(jax.random.key(12), (5,), jnp.float64)
    x = bilevel.solve_cg(lambda v: mat @ v, b)
    assert bool(jnp.all(jnp.isfinite(x)))
    np.testing.assert_allclose(x, _truncated_cg_reference(mat, b), rtol=1e-10)
    # CG steps only along positive curvature: the quadratic model decreases.
    assert 0.5 * x @ mat @ x - b @ x < 0
    residual = bilevel.linear_solve_residual(lambda v: mat @ v, x, b)
    assert residual > 1e-3  # reported, not hidden


def test_plain_cg_takes_exactly_maxiter_steps_through_negative_curvature():
  with jax.enable_x64(True):
    mat, _ = _spectral(jax.random.key(11), [4.0, 3.0, 2.0, 1.0, -1.0])
    b = jax.random.normal(jax.random.key(12), (5,), jnp.float64)
    plain = functools.partial(bilevel.solve_cg, tol=0.0, maxiter=3,
                              stop_on_negative_curvature=False)
    x = plain(lambda v: mat @ v, b)
    np.testing.assert_allclose(
        x, _truncated_cg_reference(mat, b, iters=3, truncate=False),
        rtol=1e-10)
    assert not np.allclose(x, bilevel.solve_cg(lambda v: mat @ v, b))


def test_ridge_bounds_the_solution_on_a_near_singular_indefinite_matrix():
  with jax.enable_x64(True):
    mat, _ = _spectral(jax.random.key(13), [4.0, 3.0, 2.0, 1.0, -1e-5])
    b = jax.random.normal(jax.random.key(14), (5,), jnp.float64)
    assert jnp.linalg.norm(jnp.linalg.solve(mat, b)) > 100 * jnp.linalg.norm(b)
    x = bilevel.solve_cg(lambda v: mat @ v, b, ridge=0.1)
    assert jnp.linalg.norm(x) <= jnp.linalg.norm(b) / (0.1 - 1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("solve", [
    functools.partial(bilevel.solve_cg, maxiter=10),
    functools.partial(bilevel.solve_normal_cg, maxiter=10),
    functools.partial(bilevel.solve_neumann, step=0.25, maxiter=40),
], ids=["cg", "normal_cg", "neumann"])
def test_solvers_keep_dtypes(solve, dtype):
  mat = jnp.diag(jnp.linspace(1.0, 4.0, 4)).astype(dtype)
  b = {"a": jnp.ones([4], dtype), "b": jnp.ones([], jnp.float32)}
  matvec = lambda v: {"a": mat @ v["a"], "b": 2.0 * v["b"]}
  x = solve(matvec, b)
  assert x["a"].dtype == dtype and x["b"].dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(x["a"], np.float32),
                             1 / np.linspace(1.0, 4.0, 4), rtol=0.05)


def test_cg_solution_is_differentiable_both_modes():
  with jax.enable_x64(True):
    mat, _ = _spectral(jax.random.key(15), np.linspace(1.0, 3.0, 5))
    b = jax.random.normal(jax.random.key(16), (5,), jnp.float64)
    w = jax.random.normal(jax.random.key(15), (5,), jnp.float64)
    # x(s) = (A + sI)⁻¹b, so d(wᵀx)/ds = −wᵀ(A + sI)⁻¹x.
    objective = lambda s: w @ bilevel.solve_cg(lambda v: mat @ v + s * v, b)
    x = jnp.linalg.solve(mat + 0.5 * jnp.eye(5), b)
    want = -w @ jnp.linalg.solve(mat + 0.5 * jnp.eye(5), x)
    np.testing.assert_allclose(jax.grad(objective)(0.5), want, rtol=1e-8)
    np.testing.assert_allclose(jax.jvp(objective, (0.5,), (1.0,))[1], want,
                               rtol=1e-8)


def test_solvers_vmap_over_right_hand_sides():
  with jax.enable_x64(True):
    mat, _ = _spectral(jax.random.key(16), np.linspace(1.0, 3.0, 5))
    bs = jax.random.normal(jax.random.key(17), (3, 5), jnp.float64)
    xs = jax.vmap(lambda b: bilevel.solve_cg(lambda v: mat @ v, b))(bs)
    assert _rel_err(xs, jnp.linalg.solve(mat, bs.T).T) < 1e-10


def test_linear_solve_residual():
  with jax.enable_x64(True):
    mat = jnp.diag(jnp.array([1.0, 2.0, 4.0]))
    matvec = lambda v: mat @ v
    b = jnp.array([1.0, 2.0, 2.0])
    assert bilevel.linear_solve_residual(matvec, jnp.linalg.solve(mat, b),
                                         b) < 1e-15
    np.testing.assert_allclose(
        bilevel.linear_solve_residual(matvec, jnp.zeros(3), b), 1.0)
    np.testing.assert_allclose(
        bilevel.linear_solve_residual(matvec, jnp.ones(3), jnp.zeros(3)),
        np.sqrt(21.0))
