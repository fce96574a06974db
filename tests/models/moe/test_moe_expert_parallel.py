"""Expert parallelism on 8 simulated CPU devices against one device.

With a capacity that cannot drop, :func:`expert_parallel_ffn` must equal the
dropless single-device layer; with a capacity ``C`` that drops, it must equal
the one-hot layer with capacity ``C`` applied to each device's block of
tokens. Both for the output, the drop count and the gradients in ``x``, the
routing weights and the expert weights.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from models.moe import (
    MoeOutput,
    Routing,
    expert_parallel_ffn,
    expert_parallel_ffn_local,
    moe_ffn,
    top_k_routing,
)

NUM_DEVICES = 8
TOL = dict(rtol=1e-5, atol=1e-5)
GRAD_TOL = dict(rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def mesh():
  assert len(jax.devices()) >= NUM_DEVICES, "tests/conftest.py sets 8 devices"
  return jax.make_mesh((NUM_DEVICES,), ("expert",),
                       axis_types=(jax.sharding.AxisType.Auto,))


def _problem(seed, tokens_per_device, dim, hidden, num_experts, k):
  """Skewed routing: most assignments on a few experts, some never used,
  and a quarter of the slots unused (weight 0, any expert)."""
  rng = np.random.default_rng(seed)
  num_tokens = NUM_DEVICES * tokens_per_device
  odds = 1.0 / np.arange(1, num_experts + 1) ** 2
  odds[num_experts // 2:] = 0.0
  experts = np.stack([
      rng.choice(num_experts, k, replace=False, p=odds / odds.sum())
      for _ in range(num_tokens)]).astype(np.int32)
  weights = rng.uniform(0.1, 1.0, (num_tokens, k)).astype(np.float32)
  unused = rng.uniform(size=weights.shape) < 0.25
  weights[unused] = 0.0
  experts[unused] = rng.integers(0, num_experts, unused.sum())
  normal = lambda *shape: rng.normal(size=shape).astype(np.float32)
  return (normal(num_tokens, dim), weights, experts,
          normal(num_experts, dim, hidden) / 2,
          normal(num_experts, hidden, dim) / 2, normal(num_tokens, dim))


def _blockwise_one_hot(x, routing, w_in, w_out, *, capacity):
  """The single-device layer on each device's block of tokens on its own."""
  split = lambda a: a.reshape(NUM_DEVICES, -1, *a.shape[1:])
  blocks = jax.vmap(
      lambda x, w, e: moe_ffn(x, Routing(w, e, {}), w_in, w_out,
                              capacity=capacity))(
      split(x), split(routing.weights), split(routing.experts))
  return MoeOutput(blocks.y.reshape(x.shape), jnp.sum(blocks.num_dropped))


@functools.partial(jax.jit, static_argnames=("layer",))
def _value_and_grads(layer, x, weights, experts, w_in, w_out, dy):
  def ffn(x, weights, w_in, w_out):
    out = layer(x, Routing(weights, experts, {}), w_in, w_out)
    return out.y, out.num_dropped
  y, vjp, num_dropped = jax.vjp(ffn, x, weights, w_in, w_out, has_aux=True)
  return y, num_dropped, vjp(dy)


def _assert_same(got, want):
  np.testing.assert_allclose(got[0], want[0], **TOL)
  assert int(got[1]) == int(want[1])
  for name, g, w in zip(("dx", "dweights", "dw_in", "dw_out"), got[2],
                        want[2]):
    np.testing.assert_allclose(g, w, **GRAD_TOL, err_msg=name)


# (tokens per device, d, f, E, k): one and two experts per device.
@pytest.mark.parametrize("shape", [(4, 6, 5, 8, 2), (3, 4, 7, 16, 3)])
def test_matches_dropless_single_device(mesh, shape):
  problem = _problem(0, *shape)
  # C = tokens per device: a token's experts are distinct, so nothing drops.
  ep = functools.partial(expert_parallel_ffn, mesh=mesh, capacity=shape[0])
  got = _value_and_grads(ep, *problem)
  _assert_same(got, _value_and_grads(moe_ffn, *problem))
  assert int(got[1]) == 0
  default = functools.partial(expert_parallel_ffn, mesh=mesh)
  np.testing.assert_array_equal(_value_and_grads(default, *problem)[0],
                                got[0])


def test_capacity_matches_the_one_hot_layer_per_device(mesh):
  problem = _problem(1, 4, 6, 5, 16, 2)
  ep = functools.partial(expert_parallel_ffn, mesh=mesh, capacity=1)
  got = _value_and_grads(ep, *problem)
  want = _value_and_grads(
      functools.partial(_blockwise_one_hot, capacity=1), *problem)
  _assert_same(got, want)
  assert int(got[1]) > 0


def test_devices_route_their_own_tokens(mesh):
  # Router and experts inside one shard_map: each device routes its tokens,
  # so gradients reach the router weights through the routing weights too.
  x, _, _, w_in, w_out, dy = _problem(2, 4, 6, 5, 8, 2)
  w_router = np.random.default_rng(3).normal(size=(6, 8)).astype(np.float32)

  def local(x, w_router, w_in, w_out):
    routing = top_k_routing(x, w_router, k=2)
    return expert_parallel_ffn_local(x, routing, w_in, w_out,
                                     axis_name="expert").y

  shard, whole = PartitionSpec("expert"), PartitionSpec()
  ep = jax.shard_map(local, mesh=mesh, in_specs=(shard, whole, shard, shard),
                     out_specs=shard)
  single = lambda x, w_router, w_in, w_out: moe_ffn(
      x, top_k_routing(x, w_router, k=2), w_in, w_out).y

  @jax.jit
  def value_and_grads(x, w_router, w_in, w_out, dy):
    results = []
    for layer in (ep, single):
      y, vjp = jax.vjp(layer, x, w_router, w_in, w_out)
      results.append((y, vjp(dy)))
    return results

  (got_y, got), (want_y, want) = value_and_grads(x, w_router, w_in, w_out, dy)
  np.testing.assert_allclose(got_y, want_y, **TOL)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, **GRAD_TOL)


def test_sizes_not_divisible_by_the_devices_raise(mesh):
  x, weights, experts, w_in, w_out, _ = _problem(4, 1, 4, 3, 8, 1)
  routing = Routing(jnp.asarray(weights), jnp.asarray(experts), {})
  with pytest.raises(ValueError, match="T=7 and experts E=8 must be"):
    expert_parallel_ffn(x[:7], routing._replace(
        weights=routing.weights[:7], experts=routing.experts[:7]),
                        w_in, w_out, mesh=mesh)
  with pytest.raises(ValueError, match="E=4 must be multiples of the 8"):
    expert_parallel_ffn(x, routing, w_in[:4], w_out[:4], mesh=mesh)
