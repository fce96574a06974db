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


def _numpy_x64(fn):
  """``fn`` jitted (:func:`_jit`) and run in float64, returning NumPy."""
  jitted = _jit(fn)

  def run(*args):
    with jax.enable_x64(True):
      return jax.tree.map(np.asarray, jitted(*args))

  return run


def _regression_data(dtype=np.float64):
  rng = np.random.RandomState(0)
  x = rng.randn(_N_SAMPLES, _N_FEATURES) * np.linspace(0.2, 1.0, _N_FEATURES)
  y = x @ rng.randn(_N_FEATURES) + 0.1 * rng.randn(_N_SAMPLES)
  return x.astype(dtype), y.astype(dtype)


def _ridge_objective(w, lam, x, y):
  return 0.5 * jnp.mean((x @ w - y) ** 2) + 0.5 * lam * w @ w


def _ridge_solver(init_params, lam, x, y):
  del init_params
  hessian = x.T @ x / x.shape[0] + lam * jnp.eye(x.shape[1], dtype=x.dtype)
  return jnp.linalg.solve(hessian, x.T @ y / x.shape[0])


def _ridge_solver_kwargs(init_params, **kw):
  return _ridge_solver(init_params, kw["lam"], kw["x"], kw["y"])


def _ridge_closed_form(lam=_LAM):
  """``w``, ``dw/dλ = −(XᵀX/n + λI)⁻¹ w`` and ``dw/dy``, float64 NumPy."""
  x, y = _regression_data()
  n = x.shape[0]
  hessian = x.T @ x / n + lam * np.eye(x.shape[1])
  w = np.linalg.solve(hessian, x.T @ y / n)
  return w, -np.linalg.solve(hessian, w), np.linalg.solve(hessian, x.T) / n


def test_ridge_problem_is_ill_conditioned_enough():
  x, _ = _regression_data()
  eig = np.linalg.eigvalsh(x.T @ x / _N_SAMPLES + _LAM * np.eye(15))
  assert eig[-1] / eig[0] > 20


_ROOT = bilevel.custom_root(jax.grad(_ridge_objective))(_ridge_solver)
_FIXED_POINT = bilevel.custom_fixed_point(
    lambda w, *a: w - jax.grad(_ridge_objective)(w, *a))(_ridge_solver)


@pytest.mark.parametrize("solver", [_ROOT, _FIXED_POINT],
                         ids=["custom_root", "custom_fixed_point"])
def test_ridge_jacobian_all_modes_default_solve(solver):
  @_numpy_x64
  def derivatives(lam, x, y):
    rev = jax.jacrev(solver, argnums=1)(None, lam, x, y)
    fwd = jax.jacfwd(solver, argnums=1)(None, lam, x, y)
    _, tangent = jax.jvp(lambda lam: solver(None, lam, x, y), (lam,),
                         (jnp.ones_like(lam),))
    return rev, fwd, tangent

  _, want, _ = _ridge_closed_form()
  for got in derivatives(_LAM, *_regression_data()):
    np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-10)


def test_ridge_jacobian_float32_at_jaxopt_tolerance():
  x, y = _regression_data(np.float32)
  got = _jit(jax.jacrev(_ROOT, argnums=1))(None, np.float32(_LAM), x, y)
  assert got.dtype == jnp.float32
  _, want, _ = _ridge_closed_form()
  np.testing.assert_allclose(got, want, atol=5e-2 * np.abs(want).max())


@pytest.mark.parametrize("order", [("lam", "x", "y"), ("y", "lam", "x")],
                         ids=["ordered", "unordered"])
