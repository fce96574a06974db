"""Tests of models/masking.py and models/resnet_cifar.py."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bilevel import Params
from models import (
    VALID_DEPTHS,
    MaskedConv,
    MaskedLinear,
    MaskScore,
    ResNetCIFAR,
    SmallCNN,
    merge_levels,
    sparsity,
    split_levels,
    updated_rest,
)

_X = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))


def _forward(model, train=False):
  """``model(_X)`` under jit: eager ResNet forwards cost seconds on CPU."""
  graphdef, state = nnx.split(model)
  apply = lambda state: nnx.merge(graphdef, state, copy=True)(_X, train=train)
  return jax.jit(apply)(state)


def _size(tree):
  return sum(leaf.size for leaf in jax.tree.leaves(tree))


def _variables(state):
  return jax.tree.leaves(state, is_leaf=lambda v: isinstance(v, nnx.Variable))


def _masked_layers(model):
  return [(path, node) for path, node in nnx.iter_graph(model)
          if isinstance(node, (MaskedConv, MaskedLinear))]


def _get(module, path):
  for key in path:
    module = module[key] if isinstance(key, int) else getattr(module, key)
  return module


def _expected_counts(depth, num_classes=10):
  """(weights, kernel entries) of He et al.'s option-A ResNet, from scratch."""
  n = (depth - 2) // 6
  convs = [(3, 16)]
  in_features = 16
  for width in (16, 32, 64):
    for _ in range(n):
      convs += [(in_features, width), (width, width)]
      in_features = width
  kernels = sum(3 * 3 * cin * cout for cin, cout in convs)
  bn_affine = sum(2 * cout for _, cout in convs)
  fc_kernel = 64 * num_classes
  return kernels + bn_affine + fc_kernel + num_classes, kernels + fc_kernel


@pytest.mark.parametrize("depth, expected, millions",
                         [(20, 269_722, 0.27), (56, 853_018, 0.85)])
