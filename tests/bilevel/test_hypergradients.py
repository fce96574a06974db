"""Implicit and unrolled hypergradients against closed forms (float64).

Hypergradients are read from ``updates.upper`` of the public
``scale_by_implicit`` / ``scale_by_unrolled`` update; the closed forms are
``reference_problems``' (``reference/bilevel_problems.md``). Inner step sizes
come from the spectra documented by each constructor.
"""

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bilevel
from bilevel import reference_problems

_EXACT_CG = functools.partial(bilevel.solve_cg, tol=1e-13)


@dataclasses.dataclass(frozen=True)
class Case:
  """A reference problem with an inner step size and a converging length."""
  make: Callable[[], reference_problems.ReferenceProblem]
  lr: float
  steps: int


CASES = {
    "r1": Case(lambda: reference_problems.r1(jnp.float64), 0.5, 60),
    "r2": Case(lambda: reference_problems.r2(
        jax.random.key(0), dim_upper=20, dim_lower=20, dtype=jnp.float64),
               0.5, 60),
    "r3": Case(lambda: reference_problems.r3(jax.random.key(1),
                                             dtype=jnp.float64), 0.3, 80),
    "r10": Case(lambda: reference_problems.r10(jax.random.key(2),
                                               dtype=jnp.float64), 1.0, 400),
    "r12": Case(lambda: reference_problems.r12(jax.random.key(3),
                                               dtype=jnp.float64), 0.3, 120),
}


def _update(tx, ref, params=None):
  """One jitted ``tx.update`` from ``params`` (default ``ref.init``)."""
  params = ref.init if params is None else params
  update = jax.jit(lambda p, s: tx.update(
      None, s, p, outer_loss=ref.problem.outer_loss,
      inner_loss=ref.problem.inner_loss, **ref.batches))
  return update(params, tx.init(params))


def _rel_err(got, want):
  got, want = jnp.ravel(jnp.asarray(got)), jnp.ravel(jnp.asarray(want))
  return float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))


@pytest.mark.parametrize("name", CASES)
def test_implicit_hypergradient(name):
  with jax.enable_x64(True):
    case = CASES[name]
    ref = case.make()
    tx = bilevel.scale_by_implicit(optax.sgd(case.lr), case.steps, _EXACT_CG)
    updates, state = _update(tx, ref)
    x = ref.init.upper
    assert _rel_err(updates.upper, ref.hypergradient(x)) < 1e-6
    y_star = ref.init.lower - updates.lower
    np.testing.assert_allclose(y_star, ref.lower_solution(x), atol=1e-9)
    assert state.count == 1
    assert state.inner_grad_norm < 1e-8
    assert state.linear_solve_residual < 1e-8


@pytest.mark.parametrize("name", CASES)
def test_unrolled_hypergradient(name):
  with jax.enable_x64(True):
    case = CASES[name]
    ref = case.make()
    tx = bilevel.scale_by_unrolled(optax.sgd(case.lr), case.steps)
    updates, state = _update(tx, ref)
    x = ref.init.upper
    assert _rel_err(updates.upper, ref.hypergradient(x)) < 1e-6
    y_t = ref.init.lower - updates.lower
    np.testing.assert_allclose(y_t, ref.lower_solution(x), atol=1e-9)
    assert state.inner_grad_norm < 1e-8


def test_implicit_kkt_hypergradient_on_r9():
  with jax.enable_x64(True):
    ref = reference_problems.r9(jax.random.key(4), dim=6, dtype=jnp.float64)
    exact = lambda x, y0, batch: ref.lower_solution(x)
    tx = bilevel.scale_by_implicit(None, 0, inner_solver=exact,
                                   equality_constrained=True)
    updates, state = jax.jit(lambda p, s: tx.update(
        None, s, p, outer_loss=ref.problem.outer_loss,
        inner_loss=ref.problem.inner_loss,
        constraints=ref.problem.constraints, **ref.batches))(
            ref.init, tx.init(ref.init))
    x = ref.init.upper
    assert _rel_err(updates.upper, ref.hypergradient(x)) < 1e-6
    assert state.inner_grad_norm < 1e-10  # multipliers recovered
    with pytest.raises(TypeError, match="constraints"):
      tx.update(None, tx.init(ref.init), ref.init,
                outer_loss=ref.problem.outer_loss,
                inner_loss=ref.problem.inner_loss, **ref.batches)


