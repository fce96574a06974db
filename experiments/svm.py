r"""Linear-SVM hyper-parameter optimisation and data hyper-cleaning (LV-HBA §5).

Upper variables: one log-weight per training example, ``c ∈ ℝᴺ``. Lower
variables: the soft-margin SVM ``(w, b, ξ)``, ``ξ ∈ ℝᴺ`` one slack per
training example. With margins ``mᵢ = yᵢ(wᵀzᵢ + b)`` and labels ``yᵢ = ±1``:

    min_c  F(w, b) = (1/n_val) Σ_j LeakyReLU(2σ(−5 m_j^val / ‖w‖) − 1)
    s.t.   (w, b, ξ) ∈ argmin ½‖w‖² + ½ Σᵢ e^{cᵢ} ξᵢ²
                       s.t.  gᵢ = 1 − ξᵢ − mᵢ ≤ 0,  i = 1..N.

``F`` is a smoothed validation 0-1 error (``2σ(−5t) − 1 = −tanh(2.5 t)`` is
positive on misclassified points; LeakyReLU slope 0.01 as in PyTorch), a
*mean* over the validation set where the official code sums (a factor
``n_val`` that the penalty constant of LV-HBA absorbs). The constraints
couple the per-example slacks to ``(w, b)``; their feasible set does not
depend on ``c``.

The *relaxed* lower level eliminates ξ: at the optimum ``ξᵢ = max(0, 1 − mᵢ)``
(``ξᵢ < 1 − mᵢ`` is infeasible, larger ξ only raises the objective), giving
the smooth squared-hinge SVM ``½‖w‖² + ½ Σᵢ e^{cᵢ} max(0, 1 − mᵢ)²`` over
``(w, b)`` — the problem of the implicit-differentiation and grid-search
baselines. :func:`solve_relaxed` minimizes it by damped Newton.

References:
  Yao, Yu, Zeng, Zhang, "Constrained Bi-Level Optimization: Proximal
  Lagrangian Value function Approach and Hessian-free Algorithm", ICLR 2024,
  §5 (SVM hyper-parameter optimisation and data hyper-cleaning).
"""

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

import bilevel
from experiments import data as data_lib
from experiments import evaluation
from experiments.task import Task

_NORM_EPS = 1e-12


class SVMData(NamedTuple):
  """Binary splits with ``±1`` labels, partly flipped on the training split.

  Attributes:
    train_x: float32 ``[n, d]`` standardized features.
    train_y: float32 ``[n]`` in ``{−1, +1}``, the (noisy) labels trained on.
    train_clean_y: float32 ``[n]``, the true labels.
    flipped: bool ``[n]``, ``train_y != train_clean_y``.
    val_x: float32 ``[n_val, d]``; ``val_y: [n_val]`` clean labels.
    val_y: float32 ``[n_val]``.
    test_x: float32 ``[n_test, d]``.
    test_y: float32 ``[n_test]``.
  """
  train_x: np.ndarray
  train_y: np.ndarray
  train_clean_y: np.ndarray
  flipped: np.ndarray
  val_x: np.ndarray
  val_y: np.ndarray
  test_x: np.ndarray
  test_y: np.ndarray


# ----------------------------------------------------------------------------
# Data.


def _breast_cancer(key, num_train, num_val, num_test):
  """scikit-learn's 569 × 30 breast-cancer set, split by one permutation."""
  from sklearn.datasets import load_breast_cancer  # Slow import.
  x, y = load_breast_cancer(return_X_y=True)
  if num_train + num_val + num_test > len(y):
    raise ValueError(f"{num_train=} + {num_val=} + {num_test=} exceeds the"
                     f" {len(y)} breast-cancer examples")
  perm = np.asarray(jax.random.permutation(key, len(y)))
  cuts = np.cumsum([num_train, num_val, num_test])
  parts = np.split(perm, cuts)[:3]
  return [(x[p].astype(np.float32), y[p].astype(np.int32)) for p in parts]


