"""Data hyper-cleaning: one learned weight per (noisy) training example.

With per-example logits ``u ∈ R^n`` (upper level) and classifier weights ``w``
(lower level), on a training set whose labels are partly flipped:

    min_u  (1/m) Σ_j CE(f_w*(x_j^val), y_j^val)
    s.t.   w*(u) = argmin_w (1/n) Σ_i σ(u_i) CE(f_w(x_i), ỹ_i) + (l2/2) ‖w‖²

A flipped example should get a low weight ``σ(u_i)``. The classifier is an
NNX :class:`models.MLP`; :func:`models.split_levels` gives its graph and the
lower pytree (the logits ``u`` live outside the model), and the losses
:func:`models.merge_levels` them back, so the problem is pure functions of
pytrees. ``‖w‖²`` covers every lower parameter, biases included.

References:
  Franceschi et al., "Forward and Reverse Gradient-Based Hyperparameter
  Optimization", ICML 2017, §5.1 (data hyper-cleaning).
"""

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

import bilevel
from experiments import data as data_lib
from experiments import evaluation, registry
from experiments.task import Task
from models import MLP, merge_levels, split_levels


class NoisySplits(NamedTuple):
  """Train / validation / test splits with partly flipped training labels.

  Attributes:
    train_x: ``[n_train, ...]`` float32 features (flattened for the MLP).
    train_y: int32 ``[n_train]`` noisy labels, the ones trained on.
    train_clean_y: int32 ``[n_train]`` true labels.
    flipped: bool ``[n_train]``, ``train_y != train_clean_y``.
    val_x: ``[n_val, ...]`` float32, clean labels ``val_y: [n_val]``.
    val_y: int32 ``[n_val]``.
    test_x: ``[n_test, ...]`` float32.
    test_y: int32 ``[n_test]``.
    num_classes: number of classes.
  """
  train_x: np.ndarray
  train_y: np.ndarray
  train_clean_y: np.ndarray
  flipped: np.ndarray
  val_x: np.ndarray
  val_y: np.ndarray
  test_x: np.ndarray
  test_y: np.ndarray
  num_classes: int


def make_noisy_splits(
    key: jax.Array,
    dataset: data_lib.Dataset,
    *,
    num_train: int,
    num_val: int,
    num_test: int | None = None,
    noise_rate: float = 0.4,
) -> NoisySplits:
  """Splits ``dataset`` and flips ``round(noise_rate · num_train)`` labels.

  Args:
    key: PRNG key.
    dataset: the source dataset.
    num_train: size of the (noisy) training split.
    num_val: size of the clean validation split.
    num_test: size of the test split, None for all of the dataset's.
    noise_rate: fraction of training labels flipped, each to a different
      class drawn uniformly among the others.

  Returns:
    The :class:`NoisySplits`.
  """
  split_key, flip_key = jax.random.split(key)
  s = data_lib.make_splits(split_key, dataset, num_train=num_train,
                           num_val=num_val, num_test=num_test)
  noisy, flipped = data_lib.flip_labels(flip_key, s.train_y, s.num_classes,
                                        noise_rate)
  return NoisySplits(s.train_x, noisy, s.train_y, flipped, s.val_x, s.val_y,
                     s.test_x, s.test_y, s.num_classes)


def standardize_features(splits: NoisySplits, eps: float = 1e-6
                         ) -> NoisySplits:
  """Standardizes each feature with the training split's mean and std.

  Statistics come from ``train_x`` alone (labels unused), so no validation or
  test information leaks; constant features (std 0) are only centred.

  Args:
    splits: the splits; features ``[n, ...]``.
    eps: added to the std.

  Returns:
    The splits with ``train_x``, ``val_x`` and ``test_x`` standardized.
  """
  mean = splits.train_x.mean(axis=0)
  std = splits.train_x.std(axis=0) + eps
  scale = lambda x: ((x - mean) / std).astype(np.float32)
  return splits._replace(train_x=scale(splits.train_x),
                         val_x=scale(splits.val_x), test_x=scale(splits.test_x))


def _flat(x: np.ndarray) -> jax.Array:
  return jnp.asarray(x, jnp.float32).reshape(len(x), -1)


