r"""DARTS / PC-DARTS search → genotype → retraining: ``architecture_search``.

The registry's ``'architecture_search'`` pipeline
(``experiments/configs/darts_cifar10.py``). ``method='darts'``, two stages:

1. ``search``: the supernet (:class:`models.darts.SearchNetwork`; PC-DARTS
   with ``model.partial_channels = K`` and ``model.edge_normalization``)
   over ``Params(upper=α (and β), lower=w)``, on the training split cut
   50/50: the *train* half for ``w`` (``inner_batch``), the *val* half for
   ``α`` (``outer_batch``), each a shuffled stream with the standard
   augmentation. One :func:`bilevel.darts` step (first or second order,
   ``solver.order``) per iteration. The official optimizers: ``w`` by SGD
   (momentum 0.9, cosine 0.025 → 0.001, weight decay 3e-4, clipping 5),
   ``α`` by Adam (officially 3e-4, β = (0.5, 0.999), weight decay 1e-3;
   the CPU protocol raises the rate, see the config); PC-DARTS's
   warm-up (``solver.warmup_steps``: the official 15 epochs) masks the
   ``α`` optimizer, so ``α`` and its Adam moments stay put until then
   (:func:`warmup_masked`). BatchNorm runs on batch statistics (the search
   BNs are non-affine; running statistics are never read). Logged at every
   log step: ``alpha/<cell>/<i>-<j>/<op>``, the op weights
   ``softmax(α)`` of the edge from node ``i`` into node ``j``, and for
   edge normalisation ``beta/<cell>/<i>-<j>``, the edge's weight among
   node ``j``'s inputs (:func:`arch_weights`). Evaluation: the derived
   ``genotype`` (a JSON dict, printed and kept in ``stages.json``), the
   number of ``skip_connect`` in its normal cell (DARTS's collapse) and
   the mean entropy of the op weights per cell.
2. ``retrain`` (:mod:`experiments.tasks.nas_retrain`): a fresh
   :class:`models.darts.EvalNetwork` of the genotype the search's final
   ``α`` derive, built when the stage starts (a
   :class:`~experiments.task.DeferredStage`; on a resumed run and in
   ``--mode=eval`` from the restored ``α``).

``method='random'``: the ``retrain`` stage alone, on
:func:`random_genotype` of ``random.seed``, the baseline that samples the
same space uniformly.

``method='gm_nas'`` (:mod:`experiments.tasks.nas_few_shot`): stages
``supernet`` (α frozen), ``sub0`` and ``sub1`` (the two sub-supernets of a
gradient-matching split, each a :func:`search_stage` with its
``op_masks``), then ``retrain`` of the one with the better
``val_accuracy`` (:func:`val_accuracy_fn`). Op masks travel in the
batches, traced, so both sub-supernets run one compiled step.

``model.kernels`` picks how the supernet's depthwise convolutions and
poolings trace (:func:`models.darts.functional.kernels`): ``'xla'``
compiles a search step several times faster than the default shifted taps,
which run faster; ``retrain.kernels`` does the same for the retraining.

References:
  Liu, Simonyan, Yang, *DARTS*, ICLR 2019 (§2.3–2.4, Appendix A).
  Xu et al., *PC-DARTS*, ICLR 2020 (§3.2–3.3; warm-up in the official
  ``train_search.py``).
"""

import zlib
from collections.abc import Callable, Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx

import bilevel
from experiments import data as data_lib
from experiments import registry
from experiments.task import DeferredStage, Pipeline, Stage
from experiments.tasks import image_classification as ic
from experiments.tasks import nas_retrain
from models import darts, merge_levels, split_levels
from models.darts import functional
from models.levels import ArchParam

METHODS = ("darts", "gm_nas", "random")
OpMasks = Mapping[str, np.ndarray]


def edge_nodes(num_edges: int) -> tuple[tuple[int, int], ...]:
  """``(input node, node)`` of each edge of a cell, in the order of the α
  rows: node ``j >= 2`` reads nodes ``0 .. j − 1``.

  Raises:
    ValueError: ``num_edges`` is no cell's count (2, 5, 9, 14, ...).
  """
  steps = darts.steps_of(num_edges)
  return tuple((i, j) for j in range(2, 2 + steps) for i in range(j))


