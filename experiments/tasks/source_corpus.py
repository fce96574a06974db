"""A byte-level multi-source corpus for data reweighting, built at run time.

Data reweighting (ScaleBiO) learns one weight per training source so that a
model trained on the weighted mixture does best on a clean held-out domain.
This module builds such a problem from text every Python installation has,
so it needs no download (:mod:`experiments.tasks.text_corpus` does the same
for whole files). Everything is a pure function of the directory and the
arguments:

1. **Prose.** The docstrings (``ast.get_docstring``, cleaned) of the
   modules, classes and functions of the ``.py`` files under ``root``
   (default: the stdlib), in source order, each followed by the NUL
   separator. Files that fail to parse are skipped, and so are empty
   docstrings and those holding a NUL, which would fake a separator.
   The kept files are the longest prefix of the sorted file list whose prose
   totals at most ``max_bytes`` (at least one file).
2. **Splits by file.** With ``u = crc32(path) / 2³²``
   (:func:`~experiments.tasks.text_corpus.file_fraction`), a file is
   *validation* if ``u < v``, *test* if ``v <= u < v + t``, else *train*:
   a file's split depends on its name alone, and a stdlib validation file is
   one for :func:`~experiments.tasks.text_corpus.load_corpus` too. Validation
   is the clean domain of the upper-level loss; test is for evaluation only.
3. **Sources**, ``K = len(levels) + num_noise`` of them, in this order: a
   corruption ladder, copies of the train prose with exactly
   ``round(c · n)`` bytes (positions drawn without replacement) replaced by
   random bytes for each level ``c``, then ``num_noise`` sources of ``n``
   random bytes; random bytes are uniform in ``[1, 255]`` or, with
   ``replacement='unigram'``, drawn from the train prose's byte
   frequencies (a corruption the byte values alone do not give away).
   Replacements are never 0,
   the separator, but a replaced separator is lost, so ``c = 1`` is noise.
   Ladder copy ``i`` draws from ``numpy.random.default_rng([seed, 0, i])``
   and noise source ``j`` from ``default_rng([seed, 1, j])``.

Batches are windows of ``L + 1`` consecutive bytes of one source, with the
source id (``0 … K − 1``) of each row for a per-source weighted loss:
:func:`source_batches` (stratified, ``B / K`` rows per source, for the
bilevel problem), :func:`weighted_batches` (each row's source drawn from
fixed weights), and, for "reweight, then train", :func:`resample_counts`,
:func:`resampled_training_set` and :func:`fixed_set_batches` (a fixed
training set of ``budget`` windows iterated in epochs). Every stream is a
pure function of ``(key, step)``, so a resumed run replays its data.

References:
  Pan et al., "ScaleBiO: Scalable Bilevel Optimization for LLM Data
  Reweighting", 2024.
"""

import ast
import functools
import hashlib
import os
import warnings
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from experiments.tasks import text_corpus

DEFAULT_LEVELS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
REPLACEMENTS = ("uniform", "unigram")
_DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
_LADDER, _NOISE = 0, 1  # the second word of each source's numpy seed

Batch = dict[str, jax.Array]


class ProseSplits(NamedTuple):
  """The prose domain split by file.

  Attributes:
    train: uint8 ``[n_train]`` (read-only), the ladder's base.
    validation: uint8 ``[n_val]`` (read-only), the upper-level domain.
    test: uint8 ``[n_test]`` (read-only), for evaluation only.
    train_files: relative paths of the train files, in corpus order.
    validation_files: relative paths of the validation files.
    test_files: relative paths of the test files.
    fingerprint: hex SHA-256 of every kept file's path and prose, in order.
  """
  train: np.ndarray
  validation: np.ndarray
  test: np.ndarray
  train_files: tuple[str, ...]
  validation_files: tuple[str, ...]
  test_files: tuple[str, ...]
  fingerprint: str


