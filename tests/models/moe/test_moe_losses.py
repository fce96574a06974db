"""Tests of models/moe/losses.py against closed forms and numpy oracles."""

import hypothesis.strategies as st
import jax
import numpy as np
import pytest
from hypothesis import given, settings
from jax.sharding import PartitionSpec as P

from models.moe import (
    LBL_SCOPES,
    dynmole_loss,
    load_balancing_loss,
    router_entropy,
    router_z_loss,
    tsallis_entropy,
)

_SETTINGS = settings(max_examples=20, deadline=None, database=None,
                     derandomize=True)
_lbl = jax.jit(load_balancing_loss, static_argnames=("scope", "axis_name"))
# (sequences, tokens, experts, k)
SHAPES = [(1, 1, 1, 1), (1, 6, 4, 2), (3, 5, 6, 1), (2, 8, 8, 3)]


def _softmax(logits):
  z = np.exp(logits - logits.max(-1, keepdims=True))
  return z / z.sum(-1, keepdims=True)


def _routing_arrays(seed, sequences, tokens, experts, k, scale=1.0):
  """Random probabilities and the top-k mask of random other scores."""
  rng = np.random.default_rng(seed)
  probs = _softmax(scale * rng.normal(size=(sequences, tokens, experts)))
  scores = rng.normal(size=probs.shape)
  mask = scores >= np.sort(scores, -1)[..., -k:][..., :1]
  return probs.astype(np.float32), mask


@st.composite
def lbl_inputs(draw):
  shape = draw(st.sampled_from(SHAPES))
  seed = draw(st.integers(0, 2**32 - 1))
  scale = draw(st.sampled_from([0.1, 1.0, 4.0]))
  return _routing_arrays(seed, *shape, scale=scale)


def _switch(probs, mask):
  """Switch Transformer eq. 4, N Σ_i f_i P_i, pooled over all tokens."""
  n = probs.shape[-1]
  counts = mask.reshape(-1, n).sum(0).astype(np.float64)
  return n * np.sum(counts / counts.sum() * probs.reshape(-1, n).mean(0))


@_SETTINGS
@given(lbl_inputs())
def test_lbl_micro_batch_sequence_and_global_match_numpy(inputs):
  probs, mask = inputs
  micro = _lbl(probs, mask)
  np.testing.assert_allclose(micro, _switch(probs, mask), rtol=1e-5)
  per_sequence = np.mean([_switch(p, m) for p, m in zip(probs, mask)])
  np.testing.assert_allclose(_lbl(probs, mask, scope="sequence"),
                             per_sequence, rtol=1e-5)
  # One micro-batch on one device: global is the micro-batch loss.
  np.testing.assert_allclose(_lbl(probs, mask, scope="global"), micro,
                             rtol=1e-6)
  np.testing.assert_allclose(
      _lbl(probs, mask, scope="global",
           accumulated_counts=np.zeros(probs.shape[-1])), micro, rtol=1e-6)


def test_lbl_closed_forms():
  n, t = 4, 8
  uniform = np.full((t, n), 1 / n, np.float32)
  balanced = np.eye(n, dtype=bool)[np.arange(t) % n]
  collapsed = np.eye(n, dtype=np.float32)[np.zeros(t, int)]
  for scope in LBL_SCOPES:
    np.testing.assert_allclose(load_balancing_loss(uniform, balanced,
                                                   scope=scope), 1.0,
                               rtol=1e-6)
    np.testing.assert_allclose(load_balancing_loss(collapsed,
                                                   collapsed > 0,
                                                   scope=scope), n,
                               rtol=1e-6)


def test_lbl_sequence_scope_differs_from_micro_batch():
  # Sequence 0 routes to expert 0, sequence 1 to expert 1: each sequence
  # is collapsed (loss N), the pooled batch is balanced.
  n = 2
  probs = np.stack([np.eye(n)[[0, 0]], np.eye(n)[[1, 1]]]).astype(np.float32)
  np.testing.assert_allclose(load_balancing_loss(probs, probs > 0), 1.0)
  np.testing.assert_allclose(
      load_balancing_loss(probs, probs > 0, scope="sequence"), n)


def test_lbl_global_with_accumulated_counts():
  # Earlier micro-batch: every token chose expert 1. This one: expert 0.
  n = 3
  rng = np.random.default_rng(0)
  probs = _softmax(rng.normal(size=(4, n))).astype(np.float32)
  mask = np.eye(n, dtype=bool)[np.zeros(4, int)]
  earlier = np.array([0.0, 4.0, 0.0])
  global_loss = load_balancing_loss(probs, mask, scope="global",
                                    accumulated_counts=earlier)
  f_bar = np.array([4.0, 4.0, 0.0]) / 8.0
  np.testing.assert_allclose(global_loss,
                             n * np.sum(f_bar * probs.mean(0)), rtol=1e-6)
  micro = load_balancing_loss(probs, mask)
  np.testing.assert_allclose(micro, n * probs.mean(0)[0], rtol=1e-6)
  assert abs(float(global_loss) - float(micro)) > 0.05


def _per_device_oracle(probs, mask):
  n = probs.shape[-1]
  counts = mask.reshape(-1, n).sum(0)
  f_bar = counts / counts.sum()
  return np.array([n * np.sum(f_bar * p.mean(0)) for p in probs])


