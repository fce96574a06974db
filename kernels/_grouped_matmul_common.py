"""Tile helpers shared by the two grouped matmul lowerings.

The Triton (``_grouped_matmul_gpu``) and Mosaic (``_grouped_matmul_tpu``)
kernels both mask rows by group inside a tile and accumulate in float32; the
TPU work lists also start from the groups that meet each row tile.
"""

import jax
import jax.numpy as jnp
from jax import lax

F32 = jnp.float32


def tile_groups(offsets: jax.Array, num_tiles: int, tm: int):
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


def rows_in(t, start, end, tm, cols):
  """``[tm, cols]`` mask of the rows of tile ``t`` in ``[start, end)``."""
  rows = t * tm + lax.broadcasted_iota(jnp.int32, (tm, cols), 0)
  return (rows >= start) & (rows < end)


def dot(x, w, contract: tuple[int, int]):
  """``x · w`` contracting ``x``'s axis ``contract[0]`` with ``w``'s
  ``contract[1]``, accumulated in float32."""
  dims = (((contract[0],), (contract[1],)), ((), ()))
  return lax.dot_general(x, w, dims, preferred_element_type=F32)
