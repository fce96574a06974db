"""BiP: model pruning as a bi-level problem, solved with first-order steps.

Mask ``m`` (upper), weights ``θ`` (lower), pruned weights ``z = m ⊙ θ``:

    min_{m ∈ S} ℓ(m ⊙ θ*(m)),   θ*(m) = argmin_θ ℓ(m ⊙ θ) + (γ/2)‖θ‖²,

``S = {m ∈ {0, 1}ⁿ : 1ᵀm ≤ k}``, relaxed to ``S̃ = {m ∈ [0, 1]ⁿ : 1ᵀm ≤ k}``.
The lower level's Hessian ``D_m ∇²ℓ D_m + γI`` becomes ``γI`` under the
paper's Hessian-free assumption ``∇²ℓ(z) ≈ 0``, and the bi-linearity of
``m ⊙ θ`` gives the implicit gradient in closed form (exact for linear ℓ):

    IG = ∇_m ℓ(m ⊙ θ) − (1/γ) ∇ℓ(z) ⊙ ∇_θ ℓ(m ⊙ θ).

References:
  Zhang, Yao, Ram, Zhao, Chen, Hong, Wang, Liu, *Advancing Model Pruning via
  Bi-level Optimization*, NeurIPS 2022 (Eq. 4–6, Algorithm A1).
"""

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from bilevel._base import (
  Params,
  cast_like,
  per_level,
  require_extra_args,
  upcast,
)
from bilevel._masks import straight_through_topk
from bilevel._project import project_params
from bilevel._projections import projection_capped_simplex

PyTree = Any


class BiPState(NamedTuple):
  """State of :func:`scale_by_bip`.

  Attributes:
    count: int32 scalar, updates done so far.
    implicit_gradient_norm: float32 scalar, ``‖IG‖`` at the last step that
      took an upper-level step (0 before the first).
    lower_grad_norm: float32 scalar, ``‖∇_θ g‖`` at the last update's input.
    upper_loss: float32 scalar, ``ℓ_UL(m ⊙ θ)`` with ``m = mask_fn(upper)``
      at the last upper-level step (0 before the first). With a ``mask_fn``,
      ``make_step``'s ``outer_loss`` metric evaluates the losses at the raw
      scores instead; read this one.
  """
  count: jax.Array
  implicit_gradient_norm: jax.Array
  lower_grad_norm: jax.Array
  upper_loss: jax.Array


def _broadcast_mask(mask_fn, upper, lower):
  """``u ↦ mask_fn(u)`` broadcast leafwise to the shapes of ``lower``."""
  return jax.tree.map(lambda m, t: jnp.broadcast_to(m, jnp.shape(t)),
                      mask_fn(upper), lower)


def _implicit_gradient(outer_loss, mask_fn, upper, lower, batch, *, gamma,
                       correction):
  """BiP's IG w.r.t. ``upper``, from one gradient of ``ℓ`` at ``z``."""
  mask, mask_vjp = jax.vjp(
      functools.partial(_broadcast_mask, mask_fn, lower=lower), upper)
  z = jax.tree.map(jnp.multiply, mask, lower)
  # ℓ(z) = F(1, z): the all-ones mask leaves z unpruned, so ∇ℓ(z) exists
  # even where m = 0 (unlike ∇_θ ℓ / m).
  ones = jax.tree.map(jnp.ones_like, mask_fn(upper))
  loss, grad_z = jax.value_and_grad(outer_loss, argnums=1)(ones, z, batch)
  # ∇_m ℓ = Bᵀ(θ ⊙ ∇ℓ(z)) and ∇_θ ℓ = M ⊙ ∇ℓ(z), with Bᵀ the VJP of the
  # mask's broadcast (a sum over pruned groups for structured masks).
  scale = 1 / gamma if correction else 0.0
  direction = jax.tree.map(lambda t, g, m: g * (t - scale * m * g),
                           lower, grad_z, mask)
  (ig,) = mask_vjp(direction)
  return ig, jnp.asarray(loss, jnp.float32)


