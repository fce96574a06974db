"""The DARTS kernels against XLA's convolution and pooling, and PyTorch's
BatchNorm formulas written out in NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.darts import functional as F


def _lax_depthwise(x, kernel, stride, padding, dilation):
  c = x.shape[-1]
  return jax.lax.conv_general_dilated(
      x, kernel[:, :, None, :], (stride, stride),
      ((padding, padding), (padding, padding)), rhs_dilation=(dilation,) * 2,
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c)


def _window(x, kernel, stride, padding, init, op):
  return jax.lax.reduce_window(
      x, init, op, (1, kernel, kernel, 1), (1, stride, stride, 1),
      ((0, 0), (padding, padding), (padding, padding), (0, 0)))


@pytest.fixture(scope="module")
def x():
  return jax.random.normal(jax.random.key(0), (2, 9, 8, 3))


# sep 3x3 / 5x5 at stride 1 and 2, dil 3x3 / 5x5 (padding 2 / 4).
CONVS = [(3, 1, 1, 1), (5, 2, 2, 1), (3, 2, 2, 2), (5, 1, 4, 2)]


@pytest.mark.parametrize("kernels", F.KERNELS)
@pytest.mark.parametrize(("kernel", "stride", "padding", "dilation"), CONVS)
def test_depthwise_conv_equals_grouped_lax_conv(x, kernel, stride, padding,
                                                dilation, kernels):
  k = jax.random.normal(jax.random.key(1), (kernel, kernel, 3))
  with F.kernels(kernels):
    got = F.depthwise_conv(x, k, stride, padding, dilation)
  np.testing.assert_allclose(
      got, _lax_depthwise(x, k, stride, padding, dilation), rtol=1e-5,
      atol=1e-5)


def test_both_kernels_have_the_same_gradients(x):
  """The shifted taps and XLA's ops, differentiated: conv and pools."""
  k = jax.random.normal(jax.random.key(1), (5, 5, 3))

  def loss(x, k):
    y = F.depthwise_conv(x, k, 2, 4, 2)
    return (jnp.sum(jnp.sin(y)) + jnp.sum(jnp.cos(F.max_pool(x, 3, 2, 1)))
            + jnp.sum(jnp.sin(F.avg_pool(x, 3, 1, 1))))

  grads = {}
  for kernels in F.KERNELS:
    with F.kernels(kernels):
      grads[kernels] = jax.grad(loss, argnums=(0, 1))(x, k)
  for taps, xla in zip(grads["taps"], grads["xla"]):
    np.testing.assert_allclose(taps, xla, rtol=1e-4, atol=1e-5)


def test_unknown_kernels_are_refused():
  with pytest.raises(ValueError, match="'cudnn'"), F.kernels("cudnn"):
    pass


def test_depthwise_conv_refuses_a_mismatched_kernel(x):
  with pytest.raises(ValueError, match=r"kernel must be \[k, k, 3\]"):
    F.depthwise_conv(x, jnp.ones((3, 3, 4)))


@pytest.mark.parametrize("kernels", F.KERNELS)
@pytest.mark.parametrize(("kernel", "stride", "padding"),
                         [(3, 1, 1), (3, 2, 1), (2, 2, 0)])
def test_pooling_equals_reduce_window(x, kernel, stride, padding, kernels):
  with F.kernels(kernels):
    max_pooled = F.max_pool(x, kernel, stride, padding)
    avg_pooled = F.avg_pool(x, kernel, stride, padding)
  np.testing.assert_array_equal(
      max_pooled, _window(x, kernel, stride, padding, -jnp.inf, jax.lax.max))
  count = _window(jnp.ones_like(x), kernel, stride, padding, 0.0,
                  jax.lax.add)
  np.testing.assert_allclose(
      avg_pooled,
      _window(x, kernel, stride, padding, 0.0, jax.lax.add) / count,
      rtol=1e-6)


def test_factorized_reduce_is_two_shifted_strided_convs():
  x = jax.random.normal(jax.random.key(2), (2, 8, 8, 3))
  w1, w2 = jax.random.normal(jax.random.key(3), (2, 3, 2))
  conv = lambda v, w: jax.lax.conv_general_dilated(
      v, w[None, None], (2, 2), "VALID",
      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  want = jnp.concatenate([conv(x, w1), conv(x[:, 1:, 1:], w2)], -1)
  np.testing.assert_allclose(F.factorized_reduce(x, w1, w2), want,
                             rtol=1e-5, atol=1e-6)


def test_batch_norm_follows_pytorch(x):
  stats = {"mean": jnp.full([3], 0.5), "var": jnp.full([3], 2.0)}
  xs = np.asarray(x, np.float64)
  mean, var = xs.mean((0, 1, 2)), xs.var((0, 1, 2))
  n = xs.size // 3
  y, new = F.batch_norm(x, stats, True)
  np.testing.assert_allclose(y, (xs - mean) / np.sqrt(var + 1e-5),
                             rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(new["mean"], 0.9 * 0.5 + 0.1 * mean, rtol=1e-5)
  np.testing.assert_allclose(new["var"], 0.9 * 2.0 + 0.1 * var * n / (n - 1),
                             rtol=1e-5)
  y, new = F.batch_norm(x, stats, False, jnp.full([3], 2.0),
                        jnp.full([3], 1.0))
  assert new is stats
  np.testing.assert_allclose(y, 2 * (xs - 0.5) / np.sqrt(2 + 1e-5) + 1,
                             rtol=1e-5, atol=1e-5)


def test_channel_shuffle_interleaves_groups():
  x = jnp.arange(6.0)[None]
  np.testing.assert_array_equal(F.channel_shuffle(x, 2),
                                [[0, 3, 1, 4, 2, 5]])
  np.testing.assert_array_equal(F.channel_shuffle(x, 1), x)
  with pytest.raises(ValueError, match="6 channels do not split into 4"):
    F.channel_shuffle(x, 4)
