"""The bilevel contract: joint parameters, problems, per-level optimizers.

A bi-level problem is

    min_x F(x, y*(x))  s.t.  y*(x) ∈ argmin_y f(x, y)  [and c(x, y) ≤ 0 | = 0]

with ``x`` the *upper* (outer) variables and ``y`` the *lower* (inner) ones,
both arbitrary pytrees. Every solver is an optax transformation over
``Params(upper, lower)``:

    updates, state = tx.update(outer_grads, state, params, *,
                               outer_loss=F, inner_loss=f, constraints=c,
                               outer_batch=..., inner_batch=...)

``outer_grads`` is ``∇F`` at ``params`` (what any optax loop computes). A
``scale_by_<method>`` transformation turns it into *directions*
``Params(upper=d_x, lower=d_y)`` — gradient-like, to be negated by the
per-level optimizers that :func:`per_level` chains after it. Everything else a
method needs arrives as keyword-only extra arguments.
"""

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

PyTree = Any
Loss = Callable[..., jax.Array]


class Params(NamedTuple):
  """Joint parameters of a bi-level problem.

  Attributes:
    upper: pytree of upper-level (outer) variables ``x``.
    lower: pytree of lower-level (inner) variables ``y``.
  """
  upper: PyTree
  lower: PyTree


class Problem(NamedTuple):
  """The callables that define a bi-level problem.

  Attributes:
    outer_loss: ``F(upper, lower, batch) -> scalar``.
    inner_loss: ``f(upper, lower, batch) -> scalar``.
    constraints: optional ``c(upper, lower, batch) -> [m]``, feasible where
      ``c ≤ 0`` (or ``c = 0`` for equality-constrained methods).
  """
  outer_loss: Loss
  inner_loss: Loss
  constraints: Loss | None = None


def require_extra_args(
    method: str, extra_args: Mapping[str, Any], *names: str
) -> tuple[Any, ...]:
  """Returns the named extra arguments, raising if any is missing.

  Args:
    method: the solver's name, used in the error message.
    extra_args: the keyword arguments ``tx.update`` received.
    *names: the extra arguments the solver needs.

  Returns:
    The values of ``names``, in order.

  Raises:
    TypeError: naming every missing argument.
  """
  missing = [n for n in names if extra_args.get(n) is None]
  if missing:
    raise TypeError(
        f"{method}.update() missing required keyword-only extra argument(s):"
        f" {', '.join(repr(n) for n in missing)}"
    )
  return tuple(extra_args[n] for n in names)


def cast_like(tree: PyTree, like: PyTree) -> PyTree:
  """Casts each leaf of ``tree`` to the dtype of its counterpart in ``like``."""
  return jax.tree.map(lambda t, l: jnp.asarray(t).astype(jnp.result_type(l)),
                      tree, like)


def upcast(tree: PyTree, dtype=jnp.float32) -> PyTree:
  """Upcasts floating leaves narrower than ``dtype`` (bf16 → f32), keeps others.

  Linear solves and losses run in at least f32 even when parameters are bf16.
  """
  def _up(x):
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.floating) and (
        jnp.finfo(x.dtype).bits < jnp.finfo(dtype).bits):
      return x.astype(dtype)
    return x
  return jax.tree.map(_up, tree)


class PerLevelState(NamedTuple):
  """State of :func:`per_level`: one optimizer state per level."""
  upper: optax.OptState
  lower: optax.OptState


def per_level(
    upper: optax.GradientTransformation,
    lower: optax.GradientTransformation,
) -> optax.GradientTransformationExtraArgs:
  """Applies one optax transformation to each level of ``Params``.

  Args:
    upper: transformation for the upper level (e.g. ``optax.adam(1e-2)``).
    lower: transformation for the lower level (e.g. ``optax.sgd(0.1)``).

  Returns:
    A transformation over ``Params`` whose state is a :class:`PerLevelState`.
    Extra arguments are not forwarded: per-level optimizers are ordinary
    optax transformations.
  """

  def init_fn(params):
    return PerLevelState(upper.init(params.upper), lower.init(params.lower))

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    upper_params = None if params is None else params.upper
    lower_params = None if params is None else params.lower
    up, up_state = upper.update(updates.upper, state.upper, upper_params)
    low, low_state = lower.update(updates.lower, state.lower, lower_params)
    return Params(up, low), PerLevelState(up_state, low_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def make_step(
    tx: optax.GradientTransformation,
    problem: Problem,
    *,
    jit: bool = True,
    donate: bool = False,
) -> Callable[..., tuple[Params, optax.OptState, dict[str, jax.Array]]]:
  """Returns ``step(params, state, batches) -> (params, state, metrics)``.

  The step computes ``outer_grads = ∇F(params)`` on ``batches['outer_batch']``,
  calls ``tx.update`` with the problem's callables and all ``batches`` as
  extra arguments, and applies the updates.

  Args:
    tx: a bilevel solver (any transformation over ``Params``).
    problem: the losses (and constraints) of the bi-level problem.
    jit: whether to ``jax.jit`` the step.
    donate: whether the jitted step donates ``params`` and ``state``.

  Returns:
    The step function; ``metrics`` holds ``outer_loss`` at the input params.
  """

  def step(params: Params, state, batches: Mapping[str, Any]):
    outer_batch = batches.get("outer_batch")
    outer_value, outer_grads = jax.value_and_grad(
        lambda p: problem.outer_loss(p.upper, p.lower, outer_batch))(params)
    updates, state = tx.update(
        outer_grads, state, params,
        outer_loss=problem.outer_loss,
        inner_loss=problem.inner_loss,
        constraints=problem.constraints,
        **batches)
    params = optax.apply_updates(params, updates)
    return params, state, {"outer_loss": outer_value}

  if jit:
    return jax.jit(step, donate_argnums=(0, 1) if donate else ())
  return step
