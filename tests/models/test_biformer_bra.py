"""Tests of models/biformer.py (BRA) and kernels/routed_attention.py."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kernels import routed_attention_reference
from models.biformer import BiLevelRoutingAttention, load_official_bra_weights

_FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"
_F64 = dict(dtype=jnp.float64, param_dtype=jnp.float64)


def _fixture(name):
  path = _FIXTURES / f"bra_official_{name}.npz"
  with np.load(path, allow_pickle=False) as data:
    return {key: data[key] for key in data.files}


def _module_for(fixture, **kwargs):
  _, _, dim, heads, n_win, topk = (int(c) for c in fixture["config"])
  return BiLevelRoutingAttention(dim, heads, n_win, topk, **_F64, **kwargs,
                                 rngs=nnx.Rngs(0))


def _apply(module, x):
  """``module(x)`` under jit: eager forwards dispatch dozens of small ops."""
  graphdef, state = nnx.split(module)
  return jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)


_attention = jax.jit(routed_attention_reference, static_argnames="scale")


def _rel_err(actual, expected):
  return np.linalg.norm(actual - expected) / np.linalg.norm(expected)


@pytest.mark.parametrize("name", ["a", "b"])
def test_matches_official_module(name):
  fixture = _fixture(name)
  with jax.enable_x64(True):
    module = _module_for(fixture)
    load_official_bra_weights(module, fixture)
    y = np.asarray(_apply(module, jnp.asarray(fixture["x"])))
  assert y.dtype == np.float64
  assert _rel_err(y, fixture["y"]) <= 1e-6
  np.testing.assert_allclose(y, fixture["y"], rtol=1e-6, atol=1e-9)


def test_loads_torch_state_dict_layout():
  fixture = _fixture("a")
  state_dict = {
      "qkv.qkv.weight": fixture["qkv_kernel"].T,
      "qkv.qkv.bias": fixture["qkv_bias"],
      "lepe.weight": fixture["lepe_kernel"].transpose(3, 2, 0, 1),
      "lepe.bias": fixture["lepe_bias"],
      "wo.weight": fixture["out_kernel"].T,
      "wo.bias": fixture["out_bias"],
  }
  with jax.enable_x64(True):
    module = _module_for(fixture)
    load_official_bra_weights(module, state_dict)
    y = np.asarray(_apply(module, jnp.asarray(fixture["x"])))
  assert _rel_err(y, fixture["y"]) <= 1e-6


def _random_qkv(seed, batch=2, heads=2, regions=6, tq=5, tkv=5, d=4, dv=3):
  rng = np.random.default_rng(seed)
  return (rng.standard_normal((batch, heads, regions, tq, d)),
          rng.standard_normal((batch, heads, regions, tkv, d)),
          rng.standard_normal((batch, heads, regions, tkv, dv)))


def _softmax(x):
  e = np.exp(x - x.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def _loop_oracle(q, k, v, index, scale, kv_mask=None):
  """Per (batch, head, region) numpy attention over the routed keys."""
  q, k, v = np.asarray(q), np.asarray(k), np.asarray(v)
  out = np.zeros(q.shape[:-1] + v.shape[-1:])
  for b in range(q.shape[0]):
    for m in range(q.shape[1]):
      for r in range(q.shape[2]):
        keys = np.concatenate([k[b, m, j] for j in index[b, r]])
        values = np.concatenate([v[b, m, j] for j in index[b, r]])
        if kv_mask is not None:
          keep = np.concatenate([kv_mask[b, j] for j in index[b, r]])
          keys, values = keys[keep], values[keep]
        out[b, m, r] = _softmax(scale * q[b, m, r] @ keys.T) @ values
  return out


def test_all_regions_equals_dense_attention():
  with jax.enable_x64(True):
    q, k, v = _random_qkv(0)
    batch, heads, regions = q.shape[:3]
    rng = np.random.default_rng(0)
    # Any order of the routed regions: softmax is permutation invariant.
    index = np.stack([np.stack([rng.permutation(regions)
                                for _ in range(regions)])
                      for _ in range(batch)]).astype(np.int32)
    out = np.asarray(_attention(q, k, v, jnp.asarray(index), scale=0.3))
  flat = lambda t: np.reshape(t, (batch, heads, regions * t.shape[3], -1))
  dense = _softmax(0.3 * flat(q) @ flat(k).swapaxes(-1, -2)) @ flat(v)
  np.testing.assert_allclose(flat(out), dense, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("topk", [1, 3])
def test_matches_numpy_loop(topk):
  with jax.enable_x64(True):
    q, k, v = _random_qkv(1, tq=4, tkv=6)
    rng = np.random.default_rng(topk)
    index = rng.integers(0, q.shape[2], (q.shape[0], q.shape[2], topk),
                         dtype=np.int32)
    out = _attention(q, k, v, jnp.asarray(index), scale=0.5)
  np.testing.assert_allclose(out, _loop_oracle(q, k, v, index, 0.5),
                             rtol=1e-12, atol=1e-12)


def test_kv_mask_drops_masked_keys():
  with jax.enable_x64(True):
    q, k, v = _random_qkv(2)
    rng = np.random.default_rng(2)
    index = rng.integers(0, q.shape[2], (q.shape[0], q.shape[2], 2),
                         dtype=np.int32)
    kv_mask = rng.random((q.shape[0], q.shape[2], k.shape[3])) < 0.6
    kv_mask[..., 0] = True
    out = _attention(q, k, v, jnp.asarray(index), scale=0.5,
                     kv_mask=jnp.asarray(kv_mask))
  np.testing.assert_allclose(out, _loop_oracle(q, k, v, index, 0.5, kv_mask),
                             rtol=1e-12, atol=1e-12)


def _normal(seed, shape):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _small_module(**kwargs):
  return BiLevelRoutingAttention(8, 2, 4, 3, **kwargs, rngs=nnx.Rngs(0))


def test_not_divisible_raises_with_shape():
  x = jnp.zeros((1, 10, 12, 8))
  with pytest.raises(ValueError,
                     match=r"\(1, 10, 12, 8\).*height=10.*n_win=4"):
    _small_module()(x)


@pytest.mark.parametrize("mask_padding", [False, True])
def test_auto_pad_shape(mask_padding):
  x = _normal(3, (2, 10, 13, 8))
  module = _small_module(auto_pad=True, mask_padding=mask_padding)
  y = _apply(module, x)
  assert y.shape == x.shape
  assert np.isfinite(np.asarray(y)).all()


def test_auto_pad_pads_input_before_projection():
  """Official auto_pad: zero-pad the input, run, crop; padded keys count."""
  x = _normal(4, (1, 10, 13, 8))
  module = _small_module(auto_pad=True)
  padded = jnp.pad(x, ((0, 0), (0, 2), (0, 3), (0, 0)))
  expected = _apply(module, padded)[:, :10, :13]
  np.testing.assert_allclose(_apply(module, x), expected, rtol=1e-6,
                             atol=1e-6)
  masked = _small_module(auto_pad=True, mask_padding=True)
  assert not np.allclose(_apply(masked, x), expected, atol=1e-4)


@pytest.mark.parametrize("topk", [-2, -1, 0, 17])
def test_invalid_topk(topk):
  with pytest.raises(ValueError, match="topk"):
    BiLevelRoutingAttention(8, 2, 4, topk, rngs=nnx.Rngs(0))


def test_grad_under_jit_is_finite():
  x = _normal(5, (1, 8, 8, 8))
  graphdef, state = nnx.split(_small_module())
  loss = lambda s, x: jnp.sum(nnx.merge(graphdef, s)(x) ** 2)
  grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(state, x)
  assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(grads))


@pytest.mark.parametrize("auto_pad", [False, True])
def test_pallas_impl_matches_reference_values_and_grads(auto_pad):
  """The module with the fused kernel equals the reference module in its
  output and in the gradients of every parameter and of the input."""
  x = _normal(6, (2, 10, 13, 8) if auto_pad else (2, 8, 8, 8))
  kwargs = dict(auto_pad=auto_pad, mask_padding=auto_pad)
  reference = _small_module(**kwargs)
  fused = _small_module(**kwargs, attention_impl="pallas")

  def value_and_grads(module):
    graphdef, state = nnx.split(module)
    loss = lambda s, x: jnp.sum(jnp.sin(nnx.merge(graphdef, s)(x)))
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(state, x)

  want, got = value_and_grads(reference), value_and_grads(fused)
  for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
