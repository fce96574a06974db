"""Every dispatch path of models/moe/dispatch.py against the one-hot oracle.

Values and gradients (in ``x``, the routing weights and both expert weights)
of the sorted ``ragged_dot`` and Pallas paths must match the one-hot path,
which is itself checked against a plain numpy loop. Routings have empty
experts, uneven loads and unused (weight 0) slots pointing anywhere. The
Pallas grouped matmul runs in the interpreter with 8×8×8 tiles; every jitted
function sees a few fixed shapes so that it compiles once per shape.
"""

import functools

import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import strategies as st

import kernels
from models.moe import (
    DISPATCH_PATHS,
    Routing,
    apply_capacity,
    moe_ffn,
)

TILING = kernels.GroupedMatmulTiling(block_m=8, block_k=8, block_n=8)
PATH_KWARGS = {"one_hot": {}, "ragged_dot": {}, "pallas": {"tiling": TILING}}
FAST_PATHS = ("ragged_dot", "pallas")
TOL = dict(rtol=1e-5, atol=1e-5)
GRAD_TOL = dict(rtol=1e-4, atol=1e-5)
# (T, d, f, E, k, a capacity that drops): T·k rows straddle the 8-row tiles.
SHAPES = [(12, 6, 5, 4, 2, 3), (7, 4, 9, 6, 3, 2)]


def test_every_path_is_covered():
  assert set(PATH_KWARGS) == set(DISPATCH_PATHS)


@functools.partial(jax.jit,
                   static_argnames=("path", "capacity", "activation"))
def _value_and_grads(x, weights, experts, w_in, w_out, dy, *, path, capacity,
                     activation=jax.nn.gelu):
  """``(y, num_dropped, (dx, dweights, dw_in, dw_out))`` for ``⟨dy, y⟩``."""
  def ffn(x, weights, w_in, w_out):
    out = moe_ffn(x, Routing(weights, experts, {}), w_in, w_out,
                  activation=activation, path=path, capacity=capacity,
                  **PATH_KWARGS[path])
    return out.y, out.num_dropped
  y, vjp, num_dropped = jax.vjp(ffn, x, weights, w_in, w_out, has_aux=True)
  return y, num_dropped, vjp(dy)


def _routing(rng, num_tokens, num_experts, k, num_used, p_unused):
  """Distinct active experts drawn, with skewed odds, from ``num_used`` of
  them (the rest stay empty); unused slots get weight 0 and any expert."""
  pool = rng.permutation(num_experts)[:num_used]
  odds = 1.0 / np.arange(1, num_used + 1) ** 2
  experts = rng.integers(0, num_experts, (num_tokens, k))
  weights = rng.uniform(0.1, 1.0, (num_tokens, k))
  for t in range(num_tokens):
    chosen = rng.choice(pool, min(k, num_used), replace=False,
                        p=odds / odds.sum())
    experts[t, :chosen.size] = chosen
    weights[t, chosen.size:] = 0.0
  weights[rng.uniform(size=weights.shape) < p_unused] = 0.0
  return weights.astype(np.float32), experts.astype(np.int32)


def _problem(seed, num_tokens, dim, hidden, num_experts, k, num_used=None,
             p_unused=0.0):
  rng = np.random.default_rng(seed)
  num_used = num_experts if num_used is None else num_used
  weights, experts = _routing(rng, num_tokens, num_experts, k, num_used,
                              p_unused)
  normal = lambda *shape: rng.normal(size=shape).astype(np.float32)
  return (normal(num_tokens, dim), weights, experts,
          normal(num_experts, dim, hidden) / 2,
          normal(num_experts, hidden, dim) / 2, normal(num_tokens, dim))


def _assert_paths_agree(problem, capacity, paths=FAST_PATHS):
  want = _value_and_grads(*problem, path="one_hot", capacity=capacity)
  for path in paths:
    got = _value_and_grads(*problem, path=path, capacity=capacity)
    np.testing.assert_allclose(got[0], want[0], **TOL, err_msg=path)
    assert int(got[1]) == int(want[1]), path
    for name, g, w in zip(("dx", "dweights", "dw_in", "dw_out"), got[2],
                          want[2]):
      np.testing.assert_allclose(g, w, **GRAD_TOL, err_msg=f"{path} {name}")
  return want


