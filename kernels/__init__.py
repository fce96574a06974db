"""Pallas kernels for biroute's hot paths.

Each ``kernels/<op>.py`` holds the public op (``custom_vjp`` where it is
differentiated, shape checks, padding, tile sizes in a frozen dataclass) and
``<op>_reference`` in plain ``jnp``; the Pallas bodies of its lowerings live
beside it in private modules, ``_<op>_gpu.py`` (Triton) and ``_<op>_tpu.py``
(Mosaic), with ``_<op>_common.py`` for what they share. Kernels depend on
nothing of ours.
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
    RoutedAttentionTiling as RoutedAttentionTiling,
)
from kernels.routed_attention import routed_attention as routed_attention
from kernels.routed_attention import (
    routed_attention_reference as routed_attention_reference,
)

__all__ = (
    "GroupedMatmulTiling",
    "grouped_matmul",
    "grouped_matmul_reference",
    "RoutedAttentionTiling",
    "routed_attention",
    "routed_attention_reference",
    "transposed_grouped_matmul",
    "transposed_grouped_matmul_reference",
)
