"""The DARTS candidate operations and building blocks as NNX modules (NHWC).

``PRIMITIVES`` lists the 8 operations in the order of the architecture
logits' columns (quark0/darts ``genotypes.py``). Every convolution is
bias-free; BatchNorms are non-affine during search (``affine=False``) and
affine in the derived network; pooling is followed by a non-affine BN in the
search network only. The arithmetic is :mod:`models.darts.functional`.

Weights are initialised like PyTorch's defaults, ``U(±1/√fan_in)``, from a
:class:`UniformSource`: one ``jax.random`` draw per power-of-two chunk
instead of one compiled initializer per distinct shape, which is what made
building the ~1000-tensor supernet take tens of seconds.

References:
  Liu, Simonyan, Yang, *DARTS: Differentiable Architecture Search*, ICLR
  2019, §2.1 and Appendix A.1 (the operation set).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.darts import functional as F

PRIMITIVES = ("none", "max_pool_3x3", "avg_pool_3x3", "skip_connect",
              "sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5")


class UniformSource:
  """``U(−1, 1)`` samples from an explicit key, handed out as NumPy arrays.

  Draws ``jax.random.uniform`` in chunks of ``max(2¹⁶, 2^⌈log₂ n⌉)``
  samples (few distinct shapes, so few compilations) and serves the
  requests in order: the same key and the same sequence of requests give
  the same weights.
  """

  MIN_CHUNK = 1 << 16

  def __init__(self, key: jax.Array):
    self._key = key
    self._buffer = np.empty(0, np.float32)

  @classmethod
  def of(cls, rngs: "nnx.Rngs | UniformSource") -> "UniformSource":
    """``rngs`` itself if it is a source, else a source on its params key."""
    return rngs if isinstance(rngs, cls) else cls(rngs.params())

  def uniform(self, shape: tuple[int, ...]) -> np.ndarray:
    size = math.prod(shape)
    while self._buffer.size < size:
      self._key, key = jax.random.split(self._key)
      chunk = max(self.MIN_CHUNK, 1 << max(size - 1, 1).bit_length())
      draw = jax.random.uniform(key, (chunk,), jnp.float32, -1.0, 1.0)
      self._buffer = np.concatenate([self._buffer, np.asarray(draw)])
    out, self._buffer = self._buffer[:size], self._buffer[size:]
    return out.reshape(shape)

  def kaiming(self, shape: tuple[int, ...], fan_in: int) -> jax.Array:
    """PyTorch's default conv / linear weight init, ``U(±1/√fan_in)``."""
    return jnp.asarray(self.uniform(shape) / np.sqrt(fan_in))


def _constant(shape, value) -> jax.Array:
  return jnp.asarray(np.full(shape, value, np.float32))


class BatchNorm(nnx.Module):
  """PyTorch-style ``BatchNorm2d`` (:func:`functional.batch_norm`)."""

  def __init__(self, channels: int, affine: bool, *, rngs=None):
    del rngs  # deterministic init; accepted for a uniform signature
    self.scale = nnx.Param(_constant([channels], 1.0)) if affine else None
    self.bias = nnx.Param(_constant([channels], 0.0)) if affine else None
    self.mean = nnx.BatchStat(_constant([channels], 0.0))
    self.var = nnx.BatchStat(_constant([channels], 1.0))

  def __call__(self, x: jax.Array, train: bool | None = None, *,
               use_running_average: bool | None = None) -> jax.Array:
    if train is None:
      if use_running_average is None:
        raise TypeError("BatchNorm needs train or use_running_average")
      train = not use_running_average
    stats = {"mean": self.mean[...], "var": self.var[...]}
    y, new = F.batch_norm(x, stats, train,
                          None if self.scale is None else self.scale[...],
                          None if self.bias is None else self.bias[...])
    if train:
      # set_value: see EdgeStack.__call__.
      self.mean.set_value(new["mean"])
      self.var.set_value(new["var"])
    return y


def batch_norm(channels: int, affine: bool, rngs=None) -> BatchNorm:
  """A :class:`BatchNorm` (kept for callers of the earlier helper)."""
  return BatchNorm(channels, affine, rngs=rngs)


