"""The DARTS candidate operations (NHWC), as in the official search space.

``PRIMITIVES`` lists the 8 operations in the order of the architecture
logits' columns (quark0/darts ``genotypes.py``). Every convolution is
bias-free; every BatchNorm is non-affine during search (``affine=False``)
and affine in the derived network. Pooling ops are followed by a
non-affine BatchNorm in the search network only.

References:
  Liu, Simonyan, Yang, *DARTS: Differentiable Architecture Search*, ICLR
  2019, §2.1 and Appendix A.1 (the operation set).
"""

import jax
import jax.numpy as jnp
from flax import nnx

PRIMITIVES = ("none", "max_pool_3x3", "avg_pool_3x3", "skip_connect",
              "sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5")


def batch_norm(channels: int, affine: bool,
               rngs: nnx.Rngs) -> nnx.BatchNorm:
  """BatchNorm over the last axis, with scale and bias iff ``affine``."""
  # PyTorch's defaults: momentum 0.1 (flax counts the complement), eps 1e-5.
  return nnx.BatchNorm(channels, use_scale=affine, use_bias=affine,
                       momentum=0.9, epsilon=1e-5, rngs=rngs)


def conv2d(c_in, c_out, kernel, stride=1, padding=0, dilation=1, groups=1,
           *, rngs):
  """A bias-free square convolution with PyTorch's symmetric padding."""
  return nnx.Conv(c_in, c_out, (kernel, kernel), strides=stride,
                  padding=((padding, padding), (padding, padding)),
                  kernel_dilation=dilation, feature_group_count=groups,
                  use_bias=False, rngs=rngs)


def _window(x, kernel, stride, padding, init, op):
  return jax.lax.reduce_window(
      x, init, op, (1, kernel, kernel, 1), (1, stride, stride, 1),
      ((0, 0), (padding, padding), (padding, padding), (0, 0)))


def max_pool(x: jax.Array, kernel: int, stride: int, padding: int
             ) -> jax.Array:
  """Max pooling of ``x [B, H, W, C]`` with ``-inf`` padding."""
  return _window(x, kernel, stride, padding, -jnp.inf, jax.lax.max)


def avg_pool(x: jax.Array, kernel: int, stride: int, padding: int
             ) -> jax.Array:
  """Average pooling, padded cells not counted (``count_include_pad=False``)."""
  total = _window(x, kernel, stride, padding, 0.0, jax.lax.add)
  count = _window(jnp.ones_like(x[:1, :, :, :1]), kernel, stride, padding,
                  0.0, jax.lax.add)
  return total / count


class ReLUConvBN(nnx.Module):
  """``BN(conv(relu(x)))``."""

  def __init__(self, c_in, c_out, kernel, stride, padding, affine, *, rngs):
    self.conv = conv2d(c_in, c_out, kernel, stride, padding, rngs=rngs)
    self.bn = batch_norm(c_out, affine, rngs)

  def __call__(self, x, train: bool):
    return self.bn(self.conv(jax.nn.relu(x)), use_running_average=not train)


