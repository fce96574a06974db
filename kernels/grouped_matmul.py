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

Two lowerings share the group offsets, computed in plain ``jnp``:

* ``"triton"`` (NVIDIA GPU, Pallas Triton): a grid over (row tile, column
  tile); a row tile may straddle group boundaries, so each program loops over
  the groups that intersect its rows and keeps each group's rows with a mask.
  ``tgmm`` has a grid over (group, K tile, N tile) and loops over the row
  tiles of its group. Tiles must be powers of two and at least 16 (``tl.dot``).
* ``"mosaic_tpu"`` (TPU, Mosaic): megablox-style metadata passed by scalar
  prefetch; a sequential grid axis enumerates (row tile, group) work items so
  that revisits of an output tile are consecutive and accumulate in VMEM.
  Tiles must satisfy Mosaic's (8, 128) layout (16 rows for bf16).

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
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

IMPLEMENTATIONS = ("triton", "mosaic_tpu")
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


def _tile_groups(offsets: jax.Array, num_tiles: int, tm: int):
  """First and last group intersecting each row tile, ``[T]`` each.

  ``last < first`` marks a tile past the last group; empty groups between the
  two are visited too, harmlessly, since their mask is empty.
  """
  ends, num_groups = offsets[1:], offsets.shape[0] - 1
  start = jnp.arange(num_tiles, dtype=jnp.int32) * tm
  # searchsorted(ends, r, "right") is the group that owns row r.
  group_of = lambda r: jnp.searchsorted(ends, r, side="right").astype(jnp.int32)
  first = jnp.minimum(group_of(start), num_groups - 1)
  last_row = jnp.minimum(start + tm, offsets[-1]) - 1
  last = jnp.minimum(group_of(last_row), num_groups - 1)
  return first, jnp.where(start < offsets[-1], last, first - 1)


class _WorkList(NamedTuple):
  """Sequential (group, row tile) work items of the TPU kernels, ``[W]``."""

  group_ids: jax.Array
  tile_ids: jax.Array
  num_work: jax.Array  # [1]: items past it are padding, skipped


def _expand(visits, first_other, max_owner: int, max_other: int, size: int):
  """``visits[o]`` consecutive items per owner ``o`` (a tile or a group).

  Item ``j`` of owner ``o`` pairs it with ``first_other[o] + j``. The ``size``
  items past ``sum(visits)`` repeat the last owner, so on TPU they never move
  the output block.
  """
  ends = jnp.cumsum(visits)
  item = jnp.arange(size, dtype=jnp.int32)
  owner = jnp.minimum(jnp.searchsorted(ends, item, side="right"), max_owner)
  other = jnp.clip(first_other[owner] + item - (ends - visits)[owner], 0,
                   max_other)
  return (owner.astype(jnp.int32), other.astype(jnp.int32),
          ends[-1:].astype(jnp.int32))


def _gmm_work_list(offsets, num_tiles: int, tm: int) -> _WorkList:
  """Tile-major items: each row tile once per group it meets, at least once.

  With ``T`` tiles and ``G`` groups there are at most ``T + G - 1`` items,
  since consecutive tiles share at most their boundary group.
  """
  num_groups = offsets.shape[0] - 1
  first, last = _tile_groups(offsets, num_tiles, tm)
  visits = jnp.maximum(last - first + 1, 1)
  tiles, groups, num_work = _expand(visits, first, num_tiles - 1,
                                    num_groups - 1, num_tiles + num_groups - 1)
  return _WorkList(groups, tiles, num_work)


