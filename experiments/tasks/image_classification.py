"""Image classification pieces of the CIFAR-10 experiments, as pure functions.

* :class:`Network`: an NNX classifier seen as ``logits = apply(weights, x)``
  over a flat ``{dotted.path: array}`` dict of its ``nnx.Param`` leaves (a
  pytree orbax stores as is), with BatchNorm on batch statistics in training
  and on *recalibrated* population statistics in evaluation.
* :func:`augment`: the standard CIFAR augmentation (4-pixel padded random
  crop, horizontal flip), drawn from an explicit key.
* :func:`cutout`: DARTS's cutout (a zeroed square at a random centre, cut at
  the borders), drawn from an explicit key; :func:`cutout_at` for given
  centres.
* :class:`ImageData`: normalised splits on the device and deterministic
  minibatches for step ``s``.

Why recalibrate BatchNorm instead of carrying running averages: the bi-level
step (``bilevel.make_step``) carries only ``Params`` and the solver state. The
running averages are a function of the weights and the data; recomputing them
after training (mean over a fixed set of training batches of the per-batch
statistics, as PyTorch's cumulative ``momentum=None`` averaging does) gives
statistics that match the final (pruned) weights and keeps every stage of a
pipeline resumable from params alone. Pruning changes activation statistics,
so pruning work recalibrates anyway.
"""

import dataclasses
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import bilevel
from experiments import data as data_lib
from models import merge_levels, split_levels, updated_rest

Weights = dict[str, jax.Array]

PAD = 4


def _dotted(path) -> str:
  return ".".join(str(p) for p in path)


class Network:
  """A functional view of an NNX classifier ``model(x, train=...)``.

  Attributes:
    paths: the dotted paths of the ``nnx.Param`` leaves, in ``weights``
      order.
  """

  def __init__(self, model: nnx.Module):
    """Splits ``model`` into its static graph, weights and batch statistics.

    Args:
      model: an NNX module called as ``model(x, train=bool)``.
    """
    # The pruning masks live outside the model: its upper level is empty.
    self._graphdef, (self._no_upper, params), self._rest = split_levels(
        model, ())
    flat = nnx.to_flat_state(params)
    self._flat_paths = [path for path, _ in flat]
    self.paths = [_dotted(path) for path in self._flat_paths]
    self._init = {name: v[...] for name, (_, v) in zip(self.paths, flat)}
    # A copy whose BatchNorm layers keep the last batch's statistics
    # (momentum 0): one train-mode forward then *returns* them.
    probe = merge_levels(self._graphdef, self._levels(params), self._rest)
    for _, module in nnx.iter_modules(probe):
      if isinstance(module, nnx.BatchNorm):
        module.momentum = 0.0
    self._probe_graphdef = nnx.graphdef(probe)
    self._eval_logits = jax.jit(
        lambda w, s, x: self.apply(w, x, train=False, batch_stats=s))

  def init_weights(self) -> Weights:
    """The module's initial weights, ``{dotted.path: array}``."""
    return dict(self._init)

  def _levels(self, lower: nnx.State) -> bilevel.Params:
    return bilevel.Params(self._no_upper, lower)

  def _state(self, weights: Weights) -> nnx.State:
    missing = set(self.paths) - set(weights)
    if missing:
      raise ValueError(f"weights lack {sorted(missing)[:5]} (of"
                       f" {len(missing)} missing paths)")
    return nnx.from_flat_state(
        {path: weights[name]
         for path, name in zip(self._flat_paths, self.paths)})

  def apply(self, weights: Weights, x: jax.Array, *, train: bool,
            batch_stats: nnx.State | None = None,
            key: jax.Array | None = None) -> jax.Array:
    """Logits ``[batch, classes]`` for images ``x`` ``[batch, h, w, c]``.

    Args:
      weights: ``{dotted.path: array}`` of every ``nnx.Param``.
      x: a batch of inputs.
      train: BatchNorm on the batch's statistics (training) if true.
      batch_stats: the BatchNorm statistics for ``train=False``, from
        :meth:`recalibrate`; default: the module's initial ones.
      key: PRNG key of a stochastic module's training randomness (e.g.
        drop path), passed on as ``key=``; None calls it without one.
    """
    rest = self._rest if batch_stats is None else batch_stats
    net = merge_levels(self._graphdef, self._levels(self._state(weights)),
                       rest)
    if key is None:
      return net(x, train=train)
    return net(x, train=train, key=key)

  def eval_logits(self, weights: Weights, batch_stats: nnx.State,
                  x: jax.Array) -> jax.Array:
    """Jitted ``apply(weights, x, train=False, batch_stats=batch_stats)``."""
    return self._eval_logits(weights, batch_stats, x)

  def _batch_statistics(self, weights: Weights, x: jax.Array) -> nnx.State:
    net = merge_levels(self._probe_graphdef,
                       self._levels(self._state(weights)), self._rest)
    net(x, train=True)
    return updated_rest(net, self._rest)

  def recalibrate(self, weights: Weights, images: jax.Array,
                  batch_size: int) -> nnx.State:
    """Population BatchNorm statistics of ``weights`` on ``images``.

    The mean over the ``images.shape[0] // batch_size`` consecutive batches
    of each batch's mean and (biased) variance, per BatchNorm layer.

    Args:
      weights: the weights to calibrate for (masks already applied).
      images: ``[n, h, w, c]`` training images, not augmented.
      batch_size: images per batch; ``n`` must be a multiple.

    Returns:
      The non-``Param`` state to pass as ``batch_stats`` to :meth:`apply`.

    Raises:
      ValueError: ``n`` is not a positive multiple of ``batch_size``.
    """
    return mean_over_batches(
        lambda x: self._batch_statistics(weights, x), images, batch_size)