def test_kwargs_are_passed_and_differentiated(order):
  solver = bilevel.custom_root(jax.grad(_ridge_objective))(
      _ridge_solver_kwargs)

  def call(lam, x, y):
    values = {"lam": lam, "x": x, "y": y}
    return solver(None, **{k: values[k] for k in order})

  @_numpy_x64
  def evaluate(lam, x, y):
    rev, rev_y = jax.jacrev(call, argnums=(0, 2))(lam, x, y)
    return call(lam, x, y), rev, jax.jacfwd(call)(lam, x, y), rev_y

  sol, rev, fwd, rev_y = evaluate(_LAM, *_regression_data())
  w, want, want_y = _ridge_closed_form()
  np.testing.assert_allclose(sol, w, rtol=1e-12)
  np.testing.assert_allclose(rev, want, rtol=1e-7)
  np.testing.assert_allclose(fwd, want, rtol=1e-7)
  # A keyword array is differentiated like a positional one (in the same
  # reverse pass as λ; the column sums are the gradient of Σw).
  np.testing.assert_allclose(rev_y, want_y, rtol=1e-7, atol=1e-12)
  np.testing.assert_allclose(rev_y.sum(0), want_y.sum(0), rtol=1e-7,
                             atol=1e-12)


def test_has_aux_with_kwargs():
  solver = bilevel.custom_root(jax.grad(_ridge_objective), has_aux=True)(
      lambda init, **kw: (_ridge_solver_kwargs(init, **kw),
                          {"n": jnp.int32(3), "loss": jnp.ones([])}))

  @_numpy_x64
  def evaluate(lam, x, y):
    jac, aux = jax.jacrev(lambda lam: solver(None, lam=lam, x=x, y=y),
                          has_aux=True)(lam)
    _, tangent = jax.jvp(lambda lam: solver(None, lam=lam, x=x, y=y)[1],
                         (lam,), (jnp.ones_like(lam),))
    return jac, aux, tangent

  jac, aux, tangent = evaluate(_LAM, *_regression_data())
  np.testing.assert_allclose(jac, _ridge_closed_form()[1], rtol=1e-7)
  assert aux["n"] == 3
  np.testing.assert_array_equal(tangent["loss"], 0.0)


def test_root_vjp_and_root_jvp_agree_with_closed_form():
  optimality = jax.grad(_ridge_objective)

  @_numpy_x64
  def evaluate(sol, lam, x, y):
    tangent = bilevel.root_jvp(optimality, sol, (lam, x, y),
                               (jnp.ones_like(lam), jnp.zeros_like(x),
                                jnp.zeros_like(y)))
    rows = jax.vmap(lambda e: bilevel.root_vjp(
        optimality, sol, (lam, x, y), e)[0][0])(jnp.eye(_N_FEATURES))
    return tangent, rows

  sol, want, _ = _ridge_closed_form()
  tangent, rows = evaluate(sol, _LAM, *_regression_data())
  np.testing.assert_allclose(tangent, want, rtol=1e-7)
  np.testing.assert_allclose(rows, want, rtol=1e-7)


@functools.cache
def _random_data():
  """The tests' ``jax.random`` draws, in one compile, as float64 NumPy."""
  def draw():
    normal = lambda key, shape: jax.random.normal(key, shape, jnp.float64)
    k0 = jax.random.split(jax.random.key(0))
    k1 = jax.random.key(1)
    k3 = jax.random.split(jax.random.key(3))
    return {
        "negative_definite": (normal(k0[0], (6, 6)), normal(k0[1], (6, 6))),
        "non_symmetric": (normal(k1, (6, 6)),
                          normal(jax.random.fold_in(k1, 1), (6, 3))),
        "fixed_point": normal(jax.random.key(2), (4, 4)),
        "singular": (normal(k3[0], (4, 4)), normal(k3[1], (4, 4))),
        "indefinite": (normal(jax.random.key(4), (6, 6)),
                       normal(jax.random.key(5), (6,))),
    }

  with jax.enable_x64(True):
    return jax.tree.map(np.asarray, _jit(draw)())


def _quadratic_data(name):
  """``H = Q diag(1..8) Qᵀ`` (``Q`` from a QR of a draw) and a second draw."""
  sample, mix = _random_data()[name]
  q, _ = np.linalg.qr(sample)
  hessian = (q * np.linspace(1.0, 8.0, len(q))) @ q.T
  return hessian, mix


