"""The ScaleBiO data-reweighting pipeline, its corpus and its baselines."""

import json
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import bilevel
from experiments import train
from experiments.configs import scalebio_lm
from experiments.task import Pipeline, Stage
from experiments.tasks import data_reweighting, source_corpus, source_selection

_SMALL = dict(max_bytes=300_000, levels=(0.0, 0.5, 1.0), num_noise=1,
              seed=0)


@pytest.fixture(scope="module")
def corpus():
  return source_corpus.build_source_corpus(**_SMALL)


def test_source_logits_and_weight_metrics(corpus):
  np.testing.assert_array_equal(
      data_reweighting.source_logits(corpus, "clean"), [0, -30, -30, -30])
  np.testing.assert_array_equal(
      data_reweighting.source_logits(corpus, "1,3"), [-30, 0, -30, 0])
  with pytest.raises(ValueError, match="reweight.sources"):
    data_reweighting.source_logits(corpus, "0,9")
  metrics = data_reweighting.weight_metrics(corpus,
                                            jnp.log(jnp.asarray(
                                                [0.5, 0.3, 0.15, 0.05])))
  assert metrics["ladder_spearman"] == pytest.approx(-1.0)
  assert metrics["noise_weight_max"] == pytest.approx(0.05, rel=1e-5)
  assert data_reweighting.spearman([1, 2, 3, 4], [1, 3, 2, 4]) == (
      pytest.approx(0.8))


def test_forward_selection_finds_the_best_subset():
  # Loss of a set: sources 2 and 0 help, the others hurt.
  value = {0: -1.0, 1: 0.5, 2: -2.0, 3: 0.1}
  result = source_selection.forward_selection(
      lambda chosen: sum(value[s] for s in chosen), 4)
  assert result.selected == (2, 0) and result.best_loss == -3.0
  assert len(result.rounds) == 3 and result.rounds[0] == value


def _toy_pipeline(record):
  """Stage ``a`` moves x towards 1; stage ``b`` fits y to data made from
  ``a``'s result (``batches_from``)."""
  loss = lambda u, l, b: 0.5 * jnp.sum((l - b["target"]) ** 2)
  problem = bilevel.Problem(loss, loss)
  sgd = bilevel.per_level(optax.set_to_zero(), optax.sgd(0.5))
  init = lambda finals: bilevel.Params({}, jnp.zeros([2]))

  def batches_from(finals):
    record.append(np.asarray(finals["a"].lower))
    target = 2.0 * finals["a"].lower
    return lambda step: {"outer_batch": {"target": target + step}}

  a = Stage("a", sgd, problem, init,
            lambda step: {"outer_batch": {"target": jnp.ones([2])}}, 3)
  b = Stage("b", sgd, problem, init, None, 4,
            evaluate=lambda p: {"y0": float(p.lower[0])},
            batches_from=batches_from)
  return Pipeline(init({}), [a, b])


def test_batches_from_earlier_stages_replay_on_resume(tmp_path):
  config = ml_collections.ConfigDict(dict(train=dict(
      max_to_keep=2, log_every=2, checkpoint_every=2)))
  record = []
  first = train._run_pipeline(config, _toy_pipeline(record), tmp_path,
                              jax.random.key(0))
  shutil.rmtree(tmp_path / "b")
  again = train._run_pipeline(config, _toy_pipeline(record), tmp_path,
                              jax.random.key(0))
  assert again == first
  # Stage a (restored, not rerun) handed b the same result both times.
  np.testing.assert_array_equal(record[0], record[1])
  np.testing.assert_allclose(record[0], 1 - 0.5 ** 3)


def test_smoke_pipeline(tmp_path):
  config = scalebio_lm.get_config("smoke")
  results = train.train_and_evaluate(config, tmp_path)
  stages = json.loads((tmp_path / "stages.json").read_text())
  assert set(stages) == {"weights", "resampled_uniform", "resampled"}
  weights = [v for k, v in stages["weights"].items()
             if k.startswith("weight/")]
  assert len(weights) == 8 and sum(weights) == pytest.approx(1.0, abs=1e-5)
  assert results["test_loss"] == stages["resampled"]["test_loss"]
  assert results["steps/scalebio"] == 4 and results["steps/train"] == 8
  # --mode=eval restores the last stage and scores it the same.
  restored = train.evaluate(config, tmp_path)
  assert restored["test_loss"] == pytest.approx(results["test_loss"],
                                                rel=1e-6)