@st.composite
def _cases(draw):
  shape = draw(st.sampled_from(SHAPES))
  num_experts = shape[3]
  return (shape, draw(st.integers(0, 2**16)),
          draw(st.integers(1, num_experts)),
          draw(st.sampled_from([0.0, 0.3])))


@hypothesis.settings(max_examples=10, deadline=None, derandomize=True,
                     database=None)
@hypothesis.given(_cases())
def test_fast_paths_match_one_hot_when_dropless(case):
  (num_tokens, dim, hidden, num_experts, k, _), seed, num_used, p_unused = case
  problem = _problem(seed, num_tokens, dim, hidden, num_experts, k, num_used,
                     p_unused)
  y, num_dropped, _ = _assert_paths_agree(problem, capacity=None)
  assert int(num_dropped) == 0
  # A token with no active slot gets exactly zero.
  idle = np.all(problem[1] == 0, axis=1)
  np.testing.assert_array_equal(np.asarray(y)[idle], 0.0)


@pytest.mark.parametrize("shape", SHAPES)
def test_fast_paths_match_one_hot_with_drops(shape):
  *sizes, capacity = shape
  problem = _problem(7, *sizes, num_used=2, p_unused=0.2)
  _, num_dropped, _ = _assert_paths_agree(problem, capacity=capacity)
  assert int(num_dropped) > 0


def _numpy_moe(x, weights, experts, w_in, w_out, capacity):
  """Slot-major queues, one assignment at a time, tanh experts, float64."""
  num_tokens, k = weights.shape
  capacity = num_tokens if capacity is None else capacity
  load, dropped = np.zeros(w_in.shape[0], int), 0
  y = np.zeros(x.shape)
  for j in range(k):
    for t in range(num_tokens):
      if weights[t, j] == 0:
        continue
      e = experts[t, j]
      if load[e] == capacity:
        dropped += 1
        continue
      load[e] += 1
      hidden = np.tanh(x[t].astype(np.float64) @ w_in[e])
      y[t] += weights[t, j] * (hidden @ w_out[e])
  return y, dropped


@pytest.mark.parametrize("capacity", [None, 2])
@pytest.mark.parametrize("path", DISPATCH_PATHS)
def test_matches_a_numpy_loop(path, capacity):
  problem = _problem(3, 9, 4, 6, 5, 2, num_used=4, p_unused=0.25)
  want_y, want_dropped = _numpy_moe(*problem[:5], capacity)
  y, num_dropped, _ = _value_and_grads(*problem, path=path, capacity=capacity,
                                       activation=jnp.tanh)
  np.testing.assert_allclose(y, want_y, **TOL)
  assert int(num_dropped) == want_dropped
  assert (want_dropped > 0) == (capacity is not None)


def _expert(x, w_in, w_out, e):
  return jax.nn.gelu(x @ w_in[e]) @ w_out[e]


@pytest.mark.parametrize("path", DISPATCH_PATHS)
def test_drops_are_slot_major_counted_and_leave_the_surviving_slots(path):
  # Capacity 2. First choices queue first: t0, t1 fill expert 0, t2 takes
  # expert 1, t3's first choice is dropped. Second choices: t0 gets expert 1
  # (its 2nd place), t1 (expert 1) and t2 (expert 0) are dropped, t3 gets
  # expert 2. Slot 2 is unused: weight 0 on a full expert takes no place.
  experts = np.array([[0, 1, 0], [0, 1, 0], [1, 0, 1], [0, 2, 0]], np.int32)
  weights = np.array([[.6, .4, 0], [.7, .3, 0], [.5, .5, 0], [.8, .2, 0]],
                     np.float32)
  x, _, _, w_in, w_out, dy = _problem(4, 4, 6, 5, 3, 3)
  y, num_dropped, _ = _value_and_grads(x, weights, experts, w_in, w_out, dy,
                                       path=path, capacity=2)
  assert int(num_dropped) == 3
  want = np.stack([
      .6 * _expert(x[0], w_in, w_out, 0) + .4 * _expert(x[0], w_in, w_out, 1),
      .7 * _expert(x[1], w_in, w_out, 0),
      .5 * _expert(x[2], w_in, w_out, 1),
      .2 * _expert(x[3], w_in, w_out, 2),
  ])
  np.testing.assert_allclose(y, want, **TOL)