def test_unrolled_error_shrinks_with_unroll_length():
  with jax.enable_x64(True):
    ref = reference_problems.r12(jax.random.key(5), dim=8, dtype=jnp.float64)
    want = ref.hypergradient(ref.init.upper)
    errors = [
        _rel_err(_update(bilevel.scale_by_unrolled(optax.sgd(0.3), t),
                         ref)[0].upper, want)
        for t in (5, 10, 20, 40)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-4


def _r12_with_solve(ref, linear_solve):
  """∇Φ of R12 with the exact lower solution and a given adjoint solve."""
  exact = lambda x, y0, batch: ref.lower_solution(x)
  tx = bilevel.scale_by_implicit(None, 0, linear_solve, inner_solver=exact)
  return _rel_err(_update(tx, ref)[0].upper, ref.hypergradient(ref.init.upper))


def test_cg_and_neumann_accuracy_grow_with_iterations_on_r12():
  # A + λI has spectrum [1, 5]: CG is exact after dim = 6 steps; Neumann with
  # step 1/5 contracts by 0.8 per term.
  with jax.enable_x64(True):
    ref = reference_problems.r12(jax.random.key(6), dim=6, lam=1.0,
                                 dtype=jnp.float64)
    cg = [_r12_with_solve(ref, functools.partial(bilevel.solve_cg, maxiter=k))
          for k in (1, 2, 4, 6)]
    assert all(a > b for a, b in zip(cg, cg[1:])), cg
    assert cg[-1] < 1e-10
    neumann = [_r12_with_solve(ref, functools.partial(
        bilevel.solve_neumann, step=0.2, maxiter=k)) for k in (5, 20, 80)]
    assert all(a > b for a, b in zip(neumann, neumann[1:])), neumann
    for k, error in zip((5, 20, 80), neumann):
      assert error < 5 * 0.8 ** k


def test_implicit_default_solves_an_indefinite_lower_level_exactly():
  # A saddle lower level: f = ½yᵀDy − xᵀy with D = diag(1, 2, −1e-4), so the
  # exact IFT hypergradient D⁻¹(y* − t) is ~10⁴. The default (MINRES) solves
  # the indefinite system exactly, where curvature-safe CG stopped at the
  # negative direction and dropped the correction.
  with jax.enable_x64(True):
    diag = jnp.array([1.0, 2.0, -1e-4])
    target = jnp.array([1.0, -1.0, 1.0])
    ref = reference_problems.ReferenceProblem(
        problem=bilevel.Problem(
            outer_loss=lambda x, y, b: 0.5 * jnp.sum((y - target) ** 2),
            inner_loss=lambda x, y, b: 0.5 * y @ (diag * y) - x @ y),
        init=bilevel.Params(jnp.array([0.5, 0.5, 1e-6]), jnp.zeros(3)),
        batches={"outer_batch": None, "inner_batch": None},
        hypergradient=None, lower_solution=None, upper_optimum=None)
    exact = lambda x, y0, batch: x / diag
    tx = bilevel.scale_by_implicit(None, 0, inner_solver=exact)
    updates, state = _update(tx, ref)
    ift = (exact(ref.init.upper, None, None) - target) / diag
    np.testing.assert_allclose(updates.upper, ift, rtol=1e-6)
    assert state.linear_solve_residual < 1e-6
    cg = bilevel.scale_by_implicit(None, 0, inner_solver=exact,
                                   linear_solve=bilevel.solve_cg)
    truncated, cg_state = _update(cg, ref)
    assert jnp.linalg.norm(truncated.upper) < 1e-2 * jnp.linalg.norm(ift)
    assert cg_state.linear_solve_residual > 1e-3


def test_aliases_move_lower_to_the_solution_and_upper_by_the_step():
  with jax.enable_x64(True):
    ref = CASES["r2"].make()
    x = ref.init.upper
    for tx in (bilevel.implicit(optax.sgd(0.1), optax.sgd(0.5), 60,
                                linear_solve=_EXACT_CG),
               bilevel.unrolled(optax.sgd(0.1), optax.sgd(0.5), 60)):
      step = bilevel.make_step(tx, ref.problem)
      params, _, _ = step(ref.init, tx.init(ref.init), ref.batches)
      np.testing.assert_allclose(params.lower, ref.lower_solution(x),
                                 atol=1e-9)
      np.testing.assert_allclose(params.upper,
                                 x - 0.1 * ref.hypergradient(x), atol=1e-9)


def test_bfloat16_params_keep_dtype_and_state_is_float32():
  ref = reference_problems.r12(jax.random.key(7), dim=4)
  params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), ref.init)
  for tx in (bilevel.scale_by_implicit(optax.sgd(0.3), 20),
             bilevel.scale_by_unrolled(optax.sgd(0.3), 20)):
    updates, state = _update(tx, ref, params)
    assert all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(updates))
    assert state.count.dtype == jnp.int32
    assert state.inner_grad_norm.dtype == jnp.float32
    np.testing.assert_allclose(
        np.asarray(updates.upper, np.float32),
        ref.hypergradient(params.upper.astype(jnp.float32)), rtol=0.05,
        atol=0.05)


