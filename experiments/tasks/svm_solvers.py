r"""Solvers and projections for the SVM problem of :mod:`.svm_problem`.

The relaxed (squared-hinge) lower level by damped generalized Newton
(:func:`solve_relaxed`, the implicit baseline's exact inner solver), the
shared-regulariser :func:`grid_search` baseline built on it, the constrained
lower level's closed-form slacks (:func:`optimal_slacks`), and the
projections onto the margin constraints ``{ξᵢ + mᵢ(w, b) ≥ 1}`` that LV-HBA
chains after its step (:func:`feasibility_projection`).
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax

import bilevel
from experiments.tasks import svm_problem

# ----------------------------------------------------------------------------
# Feasibility: optimal slacks and projections onto the margin constraints.


def optimal_slacks(lower, batch) -> jax.Array:
  """``ξᵢ = max(0, 1 − mᵢ)``, the constrained lower level's optimal slacks."""
  return jax.nn.relu(1.0 - svm_problem.margins(lower, batch["x"], batch["y"]))


def restore_feasibility(lower, batch):
  """``ξ ← max(ξ, 1 − m(w, b))``: the projection onto ``{g ≤ 0}`` along ξ.

  The exact Euclidean projection onto the feasible set for fixed ``(w, b)``
  (a product of half-lines in ξ); cheap, unlike the joint projection of
  ``(w, b, ξ)`` onto the N-halfspace polyhedron (:func:`project_margins`).
  """
  m = svm_problem.margins(lower, batch["x"], batch["y"])
  xi = jnp.maximum(lower["xi"], 1.0 - m)
  return {**lower, "xi": xi}


def project_margins(lower, batch, *, num_iters: int = 1000,
                    tol: float | None = 1e-6):
  """Euclidean projection of ``(w, b, ξ)`` onto ``{ξᵢ + mᵢ(w, b) ≥ 1}``.

  :func:`bilevel.projection_polyhedron` (Dykstra / Hildreth) on the rows
  ``−[yᵢzᵢ, yᵢ, eᵢ]ᵀ(w, b, ξ) ≤ −1``, as the official code's per-iteration
  QP (which it solves with cvxpy/ECOS).
  """
  x, y = batch["x"], batch["y"]
  n, d = x.shape
  flat = jnp.concatenate([lower["w"], lower["b"][None], lower["xi"]])
  rows = -jnp.concatenate([y[:, None] * x, y[:, None], jnp.eye(n)], axis=1)
  out = bilevel.projection_polyhedron(flat, rows, -jnp.ones(n),
                                      num_iters=num_iters, tol=tol)
  return {"w": out[:d], "b": out[d], "xi": out[d + 1:]}


def project_margins_exact(lower, batch, *, num_iters: int = 10):
  """Exact Euclidean projection of ``(w, b, ξ)`` onto ``{ξᵢ + mᵢ(w, b) ≥ 1}``.

  For fixed ``v = (w, b)`` the nearest feasible slacks are
  ``ξᵢ = max(ξ⁰ᵢ, 1 − mᵢ(v))``, so the projection reduces to the strongly
  convex, piecewise-quadratic problem in ``d + 1`` variables

      min_v ½‖v − v⁰‖² + ½ Σᵢ max(0, 1 − ξ⁰ᵢ − mᵢ(v))²,

  minimized by generalized Newton with the line search of
  :func:`solve_relaxed` (Hessian ``I + Z̃ᵀ diag([active]) Z̃ ⪰ I``; a few
  steps reach machine precision, as the active set settles). Unlike
  :func:`restore_feasibility` it moves ``(w, b)`` too — the ``Π_C`` of
  LV-HBA's step, which the official code solves with cvxpy/ECOS; unlike
  :func:`project_margins` (Dykstra) it costs ``O(N d²)`` per Newton step and
  converges on thousands of rows.
  """
  x, y = batch["x"], batch["y"]
  z = jnp.concatenate([x, jnp.ones_like(x[:, :1])], axis=1) * y[:, None]
  v0 = jnp.concatenate([lower["w"], lower["b"][None]])
  xi0 = lower["xi"]
  steps = 0.5 ** jnp.arange(10, dtype=v0.dtype)

  def loss(v):
    return 0.5 * jnp.sum((v - v0) ** 2) + 0.5 * jnp.sum(
        jax.nn.relu(1.0 - xi0 - z @ v) ** 2)

  def step(v, _):
    hinge = jax.nn.relu(1.0 - xi0 - z @ v)
    grad = (v - v0) - z.T @ hinge
    hess = (z.T * (hinge > 0)) @ z + jnp.eye(v.size, dtype=v.dtype)
    dv = -jnp.linalg.solve(hess, grad)
    values = jax.vmap(lambda t: loss(v + t * dv))(steps)
    best = jnp.argmin(values)
    return jnp.where(values[best] <= loss(v), v + steps[best] * dv, v), None

  v, _ = jax.lax.scan(step, v0, length=num_iters)
  return {"w": v[:-1], "b": v[-1], "xi": jnp.maximum(xi0, 1.0 - z @ v)}


PROJECTIONS = {"slack": restore_feasibility, "polyhedron": project_margins,
               "exact": project_margins_exact}


