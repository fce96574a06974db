"""JAXopt's implicit-diff and linear-solve test problems, against our API.

The problems and tolerances of JAXopt's ``tests/implicit_diff_test.py`` and
``tests/linear_solve_test.py`` (ridge regression through ``custom_root`` and
``custom_fixed_point``, keyword arguments, the 5×5, 15×15 and PSD systems),
made harder where JAXopt's were easy (15 features instead of 3), plus the
Jacobians our old defaults got silently wrong: negative definite (residual
form ``T(x) − x``, maximisation), non-symmetric, singular. Every check is
against a closed form or float64 finite differences, with default solvers.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bilevel

_N_SAMPLES, _N_FEATURES, _LAM = 30, 15, 0.05


def _regression_data(dtype=jnp.float64):
  rng = np.random.RandomState(0)
  x = rng.randn(_N_SAMPLES, _N_FEATURES) * np.linspace(0.2, 1.0, _N_FEATURES)
  y = x @ rng.randn(_N_FEATURES) + 0.1 * rng.randn(_N_SAMPLES)
  return jnp.asarray(x, dtype), jnp.asarray(y, dtype)


def _ridge_objective(w, lam, x, y):
  return 0.5 * jnp.mean((x @ w - y) ** 2) + 0.5 * lam * w @ w


def _ridge_solver(init_params, lam, x, y):
  del init_params
  hessian = x.T @ x / x.shape[0] + lam * jnp.eye(x.shape[1], dtype=x.dtype)
  return jnp.linalg.solve(hessian, x.T @ y / x.shape[0])


def _ridge_solver_kwargs(init_params, **kw):
  return _ridge_solver(init_params, kw["lam"], kw["x"], kw["y"])


def _ridge_jac_lam(lam, x, y):
  """``dw/dλ = −(XᵀX/n + λI)⁻¹ w``."""
  hessian = x.T @ x / x.shape[0] + lam * jnp.eye(x.shape[1], dtype=x.dtype)
  return -jnp.linalg.solve(hessian, _ridge_solver(None, lam, x, y))


def test_ridge_problem_is_ill_conditioned_enough():
  x, _ = _regression_data()
  eig = np.linalg.eigvalsh(np.asarray(x.T @ x / _N_SAMPLES) + _LAM * np.eye(15))
  assert eig[-1] / eig[0] > 20


_ROOT = bilevel.custom_root(jax.grad(_ridge_objective))(_ridge_solver)
_FIXED_POINT = bilevel.custom_fixed_point(
    lambda w, *a: w - jax.grad(_ridge_objective)(w, *a))(_ridge_solver)


@pytest.mark.parametrize("solver", [_ROOT, _FIXED_POINT],
                         ids=["custom_root", "custom_fixed_point"])
def test_ridge_jacobian_all_modes_default_solve(solver):
  with jax.enable_x64(True):
    x, y = _regression_data()
    want = _ridge_jac_lam(_LAM, x, y)
    for diff in (jax.jacrev, jax.jacfwd):
      got = jax.jit(diff(solver, argnums=1))(None, _LAM, x, y)
      np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-10)
    _, tangent = jax.jvp(lambda lam: solver(None, lam, x, y), (_LAM,), (1.0,))
    np.testing.assert_allclose(tangent, want, rtol=1e-7, atol=1e-10)


def test_ridge_jacobian_float32_at_jaxopt_tolerance():
  x, y = _regression_data(jnp.float32)
  got = jax.jacrev(_ROOT, argnums=1)(None, jnp.float32(_LAM), x, y)
  with jax.enable_x64(True):
    want = _ridge_jac_lam(_LAM, *_regression_data())
  np.testing.assert_allclose(got, want, atol=5e-2 * float(jnp.abs(want).max()))


@pytest.mark.parametrize("order", [("lam", "x", "y"), ("y", "lam", "x")],
                         ids=["ordered", "unordered"])
def test_kwargs_are_passed_and_differentiated(order):
  with jax.enable_x64(True):
    x, y = _regression_data()
    solver = bilevel.custom_root(jax.grad(_ridge_objective))(
        _ridge_solver_kwargs)
    values = {"lam": _LAM, "x": x, "y": y}
    call = lambda lam: solver(None, **{k: (lam if k == "lam" else values[k])
                                       for k in order})
    np.testing.assert_allclose(jax.jit(call)(_LAM),
                               _ridge_solver(None, _LAM, x, y), rtol=1e-12)
    want = _ridge_jac_lam(_LAM, x, y)
    np.testing.assert_allclose(jax.jit(jax.jacrev(call))(_LAM), want,
                               rtol=1e-7)
    np.testing.assert_allclose(jax.jacfwd(call)(_LAM), want, rtol=1e-7)
    # A keyword array is differentiated like a positional one.
    grad_y = jax.grad(lambda y: jnp.sum(solver(None, lam=_LAM, x=x, y=y)))(y)
    fd_y = jax.grad(lambda y: jnp.sum(_ridge_solver(None, _LAM, x, y)))(y)
    np.testing.assert_allclose(grad_y, fd_y, rtol=1e-7, atol=1e-12)


def test_has_aux_with_kwargs():
  with jax.enable_x64(True):
    x, y = _regression_data()
    solver = bilevel.custom_root(jax.grad(_ridge_objective), has_aux=True)(
        lambda init, **kw: (_ridge_solver_kwargs(init, **kw),
                            {"n": jnp.int32(3), "loss": jnp.ones([])}))
    jac, aux = jax.jacrev(lambda lam: solver(None, lam=lam, x=x, y=y),
                          has_aux=True)(_LAM)
    np.testing.assert_allclose(jac, _ridge_jac_lam(_LAM, x, y), rtol=1e-7)
    assert aux["n"] == 3
    _, tangent = jax.jvp(lambda lam: solver(None, lam=lam, x=x, y=y)[1],
                         (_LAM,), (1.0,))
    np.testing.assert_array_equal(tangent["loss"], 0.0)


def test_root_vjp_and_root_jvp_agree_with_closed_form():
  with jax.enable_x64(True):
    x, y = _regression_data()
    sol = _ridge_solver(None, _LAM, x, y)
    optimality = jax.grad(_ridge_objective)
    want = _ridge_jac_lam(_LAM, x, y)
    tangent = bilevel.root_jvp(optimality, sol, (_LAM, x, y),
                               (1.0, jnp.zeros_like(x), jnp.zeros_like(y)))
    np.testing.assert_allclose(tangent, want, rtol=1e-7)
    rows = jax.vmap(lambda e: bilevel.root_vjp(
        optimality, sol, (_LAM, x, y), e)[0][0])(jnp.eye(_N_FEATURES))
    np.testing.assert_allclose(rows, want, rtol=1e-7)


def _quadratic_data(key, dim=6):
  k1, k2 = jax.random.split(key)
  q, _ = jnp.linalg.qr(jax.random.normal(k1, (dim, dim), jnp.float64))
  hessian = (q * jnp.linspace(1.0, 8.0, dim)) @ q.T
  return hessian, jax.random.normal(k2, (dim, dim), jnp.float64)


@pytest.mark.parametrize("form", ["residual", "maximisation"])
def test_negative_definite_jacobian(form):
  # f(w, θ) = ½wᵀHw − θᵀBw; both forms have ∂₁G = −ηH or −H ≺ 0, where CG
  # stops at its first direction and returned an exactly zero Jacobian.
  with jax.enable_x64(True):
    hessian, mix = _quadratic_data(jax.random.key(0))
    grad = lambda w, theta: hessian @ w - mix.T @ theta
    if form == "residual":
      optimality = lambda w, theta: (w - 0.1 * grad(w, theta)) - w
    else:
      optimality = lambda w, theta: jax.grad(
          lambda w: -(0.5 * w @ hessian @ w - theta @ mix @ w))(w)
    solver = bilevel.custom_root(optimality)(
        lambda w0, theta: jnp.linalg.solve(hessian, mix.T @ theta))
    theta = jnp.ones(6, jnp.float64)
    want = jnp.linalg.solve(hessian, mix.T)
    for diff in (jax.jacrev, jax.jacfwd):
      np.testing.assert_allclose(diff(solver, argnums=1)(None, theta), want,
                                 rtol=1e-8)
    cg = bilevel.custom_root(optimality, solve=bilevel.solve_cg)(
        lambda w0, theta: jnp.linalg.solve(hessian, mix.T @ theta))
    np.testing.assert_array_equal(jax.jacrev(cg, argnums=1)(None, theta), 0.0)


def test_non_symmetric_jacobian():
  # G(w, θ) = Mw + 0.1·w³ − Bθ with M non-symmetric: ∂w/∂θ = (M + 0.3 W²)⁻¹B.
  with jax.enable_x64(True):
    key = jax.random.key(1)
    mat = jnp.eye(6) * 2 + jax.random.normal(key, (6, 6), jnp.float64)
    mix = jax.random.normal(jax.random.fold_in(key, 1), (6, 3), jnp.float64)
    optimality = lambda w, theta: mat @ w + 0.1 * w**3 - mix @ theta

    @jax.jit
    def newton(w0, theta):
      step = lambda _, w: w - jnp.linalg.solve(
          jax.jacobian(optimality)(w, theta), optimality(w, theta))
      return jax.lax.fori_loop(0, 30, step, jnp.zeros(6, jnp.float64))

    solver = bilevel.custom_root(optimality)(newton)
    theta = jnp.array([0.5, -1.0, 2.0], jnp.float64)
    w = newton(None, theta)
    want = jnp.linalg.solve(mat + jnp.diag(0.3 * w**2), mix)
    np.testing.assert_allclose(jax.jacrev(solver, argnums=1)(None, theta),
                               want, rtol=1e-8)
    np.testing.assert_allclose(jax.jacfwd(solver, argnums=1)(None, theta),
                               want, rtol=1e-8)
    eps = 1e-6
    fd = jnp.stack([newton(None, theta + eps * e)
                    - newton(None, theta - eps * e) for e in jnp.eye(3)],
                   axis=-1) / (2 * eps)
    np.testing.assert_allclose(want, fd, rtol=1e-6, atol=1e-9)


def test_forward_reverse_second_order_and_vmap_agree_with_fd():
  # x = ½tanh(Wx + θ): a non-symmetric contraction, solved by a while_loop.
  with jax.enable_x64(True):
    w_mat = jax.random.normal(jax.random.key(2), (4, 4), jnp.float64) / 3
    fixed_point_fn = lambda x, theta: 0.5 * jnp.tanh(w_mat @ x + theta)

    def iterate(x0, theta):
      body = lambda c: (c[0] + 1, fixed_point_fn(c[1], theta))
      return jax.lax.while_loop(lambda c: c[0] < 200, body, (0, x0))[1]

    solver = bilevel.custom_fixed_point(fixed_point_fn)(iterate)
    x0 = jnp.zeros(4, jnp.float64)
    phi = lambda theta: jnp.sum(jnp.sin(solver(x0, theta)))
    theta = jnp.array([0.3, -0.2, 0.5, 0.1], jnp.float64)
    grad = jax.grad(phi)(theta)
    fd = jnp.stack([(phi(theta + 1e-6 * e) - phi(theta - 1e-6 * e)) / 2e-6
                    for e in jnp.eye(4)])
    np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(jax.jacfwd(phi)(theta), grad, rtol=1e-9)
    hess_rr = jax.jacrev(jax.grad(phi))(theta)
    hess_fr = jax.jacfwd(jax.grad(phi))(theta)
    hess_ff = jax.jacfwd(jax.jacfwd(phi))(theta)
    np.testing.assert_allclose(hess_fr, hess_rr, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(hess_ff, hess_rr, rtol=1e-8, atol=1e-12)
    fd_hess = jnp.stack([(jax.grad(phi)(theta + 1e-5 * e)
                          - jax.grad(phi)(theta - 1e-5 * e)) / 2e-5
                         for e in jnp.eye(4)])
    np.testing.assert_allclose(hess_rr, fd_hess, rtol=1e-5, atol=1e-8)
    thetas = jnp.stack([theta, -theta])
    np.testing.assert_allclose(jax.jit(jax.vmap(jax.grad(phi)))(thetas)[0],
                               grad, rtol=1e-10)


# JAXopt's linear-solve problems (NumPy seed 0): 5×5 and 15×15 (a 5×3×5×3
# tensor) non-symmetric systems, a 5×5 PSD one, ridge variants.


def _jaxopt_systems():
  rng = np.random.RandomState(0)
  square = rng.randn(5, 5)
  b5 = rng.randn(5)
  tensor = np.random.RandomState(0).randn(5, 3, 5, 3).reshape(15, 15)
  b15 = np.random.RandomState(1).randn(15)
  psd = np.random.RandomState(0).randn(5, 5)
  return {"5x5": (square, b5), "15x15": (tensor, b15),
          "psd": (psd.T @ psd, b5)}


_GENERAL = [bilevel.solve_gmres, bilevel.solve_bicgstab,
            bilevel.solve_normal_cg]
_SYMMETRIC = [bilevel.solve_cg, bilevel.solve_minres, bilevel.solve_hessian]


@pytest.mark.parametrize("name", ["5x5", "15x15", "psd"])
def test_jaxopt_linear_systems_default_options(name):
  with jax.enable_x64(True):
    mat, b = _jaxopt_systems()[name]
    want = np.linalg.solve(mat, b)
    solves = _GENERAL + (_SYMMETRIC if name == "psd" else [])
    for solve in solves:
      x, residual = solve(lambda v: mat @ v, jnp.asarray(b),
                          return_residual=True)
      tol = 1e-6 if solve is bilevel.solve_hessian else 1e-8
      np.testing.assert_allclose(x, want, rtol=tol, atol=tol,
                                 err_msg=solve.__name__)
      assert residual < 10 * tol, solve.__name__


def test_jaxopt_linear_systems_float32_at_jaxopt_tolerance():
  for name, (mat, b) in _jaxopt_systems().items():
    mat32, b32 = jnp.asarray(mat, jnp.float32), jnp.asarray(b, jnp.float32)
    want = np.linalg.solve(mat, b)
    atol = 1e-2 if name == "psd" else 1e-4  # JAXopt's
    matvec = functools.partial(jnp.matmul, mat32)
    for solve in [bilevel.solve_gmres, bilevel.solve_normal_cg]:
      x = solve(matvec, b32)
      scale = 1 + np.abs(want).max()
      np.testing.assert_allclose(x, want, atol=atol * scale,
                                 err_msg=f"{name} {solve.__name__}")


def test_jaxopt_ridge_variants():
  with jax.enable_x64(True):
    mat, b = _jaxopt_systems()["5x5"]
    matvec = lambda v: mat @ v
    want = np.linalg.solve(mat + np.eye(5), b)
    for solve in [bilevel.solve_gmres, bilevel.solve_bicgstab]:
      np.testing.assert_allclose(solve(matvec, b, ridge=1.0), want,
                                 atol=1e-8)
    gram = mat.T @ mat
    np.testing.assert_allclose(
        bilevel.solve_cg(lambda v: gram @ v, b, ridge=1.0),
        np.linalg.solve(gram + np.eye(5), b), atol=1e-8)
    np.testing.assert_allclose(
        bilevel.solve_minres(lambda v: gram @ v, b, ridge=1.0),
        np.linalg.solve(gram + np.eye(5), b), atol=1e-8)
    np.testing.assert_allclose(
        bilevel.solve_normal_cg(matvec, b, ridge=1.0),
        np.linalg.solve(gram + np.eye(5), mat.T @ b), atol=1e-8)


# Singular and indefinite Hessians.


def _singular_lower_level():
  """f(x, (y, z)) = ½yᵀAy − xᵀy; z is ignored, so H = diag(A, 0)."""
  a_mat, _ = _quadratic_data(jax.random.key(3), dim=4)
  inner = lambda x, yz: 0.5 * yz["y"] @ a_mat @ yz["y"] - x @ yz["y"]
  return a_mat, inner


def test_singular_hessian_gives_finite_pseudo_inverse_on_the_range():
  with jax.enable_x64(True):
    a_mat, inner = _singular_lower_level()
    x = jnp.ones(4, jnp.float64)
    sol = {"y": jnp.linalg.solve(a_mat, x), "z": jnp.zeros(2, jnp.float64)}
    _, hvp = jax.linearize(jax.grad(inner, 1), x, sol)
    hvp = jax.linearize(lambda yz: jax.grad(inner, 1)(x, yz), sol)[1]
    b = {"y": jnp.arange(1.0, 5.0), "z": jnp.array([1.0, -2.0])}
    u = bilevel.solve_hessian(hvp, b)
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(u))
    np.testing.assert_allclose(u["y"], jnp.linalg.solve(a_mat, b["y"]),
                               rtol=1e-6)
    damped = bilevel.solve_hessian(hvp, b, ridge=0.1)
    np.testing.assert_allclose(
        damped["y"], jnp.linalg.solve(a_mat + 0.1 * jnp.eye(4), b["y"]),
        rtol=1e-6)
    np.testing.assert_allclose(damped["z"], b["z"] / 0.1, rtol=1e-6)
    # Plain CG steps ‖r‖²/pᵀHp with pᵀHp pure rounding on z.
    plain = bilevel.solve_cg(hvp, b, stop_on_negative_curvature=False)
    assert not bool(jnp.all(jnp.isfinite(plain["z"])) and
                    jnp.abs(plain["z"]).max() < 1e6)


def test_singular_hessian_hypergradient_via_root_vjp():
  with jax.enable_x64(True):
    a_mat, inner = _singular_lower_level()
    outer = lambda x, yz: 0.5 * jnp.sum(yz["y"] ** 2) + jnp.sum(yz["z"])
    x = jnp.array([1.0, -1.0, 0.5, 2.0])
    sol = {"y": jnp.linalg.solve(a_mat, x), "z": jnp.zeros(2, jnp.float64)}
    optimality = lambda yz, x: jax.grad(inner, 1)(x, yz)
    v = jax.grad(outer, 1)(x, sol)
    (vjp_x,), _, residual = bilevel.root_vjp(optimality, sol, (x,), v,
                                             bilevel.solve_hessian)
    want = jnp.linalg.solve(a_mat, jnp.linalg.solve(a_mat, x))
    np.testing.assert_allclose(vjp_x, want, rtol=1e-6)
    assert 0 < residual < 1  # the z part of v is unreachable, and reported


def test_symmetric_indefinite_system():
  with jax.enable_x64(True):
    q, _ = jnp.linalg.qr(jax.random.normal(jax.random.key(4), (6, 6),
                                           jnp.float64))
    mat = (q * jnp.array([5.0, 2.0, 0.5, -0.3, -1.0, -4.0])) @ q.T
    b = jax.random.normal(jax.random.key(5), (6,), jnp.float64)
    want = jnp.linalg.solve(mat, b)
    for solve in [bilevel.solve_minres, bilevel.solve_hessian,
                  bilevel.solve_gmres]:
      np.testing.assert_allclose(solve(lambda v: mat @ v, b), want,
                                 rtol=1e-5, err_msg=solve.__name__)


# Residuals.


@pytest.mark.parametrize("solve", [
    bilevel.solve_cg, bilevel.solve_minres, bilevel.solve_normal_cg,
    bilevel.solve_gmres, bilevel.solve_bicgstab,
    functools.partial(bilevel.solve_cg, maxiter=2),
    functools.partial(bilevel.solve_minres, maxiter=2),
    functools.partial(bilevel.solve_normal_cg, maxiter=2),
], ids=["cg", "minres", "normal_cg", "gmres", "bicgstab", "cg2", "minres2",
        "normal_cg2"])
def test_tracked_residual_matches_the_true_one(solve):
  with jax.enable_x64(True):
    mat, b = _jaxopt_systems()["psd"]
    mat = mat + np.eye(5)
    matvec = lambda v: mat @ v
    x, residual = solve(matvec, b, return_residual=True)
    true = bilevel.linear_solve_residual(matvec, x, b)
    np.testing.assert_allclose(residual, true, rtol=1e-6, atol=1e-12)
    # The solution stays differentiable with the residual requested.
    grad = jax.grad(lambda s: jnp.sum(solve(lambda v: mat @ v + s * v, b,
                                            return_residual=True)[0]))(0.0)
    np.testing.assert_allclose(
        grad, jax.grad(lambda s: jnp.sum(solve(lambda v: mat @ v + s * v,
                                               b)))(0.0), rtol=1e-12)


def test_neumann_residual_is_one_step_stale():
  with jax.enable_x64(True):
    mat = jnp.diag(jnp.array([1.0, 2.0, 3.0]))
    b = jnp.ones(3)
    x, residual = bilevel.solve_neumann(lambda v: mat @ v, b, step=0.25,
                                        maxiter=5, return_residual=True)
    previous = bilevel.solve_neumann(lambda v: mat @ v, b, step=0.25,
                                     maxiter=4)
    np.testing.assert_allclose(
        residual, bilevel.linear_solve_residual(lambda v: mat @ v, previous, b))
    del x


def test_identity_never_calls_matvec_unless_asked():
  def matvec(v):
    raise AssertionError("matvec called")

  b = {"a": jnp.ones(3), "b": jnp.full([2], 2.0)}
  x = bilevel.solve_identity(matvec, b, scale=0.5)
  np.testing.assert_allclose(x["b"], 1.0)
  x, residual = bilevel.solve_identity(lambda v: jax.tree.map(
      lambda t: 2 * t, v), b, scale=0.5, return_residual=True)
  np.testing.assert_allclose(residual, 0.0)
