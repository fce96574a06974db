"""Tests of the hyper-cleaning task and experiments/evaluation.py."""

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.metrics import roc_auc_score

import bilevel
from experiments import data, evaluation
from experiments.tasks import hyper_cleaning as hc

STEPS = 300
LOWER_OPT = optax.sgd(0.5)


@pytest.fixture(scope="module")
def splits():
  dataset = data.load_dataset("digits")
  return hc.make_noisy_splits(jax.random.key(0), dataset, num_train=600,
                              num_val=300, noise_rate=0.4)


@pytest.fixture(scope="module")
def task(splits):
  return hc.build_task(jax.random.key(1), splits=splits)


# ----------------------------------------------------------------------------
# Metrics.


def _brute_force_auroc(scores, labels):
  pos, neg = scores[labels], scores[~labels]
  wins = sum((p > n) + 0.5 * (p == n) for p, n in itertools.product(pos, neg))
  return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(4))
def test_auroc_matches_pairwise_count_and_sklearn(seed):
  rng = np.random.default_rng(seed)
  scores = rng.integers(0, 6, 60).astype(float)  # Many ties.
  labels = rng.random(60) < 0.3
  got = evaluation.auroc(scores, labels)
  np.testing.assert_allclose(got, _brute_force_auroc(scores, labels),
                             rtol=1e-12)
  np.testing.assert_allclose(got, roc_auc_score(labels, scores), rtol=1e-12)


def test_auroc_extremes_and_errors():
  labels = np.array([True, True, False, False])
  assert evaluation.auroc(np.array([3.0, 2.0, 1.0, 0.0]), labels) == 1.0
  assert evaluation.auroc(np.array([0.0, 1.0, 2.0, 3.0]), labels) == 0.0
  assert evaluation.auroc(np.ones(4), labels) == 0.5
  with pytest.raises(ValueError, match="both classes"):
    evaluation.auroc(np.ones(3), np.ones(3, bool))
  with pytest.raises(ValueError, match=r"\(3,\) and \(4,\)"):
    evaluation.auroc(np.ones(3), labels)


def test_accuracy():
  logits = jnp.array([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
  assert evaluation.accuracy(logits, jnp.array([0, 1, 1])) == pytest.approx(
      2 / 3)
  with pytest.raises(ValueError, match="labels"):
    evaluation.accuracy(logits, jnp.array([0, 1]))


# ----------------------------------------------------------------------------
# The task.


def test_noisy_splits(splits):
  assert splits.flipped.sum() == 240
  np.testing.assert_array_equal(splits.train_y != splits.train_clean_y,
                                splits.flipped)
  assert splits.val_x.shape == (300, 64) and len(splits.test_y) == 297


def test_standardize_features_uses_training_statistics(splits):
  out = hc.standardize_features(splits)
  varying = splits.train_x.std(axis=0) > 0
  np.testing.assert_allclose(out.train_x.mean(axis=0), 0, atol=1e-5)
  np.testing.assert_allclose(out.train_x.std(axis=0)[varying], 1, rtol=1e-3)
  mean, std = splits.train_x.mean(0), splits.train_x.std(0) + 1e-6
  np.testing.assert_allclose(out.test_x, (splits.test_x - mean) / std,
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(out.train_y, splits.train_y)


def test_losses_are_finite_scalars(task, splits):
  params = task.init_params
  assert params.upper.shape == (600,) and params.upper.dtype == jnp.float32
  batches = task.batches(0)
  for loss, batch in ((task.problem.inner_loss, batches["inner_batch"]),
                      (task.problem.outer_loss, batches["outer_batch"])):
    value, grads = jax.value_and_grad(loss, argnums=(0, 1))(
        params.upper, params.lower, batch)
    assert value.shape == () and value.dtype == jnp.float32
    assert np.isfinite(value)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  assert task.problem.constraints is None


def test_minibatches_are_deterministic_and_carry_indices(splits):
  make = lambda: hc.build_task(jax.random.key(1), splits=splits,
                               inner_batch_size=64, outer_batch_size=32)
  task_a, task_b = make(), make()
  first = task_a.batches(17)
  task_a.batches(3)
  again = task_b.batches(17)
  chex.assert_trees_all_equal(first, again)
  inner = first["inner_batch"]
  assert inner["x"].shape == (64, 64) and first["outer_batch"]["y"].shape == (
      32,)
  index = np.asarray(inner["index"])
  np.testing.assert_array_equal(inner["x"], splits.train_x[index])
  np.testing.assert_array_equal(inner["y"], splits.train_y[index])
  loss = task_a.problem.inner_loss(*task_a.init_params, inner)
  assert np.isfinite(loss)


def test_evaluate_at_init(task):
  metrics = task.evaluate(task.init_params)
  assert set(metrics) == {"test_accuracy", "val_accuracy", "auroc",
                          "weights_clean_mean", "weights_flipped_mean"}
  assert all(isinstance(v, float) for v in metrics.values())
  assert metrics["auroc"] == 0.5 and metrics["weights_clean_mean"] == 0.5


def test_oracle_weights_beat_uniform_weights(task, splits):
  oracle = jnp.where(jnp.asarray(splits.flipped), -30.0, 30.0)
  uniform = jnp.full_like(oracle, 30.0)
  results = {}
  for name, upper in (("oracle", oracle), ("uniform", uniform)):
    lower = hc.solve_lower(task, upper, optimizer=LOWER_OPT, steps=STEPS)
    results[name] = task.evaluate(bilevel.Params(upper, lower))
  assert results["oracle"]["auroc"] == 1.0
  assert results["oracle"]["weights_flipped_mean"] < 1e-6
  assert (results["oracle"]["test_accuracy"]
          > results["uniform"]["test_accuracy"] + 0.03)


def test_baselines_clean_beats_noisy(splits):
  results = hc.train_baselines(jax.random.key(1), splits, steps=STEPS,
                               optimizer=LOWER_OPT)
  assert set(results) == {"clean_test_accuracy", "noisy_test_accuracy"}
  assert results["clean_test_accuracy"] > 0.9
  assert results["clean_test_accuracy"] > results["noisy_test_accuracy"]


def test_runs_under_make_step(task):
  tx = bilevel.per_level(optax.adam(0.1), optax.sgd(0.1))
  step = bilevel.make_step(tx, task.problem)
  params, state = task.init_params, tx.init(task.init_params)
  for s in range(2):
    params, state, metrics = step(params, state, task.batches(s))
  assert np.isfinite(metrics["outer_loss"])
  assert jax.tree.structure(params) == jax.tree.structure(task.init_params)
