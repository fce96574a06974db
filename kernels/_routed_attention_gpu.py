"""Triton (NVIDIA GPU) lowering of routed attention and its backward.

Every kernel reads the routing from an int32 array in memory and loads the
routed key/value blocks straight from ``k`` and ``v``; nothing gathered is
ever written (the official code materialises ``k`` and ``v`` ``topk`` times).

* ``forward``: a grid over (batch, head, query region, query block); each
  program walks the ``K`` routed regions and their key blocks with an online
  softmax (FlashAttention-2) and writes ``out`` and the log-sum-exp.
* ``backward_dq``: the same grid and walk, recomputing the probabilities from
  the log-sum-exp.
* ``backward_dkv``: a grid over (batch, head, key region, key block); each
  program walks the query regions that routed to its key region (the inverted
  routing of :func:`~kernels._routed_attention_common.invert_routes`) and
  their query blocks, so dK and dV accumulate in registers and are written
  once: no scatter-add, no atomics.

Inputs arrive padded (see :mod:`kernels._routed_attention_common`); the public
op is :func:`kernels.routed_attention.routed_attention`.

References:
  Zhu et al., "BiFormer: Vision Transformer with Bi-Level Routing Attention",
  CVPR 2023, §3.2; Dao, "FlashAttention-2: Faster Attention with Better
  Parallelism and Work Partitioning", 2023, Algorithms 1 and 2.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from kernels._routed_attention_common import (
    F32,
    MASKED_LOGIT,
    dot,
    masked_logits,
    probabilities,
)


def _params(tiling):
  return pltriton.CompilerParams(num_warps=tiling.num_warps,
                                 num_stages=tiling.num_stages)


def _query_block_spec(width: int | None, block_q: int) -> pl.BlockSpec:
  """``[bq, width]`` (``[bq]`` if ``width`` is None) of one query block."""
  if width is None:
    return pl.BlockSpec((None, None, None, block_q),
                        lambda b, h, r, i: (b, h, r, i))
  return pl.BlockSpec((None, None, None, block_q, width),
                      lambda b, h, r, i: (b, h, r, i, 0))


def _walk_routed_keys(index_ref, k_ref, v_ref, mask_ref, body, init, *,
                      block_kv: int):
  """Folds ``body(k, v, mask, carry)`` over every routed key block of the
  current program's query region, in routing order."""
  b, h, r = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  topk, num_kv = index_ref.shape[-1], k_ref.shape[3] // block_kv

  def region(j, carry):
    c = index_ref[b, r, j]

    def key_block(t, carry):
      rows = pl.ds(t * block_kv, block_kv)
      return body(k_ref[b, h, c, rows, :], v_ref[b, h, c, rows, :],
                  mask_ref[b, c, rows], carry)

    return lax.fori_loop(0, num_kv, key_block, carry)

  return lax.fori_loop(0, topk, region, init)


def _forward_kernel(index_ref, q_ref, k_ref, v_ref, mask_ref, out_ref,
                    lse_ref, *, scale, block_kv):
  q = q_ref[...]
  block_q, dv = out_ref.shape

  def body(k, v, mask, carry):
    m, l, acc = carry
    s = masked_logits(q, k, mask, scale)
    m_new = jnp.maximum(m, s.max(axis=1))
    alpha = jnp.exp(m - m_new)
    p = jnp.exp(s - m_new[:, None])
    acc = acc * alpha[:, None] + dot(p.astype(v.dtype), v, (1, 0))
    return m_new, l * alpha + p.sum(axis=1), acc

  # Starting m at the masked logit (not -inf) keeps α finite when every key
  # so far is masked.
  init = (jnp.full((block_q,), MASKED_LOGIT, F32), jnp.zeros((block_q,), F32),
          jnp.zeros((block_q, dv), F32))
  m, l, acc = _walk_routed_keys(index_ref, k_ref, v_ref, mask_ref, body, init,
                                block_kv=block_kv)
  out_ref[...] = (acc / l[:, None]).astype(out_ref.dtype)
  lse_ref[...] = m + jnp.log(l)


