"""Pure-function kernels of the DARTS operations (NHWC), fast on the CPU.

XLA's CPU convolution is slow for the grouped (depthwise) and dilated
convolutions that dominate the DARTS search space: a depthwise ``k×k``
convolution written as ``k²`` shifted multiply-adds fuses into one loop and
ran 2–5× faster forward+backward than ``lax.conv_general_dilated`` with
``feature_group_count = C`` (C = 16, 32×32, batch 32, 2-core CPU), and
pooling written the same way avoids ``select_and_scatter`` in the backward
pass. Pointwise convolutions are matrix products. Every function here
matches the PyTorch operation of the official code (``tests`` hold them
against ``lax`` convolutions and ``reduce_window``); all of them take one
example batch and are ``vmap``-ed over stacked edges by the supernet.

The price of the shifted taps is compile time: ``k²`` slices per
convolution, forward and backward, make a search network's step tens of
thousands of HLO ops, and XLA's CPU compile time grows faster than their
count (a 5-cell search step took over ten minutes). Within
``with kernels("xla"):`` the depthwise convolutions and the poolings trace
as XLA's own ``conv_general_dilated`` / ``reduce_window`` instead: the
same functions (the tests hold both to the same ``lax`` references), a few
times fewer ops, slower steps. The choice is made at trace time, so a
jitted function keeps the kernels it was traced with.

References:
  Liu, Simonyan, Yang, *DARTS: Differentiable Architecture Search*, ICLR
  2019, Appendix A.1 (the operations).
"""

import contextlib
import contextvars

import jax
import jax.numpy as jnp

BN_EPSILON = 1e-5
BN_MOMENTUM = 0.1  # PyTorch's: new = (1 − m)·old + m·batch.


KERNELS = ("taps", "xla")
_KERNELS = contextvars.ContextVar("darts_kernels", default="taps")


@contextlib.contextmanager
def kernels(name: str):
  """Within, depthwise convolutions and poolings trace as ``name`` (one of
  :data:`KERNELS`; module docstring).

  Raises:
    ValueError: an unknown name.
  """
  if name not in KERNELS:
    raise ValueError(f"unknown DARTS kernels {name!r}; valid: {KERNELS}")
  token = _KERNELS.set(name)
  try:
    yield
  finally:
    _KERNELS.reset(token)


def _xla_window(x, kernel, stride, padding, init, op):
  return jax.lax.reduce_window(
      x, init, op, (1, kernel, kernel, 1), (1, stride, stride, 1),
      ((0, 0), (padding, padding), (padding, padding), (0, 0)))


def _out_size(size: int, kernel: int, stride: int, padding: int,
              dilation: int) -> int:
  return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _taps(x: jax.Array, kernel: int, stride: int, padding: int,
          dilation: int, pad_value: float):
  """Yields ``((i, j), window)``: the input under tap ``(i, j)`` of a
  ``kernel×kernel`` window, for every output position ``[B, Ho, Wo, C]``."""
  b, h, w, c = x.shape
  ho = _out_size(h, kernel, stride, padding, dilation)
  wo = _out_size(w, kernel, stride, padding, dilation)
  if ho < 1 or wo < 1:
    raise ValueError(f"a {kernel}x{kernel} window (stride {stride}, padding "
                     f"{padding}, dilation {dilation}) does not fit input "
                     f"{x.shape}")
  xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)),
               constant_values=pad_value)
  for i in range(kernel):
    for j in range(kernel):
      start = (0, i * dilation, j * dilation, 0)
      limit = (b, i * dilation + stride * (ho - 1) + 1,
               j * dilation + stride * (wo - 1) + 1, c)
      yield (i, j), jax.lax.slice(xp, start, limit, (1, stride, stride, 1))


def depthwise_conv(x: jax.Array, kernel: jax.Array, stride: int = 1,
                   padding: int = 0, dilation: int = 1) -> jax.Array:
  """Depthwise convolution: ``x [B, H, W, C]``, ``kernel [k, k, C]``.

  ``y[b, p, q, c] = Σ_ij kernel[i, j, c] · x_pad[b, s·p + d·i, s·q + d·j, c]``
  (PyTorch ``Conv2d(C, C, k, s, padding, d, groups=C, bias=False)``).
  """
  k = kernel.shape[0]
  if kernel.shape != (k, k, x.shape[-1]):
    raise ValueError(f"kernel must be [k, k, {x.shape[-1]}], got "
                     f"{kernel.shape}")
  if _KERNELS.get() == "xla":
    return jax.lax.conv_general_dilated(
        x, kernel[:, :, None, :], (stride, stride), ((padding, padding),) * 2,
        rhs_dilation=(dilation, dilation),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=x.shape[-1])
  total = None
  for (i, j), window in _taps(x, k, stride, padding, dilation, 0.0):
    term = window * kernel[i, j]
    total = term if total is None else total + term
  return total