def pool_images(images: np.ndarray, pool: int) -> np.ndarray:
  """Average-pools ``[n, h, w, c]`` images by ``pool`` and flattens.

  Args:
    images: ``[n, h, w, c]`` with ``h`` and ``w`` multiples of ``pool``.
    pool: the window (and stride).

  Returns:
    float32 ``[n, (h/pool)·(w/pool)·c]``.
  """
  n, h, w, c = images.shape
  if h % pool or w % pool:
    raise ValueError(f"image size {(h, w)} must be a multiple of {pool=}")
  blocks = images.reshape(n, h // pool, pool, w // pool, pool, c)
  return blocks.mean(axis=(2, 4)).reshape(n, -1).astype(np.float32)


def _cifar10(key, num_train, num_val, num_test, data_dir, classes, pool):
  """Two CIFAR-10 (JPEG) classes, pooled; train/val from the train split."""
  dataset = data_lib.load_dataset("cifar10", data_dir)

  def binary(x, y):
    keep = np.isin(y, classes)
    label = (y[keep] == classes[1]).astype(np.int32)
    return pool_images(x[keep], pool), label

  train_x, train_y = binary(dataset.train_x, dataset.train_y)
  test_x, test_y = binary(dataset.test_x, dataset.test_y)
  s = data_lib.make_splits(
      key, data_lib.Dataset(train_x, train_y, test_x, test_y, 2),
      num_train=num_train, num_val=num_val, num_test=num_test)
  return [(s.train_x, s.train_y), (s.val_x, s.val_y), (s.test_x, s.test_y)]


def make_data(
    key: jax.Array,
    name: str,
    *,
    num_train: int,
    num_val: int,
    num_test: int,
    noise_rate: float = 0.0,
    data_dir: str | None = None,
    classes: Sequence[int] = (0, 1),
    pool: int = 4,
) -> SVMData:
  """Binary splits, standardized with training statistics, labels flipped.

  Args:
    key: PRNG key (split and flips).
    name: ``'breast_cancer'`` (scikit-learn, 569 × 30, malignant = −1) or
      ``'cifar10'`` (two classes of CIFAR-10 (JPEG) from ``data_dir``,
      ``classes[1]`` = +1, average-pooled by ``pool``: 8 × 8 × 3 = 192
      features for ``pool=4``).
    num_train: training examples.
    num_val: validation examples.
    num_test: test examples.
    noise_rate: fraction of training labels whose sign is flipped (exactly
      ``round(noise_rate · num_train)``, a uniformly random subset).
    data_dir: CIFAR-10 directory.
    classes: the two CIFAR-10 classes (0 airplane, 1 automobile, ...).
    pool: CIFAR-10 pooling window.

  Returns:
    The :class:`SVMData`.
  """
  split_key, flip_key = jax.random.split(key)
  if name == "breast_cancer":
    parts = _breast_cancer(split_key, num_train, num_val, num_test)
  elif name == "cifar10":
    parts = _cifar10(split_key, num_train, num_val, num_test, data_dir,
                     tuple(classes), pool)
  else:
    raise ValueError(f"Unknown SVM dataset {name!r}; valid names:"
                     " breast_cancer, cifar10")
  (train_x, train_y), (val_x, val_y), (test_x, test_y) = parts
  noisy, flipped = data_lib.flip_labels(flip_key, train_y, 2, noise_rate)
  mean, std = train_x.mean(axis=0), train_x.std(axis=0) + 1e-6
  scale = lambda x: ((x - mean) / std).astype(np.float32)
  sign = lambda y: (2.0 * np.asarray(y) - 1.0).astype(np.float32)
  return SVMData(scale(train_x), sign(noisy), sign(train_y), flipped,
                 scale(val_x), sign(val_y), scale(test_x), sign(test_y))


# ----------------------------------------------------------------------------
# The bilevel problem, as pure functions of pytrees.


def margins(lower: dict[str, jax.Array], x: jax.Array, y: jax.Array
            ) -> jax.Array:
  """``mᵢ = yᵢ(wᵀxᵢ + b)``: ``lower = {'w': [d], 'b': []}``, ``x: [n, d]``."""
  return y * (x @ lower["w"] + lower["b"])


def smoothed_error(lower, batch) -> jax.Array:
  """``mean_j LeakyReLU(2σ(−5 m_j/‖w‖) − 1)`` on ``batch = {'x', 'y'}``."""
  norm = jnp.sqrt(jnp.sum(jnp.square(lower["w"])) + _NORM_EPS)
  t = margins(lower, batch["x"], batch["y"]) / norm
  return jnp.mean(jax.nn.leaky_relu(2.0 * jax.nn.sigmoid(-5.0 * t) - 1.0))


def outer_loss(upper: jax.Array, lower, batch) -> jax.Array:
  """``F``: the smoothed validation error; ``c`` enters only through ``y``."""
  del upper
  return smoothed_error(lower, batch)


def constrained_inner_loss(upper: jax.Array, lower, batch) -> jax.Array:
  """``f(c, w, b, ξ) = ½‖w‖² + ½ Σᵢ e^{cᵢ} ξᵢ²``; ``c, ξ: [N]``."""
  del batch
  return 0.5 * jnp.sum(jnp.square(lower["w"])) + 0.5 * jnp.sum(
      jnp.exp(upper) * jnp.square(lower["xi"]))


def constraints(upper: jax.Array, lower, batch) -> jax.Array:
  """``gᵢ = 1 − ξᵢ − yᵢ(wᵀzᵢ + b)``, ``[N]``, feasible where ``≤ 0``."""
  del upper
  return 1.0 - lower["xi"] - margins(lower, batch["x"], batch["y"])


def relaxed_inner_loss(upper: jax.Array, lower, batch) -> jax.Array:
  """``½‖w‖² + ½ Σᵢ e^{cᵢ} max(0, 1 − mᵢ)²`` (ξ eliminated)."""
  hinge = jax.nn.relu(1.0 - margins(lower, batch["x"], batch["y"]))
  return 0.5 * jnp.sum(jnp.square(lower["w"])) + 0.5 * jnp.sum(
      jnp.exp(upper) * jnp.square(hinge))


CONSTRAINED = bilevel.Problem(outer_loss, constrained_inner_loss, constraints)


def scaled_constraints(scale: float):
  """``s·g``: the same feasible set, multipliers ``λ/s`` (conditioning)."""
  return lambda upper, lower, batch: scale * constraints(upper, lower, batch)
RELAXED = bilevel.Problem(outer_loss, relaxed_inner_loss)


def optimal_slacks(lower, batch) -> jax.Array:
  """``ξᵢ = max(0, 1 − mᵢ)``, the constrained lower level's optimal slacks."""
  return jax.nn.relu(1.0 - margins(lower, batch["x"], batch["y"]))


def restore_feasibility(lower, batch):
  """``ξ ← max(ξ, 1 − m(w, b))``: the projection onto ``{g ≤ 0}`` along ξ.

  The exact Euclidean projection onto the feasible set for fixed ``(w, b)``
  (a product of half-lines in ξ); cheap, unlike the joint projection of
  ``(w, b, ξ)`` onto the N-halfspace polyhedron (:func:`project_margins`).
  """
  xi = jnp.maximum(lower["xi"], 1.0 - margins(lower, batch["x"], batch["y"]))
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
# The relaxed SVM by damped Newton (grid search, exact inner solver).


def solve_relaxed(
    upper: jax.Array,
    lower: dict[str, jax.Array],
    batch: dict[str, jax.Array],
    *,
    num_iters: int = 20,
    ridge: float = 1e-6,
) -> dict[str, jax.Array]:
  """Minimizes :func:`relaxed_inner_loss` over ``(w, b)`` by Newton's method.

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


def accuracy(lower, x, y) -> jax.Array:
  """Fraction of ``sign(wᵀx + b) = y`` (a zero score counts as wrong)."""
  return jnp.mean((margins(lower, x, y) > 0).astype(jnp.float32))


def grid_search(
    data: SVMData,
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
      return accuracy(lower, val_x, val_y), accuracy(lower, test_x, test_y)
    return jax.vmap(one)(grid)

  val, test = solve_all(grid, train, *map(jnp.asarray, (
      data.val_x, data.val_y, data.test_x, data.test_y)))
  best = int(jnp.argmax(val))
  return {"log_c": float(grid[best]), "val_accuracy": float(val[best]),
          "test_accuracy": float(test[best])}


# ----------------------------------------------------------------------------
# The task.


def init_params(key: jax.Array, data: SVMData, *, form: str,
                c_range: tuple[float, float] = (-6.0, -5.0)
                ) -> bilevel.Params:
  """``c ~ U(c_range)`` (official: U(−6, −5)); lower at the relaxed optimum.

  Every method starts from the lower-level solution at the initial ``c``
  (``w, b`` by :func:`solve_relaxed`, ``ξ = max(0, 1 − m)``), so the
  comparison is about the upper level.

  Args:
    key: PRNG key for ``c``.
    data: the splits.
    form: ``'constrained'`` (lower ``{'w', 'b', 'xi'}``) or ``'relaxed'``
      (lower ``{'w', 'b'}``).
    c_range: the uniform range of the initial log-weights.

  Returns:
    The initial :class:`bilevel.Params`.
  """
  n, d = data.train_x.shape
  upper = jax.random.uniform(key, (n,), jnp.float32, *c_range)
  batch = {"x": jnp.asarray(data.train_x), "y": jnp.asarray(data.train_y)}
  lower = jax.jit(solve_relaxed)(
      upper, {"w": jnp.zeros(d), "b": jnp.zeros([])}, batch)
  if form == "constrained":
    lower = {**lower, "xi": optimal_slacks(lower, batch)}
  elif form != "relaxed":
    raise ValueError(f"Unknown SVM form {form!r}; valid: constrained, relaxed")
  return bilevel.Params(upper, lower)


def build_task(key: jax.Array, data: SVMData, *, form: str,
               c_range: tuple[float, float] = (-6.0, -5.0),
               constraint_scale: float = 1.0) -> Task:
  """The SVM task: full-batch train (inner) and validation (outer) batches.

  Args:
    key: PRNG key (initial ``c``).
    data: the splits from :func:`make_data`.
    form: ``'constrained'`` (:data:`CONSTRAINED`, for LV-HBA) or
      ``'relaxed'`` (:data:`RELAXED`, for implicit differentiation).
    c_range: see :func:`init_params`.
    constraint_scale: ``s > 0``, the constraints are ``s·g ≤ 0``. The
      descent–ascent step of LV-HBA is stable only for ``η`` below about
      ``2μ/(μ² + s²σ²)``, ``σ`` the largest singular value of ``∂g/∂(w, b,
      ξ)`` (``σ² ≈ N·λ_max(cov z)``, ``μ ≈ 1/γ``); ``s = 1/√N`` makes that
      bound independent of ``N``.

  Returns:
    The :class:`~experiments.task.Task`. ``evaluate(params)`` gives
    ``val_accuracy``, ``test_accuracy``, the max constraint violation (for
    the constrained form) and, with flipped labels, the ``auroc`` of ``c``
    for telling clean from flipped examples and the mean ``c`` of each kind.
  """
  params = init_params(key, data, form=form, c_range=c_range)
  arrays = {k: jnp.asarray(v) for k, v in data._asdict().items()}
  batches = {"outer_batch": {"x": arrays["val_x"], "y": arrays["val_y"]},
             "inner_batch": {"x": arrays["train_x"],
                             "y": arrays["train_y"]}}
  problem = RELAXED
  if form == "constrained":
    problem = CONSTRAINED._replace(
        constraints=scaled_constraints(constraint_scale))
  return Task(problem, params, lambda step: batches,
              functools.partial(evaluate, data, problem))


@functools.partial(jax.jit, static_argnums=0)
def _metrics(problem, params, arrays):
  lower = params.lower
  out = {"val_accuracy": accuracy(lower, arrays["val_x"], arrays["val_y"]),
         "test_accuracy": accuracy(lower, arrays["test_x"], arrays["test_y"])}
  if problem.constraints is not None:
    train = {"x": arrays["train_x"], "y": arrays["train_y"]}
    out["max_violation"] = jnp.max(problem.constraints(
        params.upper, lower, train))
  return out


def evaluate(data: SVMData, problem: bilevel.Problem,
             params: bilevel.Params) -> dict[str, float]:
  """The task's metrics (see :func:`build_task`)."""
  arrays = {k: jnp.asarray(v) for k, v in data._asdict().items()
            if k != "flipped"}
  out = {k: float(v) for k, v in _metrics(problem, params, arrays).items()}
  flipped = np.asarray(data.flipped, bool)
  if flipped.any() and not flipped.all():
    c = np.asarray(params.upper, np.float64)
    finite = np.all(np.isfinite(c))
    out["auroc"] = evaluation.auroc(c, ~flipped) if finite else float("nan")
    out["c_clean_mean"] = float(c[~flipped].mean())
    out["c_flipped_mean"] = float(c[flipped].mean())
  return out


def data_from_config(config: ml_collections.ConfigDict, key: jax.Array
                     ) -> SVMData:
  """:func:`make_data` from the ``data`` section."""
  d = config.data
  return make_data(key, d.name, num_train=d.num_train, num_val=d.num_val,
                   num_test=d.num_test, noise_rate=d.noise_rate,
                   data_dir=d.data_dir or None, classes=tuple(d.classes),
                   pool=d.pool)


def task_from_config(config: ml_collections.ConfigDict, key: jax.Array
                     ) -> Task:
  """The registry's ``'lv_hba_svm'`` task: (b) clean, (c) noisy labels.

  ``config.data.noise_rate`` = 0 is hyper-parameter optimisation (b),
  0.4 data hyper-cleaning (c); ``config.problem.form`` picks the constrained
  (LV-HBA) or relaxed (implicit baseline) lower level;
  ``config.problem.constraint_scale`` 0 means ``1/√N``.
  """
  data_key, init_key = jax.random.split(key)
  data = data_from_config(config, data_key)
  scale = config.problem.constraint_scale or len(data.train_y) ** -0.5
  return build_task(init_key, data, form=config.problem.form,
                    c_range=tuple(config.problem.c_range),
                    constraint_scale=scale)


# ----------------------------------------------------------------------------
# Solvers.


def _optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
  optimizers = {"sgd": optax.sgd, "adam": optax.adam}
  if cfg.name not in optimizers:
    raise ValueError(f"Unknown optimizer {cfg.name!r}; valid: sgd, adam")
  return optimizers[cfg.name](cfg.lr)


def _newton_solver(num_iters: int):
  def solve(upper, lower, batch):
    return solve_relaxed(upper, lower, batch, num_iters=num_iters)
  return solve


def solver_from_config(cfg: ml_collections.ConfigDict
                       ) -> optax.GradientTransformation:
  """The solver of the ``solver`` section by ``cfg.method``.

  ``cfg.method`` is ``'lv_hba'`` or ``'implicit'``:

  ``'lv_hba'``: :func:`bilevel.lv_hba` with SGD(α) on the lower level and
  ``cfg.upper_optimizer`` (SGD or Adam, its own step) on ``c``, followed by
  :func:`feasibility_projection` (``cfg.projection``, ``cfg.upper_box``).
  ``'implicit'``: :func:`bilevel.implicit` with Newton's method
  (:func:`solve_relaxed`, ``cfg.inner_solver == 'newton'``) or
  ``cfg.inner_steps`` steps of ``cfg.inner_optimizer`` as the inner solver.
  """
  if cfg.method == "implicit":
    if cfg.inner_solver == "newton":
      return bilevel.implicit(_optimizer(cfg.upper_optimizer), None, 0,
                              inner_solver=_newton_solver(cfg.inner_steps))
    return bilevel.implicit(_optimizer(cfg.upper_optimizer),
                            _optimizer(cfg.inner_optimizer), cfg.inner_steps)
  if cfg.method != "lv_hba":
    raise ValueError(f"Unknown SVM solver method {cfg.method!r}; valid:"
                     " implicit, lv_hba")
  upper = _optimizer(cfg.upper_optimizer)
  tx = bilevel.lv_hba(
      cfg.num_constraints, alpha=cfg.alpha, beta=cfg.beta, eta=cfg.eta,
      gamma1=cfg.gamma1, gamma2=cfg.gamma2, c=cfg.c, p=cfg.p,
      multiplier_radius=cfg.multiplier_radius, z_radius=cfg.z_radius,
      upper_optimizer=upper)
  box = tuple(cfg.upper_box) if cfg.upper_box else None
  return optax.chain(tx, feasibility_projection(cfg.projection, box))