def mean_over_batches(fn, images: jax.Array, batch_size: int):
  """The mean of ``fn(batch)`` (a pytree) over the consecutive batches of
  ``images`` (BatchNorm recalibration).

  Raises:
    ValueError: ``images.shape[0]`` is not a positive multiple of
      ``batch_size``.
  """
  n = images.shape[0]
  if n == 0 or n % batch_size:
    raise ValueError(f"recalibrate: {n} images is not a positive multiple"
                     f" of batch_size {batch_size}")
  batches = images.reshape(n // batch_size, batch_size, *images.shape[1:])
  return jax.tree.map(lambda s: jnp.mean(s, axis=0),
                      jax.lax.map(fn, batches))


def cross_entropy(logits: jax.Array, labels: jax.Array,
                  label_smoothing: float = 0.0) -> jax.Array:
  """Mean softmax cross-entropy of ``logits`` ``[b, c]``, ``labels`` ``[b]``.

  With ``label_smoothing`` ``α > 0`` the target is ``(1 - α)·onehot + α/c``.

  Raises:
    AssertionError: ``logits`` is not ``[b, c]`` or ``labels`` not ``[b]``.
  """
  chex.assert_rank(logits, 2)
  chex.assert_shape(labels, logits.shape[:1])
  logits = logits.astype(jnp.float32)
  if not label_smoothing:
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, labels).mean()
  targets = optax.smooth_labels(
      jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
  return optax.softmax_cross_entropy(logits, targets).mean()


def augment(key: jax.Array, images: jax.Array) -> jax.Array:
  """Random 32x32 crops of the 4-pixel zero-padded images, and random flips.

  Args:
    key: PRNG key; each image draws its own offset and flip from it.
    images: ``[b, h, w, c]``.

  Returns:
    ``[b, h, w, c]`` augmented images.

  Raises:
    AssertionError: ``images`` is not of rank 4.
  """
  chex.assert_rank(images, 4)
  b, h, w, c = images.shape
  padded = jnp.pad(images, ((0, 0), (PAD, PAD), (PAD, PAD), (0, 0)))
  k_offset, k_flip = jax.random.split(key)
  offsets = jax.random.randint(k_offset, (b, 2), 0, 2 * PAD + 1)
  flips = jax.random.bernoulli(k_flip, 0.5, (b,))

  def one(image, offset, flip):
    crop = jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, c))
    return jnp.where(flip, crop[:, ::-1], crop)

  return jax.vmap(one)(padded, offsets, flips)



def cutout_at(images: jax.Array, centres: jax.Array, size: int) -> jax.Array:
  """Zeroes rows ``[y - size//2, y + size//2)`` × the same columns around
  each image's centre ``(y, x)``, cut at the borders.

  Args:
    images: ``[b, h, w, c]``.
    centres: int ``[b, 2]`` ``(row, column)`` of each square's centre.
    size: the square's side (an odd ``size`` cuts ``size - 1``, as the
      official code does).

  Returns:
    ``[b, h, w, c]`` images, zero in the square of every channel.

  Raises:
    AssertionError: ``images`` not of rank 4 or ``centres`` not ``[b, 2]``.
  """
  chex.assert_rank(images, 4)
  chex.assert_shape(centres, (images.shape[0], 2))
  half = size // 2
  rows = jnp.arange(images.shape[1])
  cols = jnp.arange(images.shape[2])
  y, x = centres[:, :1], centres[:, 1:]
  in_rows = (rows >= y - half) & (rows < y + half)  # [b, h]
  in_cols = (cols >= x - half) & (cols < x + half)  # [b, w]
  square = in_rows[:, :, None, None] & in_cols[:, None, :, None]
  return jnp.where(square, jnp.zeros_like(images), images)


