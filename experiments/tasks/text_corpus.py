"""A byte-level text corpus built at run time from the Python stdlib source.

Every Python installation ships its standard library's ``.py`` files (code,
comments, docstrings), so a language-modelling corpus needs no download
(``shared/data/README.md``). The corpus is a pure function of the directory
and three numbers:

1. the ``.py`` files under ``root`` (default
   ``sysconfig.get_paths()['stdlib']``), as POSIX paths relative to it,
   sorted; ``site-packages``, ``dist-packages`` and ``__pycache__`` are
   skipped (they are not the standard library);
2. the longest prefix of that list whose total size is at most
   ``max_bytes`` (at least one file);
3. a split *by file*: file ``p`` is a validation file iff
   ``crc32(p) / 2³² < val_fraction``, a test of its name alone, so adding or
   removing other files never moves it;
4. each split is its files' bytes in list order, each file followed by a
   NUL byte (id 0, which text files do not contain) as document separator.

Tokens are bytes (vocabulary 256). Different Python builds ship different
files, so the corpus, and with it every loss, depends on the installation:
:attr:`TextCorpus.fingerprint` identifies it.

Batches are windows of ``L + 1`` consecutive bytes (inputs ``[:, :-1]``,
next-byte targets ``[:, 1:]``). :func:`train_batches` returns a stateless
``batch(step)`` whose window starts are drawn with ``fold_in(key, step)``:
the step is the data position, so a resumed run replays the same data.
:func:`validation_batches` tiles the validation split with evenly spaced
windows, the same for every run.
"""

import functools
import hashlib
import os
import sysconfig
import zlib
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

VOCAB_SIZE = 256
SEPARATOR = 0  # NUL, after every file.
_SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


class TextCorpus(NamedTuple):
  """The train and validation bytes of a corpus and the files behind them.

  Attributes:
    train: uint8 ``[n_train]`` (read-only), the training files' bytes.
    validation: uint8 ``[n_val]`` (read-only), the validation files' bytes.
    train_files: relative paths of the training files, in corpus order.
    validation_files: relative paths of the validation files.
    fingerprint: hex SHA-256 of every kept file's path and bytes, in order.
  """
  train: np.ndarray
  validation: np.ndarray
  train_files: tuple[str, ...]
  validation_files: tuple[str, ...]
  fingerprint: str


def stdlib_dir() -> str:
  """The standard library directory of the running Python."""
  return sysconfig.get_paths()["stdlib"]


def source_files(root: str) -> list[str]:
  """Sorted relative POSIX paths of the ``.py`` files under ``root``.

  Raises:
    FileNotFoundError: ``root`` is not a directory.
  """
  if not os.path.isdir(root):
    raise FileNotFoundError(
        f"text corpus directory {root!r} does not exist or is not a"
        " directory (leave the config key data.corpus_dir empty for the"
        " Python standard library)")
  paths = []
  for directory, subdirs, files in os.walk(root):
    subdirs[:] = [d for d in subdirs if d not in _SKIPPED_DIRS]
    rel = os.path.relpath(directory, root)
    for name in files:
      if name.endswith(".py"):
        path = name if rel == "." else os.path.join(rel, name)
        paths.append(path.replace(os.sep, "/"))
  return sorted(paths)


def file_fraction(path: str) -> float:
  """``crc32(path) / 2³²`` in ``[0, 1)``: a file's split coordinate."""
  return zlib.crc32(path.encode()) / 2.0**32


def is_validation_file(path: str, val_fraction: float) -> bool:
  """Whether ``path`` belongs to the validation split: ``crc32 / 2³² < v``."""
  return file_fraction(path) < val_fraction


def join_documents(chunks: list[bytes]) -> np.ndarray:
  """Read-only uint8 ``[n]``: each chunk followed by the NUL separator."""
  sep = bytes([SEPARATOR])
  data = np.frombuffer(b"".join(c + sep for c in chunks), np.uint8).copy()
  data.flags.writeable = False
  return data


