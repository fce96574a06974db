r"""LV-HBA on its coupled-equality toy (R7): x* = −0.3·1, F* = 5.

Settings of PerryChuh/LV-HBA ``Toy-example/LLC/LV-HBA-new.py`` (α = 0.005,
β = 0.002, η = 0.03, γ₁ = γ₂ = 10, c_k = (k+1)^0.3, λ ∈ [−1, 1],
z ∈ [0, 1]) with the joint projection onto 1ᵀx + 1ᵀy₁ + 1ᵀy₂ = 0.
Relative x-error about 2 % after 5 000 steps, 1.1 % after 50 000.

Run:

  python -m experiments.main --config=experiments/configs/lv_hba_toy.py \
      --workdir=/tmp/lv_hba_toy

Variants (comma-separated after a colon):
  smoke  a few steps, seconds on a CPU:  ...lv_hba_toy.py:smoke
  long   50 000 steps (the 1.1 % figure)
"""

import ml_collections

from experiments.configs import parse_variants

VARIANTS = ("smoke", "long")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the config; ``arg`` is a comma-separated list of VARIANTS."""
  variants = parse_variants(arg, VARIANTS, "lv_hba_toy")

  config = ml_collections.ConfigDict()
  config.task = "lv_hba_toy"
  config.seed = 0

  # Problem: R7 in n dimensions (x, y₁, y₂ ∈ ℝⁿ), no data.
  config.problem = ml_collections.ConfigDict()
  config.problem.n = 100
  config.problem.dtype = "float32"

  # Solver: bilevel.lv_hba with the fork's hyper-parameters.
  config.solver = ml_collections.ConfigDict()
  config.solver.name = "lv_hba"
  config.solver.num_constraints = 1
  config.solver.alpha = 0.005
  config.solver.beta = 0.002
  config.solver.eta = 0.03
  config.solver.gamma1 = 10.0
  config.solver.gamma2 = 10.0
  config.solver.c = 1.0
  config.solver.p = 0.3
  config.solver.equality = True
  config.solver.multiplier_radius = 1.0
  config.solver.z_radius = 1.0
  config.solver.z_lower = 0.0  # the fork keeps z ≥ 0; None: [−r_z, r_z].
  config.solver.project_joint = "r7"

  # Training loop.
  config.train = ml_collections.ConfigDict()
  config.train.num_steps = 5000
  config.train.log_every = 500
  config.train.checkpoint_every = 1000
  config.train.max_to_keep = 3

  for variant in variants:
    _VARIANT_FNS[variant](config)
  return config


def _smoke(config):
  config.problem.n = 10
  config.train.num_steps = 20
  config.train.log_every = 10
  config.train.checkpoint_every = 10


def _long(config):
  config.train.num_steps = 50_000
  config.train.log_every = 5000
  config.train.checkpoint_every = 10_000


_VARIANT_FNS = {"smoke": _smoke, "long": _long}