def cutout(key: jax.Array, images: jax.Array, size: int = 16) -> jax.Array:
  """DARTS's cutout: each image zeroed in a ``size × size`` square centred
  at a uniformly drawn pixel, cut at the borders (:func:`cutout_at`).

  Applied last, to standardised images (as the official transform after
  ``Normalize``), so the square holds the mean pixel.

  Args:
    key: PRNG key; each image draws its own centre from it.
    images: ``[b, h, w, c]``.
    size: the square's side (official: 16).

  Returns:
    ``[b, h, w, c]`` images with the squares zeroed.

  References:
    DeVries, Taylor, *Improved Regularization of Convolutional Neural
    Networks with Cutout*, 2017; quark0/darts ``cnn/utils.py::Cutout``.
  """
  chex.assert_rank(images, 4)
  b, h, w, _ = images.shape
  k_row, k_col = jax.random.split(key)
  centres = jnp.stack([jax.random.randint(k_row, (b,), 0, h),
                       jax.random.randint(k_col, (b,), 0, w)], axis=-1)
  return cutout_at(images, centres, size)

@dataclasses.dataclass(frozen=True, eq=False)
class ImageData:
  """Normalised image splits on the device, and their minibatch streams.

  Attributes:
    train_x: float32 ``[n_train, h, w, c]``, per-channel standardised with
      the training split's mean and standard deviation.
    train_y: int32 ``[n_train]``.
    test_x: float32 ``[n_test, h, w, c]``, standardised likewise.
    test_y: int32 ``[n_test]``.
  """
  train_x: jax.Array
  train_y: jax.Array
  test_x: jax.Array
  test_y: jax.Array

  @classmethod
  def from_dataset(cls, dataset: data_lib.Dataset) -> "ImageData":
    """Standardises an image :class:`experiments.data.Dataset`."""
    if dataset.train_x.ndim != 4:
      raise ValueError("ImageData needs images [n, h, w, c], got train_x of"
                       f" shape {dataset.train_x.shape}")
    mean = dataset.train_x.mean(axis=(0, 1, 2), dtype=np.float64)
    std = dataset.train_x.std(axis=(0, 1, 2), dtype=np.float64)
    norm = lambda x: jnp.asarray(((x - mean) / std).astype(np.float32))
    return cls(norm(dataset.train_x), jnp.asarray(dataset.train_y),
               norm(dataset.test_x), jnp.asarray(dataset.test_y))

  def stream(self, key: jax.Array, batch_size: int) -> data_lib.BatchStream:
    """A resumable stream over the training split (see ``BatchStream``)."""
    return data_lib.BatchStream(key, self.train_y.shape[0], batch_size)

  def batch(self, stream: data_lib.BatchStream, step: int,
            augment_key: jax.Array | None) -> dict[str, Any]:
    """``{'image', 'label', 'key'}`` of ``stream`` at ``step``.

    ``key`` is ``fold_in(augment_key, step)`` for the loss to augment with,
    or absent when ``augment_key`` is None.
    """
    index = stream.indices(step)
    out = {"image": self.train_x[index], "label": self.train_y[index]}
    if augment_key is not None:
      out["key"] = jax.random.fold_in(augment_key, step)
    return out

  def calibration_images(self, num: int, key: jax.Array) -> jax.Array:
    """``num`` training images drawn without replacement with ``key``.

    A random draw, not the first ``num``: dataset files are often sorted
    by class, and BatchNorm statistics of one class are badly biased.
    """
    if not 0 < num <= self.train_x.shape[0]:
      raise ValueError(f"calibration needs 0 < num <= "
                       f"{self.train_x.shape[0]} training images, got {num}")
    index = jax.random.permutation(key, self.train_x.shape[0])[:num]
    return self.train_x[jnp.sort(index)]


def accuracy(network: Network, weights: Weights, batch_stats: nnx.State,
             images: jax.Array, labels: jax.Array, batch_size: int) -> float:
  """Top-1 accuracy on every one of ``images`` (a ragged last batch kept)."""
  correct = 0
  for start in range(0, images.shape[0], batch_size):
    logits = network.eval_logits(weights, batch_stats,
                                 images[start:start + batch_size])
    correct += int(jnp.sum(jnp.argmax(logits, -1)
                           == labels[start:start + batch_size]))
  return correct / images.shape[0]