def scale_by_bip(
    *,
    gamma: float,
    lower_steps: int = 1,
    correction: bool = True,
    mask_fn: Callable[[PyTree], PyTree] | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""BiP's directions: the ridge-regularised θ-gradient and the IG.

  ``update(outer_grads, state, params, *, outer_loss, inner_loss,
  outer_batch=None, inner_batch=None)`` returns ``Params(d_x, d_y)``:

  * ``d_y = ∇_θ ℓ_LL(m ⊙ θ) + γθ`` (the lower level ``g``'s gradient, every
    step);
  * ``d_x = ∇_m ℓ_UL − (1/γ) ∇ℓ_UL(z) ⊙ ∇_θ ℓ_UL`` at ``z = m ⊙ θ`` on every
    ``lower_steps``-th step (counting from 1), else zero.

  Both are taken at the input ``(m, θ)`` (Jacobi form; the paper's
  Algorithm A1 evaluates the IG after the θ-step). ``1/γ`` is the paper's
  coefficient, not the released code's ``lr2`` (whose product pairs score
  gradients with themselves, OPTML-Group/BiP#3).

  **Loss contract.** ``outer_loss`` (ℓ_UL) and ``inner_loss`` (ℓ_LL, *without*
  the ridge: the solver adds ``(γ/2)‖θ‖²`` so that one ``γ`` serves both
  levels) receive ``(mask, θ, batch)`` and must depend on them only through
  ``z = mask ⊙ θ`` (leafwise, broadcasting), i.e. ``F(m, θ, b) = ℓ(m ⊙ θ,
  b)``. Then ``ℓ(z) = F(1, z, b)``, and the solver obtains ``∇ℓ(z)`` from one
  gradient of ``F`` at the all-ones mask, and ``∇_m ℓ = Bᵀ(θ ⊙ ∇ℓ(z))``,
  ``∇_θ ℓ = M ⊙ ∇ℓ(z)`` by the chain rule (``M`` the broadcast mask, ``Bᵀ``
  the sum over the entries each mask entry covers). ``outer_grads`` is not
  used.

  **Shapes.** ``upper`` has the tree structure of ``lower``; each leaf is
  either shaped like its weight (unstructured) or broadcasts against it
  (structured: ``[1, 1, 1, out]`` filters, ``[1, 1, in, 1]`` channels of an
  ``[h, w, in, out]`` kernel).

  Args:
    gamma: ridge ``γ > 0`` of the lower level; the IG uses ``1/γ``.
    lower_steps: θ-steps per mask step (``d_x = 0`` in between).
    correction: ``False`` drops ``−(1/γ)∇ℓ(z) ⊙ ∇_θ ℓ`` (first-order
      ablation: alternating gradient descent).
    mask_fn: ``upper -> mask`` when ``upper`` holds scores rather than the
      relaxed mask, e.g. ``functools.partial(straight_through_topk, k=k)``;
      the IG w.r.t. the mask is pulled back through ``mask_fn``'s VJP.
      Default: the identity.

  Returns:
    A transformation whose state is a :class:`BiPState`.

  Raises:
    ValueError: from the factory for ``gamma ≤ 0`` or ``lower_steps < 1``;
      from ``update`` without ``params``.
  """
  if gamma <= 0 or lower_steps < 1:
    raise ValueError(f"need gamma > 0 and lower_steps ≥ 1, got {gamma=}, "
                     f"{lower_steps=}")
  mask_fn = mask_fn or (lambda upper: upper)

  def init_fn(params):
    del params
    zero = jnp.zeros([], jnp.float32)
    return BiPState(jnp.zeros([], jnp.int32), zero, zero, zero)

  def update_fn(outer_grads, state, params=None, **extra_args):
    del outer_grads
    if params is None:
      raise ValueError("scale_by_bip.update() needs params.")
    outer_loss, inner_loss = require_extra_args(
        "bip", extra_args, "outer_loss", "inner_loss")
    upper, lower = upcast(params.upper), upcast(params.lower)
    grad_theta = jax.grad(inner_loss, argnums=1)(
        mask_fn(upper), lower, extra_args.get("inner_batch"))
    d_y = optax.tree.add_scale(grad_theta, gamma, lower)

    ig_fn = functools.partial(
        _implicit_gradient, outer_loss, mask_fn, upper, lower,
        extra_args.get("outer_batch"), gamma=gamma, correction=correction)
    take = (state.count + 1) % lower_steps == 0
    if lower_steps == 1:
      # A model-sized backward under lax.cond ran ~36x slower on XLA:CPU
      # (experiments/benchmarks/bip_step.py); skip the cond when it is moot.
      d_x, upper_loss = ig_fn()
    else:
      d_x, upper_loss = lax.cond(
          take, ig_fn,
          lambda: (optax.tree.zeros_like(upper), state.upper_loss))
    ig_norm = jnp.where(take, optax.tree.norm(d_x),
                        state.implicit_gradient_norm)
    state = BiPState(
        count=optax.safe_int32_increment(state.count),
        implicit_gradient_norm=jnp.asarray(ig_norm, jnp.float32),
        lower_grad_norm=jnp.asarray(optax.tree.norm(d_y), jnp.float32),
        upper_loss=upper_loss)
    return cast_like(Params(d_x, d_y), params), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def bip(
    upper_optimizer: optax.GradientTransformation,
    lower_optimizer: optax.GradientTransformation,
    *,
    gamma: float,
    budget: float,
    lower_steps: int = 1,
    relaxed: bool = True,
    correction: bool = True,
) -> optax.GradientTransformationExtraArgs:
  """BiP (Zhang et al., NeurIPS 2022) as one optax chain.

  ``relaxed=True``: ``upper`` is the relaxed mask ``m``;
  ``chain(scale_by_bip, per_level(upper_optimizer, lower_optimizer),
  project_params(Π_S̃))`` with ``Π_S̃`` the projection of ``m`` onto the
  capped simplex ``{m ∈ [0, 1]ⁿ, 1ᵀm ≤ budget}`` (θ is not projected), the
  paper's ``m ← Π_S̃(m − β·IG)``. Binarise at the end with
  :func:`bilevel.binarize`.

  ``relaxed=False``: ``upper`` holds real-valued scores ``s`` and the losses
  see ``mask = straight_through_topk(s, budget)`` (the released code's
  parameterisation), with no projection.

  Args:
    upper_optimizer: optimizer of the mask / scores (e.g. ``optax.sgd``).
    lower_optimizer: optimizer of the weights.
    gamma: see :func:`scale_by_bip`.
    budget: ``k``, the number of kept entries (an int when
      ``relaxed=False``).
    lower_steps: see :func:`scale_by_bip`.
    relaxed: capped-simplex relaxation, or straight-through top-k scores.
    correction: see :func:`scale_by_bip`.

  Returns:
    A transformation over :class:`bilevel.Params`.
  """
  mask_fn = None if relaxed else functools.partial(
      straight_through_topk, k=int(budget))
  txs = [
      scale_by_bip(gamma=gamma, lower_steps=lower_steps,
                   correction=correction, mask_fn=mask_fn),
      per_level(upper_optimizer, lower_optimizer),
  ]
  if relaxed:
    txs.append(project_params(lambda p: Params(
        projection_capped_simplex(p.upper, budget), p.lower)))
  return optax.chain(*txs)