class SourceCorpus(NamedTuple):
  """The training sources and the held-out prose of a reweighting problem.

  Attributes:
    sources: ``K`` read-only uint8 ``[n_train]`` arrays, the ladder then the
      noise sources.
    names: ``'corrupt_<c>'`` per level, then ``'noise_<j>'``.
    corruption: the fraction of replaced bytes of each source (1.0 for
      noise).
    validation: uint8 ``[n_val]`` (read-only), the clean held-out domain.
    test: uint8 ``[n_test]`` (read-only), the second held-out domain.
    fingerprint: hex SHA-256 of the prose's fingerprint and of every
      argument that shapes the splits and the sources.
  """
  sources: tuple[np.ndarray, ...]
  names: tuple[str, ...]
  corruption: tuple[float, ...]
  validation: np.ndarray
  test: np.ndarray
  fingerprint: str


def docstrings(source: bytes) -> list[bytes] | None:
  """The non-empty docstrings of a ``.py`` file's source, in source order.

  Args:
    source: the file's bytes (its coding cookie is honoured).

  Returns:
    Each docstring, cleaned and UTF-8 encoded (unpaired surrogates
    backslash-escaped); ``None`` if the source does not parse.
  """
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # invalid escapes in old files
      tree = ast.parse(source)
  except (SyntaxError, ValueError):
    return None
  found, stack = [], [tree]
  while stack:  # iterative pre-order: deep expressions exceed the recursion
    node = stack.pop()
    if isinstance(node, _DOC_NODES):
      doc = ast.get_docstring(node)
      if doc and "\0" not in doc:
        found.append(doc.encode("utf-8", "backslashreplace"))
    stack.extend(reversed(list(ast.iter_child_nodes(node))))
  return found


def _split_of(path: str, val_fraction: float, test_fraction: float) -> int:
  u = text_corpus.file_fraction(path)
  return 1 if u < val_fraction else 2 if u < val_fraction + test_fraction else 0


def prose_splits(root: str | None = None, *, max_bytes: int = 1_000_000,
                 val_fraction: float = 0.1,
                 test_fraction: float = 0.1) -> ProseSplits:
  """Builds (once per arguments, cached) the prose splits described above.

  Args:
    root: directory to read; ``None`` for the stdlib.
    max_bytes: cap on the kept files' prose, separators included.
    val_fraction: expected fraction of files in the validation split.
    test_fraction: expected fraction of files in the test split.

  Returns:
    The :class:`ProseSplits`.

  Raises:
    FileNotFoundError: ``root`` is missing or holds no ``.py`` file.
    ValueError: bad arguments, or a split without prose.
  """
  root = text_corpus.stdlib_dir() if root is None else root
  return _prose(root, max_bytes, val_fraction, test_fraction)


@functools.lru_cache(maxsize=4)
def _prose(root: str, max_bytes: int, val_fraction: float,
           test_fraction: float) -> ProseSplits:
  if (max_bytes < 1 or val_fraction <= 0 or test_fraction <= 0
      or val_fraction + test_fraction >= 1):
    raise ValueError(
        "need max_bytes >= 1, val_fraction > 0, test_fraction > 0 and"
        f" val_fraction + test_fraction < 1, got {max_bytes=},"
        f" {val_fraction=}, {test_fraction=}")
  paths = text_corpus.source_files(root)
  if not paths:
    raise FileNotFoundError(f"prose directory {root!r} holds no .py files")
  digest = hashlib.sha256()
  names, chunks = ([], [], []), ([], [], [])
  total = 0
  for path in paths:
    with open(os.path.join(root, *path.split("/")), "rb") as f:
      docs = docstrings(f.read())
    size = sum(len(d) + 1 for d in docs or ())
    if total and total + size > max_bytes:
      break
    if docs is None:
      continue
    total += size
    digest.update(path.encode() + b"\0" + b"\0".join(docs) + b"\0")
    split = _split_of(path, val_fraction, test_fraction)
    names[split].append(path)
    chunks[split].extend(docs)
  sizes = dict(zip(("train", "validation", "test"), map(len, chunks)))
  if not all(sizes.values()):
    raise ValueError(
        f"the prose of {root!r} with {max_bytes=} gives {sizes} docstrings"
        " per split; raise max_bytes, or the fraction of the empty split")
  arrays = tuple(text_corpus.join_documents(c) for c in chunks)
  return ProseSplits(*arrays, *map(tuple, names), digest.hexdigest())