def _classifier(key, in_features, hidden_sizes, num_classes, dtype):
  """The MLP as ``(apply, lower)``: ``apply(lower) -> module``, float32."""
  model = MLP(in_features, tuple(hidden_sizes), num_classes, dtype=dtype,
              param_dtype=jnp.float32, rngs=nnx.Rngs(params=key))
  graphdef, (no_upper, lower), rest = split_levels(model, ())
  apply = lambda lower: merge_levels(
      graphdef, bilevel.Params(no_upper, lower), rest)
  return apply, lower


def _losses(apply, l2: float):
  """The weighted training loss and the plain cross-entropy, in float32."""

  def cross_entropy(lower, x, y):
    logits = apply(lower)(x).astype(jnp.float32)
    return optax.losses.softmax_cross_entropy_with_integer_labels(logits, y)

  def weighted_loss(lower, x, y, weights):
    ce = cross_entropy(lower, x, y)
    sq_norm = sum(jnp.sum(jnp.square(p.astype(jnp.float32)))
                  for p in jax.tree.leaves(lower))
    return jnp.mean(weights * ce) + 0.5 * l2 * sq_norm

  return weighted_loss, cross_entropy


def _gatherer(stream: data_lib.BatchStream, arrays: dict[str, jax.Array]):
  """``step -> {name: array[indices(step)], 'index': indices(step)}``."""
  if stream.full_batch:
    full = {**arrays, "index": jnp.arange(stream.num_examples)}
    return lambda step: dict(full)

  @jax.jit
  def take(arrays, step):
    index = stream.indices(step)
    return {**{k: v[index] for k, v in arrays.items()}, "index": index}

  # Data as an argument, not a closure constant, so it is not baked into HLO.
  return lambda step: take(arrays, step)


def build_task(
    key: jax.Array,
    *,
    splits: NoisySplits,
    hidden_sizes: Sequence[int] = (),
    l2: float = 1e-3,
    inner_batch_size: int | None = None,
    outer_batch_size: int | None = None,
    dtype: jnp.dtype = jnp.float32,
) -> Task:
  """The hyper-cleaning task on ``splits``.

  Params: ``upper`` is the float32 logits ``u: [n_train]``, initialised to 0
  (every weight ``σ(0) = ½``); ``lower`` is the classifier's ``nnx.State``.
  Batches: ``inner_batch = {'x': [b, d], 'y': [b], 'index': [b]}`` from the
  noisy training split (``index`` picks the matching logits) and
  ``outer_batch = {'x', 'y', 'index'}`` from the clean validation split, each
  from its own :class:`~experiments.data.BatchStream`. Minibatch losses are
  means over the batch (unbiased for the full-batch objective).

  Args:
    key: PRNG key (model initialisation and the two batch streams).
    splits: the data, from :func:`make_noisy_splits`.
    hidden_sizes: hidden widths of the MLP; ``()`` is softmax regression.
    l2: weight of ``(l2 / 2) ‖w‖²`` in the inner loss.
    inner_batch_size: training minibatch size, None for full batch.
    outer_batch_size: validation minibatch size, None for full batch.
    dtype: compute dtype of the model (losses are float32 regardless).

  Returns:
    The :class:`~experiments.task.Task`. ``evaluate(params)`` returns
    ``test_accuracy`` and ``val_accuracy`` of the classifier ``params.lower``,
    ``auroc`` of the logits ``u`` for telling clean (high weight) from flipped
    (low weight) examples (1.0 = perfect separation, NaN without both kinds),
    and ``weights_clean_mean`` / ``weights_flipped_mean`` of ``σ(u)``.
  """
  model_key, inner_key, outer_key = jax.random.split(key, 3)
  train_x, val_x, test_x = map(_flat, (splits.train_x, splits.val_x,
                                       splits.test_x))
  apply, lower = _classifier(model_key, train_x.shape[1], hidden_sizes,
                             splits.num_classes, dtype)
  weighted_loss, cross_entropy = _losses(apply, l2)

  def inner_loss(upper, lower, batch):
    weights = jax.nn.sigmoid(upper[batch["index"]].astype(jnp.float32))
    return weighted_loss(lower, batch["x"], batch["y"], weights)

  def outer_loss(upper, lower, batch):
    del upper  # The validation loss sees u only through w*(u).
    return jnp.mean(cross_entropy(lower, batch["x"], batch["y"]))

  inner = _gatherer(
      data_lib.BatchStream(inner_key, len(train_x), inner_batch_size),
      {"x": train_x, "y": jnp.asarray(splits.train_y, jnp.int32)})
  outer = _gatherer(
      data_lib.BatchStream(outer_key, len(val_x), outer_batch_size),
      {"x": val_x, "y": jnp.asarray(splits.val_y, jnp.int32)})

  def batches(step):
    return {"outer_batch": outer(step), "inner_batch": inner(step)}

  init_params = bilevel.Params(
      upper=jnp.zeros(len(train_x), jnp.float32), lower=lower)
  evaluate = _evaluator(apply, splits, val_x, test_x)
  return Task(bilevel.Problem(outer_loss, inner_loss), init_params, batches,
              evaluate)


