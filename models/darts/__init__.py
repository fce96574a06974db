"""DARTS / PC-DARTS / GM-NAS: the search space, the supernet, genotypes,
the derived evaluation network and few-shot splitting."""

from models.darts.drawing import draw_cell, draw_genotype
from models.darts.functional import channel_shuffle, kernels
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
from models.darts.ops import PRIMITIVES, UniformSource, make_op
from models.darts.released import (
    DARTS_V1,
    DARTS_V2,
    PC_DARTS_CIFAR,
    PC_DARTS_IMAGENET,
    RELEASED,
)
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
    num_edges,
    op_weights_of,
    reduction_cells,
    steps_of,
)

__all__ = (
    "CELL_KINDS",
    "DARTS_V1",
    "DARTS_V2",
    "NUM_EDGES",
    "PC_DARTS_CIFAR",
    "PC_DARTS_IMAGENET",
    "PRIMITIVES",
    "RELEASED",
    "STEPS",
    "AuxiliaryHead",
    "EdgeStack",
    "EvalCell",
    "EvalNetwork",
    "Genotype",
    "SearchCell",
    "SearchConfig",
    "SearchNetwork",
    "UniformSource",
    "channel_shuffle",
    "draw_cell",
    "draw_genotype",
    "count_params",
    "derive_cell",
    "derive_genotype",
    "drop_path",
    "edge_weights",
    "edge_weights_of",
    "kernels",
    "make_op",
    "node_edges",
    "num_edges",
    "op_weights_of",
    "steps_of",
    "reduction_cells",
)