def test_capacity_is_the_routers_capacity_rule():
  # moe_ffn(capacity=C) on a routing == dropless moe_ffn on the routing that
  # models.moe.apply_capacity cut to C, with the same drop count.
  x, weights, experts, w_in, w_out, dy = _problem(5, *SHAPES[0][:5],
                                                  num_used=2)
  routing = Routing(jnp.asarray(weights), jnp.asarray(experts), {})
  cut = apply_capacity(routing, SHAPES[0][3], 3)
  y, num_dropped, _ = _value_and_grads(x, weights, experts, w_in, w_out, dy,
                                       path="one_hot", capacity=3)
  y_cut, _, _ = _value_and_grads(x, cut.weights, cut.experts, w_in, w_out, dy,
                                 path="one_hot", capacity=None)
  np.testing.assert_allclose(y, y_cut, **TOL)
  assert int(num_dropped) == int(cut.aux["num_dropped"]) > 0


@pytest.mark.parametrize("path", DISPATCH_PATHS)
def test_unused_slots_contribute_nothing(path):
  x, weights, experts, w_in, w_out, dy = _problem(6, *SHAPES[0][:5],
                                                  p_unused=0.4)
  # Any expert on a weight-0 slot, even one the token already uses.
  moved = np.where(weights == 0, (experts + 1) % SHAPES[0][3], experts)
  moved[:, 1] = np.where(weights[:, 1] == 0, moved[:, 0], moved[:, 1])
  got = _value_and_grads(x, weights, moved, w_in, w_out, dy, path=path,
                         capacity=None)
  want = _value_and_grads(x, weights, experts, w_in, w_out, dy, path=path,
                          capacity=None)
  np.testing.assert_allclose(got[0], want[0], **TOL)
  for g, w in zip(got[2], want[2]):
    np.testing.assert_allclose(g, w, **GRAD_TOL)
  np.testing.assert_array_equal(np.asarray(got[2][1])[weights == 0], 0.0)


@pytest.mark.parametrize("path", DISPATCH_PATHS)
def test_bfloat16_tokens_keep_their_dtype(path):
  x, weights, experts, w_in, w_out, _ = _problem(8, *SHAPES[0][:5])
  routing = Routing(jnp.asarray(weights), jnp.asarray(experts), {})
  out = moe_ffn(jnp.asarray(x, jnp.bfloat16), routing, w_in, w_out,
                path=path, **PATH_KWARGS[path])
  want = moe_ffn(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32), routing,
                 w_in, w_out)
  assert out.y.dtype == jnp.bfloat16
  np.testing.assert_allclose(out.y.astype(jnp.float32), want.y, rtol=3e-2,
                             atol=3e-2)


def test_bad_arguments_raise():
  x, weights, experts, w_in, w_out, _ = _problem(9, 4, 3, 5, 2, 1)
  routing = Routing(jnp.asarray(weights), jnp.asarray(experts), {})
  with pytest.raises(ValueError, match="path='dense'"):
    moe_ffn(x, routing, w_in, w_out, path="dense")
  with pytest.raises(ValueError, match="tiling applies"):
    moe_ffn(x, routing, w_in, w_out, path="ragged_dot", tiling=TILING)
  with pytest.raises(ValueError, match="capacity=0"):
    moe_ffn(x, routing, w_in, w_out, capacity=0)
  with pytest.raises(ValueError, match=r"w_out.shape=\(2, 3, 3\)"):
    moe_ffn(x, routing, w_in, w_out[:, :3, :3])
  with pytest.raises(ValueError, match=r"weights.shape=\(3, 1\)"):
    moe_ffn(x, routing._replace(weights=routing.weights[:3]), w_in, w_out)
