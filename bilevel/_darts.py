r"""DARTS: differentiable architecture search as a bi-level problem.

Architecture logits ``α`` (upper) weight the candidate operations of a
supernet with weights ``w`` (lower):

    min_α L_val(w*(α), α)   s.t.   w*(α) = argmin_w L_train(w, α).

DARTS replaces ``w*(α)`` by one virtual SGD step ``w′ = w − ξ∇_w
L_train(w, α)`` (Liu et al., Eq. 6), whose chain rule gives the
architecture gradient (Eq. 7)

    ∇_α L_val(w′, α) − ξ ∇²_{α,w} L_train(w, α) v,   v = ∇_{w′} L_val(w′, α),

with the mixed second derivative along ``v`` approximated by a central
finite difference at ``w`` (Eq. 8):

    ∇²_{α,w} L_train(w, α) v ≈ [∇_α L_train(w⁺, α) − ∇_α L_train(w⁻, α)]/(2ε),
    w^± = w ± εv,   ε = 0.01/‖v‖.

First order (``ξ = 0``) keeps ``∇_α L_val(w, α)`` alone. Both orders are
biased hypergradients: at ``w = w*(α)`` the first order drops the implicit
term, the second replaces ``[∇²_{ww} L_train]⁻¹`` by ``ξI``. Both errors
vanish where ``∇_w L_val(w*(α), α) = 0`` (at the optimum of a realisable
problem), and the second where ``ξ∇²_{ww} L_train = I``.

The losses are ``outer_loss(α, w, batch) = L_val`` on ``outer_batch`` (the
validation half) and ``inner_loss(α, w, batch) = L_train`` on
``inner_batch``. PC-DARTS is the same solver on another supernet (partial
channels, edge-normalisation logits β among the upper variables).

References:
  Liu, Simonyan, Yang, *DARTS: Differentiable Architecture Search*, ICLR 2019
  (arXiv 1806.09055), Eq. 6–8 and Algorithm 1; official code quark0/darts
  ``cnn/architect.py``. Xu et al., *PC-DARTS: Partial Channel Connections for
  Memory-Efficient Architecture Search*, ICLR 2020.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from bilevel._base import (
  OuterGradsNotUsed,
  Params,
  cast_like,
  check_outer_grads_unused,
  check_params,
  evaluates_outer_loss_itself,
  per_level,
  require_extra_args,
  upcast,
)
from bilevel._wrappers import check_positive, check_static_int, declare_static

PyTree = Any
_HVPS = ("finite_difference", "exact")


class DARTSState(NamedTuple):
  """State of first-order :func:`scale_by_darts` (``order=1``).

  Attributes:
    count: int32 scalar, number of updates.
    inner_loss: float32 scalar, ``L_train(w, α)`` at the input.
  """
  count: jax.Array
  inner_loss: jax.Array


@evaluates_outer_loss_itself
class SecondOrderDARTSState(NamedTuple):
  """State of second-order :func:`scale_by_darts` (``order=2``).

  Attributes:
    count: int32 scalar, number of updates.
    virtual_learning_rate: float32 scalar, the ``ξ`` of the last update.
    fd_eps: float32 scalar, the finite-difference step ``ε = fd_scale/‖v‖``
      of the last update (``fd_scale`` when ``v = 0``; 0 with
      ``hvp="exact"``).
    virtual_grad_norm: float32 scalar, ``‖v‖ = ‖∇_{w′} L_val(w′, α)‖``.
    correction_norm: float32 scalar, ``‖ξ ∇²_{α,w} L_train v‖``, the size of
      the second-order term (against ``‖∇_α L_val(w′, α)‖``).
    outer_loss: float32 scalar, ``L_val(w′, α)`` at the virtual step
      (``make_step`` reports it as its ``outer_loss`` metric).
    inner_loss: float32 scalar, ``L_train(w, α)`` at the input.
  """
  count: jax.Array
  virtual_learning_rate: jax.Array
  fd_eps: jax.Array
  virtual_grad_norm: jax.Array
  correction_norm: jax.Array
  outer_loss: jax.Array
  inner_loss: jax.Array


def _safe_norm(tree: PyTree) -> tuple[jax.Array, jax.Array]:
  """``‖tree‖`` and a divisor equal to it, or to 1 where it is 0.

  The double ``where`` keeps the gradient finite at 0 (a meta-gradient
  through the step differentiates ``ε = fd_scale/‖v‖``).
  """
  squared = optax.tree.norm(tree, squared=True)
  positive = squared > 0
  divisor = jnp.sqrt(jnp.where(positive, squared, 1.0))
  return jnp.where(positive, divisor, 0.0), divisor


def _mixed_hvp(grad_alpha, w, v, *, hvp, fd_scale):
  """``∇²_{α,w} L_train(w, α) v`` and the FD step used (0 when exact).

  ``grad_alpha: w -> ∇_α L_train(w, α)``. ``hvp="exact"`` pushes ``v``
  forward through ``grad_alpha`` (forward-over-reverse); the finite
  difference is the official code's, with ``ε‖v‖ = fd_scale`` in ``w``-space
  and a truncation error ``(fd_scale²/6)‖v‖ D³_w∇_α L_train[v̂, v̂, v̂]``.
  """
  if hvp == "exact":
    _, product = jax.jvp(grad_alpha, (w,), (v,))
    return product, jnp.zeros([], jnp.float32)
  norm, divisor = _safe_norm(v)
  eps = fd_scale / divisor
  plus = grad_alpha(optax.tree.add_scale(w, eps, v))
  minus = grad_alpha(optax.tree.add_scale(w, -eps, v))
  # v = 0: w⁺ = w⁻, but XLA may round the two gradients differently.
  weight = jnp.where(norm > 0, 1 / (2 * eps), 0.0)
  return optax.tree.scale(weight, optax.tree.sub(plus, minus)), eps


def _second_order(state, alpha, w, grad_w, inner_value, extra_args, *,
                  virtual_learning_rate, virtual_weight_decay, hvp, fd_scale):
  """``d_α`` of Eq. 7 at the virtual step, and the next state."""
  outer_loss, inner_loss = require_extra_args(
      "darts", extra_args, "outer_loss", "inner_loss")
  inner_batch = extra_args.get("inner_batch")
  xi = (virtual_learning_rate(state.count)
        if callable(virtual_learning_rate) else virtual_learning_rate)
  virtual = optax.tree.add_scale(
      w, -xi, optax.tree.add_scale(grad_w, virtual_weight_decay, w))
  outer_value, (grad_alpha_val, v) = jax.value_and_grad(
      outer_loss, argnums=(0, 1))(alpha, virtual, extra_args.get("outer_batch"))
  grad_alpha = lambda w: jax.grad(inner_loss)(alpha, w, inner_batch)
  product, eps = _mixed_hvp(grad_alpha, w, v, hvp=hvp, fd_scale=fd_scale)
  correction = optax.tree.scale(xi, product)
  state = SecondOrderDARTSState(
      count=optax.safe_int32_increment(state.count),
      virtual_learning_rate=jnp.asarray(xi, jnp.float32),
      fd_eps=jnp.asarray(eps, jnp.float32),
      virtual_grad_norm=_safe_norm(v)[0].astype(jnp.float32),
      correction_norm=optax.tree.norm(correction).astype(jnp.float32),
      outer_loss=jnp.asarray(outer_value, jnp.float32),
      inner_loss=jnp.asarray(inner_value, jnp.float32))
  return optax.tree.sub(grad_alpha_val, correction), state


def _check_args(order, virtual_learning_rate, hvp, fd_scale):
  check_static_int(order, "order", "darts")
  if order not in (1, 2):
    raise ValueError(f"darts: order must be 1 or 2, got {order=}")
  if hvp not in _HVPS:
    raise ValueError(f"darts: hvp must be one of {_HVPS}, got {hvp=}")
  check_positive(fd_scale, "fd_scale", "darts")
  if order == 2 and virtual_learning_rate is None:
    raise ValueError("darts: order=2 needs virtual_learning_rate (ξ, a "
                     "float or a schedule count -> ξ; the official code "
                     "passes w's current learning rate)")


@declare_static("order", "hvp")
def scale_by_darts(
    order: int = 1,
    *,
    virtual_learning_rate: float | optax.Schedule | None = None,
    hvp: str = "finite_difference",
    fd_scale: float = 0.01,
    virtual_weight_decay: float = 0.0,
) -> optax.GradientTransformationExtraArgs:
  r"""DARTS's architecture and weight directions ``(d_α, d_w)``.

  ``update(outer_grads, state, params, *, outer_loss, inner_loss,
  outer_batch=None, inner_batch=None)`` with ``params = Params(α, w)``
  returns ``Params(d_α, d_w)``, ``d_w = ∇_w L_train(w, α)`` and

  * ``order=1``: ``d_α = ∇_α L_val(w, α)``, read from ``outer_grads.upper``
    (``make_step`` computes it); needs ``inner_loss`` only.
  * ``order=2``: Eq. 7 of the module docstring with the virtual step
    ``w′ = w − ξ(∇_w L_train(w, α) + λw)``; ``∇L_val`` is taken at ``w′``,
    so ``outer_grads`` must be None (``make_step`` passes
    :class:`bilevel.OuterGradsNotUsed`).

  Both directions are taken at the input ``(α, w)`` (Jacobi order, which
  composes with any per-level optimizers). The paper's Algorithm 1 and the
  official code update ``α`` first and take the weight step at the new
  ``α``; here ``∇_w L_train`` at the input serves both the virtual step and
  ``d_w``, so a second-order step costs 4 forward/backward passes (virtual
  gradient, ``L_val`` at ``w′``, two FD gradients) instead of the official
  5. Work runs in at least float32; directions come back in the dtypes of
  ``params``.

  **Paper vs official code.** The official virtual step is the weight
  optimizer's full step, ``w′ = w − ξ(μm + ∇_w L_train + λw)`` with its
  momentum buffer ``m`` (μ = 0.9) and weight decay (λ = 3e-4); this solver
  takes the paper's plain step (the weight optimizer's momentum lives after
  it in the chain), with the decay optional as ``virtual_weight_decay``.
  ``λw`` does not depend on ``α``, so Eq. 7 is unchanged. The first code
  release (quark0/darts 8876e79) also added ``λw′`` to ``v`` and took the FD
  at ``w′``; the current code and this solver use ``v = ∇_{w′} L_val`` and
  the FD at ``w``.

  Args:
    order: 1 (first order, ``ξ = 0``) or 2 (one-step unrolled).
    virtual_learning_rate: ``ξ`` for ``order=2`` (required there, ignored
      for ``order=1``), a float or a schedule ``count -> ξ`` read at this
      solver's update count (one per call, so per mini-step under
      :func:`bilevel.accumulate`); the official code passes the weight
      optimizer's current learning rate (pass the same schedule).
    hvp: how ``∇²_{α,w} L_train v`` is computed: ``"finite_difference"``
      (Eq. 8, two gradients of ``L_train`` w.r.t. ``α``; truncation error
      ``O(fd_scale²)``), or ``"exact"``, the JVP of ``∇_α L_train`` along
      ``v`` (forward-over-reverse; exact up to rounding, about the cost of
      the two FD gradients, needs forward-mode-differentiable losses).
    fd_scale: ``ε‖v‖``, the FD step's length in ``w``-space (official: 0.01).
    virtual_weight_decay: ``λ`` in the virtual step (official: w's weight
      decay, 3e-4; paper: 0).

  Returns:
    A transformation whose state is a :class:`DARTSState` (``order=1``) or
    a :class:`SecondOrderDARTSState` (``order=2``).

  Raises:
    ValueError: naming ``order``, ``hvp``, ``fd_scale`` or
      ``virtual_learning_rate`` when it is invalid.
  """
  _check_args(order, virtual_learning_rate, hvp, fd_scale)

  def init_fn(params):
    del params
    # Distinct buffers per field: a donating jit refuses one buffer twice.
    scalar = lambda: jnp.zeros([], jnp.float32)
    count = jnp.zeros([], jnp.int32)
    if order == 1:
      return DARTSState(count, scalar())
    return SecondOrderDARTSState(count, *(scalar() for _ in range(6)))

  def update_fn(outer_grads, state, params=None, **extra_args):
    params = check_params(params, "darts")
    if order == 1 and (outer_grads is None
                       or isinstance(outer_grads, OuterGradsNotUsed)):
      raise ValueError("darts(order=1).update() needs outer_grads = "
                       "∇L_val(params) (make_step computes it).")
    if order == 2:
      check_outer_grads_unused(outer_grads, "darts(order=2)",
                               "at the virtual step w′ = w − ξ∇_w L_train")
    (inner_loss,) = require_extra_args("darts", extra_args, "inner_loss")
    alpha, w = upcast(params.upper), upcast(params.lower)
    inner_value, grad_w = jax.value_and_grad(inner_loss, argnums=1)(
        alpha, w, extra_args.get("inner_batch"))
    if order == 1:
      d_alpha = outer_grads.upper
      state = DARTSState(optax.safe_int32_increment(state.count),
                         jnp.asarray(inner_value, jnp.float32))
    else:
      d_alpha, state = _second_order(
          state, alpha, w, grad_w, inner_value, extra_args,
          virtual_learning_rate=virtual_learning_rate,
          virtual_weight_decay=virtual_weight_decay, hvp=hvp,
          fd_scale=fd_scale)
    return cast_like(Params(d_alpha, grad_w), params), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


@declare_static("order", "hvp", "upper_optimizer", "lower_optimizer")
def darts(
    order: int = 1,
    *,
    upper_optimizer: optax.GradientTransformation,
    lower_optimizer: optax.GradientTransformation,
    virtual_learning_rate: float | optax.Schedule | None = None,
    hvp: str = "finite_difference",
    fd_scale: float = 0.01,
    virtual_weight_decay: float = 0.0,
) -> optax.GradientTransformationExtraArgs:
  """DARTS (Liu et al., ICLR 2019), first or second order, as one chain.

  ``chain(scale_by_darts(...), per_level(upper_optimizer,
  lower_optimizer))``. The official CIFAR-10 search (quark0/darts
  ``train_search.py``; PyTorch's weight decay is added to the gradient, as
  ``optax.add_decayed_weights`` before the optimizer) is::

    upper_optimizer = optax.chain(optax.add_decayed_weights(1e-3),
                                  optax.adam(3e-4, b1=0.5, b2=0.999))
    lr = optax.cosine_decay_schedule(0.025, total_steps, alpha=0.001 / 0.025)
    lower_optimizer = optax.chain(optax.clip_by_global_norm(5.0),
                                  optax.add_decayed_weights(3e-4),
                                  optax.sgd(lr, momentum=0.9))
    # second order: virtual_learning_rate=lr, virtual_weight_decay=3e-4

  (the official cosine steps once per epoch, this one per step; α starts at
  ``1e-3·N(0, 1)``).

  Args:
    order: see :func:`scale_by_darts`.
    upper_optimizer: the optimizer of the architecture logits ``α``.
    lower_optimizer: the supernet weights' optimizer.
    virtual_learning_rate: see :func:`scale_by_darts`.
    hvp: see :func:`scale_by_darts`.
    fd_scale: see :func:`scale_by_darts`.
    virtual_weight_decay: see :func:`scale_by_darts`.

  Returns:
    A transformation over :class:`bilevel.Params`.
  """
  return optax.chain(
      scale_by_darts(order, virtual_learning_rate=virtual_learning_rate,
                     hvp=hvp, fd_scale=fd_scale,
                     virtual_weight_decay=virtual_weight_decay),
      per_level(upper_optimizer, lower_optimizer))
