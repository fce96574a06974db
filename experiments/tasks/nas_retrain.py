r"""Retraining a derived DARTS architecture: the ``retrain`` stage.

The second stage of the ``architecture_search`` pipeline
(:mod:`experiments.tasks.nas_search`): a fresh
:class:`models.darts.EvalNetwork` of a genotype, trained single-level
(``Params(upper={}, lower=weights)``) with the official recipe
(quark0/darts ``cnn/train.py``): SGD with momentum 0.9 and a cosine decay
to 0, weight decay ``3e-4`` added to the gradient after clipping its
global norm at 5, cross-entropy plus ``0.4×`` the auxiliary head's, drop
path ramped linearly from 0 to ``drop_path_prob`` over the run (the
official ramp steps per epoch, this one per step), the standard
augmentation (4-pixel padded crop, flip) and cutout.

BatchNorm runs on batch statistics in training; evaluation recalibrates it
(:func:`recalibrate`: the mean over fixed training batches of each batch's
statistics, as in :mod:`experiments.tasks.image_classification`), so a
checkpoint of params alone evaluates the same after a restore. Metrics:
``test_accuracy``, ``test_loss``, ``params_millions`` (the official count:
weights without the auxiliary head) and the ``genotype`` (a JSON dict).

Genotypes travel as JSON dicts (:func:`genotype_to_json`,
:func:`genotype_from_json`): ``{"normal": [[op, input], ...],
"normal_concat": [2, 3, 4, 5], "reduce": ..., "reduce_concat": ...}``.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

import bilevel
from experiments import registry
from experiments.task import Stage
from experiments.tasks import image_classification as ic
from models import darts, merge_levels, split_levels, updated_rest
from models.darts import functional

# Cells 2L/3 is two reductions deep: its map is a quarter of the image,
# and the auxiliary head needs 8x8 to 10x10 (models.darts.AuxiliaryHead).
_AUX_IMAGE_SIZES = range(32, 41)


def genotype_to_json(genotype: darts.Genotype) -> dict[str, list]:
  """The genotype as a JSON-serialisable dict (lists for tuples)."""
  return json_lists(genotype._asdict())


def json_lists(value: Any) -> Any:
  """Tuples (nested) as lists, as ``json.loads(json.dumps(value))`` gives."""
  if isinstance(value, (tuple, list)):
    return [json_lists(v) for v in value]
  if isinstance(value, dict):
    return {k: json_lists(v) for k, v in value.items()}
  return value


def genotype_from_json(value: dict[str, list]) -> darts.Genotype:
  """Inverse of :func:`genotype_to_json`."""
  edges = lambda cell: tuple((str(op), int(i)) for op, i in value[cell])
  concat = lambda cell: tuple(int(i) for i in value[f"{cell}_concat"])
  return darts.Genotype(edges("normal"), concat("normal"), edges("reduce"),
                        concat("reduce"))


def weight_optimizer(cfg: ml_collections.ConfigDict, weight_decay: float,
                     clip_norm: float) -> optax.GradientTransformation:
  """The official weight update: clip the gradient's global norm (0: no
  clipping), add ``weight_decay · w`` (PyTorch's SGD decay), then ``cfg``
  (:func:`experiments.registry.build_optimizer`)."""
  clip = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
  return optax.chain(*clip, optax.add_decayed_weights(weight_decay),
                     registry.build_optimizer(cfg))


def recalibrate(forward: Callable[[nnx.Module, jax.Array], Any],
                graphdef: nnx.GraphDef, params: bilevel.Params,
                rest: nnx.State, images: jax.Array,
                batch_size: int) -> nnx.State:
  """Population BatchNorm statistics of a DARTS network on ``images``.

  The mean over ``images.shape[0] // batch_size`` consecutive batches of
  each batch's mean and unbiased variance, per BatchNorm. A training
  forward moves the running statistics ``(1 − m)·old + m·batch``
  (:mod:`models.darts.functional`, ``m = BN_MOMENTUM``), so from zeros it
  leaves ``m·batch``.

  Args:
    forward: ``forward(net, images)``, a training-mode call (no drop path).
    graphdef: the network's graph.
    params: its ``Params(upper, lower)``.
    rest: its BatchNorm statistics (only ``nnx.BatchStat``), for the
      structure.
    images: ``[n, h, w, 3]`` training images, not augmented.
    batch_size: images per batch; ``n`` must be a multiple.

  Returns:
    Statistics with the structure of ``rest``.

  Raises:
    ValueError: ``n`` is not a positive multiple of ``batch_size``.
  """
  zeros = jax.tree.map(jnp.zeros_like, rest)

  def one(x):
    net = merge_levels(graphdef, params, zeros)
    forward(net, x)
    return jax.tree.map(lambda s: s / functional.BN_MOMENTUM,
                        updated_rest(net, zeros))

  return ic.mean_over_batches(one, images, batch_size)


def check_config(config: ml_collections.ConfigDict) -> None:
  """Checks the ``retrain`` and ``eval`` sections.

  Raises:
    ValueError: naming the key: an auxiliary head on images it cannot
      read, an odd channel count, a drop path probability outside
      ``[0, 1)``, or calibration images that do not split into batches.
  """
  r, e = config.retrain, config.eval
  if r.auxiliary and r.image_size not in _AUX_IMAGE_SIZES:
    raise ValueError(f"config key retrain.auxiliary: the auxiliary head needs"
                     f" 32x32 to 40x40 images, got retrain.image_size="
                     f"{r.image_size}; set retrain.auxiliary=False")
  if r.channels % 2:
    raise ValueError(f"config key retrain.channels={r.channels} must be even")
  if not 0.0 <= r.drop_path_prob < 1.0:
    raise ValueError(f"config key retrain.drop_path_prob={r.drop_path_prob}"
                     " must lie in [0, 1)")
  if e.calibration_images % e.calibration_batch_size:
    raise ValueError(f"config key eval.calibration_images="
                     f"{e.calibration_images} is not a multiple of"
                     f" eval.calibration_batch_size"
                     f" {e.calibration_batch_size}")


def _loss_fn(graphdef, rest, cfg):
  """The training loss: cross-entropy (+ weighted auxiliary) of augmented,
  cut-out images with drop path at the batch's ``drop_path_prob``."""

  def loss(upper, lower, batch):
    aug_key, cut_key, drop_key = jax.random.split(batch["key"], 3)
    images = ic.augment(aug_key, batch["image"])
    if cfg.cutout:
      images = ic.cutout(cut_key, images, cfg.cutout)
    net = merge_levels(graphdef, bilevel.Params(upper, lower), rest)
    with functional.kernels(cfg.kernels):
      if cfg.drop_path_prob:
        logits, aux = net(images, True,
                          drop_path_prob=batch["drop_path_prob"],
                          rngs=nnx.Rngs(dropout=drop_key))
      else:
        logits, aux = net(images, True, drop_path_prob=0.0)
    value = ic.cross_entropy(logits, batch["label"])
    if aux is not None:
      value = value + cfg.auxiliary_weight * ic.cross_entropy(
          aux, batch["label"])
    return value

  return loss


def _evaluator(graphdef, rest, data: ic.ImageData, calibration: jax.Array,
               config, genotype: darts.Genotype, num_params: int):
  """``evaluate(params)``: recalibrated test accuracy and loss."""
  e = config.eval

  def train_forward(net, x):
    with functional.kernels(config.retrain.kernels):
      return net(x, True, drop_path_prob=0.0)

  recalibrated = jax.jit(lambda params, images: recalibrate(
      train_forward, graphdef, params, rest, images,
      e.calibration_batch_size))

  @jax.jit
  def sums(params, stats, images, labels):
    with functional.kernels(config.retrain.kernels):
      logits, _ = merge_levels(graphdef, params, stats)(images, False)
    return (ic.cross_entropy(logits, labels) * labels.shape[0],
            jnp.sum(jnp.argmax(logits, -1) == labels))

  def evaluate(params: bilevel.Params) -> dict[str, Any]:
    stats = recalibrated(params, calibration)
    n, loss, correct = data.test_y.shape[0], 0.0, 0
    for i in range(0, n, e.batch_size):
      batch_loss, batch_correct = sums(params, stats,
                                       data.test_x[i:i + e.batch_size],
                                       data.test_y[i:i + e.batch_size])
      loss, correct = loss + float(batch_loss), correct + int(batch_correct)
    return {"test_accuracy": correct / n, "test_loss": loss / n,
            "params_millions": num_params / 1e6,
            "genotype": genotype_to_json(genotype)}

  return evaluate


def retrain_stage(config: ml_collections.ConfigDict, genotype: darts.Genotype,
                  data: ic.ImageData, key: jax.Array, *,
                  name: str = "retrain") -> Stage:
  """The stage that trains ``EvalNetwork(genotype)`` from scratch.

  Args:
    config: the pipeline's config (sections ``retrain``, ``eval``,
      ``model.num_classes``).
    genotype: the architecture.
    data: the training and test splits at ``retrain.image_size``.
    key: the stage's PRNG key (initial weights, batch order, augmentation,
      calibration images).
    name: the stage's name.

  Returns:
    The :class:`~experiments.task.Stage`, with its own ``params_like``.
  """
  r = config.retrain
  model_key, stream_key, augment_key, calibration_key = jax.random.split(
      key, 4)
  model = darts.EvalNetwork(
      genotype, r.channels, r.num_cells, config.model.num_classes,
      r.auxiliary, r.drop_path_prob, rngs=nnx.Rngs(params=model_key))
  graphdef, params, rest = split_levels(model, (), nnx.Param,
                                        rest=nnx.BatchStat)
  weights = nnx.to_flat_state(params.lower)
  num_params = sum(v[...].size for path, v in weights
                   if path[0] != "auxiliary_head")
  stream = data.stream(stream_key, r.batch_size)
  calibration = data.calibration_images(config.eval.calibration_images,
                                        calibration_key)

  def batches(step):
    batch = data.batch(stream, step, augment_key)
    batch["drop_path_prob"] = jnp.float32(r.drop_path_prob * step
                                          / r.num_steps)
    return {"outer_batch": batch}

  loss = _loss_fn(graphdef, rest, r)
  return Stage(
      name=name,
      solver=bilevel.per_level(optax.set_to_zero(), weight_optimizer(
          r.optimizer, r.weight_decay, r.clip_norm)),
      problem=bilevel.Problem(outer_loss=loss, inner_loss=loss),
      init=lambda finals: params, batches=batches, num_steps=r.num_steps,
      evaluate=_evaluator(graphdef, rest, data, calibration, config,
                          genotype, num_params),
      params_like=params)


def resized(data: ic.ImageData, size: int) -> ic.ImageData:
  """``data`` with both splits resized to ``size × size`` (bilinear,
  antialiased); ``data`` itself at its own size."""
  if data.train_x.shape[1] == size:
    return data
  resize = lambda x: jax.image.resize(
      x, (x.shape[0], size, size, x.shape[-1]), "linear")
  return ic.ImageData(resize(data.train_x), data.train_y,
                      resize(data.test_x), data.test_y)