@pytest.mark.parametrize("form", ["residual", "maximisation"])
def test_negative_definite_jacobian(form):
  # f(w, θ) = ½wᵀHw − θᵀBw; both forms have ∂₁G = −ηH or −H ≺ 0, where CG
  # stops at its first direction and returned an exactly zero Jacobian.
  hessian, mix = _quadratic_data("negative_definite")
  grad = lambda w, theta: hessian @ w - mix.T @ theta
  if form == "residual":
    optimality = lambda w, theta: (w - 0.1 * grad(w, theta)) - w
  else:
    optimality = lambda w, theta: jax.grad(
        lambda w: -(0.5 * w @ hessian @ w - theta @ mix @ w))(w)
  inner = lambda w0, theta: jnp.linalg.solve(hessian, mix.T @ theta)
  solver = bilevel.custom_root(optimality)(inner)
  cg = bilevel.custom_root(optimality, solve=bilevel.solve_cg)(inner)

  @_numpy_x64
  def jacobians(theta):
    return (jax.jacrev(solver, argnums=1)(None, theta),
            jax.jacfwd(solver, argnums=1)(None, theta),
            jax.jacrev(cg, argnums=1)(None, theta))

  rev, fwd, cg_rev = jacobians(np.ones(6))
  want = np.linalg.solve(hessian, mix.T)
  np.testing.assert_allclose(rev, want, rtol=1e-8)
  np.testing.assert_allclose(fwd, want, rtol=1e-8)
  np.testing.assert_array_equal(cg_rev, 0.0)


def test_non_symmetric_jacobian():
  # G(w, θ) = Mw + 0.1·w³ − Bθ with M non-symmetric: ∂w/∂θ = (M + 0.3 W²)⁻¹B.
  sample, mix = _random_data()["non_symmetric"]
  mat = np.eye(6) * 2 + sample
  optimality = lambda w, theta: mat @ w + 0.1 * w**3 - mix @ theta

  def newton(w0, theta):
    step = lambda _, w: w - jnp.linalg.solve(
        jax.jacobian(optimality)(w, theta), optimality(w, theta))
    return jax.lax.fori_loop(0, 30, step, jnp.zeros(6, theta.dtype))

  solver = bilevel.custom_root(optimality)(newton)

  @_numpy_x64
  def evaluate(theta, points):
    return (newton(None, theta),
            jax.jacrev(solver, argnums=1)(None, theta),
            jax.jacfwd(solver, argnums=1)(None, theta),
            jax.vmap(lambda p: newton(None, p))(points))

  theta = np.array([0.5, -1.0, 2.0])
  eps = 1e-6
  steps = eps * np.eye(3)
  w, rev, fwd, at = evaluate(
      theta, np.concatenate([theta + steps, theta - steps]))
  want = np.linalg.solve(mat + np.diag(0.3 * w**2), mix)
  np.testing.assert_allclose(rev, want, rtol=1e-8)
  np.testing.assert_allclose(fwd, want, rtol=1e-8)
  fd = (at[:3] - at[3:]).T / (2 * eps)
  np.testing.assert_allclose(want, fd, rtol=1e-6, atol=1e-9)