EDGES = edge_nodes(darts.NUM_EDGES)  # the papers' cell: 14 edges


def random_genotype(key: jax.Array | int, steps: int = darts.STEPS
                    ) -> darts.Genotype:
  """A genotype drawn uniformly from the DARTS space.

  Each intermediate node of each cell reads two distinct earlier nodes (an
  unordered pair, uniformly), each through an op drawn uniformly from the
  7 that are not ``none``; both cells concatenate nodes ``2 .. 1 + steps``
  (2–5 in the papers' space).

  Args:
    key: a PRNG key, or an int seed for ``jax.random.key``.
    steps: intermediate nodes per cell.
  """
  if not isinstance(key, jax.Array):
    key = jax.random.key(key)
  pair_key, op_key = jax.random.split(key)
  shape = (len(darts.CELL_KINDS), steps, 2)
  u = np.asarray(jax.random.uniform(pair_key, shape))
  op_choice = np.asarray(jax.random.randint(op_key, shape, 0,
                                            len(darts.PRIMITIVES) - 1))
  ops = [p for p in darts.PRIMITIVES if p != "none"]
  cells = []
  for c in range(len(darts.CELL_KINDS)):
    edges = []
    for j in range(steps):
      n = 2 + j  # node 2 + j reads nodes 0 .. 1 + j
      first = int(u[c, j, 0] * n)
      second = int(u[c, j, 1] * (n - 1))
      second += second >= first  # uniform over the others
      edges += [(ops[op_choice[c, j, 0]], first),
                (ops[op_choice[c, j, 1]], second)]
    cells.append(tuple(edges))
  concat = tuple(range(2, 2 + steps))
  return darts.Genotype(cells[0], concat, cells[1], concat)


def _logits(upper, op_masks: OpMasks | None):
  """``{cell: (α [14, 8] with disabled ops at -inf, β [14] or None)}``."""
  logits = {k: np.asarray(v, np.float64)
            for k, v in nnx.to_pure_dict(upper).items()}
  out = {}
  for kind in darts.CELL_KINDS:
    alphas = logits[f"alphas_{kind}"]
    if op_masks is not None:
      alphas = np.where(np.asarray(op_masks[kind]), alphas, -np.inf)
    out[kind] = alphas, logits.get(f"betas_{kind}")
  return out


def derive(upper, op_masks: OpMasks | None = None) -> darts.Genotype:
  """The genotype of the architecture logits ``upper`` (an ``nnx.State``
  of ``alphas_<cell>`` and, with edge normalisation, ``betas_<cell>``);
  disabled ops (``op_masks[cell]`` False) never win."""
  logits = _logits(upper, op_masks)
  return darts.derive_genotype(logits["normal"][0], logits["reduce"][0],
                               logits["normal"][1], logits["reduce"][1])


def arch_weights(upper, op_masks: OpMasks | None = None) -> dict[str, float]:
  """The architecture as scalars: ``alpha/<cell>/<i>-<j>/<op>``,
  ``softmax(α)`` over the enabled ops of the edge from node ``i`` into
  node ``j``; ``beta/<cell>/<i>-<j>``, the edge's weight among node
  ``j``'s inputs (edge normalisation only)."""
  out = {}
  for kind, (alphas, betas) in _logits(upper, op_masks).items():
    edges = edge_nodes(alphas.shape[0])
    ops = np.exp(alphas - alphas.max(-1, keepdims=True))
    ops /= ops.sum(-1, keepdims=True)
    for (i, j), row in zip(edges, ops):
      for op, weight in zip(darts.PRIMITIVES, row):
        out[f"alpha/{kind}/{i}-{j}/{op}"] = float(weight)
    if betas is not None:
      nodes = np.asarray([j for _, j in edges])
      for j in np.unique(nodes):
        into = betas[nodes == j]
        weights = np.exp(into - into.max())
        for i, weight in enumerate(weights / weights.sum()):
          out[f"beta/{kind}/{i}-{j}"] = float(weight)
  return out


