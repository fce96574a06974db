"""Registry: config names to optimizers, solvers and tasks.

The only place where config sections become library objects. Each table maps
a name to a factory; an unknown name raises a ``ValueError`` that lists the
valid ones.
"""

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

import bilevel
from experiments import data as data_lib
from experiments.task import Pipeline, Task
from experiments.tasks import (
  biformer_classification,
  hyper_cleaning,
  lv_hba_toy,
  moe_lm,
  pruning,
  svm,
)


def _lookup(table: Mapping[str, Any], name: str, what: str) -> Any:
  if name not in table:
    raise ValueError(
        f"Unknown {what} {name!r}; valid names: {', '.join(sorted(table))}")
  return table[name]


def _adamw(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """AdamW, linear warm-up then cosine decay, optional global-norm clipping.

  Reads ``lr, warmup_steps, decay_steps`` (including the warm-up),
  ``final_lr_fraction, b1, b2, weight_decay, clip_norm`` (0: none). Weight
  decay applies to matrices only (``ndim >= 2``), not to norms' scales.
  """
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, cfg.lr, cfg.warmup_steps,
      max(cfg.decay_steps, cfg.warmup_steps + 1),
      end_value=cfg.lr * cfg.final_lr_fraction)
  tx = optax.adamw(
      schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay,
      mask=lambda params: jax.tree.map(lambda p: jnp.ndim(p) >= 2, params))
  if cfg.clip_norm:
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), tx)
  return tx


OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "sgd": lambda cfg: optax.sgd(cfg.lr),
    "momentum": lambda cfg: optax.sgd(cfg.lr, momentum=cfg.get("momentum",
                                                                0.9)),
    "adam": lambda cfg: optax.adam(cfg.lr),
    "adamw": _adamw,
}


def build_optimizer(
    cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """An optax optimizer from ``{name, lr, ...}``."""
  return _lookup(OPTIMIZERS, cfg.name, "optimizer (config key 'name')")(cfg)


LINEAR_SOLVES: dict[str, Callable[..., Callable]] = {
    "cg": lambda cfg: lambda matvec, b: bilevel.solve_cg(
        matvec, b, ridge=cfg.ridge, maxiter=cfg.maxiter),
    "normal_cg": lambda cfg: lambda matvec, b: bilevel.solve_normal_cg(
        matvec, b, ridge=cfg.ridge, maxiter=cfg.maxiter),
    "neumann": lambda cfg: lambda matvec, b: bilevel.solve_neumann(
        matvec, b, step=cfg.step, maxiter=cfg.maxiter),
}


def _implicit(
    cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
  solve = _lookup(LINEAR_SOLVES, cfg.linear_solve.name, "linear solve")(
      cfg.linear_solve)
  return bilevel.implicit(
      build_optimizer(cfg.upper_optimizer),
      build_optimizer(cfg.inner_optimizer),
      inner_steps=cfg.inner_steps,
      linear_solve=solve)


def _unrolled(
    cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
  return bilevel.unrolled(
      build_optimizer(cfg.upper_optimizer),
      build_optimizer(cfg.inner_optimizer),
      inner_steps=cfg.inner_steps)


def _train(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Single-level training: ``cfg.optimizer`` on the lower level (the model)
  from the outer loss's gradient; the upper level stays fixed."""
  return bilevel.per_level(optax.set_to_zero(),
                           build_optimizer(cfg.optimizer))


SOLVERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "train": _train,
    "implicit": _implicit,
    "unrolled": _unrolled,
    "lv_hba": lv_hba_toy.solver_from_config,
    "lv_hba_svm": svm.solver_from_config,
}


def build_solver(
    cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """A bilevel solver from the ``solver`` config section."""
  return _lookup(SOLVERS, cfg.name, "solver (config key 'solver.name')")(cfg)


def _hyper_cleaning(config: ml_collections.ConfigDict, key: jax.Array) -> Task:
  # Four keys, the first unused: the split is what the recorded results
  # (BENCHMARKS.md) were drawn with.
  _, split_key, model_key, baseline_key = jax.random.split(key, 4)
  dataset = data_lib.load_dataset(
      config.data.name, config.data.data_dir or None)
  splits = hyper_cleaning.make_noisy_splits(
      split_key, dataset,
      num_train=config.data.num_train,
      num_val=config.data.num_val,
      num_test=config.data.num_test or None,
      noise_rate=config.data.noise_rate)
  if config.data.standardize:
    splits = hyper_cleaning.standardize_features(splits)
  task = hyper_cleaning.build_task(
      model_key, splits=splits,
      hidden_sizes=tuple(config.model.hidden_sizes),
      l2=config.problem.l2,
      inner_batch_size=config.data.inner_batch_size or None,
      outer_batch_size=config.data.outer_batch_size or None,
      dtype=jnp.dtype(config.model.dtype))
  if not config.eval.baselines:
    return task

  def evaluate(params: bilevel.Params) -> dict[str, float]:
    baselines = hyper_cleaning.train_baselines(
        baseline_key, splits,
        hidden_sizes=tuple(config.model.hidden_sizes),
        l2=config.problem.l2,
        steps=config.eval.baseline_steps,
        optimizer=build_optimizer(config.solver.inner_optimizer))
    return {**task.evaluate(params), **baselines}

  return task._replace(evaluate=evaluate)


TASKS: dict[str, Callable[[ml_collections.ConfigDict, jax.Array],
                          Task | Pipeline]] = {
    "hyper_cleaning": _hyper_cleaning,
    "cifar_pruning": pruning.pipeline_from_config,
    "lv_hba_toy": lv_hba_toy.task_from_config,
    "lv_hba_svm": svm.task_from_config,
    "moe_lm": moe_lm.task_from_config,
    "biformer_classification": biformer_classification.task_from_config,
}


def build_task(config: ml_collections.ConfigDict,
               key: jax.Array) -> Task | Pipeline:
  """The task (or pipeline of stages) named by ``config.task``."""
  return _lookup(TASKS, config.task, "task (config key 'task')")(config, key)
