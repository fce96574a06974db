"""CIFAR-10 ResNets and a small CNN with maskable layers (Flax NNX).

Every conv and dense layer, the first conv and the final classifier
included, is a ``MaskedConv`` / ``MaskedLinear``, as in BiP's official code,
which masks all conv and linear layers. BatchNorm runs on batch statistics
when the model is called with ``train=True`` (updating its ``nnx.BatchStat``
running averages in place) and on the running averages with ``train=False``.
Inside a pure function built with ``models.merge_levels``, return
``models.updated_rest`` after a training forward to keep those updates.

References:
  He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition",
  CVPR 2016, §4.2 (CIFAR-10 ResNets, option A shortcuts).
  Zhang et al., "Advancing Model Pruning via Bi-level Optimization",
  NeurIPS 2022.
"""

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from models.masking import MaskedConv, MaskedLinear, MaskFn

VALID_DEPTHS = (20, 32, 44, 56, 110)
INPUT_SHAPE = (32, 32, 3)
_WIDTHS = (16, 32, 64)


def _check_input(name: str, x: jax.Array) -> None:
  if x.ndim != 4 or x.shape[1:] != INPUT_SHAPE:
    raise ValueError(
        f"{name} expects inputs [batch, 32, 32, 3] (NHWC), got {x.shape}")