class Conv(nnx.Module):
  """A dense bias-free ``k×k`` convolution, PyTorch's symmetric padding."""

  def __init__(self, c_in, c_out, kernel, stride=1, padding=0, dilation=1,
               *, rngs):
    fan_in = c_in * kernel * kernel
    self.kernel = nnx.Param(UniformSource.of(rngs).kaiming(
        (kernel, kernel, c_in, c_out), fan_in))
    self.stride, self.padding, self.dilation = stride, padding, dilation

  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.kernel[...]
    if kernel.shape[:2] == (1, 1) and self.stride == 1 and not self.padding:
      return F.pointwise_conv(x, kernel[0, 0])
    p = self.padding
    return jax.lax.conv_general_dilated(
        x, kernel, (self.stride,) * 2, ((p, p), (p, p)),
        rhs_dilation=(self.dilation,) * 2,
        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def conv2d(c_in, c_out, kernel, stride=1, padding=0, dilation=1, *,
           rngs) -> Conv:
  """A :class:`Conv` (kept for callers of the earlier helper)."""
  return Conv(c_in, c_out, kernel, stride, padding, dilation, rngs=rngs)


class Dense(nnx.Module):
  """``x @ W + b`` with PyTorch ``Linear``'s init."""

  def __init__(self, c_in: int, c_out: int, *, rngs):
    source = UniformSource.of(rngs)
    self.kernel = nnx.Param(source.kaiming((c_in, c_out), c_in))
    self.bias = nnx.Param(source.kaiming((c_out,), c_in))

  def __call__(self, x: jax.Array) -> jax.Array:
    return x @ self.kernel[...] + self.bias[...]


class ConvBN(nnx.Module):
  """``BN(conv(x))``: the network stem."""

  def __init__(self, c_in, c_out, kernel, stride, padding, affine, *, rngs):
    self.conv = Conv(c_in, c_out, kernel, stride, padding, rngs=rngs)
    self.bn = BatchNorm(c_out, affine)

  def __call__(self, x, train: bool):
    return self.bn(self.conv(x), train)


class ReLUConvBN(nnx.Module):
  """``BN(conv(relu(x)))``."""

  def __init__(self, c_in, c_out, kernel, stride, padding, affine, *, rngs):
    self.conv = Conv(c_in, c_out, kernel, stride, padding, rngs=rngs)
    self.bn = BatchNorm(c_out, affine)

  def __call__(self, x, train: bool):
    return self.bn(self.conv(jax.nn.relu(x)), train)


class FactorizedReduce(nnx.Module):
  """Halves H and W: two 1×1 stride-2 convs (the second on the input
  shifted by one pixel) of ``c_out / 2`` channels each, concatenated."""

  def __init__(self, c_in, c_out, affine, *, rngs):
    if c_out % 2:
      raise ValueError(f"FactorizedReduce needs an even c_out, got {c_out}")
    source = UniformSource.of(rngs)
    self.weight_1 = nnx.Param(source.kaiming((c_in, c_out // 2), c_in))
    self.weight_2 = nnx.Param(source.kaiming((c_in, c_out // 2), c_in))
    self.bn = BatchNorm(c_out, affine)

  def __call__(self, x, train: bool):
    y = F.factorized_reduce(jax.nn.relu(x), self.weight_1[...],
                            self.weight_2[...])
    return self.bn(y, train)


class DilConv(nnx.Module):
  """ReLU, depthwise ``k×k`` conv (dilation ``d``), pointwise conv, BN."""

  def __init__(self, c_in, c_out, kernel, stride, padding, dilation, affine,
               *, rngs):
    source = UniformSource.of(rngs)
    self.depthwise = nnx.Param(source.kaiming((kernel, kernel, c_in),
                                              kernel * kernel))
    self.pointwise = nnx.Param(source.kaiming((c_in, c_out), c_in))
    self.bn = BatchNorm(c_out, affine)
    self.stride, self.padding, self.dilation = stride, padding, dilation

  def __call__(self, x, train: bool):
    y = F.depthwise_conv(jax.nn.relu(x), self.depthwise[...], self.stride,
                         self.padding, self.dilation)
    return self.bn(F.pointwise_conv(y, self.pointwise[...]), train)


class SepConv(nnx.Module):
  """Two :class:`DilConv` of dilation 1, the first with the stride."""

  def __init__(self, c_in, c_out, kernel, stride, padding, affine, *, rngs):
    source = UniformSource.of(rngs)
    self.first = DilConv(c_in, c_in, kernel, stride, padding, 1, affine,
                         rngs=source)
    self.second = DilConv(c_in, c_out, kernel, 1, padding, 1, affine,
                          rngs=source)

  def __call__(self, x, train: bool):
    return self.second(self.first(x, train), train)


class Pool(nnx.Module):
  """3×3 max or average pooling, then (in search) a non-affine BN."""

  def __init__(self, kind, channels, stride, with_bn, *, rngs=None):
    del rngs
    self.kind, self.stride = kind, stride
    self.bn = BatchNorm(channels, False) if with_bn else None

  def __call__(self, x, train: bool):
    pool = F.max_pool if self.kind == "max" else F.avg_pool
    y = pool(x, 3, self.stride, 1)
    return y if self.bn is None else self.bn(y, train)


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
            search: bool, *, rngs) -> nnx.Module:
  """The operation ``name`` of ``PRIMITIVES`` on ``channels`` channels.

  Args:
    name: one of ``PRIMITIVES``.
    channels: input and output channels ``C``.
    stride: 1, or 2 on a reduction cell's edges from its inputs.
    affine: whether BatchNorms have a scale and bias.
    search: whether this is the search network (pooling followed by BN).
    rngs: ``nnx.Rngs`` (its ``params`` stream) or a :class:`UniformSource`.

  Raises:
    ValueError: an unknown name or stride.
  """
  c = channels
  if stride not in (1, 2):
    raise ValueError(f"stride must be 1 or 2, got {stride}")
  builders = {
      "none": lambda: Zero(stride),
      "max_pool_3x3": lambda: Pool("max", c, stride, search),
      "avg_pool_3x3": lambda: Pool("avg", c, stride, search),
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
