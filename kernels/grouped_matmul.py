"""Grouped matmul (``jax.lax.ragged_dot`` semantics) as Pallas kernels.

The rows of ``lhs [M, K]`` are sorted by group: group ``g`` owns rows
``[o_g, o_{g+1})`` with ``o_0 = 0`` and ``o_{g+1} = min(o_g + s_g, M)`` for the
sizes ``s = group_sizes`` (negative sizes count as 0). Then

    out[i] = lhs[i] @ rhs[g]   for o_g ≤ i < o_{g+1},
    out[i] = 0                 for o_G ≤ i < M  (rows in no group).

So sizes summing to less than ``M`` leave zero trailing rows (the padding
slots of a dropless MoE dispatch), and sizes summing to more than ``M`` are
cut at row ``M``. The backward pass is

    dlhs = grouped_matmul(dout, rhsᵀ),   drhs[g] = lhs_gᵀ dout_g,

the second being the transposed grouped matmul (``tgmm``) that reduces over
the rows of each group and gives zeros for empty groups.

Two lowerings share the group offsets, computed in plain ``jnp`` here; their
kernels live in the private modules named below:

* ``"triton"`` (NVIDIA GPU, Pallas Triton, ``_grouped_matmul_gpu``): a grid
  over (row tile, column tile); a row tile may straddle group boundaries, so
  each program loops over the groups that intersect its rows and keeps each
  group's rows with a mask. ``tgmm`` has a grid over (group, K tile, N tile)
  and loops over the row tiles of its group. Tiles must be powers of two and
  at least 16 (``tl.dot``).
* ``"mosaic_tpu"`` (TPU, Mosaic, ``_grouped_matmul_tpu``): megablox-style
  metadata passed by scalar prefetch; a sequential grid axis enumerates (row
  tile, group) work items so that revisits of an output tile are consecutive
  and accumulate in VMEM. Tiles must satisfy Mosaic's (8, 128) layout (16
  rows for bf16).

Both run on CPU with ``interpret=True`` (the default when the default backend
is the CPU), which is how the tests cover them; neither lowering was compiled
for a real GPU or TPU here. Inputs are zero-padded to tile multiples, outputs
sliced back. Products accumulate in float32 whatever the input dtype; the
output has the promoted input dtype.

References:
  Gale et al., "MegaBlocks: Efficient Sparse Training with Mixture-of-Experts",
  MLSys 2023 (grouped GEMMs for dropless MoE); JAX's
  ``jax.experimental.pallas.ops.tpu.megablox`` (the TPU metadata scheme).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

from kernels import _grouped_matmul_gpu, _grouped_matmul_tpu, _lowering
from kernels._lowering import IMPLEMENTATIONS as IMPLEMENTATIONS

_LOWERINGS = {"triton": _grouped_matmul_gpu, "mosaic_tpu": _grouped_matmul_tpu}
_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class GroupedMatmulTiling:
  """Tile sizes of the grouped matmul kernels.

  ``block_k`` tiles the contraction of the forward product and ``block_n``
  its output columns; the backward ``dlhs`` product swaps their roles, so the
  padded shapes stay the same.

  Attributes:
    block_m: rows of ``lhs`` per tile.
    block_k: columns of ``lhs`` (rows of ``rhs[g]``) per tile.
    block_n: columns of ``rhs[g]`` and of the output per tile.
    num_warps: Triton warps per program (GPU only). A program holds two
      ``[block_m, block_n]`` float32 tiles (a group's sum and the output).
    num_stages: Triton software-pipelining stages (GPU only).

  The defaults are untuned starting points that satisfy both lowerings.
  """

  block_m: int = 128
  block_k: int = 128
  block_n: int = 128
  num_warps: int = 8
  num_stages: int = 2

  def __post_init__(self):
    for name in ("block_m", "block_k", "block_n", "num_warps", "num_stages"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive int")


# ------------------------------ metadata (jnp) ------------------------------


def _group_offsets(group_sizes: jax.Array, m: int) -> jax.Array:
  """``o [G + 1]``: group ``g`` owns rows ``[o[g], o[g + 1])``, cut at ``m``."""
  ends = jnp.minimum(jnp.cumsum(jnp.maximum(group_sizes, 0)), m)
  return jnp.concatenate([jnp.zeros(1, jnp.int32), ends.astype(jnp.int32)])


def _pad_to(x: jax.Array, multiples: tuple[int, ...]) -> jax.Array:
  pads = [(0, -d % b) for d, b in zip(x.shape, multiples)]
  return jnp.pad(x, pads) if any(hi for _, hi in pads) else x


# ------------------------------ public ops ----------------------------------


def _check(lhs, rhs, group_sizes, rhs_ndim: int, name: str) -> None:
  """Raises ``ValueError`` naming the shapes when they do not fit together."""
  if lhs.ndim != 2 or rhs.ndim != rhs_ndim:
    want = "[G, K, N]" if rhs_ndim == 3 else "[M, N]"
    raise ValueError(f"{name} needs lhs [M, K] and rhs {want}, got "
                     f"{lhs.shape=} and {rhs.shape=}")
  if rhs_ndim == 3 and lhs.shape[1] != rhs.shape[1]:
    raise ValueError(f"{name}: lhs [M, K] and rhs [G, K, N] disagree on K: "
                     f"{lhs.shape=}, {rhs.shape=}")
  if rhs_ndim == 2 and lhs.shape[0] != rhs.shape[0]:
    raise ValueError(f"{name}: lhs [M, K] and rhs [M, N] disagree on M: "
                     f"{lhs.shape=}, {rhs.shape=}")
  if group_sizes.ndim != 1 or (
      rhs_ndim == 3 and group_sizes.shape[0] != rhs.shape[0]):
    want = f"[G] = ({rhs.shape[0]},)" if rhs_ndim == 3 else "[G]"
    raise ValueError(f"{name}: group_sizes must be {want}, one size per "
                     f"group, got {group_sizes.shape=} with {rhs.shape=}")
  if not jnp.issubdtype(group_sizes.dtype, jnp.integer):
    raise ValueError(f"{name}: group_sizes must be integers, got "
                     f"{group_sizes.dtype=}")


def _resolve(tiling, interpret, implementation) -> tuple[bool, str]:
  """Defaults for ``interpret`` and ``implementation``; checks the tiles."""
  interpret, implementation = _lowering.resolve(interpret, implementation)
  blocks = (tiling.block_m, tiling.block_k, tiling.block_n)
  if implementation == "triton" and not interpret and any(
      b < 16 or b & (b - 1) for b in blocks):
    # Triton tensors are powers of two and tl.dot needs 16 per side.
    raise ValueError(f"Triton tiles must be powers of two >= 16: {tiling=}")
  return interpret, implementation


def _gmm(lhs, rhs, group_sizes, tiling, transpose_rhs, interpret, impl):
  """Pads to tiles, runs the kernel, slices: ``[M, N]`` (``rhs`` transposed:
  ``[G, N, K]`` read as ``[G, K, N]``)."""
  (m, _), n = lhs.shape, rhs.shape[1 if transpose_rhs else 2]
  dtype = jnp.result_type(lhs, rhs)
  tm, tk, tn = tiling.block_m, tiling.block_k, tiling.block_n
  lhs = _pad_to(lhs.astype(dtype), (tm, tk))
  rhs = _pad_to(rhs.astype(dtype), (1, tn, tk) if transpose_rhs else
                (1, tk, tn))
  offsets = _group_offsets(group_sizes, m)
  run = _LOWERINGS[impl].gmm
  return run(lhs, rhs, offsets, tiling, transpose_rhs, interpret)[:m, :n]


def _tgmm(lhs, dy, group_sizes, tiling, interpret, impl):
  (m, k), n = lhs.shape, dy.shape[1]
  dtype = jnp.result_type(lhs, dy)
  tm, tk, tn = tiling.block_m, tiling.block_k, tiling.block_n
  lhs = _pad_to(lhs.astype(dtype), (tm, tk))
  dy = _pad_to(dy.astype(dtype), (tm, tn))
  offsets = _group_offsets(group_sizes, m)
  run = _LOWERINGS[impl].tgmm
  return run(lhs, dy, offsets, tiling, interpret)[:, :k, :n]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _grouped_matmul(lhs, rhs, group_sizes, tiling, interpret, impl):
  return _gmm(lhs, rhs, group_sizes, tiling, False, interpret, impl)


def _grouped_matmul_fwd(lhs, rhs, group_sizes, tiling, interpret, impl):
  out = _gmm(lhs, rhs, group_sizes, tiling, False, interpret, impl)
  return out, (lhs, rhs, group_sizes)


def _grouped_matmul_bwd(tiling, interpret, impl, residuals, dout):
  lhs, rhs, group_sizes = residuals
  swapped = dataclasses.replace(tiling, block_k=tiling.block_n,
                                block_n=tiling.block_k)
  dlhs = _gmm(dout, rhs, group_sizes, swapped, True, interpret, impl)
  drhs = _tgmm(lhs, dout, group_sizes, tiling, interpret, impl)
  return dlhs.astype(lhs.dtype), drhs.astype(rhs.dtype), None


_grouped_matmul.defvjp(_grouped_matmul_fwd, _grouped_matmul_bwd)


@functools.partial(
    jax.jit, static_argnames=("tiling", "interpret", "implementation"))
def grouped_matmul(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    tiling: GroupedMatmulTiling = GroupedMatmulTiling(),
    interpret: bool | None = None,
    implementation: str | None = None,
) -> jax.Array:
  """Grouped matmul ``out[i] = lhs[i] @ rhs[g(i)]`` as a Pallas kernel.

  ``g(i)`` is the group owning row ``i`` (rows sorted by group, see the module
  docstring); rows past ``sum(group_sizes)`` are zero. Same values as
  ``jax.lax.ragged_dot(lhs, rhs, group_sizes)``. Differentiable in ``lhs`` and
  ``rhs`` (``custom_vjp``: ``dlhs = grouped_matmul(dout, rhsᵀ)``,
  ``drhs = transposed_grouped_matmul(lhs, dout)``), once.

  Args:
    lhs: [M, K] rows sorted by group.
    rhs: [G, K, N] one matrix per group.
    group_sizes: [G] integer rows per group (``int32``).
    tiling: tile sizes; inputs are zero-padded to their multiples.
    interpret: run the kernel in the Pallas interpreter; ``None``: when the
      default backend is the CPU.
    implementation: ``"triton"`` (GPU) or ``"mosaic_tpu"``; ``None``:
      ``"mosaic_tpu"`` on a TPU backend, else ``"triton"``.

  Returns:
    [M, N] in ``result_type(lhs, rhs)``, accumulated in float32.

  Raises:
    ValueError: shapes that do not fit together (named in the message),
      ``group_sizes`` of the wrong length or dtype, unknown implementation.
  """
  _check(lhs, rhs, group_sizes, 3, "grouped_matmul")
  interpret, implementation = _resolve(tiling, interpret, implementation)
  (m, k), (num_groups, _, n) = lhs.shape, rhs.shape
  if 0 in (m, k, n, num_groups):  # No zero-size grids in Pallas.
    return jnp.zeros((m, n), jnp.result_type(lhs, rhs))
  return _grouped_matmul(lhs, rhs, group_sizes.astype(jnp.int32), tiling,
                         interpret, implementation)


@functools.partial(
    jax.jit, static_argnames=("tiling", "interpret", "implementation"))
def transposed_grouped_matmul(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    tiling: GroupedMatmulTiling = GroupedMatmulTiling(),
    interpret: bool | None = None,
    implementation: str | None = None,
) -> jax.Array:
  """Per-group products over the rows, ``out[g] = lhs_gᵀ rhs_g`` (``tgmm``).

  ``lhs_g``, ``rhs_g`` are the rows ``[o_g, o_{g+1})`` of each; empty groups
  give zeros. This is the weight gradient of :func:`grouped_matmul`; it is not
  differentiable itself.

  Args:
    lhs: [M, K] rows sorted by group.
    rhs: [M, N] rows sorted by group.
    group_sizes: [G] integer rows per group.
    tiling: tile sizes (``block_m`` tiles the reduced rows).
    interpret: as in :func:`grouped_matmul`.
    implementation: as in :func:`grouped_matmul`.

  Returns:
    [G, K, N] in ``result_type(lhs, rhs)``, accumulated in float32.

  Raises:
    ValueError: shapes that do not fit together, or non-integer sizes.
  """
  _check(lhs, rhs, group_sizes, 2, "transposed_grouped_matmul")
  interpret, implementation = _resolve(tiling, interpret, implementation)
  (m, k), n, num_groups = lhs.shape, rhs.shape[1], group_sizes.shape[0]
  if 0 in (m, k, n, num_groups):
    return jnp.zeros((num_groups, k, n), jnp.result_type(lhs, rhs))
  return _tgmm(lhs, rhs, group_sizes.astype(jnp.int32), tiling, interpret,
               implementation)


def _group_mask(group_sizes: jax.Array, m: int) -> jax.Array:
  """``[G, M]``: whether row ``i`` belongs to group ``g``."""
  offsets = _group_offsets(group_sizes.astype(jnp.int32), m)
  rows = jnp.arange(m)[None, :]
  return (rows >= offsets[:-1, None]) & (rows < offsets[1:, None])


def grouped_matmul_reference(lhs: jax.Array, rhs: jax.Array,
                             group_sizes: jax.Array) -> jax.Array:
  """Plain-``jnp`` :func:`grouped_matmul`: ``Σ_g mask_g ⊙ (lhs @ rhs[g])``.

  Materialises ``[G, M, K]``, so ``G×`` the work: an oracle, not a fast path.

  Args:
    lhs: [M, K].
    rhs: [G, K, N].
    group_sizes: [G] integer.

  Returns:
    [M, N] in ``result_type(lhs, rhs)``, accumulated in float32.
  """
  _check(lhs, rhs, group_sizes, 3, "grouped_matmul_reference")
  dtype = jnp.result_type(lhs, rhs)
  mask = _group_mask(group_sizes, lhs.shape[0])
  lhs_g = jnp.where(mask[:, :, None], lhs.astype(dtype)[None], 0)
  out = jnp.einsum("gmk,gkn->mn", lhs_g, rhs.astype(dtype),
                   preferred_element_type=_F32)
  return out.astype(dtype)


def transposed_grouped_matmul_reference(lhs: jax.Array, rhs: jax.Array,
                                        group_sizes: jax.Array) -> jax.Array:
  """Plain-``jnp`` :func:`transposed_grouped_matmul`.

  Args:
    lhs: [M, K].
    rhs: [M, N].
    group_sizes: [G] integer.

  Returns:
    [G, K, N] with ``out[g] = Σ_{i ∈ g} lhs[i]ᵀ rhs[i]``, in
    ``result_type(lhs, rhs)``, accumulated in float32.
  """
  _check(lhs, rhs, group_sizes, 2, "transposed_grouped_matmul_reference")
  dtype = jnp.result_type(lhs, rhs)
  mask = _group_mask(group_sizes, lhs.shape[0])[:, :, None]
  lhs_g = jnp.where(mask, lhs.astype(dtype)[None], 0)
  rhs_g = jnp.where(mask, rhs.astype(dtype)[None], 0)
  out = jnp.einsum("gmk,gmn->gkn", lhs_g, rhs_g, preferred_element_type=_F32)
  return out.astype(dtype)