def _shortcut_a(x: jax.Array, out_features: int, stride: int) -> jax.Array:
  """Option A: parameter-free identity, subsampled and zero-padded."""
  if stride != 1:
    x = x[:, ::stride, ::stride, :]
  pad = out_features - x.shape[-1]
  if pad:
    x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (pad // 2, pad - pad // 2)))
  return x


class BasicBlock(nnx.Module):
  """Two 3x3 conv-BN layers plus an option-A shortcut; post-activation."""

  def __init__(self, in_features: int, out_features: int, stride: int, *,
               conv, norm):
    """Builds the layers.

    Args:
      in_features: input channels.
      out_features: output channels; a wider output pads the shortcut.
      stride: stride of the first conv and of the shortcut's subsampling.
      conv: ``(in, out, strides=...) -> MaskedConv`` 3x3 factory.
      norm: ``(features) -> nnx.BatchNorm`` factory.
    """
    self.stride = stride
    self.out_features = out_features
    self.conv1 = conv(in_features, out_features, strides=stride)
    self.bn1 = norm(out_features)
    self.conv2 = conv(out_features, out_features)
    self.bn2 = norm(out_features)

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """Maps ``[b, h, w, in]`` to ``[b, h / stride, w / stride, out]``."""
    y = jax.nn.relu(self.bn1(self.conv1(x), use_running_average=not train))
    y = self.bn2(self.conv2(y), use_running_average=not train)
    return jax.nn.relu(y + _shortcut_a(x, self.out_features, self.stride))


class ResNetCIFAR(nnx.Module):
  """ResNet-(6n+2) for 32x32 images, with maskable conv and dense layers.

  A 3x3 conv to 16 channels, three stages of ``n`` basic blocks with 16, 32
  and 64 filters (stride 2 at the start of stages 2 and 3), global average
  pooling and a 10-way dense layer. Convs have no bias. Shortcuts are
  option A, so the only weights are conv kernels, BatchNorm scale and bias,
  and the classifier: ResNet-20 has 269,722 and ResNet-56 853,018.

  Attributes:
    stem: the first ``MaskedConv``; ``bn``: its BatchNorm.
    stages: ``nnx.List`` of three ``nnx.List`` of ``BasicBlock``.
    head: the ``MaskedLinear`` classifier.
  """

  def __init__(
      self,
      depth: int,
      num_classes: int = 10,
      *,
      mask_mode: str = "none",
      mask_fn: MaskFn | None = None,
      dtype: jnp.dtype = jnp.float32,
      param_dtype: jnp.dtype = jnp.float32,
      rngs: nnx.Rngs,
  ):
    """Builds the network.

    Args:
      depth: ``6n + 2``, one of ``VALID_DEPTHS``.
      num_classes: number of output logits.
      mask_mode: ``'none'``, ``'unstructured'``, ``'filter'`` or
        ``'channel'``, for every conv and dense layer (see ``models.masking``).
      mask_fn: scores-to-mask map of every layer; ``None`` for the identity.
      dtype: compute dtype.
      param_dtype: dtype of weights and scores; flax keeps BatchNorm running
        statistics in float32.
      rngs: NNX RNG streams; uses ``params``.

    Raises:
      ValueError: ``depth`` not in ``VALID_DEPTHS``, or unknown ``mask_mode``.
    """
    if depth not in VALID_DEPTHS:
      raise ValueError(
          f"ResNetCIFAR {depth=} is not one of {VALID_DEPTHS} (6n + 2)")
    masked = dict(mask_mode=mask_mode, dtype=dtype, param_dtype=param_dtype,
                  rngs=rngs)
    if mask_fn is not None:
      masked["mask_fn"] = mask_fn
    # Explicit (1, 1) padding matches the paper's stride-2 convs; 'SAME'
    # would pad (0, 1) on even inputs and shift the sampling grid.
    conv = functools.partial(MaskedConv, kernel_size=3,
                             padding=((1, 1), (1, 1)), use_bias=False,
                             **masked)
    # momentum 0.9 is PyTorch's 0.1 running-average update.
    norm = functools.partial(nnx.BatchNorm, momentum=0.9, epsilon=1e-5,
                             dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    n = (depth - 2) // 6
    self.depth = depth
    self.stem = conv(3, _WIDTHS[0])
    self.bn = norm(_WIDTHS[0])
    stages, in_features = [], _WIDTHS[0]
    for i, width in enumerate(_WIDTHS):
      blocks = []
      for j in range(n):
        stride = 2 if i > 0 and j == 0 else 1
        blocks.append(
            BasicBlock(in_features, width, stride, conv=conv, norm=norm))
        in_features = width
      stages.append(nnx.List(blocks))
    self.stages = nnx.List(stages)
    self.head = MaskedLinear(in_features, num_classes, **masked)

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """Applies the network.

    Args:
      x: images ``[batch, 32, 32, 3]`` (NHWC).
      train: BatchNorm on batch statistics (and update the running
        averages) if true, on the running averages if false.

    Returns:
      Logits ``[batch, num_classes]`` in the compute dtype.

    Raises:
      ValueError: ``x`` is not ``[batch, 32, 32, 3]``.
    """
    _check_input(f"ResNetCIFAR-{self.depth}", x)
    x = jax.nn.relu(self.bn(self.stem(x), use_running_average=not train))
    for stage in self.stages:
      for block in stage:
        x = block(x, train=train)
    return self.head(jnp.mean(x, axis=(1, 2)))


class SmallCNN(nnx.Module):
  """Two 3x3 conv layers with 2x2 max pooling and a dense head; for smoke runs.

  ``[b, 32, 32, 3]`` → conv 16 → pool → conv 32 → pool → global average pool
  → dense ``num_classes``. All three layers are maskable; no BatchNorm.

  Attributes:
    conv1, conv2: ``MaskedConv`` with bias.
    head: ``MaskedLinear`` classifier.
  """

  def __init__(
      self,
      num_classes: int = 10,
      *,
      mask_mode: str = "none",
      mask_fn: MaskFn | None = None,
      dtype: jnp.dtype = jnp.float32,
      param_dtype: jnp.dtype = jnp.float32,
      rngs: nnx.Rngs,
  ):
    """Builds the layers; arguments as in ``ResNetCIFAR``."""
    masked = dict(mask_mode=mask_mode, dtype=dtype, param_dtype=param_dtype,
                  rngs=rngs)
    if mask_fn is not None:
      masked["mask_fn"] = mask_fn
    self.conv1 = MaskedConv(3, 16, 3, **masked)
    self.conv2 = MaskedConv(16, 32, 3, **masked)
    self.head = MaskedLinear(32, num_classes, **masked)

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """Applies the network to ``x`` ``[batch, 32, 32, 3]``.

    Args:
      x: images ``[batch, 32, 32, 3]`` (NHWC).
      train: unused (no BatchNorm); kept so all models share one signature.

    Returns:
      Logits ``[batch, num_classes]`` in the compute dtype.

    Raises:
      ValueError: ``x`` is not ``[batch, 32, 32, 3]``.
    """
    del train
    _check_input("SmallCNN", x)
    pool = functools.partial(nnx.max_pool, window_shape=(2, 2),
                             strides=(2, 2))
    x = pool(jax.nn.relu(self.conv1(x)))
    x = pool(jax.nn.relu(self.conv2(x)))
    return self.head(jnp.mean(x, axis=(1, 2)))
