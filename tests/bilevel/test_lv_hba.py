"""LV-HBA on closed-form constrained problems (R7 and two projections).

The contract checks (jit, dtypes, sharding, checkpoints, R1/R2) are in
``test_contract.py``; here: the coupled-equality toy at the official fork's
settings, recovery of known solutions and multipliers, diagnostics, errors.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bilevel
from bilevel import reference_problems

# PerryChuh/LV-HBA `Toy-example/LLC/LV-HBA-new.py` (reference/
# bilevel_methods.md §2.4), z kept in [0, 1] as there.
R7_SETTINGS = dict(alpha=0.005, beta=0.002, eta=0.03, gamma1=10.0,
                   gamma2=10.0, c=1.0, p=0.3, equality=True,
                   multiplier_radius=1.0, z_radius=1.0, z_lower=0.0)
# Closed-form problems: ‖a‖ = 1, so the (θ, λ) saddle step is stable for
# η ≤ 0.5; c = 30 keeps the O(1/c_k) penalty bias under 1 %.
PROJECTION_SETTINGS = dict(alpha=0.5, beta=0.5, eta=0.5, gamma1=3.0,
                           gamma2=3.0, c=30.0, p=0.3, multiplier_radius=10.0,
                           z_radius=10.0)


@functools.partial(jax.jit, static_argnums=(0, 1, 4))
def _run(tx, problem, params, batches, steps):
  """``steps`` LV-HBA steps in one scan; per-step (gap, violation, ‖λ‖)."""
  step = bilevel.make_step(tx, problem, jit=False)

  def body(carry, _):
    params, state = carry
    params, state, _ = step(params, state, batches)
    lv = state[0]
    return (params, state), (lv.lower_gap, lv.constraint_violation,
                             lv.multiplier_norm)

  (params, state), trace = jax.lax.scan(
      body, (params, tx.init(params)), None, length=steps)
  return params, state[0], trace


def _relative_error(x, x_star):
  return float(jnp.linalg.norm(x - x_star) / jnp.linalg.norm(x_star))


@pytest.fixture(scope="module")
def r7_run():
  ref = reference_problems.r7()
  tx = bilevel.lv_hba(1, **R7_SETTINGS,
                      project_joint=reference_problems.r7_projection)
  return ref, _run(tx, ref.problem, ref.init, ref.batches, 50_000)


def test_r7_reaches_the_optimum_at_the_fork_settings(r7_run):
  ref, (params, state, _) = r7_run
  assert _relative_error(params.upper, ref.upper_optimum) < 0.02
  y1, y2 = params.lower
  np.testing.assert_allclose(jnp.mean(y1), 0.7, rtol=0.02)
  np.testing.assert_allclose(jnp.mean(y2), -0.4, rtol=0.02)
  # F approaches F* = 5 from below: y is still slightly off S(x).
  np.testing.assert_allclose(
      ref.problem.outer_loss(params.upper, params.lower, None), 5.0, rtol=0.05)
  # The lower level's KKT multiplier is −1, the end of the box.
  np.testing.assert_allclose(state.lam, [-1.0], atol=1e-3)


def test_r7_diagnostics_shrink(r7_run):
  _, (_, _, (gap, violation, _)) = r7_run
  assert violation[0] > 1e3  # init 10·1 is far from 1ᵀx + 1ᵀy = 0.
  assert violation[-1] < 1e-3 * violation[0]
  assert abs(gap[-1]) < 1e-2 * abs(gap[0])


def _closed_form(name):
  key = jax.random.key(0)
  if name == "coupled_equality":
    ref = reference_problems.coupled_equality(key)
    return (ref, reference_problems.coupled_equality_projection,
            reference_problems.coupled_equality_multiplier, True)
  ref = reference_problems.halfspace(key)
  return (ref, reference_problems.halfspace_projection,
          reference_problems.halfspace_multiplier, False)


@pytest.mark.parametrize("name", ["coupled_equality", "halfspace"])
def test_reaches_known_solution_and_multiplier(name):
  ref, projection, multiplier, equality = _closed_form(name)
  inner = ref.batches["inner_batch"]
  tx = bilevel.lv_hba(1, **PROJECTION_SETTINGS, equality=equality,
                      project_joint=projection(inner))
  params, state, (gap, violation, _) = _run(
      tx, ref.problem, ref.init, ref.batches, 20_000)
  x_star = ref.upper_optimum
  lam_star = multiplier(inner, x_star)
  assert abs(lam_star[0]) > 0.1  # the constraint matters at the optimum.
  assert _relative_error(params.upper, x_star) < 0.01
  assert _relative_error(params.lower, ref.lower_solution(x_star)) < 0.01
  np.testing.assert_allclose(state.lam, lam_star, atol=5e-3)
  np.testing.assert_allclose(state.z, lam_star, atol=5e-3)
  assert violation[-1] < 1e-5
  assert abs(gap[-1]) < 1e-2 * abs(gap[0])


def _r7_numpy(n, steps, s):
  """The fork's loop (vectors, z updated as in the paper), in float64."""
  x = y1 = y2 = np.full(n, 10.0)
  theta1 = theta2 = np.full(n, 10.0)
  lam, z = 0.0, 0.0
  for k in range(steps):
    c_k = s["c"] * (k + 1) ** s["p"]
    g = x.sum() + theta1.sum() + theta2.sum()
    d_lam = -g + (lam - z) / s["gamma2"]
    theta1, theta2 = (
        theta1 - s["eta"] * (theta1 - x + lam + (theta1 - y1) / s["gamma1"]),
        theta2 - s["eta"] * (1 + lam + (theta2 - y2) / s["gamma1"]))
    lam = np.clip(lam - s["eta"] * d_lam, -1.0, 1.0)
    d_x = (x - y2) / c_k - y1 + theta1 - lam
    d_y1 = (y1 - 1) / c_k + y1 - x - (y1 - theta1) / s["gamma1"]
    d_y2 = (y2 - x) / c_k + 1 - (y2 - theta2) / s["gamma1"]
    w = np.concatenate([x, y1, y2]) - s["alpha"] * np.concatenate(
        [d_x, d_y1, d_y2])
    x, y1, y2 = np.split(w - w.mean(), 3)
    z = np.clip(z + s["beta"] * (lam - z) / s["gamma2"], 0.0, 1.0)
  return x, y1, y2, lam, z


