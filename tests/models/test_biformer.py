"""Tests of the full BiFormer model in models/biformer.py.

BiFormer: Zhu et al., "BiFormer: Vision Transformer with Bi-Level Routing
Attention", CVPR 2023. Parameter counts are those of the official PyTorch
models (rayleizhu/BiFormer), counted without allocating memory.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.biformer import (
    BiFormer,
    MultiHeadSelfAttention,
    biformer_base,
    biformer_small,
    biformer_tiny,
)


def _num_params(model) -> int:
  return sum(int(np.prod(p.shape))
             for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("constructor, expected", [
    (biformer_tiny, 13_142_760),
    (biformer_small, 25_536_232),
    (biformer_base, 56_804_968),
])
def test_official_parameter_counts(constructor, expected):
  model = nnx.eval_shape(lambda: constructor(nnx.Rngs(0)))
  assert _num_params(model) == expected


def test_param_dtype_separate_from_dtype():
  model = nnx.eval_shape(lambda: biformer_tiny(
      nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.float32))
  dtypes = {p.dtype for p in jax.tree.leaves(nnx.state(model, nnx.Param))}
  assert dtypes == {jnp.dtype(jnp.float32)}


def _apply(model, x, **kwargs):
  graphdef, state = nnx.split(model)
  return jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, **kwargs))(state, x)


def test_tiny_forward_224():
  """One eval forward of BiFormer-T at the ImageNet size (~10 s on 2 CPUs)."""
  model = biformer_tiny(nnx.Rngs(0))
  logits = _apply(model, jnp.ones((1, 224, 224, 3)))
  assert logits.shape == (1, 1000)
  assert bool(jnp.isfinite(logits).all())


def _small_model(**kwargs):
  """1 block per stage, 64-px input: maps 16/8/4/2, n_win 2."""
  return BiFormer(depths=(1, 1, 1, 1), embed_dims=(16, 32, 64, 128),
                  head_dim=16, n_win=2, topks=(1, 2, 4, -2), num_classes=5,
                  rngs=nnx.Rngs(0), **kwargs)


def test_drop_path_uses_dropout_stream_only_in_training():
  model = _small_model(drop_path_rate=0.5)
  x = jax.random.normal(jax.random.key(1), (4, 64, 64, 3))
  assert bool(jnp.isfinite(_apply(model, x)).all())  # eval: no rngs needed
  graphdef, state = nnx.split(model)
  with pytest.raises(ValueError, match="dropout"):  # raised while tracing
    jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, deterministic=False))(
        state, x)
  train = jax.jit(lambda s, x, key: nnx.merge(graphdef, s)(
      x, deterministic=False, rngs=nnx.Rngs(dropout=key)))
  train = [train(state, x, jax.random.key(seed)) for seed in (0, 0, 1)]
  np.testing.assert_array_equal(train[0], train[1])
  assert not np.allclose(train[0], train[2])


def test_layer_scale_and_bf16_compute():
  off = nnx.eval_shape(lambda: _small_model())
  on = nnx.eval_shape(lambda: _small_model(layer_scale_init_value=1e-5))
  assert _num_params(on) - _num_params(off) == 2 * (16 + 32 + 64 + 128)
  model = _small_model(dtype=jnp.bfloat16)
  logits = _apply(model, jnp.ones((2, 64, 64, 3)))
  assert logits.shape == (2, 5) and logits.dtype == jnp.bfloat16


def test_stage4_attention_matches_naive_mhsa():
  """``topk=-2`` mixer: 8 heads, bias-free qkv, head_dim scale, LePE on x."""
  with jax.enable_x64(True):
    attn = MultiHeadSelfAttention(64, side_dwconv=5, dtype=jnp.float64,
                                  param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    assert attn.qkv.bias is None
    x = jax.random.normal(jax.random.key(0), (2, 3, 5, 64), jnp.float64)
    tokens = x.reshape(2, 15, 64)
    q, k, v = np.split(np.asarray(tokens @ attn.qkv.kernel[...]), 3, axis=-1)
    out = np.zeros_like(q)
    for h in range(8):
      sl = slice(8 * h, 8 * h + 8)
      logits = q[..., sl] @ k[..., sl].transpose(0, 2, 1) / np.sqrt(8)
      p = np.exp(logits - logits.max(-1, keepdims=True))
      out[..., sl] = p / p.sum(-1, keepdims=True) @ v[..., sl]
    out = out + np.asarray(attn.lepe(x)).reshape(2, 15, 64)
    expected = out @ np.asarray(attn.proj.kernel[...]) + attn.proj.bias[...]
    np.testing.assert_allclose(attn(x).reshape(2, 15, 64), expected,
                               rtol=1e-10, atol=1e-10)