def _tgmm_work_list(offsets, num_tiles: int, tm: int) -> _WorkList:
  """Group-major items: each group once per row tile it meets, at least once
  (so that an empty group writes its zero gradient); at most ``T + G - 1``."""
  num_groups = offsets.shape[0] - 1
  start, end = offsets[:-1], offsets[1:]
  first = jnp.minimum(start // tm, num_tiles - 1)
  visits = jnp.where(end > start, (end - 1) // tm - first + 1, 1)
  groups, tiles, num_work = _expand(visits, first, num_groups - 1,
                                    num_tiles - 1, num_tiles + num_groups - 1)
  return _WorkList(groups, tiles, num_work)


def _pad_to(x: jax.Array, multiples: tuple[int, ...]) -> jax.Array:
  pads = [(0, -d % b) for d, b in zip(x.shape, multiples)]
  return jnp.pad(x, pads) if any(hi for _, hi in pads) else x


def _rows_in(t, start, end, tm, cols):
  """``[tm, cols]`` mask of the rows of tile ``t`` in ``[start, end)``."""
  rows = t * tm + lax.broadcasted_iota(jnp.int32, (tm, cols), 0)
  return (rows >= start) & (rows < end)


def _dot(x, w, contract: tuple[int, int]):
  dims = (((contract[0],), (contract[1],)), ((), ()))
  return lax.dot_general(x, w, dims, preferred_element_type=_F32)


# ------------------------------ Triton (GPU) --------------------------------


def _gmm_triton_kernel(offsets_ref, first_ref, last_ref, lhs_ref, rhs_ref,
                       out_ref, *, tiling, num_k, transpose_rhs):
  """Program (t, j): ``out[t, j] = Σ_g mask_g ⊙ Σ_k lhs[t, k] @ rhs[g, k, j]``
  over the groups ``first[t] ≤ g ≤ last[t]`` that meet row tile ``t``."""
  tm, tk, tn = tiling.block_m, tiling.block_k, tiling.block_n
  t, j = pl.program_id(0), pl.program_id(1)

  def group_body(g, out):
    def k_body(kk, acc):
      x = lhs_ref[pl.ds(t * tm, tm), pl.ds(kk * tk, tk)]
      if transpose_rhs:
        w = rhs_ref[g, pl.ds(j * tn, tn), pl.ds(kk * tk, tk)]
      else:
        w = rhs_ref[g, pl.ds(kk * tk, tk), pl.ds(j * tn, tn)]
      return acc + _dot(x, w, (1, 1 if transpose_rhs else 0))

    acc = lax.fori_loop(0, num_k, k_body, jnp.zeros((tm, tn), _F32))
    # Select, not add: rows of other groups may hold inf/nan products.
    mask = _rows_in(t, offsets_ref[g], offsets_ref[g + 1], tm, tn)
    return jnp.where(mask, acc, out)

  out = lax.fori_loop(first_ref[t], last_ref[t] + 1, group_body,
                      jnp.zeros((tm, tn), _F32))
  out_ref[...] = out.astype(out_ref.dtype)


def _gmm_triton(lhs, rhs, offsets, tiling, transpose_rhs, interpret):
  (mp, kp), np_ = lhs.shape, rhs.shape[1 if transpose_rhs else 2]
  tm, tk, tn = tiling.block_m, tiling.block_k, tiling.block_n
  first, last = _tile_groups(offsets, mp // tm, tm)
  kernel = functools.partial(_gmm_triton_kernel, tiling=tiling,
                             num_k=kp // tk, transpose_rhs=transpose_rhs)
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((mp, np_), lhs.dtype),
      grid=(mp // tm, np_ // tn),
      in_specs=[pl.no_block_spec] * 5,
      out_specs=pl.BlockSpec((tm, tn), lambda t, j: (t, j)),
      compiler_params=pltriton.CompilerParams(
          num_warps=tiling.num_warps, num_stages=tiling.num_stages),
      interpret=interpret,
  )(offsets, first, last, lhs, rhs)


def _tgmm_triton_kernel(offsets_ref, lhs_ref, dy_ref, out_ref, *, tiling):
  """Program (g, k, j): ``out[g, k, j] = Σ_t (mask_g lhs[t, k])ᵀ (mask_g
  dy[t, j])`` over the row tiles ``t`` of group ``g`` (none if it is empty)."""
  tm, tk, tn = tiling.block_m, tiling.block_k, tiling.block_n
  g, kk, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  start, end = offsets_ref[g], offsets_ref[g + 1]

  def body(t, acc):
    x = lhs_ref[pl.ds(t * tm, tm), pl.ds(kk * tk, tk)]
    y = dy_ref[pl.ds(t * tm, tm), pl.ds(j * tn, tn)]
    x = jnp.where(_rows_in(t, start, end, tm, tk), x, jnp.zeros_like(x))
    y = jnp.where(_rows_in(t, start, end, tm, tn), y, jnp.zeros_like(y))
    return acc + _dot(x, y, (0, 0))

  first = lax.div(start, tm)
  stop = jnp.where(end > start, lax.div(end + tm - 1, tm), first)
  acc = lax.fori_loop(first, stop, body, jnp.zeros((tk, tn), _F32))
  out_ref[...] = acc.astype(out_ref.dtype)


def _tgmm_triton(lhs, dy, offsets, tiling, interpret):
  kp, np_ = lhs.shape[1], dy.shape[1]
  tk, tn, num_groups = tiling.block_k, tiling.block_n, offsets.shape[0] - 1
  return pl.pallas_call(
      functools.partial(_tgmm_triton_kernel, tiling=tiling),
      out_shape=jax.ShapeDtypeStruct((num_groups, kp, np_), lhs.dtype),
      grid=(num_groups, kp // tk, np_ // tn),
      in_specs=[pl.no_block_spec] * 3,
      out_specs=pl.BlockSpec((None, tk, tn), lambda g, kk, j: (g, kk, j)),
      compiler_params=pltriton.CompilerParams(
          num_warps=tiling.num_warps, num_stages=tiling.num_stages),
      interpret=interpret,
  )(offsets, lhs, dy)


# ------------------------------ Mosaic (TPU) --------------------------------


def _gmm_tpu_kernel(offsets_ref, gids_ref, tids_ref, nw_ref, lhs_ref, rhs_ref,
                    out_ref, acc_ref, *, tiling, num_k, transpose_rhs):
  """Step (j, i, k) of work item ``i = (g, t)``: ``acc += lhs[t, k] @
  rhs[g, k, j]``; at the last ``k`` the rows of ``g`` go to ``out[t, j]``."""
  tm, tn = tiling.block_m, tiling.block_n
  i, kk = pl.program_id(1), pl.program_id(2)
  g, t = gids_ref[i], tids_ref[i]
  start, end = offsets_ref[g], offsets_ref[g + 1]
  active = i < nw_ref[0]

  @pl.when(kk == 0)
  def _():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  @pl.when(active & (start < end) & (start < (t + 1) * tm) & (end > t * tm))
  def _():
    contract = (1, 1 if transpose_rhs else 0)
    acc_ref[...] += _dot(lhs_ref[...], rhs_ref[...], contract)

  # The first visit of an output tile also zeroes the rows of no group.
  is_last_k = active & (kk == num_k - 1)
  is_first_visit = (i == 0) | (tids_ref[jnp.maximum(i - 1, 0)] != t)
  mask = _rows_in(t, start, end, tm, tn)

  @pl.when(is_last_k & is_first_visit)
  def _():
    out_ref[...] = jnp.where(mask, acc_ref[...], 0.0).astype(out_ref.dtype)

  @pl.when(is_last_k & jnp.logical_not(is_first_visit))
  def _():
    out_ref[...] = jnp.where(mask, acc_ref[...].astype(out_ref.dtype),
                             out_ref[...])


def _gmm_tpu(lhs, rhs, offsets, tiling, transpose_rhs, interpret):
  (mp, kp), np_ = lhs.shape, rhs.shape[1 if transpose_rhs else 2]
  tm, tk, tn = tiling.block_m, tiling.block_k, tiling.block_n
  work = _gmm_work_list(offsets, mp // tm, tm)
  if transpose_rhs:
    rhs_map = lambda j, i, kk, o, gids, tids, nw: (gids[i], j, kk)
  else:
    rhs_map = lambda j, i, kk, o, gids, tids, nw: (gids[i], kk, j)
  tile_map = lambda j, i, kk, o, gids, tids, nw: (tids[i], kk)
  out_map = lambda j, i, kk, o, gids, tids, nw: (tids[i], j)
  rhs_block = (None, tn, tk) if transpose_rhs else (None, tk, tn)
  kernel = functools.partial(_gmm_tpu_kernel, tiling=tiling, num_k=kp // tk,
                             transpose_rhs=transpose_rhs)
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((mp, np_), lhs.dtype),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=4,
          grid=(np_ // tn, work.group_ids.shape[0], kp // tk),
          in_specs=[pl.BlockSpec((tm, tk), tile_map),
                    pl.BlockSpec(rhs_block, rhs_map)],
          out_specs=pl.BlockSpec((tm, tn), out_map),
          scratch_shapes=[pltpu.VMEM((tm, tn), _F32)]),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "arbitrary", "arbitrary")),
      interpret=interpret,
  )(offsets, work.group_ids, work.tile_ids, work.num_work, lhs, rhs)


def _tgmm_tpu_kernel(offsets_ref, gids_ref, tids_ref, nw_ref, lhs_ref, dy_ref,
                     out_ref, acc_ref, *, tiling):
  """Step (k, j, i) of work item ``i = (g, t)``: ``acc += lhs_gᵀ dy_g`` on row
  tile ``t``; the last item of ``g`` writes ``out[g, k, j]``."""
  tm, tk, tn = tiling.block_m, tiling.block_k, tiling.block_n
  i, last = pl.program_id(2), nw_ref[0] - 1
  g, t = gids_ref[i], tids_ref[i]
  start, end = offsets_ref[g], offsets_ref[g + 1]
  active = i <= last

  @pl.when(active & ((i == 0) | (gids_ref[jnp.maximum(i - 1, 0)] != g)))
  def _():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  @pl.when(active & (start < end))
  def _():
    x, y = lhs_ref[...], dy_ref[...]
    x = jnp.where(_rows_in(t, start, end, tm, tk), x, jnp.zeros_like(x))
    y = jnp.where(_rows_in(t, start, end, tm, tn), y, jnp.zeros_like(y))
    acc_ref[...] += _dot(x, y, (0, 0))

  @pl.when(active & ((i == last) | (gids_ref[jnp.minimum(i + 1, last)] != g)))
  def _():
    out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def _tgmm_tpu(lhs, dy, offsets, tiling, interpret):
  (mp, kp), np_ = lhs.shape, dy.shape[1]
  tm, tk, tn = tiling.block_m, tiling.block_k, tiling.block_n
  num_groups = offsets.shape[0] - 1
  work = _tgmm_work_list(offsets, mp // tm, tm)
  lhs_map = lambda kk, j, i, o, gids, tids, nw: (tids[i], kk)
  dy_map = lambda kk, j, i, o, gids, tids, nw: (tids[i], j)
  out_map = lambda kk, j, i, o, gids, tids, nw: (gids[i], kk, j)
  return pl.pallas_call(
      functools.partial(_tgmm_tpu_kernel, tiling=tiling),
      out_shape=jax.ShapeDtypeStruct((num_groups, kp, np_), lhs.dtype),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=4,
          grid=(kp // tk, np_ // tn, work.group_ids.shape[0]),
          in_specs=[pl.BlockSpec((tm, tk), lhs_map),
                    pl.BlockSpec((tm, tn), dy_map)],
          out_specs=pl.BlockSpec((None, tk, tn), out_map),
          scratch_shapes=[pltpu.VMEM((tk, tn), _F32)]),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret,
  )(offsets, work.group_ids, work.tile_ids, work.num_work, lhs, dy)


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
  backend = jax.default_backend()
  if interpret is None:
    interpret = backend == "cpu"
  if implementation is None:
    implementation = "mosaic_tpu" if backend == "tpu" else "triton"
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"{implementation=} is not one of {IMPLEMENTATIONS}")
  blocks = (tiling.block_m, tiling.block_k, tiling.block_n)
  if implementation == "triton" and not interpret and any(
      b < 16 or b & (b - 1) for b in blocks):
    # Triton tensors are powers of two and tl.dot needs 16 per side.
    raise ValueError(f"Triton tiles must be powers of two >= 16: {tiling=}")
  return bool(interpret), implementation


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
  run = _gmm_tpu if impl == "mosaic_tpu" else _gmm_triton
  return run(lhs, rhs, offsets, tiling, transpose_rhs, interpret)[:m, :n]


def _tgmm(lhs, dy, group_sizes, tiling, interpret, impl):
  (m, k), n = lhs.shape, dy.shape[1]
  dtype = jnp.result_type(lhs, dy)
  tm, tk, tn = tiling.block_m, tiling.block_k, tiling.block_n
  lhs = _pad_to(lhs.astype(dtype), (tm, tk))
  dy = _pad_to(dy.astype(dtype), (tm, tn))
  offsets = _group_offsets(group_sizes, m)
  run = _tgmm_tpu if impl == "mosaic_tpu" else _tgmm_triton
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
