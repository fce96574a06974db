r"""CIFAR pruning pipelines: BiP, one-shot and iterative magnitude pruning.

Every method starts from the same dense model (stage ``pretrain``), holds
``Params(upper=mask or scores, lower=weights)`` over the flat weight dict of
:class:`~experiments.tasks.image_classification.Network`, and retrains with the
same optimiser (SGD with momentum, cosine decay, weight decay ``γ``):

* ``omp`` (one-shot magnitude pruning): keep the largest ``|θ|`` of the
  pretrained model, then retrain (stage ``finetune``).
* ``imp`` (iterative magnitude pruning with weight rewinding): rounds
  ``round_01, round_02, …``; each keeps 80 % of the surviving weights by
  magnitude of the previous round's weights, rewinds the weights to the
  pretrained ones and retrains. Rounds that reach a target sparsity are
  evaluated, so one run gives every target.
* ``bip``: stage ``prune`` runs ``bilevel.bip`` (the paper's sequential
  order: θ-step, then the implicit gradient at the new θ) on scores ``s``
  (initialised to the magnitudes OMP ranks by) and weights, the mask being
  the straight-through top-k of ``s``; optional stage ``finetune`` retrains
  the final binary mask's weights. ``prune.correction=False`` is the
  first-order ablation.

BatchNorm runs on batch statistics in training; evaluation recalibrates it
on fixed training images (see ``experiments.tasks.image_classification``).
"""

import zlib
from collections.abc import Callable

import jax
import ml_collections
import optax
from flax import nnx

import bilevel
from experiments import data as data_lib
from experiments import registry
from experiments.task import Pipeline, Stage
from experiments.tasks import image_classification as ic
from models import mask_builders as pm
from models.resnet_cifar import ResNetCIFAR, SmallCNN

METHODS = ("bip", "omp", "imp")


def build_model(cfg: ml_collections.ConfigDict, key: jax.Array) -> nnx.Module:
  """``resnet<depth>`` or ``small_cnn`` from the ``model`` config section."""
  rngs = nnx.Rngs(key)
  if cfg.name == "small_cnn":
    return SmallCNN(cfg.num_classes, rngs=rngs)
  if cfg.name.startswith("resnet") and cfg.name[6:].isdigit():
    return ResNetCIFAR(int(cfg.name[6:]), cfg.num_classes, rngs=rngs)
  raise ValueError(f"unknown model.name {cfg.name!r}; valid: 'small_cnn',"
                   " 'resnet20', 'resnet32', 'resnet44', 'resnet56'")


def _stage_key(key: jax.Array, name: str) -> jax.Array:
  return jax.random.fold_in(key, zlib.crc32(name.encode()))


class _Setup:
  """What every stage shares: data, network, mask layout, losses, eval."""

  def __init__(self, config: ml_collections.ConfigDict, key: jax.Array):
    model_key, self.data_key = jax.random.split(key)
    dataset = data_lib.load_dataset(
        config.data.name, config.data.data_dir or None,
        max_train=config.data.max_train or None,
        max_test=config.data.max_test or None)
    self.data = ic.ImageData.from_dataset(dataset)
    self.network = ic.Network(build_model(config.model, model_key))
    self.layout = pm.MaskLayout(config.mask.mode, config.mask.scope,
                                tuple(config.mask.exclude))
    weights = self.network.init_weights()
    self.params_like = bilevel.Params(pm.ones_mask(self.layout, weights),
                                      weights)
    self.batch_size = config.data.batch_size
    self.calibration = self.data.calibration_images(
        config.eval.calibration_images, _stage_key(self.data_key, "eval"))
    self.recalibrate = jax.jit(
        self.network.recalibrate, static_argnums=2)
    self.eval_batch_size = config.eval.batch_size
    self.calibration_batch_size = config.eval.calibration_batch_size

  def loss(self, mask, weights, batch) -> jax.Array:
    """Cross-entropy of the pruned network on the augmented batch."""
    images = ic.augment(batch["key"], batch["image"])
    logits = self.network.apply(pm.apply_mask(mask, weights), images,
                                train=True)
    return ic.cross_entropy(logits, batch["label"])

  def problem(self) -> bilevel.Problem:
    return bilevel.Problem(outer_loss=self.loss, inner_loss=self.loss)

  def batches(self, name: str, two_streams: bool = False):
    """``batches(step)`` of stage ``name``: ``outer_batch`` (and
    ``inner_batch``) from independent shuffles of the training split, each
    with its own augmentation key."""
    outer_key, inner_key, outer_aug, inner_aug = jax.random.split(
        _stage_key(self.data_key, name), 4)
    outer = self.data.stream(outer_key, self.batch_size)
    inner = self.data.stream(inner_key, self.batch_size)

    def batches(step):
      out = {"outer_batch": self.data.batch(outer, step, outer_aug)}
      if two_streams:
        out["inner_batch"] = self.data.batch(inner, step, inner_aug)
      return out

    return batches

  def evaluate(self, mask, weights) -> dict[str, float]:
    """Test accuracy (BatchNorm recalibrated) and sparsity of a hard mask."""
    pruned = pm.apply_mask(mask, weights)
    stats = self.recalibrate(pruned, self.calibration,
                             self.calibration_batch_size)
    accuracy = ic.accuracy(self.network, pruned, stats, self.data.test_x,
                           self.data.test_y, self.eval_batch_size)
    return {"test_accuracy": accuracy,
            **pm.sparsity_report(self.layout, mask, weights)}