@functools.lru_cache(maxsize=4)
def load_corpus(root: str | None = None, *, max_bytes: int = 8_000_000,
                val_fraction: float = 0.1) -> TextCorpus:
  """Builds (once per arguments, cached) the corpus described above.

  Args:
    root: directory to read; ``None`` for :func:`stdlib_dir`.
    max_bytes: cap on the total size of the kept files (a prefix of the
      sorted list, at least one file).
    val_fraction: expected fraction of files in the validation split.

  Returns:
    The :class:`TextCorpus`.

  Raises:
    FileNotFoundError: ``root`` is missing or holds no ``.py`` file.
    ValueError: bad arguments, or a split without files (raise
      ``max_bytes``).
  """
  root = stdlib_dir() if root is None else root
  if max_bytes < 1 or not 0.0 < val_fraction < 1.0:
    raise ValueError(f"need max_bytes >= 1 and 0 < val_fraction < 1, got"
                     f" {max_bytes=}, {val_fraction=}")
  paths = source_files(root)
  if not paths:
    raise FileNotFoundError(f"text corpus directory {root!r} holds no .py"
                            " files")
  digest = hashlib.sha256()
  splits = {True: ([], []), False: ([], [])}
  total = 0
  for path in paths:
    full = os.path.join(root, *path.split("/"))
    size = os.path.getsize(full)
    if total and total + size > max_bytes:
      break
    with open(full, "rb") as f:
      data = f.read()
    total += size
    digest.update(path.encode() + b"\0" + data)
    names, chunks = splits[is_validation_file(path, val_fraction)]
    names.append(path)
    chunks.append(data)
  (val_names, val_chunks), (train_names, train_chunks) = (splits[True],
                                                          splits[False])
  if not val_names or not train_names:
    raise ValueError(
        f"{root!r} with {max_bytes=} gives {len(train_names)} training and"
        f" {len(val_names)} validation files; raise max_bytes")
  return TextCorpus(join_documents(train_chunks), join_documents(val_chunks),
                    tuple(train_names), tuple(val_names), digest.hexdigest())


def check_window(tokens: np.ndarray, seq_len: int, split: str) -> None:
  """Raises ``ValueError`` if ``tokens`` is shorter than one window."""
  if seq_len < 1 or len(tokens) < seq_len + 1:
    raise ValueError(f"the {split} split has {len(tokens)} bytes, too few for"
                     f" windows of seq_len + 1 = {seq_len + 1}")


def train_batches(key: jax.Array, tokens: np.ndarray, batch_size: int,
                  seq_len: int) -> Callable[[int], jax.Array]:
  """A stateless stream of random windows: ``batch(step) -> [B, L + 1]``.

  Window ``b`` of step ``s`` starts at ``u_b ~ U{0, …, n − L − 1}`` drawn
  with ``fold_in(key, s)``, so every step is a pure function of
  ``(key, s)``.

  Args:
    key: PRNG key of the stream.
    tokens: uint8 ``[n]`` bytes of a split (e.g. ``TextCorpus.train``).
    batch_size: ``B``.
    seq_len: ``L``, the model's context.

  Returns:
    ``batch(step)`` giving int32 ``[B, L + 1]`` token ids.

  Raises:
    ValueError: the split is shorter than one window.
  """
  check_window(tokens, seq_len, "training")
  data = jnp.asarray(tokens)
  offsets = jnp.arange(seq_len + 1, dtype=jnp.int32)

  @jax.jit
  def take(data, step):
    starts = jax.random.randint(jax.random.fold_in(key, step), (batch_size,),
                                0, data.shape[0] - seq_len)
    return data[starts[:, None] + offsets].astype(jnp.int32)

  # The data as an argument, not a closure constant: it stays out of the HLO.
  return lambda step: take(data, step)


def validation_batches(tokens: np.ndarray, batch_size: int, seq_len: int,
                       num_batches: int) -> np.ndarray:
  """Evenly spaced validation windows, the same for every run.

  The ``N = num_batches · B`` windows start at ``⌊i (n − L − 1) / (N − 1)⌋``,
  ``i = 0 … N − 1``, so they span the whole split (they overlap only when
  the split is shorter than ``N (L + 1)`` bytes).

  Args:
    tokens: uint8 ``[n]`` (e.g. ``TextCorpus.validation``).
    batch_size: ``B``.
    seq_len: ``L``.
    num_batches: number of batches.

  Returns:
    int32 ``[num_batches, B, L + 1]``.

  Raises:
    ValueError: the split is shorter than one window.
  """
  check_window(tokens, seq_len, "validation")
  count = num_batches * batch_size
  last = len(tokens) - seq_len - 1
  starts = (np.arange(count, dtype=np.int64) * last) // max(count - 1, 1)
  windows = np.asarray(tokens)[starts[:, None] + np.arange(seq_len + 1)]
  return windows.astype(np.int32).reshape(num_batches, batch_size,
                                          seq_len + 1)
