"""Routed (region-to-region) attention: the token level of BiFormer's BRA.

The token map is cut into ``R = S²`` regions of ``T`` tokens. Query region
``r`` attends, token to token, over the concatenated tokens of the ``topk``
key/value regions ``I[b, r, :]`` chosen by the region-level routing; all
heads share one routing. For batch ``b``, head ``m``, query region ``r``:

    K_r = concat_j k[b, m, I[b, r, j]],   V_r = concat_j v[b, m, I[b, r, j]],
    out[b, m, r] = softmax((scale · q[b, m, r]) K_rᵀ) V_r,

with ``K_r, V_r`` of ``topk · T`` rows (the paper's token-to-token
attention, before its LCE term).
The layout ``[batch, heads, regions, tokens, head_dim]`` is that of the
official ``regional_routing_attention_torch`` core (which takes a per-head
``[B, heads, R, topk]`` routing; here it is shared by all heads, as in the
official legacy module, which computes the same contraction after its
``(n p2) m w2 c`` reshape). Out-of-range region ids are not checked (XLA
clamps gather indices).

:func:`routed_attention` is the fused Pallas kernel; it never materialises
the gathered keys/values, in the forward or the backward:

* forward: per (batch, head, query region, query block), an online softmax
  (FlashAttention-2) over the key blocks of the ``topk`` routed regions,
  whose ids the kernel reads from ``region_index``; it saves ``out`` and the
  log-sum-exp ``L``;
* backward (``custom_vjp``): with ``Δ = rowsum(dO ⊙ O)``, ``P = exp(S − L)``,
  ``dS = P ⊙ (dO Vᵀ − Δ)``, dQ walks the routed key blocks as the forward
  does, and dK, dV walk, for each key region, the query regions that chose it
  (the routing inverted by a stable sort), so each dK/dV block is written
  once: no scatter-add into a gathered tensor.

Two lowerings, in private modules: ``"triton"`` (NVIDIA GPU,
``_routed_attention_gpu``: routing read from memory in the kernel) and
``"mosaic_tpu"`` (TPU, ``_routed_attention_tpu``: routing passed by scalar
prefetch into the block index maps). Both run on CPU with ``interpret=True``
(the default there), which is how the tests cover them; neither was compiled
for a real GPU or TPU here. The plain-``jnp`` oracle
:func:`routed_attention_reference` materialises the gathered keys/values
(``topk`` times the size of ``k``/``v``) and the ``[..., Tq, topk · Tkv]``
logits.

References:
  Zhu, Wang, Ke, Zhang, Lau, "BiFormer: Vision Transformer with Bi-Level
  Routing Attention", CVPR 2023, §3.2 (token-to-token
  attention: gather of the routed K/V, then attention); Dao,
  "FlashAttention-2", 2023 (online softmax and its backward).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

from kernels import _lowering, _routed_attention_gpu, _routed_attention_tpu
from kernels._lowering import IMPLEMENTATIONS as IMPLEMENTATIONS
from kernels._routed_attention_common import F32, PADDED, invert_routes

_LOWERINGS = {"triton": _routed_attention_gpu,
              "mosaic_tpu": _routed_attention_tpu}


def _check_shapes(q, k, v, region_index, kv_mask) -> None:
  if q.ndim != 5 or k.ndim != 5 or v.ndim != 5:
    raise ValueError(
        "q, k, v must be [batch, heads, regions, tokens, head_dim], got"
        f" {q.shape=}, {k.shape=}, {v.shape=}")
  if q.shape[:3] != k.shape[:3] or k.shape[:4] != v.shape[:4]:
    raise ValueError(
        "q, k, v must agree on [batch, heads, regions] and k, v on tokens,"
        f" got {q.shape=}, {k.shape=}, {v.shape=}")
  if q.shape[-1] != k.shape[-1]:
    raise ValueError(f"q and k head_dim differ: {q.shape=}, {k.shape=}")
  batch, _, regions = q.shape[:3]
  if region_index.ndim != 3 or region_index.shape[:2] != (batch, regions):
    raise ValueError(
        f"region_index must be [batch={batch}, regions={regions}, topk], got"
        f" {region_index.shape=}")
  if not jnp.issubdtype(region_index.dtype, jnp.integer):
    raise ValueError(f"region_index must be integer, got {region_index.dtype}")
  want = (batch, regions, k.shape[3])
  if kv_mask is not None and kv_mask.shape != want:
    raise ValueError(
        f"kv_mask must be [batch, regions, kv_tokens]={want}, got"
        f" {kv_mask.shape=}")


def _gather_regions(x: jax.Array, region_index: jax.Array) -> jax.Array:
  """``[B, m, R, T, d]``, ``[B, R, k]`` → ``[B, m, R, k·T, d]``."""
  # Indexing the unexpanded array keeps the VJP a scatter-add into k/v's own
  # shape (no S²-times-larger buffer, unlike torch.gather on an expand).
  gathered = jax.vmap(lambda xb, ib: xb[:, ib])(x, region_index)
  b, m, r, topk, t, d = gathered.shape
  return gathered.reshape(b, m, r, topk * t, d)


def routed_attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    region_index: jax.Array,
    *,
    scale: float,
    kv_mask: jax.Array | None = None,
) -> jax.Array:
  """Token-to-token attention over routed regions, in plain ``jnp``.

  Args:
    q: queries ``[batch, heads, regions, q_tokens, qk_head_dim]``.
    k: keys ``[batch, heads, regions, kv_tokens, qk_head_dim]``.
    v: values ``[batch, heads, regions, kv_tokens, v_head_dim]``.
    region_index: ``[batch, regions, topk]`` integer ids of the key/value
      regions each query region attends to, shared by all heads; values in
      ``[0, regions)``.
    scale: logit multiplier applied to ``q`` (BiFormer: ``qk_dim ** -0.5``
      of the full query width, not of the head width).
    kv_mask: optional ``[batch, regions, kv_tokens]`` bool, true for real
      keys; false keys get a logit of the dtype's minimum (a row with no
      real key then averages its keys uniformly instead of giving NaN).
      ``None`` (the official behaviour) attends to every key.

  Returns:
    ``[batch, heads, regions, q_tokens, v_head_dim]`` in ``q``'s dtype
    (promoted with ``k``, ``v``); logits and softmax in at least float32.

  Raises:
    ValueError: inconsistent shapes or a non-integer ``region_index``.
  """
  _check_shapes(q, k, v, region_index, kv_mask)
  out_dtype = jnp.result_type(q, k, v)
  acc_dtype = jnp.promote_types(out_dtype, jnp.float32)
  keys = _gather_regions(k, region_index)
  values = _gather_regions(v, region_index)
  logits = jnp.einsum("bmrqd,bmrkd->bmrqk", q * scale, keys,
                      preferred_element_type=acc_dtype)
  if kv_mask is not None:
    mask = jax.vmap(lambda mb, ib: mb[ib])(kv_mask, region_index)
    mask = mask.reshape(mask.shape[0], 1, mask.shape[1], 1, -1)
    logits = jnp.where(mask, logits, jnp.finfo(acc_dtype).min)
  probs = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum("bmrqk,bmrkd->bmrqd", probs, values.astype(acc_dtype))
  return out.astype(out_dtype)


# ------------------------------ Pallas op -----------------------------------


@dataclasses.dataclass(frozen=True)
class RoutedAttentionTiling:
  """Tile sizes of the routed-attention kernels.

  A region's tokens are cut into blocks; a block larger than its region is
  shrunk to the region's size rounded up to a power of two (at least 16),
  and the tokens are zero-padded to a whole number of blocks (padded keys
  masked).

  Attributes:
    block_q: query tokens per program (and per inner step of dK/dV).
    block_kv: key tokens per inner step (and per program of dK/dV).
    num_warps: Triton warps per program (GPU only).
    num_stages: Triton software-pipelining stages (GPU only).

  The defaults are untuned starting points.
  """

  block_q: int = 64
  block_kv: int = 64
  num_warps: int = 4
  num_stages: int = 2

  def __post_init__(self):
    for name in ("block_q", "block_kv", "num_warps", "num_stages"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive int")
    for name in ("block_q", "block_kv"):
      value = getattr(self, name)
      if value < 16 or value & (value - 1):
        # Triton tensors are powers of two and tl.dot needs 16 per side.
        raise ValueError(f"{name}={value} must be a power of two >= 16")


def _triton_size(n: int) -> int:
  """The smallest power of two ≥ max(n, 16): a Triton tensor side."""
  return max(16, 1 << (n - 1).bit_length())


def _pad_axis(x: jax.Array, axis: int, multiple: int) -> jax.Array:
  pad = -x.shape[axis] % multiple
  if not pad:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9))
def _fused(q, k, v, kv_mask, region_index, scale, tiling, interpret, impl,
           kv_tokens):
  """Padded inputs; ``kv_tokens`` is the unpadded key count per region."""
  out, _ = _fused_fwd(q, k, v, kv_mask, region_index, scale, tiling,
                      interpret, impl, kv_tokens)
  return out


def _fused_fwd(q, k, v, kv_mask, region_index, scale, tiling, interpret, impl,
               kv_tokens):
  del kv_tokens
  out, lse = _LOWERINGS[impl].forward(q, k, v, kv_mask, region_index,
                                      scale=scale, tiling=tiling,
                                      interpret=interpret)
  return out, (q, k, v, kv_mask, region_index, out, lse)


def _fused_bwd(scale, tiling, interpret, impl, kv_tokens, residuals, do):
  q, k, v, kv_mask, region_index, out, lse = residuals
  lowering = _LOWERINGS[impl]
  delta = jnp.sum(do.astype(F32) * out.astype(F32), axis=-1)
  do = do.astype(q.dtype)
  common = dict(scale=scale, tiling=tiling, interpret=interpret)
  dq = lowering.backward_dq(q, k, v, kv_mask, region_index, do, lse, delta,
                            **common)
  dk, dv = lowering.backward_dkv(q, k, v, kv_mask, invert_routes(region_index),
                                 do, lse, delta,
                                 num_keys=region_index.shape[-1] * kv_tokens,
                                 **common)
  return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None,
          None)


_fused.defvjp(_fused_fwd, _fused_bwd)


@functools.partial(jax.jit, static_argnames=("scale", "tiling", "interpret",
                                             "implementation"))
def routed_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    region_index: jax.Array,
    *,
    scale: float,
    kv_mask: jax.Array | None = None,
    tiling: RoutedAttentionTiling = RoutedAttentionTiling(),
    interpret: bool | None = None,
    implementation: str | None = None,
) -> jax.Array:
  """Token-to-token attention over routed regions as one Pallas kernel.

  The same function as :func:`routed_attention_reference`, differentiable in
  ``q``, ``k`` and ``v`` (once) by a Pallas backward; see the module
  docstring for the algorithm. Tokens are zero-padded to whole blocks (the
  padded keys get no probability, even in a row whose keys ``kv_mask`` masks
  entirely) and head widths to a power of two ≥ 16, then sliced back.

  Args:
    q: queries ``[batch, heads, regions, q_tokens, qk_head_dim]``.
    k: keys ``[batch, heads, regions, kv_tokens, qk_head_dim]``.
    v: values ``[batch, heads, regions, kv_tokens, v_head_dim]``.
    region_index: ``[batch, regions, topk]`` integer routed key regions, in
      ``[0, regions)``, shared by all heads (not checked in range).
    scale: logit multiplier (static).
    kv_mask: optional ``[batch, regions, kv_tokens]`` bool, true for real
      keys (as in the reference).
    tiling: tile sizes (static).
    interpret: run in the Pallas interpreter; ``None``: when the default
      backend is the CPU.
    implementation: ``"triton"`` or ``"mosaic_tpu"``; ``None``:
      ``"mosaic_tpu"`` on a TPU backend, else ``"triton"``.

  Returns:
    ``[batch, heads, regions, q_tokens, v_head_dim]`` in the promoted input
    dtype; logits, softmax and products accumulate in float32.

  Raises:
    ValueError: inconsistent shapes, a non-integer ``region_index``, or an
      unknown implementation.
  """
  _check_shapes(q, k, v, region_index, kv_mask)
  interpret, implementation = _lowering.resolve(interpret, implementation)
  dtype = jnp.result_type(q, k, v)
  (*_, tq, d), (*_, tk, dv) = q.shape, v.shape
  if 0 in q.shape or 0 in k.shape or 0 in v.shape or 0 in region_index.shape:
    return jnp.zeros((*q.shape[:4], dv), dtype)
  block_q = min(tiling.block_q, _triton_size(tq))
  block_kv = min(tiling.block_kv, _triton_size(tk))
  tiling = dataclasses.replace(tiling, block_q=block_q, block_kv=block_kv)
  q = _pad_axis(_pad_axis(q.astype(dtype), 3, block_q), 4, _triton_size(d))
  k = _pad_axis(_pad_axis(k.astype(dtype), 3, block_kv), 4, _triton_size(d))
  v = _pad_axis(_pad_axis(v.astype(dtype), 3, block_kv), 4, _triton_size(dv))
  if kv_mask is None:
    kv_mask = jnp.ones((*region_index.shape[:2], tk), jnp.int32)
  kv_mask = jnp.pad(kv_mask.astype(jnp.int32),
                    ((0, 0), (0, 0), (0, -tk % block_kv)),
                    constant_values=PADDED)
  out = _fused(q, k, v, kv_mask, region_index.astype(jnp.int32), float(scale),
               tiling, interpret, implementation, tk)
  return out[..., :tq, :dv]
