"""The shared inner loop: an optax optimizer on the lower-level loss."""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
import optax.tree_utils as otu

PyTree = Any


def inner_solve(
    inner_loss: Callable[..., jax.Array],
    inner_optimizer: optax.GradientTransformation,
    num_steps: int,
    upper: PyTree,
    lower: PyTree,
    inner_batch: Any = None,
    *,
    remat: bool = False,
    return_grad_norm: bool = False,
) -> PyTree | tuple[PyTree, jax.Array]:
  """Runs ``num_steps`` optimizer steps on ``y ↦ f(x, y, inner_batch)``.

  ``y_{k+1} = y_k + update(∇_y f(x, y_k), state_k, y_k)`` from ``y_0 =
  lower`` with a fresh optimizer state, as a :func:`jax.lax.scan`; the loop is
  differentiable w.r.t. ``upper`` and ``lower`` (iterative differentiation).

  Args:
    inner_loss: ``f(upper, lower, batch) -> scalar``.
    inner_optimizer: any optax transformation (its ``params`` argument
      receives the current ``y_k``).
    num_steps: number of steps ``T`` (static).
    upper: ``x``, held fixed.
    lower: ``y_0``, the warm start.
    inner_batch: the batch passed to ``inner_loss`` at every step.
    remat: wrap each step in :func:`jax.checkpoint`, so reverse mode stores
      only the per-step carry (``O(T)`` copies of ``y`` and the optimizer
      state) and recomputes each step's activations.
    return_grad_norm: also return ``‖∇_y f(x, y_{T−1})‖``, the norm of the
      last gradient the loop computed (free; ``0`` when ``num_steps = 0``).

  Returns:
    ``y_T``, or ``(y_T, grad_norm)``.
  """
  grad_fn = jax.grad(inner_loss, argnums=1)

  def step(carry, _):
    y, opt_state, _ = carry
    grad = grad_fn(upper, y, inner_batch)
    updates, opt_state = inner_optimizer.update(grad, opt_state, y)
    # The last gradient rides in the carry: its norm is taken once, after
    # the loop, instead of a reduction per step.
    return (optax.apply_updates(y, updates), opt_state,
            grad if return_grad_norm else None), None

  if remat:
    step = jax.checkpoint(step, prevent_cse=False)
  last_grad = otu.tree_zeros_like(lower) if return_grad_norm else None
  carry = (lower, inner_optimizer.init(lower), last_grad)
  (lower, _, last_grad), _ = jax.lax.scan(step, carry, length=num_steps)
  if not return_grad_norm:
    return lower
  return lower, otu.tree_norm(last_grad).astype(jnp.float32)
