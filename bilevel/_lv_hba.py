"""LV-HBA: a single-loop, Hessian-free method for constrained lower levels.

The lower level ``min_y f(x, y) s.t. g(x, y) ≤ 0`` (or ``= 0``) is replaced
by the proximal Lagrangian value function

    v_γ(x, y, z) = min_θ max_{λ ≥ 0} f(x, θ) + λᵀg(x, θ)
                   + ‖θ − y‖²/(2γ₁) − ‖λ − z‖²/(2γ₂),

and the bi-level problem by the penalty
``φ_k(x, y, z) = F(x, y)/c_k + f(x, y) − v_γ(x, y, z)``, ``c_k = c·(k+1)^p``.
One iteration takes one projected descent–ascent step on the saddle point
``(θ, λ)`` (kept in the solver state), then one gradient step on ``φ_k`` in
``(x, y)`` (by the per-level optimizers) and in ``z`` (in the state). Only
gradients and one VJP of ``g`` are needed.

References:
  Yao, Yu, Zeng, Zhang, *Constrained Bi-Level Optimization: Proximal
  Lagrangian Value function Approach and Hessian-free Algorithm*, ICLR 2024
  (Algorithm 1).
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from bilevel._base import (
  OuterGradsNotUsed,
  Params,
  cast_like,
  check_params,
  per_level,
  require_extra_args,
  upcast,
)
from bilevel._projected_step import project_params
from bilevel._wrappers import check_static_int, declare_static

PyTree = Any


class LVHBAState(NamedTuple):
  """State of :func:`scale_by_lv_hba`.

  Attributes:
    theta: the lower-level copy ``θ``, a pytree like ``params.lower`` in at
      least float32.
    lam: ``[num_constraints]`` float32, multipliers ``λ`` (``None`` without
      constraints: orbax cannot save zero-size arrays).
    z: ``[num_constraints]`` float32, the proximal centre of ``λ``
      (``None`` without constraints).
    count: int32 scalar, the iteration ``k``.
    lower_gap: float32 scalar, ``f(x, y) − v_γ(x, y, z)`` at the last
      update's input, with ``v_γ`` evaluated at the updated ``(θ, λ)``.
    constraint_violation: float32 scalar, ``‖max(g(x, y), 0)‖`` (``‖g‖`` for
      equalities) at the last update's input.
    multiplier_norm: float32 scalar, ``‖λ‖`` after the last update.
  """
  theta: PyTree
  lam: jax.Array | None
  z: jax.Array | None
  count: jax.Array
  lower_gap: jax.Array
  constraint_violation: jax.Array
  multiplier_norm: jax.Array


def _lagrangian(inner_loss, constraints, num_constraints, batch):
  """``L(x, θ, λ) = f(x, θ) + λᵀg(x, θ)``, with ``g(x, θ)`` as aux.

  ``λ = None`` gives ``f`` alone (``g`` still as aux, not differentiated);
  without constraints the aux is ``None``.
  """

  def lagrangian(x, theta, lam):
    value = inner_loss(x, theta, batch)
    if not num_constraints:
      return value, None
    g = jnp.asarray(constraints(x, theta, batch), jnp.float32)
    if g.shape != (num_constraints,):
      raise ValueError(f"constraints returned {g.shape=}, expected "
                       f"({num_constraints},) for {num_constraints=}")
    return (value if lam is None else value + lam @ g), g

  return lagrangian


def _saddle_step(lagrangian, x, y, state, *, eta, gamma1, gamma2, lam_box,
                 project_lower):
  """One projected descent (θ) – ascent (λ) step on the proximal Lagrangian."""
  theta, lam, z = state.theta, state.lam, state.z
  (_, g), grad_theta = jax.value_and_grad(
      lagrangian, argnums=1, has_aux=True)(x, theta, lam)
  d_theta = optax.tree.add_scale(grad_theta, 1 / gamma1,
                                 optax.tree.sub(theta, y))
  theta = optax.tree.add_scale(theta, -eta, d_theta)
  if project_lower is not None:
    theta = project_lower(theta)
  if lam is not None:
    lam = jnp.clip(lam - eta * (-g + (lam - z) / gamma2), *lam_box)
  return theta, lam


def _z_step(lam, z, g_xy, *, beta, gamma2, z_box, equality):
  """``z``'s projected step, ``‖λ − z‖²/(2γ₂)``, ``‖violation‖``, ``‖λ‖``."""
  prox = jnp.sum((lam - z) ** 2) / (2 * gamma2)
  # d_z = −(λ_{k+1} − z_k)/γ₂: descent on φ_k moves z towards λ.
  z = jnp.clip(z + beta * (lam - z) / gamma2, *z_box)
  violation = jnp.linalg.norm(g_xy if equality else jnp.maximum(g_xy, 0.0))
  return z, prox, violation, jnp.linalg.norm(lam)


