"""Unrolled (ITD) hypergradients as an optax transformation.

One update runs ``T`` inner optimizer steps from the current ``y`` and
differentiates ``F(x, y_T(x))`` through the :func:`jax.lax.scan` of those
steps (reverse mode, one :func:`jax.checkpoint` per step). For a contraction
the result converges to ``∇Φ(x)`` linearly in ``T``.

References:
  Maclaurin, Duvenaud & Adams, *Gradient-based Hyperparameter Optimization
  through Reversible Learning*, ICML 2015; Franceschi et al., *Forward and
  Reverse Gradient-Based Hyperparameter Optimization*, ICML 2017.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
import optax.tree_utils as otu

from bilevel._base import (
  Params,
  cast_like,
  per_level,
  require_extra_args,
  upcast,
)
from bilevel._inner import inner_solve


class UnrolledState(NamedTuple):
  """State of :func:`scale_by_unrolled`.

  Attributes:
    count: int32 scalar, number of updates.
    inner_grad_norm: float32 scalar, ``‖∇_y f(x, y_T)‖`` at the last update.
  """
  count: jax.Array
  inner_grad_norm: jax.Array


def scale_by_unrolled(
    inner_optimizer: optax.GradientTransformation,
    inner_steps: int,
    remat: bool = True,
) -> optax.GradientTransformationExtraArgs:
  """Turns the outer problem into unrolled hypergradient directions.

  ``update(outer_grads, state, params, *, outer_loss, inner_loss,
  outer_batch=None, inner_batch=None)`` returns
  ``Params(upper=d/dx F(x, y_T(x)), lower=y − y_T)``, the same convention as
  :func:`bilevel.scale_by_implicit`. ``outer_grads`` is unused. Work runs in
  at least float32; directions come back in the dtypes of ``params``.

  Args:
    inner_optimizer: optax transformation for the lower level, run for
      ``inner_steps`` steps from ``params.lower`` with a fresh state (the
      initial ``y`` is not differentiated).
    inner_steps: unroll length ``T``.
    remat: checkpoint each inner step: memory ``O(T·|y|)`` instead of
      ``O(T·activations)``, for one extra forward per step.

  Returns:
    A transformation whose state is an :class:`UnrolledState`.
  """

  def init_fn(params):
    del params
    return UnrolledState(jnp.zeros([], jnp.int32), jnp.zeros([], jnp.float32))

  def update_fn(outer_grads, state, params=None, **extra_args):
    del outer_grads  # at the old lower; the hypergradient is taken at y_T.
    if params is None:
      raise ValueError("scale_by_unrolled.update() needs params.")
    outer_loss, inner_loss = require_extra_args(
        "unrolled", extra_args, "outer_loss", "inner_loss")
    outer_batch = extra_args.get("outer_batch")
    inner_batch = extra_args.get("inner_batch")
    x, y0 = upcast(params.upper), upcast(params.lower)

    def phi(x):
      y_t = inner_solve(inner_loss, inner_optimizer, inner_steps, x, y0,
                        inner_batch, remat=remat)
      return outer_loss(x, y_t, outer_batch), y_t

    hypergrad, y_t = jax.grad(phi, has_aux=True)(x)
    grad_norm = otu.tree_norm(
        jax.grad(inner_loss, argnums=1)(x, y_t, inner_batch))
    directions = Params(
        upper=cast_like(hypergrad, params.upper),
        lower=cast_like(otu.tree_sub(y0, y_t), params.lower))
    state = UnrolledState(
        count=optax.safe_int32_increment(state.count),
        inner_grad_norm=grad_norm.astype(jnp.float32))
    return directions, state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def unrolled(
    upper_optimizer: optax.GradientTransformation,
    inner_optimizer: optax.GradientTransformation,
    inner_steps: int,
    *,
    remat: bool = True,
    lower_optimizer: optax.GradientTransformation | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Unrolled-differentiation bilevel solver (the ITD reference).

  ``chain(scale_by_unrolled(...), per_level(upper_optimizer,
  lower_optimizer))``; the default ``lower_optimizer = optax.sgd(1.0)`` moves
  the lower level to ``y_T`` at every step.

  Args:
    upper_optimizer: optax transformation applied to the hypergradient.
    inner_optimizer: see :func:`scale_by_unrolled`.
    inner_steps: see :func:`scale_by_unrolled`.
    remat: see :func:`scale_by_unrolled`.
    lower_optimizer: applied to ``y − y_T``.

  Returns:
    A transformation over :class:`bilevel.Params`.
  """
  return optax.chain(
      scale_by_unrolled(inner_optimizer, inner_steps, remat),
      per_level(upper_optimizer,
                optax.sgd(1.0) if lower_optimizer is None else lower_optimizer))
