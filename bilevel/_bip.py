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
  check_outer_grads_unused,
  check_params,
  evaluates_outer_loss_itself,
  level_extra_args,
  per_level,
  require_extra_args,
  upcast,
)
from bilevel._masks import straight_through_topk
from bilevel._projected_step import project_params
from bilevel._projections import projection_capped_simplex
from bilevel._wrappers import check_positive, check_static_int, declare_static

PyTree = Any


@evaluates_outer_loss_itself
class BiPState(NamedTuple):
  """State of :func:`scale_by_bip`.

  Attributes:
    count: int32 scalar, updates done so far.
    implicit_gradient_norm: float32 scalar, ``‖IG‖`` at the last step that
      took an upper-level step (0 before the first).
    lower_grad_norm: float32 scalar, ``‖∇_θ g‖`` at the last update's input.
    outer_loss: float32 scalar, ``ℓ_UL(m ⊙ θ)`` with ``m = mask_fn(upper)``
      at the last upper-level step (0 before the first); ``make_step``
      reports it as its ``outer_loss`` metric.
  """
  count: jax.Array
  implicit_gradient_norm: jax.Array
  lower_grad_norm: jax.Array
  outer_loss: jax.Array


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


@declare_static("lower_steps", "mask_fn")
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

  Both are taken at the input ``(m, θ)`` (the simultaneous order that
  composes with any per-level optimizers; the paper's Algorithm A1 takes the
  IG after the θ-step: :func:`bip` with ``sequential=True``). ``1/γ`` is the
  paper's coefficient, not the released code's ``lr2`` (whose product pairs
  score gradients with themselves, OPTML-Group/BiP#3).

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
  _check_args(gamma, lower_steps)
  mask_fn = mask_fn or (lambda upper: upper)
  directions = functools.partial(_directions, gamma=gamma,
                                 lower_steps=lower_steps,
                                 correction=correction, mask_fn=mask_fn)

  def update_fn(outer_grads, state, params=None, **extra_args):
    check_outer_grads_unused(outer_grads, "bip", "at the pruned weights")
    (d_x, d_y), state = directions(state, params, extra_args)
    return cast_like(Params(d_x, d_y), params), state

  return optax.GradientTransformationExtraArgs(_init_state, update_fn)


def _check_args(gamma, lower_steps):
  check_positive(gamma, "gamma", "bip")
  check_static_int(lower_steps, "lower_steps", "bip", minimum=1)


def _init_state(params) -> BiPState:
  del params
  # Distinct buffers per field: a donating jit refuses one buffer twice.
  zero = lambda: jnp.zeros([], jnp.float32)
  return BiPState(jnp.zeros([], jnp.int32), zero(), zero(), zero())


def _directions(state, params, extra_args, *, gamma, lower_steps, correction,
                mask_fn, lower_step=None):
  """``(d_x, d_y)`` and the next :class:`BiPState`.

  ``lower_step(d_y) -> θ'`` (None: ``θ' = θ``) gives the weights the IG is
  taken at: the paper's sequential order passes the θ-step.
  """
  check_params(params, "bip")
  outer_loss, inner_loss = require_extra_args(
      "bip", extra_args, "outer_loss", "inner_loss")
  upper, lower = upcast(params.upper), upcast(params.lower)
  grad_theta = jax.grad(inner_loss, argnums=1)(
      mask_fn(upper), lower, extra_args.get("inner_batch"))
  d_y = optax.tree.add_scale(grad_theta, gamma, lower)
  ig_lower = lower if lower_step is None else lower_step(d_y)

  ig_fn = functools.partial(
      _implicit_gradient, outer_loss, mask_fn, upper, ig_lower,
      extra_args.get("outer_batch"), gamma=gamma, correction=correction)
  take = (state.count + 1) % lower_steps == 0
  if lower_steps == 1:
    # A model-sized backward under lax.cond ran ~36x slower on XLA:CPU
    # (experiments/benchmarks/bip_step.py); skip the cond when it is moot.
    d_x, loss_value = ig_fn()
  else:
    d_x, loss_value = lax.cond(
        take, ig_fn,
        lambda: (optax.tree.zeros_like(upper), state.outer_loss))
  ig_norm = jnp.where(take, optax.tree.norm(d_x),
                      state.implicit_gradient_norm)
  state = BiPState(
      count=optax.safe_int32_increment(state.count),
      implicit_gradient_norm=jnp.asarray(ig_norm, jnp.float32),
      lower_grad_norm=jnp.asarray(optax.tree.norm(d_y), jnp.float32),
      outer_loss=loss_value)
  return (d_x, d_y), state


@evaluates_outer_loss_itself
class SequentialBiPState(NamedTuple):
  """State of BiP in the paper's sequential order (``bip(sequential=True)``).

  Attributes:
    bip: the :class:`BiPState` diagnostics.
    upper: the upper (mask / score) optimizer's state.
    lower: the lower (weight) optimizer's state.
  """
  bip: BiPState
  upper: optax.OptState
  lower: optax.OptState


def _sequential_bip(upper_optimizer, lower_optimizer, **direction_kwargs
                    ) -> optax.GradientTransformationExtraArgs:
  """Algorithm A1's order: the θ-step, then the IG at the updated θ."""
  upper_optimizer = optax.with_extra_args_support(upper_optimizer)
  lower_optimizer = optax.with_extra_args_support(lower_optimizer)

  def init_fn(params):
    return SequentialBiPState(_init_state(params),
                              upper_optimizer.init(params.upper),
                              lower_optimizer.init(params.lower))

  def update_fn(outer_grads, state, params=None, **extra_args):
    check_outer_grads_unused(outer_grads, "bip", "at the pruned weights")
    check_params(params, "bip")
    lower_out = {}

    def lower_step(d_y):
      d_y = cast_like(d_y, params.lower)
      updates, lower_out["state"] = lower_optimizer.update(
          d_y, state.lower, params.lower,
          **level_extra_args(extra_args, "lower", d_y, params.lower))
      lower_out["updates"] = updates
      return upcast(optax.apply_updates(params.lower, updates))

    (d_x, _), bip_state = _directions(state.bip, params, extra_args,
                                      lower_step=lower_step,
                                      **direction_kwargs)
    d_x = cast_like(d_x, params.upper)
    upper_updates, upper_state = upper_optimizer.update(
        d_x, state.upper, params.upper,
        **level_extra_args(extra_args, "upper", d_x, params.upper))
    return (Params(upper_updates, lower_out["updates"]),
            SequentialBiPState(bip_state, upper_state, lower_out["state"]))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


@declare_static("budget", "lower_steps", "mask_fn")
def bip(
    upper_optimizer: optax.GradientTransformation,
    lower_optimizer: optax.GradientTransformation,
    *,
    gamma: float,
    budget: float | None = None,
    lower_steps: int = 1,
    relaxed: bool = True,
    correction: bool = True,
    sequential: bool = True,
    mask_fn: Callable[[PyTree], PyTree] | None = None,
) -> optax.GradientTransformationExtraArgs:
  """BiP (Zhang et al., NeurIPS 2022) as one optax transformation.

  ``sequential=True`` (default) follows the paper's Algorithm A1: the θ-step
  ``θ' = θ + lower_optimizer(∇_θ g(m, θ))``, then the IG at ``(m, θ')`` fed
  to ``upper_optimizer``. ``sequential=False`` takes both directions at the
  incoming ``(m, θ)``: ``chain(scale_by_bip, per_level(upper_optimizer,
  lower_optimizer))``, one gradient evaluation apart from the paper's order.

  ``relaxed=True``: ``upper`` is the relaxed mask ``m``, projected after each
  step onto the capped simplex ``{m ∈ [0, 1]ⁿ, 1ᵀm ≤ budget}`` (θ is not
  projected), the paper's ``m ← Π_S̃(m − β·IG)``. Binarise at the end with
  :func:`bilevel.binarize`.

  ``relaxed=False``: ``upper`` holds real-valued scores ``s`` and the losses
  see ``mask = mask_fn(s)``, by default ``straight_through_topk(s, budget)``
  (the released code's parameterisation), with no projection.

  Args:
    upper_optimizer: optimizer of the mask / scores (e.g. ``optax.sgd``).
    lower_optimizer: optimizer of the weights.
    gamma: see :func:`scale_by_bip`.
    budget: ``k``, the number of kept entries (an int when
      ``relaxed=False``); may be None when ``mask_fn`` is given.
    lower_steps: see :func:`scale_by_bip`.
    relaxed: capped-simplex relaxation, or scores behind ``mask_fn``.
    correction: see :func:`scale_by_bip`.
    sequential: the paper's order (θ-step first) or the simultaneous one.
    mask_fn: scores-to-mask map for ``relaxed=False`` (e.g. a per-layer or
      structured straight-through top-k).

  Returns:
    A transformation over :class:`bilevel.Params`; its state is a
    :class:`SequentialBiPState` (sequential) or a chain state holding a
    :class:`BiPState`.

  Raises:
    ValueError: ``budget`` missing where it is needed, or ``mask_fn`` with
      ``relaxed=True``.
  """
  if relaxed and mask_fn is not None:
    raise ValueError("bip: mask_fn applies to scores (relaxed=False); the"
                     " relaxed mask is the identity of the upper level")
  if budget is None and (relaxed or mask_fn is None):
    raise ValueError("bip: budget is required unless relaxed=False with a"
                     " mask_fn")
  if not relaxed and mask_fn is None:
    mask_fn = functools.partial(straight_through_topk, k=int(budget))
  if sequential:
    _check_args(gamma, lower_steps)
    txs = [_sequential_bip(
        upper_optimizer, lower_optimizer, gamma=gamma,
        lower_steps=lower_steps, correction=correction,
        mask_fn=mask_fn or (lambda upper: upper))]
  else:
    txs = [
        scale_by_bip(gamma=gamma, lower_steps=lower_steps,
                     correction=correction, mask_fn=mask_fn),
        per_level(upper_optimizer, lower_optimizer),
    ]
  if relaxed:
    txs.append(project_params(lambda p: Params(
        projection_capped_simplex(p.upper, budget), p.lower)))
  return optax.chain(*txs)
