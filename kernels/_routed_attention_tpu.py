"""Mosaic (TPU) lowering of routed attention: forward, dQ and dK/dV.

No gathered key/value tensor exists: the routing goes to the kernels by
scalar prefetch and the block index maps read it, so each grid step DMAs one
``[block_kv, d]`` tile of ``k``/``v`` straight from its own region.

* Forward and dQ: grid ``(B, H, R, Tq/bq, K, Tk/bkv)``, the last two axes
  sequential. Step ``(b, h, r, i, j, t)`` reads key tile ``t`` of region
  ``I[b, r, j]`` from the flattened ``I`` and updates, in VMEM scratch, the
  flash online softmax of query tile ``(r, i)``:

      m' = max(m, rowmax s),  α = exp(m − m'),  p = exp(s − m'),
      l' = α l + rowsum p,    acc' = α acc + p v,

  written as ``out = acc / l`` and ``lse = m + log l`` at the last step; dQ
  accumulates ``scale · ds k`` with ``ds = p ⊙ (do vᵀ − δ)``,
  ``p = exp(s − lse)``, the same way.
* dK/dV: the routing inverted (:func:`invert_routes`) into a work list of
  ``N = R·K + R`` entries sorted by key region; grid
  ``(B, H, Tk/bkv, N, Tq/bq)``, the last two axes sequential, so that the
  entries of one key region are consecutive and accumulate its dK/dV tile in
  VMEM (no scatter-add). Each key region owns a filler entry (query region
  stored as -1, no compute) so that a region nobody chose still writes zeros.
  The tile is zeroed at the region's first entry and written at its last.
  The kernel works on transposed logits ``sᵀ = k qᵀ`` so that ``lse`` and
  ``δ`` are rows and the products are plain matmuls:
  ``dV += pᵀ do``, ``dK += scale · dsᵀ q``.

Layout: per-query ``lse``/``δ`` travel lane-dense as ``[..., Tq/bq, 1, bq]``
and the key mask as ``[B, R, Tk/bkv, 1, bkv]``, so every block's last two
dims equal the array's whatever the tiles; a row becomes a column in VMEM
through a diagonal select and sum (``_row_to_col``). Softmax state and
columns live in ``[block, 128]`` scratch, one lane tile wide.

A query row whose keys are all masked averages them uniformly (as in the
reference); its ``lse = MASKED_LOGIT + log n`` rounds to ``MASKED_LOGIT``,
so dK/dV divide its ``p`` by ``n = K·Tk`` (``num_keys``, padding excluded:
padded keys have a logit of -inf; ``common.probabilities``). dQ needs no
such care, ``ds`` being 0 on masked keys.

References:
  Zhu, Wang, Ke, Zhang, Lau, "BiFormer: Vision Transformer with Bi-Level
  Routing Attention", CVPR 2023 (token-to-token attention over routed
  regions).
  Dao, "FlashAttention-2: Faster Attention with Better Parallelism and Work
  Partitioning", 2023 (online softmax, backward from ``lse`` and
  ``δ = rowsum(do ⊙ out)``).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels._routed_attention_common import (
  F32,
  MASKED_LOGIT,
  InverseRoutes,
  dot,
  mask_logits,
  masked_logits,
)

_LANES = 128

# ------------------------------ layout helpers ------------------------------


def _diagonal(n: int):
  return (lax.broadcasted_iota(jnp.int32, (n, n), 0)
          == lax.broadcasted_iota(jnp.int32, (n, n), 1))


def _row_to_col(row):
  """``[1, n]`` → ``[n, 1]``."""
  n = row.shape[1]
  return jnp.sum(jnp.where(_diagonal(n), row, 0.0), axis=1, keepdims=True)


def _col_to_row(col):
  """``[n, 1]`` → ``[1, n]``."""
  n = col.shape[0]
  return jnp.sum(jnp.where(_diagonal(n), col, 0.0), axis=0, keepdims=True)


def _rows(x, block: int):
  """``[..., T]`` → ``[..., T/block, 1, block]``."""
  return x.reshape(*x.shape[:-1], x.shape[-1] // block, 1, block)


def _lanes(col):
  return jnp.broadcast_to(col, (col.shape[0], _LANES))


def _params(parallel: int, sequential: int):
  return pltpu.CompilerParams(dimension_semantics=(
      ("parallel",) * parallel + ("arbitrary",) * sequential))


# ------------------------------ forward and dQ ------------------------------


def _query_maps(topk: int, regions: int):
  """Index maps of the ``(b, h, r, i, j, t)`` grid, routing ``idx`` flat."""

  def routed(b, r, j, idx):
    return idx[(b * regions + r) * topk + j]

  return dict(
      query=lambda b, h, r, i, j, t, idx: (b, h, r, i, 0),
      query_row=lambda b, h, r, i, j, t, idx: (b, h, r, i, 0, 0),
      key=lambda b, h, r, i, j, t, idx: (b, h, routed(b, r, j, idx), t, 0),
      mask=lambda b, h, r, i, j, t, idx: (b, routed(b, r, j, idx), t, 0, 0),
  )


def _routed_walk_specs(maps, bq: int, bkv: int, d: int, dv: int):
  """Blocks of ``q``, the routed ``k`` and ``v`` tiles and their key mask at
  step ``(b, h, r, i, j, t)``: the inputs the forward and dQ share."""
  return [
      pl.BlockSpec((None, None, None, bq, d), maps["query"]),
      pl.BlockSpec((None, None, None, bkv, d), maps["key"]),
      pl.BlockSpec((None, None, None, bkv, dv), maps["key"]),
      pl.BlockSpec((None, None, None, 1, bkv), maps["mask"]),
  ]


def _fwd_kernel(idx_ref, q_ref, k_ref, v_ref, mask_ref, o_ref, lse_ref, m_sc,
                l_sc, acc_sc, *, scale, num_k, num_kv):
  """Step ``(b, h, r, i, j, t)``: online softmax over key tile ``t`` of the
  ``j``-th routed region; the last step writes ``out`` and ``lse``."""
  del idx_ref
  j, t = pl.program_id(4), pl.program_id(5)

  @pl.when((j == 0) & (t == 0))
  def _():
    m_sc[...] = jnp.full_like(m_sc, -jnp.inf)
    l_sc[...] = jnp.zeros_like(l_sc)
    acc_sc[...] = jnp.zeros_like(acc_sc)

  v = v_ref[...]
  s = masked_logits(q_ref[...], k_ref[...], mask_ref[...], scale)
  m_prev, l_prev = m_sc[...][:, :1], l_sc[...][:, :1]
  m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
  alpha = jnp.exp(m_prev - m_new)
  p = jnp.exp(s - m_new)
  m_sc[...] = _lanes(m_new)
  l_sc[...] = _lanes(alpha * l_prev + jnp.sum(p, axis=1, keepdims=True))
  acc_sc[...] = alpha * acc_sc[...] + dot(p.astype(v.dtype), v, (1, 0))

  @pl.when((j == num_k - 1) & (t == num_kv - 1))
  def _():
    l = l_sc[...][:, :1]
    o_ref[...] = (acc_sc[...] / l).astype(o_ref.dtype)
    lse_ref[...] = _col_to_row(m_sc[...][:, :1] + jnp.log(l))


def forward(q, k, v, kv_mask, region_index, *, scale, tiling, interpret):
  """Routed attention and its log-sum-exp.

  Args:
    q: ``[B, H, R, Tq, D]``; ``k``: ``[B, H, R, Tk, D]``; ``v``:
      ``[B, H, R, Tk, Dv]``, one dtype, ``Tq``/``Tk`` multiples of
      ``tiling.block_q``/``tiling.block_kv``.
    kv_mask: ``[B, R, Tk]`` int32, 1 for a real key.
    region_index: ``[B, R, K]`` int32 routed key regions.
    scale: logit multiplier.
    tiling: ``block_q`` and ``block_kv``.
    interpret: run in the Pallas interpreter.

  Returns:
    ``out [B, H, R, Tq, Dv]`` in ``q.dtype`` and ``lse [B, H, R, Tq]``
    float32, ``lse = log Σ_keys exp(s)``.
  """
  batch, heads, regions, tq, d = q.shape
  tk, dv = k.shape[3], v.shape[4]
  topk = region_index.shape[2]
  bq, bkv = tiling.block_q, tiling.block_kv
  maps = _query_maps(topk, regions)
  kernel = functools.partial(_fwd_kernel, scale=scale, num_k=topk,
                             num_kv=tk // bkv)
  out, lse = pl.pallas_call(
      kernel,
      out_shape=(jax.ShapeDtypeStruct(q.shape[:4] + (dv,), q.dtype),
                 jax.ShapeDtypeStruct(
                     (batch, heads, regions, tq // bq, 1, bq), F32)),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(batch, heads, regions, tq // bq, topk, tk // bkv),
          in_specs=_routed_walk_specs(maps, bq, bkv, d, dv),
          out_specs=[
              pl.BlockSpec((None, None, None, bq, dv), maps["query"]),
              pl.BlockSpec((None, None, None, None, 1, bq),
                           maps["query_row"]),
          ],
          scratch_shapes=[pltpu.VMEM((bq, _LANES), F32),
                          pltpu.VMEM((bq, _LANES), F32),
                          pltpu.VMEM((bq, dv), F32)]),
      compiler_params=_params(4, 2),
      interpret=interpret,
  )(region_index.reshape(-1).astype(jnp.int32), q, k, v,
    _rows(kv_mask.astype(jnp.int32), bkv))
  return out, lse.reshape(batch, heads, regions, tq)


def _dq_kernel(idx_ref, q_ref, k_ref, v_ref, mask_ref, do_ref, lse_ref,
               delta_ref, dq_ref, acc_sc, lse_sc, delta_sc, *, scale, num_k,
               num_kv):
  """Step ``(b, h, r, i, j, t)``: ``acc += ds k`` over key tile ``t`` of the
  ``j``-th routed region; the last step writes ``dq = scale · acc``."""
  del idx_ref
  j, t = pl.program_id(4), pl.program_id(5)

  @pl.when((j == 0) & (t == 0))
  def _():
    acc_sc[...] = jnp.zeros_like(acc_sc)
    lse_sc[...] = _lanes(_row_to_col(lse_ref[...]))
    delta_sc[...] = _lanes(_row_to_col(delta_ref[...]))

  k, mask = k_ref[...], mask_ref[...]
  s = masked_logits(q_ref[...], k, mask, scale)
  p = jnp.exp(s - lse_sc[...][:, :1])
  dp = dot(do_ref[...], v_ref[...], (1, 1))
  ds = jnp.where(mask > 0, p * (dp - delta_sc[...][:, :1]), 0.0)
  acc_sc[...] += dot(ds.astype(k.dtype), k, (1, 0))

  @pl.when((j == num_k - 1) & (t == num_kv - 1))
  def _():
    dq_ref[...] = scale * acc_sc[...]


def backward_dq(q, k, v, kv_mask, region_index, do, lse, delta, *, scale,
                tiling, interpret):
  """``dq = scale · Σ ds k`` with ``ds = p ⊙ (do vᵀ − δ)`` on real keys.

  Args:
    q, k, v, kv_mask, region_index, scale, tiling, interpret: as in
      :func:`forward`.
    do: ``[B, H, R, Tq, Dv]`` output cotangent.
    lse: ``[B, H, R, Tq]`` float32 from :func:`forward`.
    delta: ``[B, H, R, Tq]`` float32, ``Σ_d do ⊙ out``.

  Returns:
    ``dq [B, H, R, Tq, D]`` float32.
  """
  batch, heads, regions, tq, d = q.shape
  tk, dv = k.shape[3], v.shape[4]
  topk = region_index.shape[2]
  bq, bkv = tiling.block_q, tiling.block_kv
  maps = _query_maps(topk, regions)
  kernel = functools.partial(_dq_kernel, scale=scale, num_k=topk,
                             num_kv=tk // bkv)
  row_spec = pl.BlockSpec((None, None, None, None, 1, bq), maps["query_row"])
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct(q.shape, F32),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(batch, heads, regions, tq // bq, topk, tk // bkv),
          in_specs=[
              *_routed_walk_specs(maps, bq, bkv, d, dv),
              pl.BlockSpec((None, None, None, bq, dv), maps["query"]),
              row_spec,
              row_spec,
          ],
          out_specs=pl.BlockSpec((None, None, None, bq, d), maps["query"]),
          scratch_shapes=[pltpu.VMEM((bq, d), F32),
                          pltpu.VMEM((bq, _LANES), F32),
                          pltpu.VMEM((bq, _LANES), F32)]),
      compiler_params=_params(4, 2),
      interpret=interpret,
  )(region_index.reshape(-1).astype(jnp.int32), q, k, v,
    _rows(kv_mask.astype(jnp.int32), bkv), do, _rows(lse, bq),
    _rows(delta, bq))


# ------------------------------ dK and dV -----------------------------------


def _dkv_kernel(key_ref, query_ref, q_ref, k_ref, v_ref, mask_ref, do_ref,
                lse_ref, delta_ref, dk_ref, dv_ref, dk_sc, dv_sc, mask_sc, *,
                scale, num_entries, num_q, num_keys):
  """Step ``(b, h, t, e, i)`` of work entry ``e = (c, r)``: key tile ``t`` of
  region ``c`` against query tile ``i`` of region ``r``; the region's first
  entry zeroes its dK/dV tile, its last writes it."""
  b, e, i = pl.program_id(0), pl.program_id(3), pl.program_id(4)
  at = lambda n: b * num_entries + n
  c = key_ref[at(e)]
  first = (e == 0) | (key_ref[at(jnp.maximum(e - 1, 0))] != c)
  last = ((e == num_entries - 1)
          | (key_ref[at(jnp.minimum(e + 1, num_entries - 1))] != c))

  @pl.when(first & (i == 0))
  def _():
    dk_sc[...] = jnp.zeros_like(dk_sc)
    dv_sc[...] = jnp.zeros_like(dv_sc)
    mask_sc[...] = _lanes(_row_to_col(mask_ref[...].astype(F32)))

  @pl.when(query_ref[at(e)] >= 0)
  def _():
    q, k, do = q_ref[...], k_ref[...], do_ref[...]
    mask = mask_sc[...][:, :1]
    lse = lse_ref[...]
    s_t = mask_logits(dot(k, q, (1, 1)) * scale, mask)
    # As common.probabilities, transposed: a row with no real key has
    # lse == MASKED_LOGIT and averages its n keys (exp(s − lse) would be 1).
    p_t = jnp.exp(s_t - lse)
    p_t = jnp.where(lse == MASKED_LOGIT, p_t / num_keys, p_t)
    dv_sc[...] += dot(p_t.astype(do.dtype), do, (1, 0))
    dp_t = dot(v_ref[...], do, (1, 1))
    ds_t = jnp.where(mask > 0, p_t * (dp_t - delta_ref[...]), 0.0)
    dk_sc[...] += dot(ds_t.astype(q.dtype), q, (1, 0))

  @pl.when(last & (i == num_q - 1))
  def _():
    dk_ref[...] = scale * dk_sc[...]
    dv_ref[...] = dv_sc[...]


def backward_dkv(q, k, v, kv_mask, routes: InverseRoutes, do, lse, delta, *,
                 scale, tiling, interpret, num_keys):
  """``dk = scale · Σ dsᵀ q`` and ``dv = Σ pᵀ do`` over the query regions
  that routed to each key region.

  Args:
    q, k, v, kv_mask, scale, tiling, interpret: as in :func:`forward`.
    routes: ``invert_routes(region_index)``, ``[B, N]`` entries,
      ``N = R·K + R``.
    do, lse, delta: as in :func:`backward_dq`.
    num_keys: ``K ·`` unpadded ``Tk``, the keys a query with no real key
      averages.

  Returns:
    ``dk [B, H, R, Tk, D]`` and ``dv [B, H, R, Tk, Dv]`` float32, zero for a
    region no query region chose.
  """
  batch, heads, regions, tq, d = q.shape
  tk, dv = k.shape[3], v.shape[4]
  entries = routes.key_region.shape[1]
  bq, bkv = tiling.block_q, tiling.block_kv
  key_region = routes.key_region.reshape(-1).astype(jnp.int32)
  query_region = jnp.where(routes.valid != 0, routes.query_region,
                           -1).reshape(-1).astype(jnp.int32)

  def key_map(b, h, t, e, i, keys, queries):
    return b, h, keys[b * entries + e], t, 0

  def query_map(b, h, t, e, i, keys, queries):
    return b, h, jnp.maximum(queries[b * entries + e], 0), i, 0

  def mask_map(b, h, t, e, i, keys, queries):
    return b, keys[b * entries + e], t, 0, 0

  def row_map(b, h, t, e, i, keys, queries):
    return (*query_map(b, h, t, e, i, keys, queries), 0)

  row_spec = pl.BlockSpec((None, None, None, None, 1, bq), row_map)
  kernel = functools.partial(_dkv_kernel, scale=scale, num_entries=entries,
                             num_q=tq // bq, num_keys=num_keys)
  return pl.pallas_call(
      kernel,
      out_shape=(jax.ShapeDtypeStruct(k.shape, F32),
                 jax.ShapeDtypeStruct(v.shape, F32)),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2,
          grid=(batch, heads, tk // bkv, entries, tq // bq),
          in_specs=[
              pl.BlockSpec((None, None, None, bq, d), query_map),
              pl.BlockSpec((None, None, None, bkv, d), key_map),
              pl.BlockSpec((None, None, None, bkv, dv), key_map),
              pl.BlockSpec((None, None, None, 1, bkv), mask_map),
              pl.BlockSpec((None, None, None, bq, dv), query_map),
              row_spec,
              row_spec,
          ],
          out_specs=[pl.BlockSpec((None, None, None, bkv, d), key_map),
                     pl.BlockSpec((None, None, None, bkv, dv), key_map)],
          scratch_shapes=[pltpu.VMEM((bkv, d), F32),
                          pltpu.VMEM((bkv, dv), F32),
                          pltpu.VMEM((bkv, _LANES), F32)]),
      compiler_params=_params(3, 2),
      interpret=interpret,
  )(key_region, query_region, q, k, v, _rows(kv_mask.astype(jnp.int32), bkv),
    do, _rows(lse, bq), _rows(delta, bq))