def feasibility_projection(
    projection: str, upper_box: tuple[float, float] | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Projects onto ``C = [c_min, c_max]ᴺ × {g ≤ 0}`` after a step.

  ``u ↦ Π(params + u; inner_batch) − params``; the margin constraints depend
  on the training data, so the projection reads ``inner_batch`` from the
  extra arguments instead of closing over it (the solver is then built from
  its config alone).

  Args:
    projection: ``'exact'`` (:func:`project_margins_exact`), ``'slack'``
      (:func:`restore_feasibility`, not a projection of ``(w, b, ξ)``: it
      leaves ``w`` to shrink under ``∇_w f``), ``'polyhedron'``
      (:func:`project_margins`) or ``'none'`` (lower level unprojected).
    upper_box: ``(c_min, c_max)``, a box on the log-weights, or None.

  Returns:
    A stateless transformation over :class:`bilevel.Params`, to chain after
    :func:`bilevel.lv_hba`.
  """
  projections = {**PROJECTIONS, "none": lambda lower, batch: lower}
  if projection not in projections:
    raise ValueError(f"Unknown projection {projection!r}; valid:"
                     f" {', '.join(projections)}")
  project = projections[projection]

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None, **extra_args):
    (batch,) = bilevel.require_extra_args("feasibility_projection",
                                          extra_args, "inner_batch")
    new = optax.apply_updates(params, updates)
    upper = new.upper if upper_box is None else jnp.clip(new.upper,
                                                         *upper_box)
    new = bilevel.Params(upper, project(new.lower, batch))
    return jax.tree.map(jnp.subtract, new, params), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ----------------------------------------------------------------------------
# The relaxed SVM by damped Newton, and the grid-search baseline.


def solve_relaxed(
    upper: jax.Array,
    lower: dict[str, jax.Array],
    batch: dict[str, jax.Array],
    *,
    num_iters: int = 20,
    ridge: float = 1e-6,
) -> dict[str, jax.Array]:
  """Minimizes :func:`svm_problem.relaxed_inner_loss` by Newton's method.

  The squared hinge is C¹ with a piecewise-constant Hessian
  ``H = diag(1, …, 1, 0) + Z̃ᵀ diag(e^{c} ⊙ [m < 1]) Z̃`` (``Z̃ = [Z, 1]``);
  each Newton step is followed by a line search over ``t ∈ {1, ½, …, 2⁻⁹}``
  (the objective along the step is a cheap function of ``t``), so the loss
  never increases (generalized Newton, Keerthi & DeCoste, JMLR 2005).

  Args:
    upper: log-weights ``c: [N]``.
    lower: ``{'w': [d], 'b': []}``, the starting point.
    batch: ``{'x': [N, d], 'y': [N]}``.
    num_iters: Newton steps.
    ridge: added to the Hessian's diagonal (``b`` is unregularized).

  Returns:
    ``{'w', 'b'}`` at the minimum.
  """
  x, y = batch["x"], batch["y"]
  weights = jnp.exp(upper)
  z = jnp.concatenate([x, jnp.ones_like(x[:, :1])], axis=1)
  reg = jnp.concatenate([jnp.ones(x.shape[1]), jnp.zeros(1)]).astype(x.dtype)
  steps = 0.5 ** jnp.arange(10, dtype=x.dtype)

  def loss_along(v, dv):
    m, dm = y * (z @ v), y * (z @ dv)
    vs = v + steps[:, None] * dv
    hinge = jax.nn.relu(1.0 - m - steps[:, None] * dm)
    return 0.5 * jnp.sum(reg * vs**2, 1) + 0.5 * hinge**2 @ weights

  def step(v, _):
    hinge = jax.nn.relu(1.0 - y * (z @ v))
    grad = reg * v - z.T @ (weights * hinge * y)
    active = weights * (hinge > 0)
    hess = (z.T * active) @ z + jnp.diag(reg + ridge)
    dv = -jnp.linalg.solve(hess, grad)
    values = loss_along(v, dv)
    best = jnp.argmin(values)
    v_new = v + steps[best] * dv
    current = 0.5 * jnp.sum(reg * v**2) + 0.5 * hinge**2 @ weights
    return jnp.where(values[best] <= current, v_new, v), None

  v = jnp.concatenate([lower["w"], lower["b"][None]])
  v, _ = jax.lax.scan(step, v, length=num_iters)
  return {"w": v[:-1], "b": v[-1]}


def grid_search(
    data: svm_problem.SVMData,
    log_c_grid: Sequence[float],
    *,
    num_iters: int = 30,
) -> dict[str, float]:
  """The shared-regulariser baseline: all ``cᵢ = c``, ``c`` by val accuracy.

  Every grid point solves the relaxed SVM from ``w = 0, b = 0`` with
  :func:`solve_relaxed` (vmapped over the grid); ties go to the smaller ``c``
  (the stronger regulariser).

  Args:
    data: the splits.
    log_c_grid: candidate values of ``c`` (``log C``).
    num_iters: Newton steps per solve.

  Returns:
    ``{'log_c', 'val_accuracy', 'test_accuracy'}`` of the chosen ``c``.
  """
  grid = jnp.asarray(sorted(log_c_grid), jnp.float32)
  train = {"x": jnp.asarray(data.train_x), "y": jnp.asarray(data.train_y)}
  n, d = data.train_x.shape
  lower0 = {"w": jnp.zeros(d), "b": jnp.zeros([])}

  @jax.jit
  def solve_all(grid, train, val_x, val_y, test_x, test_y):
    def one(c):
      lower = solve_relaxed(jnp.full(n, c), lower0, train, num_iters=num_iters)
      val = svm_problem.accuracy(lower, val_x, val_y)
      return val, svm_problem.accuracy(lower, test_x, test_y)
    return jax.vmap(one)(grid)

  val, test = solve_all(grid, train, *map(jnp.asarray, (
      data.val_x, data.val_y, data.test_x, data.test_y)))
  best = int(jnp.argmax(val))
  return {"log_c": float(grid[best]), "val_accuracy": float(val[best]),
          "test_accuracy": float(test[best])}
