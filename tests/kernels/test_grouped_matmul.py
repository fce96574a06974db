"""The grouped matmul kernels against the ``jnp`` reference and ragged_dot.

Both lowerings (Triton-style tile loop, Mosaic-style scalar-prefetch work
list) run in the Pallas interpreter on the CPU, with 8×8×8 tiles so that tiny
shapes still straddle tile and group boundaries. Shapes are reused across the
explicit cases so that each compiles once.
"""

import functools

import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import strategies as st

import kernels
from kernels.grouped_matmul import IMPLEMENTATIONS

TILING = kernels.GroupedMatmulTiling(block_m=8, block_k=8, block_n=8)
IMPLS = ("triton", "mosaic_tpu")
F32_TOL = dict(rtol=1e-5, atol=1e-5)


def test_both_implementations_are_covered():
  assert set(IMPLS) == set(IMPLEMENTATIONS)


@functools.partial(jax.jit, static_argnames=("fn",))
def _value_and_grads(fn, lhs, rhs, group_sizes, dout):
  out, vjp = jax.vjp(lambda a, b: fn(a, b, group_sizes), lhs, rhs)
  return (out, *vjp(dout))


@functools.cache  # One callable per implementation keeps the jit cache warm.
def _kernel(impl):
  return functools.partial(kernels.grouped_matmul, tiling=TILING,
                           implementation=impl)


def _ragged_dot(lhs, rhs, group_sizes):
  return jax.lax.ragged_dot(lhs, rhs, group_sizes,
                            preferred_element_type=jnp.float32)


def _problem(seed, m, k, n, group_sizes, dtype=jnp.float32):
  keys = jax.random.split(jax.random.key(seed), 3)
  lhs = jax.random.normal(keys[0], (m, k), dtype)
  rhs = jax.random.normal(keys[1], (len(group_sizes), k, n), dtype)
  dout = jax.random.normal(keys[2], (m, n), dtype)
  return lhs, rhs, jnp.asarray(group_sizes, jnp.int32), dout


def _assert_matches(impl, lhs, rhs, group_sizes, dout, ragged=True):
  """Kernel == reference (and ragged_dot) for out, dlhs, drhs in float32."""
  got = _value_and_grads(_kernel(impl), lhs, rhs, group_sizes, dout)
  oracles = [kernels.grouped_matmul_reference]
  if ragged:
    oracles.append(_ragged_dot)
  for oracle in oracles:
    want = _value_and_grads(oracle, lhs, rhs, group_sizes, dout)
    for name, g, w in zip(("out", "dlhs", "drhs"), got, want):
      np.testing.assert_allclose(g, w, **F32_TOL, err_msg=f"{name} {oracle}")
  return got


# One compiled shape (M=19, K=11, N=13, G=4): none a multiple of the tile.
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("sizes", [
    [5, 0, 11, 3],   # uneven, an empty group inside a tile
    [3, 7, 0, 2],    # sums to 12 < M: rows 12..18 are zero
    [0, 19, 0, 0],   # one non-empty group spanning three tiles
    [1, 1, 1, 16],   # four groups in the first tile
    [0, 0, 0, 0],    # nothing routed: zero output and gradients
])
def test_matches_reference_and_ragged_dot(impl, sizes):
  lhs, rhs, group_sizes, dout = _problem(0, 19, 11, 13, sizes)
  out, _, drhs = _assert_matches(impl, lhs, rhs, group_sizes, dout)
  np.testing.assert_array_equal(out[sum(sizes):], 0.0)
  np.testing.assert_array_equal(drhs[np.asarray(sizes) == 0], 0.0)


@pytest.mark.parametrize("impl", IMPLS)
def test_single_group(impl):
  _assert_matches(impl, *_problem(1, 10, 9, 17, [10]))


@pytest.mark.parametrize("impl", IMPLS)
def test_sizes_past_m_are_cut_at_m(impl):
  lhs, rhs, group_sizes, dout = _problem(2, 19, 11, 13, [12, 12, 5, 0])
  got = _value_and_grads(_kernel(impl), lhs, rhs, group_sizes, dout)
  cut = jnp.array([12, 7, 0, 0], jnp.int32)
  want = _value_and_grads(kernels.grouped_matmul_reference, lhs, rhs, cut,
                          dout)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, **F32_TOL)


