"""The interface between an experiment and the generic training loop.

A :class:`Task` is one bi-level run; a :class:`Pipeline` is a sequence of
:class:`Stage` runs (e.g. pretrain → prune → finetune), each resumable on
its own; a :class:`DeferredStage` is built from the results of the stages
before it (e.g. a network retrained on a searched architecture).
"""

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import optax

import bilevel


class Task(NamedTuple):
  """A bi-level experiment: problem, initial point, data stream, evaluation.

  The training loop builds a solver ``tx``, runs
  ``bilevel.make_step(tx, task.problem)`` on ``task.batches(step)`` from
  ``task.init_params`` and calls ``task.evaluate(params)`` at the end.

  Attributes:
    problem: the bi-level losses.
    init_params: the initial ``Params(upper, lower)``.
    batches: ``batches(step) -> {'outer_batch': ..., 'inner_batch': ...}``, a
      deterministic function of the step (the data position), so resuming at
      a step replays the uninterrupted run's data.
    evaluate: ``evaluate(params) -> {metric_name: float}``, the final metrics.
  """
  problem: bilevel.Problem
  init_params: bilevel.Params
  batches: Callable[[int], dict[str, Any]]
  evaluate: Callable[[bilevel.Params], dict[str, float]]


class Stage(NamedTuple):
  """One phase of a :class:`Pipeline`: its own solver, data and step count.

  Attributes:
    name: the stage's name; its checkpoints and metrics go to
      ``<workdir>/<name>`` unless ``workdir`` is set.
    solver: the transformation over ``Params`` this stage runs.
    problem: the losses.
    init: ``init(finals) -> Params``, the stage's starting point from
      ``finals``, the final params of the stages before it, by name.
    batches: ``batches(step) -> {'outer_batch': ..., ...}``, deterministic.
    num_steps: steps of this stage.
    evaluate: ``evaluate(params) -> {metric: float}`` after the stage, or
      None; the last stage's is the pipeline's final evaluation.
    workdir: a directory of its own (e.g. a pretrained model shared by
      several pipelines), or None for ``<workdir>/<name>``.
    step_kind: what one step costs, for compute accounting (e.g. ``'train'``
      for a plain training step, ``'bip'`` for a BiP step).
    params_like: this stage's params structure when it differs from the
      pipeline's ``params_like`` (e.g. a shared stage that must not depend
      on the options of the pipelines sharing it), else None.
    batches_from: ``batches_from(finals) -> batches``, for a stage whose
      data depend on earlier stages' results (e.g. a training set resampled
      by learned weights); replaces ``batches`` when given. It is called
      on a resumed run too, with the earlier stages' restored params.
    log_params: ``log_params(params) -> {metric: scalar}``, logged with the
      step's metrics at every log step (e.g. architecture weights, for
      their trajectories), or None.

  ``evaluate`` may also return JSON values that are not numbers (e.g. a
  derived architecture as a dict): they go to ``stages.json`` and
  ``results.json`` and are printed, but are not logged as metrics.
  """
  name: str
  solver: optax.GradientTransformation
  problem: bilevel.Problem
  init: Callable[[Mapping[str, bilevel.Params]], bilevel.Params]
  batches: Callable[[int], dict[str, Any]]
  num_steps: int
  evaluate: Callable[[bilevel.Params], dict[str, float]] | None = None
  workdir: str | None = None
  step_kind: str = "train"
  params_like: bilevel.Params | None = None
  batches_from: Callable[[Mapping[str, bilevel.Params]],
                         Callable[[int], dict[str, Any]]] | None = None
  log_params: Callable[[bilevel.Params], dict[str, Any]] | None = None


class DeferredStage(NamedTuple):
  """A stage whose model depends on the results of the stages before it.

  E.g. a network retrained on the architecture a search stage found: the
  structure of its params, its losses and its evaluation exist only once
  that architecture does. When its turn comes the pipeline calls
  ``build(finals)`` with the final params of the stages before it, by name,
  and runs the :class:`Stage` it returns; on a resumed run and for
  ``--mode=eval`` too, with those stages' restored params.

  Attributes:
    name: the stage's name; the built stage must have the same.
    build: ``build(finals) -> Stage``; the stage should set its own
      ``params_like``.
  """
  name: str
  build: Callable[[Mapping[str, bilevel.Params]], Stage]


class Pipeline(NamedTuple):
  """Stages run in order, each starting from earlier stages' results.

  Attributes:
    params_like: params with the structure, shapes and dtypes every stage's
      params have (used to restore checkpoints).
    stages: the stages (or deferred stages); the last has an ``evaluate``.
  """
  params_like: bilevel.Params
  stages: Sequence[Stage | DeferredStage]
