"""Tests of models/moe/metrics.py against brute-force numpy oracles."""

import hypothesis.strategies as st
import jax
import numpy as np
import pytest
from hypothesis import given, settings

from models.moe import (
    drop_rate,
    expert_load,
    segment_cache_hit_rate,
    segment_counts,
    segment_routing_performance,
    top_k_routing,
)

_SETTINGS = settings(max_examples=20, deadline=None, database=None,
                     derandomize=True)
_srp = jax.jit(segment_routing_performance, static_argnums=1)
_sch = jax.jit(segment_cache_hit_rate, static_argnums=1)
# (sequences, tokens, experts, k, segment length)
SHAPES = [(1, 1, 2, 1, 1), (1, 8, 4, 2, 3), (2, 10, 6, 2, 4),
          (3, 6, 8, 3, 6)]


@st.composite
def logged_masks(draw):
  """Top-k masks of a random walk in score space (locally consistent)."""
  sequences, tokens, experts, k, length = draw(st.sampled_from(SHAPES))
  rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
  step = draw(st.sampled_from([0.0, 0.3, 3.0]))
  scores = rng.normal(size=(sequences, 1, experts)) + np.cumsum(
      step * rng.normal(size=(sequences, tokens, experts)), axis=1)
  top = np.argsort(-scores, -1)[..., :k]
  mask = np.zeros(scores.shape, bool)
  np.put_along_axis(mask, top, True, -1)
  return mask, length


def _windows(mask, length):
  """All stride-1 segments as [num_windows, length, E], pooled."""
  return np.stack([seq[s:s + length] for seq in mask
                   for s in range(seq.shape[0] - length + 1)])


def _srp_oracle(mask, length):
  """Best F1 over thresholds, counted token by token."""
  windows = _windows(mask, length)
  best = 0.0
  for m in range(length + 1):
    tp = fp = fn = 0
    for window in windows:
      predicted = window.sum(0) >= m
      tp += np.sum(window & predicted)
      fp += np.sum(~window & predicted)
      fn += np.sum(window & ~predicted)
    best = max(best, 2 * tp / max(2 * tp + fp + fn, 1))
  return best


def _sch_oracle(mask, length, cache_size):
  hits = total = 0
  for window in _windows(mask, length):
    counts = window.sum(0)
    hits += np.sort(counts)[::-1][:cache_size].sum()
    total += counts.sum()
  return hits / max(total, 1)


@_SETTINGS
@given(logged_masks())
def test_srp_and_sch_match_brute_force(inputs):
  mask, length = inputs
  np.testing.assert_allclose(_srp(mask, length), _srp_oracle(mask, length),
                             rtol=1e-6)
  hit_rate = np.asarray(_sch(mask, length))
  expected = [_sch_oracle(mask, length, s)
              for s in range(1, mask.shape[-1] + 1)]
  np.testing.assert_allclose(hit_rate, expected, rtol=1e-6)
  assert (np.diff(hit_rate) >= -1e-7).all()


def test_constant_routing_is_perfectly_consistent():
  mask = np.zeros((12, 6), bool)
  mask[:, [1, 4]] = True
  np.testing.assert_allclose(segment_routing_performance(mask, 4), 1.0)
  np.testing.assert_allclose(segment_cache_hit_rate(mask, 4)[1:], 1.0)
  np.testing.assert_allclose(segment_cache_hit_rate(mask, 4)[0], 0.5)


def test_alternating_routing_is_inconsistent():
  # Top-1 alternating between two experts: a segment of 2 always holds one
  # token on each, so no segment-level prediction beats F1 = 2/3
  # (threshold 1: both predicted for both tokens, half of them right).
  mask = np.eye(2, dtype=bool)[np.arange(10) % 2]
  np.testing.assert_allclose(segment_routing_performance(mask, 2), 2 / 3,
                             rtol=1e-6)
  np.testing.assert_allclose(segment_cache_hit_rate(mask, 2), [0.5, 1.0])


def test_segment_counts_and_errors():
  mask = np.array([[1, 0], [1, 1], [0, 1], [0, 1]], bool)
  np.testing.assert_array_equal(segment_counts(mask, 2),
                                [[2, 1], [1, 2], [0, 2]])
  with pytest.raises(ValueError, match="segment_length=5"):
    segment_counts(mask, 5)


def test_expert_load_and_drop_rate():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(8, 3)).astype(np.float32)
  w = rng.normal(size=(3, 4)).astype(np.float32)
  dropless = top_k_routing(x, w, k=2)
  np.testing.assert_allclose(drop_rate(dropless), 0.0)
  capped = top_k_routing(x, w, k=2, capacity_factor=0.5)
  dropped = int(capped.aux["num_dropped"])
  assert dropped > 0
  np.testing.assert_allclose(drop_rate(capped), dropped / 16, rtol=1e-6)
  choice = np.asarray(capped.aux["choice_mask"])
  np.testing.assert_array_equal(expert_load(choice), choice.sum(0))
  np.testing.assert_array_equal(expert_load(choice[None]), choice.sum(0))
  np.testing.assert_allclose(expert_load(choice).sum(), 16)
