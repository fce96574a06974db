"""The released DARTS and PC-DARTS genotypes, as the official files give them.

Each cell lists two ``(op, input node)`` edges per intermediate node 2–5
(inputs 0 and 1 are the previous two cells) and concatenates nodes 2–5.

References:
  quark0/darts ``cnn/genotypes.py``: ``DARTS_V1`` (first order), ``DARTS_V2``
  (second order; ``DARTS = DARTS_V2``, the paper's 2.76 % / 3.3 M cell).
  yuhuixu1993/PC-DARTS ``genotypes.py``: ``PC_DARTS_cifar`` (the last-epoch
  genotype of a CIFAR-10 search; 2.57 % / 3.6 M) and ``PC_DARTS_image``
  (searched on ImageNet).
"""

from models.darts.genotype import Genotype

_NODES = (2, 3, 4, 5)

DARTS_V1 = Genotype(
    normal=(("sep_conv_3x3", 1), ("sep_conv_3x3", 0),
            ("skip_connect", 0), ("sep_conv_3x3", 1),
            ("skip_connect", 0), ("sep_conv_3x3", 1),
            ("sep_conv_3x3", 0), ("skip_connect", 2)),
    normal_concat=_NODES,
    reduce=(("max_pool_3x3", 0), ("max_pool_3x3", 1),
            ("skip_connect", 2), ("max_pool_3x3", 0),
            ("max_pool_3x3", 0), ("skip_connect", 2),
            ("skip_connect", 2), ("avg_pool_3x3", 0)),
    reduce_concat=_NODES)

DARTS_V2 = Genotype(
    normal=(("sep_conv_3x3", 0), ("sep_conv_3x3", 1),
            ("sep_conv_3x3", 0), ("sep_conv_3x3", 1),
            ("sep_conv_3x3", 1), ("skip_connect", 0),
            ("skip_connect", 0), ("dil_conv_3x3", 2)),
    normal_concat=_NODES,
    reduce=(("max_pool_3x3", 0), ("max_pool_3x3", 1),
            ("skip_connect", 2), ("max_pool_3x3", 1),
            ("max_pool_3x3", 0), ("skip_connect", 2),
            ("skip_connect", 2), ("max_pool_3x3", 1)),
    reduce_concat=_NODES)

PC_DARTS_CIFAR = Genotype(
    normal=(("sep_conv_3x3", 1), ("skip_connect", 0),
            ("sep_conv_3x3", 0), ("dil_conv_3x3", 1),
            ("sep_conv_5x5", 0), ("sep_conv_3x3", 1),
            ("avg_pool_3x3", 0), ("dil_conv_3x3", 1)),
    normal_concat=_NODES,
    reduce=(("sep_conv_5x5", 1), ("max_pool_3x3", 0),
            ("sep_conv_5x5", 1), ("sep_conv_5x5", 2),
            ("sep_conv_3x3", 0), ("sep_conv_3x3", 3),
            ("sep_conv_3x3", 1), ("sep_conv_3x3", 2)),
    reduce_concat=_NODES)

PC_DARTS_IMAGENET = Genotype(
    normal=(("skip_connect", 1), ("sep_conv_3x3", 0),
            ("sep_conv_3x3", 0), ("skip_connect", 1),
            ("sep_conv_3x3", 1), ("sep_conv_3x3", 3),
            ("sep_conv_3x3", 1), ("dil_conv_5x5", 4)),
    normal_concat=_NODES,
    reduce=(("sep_conv_3x3", 0), ("skip_connect", 1),
            ("dil_conv_5x5", 2), ("max_pool_3x3", 1),
            ("sep_conv_3x3", 2), ("sep_conv_3x3", 1),
            ("sep_conv_5x5", 0), ("sep_conv_3x3", 3)),
    reduce_concat=_NODES)

# Their names in the official files.
RELEASED = {
    "DARTS_V1": DARTS_V1,
    "DARTS_V2": DARTS_V2,
    "PC_DARTS_cifar": PC_DARTS_CIFAR,
    "PC_DARTS_image": PC_DARTS_IMAGENET,
}
