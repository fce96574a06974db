"""The contract matrix: every solver row × every wrapper a user reaches for.

Each cell either matches the wrapper's definition numerically or raises the
documented error (``docs/bilevel.md``, "Wrappers"). Rows come from
``test_contract.SOLVERS``; no check branches on a solver's name, only on
what the row declares (``uses_outer_grads``, ``parts``, ``hyper``).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bilevel
from tests.bilevel.test_contract import IDS, SOLVERS, _problem

_assert_equal = functools.partial(jax.tree.map, np.testing.assert_array_equal)


def _close(rtol=1e-6, atol=1e-7):
  return functools.partial(
      jax.tree.map, functools.partial(np.testing.assert_allclose, rtol=rtol,
                                      atol=atol))


def _steps(tx, ref, n, params=None, state=None, **step_kwargs):
  params = ref.init if params is None else params
  state = tx.init(params) if state is None else state
  step = bilevel.make_step(tx, ref.problem, **step_kwargs)
  for _ in range(n):
    params, state, metrics = step(params, state, ref.batches)
  return params, state, metrics


def _nan_problem(ref):
  """The same problem with NaN losses and gradients."""
  poison = lambda loss: lambda *a: loss(*a) * jnp.nan
  return bilevel.Problem(poison(ref.problem.outer_loss),
                         poison(ref.problem.inner_loss))


@pytest.mark.parametrize("case", SOLVERS, ids=IDS)
def test_clip_before_the_solver(case):
  ref = _problem(case.problems[0])
  tx = optax.chain(optax.clip_by_global_norm(1e-3), case.make(case.problems[0]))
  if not case.uses_outer_grads:
    with pytest.raises(TypeError, match="evaluates the outer gradient itself"):
      _steps(tx, ref, 1)
    return
  # Definition: the solver sees ∇F rescaled to norm 1e-3.
  plain = case.make(case.problems[0])
  state = plain.init(ref.init)
  grads = jax.grad(lambda p: ref.problem.outer_loss(
      p.upper, p.lower, ref.batches["outer_batch"]))(ref.init)
  clipped, _ = optax.clip_by_global_norm(1e-3).update(grads, None)
  want, _ = plain.update(clipped, state, ref.init,
                         outer_loss=ref.problem.outer_loss,
                         inner_loss=ref.problem.inner_loss, **ref.batches)
  params, _, _ = _steps(tx, ref, 1)
  _close()(params, optax.apply_updates(ref.init, want))


@pytest.mark.parametrize("case", SOLVERS, ids=IDS)
def test_optax_multisteps(case):
  ref = _problem(case.problems[0])
  tx = optax.MultiSteps(case.make(case.problems[0]), every_k_schedule=2)
  if not case.uses_outer_grads:
    with pytest.raises(TypeError, match="bilevel.accumulate"):
      _steps(tx, ref, 1)
    return
  # Same batch twice: the mean of the two ∇F is ∇F, so two mini-steps are
  # one plain step, and the first leaves the params unchanged.
  after_one, _, _ = _steps(tx, ref, 1)
  _assert_equal(after_one, ref.init)
  after_two, _, _ = _steps(tx, ref, 2)
  plain, _, _ = _steps(case.make(case.problems[0]), ref, 1)
  _close()(after_two, plain)


@pytest.mark.parametrize("case", [c for c in SOLVERS if c.parts],
                         ids=[c.name for c in SOLVERS if c.parts])
def test_accumulate_averages_directions(case):
  ref = _problem(case.problems[0])
  directions, optimizer = case.parts(case.problems[0])
  tx = bilevel.accumulate(directions, optimizer, 2)
  after_one, _, _ = _steps(tx, ref, 1)
  _assert_equal(after_one, ref.init)
  after_two, _, _ = _steps(tx, ref, 2)
  # Definition: the optimizer applied once to the mean of two directions
  # computed at the unchanged params, the solver state threaded.
  extra = dict(outer_loss=ref.problem.outer_loss,
               inner_loss=ref.problem.inner_loss, **ref.batches)
  grads = (jax.grad(lambda p: ref.problem.outer_loss(
      p.upper, p.lower, ref.batches["outer_batch"]))(ref.init)
           if case.uses_outer_grads else None)
  state = directions.init(ref.init)
  d1, state = directions.update(grads, state, ref.init, **extra)
  d2, _ = directions.update(grads, state, ref.init, **extra)
  mean = jax.tree.map(lambda a, b: (a + b) / 2, d1, d2)
  want, _ = optimizer.update(mean, optimizer.init(ref.init), ref.init)
  # Jitted against eager float32 sums: the order of the adds differs.
  _close(rtol=1e-5)(after_two, optax.apply_updates(ref.init, want))


@pytest.mark.parametrize("case", SOLVERS, ids=IDS)
def test_apply_if_finite_skips_non_finite_directions(case):
  ref = _problem(case.problems[0])
  tx = bilevel.apply_if_finite(case.make(case.problems[0]), 3)
  state = tx.init(ref.init)
  bad = bilevel.make_step(tx, _nan_problem(ref))
  params, state, _ = bad(ref.init, state, ref.batches)
  _assert_equal(params, ref.init)
  assert int(state.notfinite_count) == 1 and int(state.total_notfinite) == 1
  _assert_equal(state.inner_state, tx.init(ref.init).inner_state)
  params, state, _ = _steps(tx, ref, 1, state=state)
  plain, _, _ = _steps(case.make(case.problems[0]), ref, 1)
  _close()(params, plain)
  assert int(state.notfinite_count) == 0


@pytest.mark.parametrize("case", SOLVERS, ids=IDS)
def test_optax_apply_if_finite(case):
  ref = _problem(case.problems[0])
  tx = optax.apply_if_finite(case.make(case.problems[0]), 3)
  step = bilevel.make_step(tx, _nan_problem(ref))
  if not case.uses_outer_grads:
    # optax tests the incoming gradients, which this solver never reads.
    with pytest.raises(TypeError, match="OuterGradsNotUsed"):
      step(ref.init, tx.init(ref.init), ref.batches)
    return
  params, state, _ = step(ref.init, tx.init(ref.init), ref.batches)
  _assert_equal(params, ref.init)
  assert int(state.notfinite_count) == 1


@pytest.mark.parametrize("case", SOLVERS, ids=IDS)
def test_inject_hyperparams(case):
  problem_name = case.problems[0]
  ref = _problem(problem_name)
  kwargs = case.kwargs(problem_name, None)
  injected = bilevel.inject_hyperparams(case.factory)(**kwargs)
  want, _, _ = _steps(case.make(problem_name), ref, 2)
  got, state, _ = _steps(injected, ref, 2)
  # A traced hyperparameter is not constant-folded: float32 rounding differs
  # (most in ScaleBiO's d_p, a difference of two nearly equal gradients).
  _close(atol=1e-6)(got, want)
  if case.hyper is None:
    return
  # Changing the injected value equals a step of the solver built with it,
  # from the same params and solver state.
  name, value = case.hyper
  state.hyperparams[name] = jnp.asarray(value, jnp.float32)
  rebuilt = case.factory(**{**kwargs, name: value})
  want, _, _ = _steps(rebuilt, ref, 1, params=got, state=state.inner_state)
  got, _, _ = _steps(injected, ref, 1, params=got, state=state)
  _close(rtol=1e-5)(got, want)


@pytest.mark.parametrize("case", SOLVERS, ids=IDS)
def test_per_level_forwards_value_to_reduce_on_plateau(case):
  ref = _problem(case.problems[0])
  upper = optax.chain(optax.sgd(0.1), optax.contrib.reduce_on_plateau(
      patience=0, factor=0.5, accumulation_size=1))
  tx = case.make(case.problems[0], upper)
  _, state, _ = _steps(tx, ref, 1)
  kind = optax.contrib.ReduceLROnPlateauState
  plateau = [s for s in jax.tree.leaves(
      state, is_leaf=lambda s: isinstance(s, kind)) if isinstance(s, kind)]
  assert len(plateau) == 1
  want = ref.problem.outer_loss(ref.init.upper, ref.init.lower,
                                ref.batches["outer_batch"])
  np.testing.assert_allclose(plateau[0].best_value, want, rtol=1e-6)


@pytest.mark.parametrize("case", SOLVERS, ids=IDS)
def test_donating_step_equals_the_plain_one(case):
  ref = _problem(case.problems[0])
  tx = case.make(case.problems[0], optax.adam(1e-2))
  want, want_state, _ = _steps(tx, ref, 3)
  params = jax.tree.map(jnp.copy, ref.init)
  got, got_state, _ = _steps(tx, ref, 3, params=params, donate=True)
  _assert_equal(got, want)
  _assert_equal(got_state, want_state)


@pytest.mark.parametrize("case", SOLVERS, ids=IDS)
def test_has_aux_losses_give_the_same_step_and_their_aux(case):
  ref = _problem(case.problems[0])
  with_aux = lambda loss: lambda u, l, b: (loss(u, l, b),
                                           {"value": loss(u, l, b)})
  problem = bilevel.Problem(with_aux(ref.problem.outer_loss),
                            with_aux(ref.problem.inner_loss), has_aux=True)
  tx = case.make(case.problems[0])
  step = bilevel.make_step(tx, problem)
  params, _, metrics = step(ref.init, tx.init(ref.init), ref.batches)
  want, _, _ = _steps(tx, ref, 1)
  _close()(params, want)
  np.testing.assert_allclose(
      metrics["aux"]["inner"]["value"],
      ref.problem.inner_loss(params.upper, params.lower,
                             ref.batches["inner_batch"]), rtol=1e-6)


@pytest.mark.parametrize("case", SOLVERS, ids=IDS)
def test_clear_errors_for_bad_params_and_batches(case):
  ref = _problem(case.problems[0])
  tx = case.make(case.problems[0])
  step = bilevel.make_step(tx, ref.problem)
  state = tx.init(ref.init)
  with pytest.raises(TypeError, match="bilevel.Params"):
    step(tuple(ref.init), state, ref.batches)
  misspelt = {"outer_bach": ref.batches["outer_batch"],
              "inner_batch": ref.batches["inner_batch"]}
  with pytest.raises(KeyError, match="did you mean 'outer_batch'"):
    step(ref.init, state, misspelt)
  with pytest.raises(KeyError, match="neither 'outer_batch' nor"):
    step(ref.init, state, {})


@pytest.mark.parametrize("case", SOLVERS, ids=IDS)
def test_meta_gradient_through_steps_matches_finite_differences(case):
  """d/d(upper lr) of F after ``case.meta_steps`` make_step calls, against
  float64 FD."""
  problem_name = case.problems[0]
  with jax.enable_x64(True):
    ref = _problem(problem_name, jnp.float64)

    def final_outer_loss(lr):
      tx = case.make(problem_name, optax.sgd(lr))
      step = bilevel.make_step(tx, ref.problem, jit=False)
      params, state = ref.init, tx.init(ref.init)
      for _ in range(case.meta_steps):
        params, state, _ = step(params, state, ref.batches)
      return ref.problem.outer_loss(params.upper, params.lower,
                                    ref.batches["outer_batch"])

    lr, eps = 0.2, 1e-5
    got = jax.jit(jax.grad(final_outer_loss))(lr)
    fd = (final_outer_loss(lr + eps) - final_outer_loss(lr - eps)) / (2 * eps)
    assert abs(float(fd)) > 1e-6, "the check needs a non-zero derivative"
    np.testing.assert_allclose(got, fd, rtol=1e-5, atol=1e-9)


def test_lbfgs_on_the_upper_level_with_a_value_fn():
  """L-BFGS with its zoom line search inside per_level, on R2's Φ."""
  ref = _problem("r2")
  batches = ref.batches

  def phi(x):
    y = ref.lower_solution(x)
    return ref.problem.outer_loss(x, y, batches["outer_batch"])

  tx = bilevel.implicit(optax.lbfgs(), optax.sgd(0.5), inner_steps=60)
  params, _, _ = _steps(tx, ref, 8, extra_args={
      "value_fn": bilevel.Params(upper=phi, lower=None)})
  x_star = ref.upper_optimum
  error = jnp.linalg.norm(params.upper - x_star) / jnp.linalg.norm(x_star)
  assert error < 1e-4, error
  # Plain gradient descent at the contract's step is far slower.
  slow, _, _ = _steps(bilevel.implicit(optax.sgd(0.3), optax.sgd(0.5), 60),
                      ref, 8)
  assert jnp.linalg.norm(slow.upper - x_star) > 10 * error * jnp.linalg.norm(
      x_star)


