r"""Iterative magnitude pruning with weight rewinding (IMP) on CIFAR-10.

Rounds of 20 % of the surviving weights, weights rewound to the pretrained
model each round; rounds that reach ``imp.targets`` (default 90 % and 95 %)
are evaluated:

  python -m experiments.main --config=experiments/configs/imp_cifar10.py \
      --workdir=W
"""

from experiments.configs.pruning_common import pruning_config


def get_config(arg=None):
  return pruning_config("imp", arg)
