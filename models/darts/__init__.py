"""DARTS / PC-DARTS: the search space, the supernet and genotypes."""

from models.darts.functional import channel_shuffle
from models.darts.genotype import (
    Genotype,
    derive_cell,
    derive_genotype,
    edge_weights,
)
from models.darts.ops import PRIMITIVES, UniformSource, make_op
from models.darts.search import (
    CELL_KINDS,
    NUM_EDGES,
    STEPS,
    EdgeStack,
    SearchCell,
    SearchConfig,
    SearchNetwork,
    edge_weights_of,
    node_edges,
    op_weights_of,
    reduction_cells,
)

__all__ = (
    "CELL_KINDS",
    "NUM_EDGES",
    "PRIMITIVES",
    "STEPS",
    "EdgeStack",
    "Genotype",
    "SearchCell",
    "SearchConfig",
    "SearchNetwork",
    "UniformSource",
    "channel_shuffle",
    "derive_cell",
    "derive_genotype",
    "edge_weights",
    "edge_weights_of",
    "make_op",
    "node_edges",
    "op_weights_of",
    "reduction_cells",
)
