"""custom_root / custom_fixed_point against closed forms and finite differences.

Solvers here are ``while_loop``s or closed forms, so any gradient that comes
out went through the implicit rule (a ``while_loop`` has no reverse mode).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

import bilevel
from bilevel import reference_problems


def _central_fd(fn, x, eps=1e-6):
  """Central finite-difference Jacobian of ``fn: [n] -> [m]``, ``[m, n]``."""
  cols = [(fn(x + eps * e) - fn(x - eps * e)) / (2 * eps)
          for e in jnp.eye(x.shape[0], dtype=x.dtype)]
  return jnp.stack(cols, axis=-1)


def _ridge_data():
  k1, k2 = jax.random.split(jax.random.key(0))
  x = jax.random.normal(k1, (12, 4), jnp.float64) / jnp.sqrt(12.0)
  return x, jax.random.normal(k2, (12,), jnp.float64)


def _ridge_loss(w, lam, x, y):
  return 0.5 * jnp.sum((x @ w - y) ** 2) + 0.5 * lam * w @ w


def _gd_solver(w0, lam, x, y, steps=500, lr=0.3):
  """Gradient descent in a while_loop: not reverse-differentiable itself."""
  grad = jax.grad(_ridge_loss)
  body = lambda c: (c[0] + 1, c[1] - lr * grad(c[1], lam, x, y))
  return jax.lax.while_loop(lambda c: c[0] < steps, body, (0, w0))[1]


_ridge_root = bilevel.custom_root(
    jax.grad(_ridge_loss), solve=functools.partial(bilevel.solve_cg, tol=1e-14)
)(_gd_solver)


def _ridge_closed_form(lam, x, y):
  return jnp.linalg.solve(x.T @ x + lam * jnp.eye(4), x.T @ y)


def test_custom_root_jacobians_match_closed_form_and_fd():
  with jax.enable_x64(True):
    x, y = _ridge_data()
    lam = jnp.asarray(0.7, jnp.float64)
    w0 = jnp.zeros(4, jnp.float64)
    jac_lam, jac_y = jax.jit(jax.jacrev(_ridge_root, argnums=(1, 3)))(
        w0, lam, x, y)
    hessian = x.T @ x + lam * jnp.eye(4)
    w = _ridge_closed_form(lam, x, y)
    np.testing.assert_allclose(jac_lam, -jnp.linalg.solve(hessian, w),
                               rtol=1e-9)
    np.testing.assert_allclose(jac_y, jnp.linalg.solve(hessian, x.T),
                               rtol=1e-9, atol=1e-12)
    fd = _central_fd(lambda y: _ridge_closed_form(lam, x, y), y)
    np.testing.assert_allclose(jac_y, fd, rtol=1e-6, atol=1e-9)


def test_init_params_get_zero_cotangent():
  with jax.enable_x64(True):
    x, y = _ridge_data()
    grad_w0 = jax.jit(jax.grad(
        lambda w0: jnp.sum(_ridge_root(w0, 0.7, x, y))))(jnp.ones(4))
    np.testing.assert_array_equal(grad_w0, jnp.zeros(4))


def test_has_aux_returns_aux_and_differentiates_the_solution():
  with jax.enable_x64(True):
    x, y = _ridge_data()

    @bilevel.custom_root(jax.grad(_ridge_loss), has_aux=True)
    def solver(w0, lam, x, y):
      w = _gd_solver(w0, lam, x, y)
      return w, {"loss": _ridge_loss(w, lam, x, y)}

    def objective(lam):
      w, aux = solver(jnp.zeros(4, jnp.float64), lam, x, y)
      return jnp.sum(w), aux

    grad, aux = jax.jit(jax.grad(objective, has_aux=True))(0.7)
    w = _ridge_closed_form(0.7, x, y)
    want = -jnp.sum(jnp.linalg.solve(x.T @ x + 0.7 * jnp.eye(4), w))
    np.testing.assert_allclose(grad, want, rtol=1e-8)
    np.testing.assert_allclose(aux["loss"], _ridge_loss(w, 0.7, x, y),
                               rtol=1e-10)


def test_second_order_goes_through_the_implicit_rule():
  # Regression for JAXopt#141: Φ(θ) of R12 is quadratic with Hessian
  # λ²(A + λI)⁻², and the solver is a while_loop.
  with jax.enable_x64(True):
    ref = reference_problems.r12(jax.random.key(1), dim=4, lam=0.5,
                                 dtype=jnp.float64)
    inner, outer = ref.batches["inner_batch"], ref.batches["outer_batch"]
    optimality = lambda phi, theta: jax.grad(ref.problem.inner_loss, 1)(
        theta, phi, inner)

    @bilevel.custom_root(optimality,
                         solve=functools.partial(bilevel.solve_cg, tol=1e-14))
    def solver(phi0, theta):
      body = lambda c: (c[0] + 1, c[1] - 0.2 * optimality(c[1], theta))
      return jax.lax.while_loop(lambda c: c[0] < 400, body, (0, phi0))[1]

    phi = lambda theta: ref.problem.outer_loss(
        theta, solver(jnp.zeros(4, jnp.float64), theta), outer)
    hessian = jax.jit(jax.jacrev(jax.grad(phi)))(ref.init.upper)
    h_inv = jnp.linalg.inv(inner["A"] + 0.5 * jnp.eye(4))
    np.testing.assert_allclose(hessian, 0.25 * h_inv @ h_inv, rtol=1e-8,
                               atol=1e-12)


def test_composes_with_jit_and_vmap():
  with jax.enable_x64(True):
    x, y = _ridge_data()
    grad_fn = jax.grad(
        lambda lam: jnp.sum(_ridge_root(jnp.zeros(4, jnp.float64), lam, x, y)))
    lams = jnp.array([0.3, 0.7, 1.5])
    got = jax.jit(jax.vmap(grad_fn))(lams)
    want = [-jnp.sum(jnp.linalg.solve(x.T @ x + lam * jnp.eye(4),
                                      _ridge_closed_form(lam, x, y)))
            for lam in lams]
    np.testing.assert_allclose(got, want, rtol=1e-8)


def test_integer_arguments_pass_through():
  with jax.enable_x64(True):
    x, y = _ridge_data()
    rows = jnp.arange(8)  # differentiating w.r.t. integers yields float0

    @bilevel.custom_root(
        lambda w, lam, rows: jax.grad(_ridge_loss)(w, lam, x[rows], y[rows]))
    def solver(w0, lam, rows):
      return _ridge_closed_form(lam, x[rows], y[rows])

    grad = jax.jit(jax.grad(
        lambda lam: jnp.sum(solver(jnp.zeros(4), lam, rows))))(0.7)
    want = jax.grad(lambda lam: jnp.sum(_ridge_closed_form(lam, x[:8],
                                                           y[:8])))(0.7)
    np.testing.assert_allclose(grad, want, rtol=1e-8)


def test_custom_fixed_point_of_a_gradient_step():
  with jax.enable_x64(True):
    x, y = _ridge_data()
    step = lambda w, lam: w - 0.3 * jax.grad(_ridge_loss)(w, lam, x, y)
    solver = bilevel.custom_fixed_point(
        step, solve=functools.partial(bilevel.solve_cg, tol=1e-14))(
            lambda w0, lam: _gd_solver(w0, lam, x, y))
    jac = jax.jit(jax.jacrev(solver, argnums=1))(jnp.zeros(4, jnp.float64),
                                                 0.7)
    w = _ridge_closed_form(0.7, x, y)
    np.testing.assert_allclose(
        jac, -jnp.linalg.solve(x.T @ x + 0.7 * jnp.eye(4), w), rtol=1e-9)


def test_custom_fixed_point_non_symmetric_contraction():
  # x = ½tanh(Wx + θ): dx/dθ = (I − DW)⁻¹D with D = ½diag(1 − tanh²(Wx + θ)).
  with jax.enable_x64(True):
    w_mat = jax.random.normal(jax.random.key(2), (5, 5), jnp.float64) / 3
    fixed_point_fn = lambda x, theta: 0.5 * jnp.tanh(w_mat @ x + theta)

    @jax.jit
    def iterate(x0, theta):
      return jax.lax.fori_loop(0, 200, lambda _, x: fixed_point_fn(x, theta),
                               x0)

    solver = bilevel.custom_fixed_point(
        fixed_point_fn,
        solve=functools.partial(bilevel.solve_normal_cg, tol=1e-14))(iterate)
    theta = jax.random.normal(jax.random.key(3), (5,), jnp.float64)
    x0 = jnp.zeros(5, jnp.float64)
    jac = jax.jit(jax.jacrev(solver, argnums=1))(x0, theta)
    x = iterate(x0, theta)
    d = jnp.diag(0.5 * (1 - jnp.tanh(w_mat @ x + theta) ** 2))
    np.testing.assert_allclose(
        jac, jnp.linalg.solve(jnp.eye(5) - d @ w_mat, d), rtol=1e-9)
    fd = _central_fd(lambda t: iterate(x0, t), theta)
    np.testing.assert_allclose(jac, fd, rtol=1e-6, atol=1e-9)


def _r9_root(ref):
  optimality = bilevel.kkt_optimality_fn(ref.problem.inner_loss,
                                         ref.problem.constraints)

  @bilevel.custom_root(
      optimality, solve=functools.partial(bilevel.solve_normal_cg, tol=1e-14))
  def solver(init, x, batch):
    del init
    a = batch["a"]
    return x * a / (a @ a), jnp.atleast_1d(-x / (a @ a))

  return optimality, solver


def test_kkt_optimality_vanishes_at_the_r9_solution():
  with jax.enable_x64(True):
    ref = reference_problems.r9(jax.random.key(4), dtype=jnp.float64)
    optimality, solver = _r9_root(ref)
    x, batch = ref.init.upper, ref.batches["inner_batch"]
    sol = solver(None, x, batch)
    stationarity, feasibility = optimality(sol, x, batch)
    np.testing.assert_allclose(stationarity, 0.0, atol=1e-14)
    np.testing.assert_allclose(feasibility, 0.0, atol=1e-14)


def test_kkt_hypergradient_matches_r9_closed_form_and_fd():
  with jax.enable_x64(True):
    ref = reference_problems.r9(jax.random.key(5), dim=6, dtype=jnp.float64)
    _, solver = _r9_root(ref)
    init = (ref.init.lower, jnp.zeros(1, jnp.float64))

    def phi(x):
      y, _ = solver(init, x, ref.batches["inner_batch"])
      return ref.problem.outer_loss(x, y, ref.batches["outer_batch"])

    x = ref.init.upper
    grad = jax.jit(jax.grad(phi))(x)
    np.testing.assert_allclose(grad, ref.hypergradient(x), rtol=1e-10)
    fd = (phi(x + 1e-6) - phi(x - 1e-6)) / 2e-6
    np.testing.assert_allclose(grad, fd, rtol=1e-6)
