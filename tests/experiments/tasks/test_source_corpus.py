"""The multi-source reweighting corpus: prose, ladder, batches, resampling."""

import ast
import os

import jax
import numpy as np
import pytest

from experiments.tasks import source_corpus as sc
from experiments.tasks import text_corpus

SMALL = 300_000  # bytes of prose of the smoke corpus
K = len(sc.DEFAULT_LEVELS) + 2


@pytest.fixture(scope="module")
def prose():
  return sc.prose_splits(max_bytes=SMALL)


@pytest.fixture(scope="module")
def corpus():
  return sc.build_source_corpus(max_bytes=SMALL)


def _documents(split: np.ndarray) -> list[bytes]:
  docs = split.tobytes().split(b"\0")
  assert docs[-1] == b""  # every document ends with the separator
  return docs[:-1]


def _walk_docstrings(path: str) -> list[bytes]:
  """The truth by another route: ``ast.walk`` (breadth first), unordered."""
  with open(path, "rb") as f:
    tree = ast.parse(f.read())
  docs = (ast.get_docstring(n) for n in ast.walk(tree)
          if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef,
                            ast.AsyncFunctionDef)))
  return [d.encode("utf-8", "backslashreplace") for d in docs
          if d and "\0" not in d]


def _contains(source: np.ndarray, row) -> bool:
  return bytes(np.asarray(row, np.uint8)) in source.tobytes()


# Prose.


def test_docstrings_in_source_order_and_unparsable_files_skipped():
  source = (b'"""Module."""\nimport os\n\nclass A:\n  """Class A.\n\n'
            b'  More."""\n  def f(self):\n    """F."""\n    def g():\n'
            b'      """G \xc3\xa9."""\n\nasync def h():\n  """H."""\n'
            b'def e():\n  """"""\n  x = 1\n')
  assert sc.docstrings(source) == [b"Module.", b"Class A.\n\nMore.", b"F.",
                                   "G \u00e9.".encode(), b"H."]
  assert sc.docstrings(b"def broken(:\n") is None
  assert sc.docstrings(b"x = 1\n") == []


def test_prose_splits_are_disjoint_by_file_and_hold_the_docstrings(prose):
  files = prose.train_files, prose.validation_files, prose.test_files
  assert all(files)
  assert sum(map(len, files)) == len(set().union(*files))
  root = text_corpus.stdlib_dir()
  kept = sorted(set().union(*files))
  listed = text_corpus.source_files(root)
  for path in set(listed[:listed.index(kept[-1]) + 1]) - set(kept):
    with pytest.raises((SyntaxError, ValueError)):  # only unparsable gaps
      _walk_docstrings(os.path.join(root, path))
  for path in prose.train_files:
    assert text_corpus.file_fraction(path) >= 0.2
  for path in prose.validation_files:
    assert text_corpus.file_fraction(path) < 0.1
  for path in prose.test_files:
    assert 0.1 <= text_corpus.file_fraction(path) < 0.2
  for split, names in ((prose.validation, prose.validation_files),
                       (prose.test, prose.test_files)):
    expected = [d for p in names
                for d in _walk_docstrings(os.path.join(root, p))]
    assert sorted(_documents(split)) == sorted(expected)
    assert not split.flags.writeable
  total = sum(len(s) for s in prose[:3])
  assert total <= SMALL


def test_prose_is_capped_by_a_prefix_and_empty_splits_are_refused(tmp_path):
  for i in range(6):
    (tmp_path / f"mod_{i}.py").write_text(f'"""Doc {i}."""\nx = 1\n')
  (tmp_path / "bad.py").write_text("def (:\n")
  splits = sc.prose_splits(str(tmp_path), max_bytes=10**6, val_fraction=0.3,
                           test_fraction=0.3)
  names = splits.train_files + splits.validation_files + splits.test_files
  assert sorted(names) == [f"mod_{i}.py" for i in range(6)]  # not bad.py
  for name, split in ((n, s) for s, files in enumerate(splits[3:6])
                      for n in files):
    u = text_corpus.file_fraction(name)
    assert split == (1 if u < 0.3 else 2 if u < 0.6 else 0)
    doc = f"Doc {name[4]}.\0".encode()
    assert doc in splits[split].tobytes()
  # 7 bytes a file: a cap of 15 keeps mod_0 (train) and mod_1 (validation).
  two = r"gives \{'train': 1, 'validation': 1, 'test': 0\}.*raise max_bytes"
  with pytest.raises(ValueError, match=two):
    sc.prose_splits(str(tmp_path), max_bytes=15, val_fraction=0.3,
                    test_fraction=0.3)
  with pytest.raises(ValueError, match=r"'validation': 0.*raise max_bytes"):
    sc.build_source_corpus(str(tmp_path), max_bytes=10)
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="no .py files"):
    sc.prose_splits(str(tmp_path / "empty"), max_bytes=10)