def genotype_metrics(upper, op_masks: OpMasks | None = None
                     ) -> dict[str, object]:
  """The search's evaluation: ``genotype`` (a JSON dict),
  ``skip_connects_normal`` and ``op_entropy_<cell>`` (the mean entropy in
  nats of the edges' op weights; ``log 8 = 2.08`` is uniform)."""
  genotype = derive(upper, op_masks)
  logging.info("derived genotype: %s", genotype)
  out = {"genotype": nas_retrain.genotype_to_json(genotype),
         "skip_connects_normal": float(sum(
             op == "skip_connect" for op, _ in genotype.normal))}
  weights = arch_weights(upper, op_masks)
  for kind in darts.CELL_KINDS:
    ops = np.asarray([v for k, v in weights.items()
                      if k.startswith(f"alpha/{kind}/")])
    terms = np.where(ops > 0, -ops * np.log(np.maximum(ops, 1e-300)), 0.0)
    out[f"op_entropy_{kind}"] = float(terms.sum() * len(darts.PRIMITIVES)
                                      / ops.size)
  return out


def warmup_masked(tx: optax.GradientTransformation, warmup_steps: int
                  ) -> optax.GradientTransformation:
  """``tx`` with zero updates and an unchanged state for its first
  ``warmup_steps`` calls (PC-DARTS's architecture warm-up)."""
  if not warmup_steps:
    return tx
  return optax.transforms.conditionally_mask(
      tx, lambda count: count >= warmup_steps)


def solver_from_config(cfg: ml_collections.ConfigDict
                       ) -> optax.GradientTransformation:
  """:func:`bilevel.darts` from the ``solver`` section.

  Reads ``order``, ``hvp``, ``fd_scale``; ``lower_optimizer`` with
  ``weight_decay`` and ``clip_norm`` (:func:`nas_retrain.weight_optimizer`);
  ``upper_optimizer`` with ``arch_weight_decay``, masked for the first
  ``warmup_steps``. Second order takes ``ξ`` = the weights' learning rate
  and their weight decay in the virtual step, as the official code.
  """
  upper = warmup_masked(optax.chain(
      optax.add_decayed_weights(cfg.arch_weight_decay),
      registry.build_optimizer(cfg.upper_optimizer)), cfg.warmup_steps)
  lower = nas_retrain.weight_optimizer(cfg.lower_optimizer, cfg.weight_decay,
                                       cfg.clip_norm)
  second = cfg.order == 2
  return bilevel.darts(
      cfg.order, upper_optimizer=upper, lower_optimizer=lower,
      virtual_learning_rate=(registry.build_learning_rate(
          cfg.lower_optimizer) if second else None),
      virtual_weight_decay=cfg.weight_decay if second else 0.0,
      hvp=cfg.hvp, fd_scale=cfg.fd_scale)


class Supernet(NamedTuple):
  """A search network split for the bilevel step.

  Attributes:
    graphdef: its graph.
    params: the initial ``Params(upper=α (β), lower=w)``.
    rest: its BatchNorm running statistics (never read: training-mode BN).
    kernels: the kernels its losses trace with
      (:func:`models.darts.functional.kernels`).
  """
  graphdef: nnx.GraphDef
  params: bilevel.Params
  rest: nnx.State
  kernels: str = "taps"


def build_supernet(cfg: ml_collections.ConfigDict, key: jax.Array
                   ) -> Supernet:
  """The :class:`models.darts.SearchNetwork` of the ``model`` section."""
  net = darts.SearchNetwork(darts.SearchConfig(
      channels=cfg.channels, num_cells=cfg.num_cells,
      num_classes=cfg.num_classes,
      partial_channels=cfg.partial_channels or None,
      edge_normalization=cfg.edge_normalization, steps=cfg.steps),
      rngs=nnx.Rngs(params=key))
  return Supernet(*split_levels(net, ArchParam, nnx.Param,
                                rest=nnx.BatchStat), kernels=cfg.kernels)


def search_problem(supernet: Supernet) -> bilevel.Problem:
  """Cross-entropy of the supernet on augmented images, for both levels
  (the batches differ: ``outer_batch`` val, ``inner_batch`` train).

  A batch may carry ``op_masks`` (``{cell: bool [E, 8]}``, a GM-NAS
  sub-supernet): traced, so every sub-supernet runs the same compiled step.
  """

  def loss(upper, lower, batch):
    net = merge_levels(supernet.graphdef, bilevel.Params(upper, lower),
                       supernet.rest)
    with functional.kernels(supernet.kernels):
      logits = net(ic.augment(batch["key"], batch["image"]), train=True,
                   op_masks=batch.get("op_masks"))
    return ic.cross_entropy(logits, batch["label"])

  return bilevel.Problem(outer_loss=loss, inner_loss=loss)


