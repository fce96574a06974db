"""Tests of models/moe/routers.py against numpy oracles and properties.

Hypothesis draws the values; shapes and static arguments come from small
tables so that each jitted router compiles a few times, not per example.
"""

import math

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

from models.moe import (
    expert_choice_routing,
    hash_routing,
    top_k_routing,
)

_SETTINGS = settings(max_examples=20, deadline=None, database=None,
                     derandomize=True)
_top_k = jax.jit(top_k_routing, static_argnames=(
    "k", "order", "renormalize", "capacity_factor", "min_capacity"))
_expert_choice = jax.jit(expert_choice_routing,
                         static_argnames=("capacity_factor", "k_max"))

# (tokens, dim, experts, k, order, renormalize)
TOP_K_CASES = [
    (1, 2, 1, 1, "softmax_topk", False),
    (6, 3, 4, 2, "softmax_topk", True),
    (9, 2, 6, 6, "topk_softmax", False),
    (12, 4, 8, 3, "softmax_topk", False),
    (5, 3, 3, 1, "topk_softmax", True),
]
# (tokens, dim, experts, k, capacity_factor)
CAPACITY_CASES = [
    (1, 2, 1, 1, 0.5),
    (6, 3, 4, 2, 0.5),
    (9, 2, 6, 3, 1.0),
    (12, 4, 8, 2, 0.25),
    (10, 3, 3, 2, 1.5),
]
# (tokens, dim, experts, capacity_factor, k_max)
EXPERT_CHOICE_CASES = [
    (1, 2, 1, 1.0, 1),
    (6, 3, 4, 2.0, 4),
    (9, 2, 6, 0.5, 2),
    (12, 4, 8, 2.0, 1),
    (7, 3, 3, 1.0, 3),
]


