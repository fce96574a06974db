"""Mosaic (TPU) lowering of the grouped matmul and its ``tgmm``.

Megablox-style: the group offsets and a work list go to the kernel by scalar
prefetch, and a sequential grid axis enumerates (row tile, group) work items
so that revisits of an output tile are consecutive and accumulate in VMEM.
Inputs arrive padded to tile multiples with their group offsets; the public
ops are in :mod:`kernels.grouped_matmul`.

References:
  JAX's ``jax.experimental.pallas.ops.tpu.megablox`` (``make_group_metadata``,
  the scheme this follows).
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels._grouped_matmul_common import F32, dot, rows_in, tile_groups

# ------------------------------ work lists (jnp) ----------------------------


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
  first, last = tile_groups(offsets, num_tiles, tm)
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


# ------------------------------ kernels -------------------------------------


def _gmm_kernel(offsets_ref, gids_ref, tids_ref, nw_ref, lhs_ref, rhs_ref,
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
    acc_ref[...] += dot(lhs_ref[...], rhs_ref[...], contract)

  # The first visit of an output tile also zeroes the rows of no group.
  is_last_k = active & (kk == num_k - 1)
  is_first_visit = (i == 0) | (tids_ref[jnp.maximum(i - 1, 0)] != t)
  mask = rows_in(t, start, end, tm, tn)

  @pl.when(is_last_k & is_first_visit)
  def _():
    out_ref[...] = jnp.where(mask, acc_ref[...], 0.0).astype(out_ref.dtype)

  @pl.when(is_last_k & jnp.logical_not(is_first_visit))
  def _():
    out_ref[...] = jnp.where(mask, acc_ref[...].astype(out_ref.dtype),
                             out_ref[...])


def gmm(lhs, rhs, offsets, tiling, transpose_rhs, interpret):
  """``[Mp, Np]`` grouped product of padded ``lhs [Mp, Kp]`` and ``rhs
  [G, Kp, Np]`` (``[G, Np, Kp]`` with ``transpose_rhs``)."""
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
  kernel = functools.partial(_gmm_kernel, tiling=tiling, num_k=kp // tk,
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
          scratch_shapes=[pltpu.VMEM((tm, tn), F32)]),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "arbitrary", "arbitrary")),
      interpret=interpret,
  )(offsets, work.group_ids, work.tile_ids, work.num_work, lhs, rhs)


def _tgmm_kernel(offsets_ref, gids_ref, tids_ref, nw_ref, lhs_ref, dy_ref,
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
    x = jnp.where(rows_in(t, start, end, tm, tk), x, jnp.zeros_like(x))
    y = jnp.where(rows_in(t, start, end, tm, tn), y, jnp.zeros_like(y))
    acc_ref[...] += dot(x, y, (0, 0))

  @pl.when(active & ((i == last) | (gids_ref[jnp.minimum(i + 1, last)] != g)))
  def _():
    out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def tgmm(lhs, dy, offsets, tiling, interpret):
  """``[G, Kp, Np]`` per-group ``lhs_gᵀ dy_g`` of padded ``lhs [Mp, Kp]`` and
  ``dy [Mp, Np]``."""
  (mp, kp), np_ = lhs.shape, dy.shape[1]
  tm, tk, tn = tiling.block_m, tiling.block_k, tiling.block_n
  num_groups = offsets.shape[0] - 1
  work = _tgmm_work_list(offsets, mp // tm, tm)
  lhs_map = lambda kk, j, i, o, gids, tids, nw: (tids[i], kk)
  dy_map = lambda kk, j, i, o, gids, tids, nw: (tids[i], j)
  out_map = lambda kk, j, i, o, gids, tids, nw: (gids[i], kk, j)
  return pl.pallas_call(
      functools.partial(_tgmm_kernel, tiling=tiling),
      out_shape=jax.ShapeDtypeStruct((num_groups, kp, np_), lhs.dtype),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=4,
          grid=(kp // tk, np_ // tn, work.group_ids.shape[0]),
          in_specs=[pl.BlockSpec((tm, tk), lhs_map),
                    pl.BlockSpec((tm, tn), dy_map)],
          out_specs=pl.BlockSpec((None, tk, tn), out_map),
          scratch_shapes=[pltpu.VMEM((tk, tn), F32)]),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret,
  )(offsets, work.group_ids, work.tile_ids, work.num_work, lhs, dy)
