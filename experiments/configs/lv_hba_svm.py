r"""LV-HBA on linear-SVM hyper-parameter optimisation and data hyper-cleaning.

Upper level: one log-weight cᵢ per training example; lower level: the
soft-margin SVM (w, b, ξ) with per-example margin constraints; outer loss: a
smoothed validation 0-1 error (experiments/tasks/svm_problem.py). Default:
scikit-learn's breast-cancer set (300 / 120 / 149), clean labels, LV-HBA.

Run (from the repository root, no download):

  python -m experiments.main --config=experiments/configs/lv_hba_svm.py \
      --workdir=/tmp/lv_hba_svm

Variants (comma-separated after a colon):
  smoke     a few steps, seconds on a CPU:  ...lv_hba_svm.py:smoke
  cleaning  40 % of the training labels flipped (data hyper-cleaning)
  cifar10   airplane vs automobile, CIFAR-10 (JPEG) 8x8x3 average-pooled:
            ...lv_hba_svm.py:cifar10 (data/cifar10 by default, written by
            python -m experiments.data_prepare cifar10 --source=...)
  implicit  baseline: implicit differentiation (Newton inner solver) on the
            relaxed (squared-hinge) lower level

The grid-search baseline (one shared c) is
experiments.tasks.svm_solvers.grid_search, run by
experiments/benchmarks/lv_hba_svm_table.py with every method.
"""

import ml_collections

from experiments.configs import parse_variants

VARIANTS = ("smoke", "cleaning", "cifar10", "implicit")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the config; ``arg`` is a comma-separated list of VARIANTS."""
  variants = parse_variants(arg, VARIANTS, "lv_hba_svm")

  config = ml_collections.ConfigDict()
  config.task = "lv_hba_svm"
  config.seed = 0

  # Data: labels ±1, features standardized with training statistics.
  config.data = ml_collections.ConfigDict()
  config.data.name = "breast_cancer"
  config.data.data_dir = ""
  config.data.num_train = 300
  config.data.num_val = 120
  config.data.num_test = 149
  config.data.noise_rate = 0.0  # (b); 0.4 is hyper-cleaning (c).
  config.data.classes = (0, 1)  # CIFAR-10 only: airplane (−1), automobile.
  config.data.pool = 4  # CIFAR-10 only: 32x32 -> 8x8 average pooling.

  # Problem: 'constrained' (w, b, ξ) for LV-HBA, 'relaxed' (w, b) else.
  config.problem = ml_collections.ConfigDict()
  config.problem.form = "constrained"
  config.problem.c_range = (-6.0, -5.0)  # c ~ U(c_range), official.
  config.problem.constraint_scale = 0.0  # 0: 1/sqrt(num_train).

  # Solver (registry name 'lv_hba_svm'; method picks the algorithm).
  config.solver = ml_collections.ConfigDict()
  config.solver.name = "lv_hba_svm"
  config.solver.method = "lv_hba"
  config.solver.num_constraints = config.data.get_ref("num_train")
  config.solver.alpha = 0.01
  config.solver.beta = 0.1
  # η = 0.01 (official): the (θ, λ) descent–ascent step is stable for
  # η < 2μ/(μ² + s²σ²) ≈ 2/(1 + 72) on CIFAR (s²σ² = λ_max(Z̃ᵀZ̃)/N = 72;
  # 13 on breast cancer); η = 0.1 made CIFAR (b) diverge.
  config.solver.eta = 0.01
  config.solver.gamma1 = 1.0
  config.solver.gamma2 = 1.0
  config.solver.c = 10.0
  config.solver.p = 0.3
  config.solver.multiplier_radius = 1e3
  config.solver.z_radius = 1e3
  # Π_C onto the margin constraints, exact (as the official cvxpy QP); the
  # old 'slack' (ξ ← max(ξ, 1 − m)) leaves w free to shrink under ∇_w f,
  # far from the lower-level solution set. Also 'polyhedron' (Dykstra), 'none'.
  config.solver.projection = "exact"
  config.solver.upper_box = (-12.0, 4.0)
  # SGD on c as in Alg. 1, but with its own step: d_c = ½e^c(ξ_y² − ξ_θ²)
  # is ~1e-7 at c ≈ −6 (α = 0.01 leaves c inert); Adam normalises each
  # coordinate and turns that noise into sign steps (AUROC ≈ 0.5).
  config.solver.upper_optimizer = ml_collections.ConfigDict(
      {"name": "sgd", "lr": 3e3})
  # Implicit baseline only.
  config.solver.inner_solver = "newton"  # or 'optax' (inner_optimizer).
  config.solver.inner_steps = 10
  config.solver.inner_optimizer = ml_collections.ConfigDict(
      {"name": "sgd", "lr": 0.01})

  # Training loop.
  config.train = ml_collections.ConfigDict()
  config.train.num_steps = 500
  config.train.log_every = 100
  config.train.checkpoint_every = 500
  config.train.max_to_keep = 1

  for variant in variants:
    _VARIANT_FNS[variant](config)
  return config


def _smoke(config):
  config.train.num_steps = 10
  config.train.log_every = 5
  config.train.checkpoint_every = 5


def _cleaning(config):
  config.data.noise_rate = 0.4


def _cifar10(config):
  config.data.name = "cifar10"
  config.data.data_dir = "data/cifar10"
  config.data.num_train = 2000
  config.data.num_val = 500
  config.data.num_test = 2000


def _implicit(config):
  config.problem.form = "relaxed"
  config.solver.method = "implicit"
  config.solver.upper_optimizer = ml_collections.ConfigDict(
      {"name": "adam", "lr": 0.1})
  config.train.num_steps = 200


_VARIANT_FNS = {"smoke": _smoke, "cleaning": _cleaning, "cifar10": _cifar10,
                "implicit": _implicit}