# The ladder and the noise.


def test_ladder_replaces_exactly_round_c_n_bytes(prose):
  clean = prose.train
  n = clean.size
  for index, level in enumerate(sc.DEFAULT_LEVELS):
    copy, positions = sc.corrupt(clean, level, 3, index)
    k = round(level * n)
    assert positions.size == np.unique(positions).size == k
    mask = np.zeros(n, bool)
    mask[positions] = True
    np.testing.assert_array_equal(copy[~mask], clean[~mask])
    assert np.all(copy[mask] != 0)
    differ = copy != clean
    assert not np.any(differ & ~mask)
    # A replacement equals a non-separator original with chance 1/255.
    same = k - differ.sum()
    mean, sd = k / 255, np.sqrt(k / 255)
    separators = np.sum(clean == 0)
    assert (k - separators) / 255 - 6 * sd - 1 <= same <= mean + 6 * sd + 1


def test_corpus_sources_names_and_no_new_separators(corpus, prose):
  assert len(corpus.sources) == K
  assert corpus.names == ("corrupt_0.0", "corrupt_0.2", "corrupt_0.4",
                          "corrupt_0.6", "corrupt_0.8", "corrupt_1.0",
                          "noise_0", "noise_1")
  assert corpus.corruption == sc.DEFAULT_LEVELS + (1.0, 1.0)
  np.testing.assert_array_equal(corpus.sources[0], prose.train)
  np.testing.assert_array_equal(corpus.validation, prose.validation)
  np.testing.assert_array_equal(corpus.test, prose.test)
  clean_zero = prose.train == 0
  for source in corpus.sources:
    assert source.dtype == np.uint8 and source.size == prose.train.size
    assert not source.flags.writeable
    assert not np.any((source == 0) & ~clean_zero)
  assert not np.any(corpus.sources[5] == 0)  # c = 1 replaces the separators
  for source in corpus.sources[-2:]:
    assert source.min() == 1 and source.max() == 255
  assert not np.array_equal(corpus.sources[-1], corpus.sources[-2])


def test_seed_reproducibility_and_sensitivity(corpus, prose):
  copy, positions = sc.corrupt(prose.train, 0.4, 0, 2)
  np.testing.assert_array_equal(corpus.sources[2], copy)
  again, again_positions = sc.corrupt(prose.train, 0.4, 0, 2)
  np.testing.assert_array_equal(copy, again)
  np.testing.assert_array_equal(positions, again_positions)
  other = sc.build_source_corpus(max_bytes=SMALL, seed=1)
  np.testing.assert_array_equal(other.sources[0], corpus.sources[0])
  for a, b in zip(corpus.sources[1:], other.sources[1:]):
    assert np.mean(a != b) > 0.1
  assert other.fingerprint != corpus.fingerprint
  rebuilt = sc._build.__wrapped__(None, SMALL, sc.DEFAULT_LEVELS, 2, 0, 0.1,
                                  0.1)
  assert rebuilt.fingerprint == corpus.fingerprint
  for a, b in zip(rebuilt.sources, corpus.sources):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kwargs, match", [
    ({"levels": (0.0, 1.5)}, r"\[0, 1\].*1\.5"),
    ({"levels": (-0.1,)}, r"\[0, 1\]"),
    ({"levels": (0.0, float("nan"))}, r"\[0, 1\]"),
    ({"levels": (0.0, 0.2, 0.2)}, r"distinct.*0\.2"),
    ({"num_noise": -1}, "num_noise"),
    ({"levels": (), "num_noise": 0}, "at least one source"),
    ({"val_fraction": 0.6, "test_fraction": 0.5}, "val_fraction"),
])
def test_bad_corpus_arguments_are_refused(kwargs, match):
  with pytest.raises(ValueError, match=match):
    sc.build_source_corpus(max_bytes=SMALL, **kwargs)


