"""Triton (NVIDIA GPU) lowering of the grouped matmul and its ``tgmm``.

``gmm`` has a grid over (row tile, column tile); a row tile may straddle
group boundaries, so each program loops over the groups that intersect its
rows and keeps each group's rows with a mask. ``tgmm`` has a grid over
(group, K tile, N tile) and loops over the row tiles of its group. Inputs
arrive padded to tile multiples with their group offsets; the public ops are
in :mod:`kernels.grouped_matmul`.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from kernels._grouped_matmul_common import F32, dot, rows_in, tile_groups


def _gmm_kernel(offsets_ref, first_ref, last_ref, lhs_ref, rhs_ref, out_ref,
                *, tiling, num_k, transpose_rhs):
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
      return acc + dot(x, w, (1, 1 if transpose_rhs else 0))

    acc = lax.fori_loop(0, num_k, k_body, jnp.zeros((tm, tn), F32))
    # Select, not add: rows of other groups may hold inf/nan products.
    mask = rows_in(t, offsets_ref[g], offsets_ref[g + 1], tm, tn)
    return jnp.where(mask, acc, out)

  out = lax.fori_loop(first_ref[t], last_ref[t] + 1, group_body,
                      jnp.zeros((tm, tn), F32))
  out_ref[...] = out.astype(out_ref.dtype)


def gmm(lhs, rhs, offsets, tiling, transpose_rhs, interpret):
  """``[Mp, Np]`` grouped product of padded ``lhs [Mp, Kp]`` and ``rhs
  [G, Kp, Np]`` (``[G, Np, Kp]`` with ``transpose_rhs``)."""
  (mp, kp), np_ = lhs.shape, rhs.shape[1 if transpose_rhs else 2]
  tm, tk, tn = tiling.block_m, tiling.block_k, tiling.block_n
  first, last = tile_groups(offsets, mp // tm, tm)
  kernel = functools.partial(_gmm_kernel, tiling=tiling, num_k=kp // tk,
                             transpose_rhs=transpose_rhs)
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


def _tgmm_kernel(offsets_ref, lhs_ref, dy_ref, out_ref, *, tiling):
  """Program (g, k, j): ``out[g, k, j] = Σ_t (mask_g lhs[t, k])ᵀ (mask_g
  dy[t, j])`` over the row tiles ``t`` of group ``g`` (none if it is empty)."""
  tm, tk, tn = tiling.block_m, tiling.block_k, tiling.block_n
  g, kk, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  start, end = offsets_ref[g], offsets_ref[g + 1]

  def body(t, acc):
    x = lhs_ref[pl.ds(t * tm, tm), pl.ds(kk * tk, tk)]
    y = dy_ref[pl.ds(t * tm, tm), pl.ds(j * tn, tn)]
    x = jnp.where(rows_in(t, start, end, tm, tk), x, jnp.zeros_like(x))
    y = jnp.where(rows_in(t, start, end, tm, tn), y, jnp.zeros_like(y))
    return acc + dot(x, y, (0, 0))

  first = lax.div(start, tm)
  stop = jnp.where(end > start, lax.div(end + tm - 1, tm), first)
  acc = lax.fori_loop(first, stop, body, jnp.zeros((tk, tn), F32))
  out_ref[...] = acc.astype(out_ref.dtype)


def tgmm(lhs, dy, offsets, tiling, interpret):
  """``[G, Kp, Np]`` per-group ``lhs_gᵀ dy_g`` of padded ``lhs [Mp, Kp]`` and
  ``dy [Mp, Np]``."""
  kp, np_ = lhs.shape[1], dy.shape[1]
  tk, tn, num_groups = tiling.block_k, tiling.block_n, offsets.shape[0] - 1
  return pl.pallas_call(
      functools.partial(_tgmm_kernel, tiling=tiling),
      out_shape=jax.ShapeDtypeStruct((num_groups, kp, np_), lhs.dtype),
      grid=(num_groups, kp // tk, np_ // tn),
      in_specs=[pl.no_block_spec] * 3,
      out_specs=pl.BlockSpec((None, tk, tn), lambda g, kk, j: (g, kk, j)),
      compiler_params=pltriton.CompilerParams(
          num_warps=tiling.num_warps, num_stages=tiling.num_stages),
      interpret=interpret,
  )(offsets, lhs, dy)
