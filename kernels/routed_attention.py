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

Only the plain-``jnp`` oracle lives here for now; it materialises the
gathered keys/values (``topk`` times the size of ``k``/``v``) and the
``[..., Tq, topk · Tkv]`` logits. The Pallas kernel will sit beside it.

References:
  Zhu, Wang, Ke, Zhang, Lau, "BiFormer: Vision Transformer with Bi-Level
  Routing Attention", CVPR 2023, §3.2 (token-to-token
  attention: gather of the routed K/V, then attention).
"""

import jax
import jax.numpy as jnp


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