def test_forward_reverse_second_order_and_vmap_agree_with_fd():
  # x = ½tanh(Wx + θ): a non-symmetric contraction, solved by a while_loop.
  w_mat = _random_data()["fixed_point"] / 3
  fixed_point_fn = lambda x, theta: 0.5 * jnp.tanh(w_mat @ x + theta)

  def iterate(x0, theta):
    body = lambda c: (c[0] + 1, fixed_point_fn(c[1], theta))
    return jax.lax.while_loop(lambda c: c[0] < 200, body, (0, x0))[1]

  solver = bilevel.custom_fixed_point(fixed_point_fn)(iterate)
  phi = lambda theta: jnp.sum(jnp.sin(solver(jnp.zeros_like(theta), theta)))

  @_numpy_x64
  def derivatives(theta):
    return (jax.grad(phi)(theta), jax.jacfwd(phi)(theta),
            jax.jacrev(jax.grad(phi))(theta),
            jax.jacfwd(jax.grad(phi))(theta),
            jax.jacfwd(jax.jacfwd(phi))(theta))

  theta = np.array([0.3, -0.2, 0.5, 0.1])
  # One vmapped value_and_grad for the finite differences of φ (step 1e-6)
  # and of ∇φ (step 1e-5), and for the vmap check at [θ, −θ].
  eye = np.eye(4)
  points = np.concatenate([theta[None], -theta[None],
                           theta + 1e-6 * eye, theta - 1e-6 * eye,
                           theta + 1e-5 * eye, theta - 1e-5 * eye])
  grad, grad_fwd, hess_rr, hess_fr, hess_ff = derivatives(theta)
  values, grads = _numpy_x64(jax.vmap(jax.value_and_grad(phi)))(points)
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
  a_mat, _ = _quadratic_data("singular")
  inner = lambda x, yz: 0.5 * yz["y"] @ a_mat @ yz["y"] - x @ yz["y"]
  return a_mat, inner


def test_singular_hessian_gives_finite_pseudo_inverse_on_the_range():
  a_mat, inner = _singular_lower_level()

  @_numpy_x64
  def solves(x, sol, b):
    hvp = jax.linearize(lambda yz: jax.grad(inner, 1)(x, yz), sol)[1]
    return (bilevel.solve_hessian(hvp, b),
            bilevel.solve_hessian(hvp, b, ridge=0.1),
            # Plain CG steps ‖r‖²/pᵀHp with pᵀHp pure rounding on z.
            bilevel.solve_cg(hvp, b, stop_on_negative_curvature=False))

  x = np.ones(4)
  sol = {"y": np.linalg.solve(a_mat, x), "z": np.zeros(2)}
  b = {"y": np.arange(1.0, 5.0), "z": np.array([1.0, -2.0])}
  u, damped, plain = solves(x, sol, b)
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(u))
  np.testing.assert_allclose(u["y"], np.linalg.solve(a_mat, b["y"]),
                             rtol=1e-6)
  np.testing.assert_allclose(
      damped["y"], np.linalg.solve(a_mat + 0.1 * np.eye(4), b["y"]),
      rtol=1e-6)
  np.testing.assert_allclose(damped["z"], b["z"] / 0.1, rtol=1e-6)
  assert not (np.all(np.isfinite(plain["z"])) and
              np.abs(plain["z"]).max() < 1e6)


def test_singular_hessian_hypergradient_via_root_vjp():
  a_mat, inner = _singular_lower_level()
  outer = lambda x, yz: 0.5 * jnp.sum(yz["y"] ** 2) + jnp.sum(yz["z"])
  optimality = lambda yz, x: jax.grad(inner, 1)(x, yz)

  @_numpy_x64
  def hypergradient(x, sol):
    v = jax.grad(outer, 1)(x, sol)
    (vjp_x,), _, residual = bilevel.root_vjp(optimality, sol, (x,), v,
                                             bilevel.solve_hessian)
    return vjp_x, residual

  x = np.array([1.0, -1.0, 0.5, 2.0])
  sol = {"y": np.linalg.solve(a_mat, x), "z": np.zeros(2)}
  vjp_x, residual = hypergradient(x, sol)
  want = np.linalg.solve(a_mat, np.linalg.solve(a_mat, x))
  np.testing.assert_allclose(vjp_x, want, rtol=1e-6)
  assert 0 < residual < 1  # the z part of v is unreachable, and reported


def test_symmetric_indefinite_system():
  sample, b = _random_data()["indefinite"]
  q, _ = np.linalg.qr(sample)
  mat = (q * np.array([5.0, 2.0, 0.5, -0.3, -1.0, -4.0])) @ q.T
  want = np.linalg.solve(mat, b)
  with jax.enable_x64(True):
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