def test_param_counts_match_the_paper(depth, expected, millions):
  weights_count, kernel_count = _expected_counts(depth)
  assert weights_count == expected
  assert round(weights_count / 1e6, 2) == millions
  masked = nnx.eval_shape(
      lambda: ResNetCIFAR(depth, mask_mode="unstructured", rngs=nnx.Rngs(0)))
  _, (scores, weights), rest = split_levels(masked, MaskScore)
  assert _size(weights) == weights_count
  assert _size(scores) == kernel_count
  assert {type(v) for v in _variables(rest)} == {nnx.BatchStat}
  plain = nnx.eval_shape(lambda: ResNetCIFAR(depth, rngs=nnx.Rngs(0)))
  assert _size(nnx.state(plain, nnx.Param)) == weights_count
  assert len(_masked_layers(plain)) == 6 * ((depth - 2) // 6) + 2


def test_split_levels_puts_scores_only_in_the_upper_pytree():
  model = ResNetCIFAR(20, mask_mode="filter", rngs=nnx.Rngs(0))
  graphdef, (scores, weights), rest = split_levels(model, MaskScore)
  assert {type(v) for v in _variables(scores)} == {MaskScore}
  assert len(_variables(scores)) == 20
  assert MaskScore not in {type(v) for v in _variables(weights)}
  assert {type(v) for v in _variables(weights)} == {nnx.Param}
  assert MaskScore not in {type(v) for v in _variables(rest)}
  rebuilt = merge_levels(graphdef, Params(scores, weights), rest)
  np.testing.assert_array_equal(_forward(rebuilt), _forward(model))
  with pytest.raises(ValueError, match="upper=MaskScore matches no variable"):
    split_levels(SmallCNN(rngs=nnx.Rngs(0)), MaskScore)
  _, (none_scores, _), _ = split_levels(SmallCNN(rngs=nnx.Rngs(0)), ())
  assert not _variables(none_scores)


def test_unstructured_mask_equals_zeroed_kernels():
  masked = ResNetCIFAR(20, mask_mode="unstructured", rngs=nnx.Rngs(0))
  graphdef, (scores, weights), rest = split_levels(masked, MaskScore)
  leaves, treedef = jax.tree.flatten(scores)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  pattern = jax.tree.unflatten(treedef, [
      jax.random.bernoulli(k, 0.5, leaf.shape).astype(leaf.dtype)
      for k, leaf in zip(keys, leaves)])
  masked = merge_levels(graphdef, Params(pattern, weights), rest)
  reference = ResNetCIFAR(20, rngs=nnx.Rngs(0))
  nnx.update(reference, weights)
  dense_out = _forward(reference)
  for path, layer in _masked_layers(masked):
    target = _get(reference, path)
    target.kernel[...] = jnp.where(layer.scores[...] == 0, 0.0,
                                   layer.kernel[...])
  out = _forward(masked)
  np.testing.assert_allclose(out, _forward(reference), rtol=1e-5, atol=1e-5)
  assert not np.allclose(out, dense_out, atol=1e-3)
  assert sparsity(pattern) == pytest.approx(0.5, abs=0.01)


def test_filter_mask_zeroes_one_output_channel():
  model = ResNetCIFAR(20, mask_mode="filter", rngs=nnx.Rngs(0))
  model.stem.scores[...] = jnp.ones((1, 1, 1, 16)).at[..., 5].set(0.0)
  pre_bn = model.stem(_X)
  assert pre_bn.shape == (2, 32, 32, 16)
  np.testing.assert_array_equal(pre_bn[..., 5], 0.0)
  assert np.all(np.abs(np.delete(pre_bn, 5, axis=-1)).sum((0, 1, 2)) > 0)
  assert sparsity(nnx.state(model, MaskScore)) == pytest.approx(
      1 / (16 + 6 * (16 + 32 + 64) + 10))


def test_channel_mask_and_injected_mask_fn():
  conv = MaskedConv(4, 6, 3, mask_mode="channel", mask_fn=jnp.square,
                    rngs=nnx.Rngs(0))
  assert conv.scores.shape == (1, 1, 4, 1)
  conv.scores[...] = jnp.array([1.0, 0.0, 0.5, 1.0]).reshape(1, 1, 4, 1)
  x = jax.random.normal(jax.random.key(2), (2, 8, 8, 4))
  scaled = x * jnp.array([1.0, 0.0, 0.25, 1.0])
  plain = MaskedConv(4, 6, 3, rngs=nnx.Rngs(0))
  np.testing.assert_allclose(conv(x), plain(scaled), rtol=1e-5, atol=1e-5)
  dense = MaskedLinear(4, 3, mask_mode="filter", rngs=nnx.Rngs(0))
  assert dense.scores.shape == (1, 3)


def test_jit_grad_wrt_scores_and_weights():
  model = ResNetCIFAR(20, mask_mode="unstructured", rngs=nnx.Rngs(0))
  graphdef, (scores, weights), rest = split_levels(model, MaskScore)
  labels = jnp.array([3, 7])

  @jax.jit
  @functools.partial(jax.value_and_grad, argnums=(0, 1), has_aux=True)
  def loss_fn(scores, weights, rest):
    model = merge_levels(graphdef, Params(scores, weights), rest)
    logits = model(_X, train=True)
    loss = -jnp.mean(jnp.take_along_axis(
        jax.nn.log_softmax(logits), labels[:, None], axis=1))
    return loss, updated_rest(model, rest)

  (loss, new_rest), (g_scores, g_weights) = loss_fn(scores, weights, rest)
  assert np.isfinite(loss)
  for grads, params in ((g_scores, scores), (g_weights, weights)):
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    assert sum(float(jnp.sum(jnp.abs(g))) for g in jax.tree.leaves(grads)) > 0
  moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), new_rest, rest)
  assert any(jax.tree.leaves(moved))


@pytest.mark.parametrize("make", [
    lambda **kw: SmallCNN(mask_mode="unstructured", **kw),
    lambda **kw: ResNetCIFAR(20, mask_mode="filter", **kw),
])
def test_dtype_and_param_dtype(make):
  model = make(dtype=jnp.bfloat16, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  assert _forward(model, train=True).dtype == jnp.bfloat16
  assert {p.dtype for p in jax.tree.leaves(nnx.state(model))} == {
      jnp.dtype(jnp.float32)}
  half = make(param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  assert {p.dtype for p in jax.tree.leaves(nnx.state(half, nnx.Param))} == {
      jnp.dtype(jnp.bfloat16)}


@pytest.mark.parametrize("shape", [(2, 32, 32), (2, 3, 32, 32), (2, 28, 28, 3)])
def test_wrong_input_shape_gives_a_clear_error(shape):
  model = SmallCNN(rngs=nnx.Rngs(0))
  with pytest.raises(ValueError) as info:
    model(jnp.ones(shape), train=False)
  assert str(info.value) == (
      f"SmallCNN expects inputs [batch, 32, 32, 3] (NHWC), got {shape}")
  resnet = nnx.eval_shape(lambda: ResNetCIFAR(20, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match=r"ResNetCIFAR-20 expects inputs"):
    resnet(jnp.ones(shape), train=False)


def test_bad_depth_and_mask_mode():
  with pytest.raises(ValueError, match=str(VALID_DEPTHS).replace("(", r"\(")
                     .replace(")", r"\)")):
    ResNetCIFAR(18, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="mask_mode='rows'"):
    SmallCNN(mask_mode="rows", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="undefined"):
    sparsity({})