@pytest.mark.parametrize("impl", IMPLS)
def test_bfloat16_matches_float32_reference(impl):
  lhs, rhs, group_sizes, dout = _problem(3, 19, 11, 13, [5, 0, 11, 3],
                                         jnp.bfloat16)
  got = _value_and_grads(_kernel(impl), lhs, rhs, group_sizes, dout)
  assert [x.dtype for x in got] == [jnp.bfloat16] * 3
  up = lambda x: x.astype(jnp.float32)
  want = _value_and_grads(kernels.grouped_matmul_reference, up(lhs), up(rhs),
                          group_sizes, up(dout))
  for g, w in zip(got, want):
    np.testing.assert_allclose(up(g), w, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("impl", IMPLS)
def test_bfloat16_accumulates_in_float32(impl):
  # 1024 + 255 · 0.25 = 1087.75 rounds to 1088 in bf16; a bf16 accumulator
  # would stay at 1024 since each 8-term tile adds 2 < half its spacing of 8.
  column = jnp.full((256,), 0.25, jnp.bfloat16).at[0].set(1024)
  ones = jnp.ones((8, 256), jnp.bfloat16)
  rhs = jnp.broadcast_to(column[None, :, None], (1, 256, 8))
  out = kernels.grouped_matmul(ones, rhs, jnp.array([8], jnp.int32),
                               tiling=TILING, implementation=impl)
  np.testing.assert_array_equal(out.astype(jnp.float32), 1088.0)
  lhs = jnp.broadcast_to(column[:, None], (256, 8))
  drhs = kernels.transposed_grouped_matmul(
      lhs, ones.T, jnp.array([256], jnp.int32), tiling=TILING,
      implementation=impl)
  np.testing.assert_array_equal(drhs.astype(jnp.float32), 1088.0)


@pytest.mark.parametrize("impl", IMPLS)
def test_transposed_matches_reference(impl):
  lhs, _, group_sizes, dout = _problem(4, 19, 11, 13, [5, 0, 11, 3])
  got = kernels.transposed_grouped_matmul(lhs, dout, group_sizes,
                                          tiling=TILING, implementation=impl)
  want = kernels.transposed_grouped_matmul_reference(lhs, dout, group_sizes)
  np.testing.assert_allclose(got, want, **F32_TOL)


@st.composite
def _partitions(draw):
  """Random (M, K, N) and G sizes summing to at most M, empties included."""
  m, k, n = (draw(st.integers(1, hi)) for hi in (20, 12, 12))
  num_groups = draw(st.integers(1, 4))
  total = draw(st.integers(0, m))
  cuts = sorted(draw(st.lists(st.integers(0, total), min_size=num_groups - 1,
                              max_size=num_groups - 1)))
  sizes = np.diff([0, *cuts, total]).tolist()
  return m, k, n, sizes, draw(st.sampled_from(IMPLS))


@hypothesis.settings(max_examples=8, deadline=None, derandomize=True,
                     database=None)
@hypothesis.given(_partitions())
def test_random_shapes_and_partitions(case):
  m, k, n, sizes, impl = case
  _assert_matches(impl, *_problem(5, m, k, n, sizes))


@hypothesis.settings(max_examples=15, deadline=None, derandomize=True,
                     database=None)
@hypothesis.given(st.lists(st.integers(0, 12), min_size=4, max_size=4),
                  st.sampled_from(IMPLS))
def test_random_partitions_of_a_fixed_shape(sizes, impl):
  # Reuses the compiled M=19 shape; sizes past M exercise the cut.
  lhs, rhs, group_sizes, dout = _problem(6, 19, 11, 13, sizes)
  _assert_matches(impl, lhs, rhs, group_sizes, dout, ragged=sum(sizes) <= 19)


@pytest.mark.parametrize("shapes, match", [
    (((2, 3, 4), (2, 3, 5), (2,)), r"lhs.shape=\(2, 3, 4\)"),
    (((6, 3), (3, 5), (2,)), r"rhs.shape=\(3, 5\)"),
    (((6, 3), (2, 4, 5), (2,)), r"disagree on K.*\(6, 3\).*\(2, 4, 5\)"),
    (((6, 3), (2, 3, 5), (3,)), r"group_sizes.shape=\(3,\).*\(2, 3, 5\)"),
    (((6, 3), (2, 3, 5), (2, 1)), r"group_sizes.shape=\(2, 1\)"),
])
def test_bad_shapes_raise(shapes, match):
  lhs, rhs, sizes = (jnp.zeros(s) for s in shapes)
  with pytest.raises(ValueError, match=match):
    kernels.grouped_matmul(lhs, rhs, sizes.astype(jnp.int32))
  with pytest.raises(ValueError, match=match):
    kernels.grouped_matmul_reference(lhs, rhs, sizes.astype(jnp.int32))


def test_bad_arguments_raise():
  lhs, rhs = jnp.zeros((6, 3)), jnp.zeros((2, 3, 5))
  with pytest.raises(ValueError, match="integers"):
    kernels.grouped_matmul(lhs, rhs, jnp.zeros((2,)))
  with pytest.raises(ValueError, match="implementation='cuda'"):
    kernels.grouped_matmul(lhs, rhs, jnp.zeros((2,), jnp.int32),
                           implementation="cuda")
  with pytest.raises(ValueError, match=r"disagree on M.*\(6, 3\).*\(5, 5\)"):
    kernels.transposed_grouped_matmul(lhs, jnp.zeros((5, 5)),
                                      jnp.zeros((2,), jnp.int32))
  with pytest.raises(ValueError, match="powers of two"):
    kernels.grouped_matmul(lhs, rhs, jnp.zeros((2,), jnp.int32), tiling=TILING,
                           interpret=False, implementation="triton")
  with pytest.raises(ValueError, match="block_m=0"):
    kernels.GroupedMatmulTiling(block_m=0)


def test_empty_dimensions_give_zeros():
  for m, k, n, g in [(0, 3, 5, 2), (4, 0, 5, 2), (4, 3, 5, 0)]:
    lhs, rhs = jnp.ones((m, k)), jnp.ones((g, k, n))
    sizes = jnp.full((g,), m // max(g, 1), jnp.int32)
    out, dlhs, drhs = _value_and_grads(kernels.grouped_matmul, lhs, rhs,
                                       sizes, jnp.ones((m, n)))
    assert out.shape == (m, n) and dlhs.shape == lhs.shape
    assert drhs.shape == rhs.shape
    np.testing.assert_array_equal(out, 0.0)
