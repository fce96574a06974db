r"""BiP on CIFAR-10: pretrain → prune (BiP) → finetune.

  python -m experiments.main --config=experiments/configs/bip_cifar10.py \
      --workdir=/tmp/bip [--config.sparsity=0.95] \
      [--config.pretrain.workdir=/tmp/dense]   # share the dense model
  python -m experiments.main --config=experiments/configs/bip_cifar10.py \
      --workdir=/tmp/bip --mode=eval           # sparsity and accuracy

``--config.finetune.num_steps=0`` skips the finetune. Variants and the
shared schedule: ``experiments/configs/pruning_common.py``.
"""

from experiments.configs.pruning_common import pruning_config


def get_config(arg=None):
  return pruning_config("bip", arg)