def test_lbl_global_psum_under_shard_map_and_vmap():
  if jax.device_count() < 8:
    pytest.skip("needs 8 simulated devices (tests/conftest.py sets them)")
  probs, mask = _routing_arrays(1, 8, 5, 4, 2, scale=2.0)
  # Devices see different experts: device d's choices shifted by d.
  mask = np.stack([np.roll(m, d, axis=-1) for d, m in enumerate(mask)])
  expected = _per_device_oracle(probs, mask)
  mesh = jax.make_mesh((8,), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))
  sharding = jax.sharding.NamedSharding(mesh, P("data"))

  def per_device(p, m):
    loss = load_balancing_loss(p[0], m[0], scope="global", axis_name="data")
    return loss[None]
  sharded = jax.jit(jax.shard_map(per_device, mesh=mesh,
                                  in_specs=(P("data"), P("data")),
                                  out_specs=P("data")))
  np.testing.assert_allclose(
      sharded(jax.device_put(probs, sharding), jax.device_put(mask, sharding)),
      expected, rtol=1e-5)
  vmapped = jax.vmap(
      lambda p, m: load_balancing_loss(p, m, scope="global",
                                       axis_name="data"), axis_name="data")
  np.testing.assert_allclose(vmapped(probs, mask), expected, rtol=1e-5)
  local = [load_balancing_loss(p, m) for p, m in zip(probs, mask)]
  assert np.abs(np.asarray(local) - expected).max() > 1e-3


def test_lbl_gradient_flows_through_probs_only():
  probs, mask = _routing_arrays(2, 1, 6, 4, 2)
  mask = mask.astype(np.float32)[0]
  grad_p, grad_m = jax.grad(load_balancing_loss, argnums=(0, 1))(
      probs[0], mask)
  f = mask.sum(0) / mask.sum()
  np.testing.assert_allclose(grad_p, np.broadcast_to(4 * f / 6, (6, 4)),
                             rtol=1e-6)
  np.testing.assert_array_equal(grad_m, 0.0)


def test_lbl_argument_errors():
  probs = np.full((2, 3), 1 / 3, np.float32)
  with pytest.raises(ValueError, match="scope='token' is not one of"):
    load_balancing_loss(probs, probs > 0, scope="token")
  with pytest.raises(ValueError, match="must match"):
    load_balancing_loss(probs, probs[:1] > 0)
  with pytest.raises(ValueError, match="need scope='global'"):
    load_balancing_loss(probs, probs > 0, axis_name="data")


def test_router_z_loss_and_entropy_match_numpy():
  rng = np.random.default_rng(3)
  logits = (3 * rng.normal(size=(2, 5, 4))).astype(np.float32)
  lse = np.log(np.exp(logits.astype(np.float64)).sum(-1))
  np.testing.assert_allclose(router_z_loss(logits), np.mean(lse**2),
                             rtol=1e-5)
  probs = _softmax(logits.astype(np.float64))
  np.testing.assert_allclose(router_entropy(probs.astype(np.float32)),
                             np.mean(-np.sum(probs * np.log(probs), -1)),
                             rtol=1e-5)
  np.testing.assert_allclose(router_entropy(np.full((3, 4), 0.25)),
                             np.log(4), rtol=1e-6)
  np.testing.assert_allclose(router_entropy(np.eye(4)), 0.0, atol=1e-7)


@pytest.mark.parametrize("q", [1.0, 1.1, 2.0])
def test_tsallis_entropy(q):
  n = 6
  np.testing.assert_allclose(
      tsallis_entropy(np.full((2, n), 1 / n), q=q, eps=0.0), 1.0, rtol=1e-5)
  np.testing.assert_allclose(tsallis_entropy(np.eye(n), q=q, eps=0.0), 0.0,
                             atol=1e-6)
  probs = _softmax(np.random.default_rng(4).normal(size=(3, n)))
  shifted = probs + 1e-5
  if q == 1.0:
    raw = -np.sum(shifted * np.log(shifted), -1)
    top = np.log(n)
  else:
    raw = (1 - np.sum(shifted**q, -1)) / (q - 1)
    top = (1 - n ** (1 - q)) / (q - 1)
  np.testing.assert_allclose(
      tsallis_entropy(probs.astype(np.float32), q=q, normalize=False), raw,
      rtol=1e-4)
  np.testing.assert_allclose(tsallis_entropy(probs.astype(np.float32), q=q),
                             raw / top, rtol=1e-4)
  np.testing.assert_array_equal(tsallis_entropy(np.ones((3, 1)), q=q), 0.0)


def test_dynmole_loss_matches_the_released_formula():
  rng = np.random.default_rng(5)
  probs = _softmax(rng.normal(size=(7, 4)))
  gates = probs * (rng.uniform(size=probs.shape) > 0.5)
  entropy = rng.uniform(size=7)
  expected = 1e-2 * entropy.mean() + 1e-3 * 4 * np.sum(
      gates.mean(0) * probs.mean(0))
  np.testing.assert_allclose(
      dynmole_loss(probs.astype(np.float32), gates.astype(np.float32),
                   entropy.astype(np.float32)), expected, rtol=1e-5)
