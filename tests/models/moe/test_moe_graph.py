"""Tests of models/moe/graph.py against numpy oracles."""

import numpy as np
import pytest

from models.moe import (
    attention_aware_routing,
    dense_weights,
    similarity_aware_routing,
    top_k_routing,
)


def _softmax(logits):
  z = np.exp(logits - logits.max(-1, keepdims=True))
  return z / z.sum(-1, keepdims=True)


def _inputs(seed, num_tokens=7, dim=3, num_experts=5):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(num_tokens, dim)).astype(np.float32)
  w = rng.normal(size=(dim, num_experts)).astype(np.float32)
  w_sim = rng.normal(size=(dim, dim)).astype(np.float32)
  return x, w, w_sim


def _top_k_dense(probs, k):
  top = np.argsort(-probs, -1, kind="stable")[:, :k]
  dense = np.zeros_like(probs)
  np.put_along_axis(dense, top, np.take_along_axis(probs, top, -1), -1)
  return dense


@pytest.mark.parametrize(("seed", "tau", "causal"),
                         [(0, 1.0, False), (1, 0.5, True), (2, 3.0, True)])
def test_similarity_aware_matches_numpy(seed, tau, causal):
  x, w, w_sim = _inputs(seed)
  routing = similarity_aware_routing(x, w, w_sim, k=2, tau=tau,
                                     causal=causal)
  xd = x.astype(np.float64)
  scores = xd @ w_sim @ xd.T / tau
  if causal:
    scores = np.where(np.tri(len(x), dtype=bool), scores, -np.inf)
  similarity = _softmax(scores)
  mixed = similarity @ _softmax(xd @ w)
  np.testing.assert_allclose(routing.aux["similarity"], similarity,
                             rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(routing.aux["probs"], mixed, rtol=1e-4,
                             atol=1e-6)
  np.testing.assert_allclose(np.sum(routing.aux["probs"], -1), 1.0,
                             rtol=1e-5)
  np.testing.assert_allclose(dense_weights(routing, 5), _top_k_dense(mixed, 2),
                             rtol=1e-4, atol=1e-6)
  if causal:
    # The first token has nobody earlier to borrow from.
    np.testing.assert_allclose(routing.aux["probs"][0],
                               routing.aux["token_probs"][0], rtol=1e-5)


def test_tokens_borrow_routing_from_similar_tokens():
  x, w, w_sim = _inputs(3)
  before = similarity_aware_routing(x, w, w_sim, k=2, tau=5.0).aux["probs"]
  x2 = x.copy()
  x2[-1] += 1.0
  after = similarity_aware_routing(x2, w, w_sim, k=2, tau=5.0).aux["probs"]
  assert np.abs(np.asarray(after[0]) - np.asarray(before[0])).max() > 1e-3
  # Plain softmax gating routes token 0 independently of token -1.
  plain = [top_k_routing(z, w, k=2).aux["probs"][0] for z in (x, x2)]
  np.testing.assert_array_equal(plain[0], plain[1])


def test_attention_aware_with_identity_attention_is_plain_top_k():
  x, w, _ = _inputs(4)
  plain = top_k_routing(x, w, k=2, capacity_factor=1.0)
  routed = attention_aware_routing(x, w, np.eye(len(x), dtype=np.float32),
                                   k=2, capacity_factor=1.0)
  np.testing.assert_allclose(routed.weights, plain.weights, rtol=1e-6)
  np.testing.assert_array_equal(routed.experts, plain.experts)
  assert int(routed.aux["num_dropped"]) == int(plain.aux["num_dropped"])


def test_attention_aware_matches_numpy_and_averages_heads():
  x, w, _ = _inputs(5)
  rng = np.random.default_rng(6)
  heads = _softmax(rng.normal(size=(2, len(x), len(x)))).astype(np.float32)
  routing = attention_aware_routing(x, w, heads, k=3)
  mixed = heads.astype(np.float64).mean(0) @ _softmax(
      x.astype(np.float64) @ w)
  np.testing.assert_allclose(routing.aux["probs"], mixed, rtol=1e-4,
                             atol=1e-6)
  np.testing.assert_allclose(dense_weights(routing, 5), _top_k_dense(mixed, 3),
                             rtol=1e-4, atol=1e-6)
  same = attention_aware_routing(x, w, heads.mean(0), k=3)
  np.testing.assert_allclose(same.weights, routing.weights, rtol=1e-5)


def test_graph_routers_check_shapes():
  x, w, w_sim = _inputs(7)
  with pytest.raises(ValueError, match="w_similarity.shape"):
    similarity_aware_routing(x, w, w_sim[:2], k=2)
  with pytest.raises(ValueError, match="attention.shape"):
    attention_aware_routing(x, w, np.eye(3, dtype=np.float32), k=2)