def _replacements(rng: np.random.Generator, size: int,
                  probs: np.ndarray | None) -> np.ndarray:
  if probs is None:
    return rng.integers(1, 256, size=size, dtype=np.uint8)
  return rng.choice(256, size=size, p=probs).astype(np.uint8)


def unigram(data: np.ndarray) -> np.ndarray:
  """Byte frequencies ``[256]`` of ``data``, the separator (0) excluded."""
  counts = np.bincount(data, minlength=256).astype(np.float64)
  counts[text_corpus.SEPARATOR] = 0.0
  if not counts.sum():
    raise ValueError("no byte but the separator to take frequencies from")
  return counts / counts.sum()


def corrupt(data: np.ndarray, level: float, seed: int, index: int,
            probs: np.ndarray | None = None
            ) -> tuple[np.ndarray, np.ndarray]:
  """Rung ``index`` of the ladder: ``round(level · n)`` bytes replaced.

  Args:
    data: uint8 ``[n]``, the clean bytes.
    level: ``c`` in ``[0, 1]``, the fraction of positions replaced.
    seed: the ladder's seed.
    index: the rung; the generator is ``default_rng([seed, 0, index])``.
    probs: ``[256]`` probabilities of the replacement bytes (0 for the
      separator), e.g. :func:`unigram` of the clean text; None: uniform in
      ``[1, 255]``.

  Returns:
    ``(copy, positions)``: read-only uint8 ``[n]`` and the sorted int64
    ``[round(c · n)]`` replaced positions (a replacement may equal the
    original byte: with probability 1/255 for uniform replacements).
  """
  rng = np.random.default_rng([seed, _LADDER, index])
  positions = rng.choice(len(data), size=round(level * len(data)),
                         replace=False)
  copy = np.array(data, np.uint8)
  copy[positions] = _replacements(rng, len(positions), probs)
  copy.flags.writeable = False
  return copy, np.sort(positions)


def noise(length: int, seed: int, index: int,
          probs: np.ndarray | None = None) -> np.ndarray:
  """Noise source ``index``: read-only uint8 ``[length]``, i.i.d. bytes from
  ``probs`` (None: uniform in ``[1, 255]``)."""
  rng = np.random.default_rng([seed, _NOISE, index])
  data = _replacements(rng, length, probs)
  data.flags.writeable = False
  return data


def _check_sources(levels: tuple[float, ...], num_noise: int,
                  seed: int) -> None:
  bad = [c for c in levels if not 0.0 <= c <= 1.0]  # NaN fails too
  if bad:
    raise ValueError(f"corruption levels must lie in [0, 1], got {bad} in"
                     f" {levels=}")
  dups = sorted({c for c in levels if levels.count(c) > 1})
  if dups:
    raise ValueError(f"corruption levels must be distinct, got {dups} more"
                     f" than once in {levels=}")
  if num_noise < 0 or seed < 0 or not levels and not num_noise:
    raise ValueError("need num_noise >= 0, seed >= 0 and at least one"
                     f" source, got {levels=}, {num_noise=}, {seed=}")


