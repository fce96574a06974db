"""The SVM experiments: experiments/tasks/svm{,_problem,_solvers}.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bilevel
from experiments.configs import lv_hba_svm
from experiments.tasks import svm, svm_problem, svm_solvers


@pytest.fixture(scope="module")
def data():
  return svm.make_data(jax.random.key(0), "breast_cancer", num_train=100,
                       num_val=60, num_test=80, noise_rate=0.4)


@pytest.fixture(scope="module")
def batch(data):
  return {"x": jnp.asarray(data.train_x), "y": jnp.asarray(data.train_y)}


def test_label_flipping_counts(data):
  assert data.flipped.sum() == 40
  np.testing.assert_array_equal(data.train_y != data.train_clean_y,
                                data.flipped)
  np.testing.assert_array_equal(data.train_y[data.flipped],
                                -data.train_clean_y[data.flipped])
  assert set(np.unique(data.val_y)) == {-1.0, 1.0}
  np.testing.assert_allclose(data.train_x.mean(0), 0.0, atol=1e-5)


def test_constraints_sign_and_shape(batch):
  c = jnp.zeros(100)
  lower = {"w": jnp.ones(30), "b": jnp.zeros([]), "xi": jnp.zeros(100)}
  g = svm_problem.constraints(c, lower, batch)
  assert g.shape == (100,)
  feasible = {**lower, "xi": svm_solvers.optimal_slacks(lower, batch)}
  assert jnp.all(svm_problem.constraints(c, feasible, batch) <= 1e-6)
  # A point with a violated margin and zero slack is infeasible (g > 0).
  m = svm_problem.margins(lower, batch["x"], batch["y"])
  np.testing.assert_array_equal(g > 0, m < 1)


def test_constrained_and_relaxed_lower_levels_agree(batch):
  c = jax.random.uniform(jax.random.key(1), (100,), minval=-3, maxval=0)
  lower = svm_solvers.solve_relaxed(
      c, {"w": jnp.zeros(30), "b": jnp.zeros([])}, batch, num_iters=30)
  grad = jax.grad(svm_problem.relaxed_inner_loss, argnums=1)(c, lower, batch)
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grad)) < 1e-4
  xi = svm_solvers.optimal_slacks(lower, batch)
  full = {**lower, "xi": xi}
  np.testing.assert_allclose(
      svm_problem.constrained_inner_loss(c, full, batch),
      svm_problem.relaxed_inner_loss(c, lower, batch), rtol=1e-6)
  # KKT of the constrained form: λ = e^c ξ ≥ 0 and ∇_w(½‖w‖²) = Σ λᵢyᵢzᵢ.
  lam = jnp.exp(c) * xi
  np.testing.assert_allclose(lower["w"], batch["x"].T @ (lam * batch["y"]),
                             atol=1e-4)
  np.testing.assert_allclose(jnp.sum(lam * batch["y"]), 0.0, atol=1e-4)


def test_projections_are_feasible(batch):
  lower = {"w": 0.1 * jnp.ones(30), "b": jnp.zeros([]), "xi": jnp.zeros(100)}
  dykstra = lambda l, b: svm_solvers.project_margins(l, b, num_iters=20_000)
  for project in (svm_solvers.restore_feasibility, dykstra,
                  svm_solvers.project_margins_exact):
    out = project(lower, batch)
    assert jnp.max(svm_problem.constraints(None, out, batch)) < 1e-3


def test_exact_projection_is_nearest(batch):
  key_w, key_xi = jax.random.split(jax.random.key(1))
  lower = {"w": 0.3 * jax.random.normal(key_w, (30,)), "b": jnp.array(0.2),
           "xi": 0.5 * jax.random.normal(key_xi, (100,))}
  dist = lambda p: sum(jnp.sum((p[k] - lower[k]) ** 2) for k in lower)
  exact = svm_solvers.project_margins_exact(lower, batch)
  assert jnp.max(svm_problem.constraints(None, exact, batch)) < 1e-5
  # No farther than the feasible point of the ξ-only projection, and
  # stationary: the reduced objective's gradient vanishes.
  nearest_xi = svm_solvers.restore_feasibility(lower, batch)
  assert dist(exact) <= dist(nearest_xi) + 1e-6
  z = jnp.concatenate([batch["x"], jnp.ones_like(batch["x"][:, :1])], 1)
  z = z * batch["y"][:, None]
  v = jnp.concatenate([exact["w"], exact["b"][None]])
  v0 = jnp.concatenate([lower["w"], lower["b"][None]])
  grad = v - v0 - z.T @ jax.nn.relu(1.0 - lower["xi"] - z @ v)
  assert jnp.linalg.norm(grad) < 1e-4


@pytest.mark.parametrize("variant", ["smoke", "smoke,implicit"])
def test_smoke_steps_are_finite(variant):
  config = lv_hba_svm.get_config(variant + ",cleaning")
  config.data.num_train, config.data.num_val = 100, 60
  config.data.num_test = 80
  task = svm.task_from_config(config, jax.random.key(0))
  tx = svm.solver_from_config(config.solver)
  step = bilevel.make_step(tx, task.problem)
  params, state = task.init_params, tx.init(task.init_params)
  for i in range(config.train.num_steps):
    params, state, metrics = step(params, state, task.batches(i))
  assert all(jnp.all(jnp.isfinite(l)) for l in jax.tree.leaves(params))
  assert jnp.isfinite(metrics["outer_loss"])
  results = task.evaluate(params)
  assert 0.5 < results["test_accuracy"] <= 1.0