def pointwise_conv(x: jax.Array, weight: jax.Array) -> jax.Array:
  """A 1×1 convolution: ``x [B, H, W, Cin] @ weight [Cin, Cout]``."""
  return jnp.einsum("bhwc,cd->bhwd", x, weight)


def max_pool(x: jax.Array, kernel: int, stride: int, padding: int
             ) -> jax.Array:
  """Max pooling with ``−∞`` padding (PyTorch ``MaxPool2d``)."""
  if _KERNELS.get() == "xla":
    return _xla_window(x, kernel, stride, padding, -jnp.inf, jax.lax.max)
  total = None
  for _, window in _taps(x, kernel, stride, padding, 1, -jnp.inf):
    total = window if total is None else jnp.maximum(total, window)
  return total


def avg_pool(x: jax.Array, kernel: int, stride: int, padding: int
             ) -> jax.Array:
  """Average pooling, padding not counted (``count_include_pad=False``)."""
  if _KERNELS.get() == "xla":
    ones = jnp.ones((1,) + x.shape[1:3] + (1,), x.dtype)
    return (_xla_window(x, kernel, stride, padding, 0.0, jax.lax.add)
            / _xla_window(ones, kernel, stride, padding, 0.0, jax.lax.add))
  total = None
  for _, window in _taps(x, kernel, stride, padding, 1, 0.0):
    total = window if total is None else total + window
  ones = jnp.ones((1,) + x.shape[1:3] + (1,), x.dtype)
  count = sum(window for _, window in _taps(ones, kernel, stride, padding, 1,
                                            0.0))
  return total / count


def factorized_reduce(x: jax.Array, weight_1: jax.Array,
                      weight_2: jax.Array) -> jax.Array:
  """Halves H and W: ``[x[::2, ::2] @ W₁, x[1::2, 1::2] @ W₂]`` (the two
  1×1 stride-2 convolutions of the official ``FactorizedReduce``, the
  second on the input shifted by one pixel), before its BN, after its ReLU
  (the caller's)."""
  return jnp.concatenate([pointwise_conv(x[:, ::2, ::2], weight_1),
                          pointwise_conv(x[:, 1::2, 1::2], weight_2)], -1)


def batch_norm(x: jax.Array, stats: dict, train: bool,
               scale: jax.Array | None = None,
               bias: jax.Array | None = None) -> tuple[jax.Array, dict]:
  """BatchNorm over ``[B, H, W]`` per channel, as PyTorch's ``BatchNorm2d``.

  Training normalises with the batch's biased variance and moves the
  running statistics by ``BN_MOMENTUM`` towards the batch mean and the
  *unbiased* variance; evaluation uses the running statistics.

  Args:
    x: ``[B, H, W, C]``.
    stats: ``{"mean": [C], "var": [C]}`` running statistics.
    train: batch statistics (and updated running ones) or running ones.
    scale, bias: ``[C]`` affine parameters, or None (``affine=False``).

  Returns:
    ``(y, new_stats)``; ``new_stats is stats`` in evaluation.
  """
  if train:
    mean = jnp.mean(x, axis=(0, 1, 2))
    var = jnp.mean(jnp.square(x - mean), axis=(0, 1, 2))
    n = x.shape[0] * x.shape[1] * x.shape[2]
    unbiased = var * (n / max(n - 1, 1))
    new_stats = {
        "mean": (1 - BN_MOMENTUM) * stats["mean"] + BN_MOMENTUM
                * jax.lax.stop_gradient(mean),
        "var": (1 - BN_MOMENTUM) * stats["var"] + BN_MOMENTUM
               * jax.lax.stop_gradient(unbiased)}
  else:
    mean, var, new_stats = stats["mean"], stats["var"], stats
  y = (x - mean) * jax.lax.rsqrt(var + BN_EPSILON)
  if scale is not None:
    y = y * scale
  if bias is not None:
    y = y + bias
  return y, new_stats


def channel_shuffle(x: jax.Array, groups: int) -> jax.Array:
  """Interleaves ``groups`` channel groups of ``x [..., C]`` (ShuffleNet;
  PC-DARTS's ``channel_shuffle``)."""
  *lead, c = x.shape
  if c % groups:
    raise ValueError(f"{c} channels do not split into {groups} groups")
  x = x.reshape(*lead, groups, c // groups)
  return jnp.swapaxes(x, -1, -2).reshape(*lead, c)
