"""Wrappers that act on a bilevel solver's *directions*.

optax's ``MultiSteps`` and ``apply_if_finite`` act on the gradients that
enter a transformation. A solver that evaluates ∇F itself (``implicit``,
``unrolled``, ``bip``) has no incoming gradients to act on, so these refuse
it (see :class:`bilevel.OuterGradsNotUsed`); the versions here act on what
the solver produces instead and work with every solver.
``inject_hyperparams`` declares each factory's static arguments for optax.
"""

import functools
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bilevel._base import check_params

PyTree = Any


def declare_static(*names: str) -> Callable[[Callable], Callable]:
  """Declares a factory's arguments that ``inject_hyperparams`` must not trace.

  Loop lengths, sizes and callables (which optax would take for schedules)
  are static; everything numeric left over can be injected.
  """
  def decorate(factory):
    factory.static_args = frozenset(names)
    return factory
  return decorate


def check_static_int(value: Any, name: str, method: str,
                     minimum: int = 0) -> int:
  """Returns ``value`` if it is a Python int ≥ ``minimum``, else raises.

  Raises:
    TypeError: a traced or non-integer value (e.g. from
      ``optax.inject_hyperparams`` without the static declaration).
    ValueError: below ``minimum``.
  """
  if isinstance(value, bool) or not isinstance(value, int):
    raise TypeError(
        f"{method}: {name} must be a Python int (it fixes a loop length or a "
        f"shape), got {type(value).__name__}; under inject_hyperparams use "
        f"bilevel.inject_hyperparams({method}), which declares it static")
  if value < minimum:
    raise ValueError(f"{method}: {name} must be ≥ {minimum}, got {value}")
  return value


def check_positive(value: Any, name: str, method: str) -> None:
  """Raises ``ValueError`` for a concrete ``value ≤ 0`` (tracers pass)."""
  if isinstance(value, jax.core.Tracer):
    return
  if not np.all(np.asarray(value) > 0):
    raise ValueError(f"{method}: {name} must be > 0, got {value}")


def inject_hyperparams(
    factory: Callable[..., optax.GradientTransformation],
    static_args: str | Iterable[str] = (),
    hyperparam_dtype: jnp.dtype | None = None,
) -> Callable[..., optax.GradientTransformationExtraArgs]:
  """``optax.inject_hyperparams`` with the factory's static arguments declared.

  Every numeric argument of a bilevel factory (``gamma``, ``eta``, ``c``,
  ...) becomes a hyper-parameter in the state that can be changed between
  steps or scheduled; loop lengths, sizes and callables stay static (each
  factory lists them in its ``static_args`` attribute).

  Args:
    factory: e.g. ``bilevel.lv_hba`` or ``bilevel.scale_by_implicit``.
    static_args: further names to keep static.
    hyperparam_dtype: as in ``optax.inject_hyperparams``.

  Returns:
    The wrapped factory.
  """
  extra = {static_args} if isinstance(static_args, str) else set(static_args)
  declared = set(getattr(factory, "static_args", ())) | extra
  return optax.inject_hyperparams(factory, static_args=declared,
                                  hyperparam_dtype=hyperparam_dtype)


class AccumulateState(NamedTuple):
  """State of :func:`accumulate`.

  Attributes:
    directions: the solver's (directions part's) state.
    optimizer: the optimizer part's state.
    mean: running mean of the directions this real step, float32 (at
      least), shaped like the params.
    mini_step: int32 scalar, mini-steps done in this real step.
  """
  directions: optax.OptState
  optimizer: optax.OptState
  mean: PyTree
  mini_step: jax.Array


def accumulate(
    directions: optax.GradientTransformation,
    optimizer: optax.GradientTransformation,
    every_k: int,
) -> optax.GradientTransformationExtraArgs:
  """Averages a solver's directions over ``every_k`` mini-steps.

  ``directions`` (a ``scale_by_<method>``) runs on every mini-step, on that
  mini-step's batches, at the unchanged params; the mean of its directions
  goes through ``optimizer`` (e.g. ``per_level(adam, sgd)``) once per real
  step, whose updates are zero in between. With a linear ``optimizer``
  (SGD) this is the step on the average of the mini-batch directions; with
  Adam, Adam sees one averaged direction per real step (not ``every_k``).
  The solver's own state (counters, LV-HBA's ``θ``, ``λ``) advances every
  mini-step.

  Args:
    directions: the solver part.
    optimizer: what the solver's alias chains after it.
    every_k: mini-steps per real step.

  Returns:
    A transformation whose state is an :class:`AccumulateState`.
  """
  every_k = check_static_int(every_k, "every_k", "accumulate", minimum=1)
  directions = optax.with_extra_args_support(directions)
  optimizer = optax.with_extra_args_support(optimizer)

  def init_fn(params):
    params = check_params(params, "accumulate")
    mean = jax.tree.map(
        lambda p: jnp.zeros(p.shape, jnp.promote_types(p.dtype, jnp.float32)),
        params)
    return AccumulateState(directions.init(params), optimizer.init(params),
                           mean, jnp.zeros([], jnp.int32))

  def update_fn(outer_grads, state, params=None, **extra_args):
    params = check_params(params, "accumulate")
    d, dir_state = directions.update(outer_grads, state.directions, params,
                                     **extra_args)
    n = state.mini_step + 1
    mean = jax.tree.map(lambda m, x: m + (x.astype(m.dtype) - m) / n,
                        state.mean, d)
    emit = n == every_k

    def step(mean, opt_state):
      return optimizer.update(optax.tree.cast_like(mean, d), opt_state,
                              params, **extra_args)

    def hold(mean, opt_state):
      zeros = optax.tree.zeros_like(jax.eval_shape(step, mean, opt_state)[0])
      return zeros, opt_state

    updates, opt_state = jax.lax.cond(emit, step, hold, mean,
                                      state.optimizer)
    mean = jax.tree.map(lambda m: jnp.where(emit, jnp.zeros_like(m), m),
                        mean)
    return updates, AccumulateState(dir_state, opt_state, mean,
                                    jnp.where(emit, 0, n).astype(jnp.int32))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class ApplyIfFiniteState(NamedTuple):
  """State of :func:`apply_if_finite` (the fields of optax's, same meaning).

  Attributes:
    notfinite_count: int32, consecutive steps rejected so far.
    last_finite: bool, whether the last step was applied.
    total_notfinite: int32, steps rejected in total.
    inner_state: the wrapped solver's state.
  """
  notfinite_count: jax.Array
  last_finite: jax.Array
  total_notfinite: jax.Array
  inner_state: optax.OptState


