"""``make_step``: one jitted outer step of any bilevel solver.

The step does exactly the work the solver needs: ``outer_grads = ∇F`` at the
input parameters only for solvers that read it (LV-HBA); solvers that
evaluate ``∇F`` themselves (implicit at ``y*``, unrolled through ``y_T``, BiP
at the pruned weights) receive :class:`bilevel.OuterGradsNotUsed` instead, so
no unused gradient is computed and a wrapper chained before them refuses.
"""

import difflib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import optax

from bilevel._base import (
  OuterGradsNotUsed,
  Params,
  Problem,
  check_params,
  uses_outer_grads,
)

BATCH_KEYS = ("outer_batch", "inner_batch")


def check_batches(batches: Any, extra_keys: tuple[str, ...] = ()) -> None:
  """Raises unless ``batches`` has exactly the keys a step can use.

  A misspelt key would otherwise reach the user's loss as ``batch=None``.

  Args:
    batches: the mapping passed to the step.
    extra_keys: further keys the caller declared (passed on as extra args).

  Raises:
    TypeError: ``batches`` is not a mapping.
    KeyError: an unknown key, naming it (and the closest valid key for a
      misspelling), or neither batch key. One missing batch key is None (a
      single-level task has no inner batch).
  """
  if not isinstance(batches, Mapping):
    raise TypeError("batches must be a dict with keys 'outer_batch' and "
                    f"'inner_batch', got {type(batches).__name__}")
  valid = BATCH_KEYS + tuple(extra_keys)
  unknown = [k for k in batches if k not in valid]
  if unknown:
    hints = [f"{k!r} (did you mean {m[0]!r}?)" if (
        m := difflib.get_close_matches(k, valid, n=1)) else repr(k)
             for k in unknown]
    raise KeyError(f"unknown batch key(s) {', '.join(hints)}; valid keys: "
                   f"{', '.join(valid)} (declare others with make_step("
                   "extra_batch_keys=...))")
  if not any(k in batches for k in BATCH_KEYS):
    raise KeyError("batches has neither 'outer_batch' nor 'inner_batch'; got"
                   f" keys {sorted(batches)}")


def _aux_at(problem: Problem, params: Params, batches) -> dict[str, Any]:
  """Both losses' aux at ``params`` (forward passes only)."""
  outer = problem.outer_loss(params.upper, params.lower,
                             batches["outer_batch"])
  inner = problem.inner_loss(params.upper, params.lower,
                             batches["inner_batch"])
  return {"outer": outer[1], "inner": inner[1]}


def make_step(
    tx: optax.GradientTransformation,
    problem: Problem,
    *,
    jit: bool = True,
    donate: bool = False,
    extra_batch_keys: tuple[str, ...] = (),
    extra_args: Mapping[str, Any] | None = None,
) -> Callable[..., tuple[Params, optax.OptState, dict[str, Any]]]:
  """Returns ``step(params, state, batches) -> (params, state, metrics)``.

  The step calls ``tx.update(outer_grads, state, params, outer_loss=F,
  inner_loss=f, constraints=c, value=F(params), **batches, **extra_args)``
  and applies the updates. ``outer_grads = ∇F(params)`` on
  ``batches['outer_batch']`` is computed only when the solver reads it (see
  :func:`bilevel.uses_outer_grads`); otherwise it is
  :class:`bilevel.OuterGradsNotUsed`. ``value`` (for
  ``reduce_on_plateau`` and line searches inside :func:`bilevel.per_level`)
  costs one forward of ``F`` that XLA removes when no transformation reads
  it.

  Args:
    tx: a bilevel solver (any transformation over ``Params``).
    problem: the losses (and constraints) of the bi-level problem.
    jit: whether to ``jax.jit`` the step.
    donate: whether the jitted step donates ``params`` and ``state``.
    extra_batch_keys: keys of ``batches`` beyond ``outer_batch`` and
      ``inner_batch`` (passed to ``tx.update`` as extra arguments).
    extra_args: constant extra arguments for ``tx.update`` (e.g.
      ``value_fn=Params(upper=phi, lower=None)`` for ``optax.lbfgs``).

  Returns:
    The step function. ``metrics['outer_loss']`` is ``F`` at the input
    params for solvers that read ``outer_grads``, and otherwise the value
    the solver recorded where it evaluated ``F`` (its state's
    ``outer_loss``) when it records one, else ``F`` at the input params.
    With ``problem.has_aux``, ``metrics['aux']`` holds
    ``{'outer': ..., 'inner': ...}``, the losses' aux at the new params.

  Raises:
    TypeError, KeyError: from the step, for params that are not
      :class:`Params` or batches with missing or unknown keys.
  """
  values = problem.values()
  constant_args = dict(extra_args or {})

  def outer_value(params, batch):
    return values.outer_loss(params.upper, params.lower, batch)

  def step(params: Params, state, batches: Mapping[str, Any]):
    check_params(params, "make_step")
    check_batches(batches, extra_batch_keys)
    batches = {k: None for k in BATCH_KEYS} | dict(batches)
    outer_batch = batches["outer_batch"]
    if uses_outer_grads(state):
      value, outer_grads = jax.value_and_grad(outer_value)(params,
                                                           outer_batch)
    else:
      value, outer_grads = outer_value(params, outer_batch), OuterGradsNotUsed()
    updates, state = tx.update(
        outer_grads, state, params,
        outer_loss=values.outer_loss,
        inner_loss=values.inner_loss,
        constraints=values.constraints,
        value=value,
        **batches, **constant_args)
    params = optax.apply_updates(params, updates)
    metrics = {"outer_loss": _recorded_outer_loss(state, value)}
    if problem.has_aux:
      metrics["aux"] = _aux_at(problem, params, batches)
    return params, state, metrics

  if jit:
    return jax.jit(step, donate_argnums=(0, 1) if donate else ())
  return step


def _records_outer_loss(node) -> bool:
  return hasattr(node, "_fields") and "outer_loss" in node._fields


def _recorded_outer_loss(state, default):
  """The ``outer_loss`` field of the solver state inside ``state``, if any."""
  for node in jax.tree.leaves(state, is_leaf=_records_outer_loss):
    if _records_outer_loss(node):
      return node.outer_loss
  return default
