r"""BiFormer image classification: the registry's ``'biformer_classification'``.

A :class:`models.biformer.BiFormer` trained single-level (``Params(upper={},
lower=weights)``, solver ``'train'``: AdamW with warm-up and cosine decay,
the official recipe) on the cross-entropy of augmented images (4-pixel
padded random crop and flip,
:func:`experiments.tasks.image_classification.augment`) with optional label
smoothing and the model's drop path. The weights are the flat dict of
:class:`~experiments.tasks.image_classification.Network`.

Each step's batch carries one key, split into the augmentation key and the
drop-path (``'dropout'`` stream) key, so a resumed run replays the same
randomness.

Evaluation (``evaluate(params)``, also after ``--mode=eval``): BatchNorm
recalibrated on a fixed random draw of training images (no drop path), then
``test_accuracy`` and ``test_loss`` (plain cross-entropy) on every test
image, and ``num_params``. Everything is a function of the params and the
seed, so a restored checkpoint reports the same numbers.

``data.image_size`` other than the dataset's resizes both splits once
(bilinear): for smoke runs of the 224² models on a few CIFAR-10 images, not
for full splits (10,000 images at 224² take 6 GB).
"""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

import bilevel
from experiments import data as data_lib
from experiments.task import Task
from experiments.tasks import image_classification as ic
from models import biformer

_NUM_STAGES = 4


class Classifier(nnx.Module):
  """A BiFormer called as ``model(x, train=..., key=...)`` (what
  :class:`~experiments.tasks.image_classification.Network` calls).

  ``train`` with a ``key``: BatchNorm on batch statistics and drop path from
  ``key``; ``train`` without one: batch statistics, no drop path (BatchNorm
  recalibration); not ``train``: evaluation.
  """

  def __init__(self, model: biformer.BiFormer):
    self.model = model

  def __call__(self, x: jax.Array, *, train: bool,
               key: jax.Array | None = None) -> jax.Array:
    if key is None:
      return self.model(x, deterministic=True, use_running_average=not train)
    return self.model(x, deterministic=not train,
                      rngs=nnx.Rngs(dropout=key))


def _check(ok: bool, key: str, message: str) -> None:
  if not ok:
    raise ValueError(f"config key {key}: {message}")


def validate_model(cfg: ml_collections.ConfigDict, image_size: int) -> None:
  """Checks the ``model`` section against ``image_size``.

  Raises:
    ValueError: naming the offending ``model.<key>``: per-stage tuples not of
      length 4, an unknown ``attention_impl``, a stage map not divisible by
      ``n_win`` in a BRA stage (``topk > 0``), or a stage width not
      divisible by ``head_dim``.
  """
  for name in ("depths", "embed_dims", "topks", "mlp_ratios"):
    _check(len(cfg[name]) == _NUM_STAGES, f"model.{name}",
           f"needs {_NUM_STAGES} entries (one per stage), got {cfg[name]}")
  _check(len(cfg.stem_strides) == 2, "model.stem_strides",
         f"needs 2 entries, got {cfg.stem_strides}")
  _check(cfg.attention_impl in biformer.ATTENTION_IMPLS,
         "model.attention_impl", f"{cfg.attention_impl!r} unknown; valid:"
         f" {sorted(biformer.ATTENTION_IMPLS)}")
  size = image_size // (cfg.stem_strides[0] * cfg.stem_strides[1])
  for stage, (dim, topk) in enumerate(zip(cfg.embed_dims, cfg.topks), 1):
    _check(dim % cfg.head_dim == 0, "model.embed_dims",
           f"stage {stage} width {dim} is not a multiple of model.head_dim"
           f" {cfg.head_dim}")
    if topk > 0:
      _check(size % cfg.n_win == 0, "model.n_win",
             f"stage {stage} map {size}x{size} (image {image_size}) is not"
             f" divisible by n_win={cfg.n_win}")
      _check(topk <= cfg.n_win ** 2, "model.topks",
             f"stage {stage} routes {topk} of {cfg.n_win ** 2} regions")
    size //= 2


