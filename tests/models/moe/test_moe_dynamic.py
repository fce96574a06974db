"""Tests of models/moe/dynamic.py: top-p and DynMoLE routing."""

import hypothesis.strategies as st
import jax
import numpy as np
import pytest
from hypothesis import given, settings

from models.moe import dynmole_routing, top_p_routing

_SETTINGS = settings(max_examples=20, deadline=None, database=None,
                     derandomize=True)
_top_p = jax.jit(top_p_routing,
                 static_argnames=("p", "k_max", "renormalize"))
_dynmole = jax.jit(dynmole_routing, static_argnames=(
    "threshold", "q", "eps", "top_p", "min_experts"))
_TOL = 1e-5

# (tokens, dim, experts, p, k_max, renormalize)
TOP_P_CASES = [
    (1, 2, 1, 0.4, 1, False),
    (6, 3, 4, 0.4, 2, False),
    (9, 2, 6, 0.75, 3, True),
    (12, 4, 8, 0.9, 8, False),
    (5, 3, 5, 1.0, 1, False),
]
# (tokens, dim, experts, threshold, top_p, min_experts)
DYNMOLE_CASES = [
    (1, 2, 1, 0.9, 0.75, 1),
    (6, 3, 4, 0.9, 0.75, 2),
    (9, 2, 6, 0.5, 0.5, 2),
    (12, 4, 8, 2.0, 0.75, 3),
    (5, 3, 5, -1.0, 0.75, 2),
]


def router_inputs(num_tokens, dim, num_experts):
  @st.composite
  def draw_inputs(draw):
    scale = draw(st.sampled_from([0.3, 1.0, 3.0]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = rng.normal(size=(num_tokens, dim)).astype(np.float32)
    w = (scale * rng.normal(size=(dim, num_experts))).astype(np.float32)
    return x, w
  return draw_inputs()


def cases(table):
  return st.sampled_from(table).flatmap(
      lambda row: st.tuples(st.just(row), router_inputs(*row[:3])))


def _kept(routing, num_experts):
  """Per token: bool mask [E] of active experts; checks distinctness."""
  weights, experts = np.asarray(routing.weights), np.asarray(routing.experts)
  mask = np.zeros((len(weights), num_experts), bool)
  for t, j in np.ndindex(weights.shape):
    if weights[t, j] != 0:
      assert not mask[t, experts[t, j]]
      mask[t, experts[t, j]] = True
  return mask


def _assert_is_top_prefix(probs, mask):
  """Every kept expert is at least as probable as every other one."""
  for p, m in zip(probs, mask):
    if m.any() and (~m).any():
      assert p[m].min() >= p[~m].max()


@_SETTINGS
@given(cases(TOP_P_CASES))
def test_top_p_keeps_the_minimal_prefix_reaching_p(case):
  (num_tokens, _, num_experts, p, k_max, renormalize), (x, w) = case
  routing = _top_p(x, w, p=p)
  probs = np.asarray(routing.aux["probs"])
  np.testing.assert_allclose(
      probs, jax.nn.softmax(x @ w, axis=-1), rtol=1e-5, atol=1e-7)
  mask = _kept(routing, num_experts)
  assert routing.weights.shape == (num_tokens, num_experts)
  assert mask.sum(-1).min() >= 1
  _assert_is_top_prefix(probs, mask)
  mass = np.where(mask, probs, 0).sum(-1)
  smallest = np.where(mask, probs, np.inf).min(-1)
  assert (mass >= p - _TOL).all()
  assert (mass - smallest < p + _TOL).all()    # no shorter prefix reaches p
  np.testing.assert_allclose(np.asarray(routing.weights).sum(-1), mass,
                             rtol=1e-6)
  entropy = -np.sum(probs * np.log(np.maximum(probs, 1e-30)), -1).mean()
  np.testing.assert_allclose(routing.aux["entropy"], entropy, rtol=1e-4,
                             atol=1e-6)

  capped = _top_p(x, w, p=p, k_max=k_max, renormalize=renormalize)
  capped_mask = _kept(capped, num_experts)
  wanted = mask.sum(-1)
  np.testing.assert_array_equal(capped_mask.sum(-1),
                                np.minimum(wanted, k_max))
  assert (capped_mask <= mask).all()
  assert int(capped.aux["num_truncated"]) == np.maximum(
      wanted - k_max, 0).sum()
  if renormalize:
    np.testing.assert_allclose(capped.weights.sum(-1), 1.0, rtol=1e-5)


@pytest.mark.parametrize(("p", "expected"), [
    (0.45, [0]), (0.6, [0, 1]), (0.85, [0, 1, 2]), (1.0, [0, 1, 2])])
def test_top_p_hand_example(p, expected):
  log_probs = np.log(np.array([[0.5, 0.3, 0.2]], np.float32))
  routing = top_p_routing(np.ones((1, 1), np.float32), log_probs, p=p)
  kept = np.asarray(routing.experts)[np.asarray(routing.weights) != 0]
  assert kept.tolist() == expected


def test_top_p_rejects_bad_p():
  with pytest.raises(ValueError, match="p=0.0 must lie in"):
    top_p_routing(np.ones((1, 1)), np.ones((1, 2)), p=0.0)


def _tsallis(probs, q=1.1, eps=1e-5):
  n = probs.shape[-1]
  entropy = (1 - np.sum((probs + eps) ** q, -1)) / (q - 1)
  return entropy / ((1 - n ** (1 - q)) / (q - 1))


@_SETTINGS
@given(cases(DYNMOLE_CASES))
def test_dynmole_switches_between_soft_and_top_p(case):
  (_, _, num_experts, threshold, top_p, min_experts), (x, w) = case
  routing = _dynmole(x, w, threshold=threshold, top_p=top_p,
                     min_experts=min_experts)
  probs = np.asarray(routing.aux["probs"], np.float64)
  entropy = np.asarray(routing.aux["tsallis_entropy"])
  if num_experts > 1:
    np.testing.assert_allclose(entropy, _tsallis(probs), rtol=1e-4,
                               atol=1e-5)
  soft = np.asarray(routing.aux["soft"])
  np.testing.assert_array_equal(soft, entropy > threshold)
  mask = _kept(routing, num_experts)
  np.testing.assert_allclose(
      routing.weights.sum(-1), np.where(mask, probs, 0).sum(-1), rtol=1e-5)
  assert mask[soft].all()                       # soft mode: all experts
  hard = mask[~soft]
  assert (hard.sum(-1) >= min_experts).all()    # top-p mode: at least 2
  _assert_is_top_prefix(probs[~soft], hard)
  for p, m in zip(probs[~soft], hard):
    ranked = np.sort(p)[::-1]
    n = m.sum()
    cumulative = np.cumsum(ranked)
    # n = max(min_experts, #{c_n <= top_p}).
    assert n == min_experts or cumulative[n - 1] <= top_p + _TOL
    assert n == num_experts or cumulative[n] > top_p - _TOL
  if threshold >= 1.0:
    assert not soft.any()
  if threshold < 0.0 and num_experts > 1:
    assert soft.all()