def build_source_corpus(root: str | None = None, *,
                        max_bytes: int = 1_000_000,
                        levels: Sequence[float] = DEFAULT_LEVELS,
                        num_noise: int = 2, seed: int = 0,
                        val_fraction: float = 0.1,
                        test_fraction: float = 0.1,
                        replacement: str = "uniform") -> SourceCorpus:
  """Builds (once per arguments, cached) the corpus described above.

  Args:
    root: directory to read; ``None`` for the stdlib.
    max_bytes: cap on the prose of all three splits (:func:`prose_splits`).
    levels: the ladder's corruption fractions, distinct, in ``[0, 1]``.
    num_noise: number of pure-noise sources after the ladder.
    seed: non-negative seed of the corruption and the noise.
    val_fraction: expected fraction of files in the validation split.
    test_fraction: expected fraction of files in the test split.
    replacement: the distribution of corrupted and noise bytes,
      ``'uniform'`` in ``[1, 255]`` or ``'unigram'``, the train prose's own
      byte frequencies (:func:`unigram`): corruption that a model cannot
      spot from the byte values alone (prose is nearly all ASCII, so a
      uniform byte ≥ 128 marks noise).

  Returns:
    The :class:`SourceCorpus`.

  Raises:
    FileNotFoundError: ``root`` is missing or holds no ``.py`` file.
    ValueError: bad levels, counts or fractions, or a split without prose.
  """
  levels = tuple(float(c) for c in levels)
  _check_sources(levels, num_noise, seed)
  if replacement not in REPLACEMENTS:
    raise ValueError(f"replacement={replacement!r}: one of {REPLACEMENTS}")
  return _build(root, max_bytes, levels, num_noise, seed, val_fraction,
                test_fraction, replacement)


@functools.lru_cache(maxsize=4)
def _build(root, max_bytes, levels, num_noise, seed, val_fraction,
           test_fraction, replacement="uniform") -> SourceCorpus:
  prose = prose_splits(root, max_bytes=max_bytes, val_fraction=val_fraction,
                       test_fraction=test_fraction)
  n = len(prose.train)
  probs = unigram(prose.train) if replacement == "unigram" else None
  sources = tuple(corrupt(prose.train, c, seed, i, probs)[0]
                  for i, c in enumerate(levels))
  sources += tuple(noise(n, seed, j, probs) for j in range(num_noise))
  names = tuple(f"corrupt_{c}" for c in levels) + tuple(
      f"noise_{j}" for j in range(num_noise))
  config = (val_fraction, test_fraction, levels, num_noise, seed,
            replacement)
  fingerprint = hashlib.sha256(
      f"{prose.fingerprint} {config!r}".encode()).hexdigest()
  return SourceCorpus(sources, names, levels + (1.0,) * num_noise,
                      prose.validation, prose.test, fingerprint)


