"""LV-HBA's coupled-equality toy (R7) as an experiment task.

``F(x, y) = ½‖x − y₂‖² + ½‖y₁ − 1‖²``, ``f(x, y) = ½‖y₁‖² − xᵀy₁ + 1ᵀy₂``
s.t. ``1ᵀx + 1ᵀy₁ + 1ᵀy₂ = 0``; optimum ``x* = −0.3·1``, ``F* = 5``
(:func:`bilevel.reference_problems.r7`). Full-batch and deterministic: the
data stream is empty.

References:
  Yao, Yu, Zeng, Zhang, "Constrained Bi-Level Optimization: Proximal
  Lagrangian Value function Approach and Hessian-free Algorithm", ICLR 2024.
"""

import jax
import jax.numpy as jnp
import ml_collections
import optax

import bilevel
from bilevel import reference_problems
from experiments.task import Task


def task_from_config(config: ml_collections.ConfigDict,
                     key: jax.Array) -> Task:
  """The R7 task of ``config.problem.n`` dimensions (``key`` is unused)."""
  del key  # deterministic problem and initial point.
  ref = reference_problems.r7(config.problem.n,
                              dtype=jnp.dtype(config.problem.dtype))
  x_star = jnp.asarray(ref.upper_optimum, jnp.float32)

  @jax.jit
  def metrics(params):
    x = jnp.asarray(params.upper, jnp.float32)
    h = ref.problem.constraints(params.upper, params.lower, None)
    return {
        "relative_error_x": jnp.linalg.norm(x - x_star)
                            / jnp.linalg.norm(x_star),
        "F": ref.problem.outer_loss(params.upper, params.lower, None),
        "constraint_violation": jnp.linalg.norm(h),
        "mean_y1": jnp.mean(params.lower[0]),
        "mean_y2": jnp.mean(params.lower[1]),
    }

  def evaluate(params: bilevel.Params) -> dict[str, float]:
    return {k: float(v) for k, v in metrics(params).items()}

  return Task(ref.problem, ref.init, lambda step: dict(ref.batches), evaluate)


def solver_from_config(
    cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """``bilevel.lv_hba`` from the ``solver`` section (R7's joint projection).

  Reads ``num_constraints, alpha, beta, eta, gamma1, gamma2, c, p,
  equality, multiplier_radius, z_radius, z_lower`` (``z_lower = None``:
  the method's default box) and ``project_joint`` (``'r7'`` or ``''``).
  """
  projections = {"r7": reference_problems.r7_projection, "": None}
  if cfg.project_joint not in projections:
    raise ValueError(f"Unknown solver.project_joint {cfg.project_joint!r}; "
                     f"valid: {sorted(projections)}")
  return bilevel.lv_hba(
      cfg.num_constraints, alpha=cfg.alpha, beta=cfg.beta, eta=cfg.eta,
      gamma1=cfg.gamma1, gamma2=cfg.gamma2, c=cfg.c, p=cfg.p,
      equality=cfg.equality, multiplier_radius=cfg.multiplier_radius,
      z_radius=cfg.z_radius, z_lower=cfg.z_lower,
      project_joint=projections[cfg.project_joint])
