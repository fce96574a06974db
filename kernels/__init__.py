"""Pallas kernels for biroute's hot paths.

Each ``kernels/<op>.py`` holds the Pallas body, the public op (``custom_vjp``
where it is differentiated, shape checks, tile sizes in a frozen dataclass)
and ``<op>_reference`` in plain ``jnp``. Kernels depend on nothing of ours.
"""

from kernels.grouped_matmul import GroupedMatmulTiling as GroupedMatmulTiling
from kernels.grouped_matmul import grouped_matmul as grouped_matmul
from kernels.grouped_matmul import (
    grouped_matmul_reference as grouped_matmul_reference,
)
from kernels.grouped_matmul import (
    transposed_grouped_matmul as transposed_grouped_matmul,
)
from kernels.grouped_matmul import (
    transposed_grouped_matmul_reference as transposed_grouped_matmul_reference,
)
from kernels.routed_attention import (
    routed_attention_reference as routed_attention_reference,
)

__all__ = (
    "GroupedMatmulTiling",
    "grouped_matmul",
    "grouped_matmul_reference",
    "routed_attention_reference",
    "transposed_grouped_matmul",
    "transposed_grouped_matmul_reference",
)
