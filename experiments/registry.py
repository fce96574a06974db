"""Registry: config names to optimizers, solvers and tasks.

The one place where config sections become optimizers and solvers: the
training loop builds a run's solver here, and every task
(``experiments/tasks/``) builds its own optimizers here too. Each table maps
a name to a factory; an unknown name raises a ``ValueError`` that lists the
valid ones.

Tasks are named by their module in ``experiments.tasks`` and imported when
first built: they import this registry, so importing them here would make a
cycle (and a run imports only its own task).
"""

import importlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

import bilevel
from experiments.task import Pipeline, Task

ConfigLike = ml_collections.ConfigDict | Mapping[str, Any]


def _lookup(table: Mapping[str, Any], name: str, what: str) -> Any:
  if name not in table:
    raise ValueError(
        f"Unknown {what} {name!r}; valid names: {', '.join(sorted(table))}")
  return table[name]


# ----------------------------------------------------------------------------
# Optimizers.


SCHEDULES: dict[str, Callable[..., optax.ScalarOrSchedule]] = {
    "constant": lambda cfg: cfg.lr,
    "cosine": lambda cfg: optax.cosine_decay_schedule(
        cfg.lr, max(cfg.decay_steps, 1),
        alpha=cfg.get("final_lr_fraction", 0.0)),
}


def build_learning_rate(cfg: ConfigLike) -> optax.ScalarOrSchedule:
  """``cfg.lr``, or its schedule ``cfg.schedule`` (``'cosine'``: decay to
  ``cfg.final_lr_fraction`` (default 0) of it over ``cfg.decay_steps``).

  Raises:
    ValueError: an unknown schedule name.
  """
  if not isinstance(cfg, ml_collections.ConfigDict):
    cfg = ml_collections.ConfigDict(dict(cfg))
  return _lookup(SCHEDULES, cfg.get("schedule", "constant"),
                 "learning-rate schedule (config key 'schedule')")(cfg)


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
    "sgd": lambda cfg: optax.sgd(build_learning_rate(cfg)),
    "momentum": lambda cfg: optax.sgd(build_learning_rate(cfg),
                                      momentum=cfg.get("momentum", 0.9)),
    "adam": lambda cfg: optax.adam(build_learning_rate(cfg),
                                   b1=cfg.get("b1", 0.9),
                                   b2=cfg.get("b2", 0.999)),
    "adamw": _adamw,
}


def build_optimizer(cfg: ConfigLike) -> optax.GradientTransformation:
  """An optax optimizer from ``{name, lr, ...}``.

  Args:
    cfg: a config section (or a plain mapping): ``name`` (a key of
      ``OPTIMIZERS``), ``lr`` and the optimizer's own fields:
      ``momentum`` (``'momentum'``, default 0.9), ``b1, b2`` (``'adam'``,
      default 0.9, 0.999), ``schedule`` (``'sgd'``, ``'momentum'``,
      ``'adam'``: a key of ``SCHEDULES``, default ``'constant'``;
      ``'cosine'`` reads ``decay_steps`` and optional
      ``final_lr_fraction``), and ``adamw``'s warm-up, decay and clipping
      fields (see ``_adamw``).

  Returns:
    The optimizer.

  Raises:
    ValueError: an unknown optimizer or schedule name.
  """
  if not isinstance(cfg, ml_collections.ConfigDict):
    cfg = ml_collections.ConfigDict(dict(cfg))
  return _lookup(OPTIMIZERS, cfg.name, "optimizer (config key 'name')")(cfg)


# ----------------------------------------------------------------------------
# Bilevel solvers.


LINEAR_SOLVES: dict[str, Callable[..., Callable]] = {
    "cg": lambda cfg: lambda matvec, b: bilevel.solve_cg(
        matvec, b, ridge=cfg.ridge, maxiter=cfg.maxiter),
    "normal_cg": lambda cfg: lambda matvec, b: bilevel.solve_normal_cg(
        matvec, b, ridge=cfg.ridge, maxiter=cfg.maxiter),
    "neumann": lambda cfg: lambda matvec, b: bilevel.solve_neumann(
        matvec, b, step=cfg.step, maxiter=cfg.maxiter),
}


def build_linear_solve(cfg: ml_collections.ConfigDict) -> Callable:
  """``solve(matvec, b)`` from ``{name, ridge | step, maxiter}``."""
  return _lookup(LINEAR_SOLVES, cfg.name, "linear solve")(cfg)


def _implicit(
    cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
  solve = build_linear_solve(cfg.linear_solve)
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


def _from_task(module: str, factory: str) -> Callable:
  """``experiments.tasks.<module>.<factory>``, imported at the first call."""

  def build(*args):
    task_module = importlib.import_module(f"experiments.tasks.{module}")
    return getattr(task_module, factory)(*args)

  build.__qualname__ = build.__name__ = f"{module}.{factory}"
  return build


SOLVERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "train": _train,
    "implicit": _implicit,
    "unrolled": _unrolled,
    # A task's own solvers, for its projections and inner solvers.
    "lv_hba": _from_task("lv_hba_toy", "solver_from_config"),
    "lv_hba_svm": _from_task("svm", "solver_from_config"),
    "scalebio": _from_task("data_reweighting", "solver_from_config"),
    "darts": _from_task("nas_search", "solver_from_config"),
}


def build_solver(
    cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """A bilevel solver from the ``solver`` config section."""
  return _lookup(SOLVERS, cfg.name, "solver (config key 'solver.name')")(cfg)


# ----------------------------------------------------------------------------
# Tasks.


TASKS: dict[str, Callable[[ml_collections.ConfigDict, jax.Array],
                          Task | Pipeline]] = {
    "hyper_cleaning": _from_task("hyper_cleaning", "task_from_config"),
    "cifar_pruning": _from_task("pruning", "pipeline_from_config"),
    "lv_hba_toy": _from_task("lv_hba_toy", "task_from_config"),
    "lv_hba_svm": _from_task("svm", "task_from_config"),
    "moe_lm": _from_task("moe_lm", "task_from_config"),
    "data_reweighting": _from_task("data_reweighting",
                                   "pipeline_from_config"),
    "biformer_classification": _from_task("biformer_classification",
                                          "task_from_config"),
    "architecture_search": _from_task("nas_search", "pipeline_from_config"),
}


def build_task(config: ml_collections.ConfigDict,
               key: jax.Array) -> Task | Pipeline:
  """The task (or pipeline of stages) named by ``config.task``."""
  return _lookup(TASKS, config.task, "task (config key 'task')")(config, key)
