"""Tests of models/moe/layers.py: CoE, shared experts, routed LoRA."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.moe import (
    Routing,
    add_shared_experts,
    chain_of_experts,
    dense_weights,
    routed_lora,
    routed_lora_linear,
    top_k_routing,
)

T, D, F, E = 6, 4, 5, 4


def _softmax(logits):
  z = np.exp(logits - logits.max(-1, keepdims=True))
  return z / z.sum(-1, keepdims=True)


def _experts(seed=0):
  rng = np.random.default_rng(seed)
  w1 = rng.normal(size=(E, D, F)).astype(np.float32) / 2
  w2 = rng.normal(size=(E, F, D)).astype(np.float32) / 2
  return w1, w2


def _dense_experts_fn(w1, w2):
  """Dense dispatch: every expert on every token, mixed by the weights."""
  def experts_fn(h, routing):
    hidden = jnp.tanh(jnp.einsum("td,edf->tef", h, w1))
    per_expert = jnp.einsum("tef,efd->ted", hidden, w2)
    return jnp.einsum("te,ted->td", dense_weights(routing, E), per_expert)
  return experts_fn


@pytest.mark.parametrize("with_shared", [False, True])
def test_chain_of_experts_matches_a_numpy_loop(with_shared):
  rng = np.random.default_rng(1)
  x = rng.normal(size=(T, D)).astype(np.float32)
  gates = rng.normal(size=(3, D, E)).astype(np.float32)
  w1, w2 = _experts()
  w_shared = rng.normal(size=(D, D)).astype(np.float32) / 4
  shared_fn = (lambda h: h @ w_shared) if with_shared else None
  y, routings = chain_of_experts(x, gates, k=2,
                                 experts_fn=_dense_experts_fn(w1, w2),
                                 shared_fn=shared_fn)
  h = x.astype(np.float64)
  for c, gate in enumerate(gates):
    probs = _softmax(h @ gate)
    top = np.argsort(-probs, -1, kind="stable")[:, :2]
    np.testing.assert_array_equal(np.sort(routings.experts[c], -1),
                                  np.sort(top, -1))
    out = h.copy()
    for t in range(T):
      for e in top[t]:
        out[t] += probs[t, e] * (np.tanh(h[t] @ w1[e]) @ w2[e])
    if with_shared:
      out += h @ w_shared
    h = out
  assert routings.weights.shape == (3, T, 2)
  assert routings.aux["probs"].shape == (3, T, E)
  np.testing.assert_allclose(y, h, rtol=1e-4, atol=1e-5)


def test_add_shared_experts():
  rng = np.random.default_rng(2)
  routed = rng.normal(size=(T, D)).astype(np.float32)
  shared = rng.normal(size=(2, T, D)).astype(np.float32)
  np.testing.assert_allclose(add_shared_experts(routed, shared),
                             routed + shared.sum(0), rtol=1e-6)
  gate = rng.uniform(size=(T, 2)).astype(np.float32)
  expected = (routed + gate[:, 0, None] * shared[0]
              + gate[:, 1, None] * shared[1])
  np.testing.assert_allclose(add_shared_experts(routed, shared, gate=gate),
                             expected, rtol=1e-5)
  with pytest.raises(ValueError, match="shared must be"):
    add_shared_experts(routed, shared[0])
  with pytest.raises(ValueError, match="gate.shape"):
    add_shared_experts(routed, shared, gate=gate.T)


def _lora(seed=3, rank=2, d_out=3):
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(E, D, rank)).astype(np.float32)
  b = rng.normal(size=(E, rank, d_out)).astype(np.float32)
  x = rng.normal(size=(T, D)).astype(np.float32)
  return x, a, b


def test_routed_lora_matches_a_numpy_loop():
  x, a, b = _lora()
  routing = top_k_routing(x, np.random.default_rng(4).normal(
      size=(D, E)).astype(np.float32), k=2, capacity_factor=0.5)
  delta = routed_lora(x, routing, a, b, scale=2.0)
  expected = np.zeros((T, b.shape[-1]))
  weights, experts = np.asarray(routing.weights), np.asarray(routing.experts)
  for t, j in np.ndindex(weights.shape):
    e = experts[t, j]
    expected[t] += 2.0 * weights[t, j] * (x[t] @ a[e] @ b[e])
  np.testing.assert_allclose(delta, expected, rtol=1e-4, atol=1e-5)
  assert int(routing.aux["num_dropped"]) > 0   # zero-weight slots exercised


def test_routed_lora_ignores_unused_slots_and_adds_the_base():
  x, a, b = _lora()
  weights = jnp.array([[0.7, 0.0]] * T)
  one = Routing(weights, jnp.array([[1, 0]] * T, jnp.int32), {})
  other = Routing(weights, jnp.array([[1, 3]] * T, jnp.int32), {})
  np.testing.assert_allclose(routed_lora(x, one, a, b),
                             routed_lora(x, other, a, b), rtol=1e-6)
  np.testing.assert_allclose(routed_lora(x, one, a, b),
                             0.7 * (x @ a[1] @ b[1]), rtol=1e-4, atol=1e-5)
  kernel = np.ones((D, b.shape[-1]), np.float32)
  bias = np.arange(b.shape[-1], dtype=np.float32)
  np.testing.assert_allclose(
      routed_lora_linear(x, kernel, one, a, b, scale=0.5, bias=bias),
      x @ kernel + bias + 0.5 * 0.7 * (x @ a[1] @ b[1]), rtol=1e-4,
      atol=1e-5)
  with pytest.raises(ValueError, match="expected x"):
    routed_lora(x, one, a, b[:, :1])


def test_routed_lora_gradient_reaches_adapters_and_router():
  x, a, b = _lora()
  w = np.random.default_rng(5).normal(size=(D, E)).astype(np.float32)
  def loss(a, b, w):
    return jnp.sum(routed_lora(x, top_k_routing(x, w, k=2), a, b) ** 2)
  grads = jax.grad(loss, argnums=(0, 1, 2))(a, b, w)
  for g in grads:
    assert np.isfinite(g).all() and np.abs(g).sum() > 0