def router_inputs(num_tokens, dim, num_experts):
  """A strategy of ``(x, w)`` with random values of the given shapes."""
  @st.composite
  def draw_inputs(draw):
    scale = draw(st.sampled_from([0.3, 1.0, 3.0]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = rng.normal(size=(num_tokens, dim)).astype(np.float32)
    w = (scale * rng.normal(size=(dim, num_experts))).astype(np.float32)
    return x, w
  return draw_inputs()


def cases(table):
  """Draws a row of ``table`` and inputs shaped by its first three entries."""
  return st.sampled_from(table).flatmap(
      lambda row: st.tuples(st.just(row), router_inputs(*row[:3])))


def _softmax(logits):
  z = np.exp(logits - logits.max(-1, keepdims=True))
  return z / z.sum(-1, keepdims=True)


def _probs(x, w):
  return _softmax(x.astype(np.float64) @ w.astype(np.float64))


def _dense(routing, num_experts):
  """Numpy scatter of the slots: (weights [T, E], active mask [T, E])."""
  weights = np.asarray(routing.weights)
  experts = np.asarray(routing.experts)
  dense = np.zeros((len(weights), num_experts))
  mask = np.zeros((len(weights), num_experts), bool)
  for t, j in np.ndindex(weights.shape):
    if weights[t, j] != 0:
      assert not mask[t, experts[t, j]], "an expert repeated in a token"
      dense[t, experts[t, j]] = weights[t, j]
      mask[t, experts[t, j]] = True
  return dense, mask


@_SETTINGS
@given(cases(TOP_K_CASES))
def test_top_k_dropless_matches_numpy(case):
  (num_tokens, _, num_experts, k, order, renormalize), (x, w) = case
  routing = _top_k(x, w, k=k, order=order, renormalize=renormalize)
  probs = _probs(x, w)
  top = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
  expected = np.zeros_like(probs)
  np.put_along_axis(expected, top, np.take_along_axis(probs, top, -1), -1)
  if renormalize or order == "topk_softmax":
    expected /= expected.sum(-1, keepdims=True)
    np.testing.assert_allclose(routing.weights.sum(-1), 1.0, rtol=1e-5)
  assert routing.weights.shape == routing.experts.shape == (num_tokens, k)
  dense, mask = _dense(routing, num_experts)
  np.testing.assert_allclose(dense, expected, rtol=1e-4, atol=1e-6)
  # Dropless: every wanted assignment is kept.
  assert int(routing.aux["num_dropped"]) == 0
  assert mask.sum(-1).tolist() == [k] * num_tokens
  np.testing.assert_array_equal(mask, routing.aux["choice_mask"])


def _slot_major_keep(experts, capacity, num_experts):
  """Serves slot 0 of every token in order, then slot 1, and so on."""
  used = np.zeros(num_experts, int)
  keep = np.zeros(experts.shape, bool)
  for slot in range(experts.shape[1]):
    for token in range(experts.shape[0]):
      if used[experts[token, slot]] < capacity:
        used[experts[token, slot]] += 1
        keep[token, slot] = True
  return keep


@_SETTINGS
@given(cases(CAPACITY_CASES))
def test_capacity_respected_and_every_drop_counted(case):
  (num_tokens, _, num_experts, k, factor), (x, w) = case
  dropless = _top_k(x, w, k=k)
  routing = _top_k(x, w, k=k, capacity_factor=factor)
  capacity = min(num_tokens,
                 max(1, math.ceil(factor * num_tokens * k / num_experts)))
  assert int(routing.aux["capacity"]) == capacity
  kept = _dense(routing, num_experts)[1].sum(0)
  assert (kept <= capacity).all()
  assert int(routing.aux["num_dropped"]) == num_tokens * k - kept.sum()
  np.testing.assert_array_equal(
      kept + np.asarray(routing.aux["dropped_load"]),
      np.asarray(routing.aux["choice_mask"]).sum(0))
  keep = _slot_major_keep(np.asarray(dropless.experts), capacity, num_experts)
  np.testing.assert_array_equal(np.asarray(routing.weights) != 0, keep)
  np.testing.assert_array_equal(
      routing.weights, np.where(keep, dropless.weights, 0.0))
  np.testing.assert_array_equal(
      routing.experts, np.where(keep, dropless.experts, 0))


def test_topk_softmax_is_softmax_of_top_logits():
  w = np.array([[2.0, 1.0, 0.0, -1.0], [0.0, 3.0, 1.0, 0.5],
                [1.0, 1.5, -2.0, 0.0]], np.float32)
  routing = top_k_routing(np.eye(3, dtype=np.float32), w, k=2,
                          order="topk_softmax")
  top = np.sort(w, -1)[:, ::-1][:, :2]
  np.testing.assert_allclose(routing.weights, _softmax(top), rtol=1e-6)
  np.testing.assert_array_equal(routing.experts, [[0, 1], [1, 2], [1, 0]])


def test_top_k_eager_equals_jit_and_has_router_gradients():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(6, 3)).astype(np.float32)
  w = rng.normal(size=(3, 4)).astype(np.float32)
  eager = top_k_routing(x, w, k=2, capacity_factor=1.0)
  jitted = _top_k(x, w, k=2, capacity_factor=1.0)
  np.testing.assert_allclose(eager.weights, jitted.weights, rtol=1e-6)
  np.testing.assert_array_equal(eager.experts, jitted.experts)
  grad = jax.grad(
      lambda w: jnp.sum(_top_k(x, w, k=2).weights ** 2))(w)
  assert np.isfinite(grad).all() and np.abs(grad).sum() > 0


def test_top_k_argument_errors():
  x, w = jnp.ones((2, 3)), jnp.ones((3, 4))
  with pytest.raises(ValueError, match="order='nope' is not one of"):
    top_k_routing(x, w, k=1, order="nope")
  with pytest.raises(ValueError, match="k=5"):
    top_k_routing(x, w, k=5)
  with pytest.raises(ValueError, match="capacity_factor"):
    top_k_routing(x, w, k=1, capacity_factor=0.0)


@_SETTINGS
@given(cases(EXPERT_CHOICE_CASES))
def test_expert_choice_respects_capacity(case):
  (num_tokens, _, num_experts, factor, k_max), (x, w) = case
  probs = _probs(x, w)
  capacity = min(num_tokens, max(1, math.ceil(factor * num_tokens
                                              / num_experts)))
  picked = np.zeros_like(probs, bool)
  for e in range(num_experts):
    picked[np.argsort(-probs[:, e], kind="stable")[:capacity], e] = True

  full = _expert_choice(x, w, capacity_factor=factor)
  dense, mask = _dense(full, num_experts)
  assert int(full.aux["capacity"]) == capacity
  np.testing.assert_array_equal(full.aux["capacity_use"], capacity)
  np.testing.assert_array_equal(mask, picked)
  np.testing.assert_allclose(dense, np.where(picked, probs, 0), rtol=1e-4,
                             atol=1e-7)
  assert int(full.aux["num_dropped"]) == 0
  assert int(full.aux["num_unrouted"]) == (~picked.any(-1)).sum()

  cut = _expert_choice(x, w, capacity_factor=factor, k_max=k_max)
  dense, mask = _dense(cut, num_experts)
  assert cut.weights.shape == (num_tokens, k_max)
  assert (mask <= picked).all()
  np.testing.assert_array_equal(mask.sum(-1),
                                np.minimum(picked.sum(-1), k_max))
  # A token cut by k_max keeps its most probable pickers.
  for t in range(num_tokens):
    if mask[t].any() and (picked[t] & ~mask[t]).any():
      assert probs[t][mask[t]].min() >= probs[t][picked[t] & ~mask[t]].max()
  np.testing.assert_array_equal(cut.aux["capacity_use"], mask.sum(0))
  assert int(cut.aux["num_dropped"]) == picked.sum() - mask.sum()


def test_hash_routing_is_a_fixed_function_of_the_token_id():
  ids = jnp.array([5, 17, 5, 3, 17, 99])
  routing = hash_routing(ids, 8, k=3, seed=1)
  np.testing.assert_array_equal(routing.experts[0], routing.experts[2])
  np.testing.assert_array_equal(routing.experts[1], routing.experts[4])
  np.testing.assert_array_equal(
      routing.experts,
      jax.jit(hash_routing, static_argnums=1,
              static_argnames=("k", "seed"))(ids, 8, k=3, seed=1).experts)
  np.testing.assert_allclose(routing.weights, 1 / 3)
  experts = np.asarray(routing.experts)
  assert all(len(set(row)) == 3 for row in experts)
  assert experts.min() >= 0 and experts.max() < 8
  seed1 = hash_routing(jnp.arange(64), 8, seed=1).experts
  assert (hash_routing(jnp.arange(64), 8, seed=2).experts != seed1).any()


@pytest.mark.parametrize("k", [1, 2])
def test_hash_routing_is_roughly_balanced(k):
  experts = np.asarray(hash_routing(jnp.arange(8000), 8, k=k).experts)
  load = np.bincount(experts.ravel(), minlength=8)
  np.testing.assert_allclose(load / load.mean(), 1.0, atol=0.1)