def _evaluator(apply, splits: NoisySplits, val_x, test_x):
  """``evaluate(params) -> metrics`` of :func:`build_task`."""
  val_y = jnp.asarray(splits.val_y, jnp.int32)
  test_y = jnp.asarray(splits.test_y, jnp.int32)
  flipped = np.asarray(splits.flipped, bool)

  @jax.jit
  def accuracies(lower, val_x, test_x):
    model = apply(lower)
    return (evaluation.accuracy(model(val_x), val_y),
            evaluation.accuracy(model(test_x), test_y))

  def evaluate(params: bilevel.Params) -> dict[str, float]:
    val_acc, test_acc = accuracies(params.lower, val_x, test_x)
    logits = np.asarray(params.upper, np.float64)
    weights = 1.0 / (1.0 + np.exp(-logits))
    both = flipped.any() and not flipped.all()
    return {
        "test_accuracy": float(test_acc),
        "val_accuracy": float(val_acc),
        # Logits, not σ(u): the same ranking without float saturation ties.
        "auroc": evaluation.auroc(logits, ~flipped) if both else float("nan"),
        "weights_clean_mean": _mean(weights[~flipped]),
        "weights_flipped_mean": _mean(weights[flipped]),
    }

  return evaluate


def _mean(x: np.ndarray) -> float:
  return float(x.mean()) if x.size else float("nan")


def _minimize(loss: Callable[[Any, jax.Array], jax.Array], params,
              optimizer: optax.GradientTransformation, steps: int):
  """``steps`` optimizer steps on ``loss(params, step)``, as a ``lax.scan``."""

  def body(carry, step):
    params, state = carry
    grads = jax.grad(loss)(params, step)
    updates, state = optimizer.update(grads, state, params)
    return (optax.apply_updates(params, updates), state), None

  (params, _), _ = jax.lax.scan(body, (params, optimizer.init(params)),
                                jnp.arange(steps))
  return params


def solve_lower(
    task: Task,
    upper: jax.Array,
    *,
    optimizer: optax.GradientTransformation,
    steps: int,
    lower=None,
):
  """Minimizes the task's inner loss over ``lower`` for a fixed ``upper``.

  Args:
    task: a task from :func:`build_task`.
    upper: logits ``[n_train]``.
    optimizer: the lower-level optimizer.
    steps: number of steps, step ``s`` on ``task.batches(s)['inner_batch']``.
    lower: starting point, ``task.init_params.lower`` when None.

  Returns:
    The lower params after ``steps`` steps (one jitted ``lax.scan``).
  """
  lower = task.init_params.lower if lower is None else lower
  inner_loss = task.problem.inner_loss
  loss = lambda upper, lower, step: inner_loss(
      upper, lower, task.batches(step)["inner_batch"])
  run = jax.jit(lambda upper, lower: _minimize(
      lambda w, step: loss(upper, w, step), lower, optimizer, steps))
  return run(upper, lower)