def with_op_masks(batches: Callable[[int], dict], op_masks: OpMasks | None
                  ) -> Callable[[int], dict]:
  """``batches`` with ``op_masks`` in both its batches (None: as given)."""
  if op_masks is None:
    return batches
  masks = {k: jnp.asarray(v, bool) for k, v in op_masks.items()}
  return lambda step: {name: {**batch, "op_masks": masks}
                       for name, batch in batches(step).items()}


class SearchSplit(NamedTuple):
  """The search's data: two halves of the training images, each the train
  split of its own :class:`ic.ImageData` (to reuse its batches).

  Attributes:
    train: the half for the weights ``w``.
    val: the half for the architecture ``α`` (and sub-supernet selection).
  """
  train: ic.ImageData
  val: ic.ImageData


def search_split(data: ic.ImageData, num_images: int, key: jax.Array
                 ) -> SearchSplit:
  """``num_images`` (0: all) training images drawn with ``key``, cut
  50/50.

  Raises:
    ValueError: ``num_images`` is out of range (names ``search.num_images``).
  """
  n = data.train_y.shape[0]
  num_images = num_images or n
  if not 2 <= num_images <= n:
    raise ValueError(f"config key search.num_images={num_images}: need 2"
                     f" to the {n} training images (0: all)")
  index = jax.random.permutation(key, n)[:num_images]
  halves = index[:num_images // 2], index[num_images // 2:]
  return SearchSplit(*(ic.ImageData(data.train_x[h], data.train_y[h],
                                    data.test_x, data.test_y)
                       for h in halves))


def search_batches(split: SearchSplit, batch_size: int, key: jax.Array
                   ) -> Callable[[int], dict]:
  """``batches(step)``: ``inner_batch`` from the train half and
  ``outer_batch`` from the val half, each shuffled on its own."""
  keys = jax.random.split(key, 4)
  train_stream = split.train.stream(keys[0], batch_size)
  val_stream = split.val.stream(keys[1], batch_size)
  return lambda step: {
      "outer_batch": split.val.batch(val_stream, step, keys[2]),
      "inner_batch": split.train.batch(train_stream, step, keys[3])}


def val_accuracy_fn(supernet: Supernet, val: ic.ImageData, num_images: int,
                    batch_size: int) -> Callable[..., float]:
  """``accuracy(params, op_masks=None)``: top-1 accuracy of the
  (sub-)supernet, its current mixture of ops, on the first ``num_images``
  (0: all) images of the val half, not augmented, in batches of
  ``batch_size`` with batch statistics (the search BNs keep no running
  statistics worth reading). GM-NAS ranks its sub-supernets by it.

  Raises:
    ValueError: ``num_images`` is more than the val half holds, or not a
      multiple of ``batch_size`` (names ``search.val_images``).
  """
  n = num_images or val.train_y.shape[0]
  if n > val.train_y.shape[0] or n % batch_size:
    raise ValueError(f"config key search.val_images={num_images}: {n}"
                     f" images must be at most the val half's"
                     f" {val.train_y.shape[0]} and a multiple of"
                     f" search.batch_size {batch_size}")

  @jax.jit
  def correct(params, op_masks, images, labels):
    net = merge_levels(supernet.graphdef, params, supernet.rest)
    with functional.kernels(supernet.kernels):
      logits = net(images, train=True, op_masks=op_masks)
    return jnp.sum(jnp.argmax(logits, -1) == labels)

  def accuracy(params: bilevel.Params, op_masks: OpMasks | None = None
               ) -> float:
    masks = None if op_masks is None else {
        k: jnp.asarray(v, bool) for k, v in op_masks.items()}
    hits = sum(int(correct(params, masks, val.train_x[i:i + batch_size],
                           val.train_y[i:i + batch_size]))
               for i in range(0, n, batch_size))
    return hits / n

  return accuracy


def search_stage(config: ml_collections.ConfigDict, supernet: Supernet,
                 batches: Callable[[int], dict], *, name: str = "search",
                 op_masks: OpMasks | None = None,
                 init: Callable[[Mapping[str, bilevel.Params]],
                                bilevel.Params] | None = None,
                 num_steps: int | None = None,
                 solver: optax.GradientTransformation | None = None,
                 accuracy: Callable[..., float] | None = None) -> Stage:
  """The search of one (sub-)supernet: DARTS steps on ``Params(α, w)``.

  Args:
    config: the pipeline's config (``solver``, ``search``).
    supernet: from :func:`build_supernet`.
    batches: from :func:`search_batches`.
    name: the stage's name (one per sub-supernet for GM-NAS).
    op_masks: ``{cell: bool [14, 8]}`` enabled ops (None: all), as
      :class:`models.darts.SearchNetwork` takes them.
    init: ``init(finals) -> Params`` (default: the supernet's initial
      params), e.g. a parent supernet's final params.
    num_steps: default ``search.num_steps``.
    solver: default :func:`solver_from_config` of ``config.solver``
      (e.g. one with ``α`` frozen for GM-NAS's supernet training:
      ``warmup_masked`` over all its steps).
    accuracy: :func:`val_accuracy_fn`, evaluated as ``val_accuracy``
      (None: not evaluated).
  """

  def evaluate(params):
    metrics = genotype_metrics(params.upper, op_masks)
    if accuracy is not None:
      metrics["val_accuracy"] = accuracy(params, op_masks)
    return metrics

  return Stage(
      name=name, solver=solver or registry.build_solver(config.solver),
      problem=search_problem(supernet),
      init=init or (lambda finals: supernet.params),
      batches=with_op_masks(batches, op_masks),
      num_steps=num_steps or config.search.num_steps,
      evaluate=evaluate,
      step_kind=f"darts{config.solver.order}", params_like=supernet.params,
      log_params=lambda params: arch_weights(params.upper, op_masks))


def _stage_key(key: jax.Array, name: str) -> jax.Array:
  return jax.random.fold_in(key, zlib.crc32(name.encode()))


def load_data(cfg: ml_collections.ConfigDict) -> ic.ImageData:
  """The standardised splits of the ``data`` section."""
  return ic.ImageData.from_dataset(data_lib.load_dataset(
      cfg.name, cfg.data_dir or None, max_train=cfg.max_train or None,
      max_test=cfg.max_test or None))


def pipeline_from_config(config: ml_collections.ConfigDict,
                         key: jax.Array) -> Pipeline:
  """The ``architecture_search`` pipeline (module docstring).

  Raises:
    ValueError: an unknown ``method`` or a config value out of range,
      naming its key.
  """
  if config.method not in METHODS:
    raise ValueError(f"unknown config key method={config.method!r}; valid:"
                     f" {METHODS}")
  nas_retrain.check_config(config)
  data = load_data(config.data)
  retrain_data = nas_retrain.resized(data, config.retrain.image_size)
  retrain_key = _stage_key(key, "retrain")
  if config.method == "random":
    genotype = random_genotype(config.random.seed, config.model.steps)
    logging.info("random genotype (seed %d): %s", config.random.seed,
                 genotype)
    stage = nas_retrain.retrain_stage(config, genotype, retrain_data,
                                      retrain_key)
    return Pipeline(stage.params_like, [stage])
  search_key = _stage_key(key, "search")
  model_key, split_key, data_key, score_key = jax.random.split(search_key, 4)
  supernet = build_supernet(config.model, model_key)
  split = search_split(nas_retrain.resized(data, config.search.image_size),
                       config.search.num_images, split_key)
  batches = search_batches(split, config.search.batch_size, data_key)
  accuracy = val_accuracy_fn(supernet, split.val, config.search.val_images,
                             config.search.batch_size)
  if config.method == "gm_nas":
    from experiments.tasks import nas_few_shot  # it builds on this module
    stages, chosen = nas_few_shot.search_stages(
        config, supernet, split, batches, accuracy, score_key)
  else:
    stages = [search_stage(config, supernet, batches, accuracy=accuracy)]
    chosen = lambda finals: ("search", None)

  def retrain(finals):
    name, op_masks = chosen(finals)
    genotype = derive(finals[name].upper, op_masks)
    logging.info("retraining the genotype searched by %s: %s", name,
                 genotype)
    return nas_retrain.retrain_stage(config, genotype, retrain_data,
                                     retrain_key)

  return Pipeline(supernet.params, [*stages, DeferredStage("retrain",
                                                           retrain)])
