"""DARTS / PC-DARTS: the search space, the supernet and genotypes."""

from models.darts.genotype import (
    Genotype,
    derive_cell,
    derive_genotype,
    edge_weights,
)
from models.darts.ops import PRIMITIVES, make_op
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
    "NUM_EDGES",
    "PRIMITIVES",
    "Genotype",
    "MixedOp",
    "SearchCell",
    "SearchConfig",
    "SearchNetwork",
    "channel_shuffle",
    "derive_cell",
    "derive_genotype",
    "edge_weights",
    "make_op",
    "reduction_cells",
)