class FactorizedReduce(nnx.Module):
  """Halves H and W: two 1×1 stride-2 convs (the second on the input
  shifted by one pixel) of ``c_out / 2`` channels each, concatenated."""

  def __init__(self, c_in, c_out, affine, *, rngs):
    if c_out % 2:
      raise ValueError(f"FactorizedReduce needs an even c_out, got {c_out}")
    self.conv_1 = conv2d(c_in, c_out // 2, 1, 2, rngs=rngs)
    self.conv_2 = conv2d(c_in, c_out // 2, 1, 2, rngs=rngs)
    self.bn = batch_norm(c_out, affine, rngs)

  def __call__(self, x, train: bool):
    x = jax.nn.relu(x)
    y = jnp.concatenate([self.conv_1(x), self.conv_2(x[:, 1:, 1:, :])], -1)
    return self.bn(y, use_running_average=not train)


class DilConv(nnx.Module):
  """ReLU, depthwise ``k×k`` conv (dilation ``d``), pointwise conv, BN."""

  def __init__(self, c_in, c_out, kernel, stride, padding, dilation, affine,
               *, rngs):
    self.depthwise = conv2d(c_in, c_in, kernel, stride, padding, dilation,
                           groups=c_in, rngs=rngs)
    self.pointwise = conv2d(c_in, c_out, 1, rngs=rngs)
    self.bn = batch_norm(c_out, affine, rngs)

  def __call__(self, x, train: bool):
    y = self.pointwise(self.depthwise(jax.nn.relu(x)))
    return self.bn(y, use_running_average=not train)


class SepConv(nnx.Module):
  """Two :class:`DilConv` of dilation 1, the first with the stride."""

  def __init__(self, c_in, c_out, kernel, stride, padding, affine, *, rngs):
    self.first = DilConv(c_in, c_in, kernel, stride, padding, 1, affine,
                         rngs=rngs)
    self.second = DilConv(c_in, c_out, kernel, 1, padding, 1, affine,
                          rngs=rngs)

  def __call__(self, x, train: bool):
    return self.second(self.first(x, train), train)


class Pool(nnx.Module):
  """3×3 max or average pooling, then (in search) a non-affine BN."""

  def __init__(self, kind, channels, stride, with_bn, *, rngs):
    self.kind, self.stride = kind, stride
    self.bn = batch_norm(channels, False, rngs) if with_bn else None

  def __call__(self, x, train: bool):
    pool = max_pool if self.kind == "max" else avg_pool
    y = pool(x, 3, self.stride, 1)
    return y if self.bn is None else self.bn(
        y, use_running_average=not train)


class Zero(nnx.Module):
  """``none``: zeros, strided like the other ops of the edge."""

  def __init__(self, stride):
    self.stride = stride

  def __call__(self, x, train: bool):
    del train
    return jnp.zeros_like(x[:, ::self.stride, ::self.stride, :])


class Identity(nnx.Module):
  """``skip_connect`` at stride 1."""

  def __call__(self, x, train: bool):
    del train
    return x


def make_op(name: str, channels: int, stride: int, affine: bool,
            search: bool, *, rngs: nnx.Rngs) -> nnx.Module:
  """The operation ``name`` of ``PRIMITIVES`` on ``channels`` channels.

  Args:
    name: one of ``PRIMITIVES``.
    channels: input and output channels ``C``.
    stride: 1, or 2 on a reduction cell's edges from its inputs.
    affine: whether BatchNorms have a scale and bias.
    search: whether this is the search network (pooling followed by BN).
    rngs: the parameter RNG streams.

  Raises:
    ValueError: an unknown name or stride.
  """
  c = channels
  if stride not in (1, 2):
    raise ValueError(f"stride must be 1 or 2, got {stride}")
  builders = {
      "none": lambda: Zero(stride),
      "max_pool_3x3": lambda: Pool("max", c, stride, search, rngs=rngs),
      "avg_pool_3x3": lambda: Pool("avg", c, stride, search, rngs=rngs),
      "skip_connect": lambda: Identity() if stride == 1 else
      FactorizedReduce(c, c, affine, rngs=rngs),
      "sep_conv_3x3": lambda: SepConv(c, c, 3, stride, 1, affine, rngs=rngs),
      "sep_conv_5x5": lambda: SepConv(c, c, 5, stride, 2, affine, rngs=rngs),
      "dil_conv_3x3": lambda: DilConv(c, c, 3, stride, 2, 2, affine,
                                      rngs=rngs),
      "dil_conv_5x5": lambda: DilConv(c, c, 5, stride, 4, 2, affine,
                                      rngs=rngs),
  }
  if name not in builders:
    raise ValueError(f"unknown DARTS operation {name!r}; valid: {PRIMITIVES}")
  return builders[name]()
