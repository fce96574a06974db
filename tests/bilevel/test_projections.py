"""The projections against closed forms, independent solvers and the
variational inequality ``⟨x − Π(x), v − Π(x)⟩ ≤ 0`` for all feasible ``v``.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.linalg
import scipy.optimize
from jax.flatten_util import ravel_pytree

import bilevel


def _flat(tree):
  """The leaves of ``tree`` as one float64 NumPy vector (ravel_pytree order)."""
  return np.concatenate([np.asarray(l, np.float64).ravel()
                         for l in jax.tree.leaves(tree)])


def _capped_simplex_oracle(u, k):
  """Exact ``Π`` from the breakpoints of ``μ ↦ 1ᵀclip(u − μ, 0, 1)``."""
  total = lambda mu: np.clip(u - mu, 0, 1).sum()
  if total(0.0) <= k:
    return np.clip(u, 0, 1)
  points = np.unique(np.concatenate([[0.0], u, u - 1]))
  points = points[points >= 0]
  values = np.array([total(p) for p in points])
  i = np.flatnonzero(values <= k)[0]  # values decrease; values[0] > k
  lo, hi = points[i - 1], points[i]
  mu = lo + (values[i - 1] - k) / (values[i - 1] - values[i]) * (hi - lo)
  return np.clip(u - mu, 0, 1)


def _slsqp_projection(x, A=None, b=None, C=None, d=None):
  cons = []
  if A is not None:
    cons.append({"type": "ineq", "fun": lambda p: b - A @ p,
                 "jac": lambda p: -A})
  if C is not None:
    cons.append({"type": "eq", "fun": lambda p: C @ p - d,
                 "jac": lambda p: C})
  res = scipy.optimize.minimize(
      lambda p: 0.5 * np.sum((p - x) ** 2), x, jac=lambda p: p - x,
      constraints=cons, method="SLSQP",
      options={"ftol": 1e-12, "maxiter": 500})
  assert res.success, res.message
  return res.x


def _random_polyhedron(seed, n, m, p):
  """``{Ax ≤ b, Cx = d}`` around a known interior point, and a far point."""
  rng = np.random.default_rng(seed)
  A = rng.normal(size=(m, n))
  C = rng.normal(size=(p, n))
  inside = rng.normal(size=n)
  b = A @ inside + rng.uniform(0.1, 1.0, size=m)
  d = C @ inside
  x = inside + 3 * rng.normal(size=n)
  return A, b, C, d, inside, x


# ---- capped simplex ---------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_capped_simplex_r6(dtype):
  with jax.enable_x64(True):
    u = jnp.asarray([0.9, 0.8, 0.1], dtype)
    m = jax.jit(bilevel.projection_capped_simplex)(u, 1)
    assert m.dtype == dtype
    tol = 1e-6 if dtype == jnp.float32 else 1e-14
    np.testing.assert_allclose(m, [0.55, 0.45, 0.0], atol=tol)
    assert float(m.sum()) <= 1 + tol


def test_capped_simplex_no_op_is_clip():
  u = jnp.asarray([-0.5, 0.2, 1.7, 0.3])  # 1ᵀclip(u, 0, 1) = 1.5
  for k in (1.5, 2.0, 10.0):
    np.testing.assert_array_equal(bilevel.projection_capped_simplex(u, k),
                                  jnp.clip(u, 0, 1))


@pytest.mark.parametrize("scale,k", [(0.5, 1.0), (1.0, 3.5), (3.0, 7.0),
                                     (1.0, 0.0)])
def test_capped_simplex_matches_oracle_and_variational_inequality(scale, k):
  rng = np.random.default_rng(int(10 * scale + k))
  with jax.enable_x64(True):
    for _ in range(5):
      u = scale * rng.normal(size=20) + 0.5
      m = np.asarray(jax.jit(bilevel.projection_capped_simplex)(u, k))
      np.testing.assert_allclose(m, _capped_simplex_oracle(u, k), atol=1e-12)
      assert m.min() >= 0 and m.max() <= 1 and m.sum() <= k + 1e-12
      v = rng.uniform(size=(200, 20))
      v *= np.minimum(1, k / v.sum(1, keepdims=True))
      assert np.max((v - m) @ (u - m)) <= 1e-9


def test_capped_simplex_pytree_shares_one_budget():
  tree = {"a": jnp.asarray([[0.9], [0.1]]), "b": jnp.asarray([0.8])}
  out = bilevel.projection_capped_simplex(tree, 1.0)
  assert jax.tree.structure(out) == jax.tree.structure(tree)
  np.testing.assert_allclose(out["a"], [[0.55], [0.0]], atol=1e-6)
  np.testing.assert_allclose(out["b"], [0.45], atol=1e-6)


def test_capped_simplex_derivatives_match_finite_differences():
  with jax.enable_x64(True):
    u = jnp.asarray(np.random.default_rng(0).normal(size=8) + 0.5)
    f = jax.jit(lambda u, k: bilevel.projection_capped_simplex(u, k)
                @ jnp.arange(8.0))
    for k in (2.0, 20.0):  # active and inactive budget
      grad_u, grad_k = jax.grad(f, argnums=(0, 1))(u, k)
      eps = 1e-6
      fd_u = [(f(u + eps * e, k) - f(u - eps * e, k)) / (2 * eps)
              for e in jnp.eye(8)]
      fd_k = (f(u, k + eps) - f(u, k - eps)) / (2 * eps)
      np.testing.assert_allclose(grad_u, fd_u, atol=1e-6)
      np.testing.assert_allclose(grad_k, fd_k, atol=1e-6)


# ---- closed forms -----------------------------------------------------------


def test_box_accepts_scalar_and_tree_bounds():
  tree = {"w": jnp.asarray([-2.0, 0.3, 5.0]), "b": jnp.asarray(0.9)}
  out = bilevel.projection_box(tree, 0.0, 0.5)
  np.testing.assert_allclose(out["w"], [0.0, 0.3, 0.5])
  np.testing.assert_allclose(out["b"], 0.5)
  out = bilevel.projection_box(tree, {"w": -1.0, "b": 1.0},
                               {"w": jnp.asarray([0.0, 1.0, 2.0]), "b": 2.0})
  np.testing.assert_allclose(out["w"], [-1.0, 0.3, 2.0])
  np.testing.assert_allclose(out["b"], 1.0)


def test_hyperplane_and_halfspace_closed_forms():
  rng = np.random.default_rng(1)
  with jax.enable_x64(True):
    x, a = rng.normal(size=5), rng.normal(size=5)
    for b in (a @ x - 1.0, a @ x + 1.0):
      want_plane = x + (b - a @ x) / (a @ a) * a
      np.testing.assert_allclose(
          bilevel.projection_hyperplane(jnp.asarray(x), jnp.asarray(a), b),
          want_plane, atol=1e-12)
      want_half = x if a @ x <= b else want_plane
      np.testing.assert_allclose(
          bilevel.projection_halfspace(jnp.asarray(x), jnp.asarray(a), b),
          want_half, atol=1e-12)


def test_simplex_matches_sorting_oracle_on_pytrees():
  rng = np.random.default_rng(2)
  with jax.enable_x64(True):
    x = rng.normal(size=7)
    srt = np.sort(x)[::-1]
    css = np.cumsum(srt) - 2.0  # scale 2
    rho = np.flatnonzero(srt - css / np.arange(1, 8) > 0)[-1]
    want = np.maximum(x - css[rho] / (rho + 1), 0)
    _, unravel = ravel_pytree({"a": jnp.zeros(3), "b": jnp.zeros((2, 2))})
    out = bilevel.projection_simplex(unravel(jnp.asarray(x)), 2.0)
    np.testing.assert_allclose(_flat(out), want, atol=1e-12)


# ---- polyhedra and Dykstra --------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_polyhedron_matches_slsqp_with_equalities(seed):
  A, b, C, d, inside, x = _random_polyhedron(seed, n=6, m=8, p=2)
  with jax.enable_x64(True):
    project = jax.jit(functools.partial(
        bilevel.projection_polyhedron_with_info, tol=1e-12))
    got, info = project(x, A, b, C=C, d=d)
    got = np.asarray(got)
  np.testing.assert_allclose(got, _slsqp_projection(x, A, b, C, d),
                             atol=1e-6)
  assert float(info.max_violation) <= 1e-9
  assert int(info.num_sweeps) < 10_000
  # Feasible points: the interior point moved in the null space of C.
  rng = np.random.default_rng(seed)
  null = scipy.linalg.null_space(C)
  v = inside + 0.3 * rng.normal(size=(300, null.shape[1])) @ null.T
  v = v[np.all(v @ A.T <= b, axis=1)]
  assert len(v) > 10
  assert np.max((v - got) @ (x - got)) <= 1e-8


def test_polyhedron_svm_margins_matches_slsqp():
  # 500 per-sample margin rows yᵢ(wᵀzᵢ + c) ≥ 1 over (w, c) ∈ ℝ³¹.
  rng = np.random.default_rng(3)
  w_true = rng.normal(size=30)
  z = rng.normal(size=(500, 30))
  labels = np.sign(z @ w_true)
  z += 0.5 * labels[:, None] * w_true / np.linalg.norm(w_true)
  A = -labels[:, None] * np.concatenate([z, np.ones((500, 1))], axis=1)
  b = -np.ones(500)
  x = rng.normal(size=31)
  with jax.enable_x64(True):
    got, info = jax.jit(functools.partial(
        bilevel.projection_polyhedron_with_info, tol=1e-10))(x, A, b)
  np.testing.assert_allclose(got, _slsqp_projection(x, A, b), atol=1e-8)
  assert float(info.max_violation) <= 1e-8


def test_polyhedron_on_pytree_float32_and_fixed_sweeps():
  A, b, C, d, _, x = _random_polyhedron(5, n=7, m=6, p=1)
  want = _slsqp_projection(x, A, b, C, d)
  _, unravel = ravel_pytree({"a": jnp.zeros(3), "b": jnp.zeros((2, 2))})
  tree = unravel(jnp.asarray(x, jnp.float32))
  got = bilevel.projection_polyhedron(tree, A, b, C=C, d=d)
  assert jax.tree.map(lambda l: l.dtype, got) == jax.tree.map(
      lambda l: l.dtype, tree)
  np.testing.assert_allclose(_flat(got), want, atol=1e-4)
  # tol=None: a fixed number of sweeps, reverse-differentiable.
  loss = lambda t: jnp.sum(ravel_pytree(bilevel.projection_polyhedron(
      t, A, b, C=C, d=d, num_iters=100, tol=None))[0] ** 2)
  grads = jax.grad(loss)(tree)
  assert np.all(np.isfinite(_flat(grads)))


def test_polyhedron_validates_shapes():
  A, b = np.ones((3, 4)), np.ones(3)
  with pytest.raises(ValueError, match="n=5"):
    bilevel.projection_polyhedron(jnp.zeros(5), A, b)
  with pytest.raises(ValueError, match="right-hand side"):
    bilevel.projection_polyhedron(jnp.zeros(4), A, np.ones(2))
  with pytest.raises(ValueError, match="needs A, b or C, d"):
    bilevel.projection_polyhedron(jnp.zeros(4), None, None)
  with pytest.raises(ValueError, match="with"):
    bilevel.projection_polyhedron(jnp.zeros(4), A, None)


def test_dykstra_of_halfspaces_equals_polyhedron():
  A, b, C, d, _, x = _random_polyhedron(6, n=5, m=4, p=1)
  projections = [functools.partial(bilevel.projection_halfspace, a=a_i, b=b_i)
                 for a_i, b_i in zip(A, b)]
  projections.append(functools.partial(bilevel.projection_hyperplane,
                                       a=C[0], b=d[0]))
  with jax.enable_x64(True):
    got = bilevel.dykstra(projections, jnp.asarray(x), tol=1e-12)
    want = bilevel.projection_polyhedron(x, A, b, C=C, d=d, tol=1e-12)
  np.testing.assert_allclose(got, want, atol=1e-9)


def test_dykstra_ball_box_plane_on_pytree_matches_slsqp():
  rng = np.random.default_rng(7)
  x = 2 * rng.normal(size=6)
  a = rng.normal(size=6)
  with jax.enable_x64(True):
    _, unravel = ravel_pytree({"u": jnp.zeros(2), "v": jnp.zeros(4)})
    projections = [
        functools.partial(optax.projections.projection_l2_ball, scale=1.5),
        functools.partial(bilevel.projection_box, lower=-0.8, upper=0.8),
        functools.partial(bilevel.projection_hyperplane,
                          a=unravel(jnp.asarray(a)), b=0.3),
    ]
    got, info = bilevel.dykstra_with_info(projections, unravel(jnp.asarray(x)),
                                          tol=1e-12)
  res = scipy.optimize.minimize(
      lambda p: 0.5 * np.sum((p - x) ** 2), np.zeros(6), jac=lambda p: p - x,
      bounds=[(-0.8, 0.8)] * 6, method="SLSQP",
      constraints=[{"type": "ineq", "fun": lambda p: 1.5 ** 2 - p @ p},
                   {"type": "eq", "fun": lambda p: a @ p - 0.3}],
      options={"ftol": 1e-12, "maxiter": 500})
  np.testing.assert_allclose(_flat(got), res.x, atol=1e-6)
  assert float(info.max_violation) <= 1e-7


# ---- shared properties ------------------------------------------------------

_X = {"w": jnp.asarray([1.4, -0.3, 0.6, 2.0]), "b": jnp.asarray([0.2, -1.1])}
_A_POLY, _B_POLY, _C_POLY, _D_POLY, _, _ = _random_polyhedron(8, 6, 5, 1)
_PROJECTIONS = {
    "box": lambda x: bilevel.projection_box(x, -0.5, 0.5),
    "hyperplane": lambda x: bilevel.projection_hyperplane(
        x, jax.tree.map(jnp.ones_like, x), 0.5),
    "halfspace": lambda x: bilevel.projection_halfspace(
        x, jax.tree.map(jnp.ones_like, x), -0.5),
    "simplex": lambda x: bilevel.projection_simplex(x, 2.0),
    "capped_simplex": lambda x: bilevel.projection_capped_simplex(x, 1.5),
    "polyhedron": lambda x: bilevel.projection_polyhedron(
        x, _A_POLY, _B_POLY, C=_C_POLY, d=_D_POLY, tol=1e-10),
    "dykstra": lambda x: bilevel.dykstra(
        [lambda y: bilevel.projection_box(y, -0.5, 0.5),
         lambda y: bilevel.projection_hyperplane(
             y, jax.tree.map(jnp.ones_like, y), 0.5)], x, tol=1e-10),
}


@pytest.mark.parametrize("name", sorted(_PROJECTIONS))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_jit_dtype_and_idempotence(name, dtype):
  project = _PROJECTIONS[name]
  with jax.enable_x64(True):
    x = jax.tree.map(lambda l: l.astype(dtype), _X)
    once = jax.jit(project)(x)
    assert jax.tree.structure(once) == jax.tree.structure(x)
    assert all(l.dtype == dtype for l in jax.tree.leaves(once))
    tol = 1e-5 if dtype == jnp.float32 else 1e-9
    np.testing.assert_allclose(_flat(once), _flat(project(x)), atol=tol)
    np.testing.assert_allclose(_flat(project(once)), _flat(once), atol=tol)
