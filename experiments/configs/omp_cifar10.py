r"""One-shot magnitude pruning (OMP) on CIFAR-10: pretrain → prune → finetune.

  python -m experiments.main --config=experiments/configs/omp_cifar10.py \
      --workdir=W [--config.sparsity=0.95]
"""

from experiments.configs.pruning_common import pruning_config


def get_config(arg=None):
  return pruning_config("omp", arg)
