"""JAXopt's implicit-diff and linear-solve test problems, against our API.

The problems and tolerances of JAXopt's ``tests/implicit_diff_test.py`` and
``tests/linear_solve_test.py`` (ridge regression through ``custom_root`` and
``custom_fixed_point``, keyword arguments, the 5×5, 15×15 and PSD systems),
made harder where JAXopt's were easy (15 features instead of 3), plus the
Jacobians our old defaults got silently wrong: negative definite (residual
form ``T(x) − x``, maximisation), non-symmetric, singular. Every check is
against a closed form or float64 finite differences, with default solvers.

Compiling the default solve (``jax.scipy.sparse.linalg.gmres``) dominates the
run time, so each test evaluates everything it checks in one jitted call, the
linear solvers are jitted once per solver and reused across systems of the
same shape (the matrix is an argument, not a constant), and finite
differences are one ``vmap`` over the perturbed points.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bilevel

_N_SAMPLES, _N_FEATURES, _LAM = 30, 15, 0.05

# XLA's CPU backend spends seconds optimising each GMRES while_loop for
# problems that then run in microseconds: compile unoptimised (about 4× faster
# to compile; the arithmetic is the same IEEE arithmetic, fast math stays
# off), where this XLA has the options.
_QUICK_COMPILE = {"xla_backend_optimization_level": 0,
                  "xla_cpu_use_fusion_emitters": False}


@functools.cache
def _compiler_options():
  try:
    jax.jit(jnp.sin, compiler_options=_QUICK_COMPILE).lower(1.0).compile()
  except Exception:  # an XLA without these options
    return None
  return _QUICK_COMPILE


def _jit(fn):
  """``jax.jit``, compiling for a quick compile rather than a quick run."""
  return jax.jit(fn, compiler_options=_compiler_options())


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
  with jax.enable_x64(True):
    x, _ = _regression_data()
  eig = np.linalg.eigvalsh(np.asarray(x.T @ x / _N_SAMPLES) + _LAM * np.eye(15))
  assert eig[-1] / eig[0] > 20


_ROOT = bilevel.custom_root(jax.grad(_ridge_objective))(_ridge_solver)
_FIXED_POINT = bilevel.custom_fixed_point(
    lambda w, *a: w - jax.grad(_ridge_objective)(w, *a))(_ridge_solver)


@pytest.mark.parametrize("solver", [_ROOT, _FIXED_POINT],
                         ids=["custom_root", "custom_fixed_point"])
def test_ridge_jacobian_all_modes_default_solve(solver):
  @_jit
  def derivatives(lam, x, y):
    rev = jax.jacrev(solver, argnums=1)(None, lam, x, y)
    fwd = jax.jacfwd(solver, argnums=1)(None, lam, x, y)
    _, tangent = jax.jvp(lambda lam: solver(None, lam, x, y), (lam,),
                         (jnp.ones_like(lam),))
    return rev, fwd, tangent

  with jax.enable_x64(True):
    x, y = _regression_data()
    want = _ridge_jac_lam(_LAM, x, y)
    for got in derivatives(_LAM, x, y):
      np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-10)


def test_ridge_jacobian_float32_at_jaxopt_tolerance():
  x, y = _regression_data(jnp.float32)
  got = _jit(jax.jacrev(_ROOT, argnums=1))(None, jnp.float32(_LAM), x, y)
  with jax.enable_x64(True):
    want = _ridge_jac_lam(_LAM, *_regression_data())
  np.testing.assert_allclose(got, want, atol=5e-2 * float(jnp.abs(want).max()))


@pytest.mark.parametrize("order", [("lam", "x", "y"), ("y", "lam", "x")],
                         ids=["ordered", "unordered"])
def test_kwargs_are_passed_and_differentiated(order):
  solver = bilevel.custom_root(jax.grad(_ridge_objective))(
      _ridge_solver_kwargs)

  def call(lam, x, y):
    values = {"lam": lam, "x": x, "y": y}
    return solver(None, **{k: values[k] for k in order})

  @_jit
  def evaluate(lam, x, y):
    rev, rev_y = jax.jacrev(call, argnums=(0, 2))(lam, x, y)
    return call(lam, x, y), rev, jax.jacfwd(call)(lam, x, y), rev_y

  with jax.enable_x64(True):
    x, y = _regression_data()
    sol, rev, fwd, rev_y = evaluate(_LAM, x, y)
    np.testing.assert_allclose(sol, _ridge_solver(None, _LAM, x, y),
                               rtol=1e-12)
    want = _ridge_jac_lam(_LAM, x, y)
    np.testing.assert_allclose(rev, want, rtol=1e-7)
    np.testing.assert_allclose(fwd, want, rtol=1e-7)
    # A keyword array is differentiated like a positional one (the same
    # reverse pass as for λ; its row sums are the gradient of Σw).
    want_y = jax.jacrev(_ridge_solver, argnums=3)(None, _LAM, x, y)
    np.testing.assert_allclose(rev_y, want_y, rtol=1e-7, atol=1e-12)
    np.testing.assert_allclose(rev_y.sum(0), want_y.sum(0), rtol=1e-7,
                               atol=1e-12)


def test_has_aux_with_kwargs():
  solver = bilevel.custom_root(jax.grad(_ridge_objective), has_aux=True)(
      lambda init, **kw: (_ridge_solver_kwargs(init, **kw),
                          {"n": jnp.int32(3), "loss": jnp.ones([])}))

  @_jit
  def evaluate(lam, x, y):
    jac, aux = jax.jacrev(lambda lam: solver(None, lam=lam, x=x, y=y),
                          has_aux=True)(lam)
    _, tangent = jax.jvp(lambda lam: solver(None, lam=lam, x=x, y=y)[1],
                         (lam,), (jnp.ones_like(lam),))
    return jac, aux, tangent

  with jax.enable_x64(True):
    x, y = _regression_data()
    jac, aux, tangent = evaluate(_LAM, x, y)
    np.testing.assert_allclose(jac, _ridge_jac_lam(_LAM, x, y), rtol=1e-7)
    assert aux["n"] == 3
    np.testing.assert_array_equal(tangent["loss"], 0.0)


def test_root_vjp_and_root_jvp_agree_with_closed_form():
  optimality = jax.grad(_ridge_objective)

  @_jit
  def evaluate(sol, lam, x, y):
    tangent = bilevel.root_jvp(optimality, sol, (lam, x, y),
                               (jnp.ones_like(lam), jnp.zeros_like(x),
                                jnp.zeros_like(y)))
    rows = jax.vmap(lambda e: bilevel.root_vjp(
        optimality, sol, (lam, x, y), e)[0][0])(jnp.eye(_N_FEATURES))
    return tangent, rows

  with jax.enable_x64(True):
    x, y = _regression_data()
    sol = _ridge_solver(None, _LAM, x, y)
    want = _ridge_jac_lam(_LAM, x, y)
    tangent, rows = evaluate(sol, _LAM, x, y)
    np.testing.assert_allclose(tangent, want, rtol=1e-7)
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
    inner = lambda w0, theta: jnp.linalg.solve(hessian, mix.T @ theta)
    solver = bilevel.custom_root(optimality)(inner)
    cg = bilevel.custom_root(optimality, solve=bilevel.solve_cg)(inner)

    @_jit
    def jacobians(theta):
      return (jax.jacrev(solver, argnums=1)(None, theta),
              jax.jacfwd(solver, argnums=1)(None, theta),
              jax.jacrev(cg, argnums=1)(None, theta))

    rev, fwd, cg_rev = jacobians(jnp.ones(6, jnp.float64))
    want = jnp.linalg.solve(hessian, mix.T)
    np.testing.assert_allclose(rev, want, rtol=1e-8)
    np.testing.assert_allclose(fwd, want, rtol=1e-8)
    np.testing.assert_array_equal(cg_rev, 0.0)


def test_non_symmetric_jacobian():
  # G(w, θ) = Mw + 0.1·w³ − Bθ with M non-symmetric: ∂w/∂θ = (M + 0.3 W²)⁻¹B.
  with jax.enable_x64(True):
    key = jax.random.key(1)
    mat = jnp.eye(6) * 2 + jax.random.normal(key, (6, 6), jnp.float64)
    mix = jax.random.normal(jax.random.fold_in(key, 1), (6, 3), jnp.float64)
    optimality = lambda w, theta: mat @ w + 0.1 * w**3 - mix @ theta

    def newton(w0, theta):
      step = lambda _, w: w - jnp.linalg.solve(
          jax.jacobian(optimality)(w, theta), optimality(w, theta))
      return jax.lax.fori_loop(0, 30, step, jnp.zeros(6, jnp.float64))

    solver = bilevel.custom_root(optimality)(newton)

    @_jit
    def evaluate(theta, points):
      return (newton(None, theta),
              jax.jacrev(solver, argnums=1)(None, theta),
              jax.jacfwd(solver, argnums=1)(None, theta),
              jax.vmap(lambda p: newton(None, p))(points))

    theta = jnp.array([0.5, -1.0, 2.0], jnp.float64)
    eps = 1e-6
    steps = eps * jnp.eye(3)
    w, rev, fwd, at = evaluate(theta, jnp.concatenate([theta + steps,
                                                       theta - steps]))
    want = jnp.linalg.solve(mat + jnp.diag(0.3 * w**2), mix)
    np.testing.assert_allclose(rev, want, rtol=1e-8)
    np.testing.assert_allclose(fwd, want, rtol=1e-8)
    fd = (at[:3] - at[3:]).T / (2 * eps)
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

    @_jit
    def derivatives(theta):
      return (jax.grad(phi)(theta), jax.jacfwd(phi)(theta),
              jax.jacrev(jax.grad(phi))(theta),
              jax.jacfwd(jax.grad(phi))(theta),
              jax.jacfwd(jax.jacfwd(phi))(theta))

    theta = jnp.array([0.3, -0.2, 0.5, 0.1], jnp.float64)
    grad, grad_fwd, hess_rr, hess_fr, hess_ff = derivatives(theta)
    # One vmapped value_and_grad for the finite differences of φ (step
    # 1e-6) and of ∇φ (step 1e-5), and the vmap check at [θ, −θ].
    eye = jnp.eye(4)
    points = jnp.concatenate([theta[None], -theta[None],
                              theta + 1e-6 * eye, theta - 1e-6 * eye,
                              theta + 1e-5 * eye, theta - 1e-5 * eye])
    values, grads = _jit(jax.vmap(jax.value_and_grad(phi)))(points)
    fd = (values[2:6] - values[6:10]) / 2e-6
    np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(grad_fwd, grad, rtol=1e-9)
    np.testing.assert_allclose(hess_fr, hess_rr, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(hess_ff, hess_rr, rtol=1e-8, atol=1e-12)
    fd_hess = (grads[10:14] - grads[14:18]) / 2e-5
    np.testing.assert_allclose(hess_rr, fd_hess, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(grads[0], grad, rtol=1e-10)


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


@functools.cache
def _jitted_solve(solve, return_residual=False, **options):
  """``(mat, b) -> solve(mat @ ·, b)``, compiled once per solver and shape."""
  return _jit(lambda mat, b: solve(lambda v: mat @ v, b,
                                      return_residual=return_residual,
                                      **options))


@pytest.mark.parametrize("name", ["5x5", "15x15", "psd"])
def test_jaxopt_linear_systems_default_options(name):
  with jax.enable_x64(True):
    mat, b = _jaxopt_systems()[name]
    want = np.linalg.solve(mat, b)
    solves = _GENERAL + (_SYMMETRIC if name == "psd" else [])
    for solve in solves:
      x, residual = _jitted_solve(solve, return_residual=True)(mat, b)
      tol = 1e-6 if solve is bilevel.solve_hessian else 1e-8
      np.testing.assert_allclose(x, want, rtol=tol, atol=tol,
                                 err_msg=solve.__name__)
      assert residual < 10 * tol, solve.__name__


def test_jaxopt_linear_systems_float32_at_jaxopt_tolerance():
  for name, (mat, b) in _jaxopt_systems().items():
    mat32, b32 = jnp.asarray(mat, jnp.float32), jnp.asarray(b, jnp.float32)
    want = np.linalg.solve(mat, b)
    atol = 1e-2 if name == "psd" else 1e-4  # JAXopt's
    for solve in [bilevel.solve_gmres, bilevel.solve_normal_cg]:
      x = _jitted_solve(solve)(mat32, b32)
      assert x.dtype == jnp.float32
      scale = 1 + np.abs(want).max()
      np.testing.assert_allclose(x, want, atol=atol * scale,
                                 err_msg=f"{name} {solve.__name__}")


def test_jaxopt_ridge_variants():
  with jax.enable_x64(True):
    mat, b = _jaxopt_systems()["5x5"]
    want = np.linalg.solve(mat + np.eye(5), b)
    for solve in [bilevel.solve_gmres, bilevel.solve_bicgstab]:
      np.testing.assert_allclose(_jitted_solve(solve, ridge=1.0)(mat, b),
                                 want, atol=1e-8, err_msg=solve.__name__)
    gram = mat.T @ mat
    for solve in [bilevel.solve_cg, bilevel.solve_minres]:
      np.testing.assert_allclose(_jitted_solve(solve, ridge=1.0)(gram, b),
                                 np.linalg.solve(gram + np.eye(5), b),
                                 atol=1e-8, err_msg=solve.__name__)
    np.testing.assert_allclose(
        _jitted_solve(bilevel.solve_normal_cg, ridge=1.0)(mat, b),
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

    @_jit
    def solves(x, sol, b):
      hvp = jax.linearize(lambda yz: jax.grad(inner, 1)(x, yz), sol)[1]
      return (bilevel.solve_hessian(hvp, b),
              bilevel.solve_hessian(hvp, b, ridge=0.1),
              # Plain CG steps ‖r‖²/pᵀHp with pᵀHp pure rounding on z.
              bilevel.solve_cg(hvp, b, stop_on_negative_curvature=False))

    x = jnp.ones(4, jnp.float64)
    sol = {"y": jnp.linalg.solve(a_mat, x), "z": jnp.zeros(2, jnp.float64)}
    b = {"y": jnp.arange(1.0, 5.0), "z": jnp.array([1.0, -2.0])}
    u, damped, plain = solves(x, sol, b)
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(u))
    np.testing.assert_allclose(u["y"], jnp.linalg.solve(a_mat, b["y"]),
                               rtol=1e-6)
    np.testing.assert_allclose(
        damped["y"], jnp.linalg.solve(a_mat + 0.1 * jnp.eye(4), b["y"]),
        rtol=1e-6)
    np.testing.assert_allclose(damped["z"], b["z"] / 0.1, rtol=1e-6)
    assert not bool(jnp.all(jnp.isfinite(plain["z"])) and
                    jnp.abs(plain["z"]).max() < 1e6)


def test_singular_hessian_hypergradient_via_root_vjp():
  with jax.enable_x64(True):
    a_mat, inner = _singular_lower_level()
    outer = lambda x, yz: 0.5 * jnp.sum(yz["y"] ** 2) + jnp.sum(yz["z"])
    optimality = lambda yz, x: jax.grad(inner, 1)(x, yz)

    @_jit
    def hypergradient(x, sol):
      v = jax.grad(outer, 1)(x, sol)
      (vjp_x,), _, residual = bilevel.root_vjp(optimality, sol, (x,), v,
                                               bilevel.solve_hessian)
      return vjp_x, residual

    x = jnp.array([1.0, -1.0, 0.5, 2.0])
    sol = {"y": jnp.linalg.solve(a_mat, x), "z": jnp.zeros(2, jnp.float64)}
    vjp_x, residual = hypergradient(x, sol)
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
      np.testing.assert_allclose(_jitted_solve(solve)(mat, b), want,
                                 rtol=1e-5, err_msg=solve.__name__)


# Residuals.


_TRACKED = [
    bilevel.solve_cg, bilevel.solve_minres, bilevel.solve_normal_cg,
    bilevel.solve_gmres, bilevel.solve_bicgstab,
    functools.partial(bilevel.solve_cg, maxiter=2),
    functools.partial(bilevel.solve_minres, maxiter=2),
    functools.partial(bilevel.solve_normal_cg, maxiter=2),
]


@functools.cache
def _solve_gradients(solve):
  """``d/ds Σ solve(A + sI, b)`` at ``s = 0``, with and without residual."""
  def gradients(mat, b):
    def total(s, return_residual):
      x = solve(lambda v: mat @ v + s * v, b,
                return_residual=return_residual)
      return jnp.sum(x[0] if return_residual else x)

    return jax.grad(total)(0.0, True), jax.grad(total)(0.0, False)

  return _jit(gradients)


@pytest.mark.parametrize("solve", _TRACKED, ids=[
    "cg", "minres", "normal_cg", "gmres", "bicgstab", "cg2", "minres2",
    "normal_cg2"])
def test_tracked_residual_matches_the_true_one(solve):
  with jax.enable_x64(True):
    mat, b = _jaxopt_systems()["psd"]
    mat = mat + np.eye(5)
    x, residual = _jitted_solve(solve, return_residual=True)(mat, b)
    true = bilevel.linear_solve_residual(lambda v: mat @ v, x, b)
    np.testing.assert_allclose(residual, true, rtol=1e-6, atol=1e-12)
    # The solution stays differentiable with the residual requested.
    with_residual, plain = _solve_gradients(solve)(mat, b)
    np.testing.assert_allclose(with_residual, plain, rtol=1e-12)


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
