"""The routed-attention Pallas kernel against the ``jnp`` reference.

Both lowerings run in the Pallas interpreter on the CPU. Region sizes that
are not multiples of 16 (20 tokens, head widths 24 and 20) exercise the
padding; 16-token tiles on 40-token regions make every region span several
query and key blocks.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from kernels.routed_attention import IMPLEMENTATIONS

IMPLS = ("triton", "mosaic_tpu")
DEFAULT_TILES = kernels.RoutedAttentionTiling()
SMALL_TILES = kernels.RoutedAttentionTiling(block_q=16, block_kv=16)
SCALE = 0.3


def test_both_implementations_are_covered():
  assert set(IMPLS) == set(IMPLEMENTATIONS)


def _random_routes(key, batch, regions, topk):
  """``[batch, regions, topk]`` distinct region ids per query region."""
  keys = jax.random.split(key, batch * regions)
  pick = jax.vmap(lambda k: jax.random.permutation(k, regions)[:topk])(keys)
  return pick.reshape(batch, regions, topk).astype(jnp.int32)


def _problem(seed, *, batch=2, heads=2, regions=6, tokens=20, qk_dim=24,
             v_dim=20, topk=3, dtype=jnp.float32, masked=False):
  keys = jax.random.split(jax.random.key(seed), 6)
  q = jax.random.normal(keys[0], (batch, heads, regions, tokens, qk_dim))
  k = jax.random.normal(keys[1], (batch, heads, regions, tokens, qk_dim))
  v = jax.random.normal(keys[2], (batch, heads, regions, tokens, v_dim))
  dout = jax.random.normal(keys[3], (batch, heads, regions, tokens, v_dim))
  index = _random_routes(keys[4], batch, regions, topk)
  kv_mask = None
  if masked:
    kv_mask = jax.random.bernoulli(keys[5], 0.7, (batch, regions, tokens))
  cast = lambda x: x.astype(dtype)  # noqa: E731
  return cast(q), cast(k), cast(v), index, kv_mask, cast(dout)


@functools.partial(jax.jit, static_argnames=("fn",))
def _value_and_grads(fn, q, k, v, index, kv_mask, dout):
  out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, index, scale=SCALE,
                                         kv_mask=kv_mask), q, k, v)
  return (out, *vjp(dout))


@functools.cache  # One callable per configuration keeps the jit cache warm.
def _kernel(impl, tiling=DEFAULT_TILES):
  return functools.partial(kernels.routed_attention, tiling=tiling,
                           implementation=impl)


def _assert_close(got, want, rtol, atol):
  for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
    np.testing.assert_allclose(np.asarray(g, np.float32),
                               np.asarray(w, np.float32), rtol=rtol,
                               atol=atol, err_msg=name)


def _assert_matches_reference(impl, problem, tiling=None):
  kernel = _kernel(impl) if tiling is None else _kernel(impl, tiling)
  got = _value_and_grads(kernel, *problem)
  want = _value_and_grads(kernels.routed_attention_reference, *problem)
  _assert_close(got, want, rtol=1e-5, atol=2e-5)
  return got


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("topk", [1, 3])
def test_matches_reference_values_and_grads(impl, topk):
  _assert_matches_reference(impl, _problem(0, topk=topk))


@pytest.mark.parametrize("impl", IMPLS)
def test_several_blocks_per_region_with_key_mask(impl):
  problem = _problem(1, tokens=40, masked=True)
  _assert_matches_reference(impl, problem, SMALL_TILES)


@pytest.mark.parametrize("impl", IMPLS)
def test_all_regions_routed_is_dense_attention(impl):
  q, k, v, index, _, dout = _problem(2, topk=6)
  # Dense attention over every token of the image, per head.
  flat = lambda x: x.reshape(*x.shape[:2], -1, x.shape[-1])  # noqa: E731

  def dense(q, k, v):
    logits = jnp.einsum("bhqd,bhkd->bhqk", flat(q), flat(k)) * SCALE
    return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(logits), flat(v))

  out, vjp = jax.vjp(dense, q, k, v)
  want = (out.reshape(q.shape[:4] + v.shape[-1:]),
          *vjp(flat(dout)))
  got = _value_and_grads(_kernel(impl), q, k, v, index, None, dout)
  _assert_close(got, want, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_repeated_and_unrouted_regions(impl):
  q, k, v, _, _, dout = _problem(3)
  # Region 5 is routed to by nobody; some query regions repeat a region.
  rows = [[0, 0, 1], [1, 2, 2], [0, 1, 0], [2, 2, 2], [1, 1, 1], [0, 2, 4]]
  index = jnp.asarray([rows, rows[::-1]], jnp.int32)
  _, _, dk, dv = _assert_matches_reference(
      impl, (q, k, v, index, None, dout))
  assert not np.any(np.asarray(dk[:, :, 5])) and not np.any(
      np.asarray(dv[:, :, 5]))
  assert np.all(np.abs(np.asarray(dk[:, :, 4])).sum(axis=(2, 3)) > 0)


@pytest.mark.parametrize("impl", IMPLS)
def test_fully_masked_query_region_averages_its_keys(impl):
  """All routed keys of query region 0 masked: the reference's softmax of
  equal logits averages them; the 12 padded keys of each 20-token region
  must take no part in it."""
  q, k, v, index, _, dout = _problem(4)
  kv_mask = jnp.ones((2, 6, 20), bool).at[:, index[0, 0]].set(False)
  got = _assert_matches_reference(impl, (q, k, v, index, kv_mask, dout))
  routed = v[0][:, index[0, 0]].reshape(2, -1, v.shape[-1])
  np.testing.assert_allclose(got[0][0, :, 0],
                             np.broadcast_to(routed.mean(1)[:, None],
                                             got[0][0, :, 0].shape),
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_bfloat16_matches_float32_oracle(impl):
  """bf16 inputs: the float32 oracle on the same rounded inputs is the truth;
  the kernel must stay within bf16 rounding of it (float32 accumulation)."""
  problem = _problem(5, dtype=jnp.bfloat16, tokens=40)
  got = _value_and_grads(_kernel(impl), *problem)
  assert all(g.dtype == jnp.bfloat16 for g in got)
  upcast = [x.astype(jnp.float32) if x is not None and x.dtype == jnp.bfloat16
            else x for x in problem]
  want = _value_and_grads(kernels.routed_attention_reference, *upcast)
  for g, w in zip(got, want):
    err = np.max(np.abs(np.asarray(g, np.float32) - np.asarray(w)))
    assert err <= 2e-2 * np.max(np.abs(np.asarray(w))), err


def test_bad_shapes_raise_with_the_shapes():
  q, k, v, index, _, _ = _problem(6, batch=1, regions=4, tokens=16, topk=2)
  with pytest.raises(ValueError, match="region_index must be"):
    kernels.routed_attention(q, k, v, index[:, :3], scale=SCALE)
  with pytest.raises(ValueError, match="head_dim differ"):
    kernels.routed_attention(q, k[..., :8], v, index, scale=SCALE)
  with pytest.raises(ValueError, match="kv_mask must be"):
    kernels.routed_attention(q, k, v, index, scale=SCALE,
                             kv_mask=jnp.ones((1, 4, 8), bool))
  with pytest.raises(ValueError, match="implementation"):
    kernels.routed_attention(q, k, v, index, scale=SCALE,
                             implementation="cuda")


@pytest.mark.parametrize("field, value", [("block_q", 24), ("block_kv", 8),
                                          ("num_warps", 0)])
def test_bad_tiles_raise(field, value):
  with pytest.raises(ValueError, match=field):
    kernels.RoutedAttentionTiling(**{field: value})