def _sgd(lr: float, momentum: float, num_steps: int
         ) -> optax.GradientTransformation:
  """SGD with momentum, ``lr`` cosine-decayed to 0 over ``num_steps``."""
  return registry.build_optimizer(
      {"name": "momentum", "lr": lr, "momentum": momentum,
       "schedule": "cosine", "decay_steps": num_steps})


def _train_solver(cfg, num_steps) -> optax.GradientTransformation:
  """Weights only: SGD-momentum on ``∇ℓ + wd·θ``; the mask stays fixed."""
  return bilevel.per_level(
      optax.set_to_zero(),
      optax.chain(optax.add_decayed_weights(cfg.weight_decay),
                  _sgd(cfg.lr, cfg.momentum, num_steps)))


def _train_stage(setup: _Setup, name: str, cfg, init, *, evaluate=True,
                 workdir=None) -> Stage:
  return Stage(
      name=name, solver=_train_solver(cfg, cfg.num_steps),
      problem=setup.problem(), init=init, batches=setup.batches(name),
      num_steps=cfg.num_steps,
      evaluate=(lambda p: setup.evaluate(p.upper, p.lower)) if evaluate
      else None,
      workdir=workdir)


def _omp_stages(setup, config, pretrained: Callable) -> list[Stage]:
  kept = 1.0 - config.sparsity

  def init(finals):
    dense = pretrained(finals)
    return bilevel.Params(
        pm.magnitude_mask(setup.layout, dense.upper, dense.lower, kept),
        dense.lower)

  return [_train_stage(setup, "finetune", config.finetune, init)]


def _imp_stages(setup, config, pretrained: Callable) -> list[Stage]:
  stages, previous = [], None
  schedule = pm.imp_schedule(tuple(config.imp.targets), config.imp.rate)
  cfg = config.finetune.copy_and_resolve_references()
  cfg.num_steps = config.imp.round_steps
  for j, (kept, is_target) in enumerate(schedule, start=1):
    name = f"round_{j:02d}"

    def init(finals, previous=previous, kept=kept):
      dense = pretrained(finals)
      last = finals[previous] if previous else dense
      # Prune by the trained weights' magnitudes, then rewind the weights.
      return bilevel.Params(
          pm.magnitude_mask(setup.layout, last.upper, last.lower, kept),
          dense.lower)

    stages.append(_train_stage(setup, name, cfg, init,
                               evaluate=is_target or j == len(schedule)))
    previous = name
  return stages


def _bip_solver(setup: _Setup, config) -> optax.GradientTransformation:
  cfg = config.prune
  mask_fn = pm.straight_through_mask_fn(
      setup.layout, 1.0 - config.sparsity, setup.params_like.upper)
  return bilevel.bip(
      _sgd(cfg.mask_lr, cfg.momentum, cfg.num_steps),
      _sgd(cfg.lr, cfg.momentum, cfg.num_steps),
      gamma=cfg.gamma, relaxed=False, mask_fn=mask_fn,
      correction=cfg.correction, sequential=cfg.sequential)


def _bip_stages(setup, config, pretrained: Callable) -> list[Stage]:
  kept = 1.0 - config.sparsity

  def prune_init(finals):
    dense = pretrained(finals)
    scores = pm.magnitude_scores(setup.layout, dense.upper, dense.lower)
    return bilevel.Params(scores, dense.lower)

  def binarize(params):
    return bilevel.Params(pm.topk_mask(setup.layout, params.upper, kept),
                          params.lower)

  finetune = config.finetune.num_steps > 0
  prune = Stage(
      name="prune", solver=_bip_solver(setup, config),
      problem=setup.problem(), init=prune_init,
      batches=setup.batches("prune", two_streams=True),
      num_steps=config.prune.num_steps,
      evaluate=lambda p: setup.evaluate(*binarize(p)), step_kind="bip")
  if not finetune:
    return [prune]
  return [prune, _train_stage(
      setup, "finetune", config.finetune,
      lambda finals: binarize(finals["prune"]))]


_METHOD_STAGES = {"omp": _omp_stages, "imp": _imp_stages, "bip": _bip_stages}


def pipeline_from_config(config: ml_collections.ConfigDict,
                         key: jax.Array) -> Pipeline:
  """The ``cifar_pruning`` task: pretrain, then ``config.method``'s stages."""
  if config.method not in METHODS:
    raise ValueError(f"unknown config key method={config.method!r}; valid:"
                     f" {METHODS}")
  if not 0.0 < config.sparsity < 1.0:
    raise ValueError(f"config key sparsity={config.sparsity} must lie in"
                     " (0, 1)")
  setup = _Setup(config, key)
  dense_mask = setup.params_like.upper
  # Independent of the mask layout, so pipelines with different layouts can
  # share one pretrained model (config key pretrain.workdir).
  pretrain_params = bilevel.Params(pm.dense_mask(setup.params_like.lower),
                                   setup.params_like.lower)
  pretrain = _train_stage(
      setup, "pretrain", config.pretrain, lambda finals: pretrain_params,
      workdir=config.pretrain.workdir or None)._replace(
          params_like=pretrain_params)
  pretrained = lambda finals: bilevel.Params(dense_mask,
                                             finals["pretrain"].lower)
  stages = _METHOD_STAGES[config.method](setup, config, pretrained)
  return Pipeline(setup.params_like, [pretrain, *stages])
