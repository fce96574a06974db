"""The ScaleBiO data-reweighting pipeline, its corpus and its baselines."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import train
from experiments.configs import scalebio_lm
from experiments.tasks import data_reweighting, source_corpus
from experiments.tasks import source_selection

_SMALL = dict(max_bytes=1_000_000, levels=(0.0, 0.5, 1.0), num_noise=1,
              seed=0)


@pytest.fixture(scope="module")
def corpus():
  return source_corpus.build_source_corpus(**_SMALL)


def test_corruption_ladder_is_exact_and_seeded(corpus):
  clean = corpus.sources[0]
  assert corpus.names == ("corrupt_0", "corrupt_0.5", "corrupt_1",
                          "noise_0")
  for source, level in zip(corpus.sources[:3], (0.0, 0.5, 1.0)):
    assert source.size == clean.size and 0 not in set(
        np.unique(source[clean != 0]))
    # Replacements are uniform in [1, 255]: a replaced byte keeps its value
    # with probability 1/255, so the changed fraction is c·254/255.
    changed = np.mean(source != clean)
    np.testing.assert_allclose(changed, level * 254 / 255, atol=3e-3)
  assert np.array_equal(clean, source_corpus.build_source_corpus(
      **{**_SMALL, "seed": 1}).sources[0])  # the clean copy is the prose
  other = source_corpus.build_source_corpus(**{**_SMALL, "seed": 1})
  assert np.mean(other.sources[1] != corpus.sources[1]) > 0.3
  rebuilt = source_corpus.corrupt(clean, 0.5, np.random.default_rng((0, 1)))
  np.testing.assert_array_equal(rebuilt, corpus.sources[1])
  noise = corpus.sources[3]
  assert noise.min() >= 1 and abs(noise.mean() - 128) < 1.0


def test_held_out_prose_is_from_other_files(corpus):
  for part in (corpus.validation, corpus.test):
    assert part.size > 1000
    # Every docstring of a held-out part is absent from the training prose
    # (files are disjoint; identical docstrings in two files are rare).
    docs = bytes(part).split(b"\0")
    long_docs = [d for d in docs if len(d) > 200][:20]
    train = bytes(corpus.sources[0])
    assert long_docs and sum(d in train for d in long_docs) <= 2


def test_stratified_batches(corpus):
  batch_fn = source_corpus.source_batches(jax.random.key(0), corpus.sources,
                                          8, 16)
  batch = batch_fn(5)
  np.testing.assert_array_equal(batch["source"], np.repeat(np.arange(4), 2))
  for row, source in zip(np.asarray(batch["tokens"]), batch["source"]):
    haystack = bytes(corpus.sources[int(source)])
    assert bytes(row.astype(np.uint8)) in haystack
  np.testing.assert_array_equal(batch_fn(5)["tokens"], batch["tokens"])
  assert np.any(batch_fn(6)["tokens"] != batch["tokens"])
  with pytest.raises(ValueError, match="multiple of the number of sources"):
    source_corpus.source_batches(jax.random.key(0), corpus.sources, 6, 16)


def test_resample_counts_largest_remainder():
  np.testing.assert_array_equal(
      source_corpus.resample_counts([0.5, 0.3, 0.2], 7), [4, 2, 1])
  np.testing.assert_array_equal(
      source_corpus.resample_counts([1, 1, 1], 10), [4, 3, 3])
  assert source_corpus.resample_counts(np.random.rand(8), 1001).sum() == 1001
  for bad in ([-1.0, 2.0], [0.0, 0.0], [np.nan, 1.0]):
    with pytest.raises(ValueError, match="non-negative weights"):
      source_corpus.resample_counts(bad, 10)


def test_fixed_set_epochs_visit_every_window_once(corpus):
  fixed = source_corpus.resampled_training_set(
      jax.random.key(1), corpus.sources, [3, 1, 0, 0], 20, 16)
  np.testing.assert_array_equal(np.bincount(fixed["source"], minlength=4),
                                [15, 5, 0, 0])
  ids = {"tokens": fixed["tokens"], "source": np.arange(20)}
  batches = source_corpus.fixed_set_batches(jax.random.key(2), ids, 8)
  seen = np.concatenate([np.asarray(batches(s)["source"]) for s in range(5)])
  # 40 items = two epochs; batch 2 spans the boundary.
  assert sorted(seen[:20]) == list(range(20)) == sorted(seen[20:])
  assert list(seen[:20]) != list(seen[20:])


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


def test_smoke_pipeline_resumes_a_resampled_stage(tmp_path):
  """A stage whose data come from earlier stages replays them on resume."""
  config = scalebio_lm.get_config("smoke")
  train.train_and_evaluate(config, tmp_path)
  stages = json.loads((tmp_path / "stages.json").read_text())
  assert set(stages) == {"weights", "resampled_uniform", "resampled"}
  weights = [v for k, v in stages["weights"].items()
             if k.startswith("weight/")]
  assert len(weights) == 8 and sum(weights) == pytest.approx(1.0, abs=1e-5)
  shutil.rmtree(tmp_path / "resampled")
  train.train_and_evaluate(config, tmp_path)
  again = json.loads((tmp_path / "stages.json").read_text())
  assert again == stages
