"""The interface between an experiment and the generic training loop."""

from collections.abc import Callable
from typing import Any, NamedTuple

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