# Batches.


def test_stratified_batches_hold_b_over_k_real_windows_per_source(corpus):
  batch = sc.source_batches(jax.random.key(0), corpus.sources, 16, 24)
  out = jax.tree.map(np.asarray, batch(5))
  assert out["tokens"].shape == (16, 25) and out["tokens"].dtype == np.int32
  np.testing.assert_array_equal(out["source"], np.repeat(np.arange(K), 2))
  for row, s in zip(out["tokens"], out["source"]):
    assert _contains(corpus.sources[s], row)
  np.testing.assert_array_equal(out["tokens"], np.asarray(batch(5)["tokens"]))
  assert not np.array_equal(out["tokens"], np.asarray(batch(6)["tokens"]))
  with pytest.raises(ValueError, match=r"batch_size=12.*K=8"):
    sc.source_batches(jax.random.key(0), corpus.sources, 12, 24)


def test_sources_of_different_lengths_keep_every_window():
  # Distinct byte values per position, so a window fixes its start.
  sources = [np.arange(1, n + 1, dtype=np.uint8) for n in (12, 40, 200)]
  seq_len = 8
  batch = sc.source_batches(jax.random.key(1), sources, 6, seq_len)
  starts = [set() for _ in sources]
  for step in range(40):
    out = jax.tree.map(np.asarray, batch(step))
    for row, s in zip(out["tokens"], out["source"]):
      assert _contains(sources[s], row)
      starts[s].add(int(row[0]) - 1)
  assert starts[0] == set(range(12 - seq_len))  # all 4, the last included
  assert max(starts[2]) <= 200 - seq_len - 1 and len(starts[2]) > 40
  with pytest.raises(ValueError, match="source 0"):
    sc.source_batches(jax.random.key(1), sources, 6, 12)


def test_weighted_batches_follow_the_weights():
  sources = [np.arange(1, 101, dtype=np.uint8),
             np.arange(101, 201, dtype=np.uint8)]
  batch = sc.weighted_batches(jax.random.key(2), sources, [1.0, 3.0], 64, 4)
  drawn = np.concatenate([np.asarray(batch(t)["source"]) for t in range(20)])
  assert abs(np.mean(drawn == 1) - 0.75) < 0.05  # 1280 draws: sd 0.012
  out = jax.tree.map(np.asarray, batch(3))
  for row, s in zip(out["tokens"], out["source"]):
    assert _contains(sources[s], row)
  np.testing.assert_array_equal(out["tokens"], np.asarray(batch(3)["tokens"]))
  only = sc.weighted_batches(jax.random.key(2), sources, [0, 2], 16, 4)
  assert np.all(np.asarray(only(0)["source"]) == 1)


# Resampling.


@pytest.mark.parametrize("weights, budget, counts", [
    ([0.5, 0.3, 0.2], 7, [4, 2, 1]),  # quotas 3.5 2.1 1.4
    ([2, 1, 1], 10, [5, 3, 2]),  # quotas 5 2.5 2.5: the tie to index 1
    ([1, 1, 1], 10, [4, 3, 3]),
    ([0, 1], 5, [0, 5]),
    ([0.45, 0.35, 0.2], 11, [5, 4, 2]),  # quotas 4.95 3.85 2.2
    ([1, 1, 1, 1], 0, [0, 0, 0, 0]),
])
def test_resample_counts_by_hand(weights, budget, counts):
  np.testing.assert_array_equal(sc.resample_counts(weights, budget), counts)


