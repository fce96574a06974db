"""Tests of models/mlp.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import MLP


def _num_params(model):
  return sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_output_shape_and_layers():
  model = MLP(5, (8, 4), 3, rngs=nnx.Rngs(0))
  assert model(jnp.ones((7, 5))).shape == (7, 3)
  assert len(model.hidden) == 2
  assert _num_params(model) == (5 * 8 + 8) + (8 * 4 + 4) + (4 * 3 + 3)


def test_linear_classifier_param_count():
  model = MLP(64, (), 10, rngs=nnx.Rngs(0))
  assert len(model.hidden) == 0
  assert _num_params(model) == 64 * 10 + 10
  x = jax.random.normal(jax.random.key(1), (4, 64))
  kernel, bias = model.head.kernel[...], model.head.bias[...]
  np.testing.assert_allclose(model(x), x @ kernel + bias, rtol=1e-5,
                             atol=1e-5)


@pytest.mark.parametrize("shape", [(4, 6), (4,), (2, 4, 5)])
def test_wrong_input_shape_gives_a_clear_error(shape):
  model = MLP(5, (3,), 2, rngs=nnx.Rngs(0))
  expected = f"MLP expects inputs [batch, 5], got {shape}"
  with pytest.raises(ValueError) as info:
    model(jnp.ones(shape))
  assert str(info.value) == expected


def test_dtype_and_param_dtype():
  model = MLP(5, (3,), 2, dtype=jnp.bfloat16, param_dtype=jnp.float32,
              rngs=nnx.Rngs(0))
  assert model(jnp.ones((2, 5))).dtype == jnp.bfloat16
  assert {p.dtype for p in jax.tree.leaves(nnx.state(model))} == {
      jnp.dtype(jnp.float32)}
  half = MLP(5, (3,), 2, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  assert {p.dtype for p in jax.tree.leaves(nnx.state(half))} == {
      jnp.dtype(jnp.bfloat16)}


def test_split_merge_is_a_pure_function():
  model = MLP(5, (3,), 2, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  apply = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
  x = jnp.ones((2, 5))
  np.testing.assert_allclose(apply(state, x), model(x), rtol=1e-6)


def test_bad_sizes():
  with pytest.raises(ValueError, match="hidden_sizes=\\(4, 0\\)"):
    MLP(5, (4, 0), 2, rngs=nnx.Rngs(0))
