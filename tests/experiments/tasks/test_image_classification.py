"""The functional network view, augmentation, cutout, BatchNorm
recalibration."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.tasks import image_classification as ic


class _LinearBN(nnx.Module):
  """x @ W then BatchNorm: the smallest model with batch statistics."""

  def __init__(self, rngs):
    self.dense = nnx.Linear(3, 2, rngs=rngs)
    self.bn = nnx.BatchNorm(2, momentum=0.9, rngs=rngs)

  def __call__(self, x, *, train):
    return self.bn(self.dense(x), use_running_average=not train)


def test_augment_returns_flipped_or_plain_crops_of_the_padded_image():
  images = jax.random.normal(jax.random.key(0), (6, 5, 5, 2))
  out = np.asarray(ic.augment(jax.random.key(1), images))
  padded = np.pad(np.asarray(images), ((0, 0), (4, 4), (4, 4), (0, 0)))
  for i in range(images.shape[0]):
    candidates = [padded[i, r:r + 5, c:c + 5] for r in range(9)
                  for c in range(9)]
    candidates += [crop[:, ::-1] for crop in candidates]
    assert any(np.array_equal(out[i], c) for c in candidates), i
  again = ic.augment(jax.random.key(1), images)
  np.testing.assert_array_equal(out, again)
  assert not np.array_equal(out, ic.augment(jax.random.key(2), images))



def _numpy_cutout(image, y, x, length):
  """quark0/darts ``utils.Cutout`` on one ``[h, w, c]`` image, centre given."""
  h, w = image.shape[:2]
  mask = np.ones((h, w), np.float32)
  y1, y2 = np.clip(y - length // 2, 0, h), np.clip(y + length // 2, 0, h)
  x1, x2 = np.clip(x - length // 2, 0, w), np.clip(x + length // 2, 0, w)
  mask[y1:y2, x1:x2] = 0.0
  return image * mask[:, :, None]


@pytest.mark.parametrize("size", [16, 5])
def test_cutout_at_equals_the_official_cutout_at_given_centres(size):
  images = np.random.default_rng(0).uniform(1, 2, (5, 20, 24, 3))
  # Inside, at a corner, at the far corner, on the top and right borders.
  centres = np.array([[10, 12], [0, 0], [19, 23], [0, 12], [10, 23]])
  out = ic.cutout_at(jnp.asarray(images, jnp.float32), jnp.asarray(centres),
                     size)
  for image, got, (y, x) in zip(images, np.asarray(out), centres):
    np.testing.assert_allclose(got, _numpy_cutout(image, y, x, size),
                               rtol=1e-6)


def test_cutout_zeroes_one_square_per_image_from_the_key():
  images = jnp.ones((64, 32, 32, 2))
  out = np.asarray(ic.cutout(jax.random.key(0), images))
  np.testing.assert_array_equal(out, ic.cutout(jax.random.key(0), images))
  zero = out[..., 0] == 0
  np.testing.assert_array_equal(zero, out[..., 1] == 0)  # every channel
  areas = set()
  for z in zero:
    rows, cols = np.flatnonzero(z.any(1)), np.flatnonzero(z.any(0))
    assert z.sum() == len(rows) * len(cols) > 0  # one filled rectangle
    assert len(rows) <= 16 and len(cols) <= 16
    areas.add(z.sum())
  assert 16 * 16 in areas and len(areas) > 1  # some inside, some cut

def test_apply_equals_the_module_and_recalibrate_equals_numpy():
  model = _LinearBN(nnx.Rngs(0))
  network = ic.Network(model)
  weights = network.init_weights()
  assert sorted(weights) == sorted(network.paths)
  x = jax.random.normal(jax.random.key(3), (12, 3))
  np.testing.assert_allclose(network.apply(weights, x, train=False),
                             model(x, train=False), rtol=1e-6)
  stats = network.recalibrate(weights, x, batch_size=4)
  h = np.asarray(x) @ np.asarray(weights["dense.kernel"]) + np.asarray(
      weights["dense.bias"])
  batches = h.reshape(3, 4, 2)
  np.testing.assert_allclose(stats["bn"]["mean"][...],
                             batches.mean(axis=1).mean(axis=0), rtol=1e-5)
  np.testing.assert_allclose(stats["bn"]["var"][...],
                             batches.var(axis=1).mean(axis=0), rtol=1e-5)
  expected = (h - batches.mean(axis=1).mean(axis=0)) / np.sqrt(
      batches.var(axis=1).mean(axis=0) + 1e-5)
  np.testing.assert_allclose(
      network.eval_logits(weights, stats, x), expected, rtol=1e-4,
      atol=1e-5)
  with pytest.raises(ValueError, match="multiple of batch_size 5"):
    network.recalibrate(weights, x, batch_size=5)


def test_accuracy_counts_every_example_of_a_ragged_last_batch():
  model = _LinearBN(nnx.Rngs(0))
  network = ic.Network(model)
  weights = network.init_weights()
  x = jax.random.normal(jax.random.key(4), (7, 3))
  stats = network.recalibrate(weights, x[:6], batch_size=3)
  logits = np.asarray(network.eval_logits(weights, stats, x))
  labels = jnp.asarray([0, 1, 1, 0, 1, 0, 1])
  expected = np.mean(logits.argmax(-1) == np.asarray(labels))
  assert ic.accuracy(network, weights, stats, x, labels, 3) == expected


def test_bad_shapes_are_named():
  with pytest.raises(AssertionError, match="rank"):
    ic.augment(jax.random.key(0), jnp.zeros((5, 5, 2)))
  with pytest.raises(AssertionError, match="rank"):
    ic.cutout(jax.random.key(0), jnp.zeros((5, 5, 2)))
  with pytest.raises(AssertionError, match="shape"):
    ic.cutout_at(jnp.zeros((2, 5, 5, 1)), jnp.zeros((2, 3), jnp.int32), 2)
  with pytest.raises(AssertionError, match="rank"):
    ic.cross_entropy(jnp.zeros((2, 3, 4)), jnp.zeros(2, jnp.int32))
  with pytest.raises(AssertionError, match="shape"):
    ic.cross_entropy(jnp.zeros((2, 4)), jnp.zeros((2, 1), jnp.int32))


def test_missing_weights_are_named():
  network = ic.Network(_LinearBN(nnx.Rngs(0)))
  weights = network.init_weights()
  del weights["bn.scale"]
  with pytest.raises(ValueError, match="bn.scale"):
    network.apply(weights, jnp.zeros((2, 3)), train=False)


def test_calibration_images_are_a_random_draw_not_the_first_ones():
  # Dataset files are often sorted by class: the first images are one class.
  n = 64
  images = np.arange(n, dtype=np.float32).reshape(n, 1, 1, 1) * np.ones(
      (1, 2, 2, 3), np.float32)
  data = ic.ImageData(jnp.asarray(images), jnp.zeros(n, jnp.int32),
                      jnp.asarray(images[:2]), jnp.zeros(2, jnp.int32))
  drawn = np.asarray(data.calibration_images(16, jax.random.key(0)))
  index = drawn[:, 0, 0, 0].astype(int)
  assert len(set(index)) == 16
  assert index.max() >= 32  # the first 16 would all be < 16
  np.testing.assert_array_equal(
      drawn, data.calibration_images(16, jax.random.key(0)))
  with pytest.raises(ValueError, match="0 < num <= 64"):
    data.calibration_images(65, jax.random.key(0))