def test_resample_counts_sum_to_the_budget():
  rng = np.random.default_rng(0)
  for _ in range(200):
    weights = rng.dirichlet(np.ones(rng.integers(1, 9))) * rng.uniform(0.1, 9)
    budget = int(rng.integers(0, 5000))
    counts = sc.resample_counts(weights, budget)
    quota = weights / weights.sum() * budget
    assert counts.sum() == budget and np.all(np.abs(counts - quota) < 1)


@pytest.mark.parametrize("weights", [
    [1.0, -0.1], [1.0, np.nan], [1.0, np.inf], [0.0, 0.0], [[1.0]], []])
def test_bad_weights_are_refused(weights):
  with pytest.raises(ValueError, match="weights"):
    sc.resample_counts(weights, 10)


def test_resampled_training_set_follows_the_counts(corpus):
  weights = np.array([4, 3, 2, 1, 0, 0, 1, 0], np.float32)
  data = sc.resampled_training_set(jax.random.key(3), corpus.sources,
                                   weights, 50, 16)
  tokens, source = np.asarray(data["tokens"]), np.asarray(data["source"])
  assert tokens.shape == (50, 17) and tokens.dtype == np.int32
  counts = sc.resample_counts(weights, 50)
  np.testing.assert_array_equal(np.bincount(source, minlength=K), counts)
  assert np.all(np.diff(source) >= 0)
  for row, s in zip(tokens, source):
    assert _contains(corpus.sources[s], row)
  again = sc.resampled_training_set(jax.random.key(3), corpus.sources,
                                    weights, 50, 16)
  np.testing.assert_array_equal(tokens, np.asarray(again["tokens"]))
  with pytest.raises(ValueError, match=r"shape \[K=8\]"):
    sc.resampled_training_set(jax.random.key(3), corpus.sources, [1, 1], 50,
                              16)


def test_fixed_set_visits_every_window_once_per_epoch():
  size, batch_size = 10, 4  # 4 does not divide 10: batches straddle epochs
  rows = {"tokens": np.arange(size)[:, None] * np.ones((1, 3), np.int32),
          "source": np.arange(size, dtype=np.int32)}
  batch = sc.fixed_set_batches(jax.random.key(4), rows, batch_size)
  stream = np.concatenate([np.asarray(batch(t)["source"]) for t in range(10)])
  epochs = stream.reshape(4, size)
  for epoch in epochs:
    np.testing.assert_array_equal(np.sort(epoch), np.arange(size))
  assert len({tuple(e) for e in epochs}) > 1
  out = batch(7)
  np.testing.assert_array_equal(np.asarray(out["tokens"])[:, 0],
                                np.asarray(out["source"]))
  resumed = sc.fixed_set_batches(jax.random.key(4), rows, batch_size)
  np.testing.assert_array_equal(np.asarray(resumed(7)["source"]),
                                np.asarray(out["source"]))
  with pytest.raises(ValueError, match=r"batch_size=11.*N=10"):
    sc.fixed_set_batches(jax.random.key(4), rows, 11)


def test_evaluation_windows_tile_the_held_out_splits(corpus):
  windows = sc.evaluation_windows(corpus.test, 4, 32, 3)
  assert windows.shape == (3, 4, 33) and windows.dtype == np.int32
  np.testing.assert_array_equal(windows[0, 0], corpus.test[:33])
  last = corpus.test[-33:]
  np.testing.assert_array_equal(windows[-1, -1], last)


def test_unigram_replacements_come_from_the_given_frequencies():
  data = np.frombuffer(b"ab\0aab\0", np.uint8)
  probs = sc.unigram(data)
  np.testing.assert_allclose(probs[[0, 97, 98]], [0.0, 0.6, 0.4])
  only_z = np.zeros(256)
  only_z[ord("z")] = 1.0
  copy, positions = sc.corrupt(data, 0.5, seed=0, index=0, probs=only_z)
  assert set(copy[positions].tolist()) == {ord("z")}
  noise = sc.noise(1000, seed=0, index=0, probs=probs)
  assert set(np.unique(noise).tolist()) == {97, 98}
  assert abs(np.mean(noise == 97) - 0.6) < 0.05
  with pytest.raises(ValueError, match="replacement"):
    sc.build_source_corpus(max_bytes=1000, replacement="gaussian")