def _all_finite(tree: PyTree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def apply_if_finite(
    tx: optax.GradientTransformation,
    max_consecutive_errors: int,
) -> optax.GradientTransformationExtraArgs:
  """Skips a solver step whose updates or new state are not finite.

  Unlike ``optax.apply_if_finite``, which tests the *incoming* gradients,
  this runs the solver and tests what it produced: its updates and every
  floating leaf of its new state (a NaN that appears inside an inner solve
  or in LV-HBA's ``θ`` is caught). A rejected step returns zero updates and
  keeps the previous solver state. After more than
  ``max_consecutive_errors`` rejections in a row the step is applied
  anyway, as in optax.

  Args:
    tx: any bilevel solver (alias or chain).
    max_consecutive_errors: rejections in a row before giving up.

  Returns:
    A transformation whose state is an :class:`ApplyIfFiniteState`.
  """
  max_errors = check_static_int(max_consecutive_errors,
                                "max_consecutive_errors", "apply_if_finite")
  tx = optax.with_extra_args_support(tx)

  def init_fn(params):
    zero = functools.partial(jnp.zeros, [], jnp.int32)
    return ApplyIfFiniteState(zero(), jnp.ones([], jnp.bool_), zero(),
                              tx.init(params))

  def update_fn(outer_grads, state, params=None, **extra_args):
    updates, inner = tx.update(outer_grads, state.inner_state, params,
                               **extra_args)
    finite = _all_finite(updates) & _all_finite(inner)
    count = jnp.where(finite, 0, state.notfinite_count + 1).astype(jnp.int32)
    accept = finite | (count > max_errors)
    updates = jax.tree.map(
        lambda u: jnp.where(accept, u, jnp.zeros_like(u)), updates)
    inner = jax.tree.map(lambda new, old: jnp.where(accept, new, old),
                         inner, state.inner_state)
    total = state.total_notfinite + (~finite).astype(jnp.int32)
    return updates, ApplyIfFiniteState(count, finite, total, inner)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def mean_over_chunks(
    loss: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
  """``loss`` averaged over the chunks of a batch, one chunk in memory.

  The returned ``loss'(upper, lower, batch)`` takes a batch whose every leaf
  has a leading chunk axis ``[k, ...]`` and returns
  ``(1/k) Σ_j loss(upper, lower, batch[j])`` through a ``lax.scan`` whose
  body is rematerialised, so its gradient is accumulated chunk by chunk with
  one chunk's activations alive. With equal chunks this is the loss of the
  whole batch. This is gradient accumulation *inside* one solver step: the
  solver's expensive part (inner solve, adjoint solve) runs once per step
  while ``∇F`` is accumulated over the ``k`` chunks, for every solver.

  Args:
    loss: ``loss(upper, lower, batch) -> scalar`` on one chunk.

  Returns:
    The chunk-averaged loss, with the same signature.

  Raises:
    ValueError: from the returned loss, if the leaves' chunk axes differ.
  """
  def chunked(upper, lower, batch):
    sizes = {jnp.shape(leaf)[0] for leaf in jax.tree.leaves(batch)}
    if len(sizes) != 1:
      raise ValueError("mean_over_chunks: every batch leaf needs the same "
                       f"leading chunk axis, got sizes {sorted(sizes)}")

    @jax.checkpoint
    def body(total, chunk):
      return total + loss(upper, lower, chunk), None

    first = jax.eval_shape(loss, upper, lower,
                           jax.tree.map(lambda b: b[0], batch))
    total, _ = jax.lax.scan(body, jnp.zeros(first.shape, first.dtype), batch)
    return total / sizes.pop()

  return chunked
