"""DARTS / PC-DARTS: the search space, the supernet and genotypes."""

from models.darts.genotype import (
    Genotype,
    derive_cell,
    derive_genotype,
    edge_weights,
)
from models.darts.network import (
    AuxiliaryHead,
    EvalCell,
    EvalNetwork,
    count_params,
    drop_path,
)
from models.darts.ops import PRIMITIVES, make_op
from models.darts.released import (
    DARTS_V1,
    DARTS_V2,
    PC_DARTS_CIFAR,
    PC_DARTS_IMAGENET,
    RELEASED,
)
from models.darts.search import (
    NUM_EDGES,
    MixedOp,
    SearchCell,
    SearchConfig,
    SearchNetwork,
    channel_shuffle,
    reduction_cells,
)

__all__ = (
    "DARTS_V1",
    "DARTS_V2",
    "NUM_EDGES",
    "PC_DARTS_CIFAR",
    "PC_DARTS_IMAGENET",
    "PRIMITIVES",
    "RELEASED",
    "AuxiliaryHead",
    "EvalCell",
    "EvalNetwork",
    "Genotype",
    "MixedOp",
    "SearchCell",
    "SearchConfig",
    "SearchNetwork",
    "channel_shuffle",
    "count_params",
    "derive_cell",
    "derive_genotype",
    "drop_path",
    "edge_weights",
    "make_op",
    "reduction_cells",
)