def _weighted_regression():
  """Per-example weights σ(u) on a ridge regression; validation MSE."""
  kx, ky, kv, kw = jax.random.split(jax.random.key(3), 4)
  x, xv = jax.random.normal(kx, (12, 3)), jax.random.normal(kv, (8, 3))
  w = jax.random.normal(kw, (3,))
  inner_batch = {"x": x, "y": x @ w + jax.random.normal(ky, (12,))}
  outer_batch = {"x": xv, "y": xv @ w}
  inner = lambda u, v, b: jnp.mean(
      jax.nn.sigmoid(u) * (b["x"] @ v - b["y"]) ** 2) + 0.1 * v @ v
  outer = lambda u, v, b: jnp.mean((b["x"] @ v - b["y"]) ** 2)
  params = bilevel.Params(jnp.zeros(12), jnp.zeros(3))
  return bilevel.Problem(outer, inner), params, outer_batch, inner_batch


@pytest.mark.parametrize("factory", [bilevel.scale_by_implicit,
                                     bilevel.scale_by_unrolled])
def test_mean_over_chunks_gives_the_whole_batch_direction(factory):
  problem, params, outer_batch, inner_batch = _weighted_regression()
  tx = factory(optax.sgd(0.5), 30)
  chunks = jax.tree.map(lambda a: a.reshape(4, 2, *a.shape[1:]), outer_batch)
  whole, _ = tx.update(None, tx.init(params), params,
                       outer_loss=problem.outer_loss,
                       inner_loss=problem.inner_loss,
                       outer_batch=outer_batch, inner_batch=inner_batch)
  chunked, _ = tx.update(None, tx.init(params), params,
                         outer_loss=bilevel.mean_over_chunks(
                             problem.outer_loss),
                         inner_loss=problem.inner_loss,
                         outer_batch=chunks, inner_batch=inner_batch)
  assert float(jnp.linalg.norm(whole.upper)) > 1e-4
  _close(rtol=1e-5, atol=1e-7)(chunked, whole)
  with pytest.raises(ValueError, match="chunk axis"):
    bilevel.mean_over_chunks(problem.outer_loss)(
        params.upper, params.lower, {"x": chunks["x"], "y": outer_batch["y"]})