def build_model(cfg: ml_collections.ConfigDict, num_classes: int,
                key: jax.Array) -> biformer.BiFormer:
  """The BiFormer of the ``model`` section (validated beforehand)."""
  return biformer.BiFormer(
      depths=tuple(cfg.depths), embed_dims=tuple(cfg.embed_dims),
      head_dim=cfg.head_dim, n_win=cfg.n_win, topks=tuple(cfg.topks),
      mlp_ratios=tuple(cfg.mlp_ratios), num_classes=num_classes,
      drop_path_rate=cfg.drop_path_rate,
      layer_scale_init_value=cfg.layer_scale_init_value,
      side_dwconv=cfg.side_dwconv, stem_strides=tuple(cfg.stem_strides),
      attention_impl=cfg.attention_impl, rngs=nnx.Rngs(params=key))


def _resized(data: ic.ImageData, size: int) -> ic.ImageData:
  resize = lambda x: jax.image.resize(
      x, (x.shape[0], size, size, x.shape[-1]), "bilinear")
  return dataclasses.replace(data, train_x=resize(data.train_x),
                             test_x=resize(data.test_x))


def _load_data(cfg: ml_collections.ConfigDict) -> ic.ImageData:
  dataset = data_lib.load_dataset(
      cfg.name, cfg.data_dir or None, max_train=cfg.max_train or None,
      max_test=cfg.max_test or None)
  data = ic.ImageData.from_dataset(dataset)
  if cfg.image_size != data.train_x.shape[1]:
    data = _resized(data, cfg.image_size)
  return data


def task_from_config(config: ml_collections.ConfigDict,
                     key: jax.Array) -> Task:
  """The task of ``experiments/configs/biformer_cifar10.py`` (and the 224²
  ``biformer_imagenet.py`` smoke runs).

  Raises:
    ValueError: a config value out of range, naming its key.
  """
  validate_model(config.model, config.data.image_size)
  _check(0.0 <= config.loss.label_smoothing < 1.0, "loss.label_smoothing",
         f"{config.loss.label_smoothing} not in [0, 1)")
  _check(config.data.batch_size > 0, "data.batch_size",
         f"{config.data.batch_size} must be positive")
  _check(config.eval.calibration_images % config.eval.calibration_batch_size
         == 0, "eval.calibration_images",
         f"{config.eval.calibration_images} is not a multiple of"
         f" eval.calibration_batch_size {config.eval.calibration_batch_size}")
  model_key, data_key = jax.random.split(key)
  stream_key, augment_key, calibration_key = jax.random.split(data_key, 3)
  data = _load_data(config.data)
  network = ic.Network(Classifier(
      build_model(config.model, config.model.num_classes, model_key)))
  smoothing = config.loss.label_smoothing

  def loss(upper, lower, batch):
    del upper
    aug_key, drop_key = jax.random.split(batch["key"])
    logits = network.apply(lower, ic.augment(aug_key, batch["image"]),
                           train=True, key=drop_key)
    return ic.cross_entropy(logits, batch["label"], smoothing)

  stream = data.stream(stream_key, config.data.batch_size)
  calibration = data.calibration_images(config.eval.calibration_images,
                                        calibration_key)
  recalibrate = jax.jit(network.recalibrate, static_argnums=2)
  weights = network.init_weights()

  @jax.jit
  def test_sums(lower, stats, images, labels):
    logits = network.eval_logits(lower, stats, images).astype(jnp.float32)
    return (ic.cross_entropy(logits, labels) * labels.shape[0],
            jnp.sum(jnp.argmax(logits, -1) == labels))

  def evaluate(params: bilevel.Params) -> dict[str, float]:
    stats = recalibrate(params.lower, calibration,
                        config.eval.calibration_batch_size)
    size, n = config.eval.batch_size, data.test_y.shape[0]
    loss_sum, correct = 0.0, 0
    for i in range(0, n, size):
      batch_loss, batch_correct = test_sums(
          params.lower, stats, data.test_x[i:i + size],
          data.test_y[i:i + size])
      loss_sum, correct = loss_sum + float(batch_loss), correct + int(
          batch_correct)
    return {"test_accuracy": correct / n, "test_loss": loss_sum / n,
            "num_params": float(sum(w.size for w in weights.values()))}

  return Task(
      bilevel.Problem(outer_loss=loss, inner_loss=loss),
      bilevel.Params({}, weights),
      lambda step: {"outer_batch": data.batch(stream, step, augment_key)},
      evaluate)