def test_missing_params_raises():
  ref = reference_problems.r1()
  for tx in (bilevel.scale_by_implicit(optax.sgd(0.5), 5),
             bilevel.scale_by_unrolled(optax.sgd(0.5), 5)):
    with pytest.raises(ValueError, match="params"):
      tx.update(None, tx.init(ref.init), None,
                outer_loss=ref.problem.outer_loss,
                inner_loss=ref.problem.inner_loss)


_DERIVATIVE_SOLVERS = {
    "implicit": lambda lr, steps: bilevel.scale_by_implicit(
        optax.sgd(lr), steps, linear_solve=_EXACT_CG),
    "unrolled": lambda lr, steps: bilevel.scale_by_unrolled(
        optax.sgd(lr), steps),
}


@pytest.mark.parametrize("solver", sorted(_DERIVATIVE_SOLVERS))
@pytest.mark.parametrize("name", ["r2", "r3"])
def test_derivative_of_the_hypergradient_matches_closed_form(solver, name):
  """``∂∇Φ/∂x`` through the solver equals the closed form's derivative."""
  with jax.enable_x64(True):
    case = CASES[name]
    ref = case.make()
    tx = _DERIVATIVE_SOLVERS[solver](case.lr, 4 * case.steps)
    state = tx.init(ref.init)

    def hypergradient(x):
      updates, _ = tx.update(
          None, state, bilevel.Params(x, ref.init.lower),
          outer_loss=ref.problem.outer_loss,
          inner_loss=ref.problem.inner_loss, **ref.batches)
      return updates.upper

    x = ref.init.upper
    got = jax.jit(jax.jacrev(hypergradient))(x)
    want = jax.jacfwd(ref.hypergradient)(x)
    assert float(jnp.max(jnp.abs(want))) > 1e-3
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)


def _singular_problem():
  """R2's lower level plus lower variables ``w`` the inner loss ignores.

  The inner Hessian in ``(z, w)`` is ``diag(A, 0)``: singular, and ``∇_w F``
  has a component in its null space. ``w`` never moves and does not change
  ``Φ``, so the pseudo-inverse hypergradient is R2's.
  """
  ref = reference_problems.r2(jax.random.key(0), dim_upper=6, dim_lower=6)
  coupling = jax.random.normal(jax.random.key(1), (6, 3)) / 3

  def outer(x, lower, b):
    z, w = lower
    return (ref.problem.outer_loss(x, z, b) + 0.5 * jnp.sum((w - 1) ** 2)
            + z @ coupling @ w)

  def inner(x, lower, b):
    return ref.problem.inner_loss(x, lower[0], b)

  def hypergradient(x, w):
    z = ref.lower_solution(x)
    grad_z = jax.grad(outer, argnums=1)(x, (z, w), ref.batches["outer_batch"])
    a = ref.batches["inner_batch"]
    return (jax.grad(outer)(x, (z, w), ref.batches["outer_batch"])
            - a["C"] @ jnp.linalg.solve(a["A"], grad_z[0]))

  init = bilevel.Params(ref.init.upper, (ref.init.lower, jnp.zeros(3)))
  return bilevel.Problem(outer, inner), init, ref.batches, hypergradient


def test_implicit_default_is_finite_on_a_singular_lower_level():
  problem, params, batches, hypergradient = _singular_problem()
  tx = bilevel.implicit(optax.sgd(0.3), optax.sgd(0.5), inner_steps=40)
  first, _ = bilevel.scale_by_implicit(optax.sgd(0.5), 40).update(
      None, tx.init(params)[0], params, outer_loss=problem.outer_loss,
      inner_loss=problem.inner_loss, **batches)
  np.testing.assert_allclose(
      first.upper, hypergradient(params.upper, params.lower[1]), rtol=1e-3,
      atol=1e-4)
  step = bilevel.make_step(tx, problem)
  state = tx.init(params)
  for _ in range(300):
    params, state, metrics = step(params, state, batches)
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(params))
  final = hypergradient(params.upper, params.lower[1])
  assert float(jnp.linalg.norm(final)) < 1e-3, final


def test_default_solve_is_the_neumann_series_of_the_inner_loop():
  """The default adjoint solve is Neumann with the inner SGD's step and T."""
  problem, params, batches, _ = _singular_problem()
  extra = dict(outer_loss=problem.outer_loss, inner_loss=problem.inner_loss,
               **batches)
  default = bilevel.scale_by_implicit(optax.sgd(0.3), 7)
  explicit = bilevel.scale_by_implicit(
      optax.sgd(0.3), 7, linear_solve=functools.partial(
          bilevel.solve_neumann, step=0.3, maxiter=7))
  got, _ = default.update(None, default.init(params), params, **extra)
  want, _ = explicit.update(None, explicit.init(params), params, **extra)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5,
                                 atol=1e-6), got, want)
