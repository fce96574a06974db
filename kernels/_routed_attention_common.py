"""Pieces shared by the routed-attention lowerings (Triton and Mosaic).

The lowerings receive padded inputs (see :mod:`kernels.routed_attention`):

* ``q [B, H, R, Tq, D]``, ``k [B, H, R, Tk, D]``, ``v [B, H, R, Tk, Dv]`` of
  one dtype, ``Tq`` a multiple of ``block_q``, ``Tk`` of ``block_kv``;
* ``kv_mask [B, R, Tk]`` int32: 1 for a real key; 0 for a key masked by the
  caller, whose logit is the float32 minimum (as in the reference, so a query
  with no real key averages its keys uniformly); ``PADDED`` (-1) for a key
  added by the padding, whose logit is -inf (no probability even then);
* ``region_index [B, R, K]`` int32 in ``[0, R)``.

Each lowering exposes ``forward`` → ``(out, lse)``, ``backward_dq`` → ``dq``
and ``backward_dkv`` → ``(dk, dv)``, gradients in float32; ``backward_dkv``
also takes ``num_keys = K · (unpadded Tk)``, the keys a query with no real key
averages.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

F32 = jnp.float32
MASKED_LOGIT = float(jnp.finfo(F32).min)
PADDED = -1


class InverseRoutes(NamedTuple):
  """The routing inverted: for each key region, the query regions that chose
  it, as entries sorted by key region (``[B, N]`` int32 each, ``N = R·K + R``).

  Every key region owns one extra entry with ``valid = 0`` (its query region
  is 0), so each key region has at least one entry and a kernel that walks
  them writes every dK/dV block, zeros for a region nobody chose. The sort
  is stable, so the filler is always the last entry of its key region.

  Attributes:
    key_region: key region of each entry, non-decreasing along ``N``.
    query_region: the query region that routed to it.
    valid: 1 for a real route, 0 for the per-region filler entry.
    offsets: ``[B, R + 1]``: key region ``c`` owns entries
      ``[offsets[b, c], offsets[b, c + 1])``.
  """

  key_region: jax.Array
  query_region: jax.Array
  valid: jax.Array
  offsets: jax.Array


def invert_routes(region_index: jax.Array) -> InverseRoutes:
  """Inverts ``region_index [B, R, K]`` (a stable sort by key region)."""
  batch, regions, topk = region_index.shape
  query = jnp.broadcast_to(jnp.arange(regions, dtype=jnp.int32)[:, None],
                           (regions, topk)).reshape(-1)
  filler = jnp.arange(regions, dtype=jnp.int32)

  def one(index):
    keys = jnp.concatenate([index.reshape(-1).astype(jnp.int32), filler])
    queries = jnp.concatenate([query, jnp.zeros_like(filler)])
    valid = jnp.concatenate([jnp.ones_like(query), jnp.zeros_like(filler)])
    order = jnp.argsort(keys, stable=True)
    keys = keys[order]
    offsets = jnp.searchsorted(keys, jnp.arange(regions + 1), side="left")
    return keys, queries[order], valid[order], offsets.astype(jnp.int32)

  return InverseRoutes(*jax.vmap(one)(region_index))


def dot(x, y, contract: tuple[int, int]):
  """``x · y`` contracting ``x``'s axis ``contract[0]`` with ``y``'s
  ``contract[1]`` (2-D operands), accumulated in float32."""
  dims = (((contract[0],), (contract[1],)), ((), ()))
  return lax.dot_general(x, y, dims, preferred_element_type=F32)


def mask_logits(logits, mask):
  """Real keys (``mask > 0``) keep their logit, masked ones (0) get the
  float32 minimum, padded ones (``PADDED``) -inf; ``mask`` broadcasts."""
  return jnp.where(mask > 0, logits,
                   jnp.where(mask == PADDED, -jnp.inf, MASKED_LOGIT))


def masked_logits(q, k, mask_row, scale: float):
  """``[bq, bkv]`` float32 logits ``scale · q kᵀ`` through :func:`mask_logits`;
  ``mask_row [bkv]`` (or ``[1, bkv]``) int32."""
  return mask_logits(dot(q, k, (1, 1)) * scale, mask_row.reshape(1, -1))


def probabilities(logits, lse, num_keys: int):
  """``[bq, bkv]`` softmax probabilities ``exp(s − lse)`` from the forward's
  log-sum-exp ``lse [bq]``.

  A row whose routed keys are all masked has ``lse`` equal to the masked
  logit (``log(num_keys)`` vanishes in its rounding), which would give every
  key probability 1; its true softmax is uniform, ``1 / num_keys`` over the
  ``num_keys = topk · Tk`` routed keys (padding excluded; padded keys have a
  logit of -inf, so their probability is 0 either way).
  """
  p = jnp.exp(logits - lse[:, None])
  return jnp.where(lse[:, None] == MASKED_LOGIT, p / num_keys, p)