@declare_static("num_constraints", "project_lower")
def scale_by_lv_hba(
    num_constraints: int,
    *,
    eta: float,
    beta: float,
    gamma1: float,
    gamma2: float,
    c: float = 1.0,
    p: float = 0.3,
    equality: bool = False,
    multiplier_radius: float = 1e3,
    z_radius: float = 1e3,
    z_lower: float | None = None,
    project_lower: Callable[[PyTree], PyTree] | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""LV-HBA's saddle-point and ``z`` steps, returning the primal directions.

  ``update(outer_grads, state, params, *, inner_loss, constraints=None,
  inner_batch=None)`` with ``outer_grads = ∇F(x_k, y_k)`` does, with
  ``L(x, θ, λ) = f(x, θ) + λᵀg(x, θ)`` (Yao et al., Alg. 1):

  1. ``θ_{k+1} = Π_Y(θ_k − η[∇_θ L(x_k, θ_k, λ_k) + (θ_k − y_k)/γ₁])``,
     ``λ_{k+1} = Π_Λ(λ_k − η[−g(x_k, θ_k) + (λ_k − z_k)/γ₂])``;
  2. returns ``Params(upper=d_x, lower=d_y)``,
     ``d_x = ∇_x F/c_k + ∇_x f(x_k, y_k) − ∇_x L(x_k, θ_{k+1}, λ_{k+1})``,
     ``d_y = ∇_y F/c_k + ∇_y f(x_k, y_k) − (y_k − θ_{k+1})/γ₁``,
     ``c_k = c·(k+1)^p``, for the per-level optimizers (SGD with ``α``);
  3. ``z_{k+1} = Π_Z(z_k + β(λ_{k+1} − z_k)/γ₂)``.

  ``Λ = [0, r]`` (``[−r, r]`` if ``equality``), ``Z = [z_lower, r_z]``.
  ``θ`` starts at ``params.lower``, ``λ`` and ``z`` at 0. Work runs in at
  least float32; directions come back in the dtypes of ``params``. With
  ``num_constraints=0`` the method is the unconstrained value-function
  penalty (``λ``, ``z`` are ``None``).

  Args:
    num_constraints: ``m``, the length of ``constraints(x, y, batch)``; the
      ``constraints`` extra argument is required when ``m > 0``.
    eta: step ``η`` of the ``(θ, λ)`` descent–ascent step.
    beta: step ``β`` of ``z``.
    gamma1: proximal parameter ``γ₁ > 0`` of ``θ``.
    gamma2: proximal parameter ``γ₂ > 0`` of ``λ``.
    c: penalty scale ``c̲ > 0``.
    p: penalty growth ``p`` (the paper's theory asks ``0 < p < 1/2``).
    equality: treat the constraints as ``g(x, y) = 0`` (sign-free ``λ``).
    multiplier_radius: ``r``, the box of ``λ``.
    z_radius: ``r_z``, the upper end of the box of ``z``.
    z_lower: lower end of the box of ``z``; default ``0`` for inequalities,
      ``−r_z`` for equalities (the official toy keeps ``z ≥ 0`` even for its
      equality constraint: pass ``0.0`` to reproduce it).
    project_lower: ``Π_Y: lower -> lower`` for ``θ``; default none
      (``Y`` is the whole space).

  Returns:
    A transformation whose state is an :class:`LVHBAState`.
  """
  check_static_int(num_constraints, "num_constraints", "lv_hba")
  lam_box = (-multiplier_radius if equality else 0.0, multiplier_radius)
  z_box = (-z_radius if equality else 0.0, z_radius)
  if z_lower is not None:
    z_box = (z_lower, z_radius)
  required = ("inner_loss",) + (("constraints",) if num_constraints else ())

  def init_fn(params):
    # Distinct buffers (θ a copy of params.lower): a step may donate both
    # params and state, and XLA refuses a buffer donated twice.
    theta = jax.tree.map(lambda l: jnp.array(l, copy=True),
                         upcast(params.lower))
    zeros = lambda: (jnp.zeros([num_constraints], jnp.float32)
                     if num_constraints else None)
    scalar = lambda: jnp.zeros([], jnp.float32)
    return LVHBAState(theta, zeros(), zeros(), jnp.zeros([], jnp.int32),
                      scalar(), scalar(), scalar())

  def update_fn(outer_grads, state, params=None, **extra_args):
    params = check_params(params, "lv_hba")
    if outer_grads is None or isinstance(outer_grads, OuterGradsNotUsed):
      raise ValueError("lv_hba.update() needs outer_grads = ∇F(params) "
                       "(its penalty's outer term is taken at the input).")
    inner_loss, *constraints = require_extra_args(
        "lv_hba", extra_args, *required)
    lagrangian = _lagrangian(inner_loss, constraints[0] if constraints
                             else None, num_constraints,
                             extra_args.get("inner_batch"))
    x, y, grads = upcast(params.upper), upcast(params.lower), upcast(
        outer_grads)
    theta, lam = _saddle_step(
        lagrangian, x, y, state, eta=eta, gamma1=gamma1, gamma2=gamma2,
        lam_box=lam_box, project_lower=project_lower)

    (f_xy, g_xy), (fx, fy) = jax.value_and_grad(
        lagrangian, argnums=(0, 1), has_aux=True)(x, y, None)
    (l_value, _), lx = jax.value_and_grad(
        lagrangian, argnums=0, has_aux=True)(x, theta, lam)
    c_k = c * (state.count.astype(jnp.float32) + 1) ** p
    y_minus_theta = optax.tree.sub(y, theta)
    d_x = optax.tree.add_scale(optax.tree.sub(fx, lx), 1 / c_k, grads.upper)
    d_y = optax.tree.add_scale(
        optax.tree.add_scale(fy, -1 / gamma1, y_minus_theta), 1 / c_k,
        grads.lower)

    z, prox, violation, lam_norm = state.z, 0.0, 0.0, 0.0
    if num_constraints:
      z, prox, violation, lam_norm = _z_step(
          lam, z, g_xy, beta=beta, gamma2=gamma2, z_box=z_box,
          equality=equality)
    # v_γ(x, y, z) at the updated (θ, λ): the penalty's lower-level gap.
    v_gamma = l_value + optax.tree.norm(y_minus_theta, squared=True) / (
        2 * gamma1) - prox
    state = LVHBAState(
        theta=theta, lam=lam, z=z,
        count=optax.safe_int32_increment(state.count),
        lower_gap=jnp.asarray(f_xy - v_gamma, jnp.float32),
        constraint_violation=jnp.asarray(violation, jnp.float32),
        multiplier_norm=jnp.asarray(lam_norm, jnp.float32))
    return cast_like(Params(d_x, d_y), params), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


@declare_static("num_constraints", "project_lower", "project_joint")
def lv_hba(
    num_constraints: int,
    *,
    alpha: float,
    beta: float,
    eta: float,
    gamma1: float,
    gamma2: float,
    c: float = 1.0,
    p: float = 0.3,
    equality: bool = False,
    multiplier_radius: float = 1e3,
    z_radius: float = 1e3,
    z_lower: float | None = None,
    project_lower: Callable[[PyTree], PyTree] | None = None,
    project_joint: Callable[[Params], Params] | None = None,
    upper_optimizer: optax.GradientTransformation | None = None,
    lower_optimizer: optax.GradientTransformation | None = None,
) -> optax.GradientTransformationExtraArgs:
  """LV-HBA (Yao et al., ICLR 2024, Alg. 1) as one optax chain.

  ``chain(scale_by_lv_hba(...), per_level(sgd(α), sgd(α)),
  project_params(project_joint))``: the paper's step
  ``(x, y) ← Π_C((x, y) − α(d_x, d_y))``. Without ``project_joint`` the
  step is unprojected (``C`` the whole space).

  Args:
    num_constraints: see :func:`scale_by_lv_hba`.
    alpha: step ``α`` of ``(x, y)``.
    beta: see :func:`scale_by_lv_hba`.
    eta: see :func:`scale_by_lv_hba`.
    gamma1: see :func:`scale_by_lv_hba`.
    gamma2: see :func:`scale_by_lv_hba`.
    c: see :func:`scale_by_lv_hba`.
    p: see :func:`scale_by_lv_hba`.
    equality: see :func:`scale_by_lv_hba`.
    multiplier_radius: see :func:`scale_by_lv_hba`.
    z_radius: see :func:`scale_by_lv_hba`.
    z_lower: see :func:`scale_by_lv_hba`.
    project_lower: see :func:`scale_by_lv_hba`.
    project_joint: ``Π_C: Params -> Params``, the joint projection of
      ``(x, y)`` (e.g. onto the coupled constraints) after the step.
    upper_optimizer: replaces ``optax.sgd(alpha)`` on ``d_x`` (e.g. Adam).
    lower_optimizer: replaces ``optax.sgd(alpha)`` on ``d_y``.

  Returns:
    A transformation over :class:`bilevel.Params`.
  """
  txs = [
      scale_by_lv_hba(
          num_constraints, eta=eta, beta=beta, gamma1=gamma1, gamma2=gamma2,
          c=c, p=p, equality=equality, multiplier_radius=multiplier_radius,
          z_radius=z_radius, z_lower=z_lower, project_lower=project_lower),
      per_level(upper_optimizer or optax.sgd(alpha),
                lower_optimizer or optax.sgd(alpha)),
  ]
  if project_joint is not None:
    txs.append(project_params(project_joint))
  return optax.chain(*txs)
