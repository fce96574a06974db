r"""Linear-SVM hyper-parameter optimisation and data hyper-cleaning (LV-HBA §5).

The task and config glue of the registry's ``'lv_hba_svm'`` entries: the
binary splits (:func:`make_data`, breast cancer or two CIFAR-10 classes,
labels partly flipped), the :class:`~experiments.task.Task` over the
bilevel problem of :mod:`experiments.tasks.svm_problem` (constrained for LV-HBA,
relaxed for implicit differentiation) and the solvers of the ``solver``
config section, with the Newton inner solver and feasibility projections
of :mod:`experiments.tasks.svm_solvers`.

References:
  Yao, Yu, Zeng, Zhang, "Constrained Bi-Level Optimization: Proximal
  Lagrangian Value function Approach and Hessian-free Algorithm", ICLR 2024,
  §5 (SVM hyper-parameter optimisation and data hyper-cleaning).
"""

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

import bilevel
from experiments import data as data_lib
from experiments import evaluation, registry
from experiments.task import Task
from experiments.tasks import svm_problem, svm_solvers

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
) -> svm_problem.SVMData:
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
    The :class:`svm_problem.SVMData`.
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
  return svm_problem.SVMData(
      scale(train_x), sign(noisy), sign(train_y), flipped, scale(val_x),
      sign(val_y), scale(test_x), sign(test_y))


# ----------------------------------------------------------------------------
# The task.


def init_params(key: jax.Array, data: svm_problem.SVMData, *, form: str,
                c_range: tuple[float, float] = (-6.0, -5.0)
                ) -> bilevel.Params:
  """``c ~ U(c_range)`` (official: U(−6, −5)); lower at the relaxed optimum.

  Every method starts from the lower-level solution at the initial ``c``
  (``w, b`` by :func:`svm_solvers.solve_relaxed`, ``ξ = max(0, 1 − m)``), so
  the comparison is about the upper level.

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
  lower = jax.jit(svm_solvers.solve_relaxed)(
      upper, {"w": jnp.zeros(d), "b": jnp.zeros([])}, batch)
  if form == "constrained":
    lower = {**lower, "xi": svm_solvers.optimal_slacks(lower, batch)}
  elif form != "relaxed":
    raise ValueError(f"Unknown SVM form {form!r}; valid: constrained, relaxed")
  return bilevel.Params(upper, lower)


def build_task(key: jax.Array, data: svm_problem.SVMData, *, form: str,
               c_range: tuple[float, float] = (-6.0, -5.0),
               constraint_scale: float = 1.0) -> Task:
  """The SVM task: full-batch train (inner) and validation (outer) batches.

  Args:
    key: PRNG key (initial ``c``).
    data: the splits from :func:`make_data`.
    form: ``'constrained'`` (:data:`svm_problem.CONSTRAINED`, for LV-HBA)
      or ``'relaxed'`` (:data:`svm_problem.RELAXED`, for implicit
      differentiation).
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
  problem = svm_problem.RELAXED
  if form == "constrained":
    problem = svm_problem.CONSTRAINED._replace(
        constraints=svm_problem.scaled_constraints(constraint_scale))
  return Task(problem, params, lambda step: batches,
              functools.partial(evaluate, data, problem))


@functools.partial(jax.jit, static_argnums=0)
def _metrics(problem, params, arrays):
  lower = params.lower
  accuracy = svm_problem.accuracy
  out = {"val_accuracy": accuracy(lower, arrays["val_x"], arrays["val_y"]),
         "test_accuracy": accuracy(lower, arrays["test_x"], arrays["test_y"])}
  if problem.constraints is not None:
    train = {"x": arrays["train_x"], "y": arrays["train_y"]}
    out["max_violation"] = jnp.max(problem.constraints(
        params.upper, lower, train))
  return out


def evaluate(data: svm_problem.SVMData, problem: bilevel.Problem,
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
                     ) -> svm_problem.SVMData:
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


def _newton_solver(num_iters: int):
  def solve(upper, lower, batch):
    return svm_solvers.solve_relaxed(upper, lower, batch, num_iters=num_iters)
  return solve


def solver_from_config(cfg: ml_collections.ConfigDict
                       ) -> optax.GradientTransformation:
  """The solver of the ``solver`` section by ``cfg.method``.

  ``cfg.method`` is ``'lv_hba'`` or ``'implicit'``:

  ``'lv_hba'``: :func:`bilevel.lv_hba` with SGD(α) on the lower level and
  ``cfg.upper_optimizer`` (e.g. SGD or Adam with its own step, from
  :func:`experiments.registry.build_optimizer`) on ``c``, followed by
  :func:`svm_solvers.feasibility_projection` (``cfg.projection``,
  ``cfg.upper_box``).
  ``'implicit'``: :func:`bilevel.implicit` with Newton's method
  (:func:`svm_solvers.solve_relaxed`, ``cfg.inner_solver == 'newton'``) or
  ``cfg.inner_steps`` steps of ``cfg.inner_optimizer`` as the inner solver.
  """
  if cfg.method == "implicit":
    upper = registry.build_optimizer(cfg.upper_optimizer)
    if cfg.inner_solver == "newton":
      return bilevel.implicit(upper, None, 0,
                              inner_solver=_newton_solver(cfg.inner_steps))
    return bilevel.implicit(upper,
                            registry.build_optimizer(cfg.inner_optimizer),
                            cfg.inner_steps)
  if cfg.method != "lv_hba":
    raise ValueError(f"Unknown SVM solver method {cfg.method!r}; valid:"
                     " implicit, lv_hba")
  upper = registry.build_optimizer(cfg.upper_optimizer)
  tx = bilevel.lv_hba(
      cfg.num_constraints, alpha=cfg.alpha, beta=cfg.beta, eta=cfg.eta,
      gamma1=cfg.gamma1, gamma2=cfg.gamma2, c=cfg.c, p=cfg.p,
      multiplier_radius=cfg.multiplier_radius, z_radius=cfg.z_radius,
      upper_optimizer=upper)
  box = tuple(cfg.upper_box) if cfg.upper_box else None
  project = svm_solvers.feasibility_projection(cfg.projection, box)
  return optax.chain(tx, project)
