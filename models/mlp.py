"""A multi-layer perceptron classifier (Flax NNX)."""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


class MLP(nnx.Module):
  """ReLU MLP from ``[batch, in_features]`` to ``[batch, num_classes]`` logits.

  ``hidden_sizes=()`` gives a linear (softmax-regression) classifier.

  Attributes:
    in_features: input width.
    hidden: the hidden ``nnx.Linear`` layers, in order.
    head: the output ``nnx.Linear`` layer.
  """

  def __init__(
      self,
      in_features: int,
      hidden_sizes: Sequence[int],
      num_classes: int,
      *,
      dtype: jnp.dtype = jnp.float32,
      param_dtype: jnp.dtype = jnp.float32,
      rngs: nnx.Rngs,
  ):
    """Builds the layers.

    Args:
      in_features: input width ``d``.
      hidden_sizes: widths of the hidden layers, possibly empty.
      num_classes: number of output logits.
      dtype: compute dtype.
      param_dtype: parameter dtype.
      rngs: NNX RNG streams for the initializers.

    Raises:
      ValueError: a non-positive size.
    """
    sizes = (in_features, *hidden_sizes, num_classes)
    if any(int(s) < 1 for s in sizes):
      raise ValueError(
          f"MLP sizes must be >= 1, got {in_features=},"
          f" hidden_sizes={tuple(hidden_sizes)}, {num_classes=}")
    self.in_features = in_features
    layers = [
        nnx.Linear(a, b, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        for a, b in zip(sizes[:-1], sizes[1:])
    ]
    self.hidden = nnx.List(layers[:-1])
    self.head = layers[-1]

  def __call__(self, x: jax.Array) -> jax.Array:
    """Applies the network.

    Args:
      x: ``[batch, in_features]``.

    Returns:
      Logits ``[batch, num_classes]`` in the compute dtype.

    Raises:
      ValueError: ``x`` is not ``[batch, in_features]``.
    """
    if x.ndim != 2 or x.shape[1] != self.in_features:
      raise ValueError(
          f"MLP expects inputs [batch, {self.in_features}], got {x.shape}")
    for layer in self.hidden:
      x = jax.nn.relu(layer(x))
    return self.head(x)