def test_follows_the_equations_step_by_step():
  n, steps = 4, 30
  ref = reference_problems.r7(n)
  tx = bilevel.lv_hba(1, **R7_SETTINGS,
                      project_joint=reference_problems.r7_projection)
  with jax.enable_x64(True):
    init = jax.tree.map(lambda a: a.astype(jnp.float64), ref.init)
    params, state, _ = _run(tx, ref.problem, init, ref.batches, steps)
  x, y1, y2, lam, z = _r7_numpy(n, steps, R7_SETTINGS)
  np.testing.assert_allclose(params.upper, x, rtol=1e-6)
  np.testing.assert_allclose(params.lower[0], y1, rtol=1e-6)
  np.testing.assert_allclose(params.lower[1], y2, rtol=1e-6)
  np.testing.assert_allclose(state.lam, [lam], rtol=1e-5)
  np.testing.assert_allclose(state.z, [z], rtol=1e-5)


@pytest.mark.parametrize("missing", ["inner_loss", "constraints"])
def test_missing_extra_args_raise(missing):
  ref = reference_problems.r7(3)
  tx = bilevel.scale_by_lv_hba(1, eta=0.1, beta=0.1, gamma1=1.0, gamma2=1.0)
  extra = dict(inner_loss=ref.problem.inner_loss,
               constraints=ref.problem.constraints)
  del extra[missing]
  with pytest.raises(TypeError, match=missing):
    tx.update(ref.init, tx.init(ref.init), ref.init, **extra)


def test_constraints_of_the_wrong_length_raise():
  ref = reference_problems.r7(3)
  tx = bilevel.scale_by_lv_hba(2, eta=0.1, beta=0.1, gamma1=1.0, gamma2=1.0)
  with pytest.raises(ValueError, match="num_constraints=2"):
    tx.update(ref.init, tx.init(ref.init), ref.init,
              inner_loss=ref.problem.inner_loss,
              constraints=ref.problem.constraints)


def test_project_params_lands_on_the_projection():
  params = bilevel.Params(jnp.arange(3.0), (jnp.ones(3), -jnp.ones(3)))
  updates = bilevel.Params(jnp.ones(3), (jnp.zeros(3), jnp.full(3, 2.0)))
  tx = bilevel.project_params(reference_problems.r7_projection)
  projected, _ = tx.update(updates, tx.init(params), params)
  got = optax.apply_updates(params, projected)
  expected = reference_problems.r7_projection(
      optax.apply_updates(params, updates))
  jax.tree.map(np.testing.assert_allclose, got, expected)
  np.testing.assert_allclose(sum(jnp.sum(l) for l in jax.tree.leaves(got)),
                             0.0, atol=1e-5)