def _stack(sources: Sequence[np.ndarray],
           seq_len: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """All sources in one array: ``(data, offsets [K], last starts + 1 [K])``."""
  if not sources:
    raise ValueError("need at least one source")
  for s, tokens in enumerate(sources):
    text_corpus.check_window(tokens, seq_len, f"source {s}")
  lengths = np.array([len(t) for t in sources], np.int64)
  offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
  data = jnp.asarray(np.concatenate([np.asarray(t, np.uint8)
                                     for t in sources]))
  return (data, jnp.asarray(offsets, jnp.int32),
          jnp.asarray(lengths - seq_len, jnp.int32))


def _windows(data: jax.Array, key: jax.Array, source: jax.Array,
             offsets: jax.Array, spans: jax.Array, seq_len: int) -> jax.Array:
  """int32 ``[B, L + 1]``: a uniform window of source ``source[b]`` per row."""
  starts = jax.random.randint(key, source.shape, 0, spans[source])
  rows = (offsets[source] + starts)[:, None] + jnp.arange(seq_len + 1)
  return data[rows].astype(jnp.int32)


def source_batches(key: jax.Array, corpus_sources: Sequence[np.ndarray],
                   batch_size: int,
                   seq_len: int) -> Callable[[int], Batch]:
  """A stratified stream: ``B / K`` uniform windows of every source a step.

  Rows ``[s B / K, (s + 1) B / K)`` are windows of source ``s``, starting at
  ``u ~ U{0, …, n_s − L − 1}`` drawn with ``fold_in(key, step)``.

  Args:
    key: PRNG key of the stream.
    corpus_sources: ``K`` uint8 ``[n_s]`` arrays (``SourceCorpus.sources``),
      of any lengths ``n_s >= L + 1``.
    batch_size: ``B``, a multiple of ``K``.
    seq_len: ``L``, the model's context.

  Returns:
    ``batch(step)`` giving ``{'tokens': int32 [B, L + 1], 'source': int32
    [B]}``.

  Raises:
    ValueError: ``B`` is not a multiple of ``K``, or a source is shorter
      than one window.
  """
  num_sources = len(corpus_sources)
  if not num_sources or batch_size < 1 or batch_size % num_sources:
    raise ValueError(f"{batch_size=} must be a positive multiple of the"
                     f" number of sources K={num_sources}")
  data, offsets, spans = _stack(corpus_sources, seq_len)
  source = jnp.repeat(jnp.arange(num_sources, dtype=jnp.int32),
                      batch_size // num_sources)

  @jax.jit
  def take(data, step):
    tokens = _windows(data, jax.random.fold_in(key, step), source,
                      offsets, spans, seq_len)
    return {"tokens": tokens, "source": source}

  # The data as an argument, not a closure constant: it stays out of the HLO.
  return lambda step: take(data, step)


def _normalise(weights, num_sources: int | None = None) -> np.ndarray:
  """float64 ``[K]`` weights divided by their sum, after checking them."""
  w = np.asarray(weights, np.float64)
  if w.ndim != 1 or not w.size or (num_sources is not None
                                   and w.size != num_sources):
    want = "K" if num_sources is None else f"K={num_sources}"
    raise ValueError(f"weights must have shape [{want}], got {w.shape}")
  if not np.all(np.isfinite(w)) or np.any(w < 0) or not w.sum() > 0:
    raise ValueError("weights must be finite and non-negative with a"
                     f" positive sum, got {w.tolist()}")
  return w / w.sum()


def weighted_batches(key: jax.Array, corpus_sources: Sequence[np.ndarray],
                     weights, batch_size: int,
                     seq_len: int) -> Callable[[int], Batch]:
  """A stream of windows whose sources follow fixed mixture weights.

  Row ``b`` of a step draws its source ``s_b ~ Categorical(w / Σw)`` and then
  a uniform window of that source, both from ``fold_in(key, step)``.

  Args:
    key: PRNG key of the stream.
    corpus_sources: ``K`` uint8 ``[n_s]`` arrays.
    weights: ``[K]``, non-negative and finite with a positive sum.
    batch_size: ``B``.
    seq_len: ``L``.

  Returns:
    ``batch(step)`` giving ``{'tokens': int32 [B, L + 1], 'source': int32
    [B]}``.

  Raises:
    ValueError: bad weights, or a source shorter than one window.
  """
  with np.errstate(divide="ignore"):  # log 0 = -inf: never drawn
    logits = jnp.asarray(np.log(_normalise(weights, len(corpus_sources))),
                         jnp.float32)
  data, offsets, spans = _stack(corpus_sources, seq_len)

  @jax.jit
  def take(data, step):
    source_key, start_key = jax.random.split(jax.random.fold_in(key, step))
    source = jax.random.categorical(source_key, logits, shape=(batch_size,))
    source = source.astype(jnp.int32)
    tokens = _windows(data, start_key, source, offsets, spans, seq_len)
    return {"tokens": tokens, "source": source}

  return lambda step: take(data, step)


def resample_counts(weights, budget: int) -> np.ndarray:
  """Largest-remainder rounding of ``budget · w / Σw`` to integers.

  Each source gets ``⌊budget w_s⌋`` and the ``budget − Σ⌊budget w_s⌋`` left
  go, one each, to the largest fractional parts (ties to the lower index),
  so the counts sum to ``budget`` exactly and each is within 1 of its quota.

  Args:
    weights: ``[K]``, non-negative and finite with a positive sum.
    budget: non-negative total count.

  Returns:
    int64 ``[K]`` counts summing to ``budget``.

  Raises:
    ValueError: bad weights or a negative budget.
  """
  if budget < 0 or int(budget) != budget:
    raise ValueError(f"budget must be a non-negative integer, got {budget=}")
  quota = _normalise(weights) * int(budget)
  counts = np.floor(quota).astype(np.int64)
  left = int(budget) - int(counts.sum())
  order = np.argsort(-(quota - counts), kind="stable")
  counts[order[:left]] += 1
  return counts


def resampled_training_set(key: jax.Array, sources: Sequence[np.ndarray],
                           weights, budget: int, seq_len: int) -> Batch:
  """A fixed training set: ``counts[s]`` uniform windows of each source.

  Args:
    key: PRNG key of the window starts.
    sources: ``K`` uint8 ``[n_s]`` arrays.
    weights: ``[K]`` learned weights (e.g. ScaleBiO's), as
      :func:`resample_counts` takes them.
    budget: ``N >= 1``, the number of windows.
    seq_len: ``L``.

  Returns:
    ``{'tokens': int32 [N, L + 1], 'source': int32 [N]}``, grouped by source
    in order, ``counts = resample_counts(weights, N)`` rows each.

  Raises:
    ValueError: bad weights or budget, or a source shorter than one window.
  """
  if budget < 1:
    raise ValueError(f"need budget >= 1 windows, got {budget=}")
  counts = resample_counts(_normalise(weights, len(sources)), budget)
  data, offsets, spans = _stack(sources, seq_len)
  source = jnp.asarray(np.repeat(np.arange(len(sources), dtype=np.int32),
                                 counts))
  tokens = _windows(data, key, source, offsets, spans, seq_len)
  return {"tokens": tokens, "source": source}


def fixed_set_batches(key: jax.Array, training_set: Batch,
                      batch_size: int) -> Callable[[int], Batch]:
  """Epochs over a fixed set, each in the order of its own permutation.

  The stream is ``π_0 ‖ π_1 ‖ …``, ``π_e = permutation(fold_in(key, e), N)``,
  cut into consecutive batches of ``B`` rows: batch ``t`` holds stream
  positions ``[t B, (t + 1) B)``. When ``B`` does not divide ``N``, the batch
  that straddles the end of epoch ``e`` ends with the first rows of
  ``π_{e+1}``; nothing is dropped or repeated, so every row is seen exactly
  once in each stretch ``[e N, (e + 1) N)`` of the stream.

  Args:
    key: PRNG key of the permutations.
    training_set: ``{'tokens': [N, L + 1], 'source': [N]}`` (e.g. from
      :func:`resampled_training_set`); other keys likewise with leading
      ``N``.
    batch_size: ``B``, at most ``N``.

  Returns:
    ``batch(step)`` giving the rows of stream positions ``[t B, (t + 1) B)``.

  Raises:
    ValueError: ``B`` is not in ``[1, N]``.
  """
  rows = jax.tree.map(jnp.asarray, training_set)
  size = len(rows["tokens"])
  if not 1 <= batch_size <= size:
    raise ValueError(f"{batch_size=} must be in [1, N] for a training set of"
                     f" N={size} windows")

  @jax.jit
  def take(rows, epoch, offset):
    order = jnp.concatenate([
        jax.random.permutation(jax.random.fold_in(key, epoch + e), size)
        for e in (0, 1)])
    picked = order[offset + jnp.arange(batch_size)]
    return jax.tree.map(lambda x: x[picked], rows)

  # Python ints for a host step: step · B cannot overflow int32 here.
  return lambda step: take(rows, *divmod(step * batch_size, size))


def evaluation_windows(tokens: np.ndarray, batch_size: int, seq_len: int,
                       num_batches: int) -> np.ndarray:
  """Evenly spaced windows of a held-out split, the same for every run.

  See :func:`~experiments.tasks.text_corpus.validation_batches`.

  Args:
    tokens: uint8 ``[n]`` (``SourceCorpus.validation`` or ``.test``).
    batch_size: ``B``.
    seq_len: ``L``.
    num_batches: number of batches.

  Returns:
    int32 ``[num_batches, B, L + 1]``.
  """
  return text_corpus.validation_batches(tokens, batch_size, seq_len,
                                        num_batches)