def forward(q, k, v, kv_mask, region_index, *, scale, tiling, interpret):
  """``out [B, H, R, Tq, Dv]`` (``q.dtype``) and ``lse [B, H, R, Tq]`` f32."""
  batch, heads, regions, tq, d = q.shape
  dv, bq = v.shape[-1], tiling.block_q
  kernel = functools.partial(_forward_kernel, scale=scale,
                             block_kv=tiling.block_kv)
  return pl.pallas_call(
      kernel,
      out_shape=(jax.ShapeDtypeStruct((*q.shape[:4], dv), q.dtype),
                 jax.ShapeDtypeStruct(q.shape[:4], F32)),
      grid=(batch, heads, regions, tq // bq),
      in_specs=[pl.no_block_spec, _query_block_spec(d, bq),
                pl.no_block_spec, pl.no_block_spec, pl.no_block_spec],
      out_specs=(_query_block_spec(dv, bq), _query_block_spec(None, bq)),
      compiler_params=_params(tiling),
      interpret=interpret,
  )(region_index, q, k, v, kv_mask)


def _probabilities_and_score_grads(q, k, v, mask, do, lse, delta, scale,
                                   num_keys):
  """``p = exp(s − lse)`` and ``ds = p ⊙ (do vᵀ − delta)`` (0 off the real
  keys), both ``[bq, bkv]`` float32; ``num_keys`` routed keys per query."""
  p = probabilities(masked_logits(q, k, mask, scale), lse, num_keys)
  ds = p * (dot(do, v, (1, 1)) - delta[:, None])
  return p, jnp.where(mask.reshape(1, -1) > 0, ds, 0.0)


def _dq_kernel(index_ref, q_ref, k_ref, v_ref, mask_ref, do_ref, lse_ref,
               delta_ref, dq_ref, *, scale, block_kv):
  q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]

  def body(k, v, mask, dq):
    # A query with no real key has ds = 0, so its p needs no correction.
    _, ds = _probabilities_and_score_grads(q, k, v, mask, do, lse, delta,
                                           scale, num_keys=1)
    return dq + dot(ds.astype(k.dtype), k, (1, 0))

  dq = _walk_routed_keys(index_ref, k_ref, v_ref, mask_ref, body,
                         jnp.zeros(dq_ref.shape, F32), block_kv=block_kv)
  dq_ref[...] = dq * scale


def backward_dq(q, k, v, kv_mask, region_index, do, lse, delta, *, scale,
                tiling, interpret):
  """``dq [B, H, R, Tq, D]`` float32."""
  batch, heads, regions, tq, d = q.shape
  dv, bq = v.shape[-1], tiling.block_q
  kernel = functools.partial(_dq_kernel, scale=scale, block_kv=tiling.block_kv)
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct(q.shape, F32),
      grid=(batch, heads, regions, tq // bq),
      in_specs=[pl.no_block_spec, _query_block_spec(d, bq), pl.no_block_spec,
                pl.no_block_spec, pl.no_block_spec, _query_block_spec(dv, bq),
                _query_block_spec(None, bq), _query_block_spec(None, bq)],
      out_specs=_query_block_spec(d, bq),
      compiler_params=_params(tiling),
      interpret=interpret,
  )(region_index, q, k, v, kv_mask, do, lse, delta)


def _dkv_kernel(offsets_ref, queries_ref, q_ref, k_ref, v_ref, mask_ref,
                do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, scale, block_q,
                num_keys):
  b, h, c = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  k, v, mask = k_ref[...], v_ref[...], mask_ref[...]
  num_q = q_ref.shape[3] // block_q

  def entry(n, carry):
    r = queries_ref[b, n]

    def query_block(i, carry):
      dk, dv = carry
      rows = pl.ds(i * block_q, block_q)
      q, do = q_ref[b, h, r, rows, :], do_ref[b, h, r, rows, :]
      p, ds = _probabilities_and_score_grads(
          q, k, v, mask, do, lse_ref[b, h, r, rows], delta_ref[b, h, r, rows],
          scale, num_keys)
      return (dk + dot(ds.astype(q.dtype), q, (0, 0)),
              dv + dot(p.astype(do.dtype), do, (0, 0)))

    return lax.fori_loop(0, num_q, query_block, carry)

  # The last entry of each key region is its filler (valid = 0): skip it.
  dk, dv = lax.fori_loop(
      offsets_ref[b, c], offsets_ref[b, c + 1] - 1, entry,
      (jnp.zeros(dk_ref.shape, F32), jnp.zeros(dv_ref.shape, F32)))
  dk_ref[...] = dk * scale
  dv_ref[...] = dv


def backward_dkv(q, k, v, kv_mask, routes, do, lse, delta, *, scale, tiling,
                 interpret, num_keys):
  """``dk [B, H, R, Tk, D]``, ``dv [B, H, R, Tk, Dv]`` float32."""
  batch, heads, regions, tk, d = k.shape
  dv, bkv = v.shape[-1], tiling.block_kv
  kernel = functools.partial(_dkv_kernel, scale=scale, block_q=tiling.block_q,
                             num_keys=num_keys)
  key_block = lambda width: pl.BlockSpec(  # noqa: E731
      (None, None, None, bkv, width), lambda b, h, c, t: (b, h, c, t, 0))
  mask_block = pl.BlockSpec((None, None, bkv), lambda b, h, c, t: (b, c, t))
  return pl.pallas_call(
      kernel,
      out_shape=(jax.ShapeDtypeStruct(k.shape, F32),
                 jax.ShapeDtypeStruct(v.shape, F32)),
      grid=(batch, heads, regions, tk // bkv),
      in_specs=[pl.no_block_spec, pl.no_block_spec, pl.no_block_spec,
                key_block(d), key_block(dv), mask_block, pl.no_block_spec,
                pl.no_block_spec, pl.no_block_spec],
      out_specs=(key_block(d), key_block(dv)),
      compiler_params=_params(tiling),
      interpret=interpret,
  )(routes.offsets, routes.query_region, q, k, v, kv_mask, do, lse, delta)
