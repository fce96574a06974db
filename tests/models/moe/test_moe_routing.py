"""Tests of models/moe/routing.py: capacity and the dense views of a routing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.moe import (
    Routing,
    apply_capacity,
    dense_mask,
    dense_weights,
    expert_capacity,
    num_active,
    router_logits,
    top_k_of_probs,
)


def _routing(weights, experts):
  return Routing(jnp.asarray(weights, jnp.float32),
                 jnp.asarray(experts, jnp.int32), {})


def test_expert_capacity_formula():
  assert expert_capacity(10, 4, 2, 1.0) == 5           # ceil(1·10·2/4)
  assert expert_capacity(10, 4, 2, 1.25) == 7          # ceil(6.25)
  assert expert_capacity(10, 4, 1, 0.01) == 1          # min_capacity
  assert expert_capacity(10, 4, 1, 0.01, min_capacity=4) == 4
  assert expert_capacity(10, 2, 2, 8.0) == 10          # at most T
  with pytest.raises(ValueError, match="capacity_factor"):
    expert_capacity(10, 4, 2, 0.0)


def test_apply_capacity_hand_example():
  # Four tokens, two slots, two experts, one slot per expert. First choices
  # are served before second choices, tokens in order.
  routing = _routing([[.6, .4], [.7, .3], [.5, .5], [.9, 0.]],
                     [[0, 1], [1, 0], [0, 1], [1, 0]])
  out = apply_capacity(routing, 2, 1)
  np.testing.assert_allclose(out.weights,
                             [[.6, 0.], [.7, 0.], [0., 0.], [0., 0.]])
  np.testing.assert_array_equal(out.experts, [[0, 0], [1, 0], [0, 0], [0, 0]])
  # Wanted: 7 active assignments; kept: 2.
  assert int(out.aux["num_dropped"]) == 5
  np.testing.assert_array_equal(out.aux["dropped_load"], [2, 3])
  assert int(out.aux["capacity"]) == 1


def test_apply_capacity_large_capacity_is_identity():
  routing = _routing([[.6, .4], [.7, .3]], [[0, 1], [1, 0]])
  out = apply_capacity(routing, 2, 2)
  np.testing.assert_array_equal(out.weights, routing.weights)
  assert int(out.aux["num_dropped"]) == 0


def test_dense_views():
  routing = _routing([[.6, .4], [1., 0.]], [[2, 0], [1, 0]])
  np.testing.assert_allclose(dense_weights(routing, 3),
                             [[.4, 0., .6], [0., 1., 0.]])
  np.testing.assert_array_equal(dense_mask(routing, 3),
                                [[True, False, True], [False, True, False]])
  np.testing.assert_array_equal(num_active(routing), [2, 1])


def test_top_k_of_probs_ties_and_renormalisation():
  probs = jnp.array([[.25, .25, .5]])
  weights, experts = top_k_of_probs(probs, 2)
  np.testing.assert_array_equal(experts, [[2, 0]])   # tie: lower index
  weights, _ = top_k_of_probs(probs, 2, renormalize=True)
  np.testing.assert_allclose(weights, [[2 / 3, 1 / 3]], rtol=1e-6)
  with pytest.raises(ValueError, match=r"k=4 must lie in \[1, num_experts=3\]"):
    top_k_of_probs(probs, 4)


def test_router_logits_f32_and_shape_error():
  x = jnp.ones((3, 2), jnp.bfloat16)
  assert router_logits(x, jnp.ones((2, 5))).dtype == jnp.float32
  with pytest.raises(ValueError, match="x.shape=\\(3, 2\\)"):
    router_logits(x, jnp.ones((3, 5)))


def test_routing_is_a_pytree_through_jit():
  routing = _routing([[.6, .4]], [[0, 1]])
  routing.aux["n"] = jnp.int32(3)
  out = jax.jit(lambda r: r)(routing)
  assert isinstance(out, Routing) and int(out.aux["n"]) == 3