def train_baselines(
    key: jax.Array,
    splits: NoisySplits,
    *,
    steps: int,
    optimizer: optax.GradientTransformation,
    hidden_sizes: Sequence[int] = (),
    l2: float = 1e-3,
    batch_size: int | None = None,
    dtype: jnp.dtype = jnp.float32,
) -> dict[str, float]:
  """Trains the classifier with uniform weights on clean and on noisy labels.

  Both runs minimize the lower-level loss with every weight 1,
  ``(1/n) Σ_i CE_i + (l2/2) ‖w‖²``, from the same initialisation (the one
  :func:`build_task` draws from the same ``key``) with the same batches.

  Args:
    key: PRNG key, split as in :func:`build_task`.
    splits: the data.
    steps: optimizer steps per run.
    optimizer: the lower-level optimizer.
    hidden_sizes: hidden widths of the MLP.
    l2: weight of ``(l2 / 2) ‖w‖²``.
    batch_size: training minibatch size, None for full batch.
    dtype: compute dtype of the model.

  Returns:
    ``{'clean_test_accuracy': ..., 'noisy_test_accuracy': ...}``.
  """
  model_key, inner_key, _ = jax.random.split(key, 3)
  train_x, test_x = _flat(splits.train_x), _flat(splits.test_x)
  apply, lower = _classifier(model_key, train_x.shape[1], hidden_sizes,
                             splits.num_classes, dtype)
  weighted_loss, _ = _losses(apply, l2)
  stream = data_lib.BatchStream(inner_key, len(train_x), batch_size)

  @jax.jit
  def test_accuracy(lower, train_x, train_y, test_x, test_y):
    def loss(w, step):
      if stream.full_batch:
        return weighted_loss(w, train_x, train_y, 1.0)
      index = stream.indices(step)
      return weighted_loss(w, train_x[index], train_y[index], 1.0)
    lower = _minimize(loss, lower, optimizer, steps)
    return evaluation.accuracy(apply(lower)(test_x), test_y)

  test_y = jnp.asarray(splits.test_y, jnp.int32)
  results = {}
  for name, labels in (("clean", splits.train_clean_y),
                       ("noisy", splits.train_y)):
    train_y = jnp.asarray(labels, jnp.int32)
    results[f"{name}_test_accuracy"] = float(
        test_accuracy(lower, train_x, train_y, test_x, test_y))
  return results


def task_from_config(config: ml_collections.ConfigDict,
                     key: jax.Array) -> Task:
  """The registry's ``'hyper_cleaning'`` task from its config sections.

  ``data`` gives the dataset and the noisy splits (:func:`make_noisy_splits`,
  optionally :func:`standardize_features`), ``model`` and ``problem`` the
  classifier and ``l2`` (:func:`build_task`). With ``eval.baselines`` the
  final metrics add :func:`train_baselines`' clean and noisy accuracies,
  trained ``eval.baseline_steps`` steps with ``solver.inner_optimizer``.
  """
  # Four keys, the first unused: the split is what the recorded results
  # (BENCHMARKS.md) were drawn with.
  _, split_key, model_key, baseline_key = jax.random.split(key, 4)
  dataset = data_lib.load_dataset(
      config.data.name, config.data.data_dir or None)
  splits = make_noisy_splits(
      split_key, dataset,
      num_train=config.data.num_train,
      num_val=config.data.num_val,
      num_test=config.data.num_test or None,
      noise_rate=config.data.noise_rate)
  if config.data.standardize:
    splits = standardize_features(splits)
  task = build_task(
      model_key, splits=splits,
      hidden_sizes=tuple(config.model.hidden_sizes),
      l2=config.problem.l2,
      inner_batch_size=config.data.inner_batch_size or None,
      outer_batch_size=config.data.outer_batch_size or None,
      dtype=jnp.dtype(config.model.dtype))
  if not config.eval.baselines:
    return task

  def evaluate(params: bilevel.Params) -> dict[str, float]:
    baselines = train_baselines(
        baseline_key, splits,
        hidden_sizes=tuple(config.model.hidden_sizes),
        l2=config.problem.l2,
        steps=config.eval.baseline_steps,
        optimizer=registry.build_optimizer(config.solver.inner_optimizer))
    return {**task.evaluate(params), **baselines}

  return task._replace(evaluate=evaluate)
