r"""BiP without its implicit-gradient correction (the first-order ablation).

The scores follow ``∇_m ℓ`` alone (alternating first-order updates); all else
as ``bip_cifar10.py``:

  python -m experiments.main \
      --config=experiments/configs/bip_first_order_cifar10.py --workdir=W
"""

from experiments.configs.pruning_common import pruning_config


def get_config(arg=None):
  return pruning_config("bip", arg, correction=False)
