"""BiFormer's bi-level routing attention (BRA) module (Flax NNX).

A port of the official legacy ``ops/bra_legacy.py::BiLevelRoutingAttention``
(the module of the released BiFormer-T/S/B checkpoints) with
``kv_downsample_mode='identity'``, ``param_attention='qkvo'`` and the released
routing flags (no routing parameters, no differentiable or soft routing).
For an NHWC input split into ``S x S`` regions (row-major region ids) of
``T = HW / S²`` tokens:

    q, k, v = x W_qkv + b                       (widths qk_dim, qk_dim, dim)
    A_r = (scale · mean_T(q)) mean_T(k)ᵀ        [S², S²]   region affinity
    I_r = topkIndex(A_r)                         [S², topk] routing
    O = routed_attention(q, k, v, I_r) + LCE(v)             token attention
    out = O W_o + b_o

(paper §3.2; equation numbers are left out as they were not checked).

Quirks of the official code kept on purpose, since the checkpoints rely on
them:

* ``scale = qk_dim ** -0.5`` of the full query width, not of the head width,
  in both the routing logits and the token attention.
* Routing runs on region means under ``stop_gradient``; the official top-k
  softmax is never used, so it is not computed. All heads share one routing.
* LCE is a depthwise ``side_dwconv`` conv (with bias, zero padding
  ``side_dwconv // 2``) on ``v`` laid out as the full map, so it crosses
  region borders.
* ``auto_pad`` zero-pads the *input* at the bottom/right before the
  projection, so padded tokens carry the projection bias, take part in the
  region means, and are attended to as keys; the output is cropped back.
  ``mask_padding=True`` (ours, off by default) instead excludes padded tokens
  from the region means (like the official ``nchwBRA``'s
  ``count_include_pad=False``), never routes to an all-padding region, and
  masks padded keys in the softmax.

``topk`` of -1 / -2 select other token mixers in the official BiFormer block
(plain MHSA / ``AttentionLePE``); they are not BRA and are rejected here.

References:
  Zhu, Wang, Ke, Zhang, Lau, "BiFormer: Vision Transformer with Bi-Level
  Routing Attention", CVPR 2023, §3.2; official code rayleizhu/BiFormer.
"""

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kernels import routed_attention, routed_attention_reference

ATTENTION_IMPLS = {"reference": routed_attention_reference,
                   "pallas": routed_attention}

_TORCH_TO_OURS = {
    "qkv.qkv.weight": ("qkv_kernel", lambda w: w.T),
    "qkv.qkv.bias": ("qkv_bias", lambda b: b),
    "lepe.weight": ("lepe_kernel", lambda w: w.transpose(2, 3, 1, 0)),
    "lepe.bias": ("lepe_bias", lambda b: b),
    "wo.weight": ("out_kernel", lambda w: w.T),
    "wo.bias": ("out_bias", lambda b: b),
}


def _to_regions(x: jax.Array, n_win: int, heads: int) -> jax.Array:
  """``[B, S·h, S·w, heads·d]`` → ``[B, heads, S², h·w, d]``."""
  b, hh, ww, c = x.shape
  h, w = hh // n_win, ww // n_win
  x = x.reshape(b, n_win, h, n_win, w, heads, c // heads)
  x = x.transpose(0, 5, 1, 3, 2, 4, 6)
  return x.reshape(b, heads, n_win * n_win, h * w, c // heads)


def _from_regions(x: jax.Array, n_win: int, h: int, w: int) -> jax.Array:
  """Inverse of ``_to_regions``: ``[B, heads, S², h·w, d]`` → NHWC."""
  b, heads, _, _, d = x.shape
  x = x.reshape(b, heads, n_win, n_win, h, w, d)
  x = x.transpose(0, 2, 4, 3, 5, 1, 6)
  return x.reshape(b, n_win * h, n_win * w, heads * d)


def _depthwise_conv(dim: int, size: int, **layer) -> nnx.Conv:
  """``size × size`` depthwise conv, zero "same" padding (odd ``size``)."""
  pad = size // 2
  return nnx.Conv(dim, dim, (size, size), padding=((pad, pad), (pad, pad)),
                  feature_group_count=dim, **layer)


class BiLevelRoutingAttention(nnx.Module):
  """Bi-level routing attention on NHWC maps (legacy official module).

  Attributes:
    qkv: ``nnx.Linear`` ``dim → 2·qk_dim + dim``, output ``[q | k | v]``.
    lepe: depthwise ``nnx.Conv`` on ``v`` (the LCE), or ``None`` when
      ``side_dwconv == 0``.
    wo: output ``nnx.Linear`` ``dim → dim``.
  """

  def __init__(
      self,
      dim: int,
      num_heads: int,
      n_win: int,
      topk: int,
      qk_dim: int | None = None,
      qk_scale: float | None = None,
      *,
      side_dwconv: int = 5,
      auto_pad: bool = False,
      mask_padding: bool = False,
      dtype: jnp.dtype = jnp.float32,
      param_dtype: jnp.dtype = jnp.float32,
      attention_impl: str = "reference",
      rngs: nnx.Rngs,
  ):
    """Builds the layers.

    Args:
      dim: channels ``C`` of the input, the values and the output.
      num_heads: heads ``m``; must divide ``qk_dim`` and ``dim``.
      n_win: regions per side ``S`` (``S²`` regions).
      topk: routed key/value regions per query region, ``1 ≤ topk ≤ S²``.
      qk_dim: query/key width; ``None`` for ``dim`` (all released models).
      qk_scale: logit scale; ``None`` for ``qk_dim ** -0.5`` (official).
      side_dwconv: odd LCE kernel size, or 0 for no LCE (official BiFormer
        passes 5; the legacy module's own default is 3).
      auto_pad: zero-pad H and W up to multiples of ``n_win`` as the official
        code does; otherwise such inputs raise.
      mask_padding: with ``auto_pad``, keep padded tokens out of routing and
        attention (not official; see the module docstring).
      dtype: compute dtype; routing logits use at least float32.
      param_dtype: parameter dtype.
      attention_impl: token-attention backend, a key of ``ATTENTION_IMPLS``:
        ``"reference"`` (plain ``jnp``, gathers the routed keys/values) or
        ``"pallas"`` (the fused kernel of :mod:`kernels.routed_attention`,
        interpreted on CPU).
      rngs: NNX RNG streams; uses ``params``.

    Raises:
      ValueError: invalid ``topk``, head split, ``side_dwconv`` or
        ``attention_impl``.
    """
    qk_dim = qk_dim or dim
    if qk_dim % num_heads or dim % num_heads:
      raise ValueError(
          f"{qk_dim=} and {dim=} must be divisible by {num_heads=}")
    if not 1 <= topk <= n_win * n_win:
      raise ValueError(
          f"{topk=} must be in [1, n_win² = {n_win * n_win}]; topk -1 / -2"
          " select plain MHSA / AttentionLePE in the BiFormer block, not BRA")
    if side_dwconv < 0 or (side_dwconv and side_dwconv % 2 == 0):
      raise ValueError(f"{side_dwconv=} must be 0 or odd")
    if attention_impl not in ATTENTION_IMPLS:
      raise ValueError(
          f"unknown {attention_impl=}; valid: {tuple(ATTENTION_IMPLS)}")
    self.dim, self.qk_dim, self.num_heads = dim, qk_dim, num_heads
    self.n_win, self.topk = n_win, topk
    self.scale = qk_scale or qk_dim ** -0.5
    self.auto_pad, self.mask_padding = auto_pad, mask_padding
    self.dtype = dtype
    self.attention_impl = attention_impl
    layer = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.qkv = nnx.Linear(dim, 2 * qk_dim + dim, **layer)
    self.lepe = nnx.data(
        _depthwise_conv(dim, side_dwconv, **layer) if side_dwconv else None)
    self.wo = nnx.Linear(dim, dim, **layer)

  def _pad(self, x: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    """Zero-pads bottom/right; returns the map and a ``[Hp, Wp]`` validity."""
    _, height, width, _ = x.shape
    pad_b, pad_r = -height % self.n_win, -width % self.n_win
    if not (pad_b or pad_r):
      return x, None
    if not self.auto_pad:
      raise ValueError(
          f"BiLevelRoutingAttention input {x.shape} (N, H, W, C): {height=}"
          f" and {width=} must be divisible by n_win={self.n_win}; pass"
          " auto_pad=True to zero-pad them")
    x = jnp.pad(x, ((0, 0), (0, pad_b), (0, pad_r), (0, 0)))
    valid = ((jnp.arange(height + pad_b) < height)[:, None]
             & (jnp.arange(width + pad_r) < width)[None, :])
    return x, valid

  def _route(self, q, k, token_mask) -> jax.Array:
    """Region-to-region top-k routing (§3.2) on detached region means.

    Args:
      q, k: ``[B, 1, S², T, qk_dim]`` (all heads as one).
      token_mask: ``None`` or ``[S², T]`` bool of real tokens.

    Returns:
      ``[B, S², topk]`` int32 region ids.
    """
    acc = jnp.promote_types(self.dtype, jnp.float32)
    q, k = (jax.lax.stop_gradient(t[:, 0]).astype(acc) for t in (q, k))
    if token_mask is None:
      q_r, k_r = q.mean(axis=2), k.mean(axis=2)
    else:
      weight = token_mask[None, :, :, None].astype(acc)
      count = jnp.maximum(weight.sum(axis=2), 1.0)
      q_r = (q * weight).sum(axis=2) / count
      k_r = (k * weight).sum(axis=2) / count
    logits = jnp.einsum("brc,bsc->brs", q_r * self.scale, k_r)
    if token_mask is not None:
      logits = jnp.where(token_mask.any(axis=1)[None, None, :], logits,
                         jnp.finfo(acc).min)
    _, index = jax.lax.top_k(logits, self.topk)
    return index.astype(jnp.int32)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Applies BRA.

    Args:
      x: ``[batch, H, W, dim]`` (NHWC, already normalised by the block).

    Returns:
      ``[batch, H, W, dim]`` in the compute dtype.

    Raises:
      ValueError: H or W not divisible by ``n_win`` and ``auto_pad`` off.
    """
    batch, height, width, _ = x.shape
    x, valid = self._pad(x)
    n_win, heads = self.n_win, self.num_heads
    h, w = x.shape[1] // n_win, x.shape[2] // n_win
    q, k, v = jnp.split(self.qkv(x), [self.qk_dim, 2 * self.qk_dim], axis=-1)
    token_mask = None
    if valid is not None and self.mask_padding:
      token_mask = _to_regions(valid[None, :, :, None], n_win, 1)[0, 0, ..., 0]
    index = self._route(_to_regions(q, n_win, 1), _to_regions(k, n_win, 1),
                        token_mask)
    kv_mask = None
    if token_mask is not None:
      kv_mask = jnp.broadcast_to(token_mask, (batch, *token_mask.shape))
    out = ATTENTION_IMPLS[self.attention_impl](
        _to_regions(q, n_win, heads), _to_regions(k, n_win, heads),
        _to_regions(v, n_win, heads), index, scale=self.scale,
        kv_mask=kv_mask)
    out = _from_regions(out, n_win, h, w)
    if self.lepe is not None:
      out = out + self.lepe(v)
    return self.wo(out)[:, :height, :width, :]


def load_official_bra_weights(
    module: BiLevelRoutingAttention, weights: Mapping[str, Any]) -> None:
  """Copies official BRA weights into ``module`` in place.

  Args:
    module: a ``BiLevelRoutingAttention`` of matching sizes.
    weights: either the fixture layout ``{'qkv_kernel': [C, 2·qk_dim + C],
      'qkv_bias', 'lepe_kernel': [k, k, 1, C] (HWIO), 'lepe_bias',
      'out_kernel': [C, C], 'out_bias'}`` or a PyTorch ``state_dict`` of the
      legacy module (``qkv.qkv.weight`` ``[out, in]``, ``lepe.weight``
      ``[C, 1, k, k]``, ``wo.weight``, biases), as numpy-convertible arrays.
      Other keys are ignored.

  Raises:
    KeyError: a needed weight is missing.
    ValueError: a weight's shape does not match the module.
  """
  if "qkv.qkv.weight" in weights:
    weights = {ours: convert(np.asarray(weights[theirs]))
               for theirs, (ours, convert) in _TORCH_TO_OURS.items()
               if theirs in weights}
  targets = {
      "qkv_kernel": module.qkv.kernel, "qkv_bias": module.qkv.bias,
      "out_kernel": module.wo.kernel, "out_bias": module.wo.bias,
  }
  if module.lepe is not None:
    targets.update(lepe_kernel=module.lepe.kernel, lepe_bias=module.lepe.bias)
  for name, param in targets.items():
    value, current = np.asarray(weights[name]), param[...]
    if value.shape != current.shape:
      raise ValueError(
          f"{name}: official shape {value.shape} != module shape"
          f" {current.shape}")
    param[...] = jnp.asarray(value, dtype=current.dtype)


# ---------------------------------------------------------------------------
# Full BiFormer (official ``models/biformer.py::BiFormer``), NHWC throughout.

_GELU = lambda x: jax.nn.gelu(x, approximate=False)  # torch nn.GELU()


def _linear(din: int, dout: int, *, use_bias: bool = True, **layer):
  """``nnx.Linear`` with the official init (trunc. normal 0.02, zero bias)."""
  return nnx.Linear(
      din, dout, use_bias=use_bias,
      kernel_init=nnx.initializers.truncated_normal(stddev=0.02), **layer)


def _conv3x3(din: int, dout: int, stride: int, **layer) -> nnx.Conv:
  """PyTorch ``Conv2d(din, dout, 3, stride, padding=1)`` (with bias)."""
  return nnx.Conv(din, dout, (3, 3), strides=(stride, stride),
                  padding=((1, 1), (1, 1)), **layer)


def _batch_norm(dim: int, **layer) -> nnx.BatchNorm:
  """PyTorch ``BatchNorm2d`` defaults (momentum 0.1, eps 1e-5)."""
  return nnx.BatchNorm(dim, momentum=0.9, epsilon=1e-5, **layer)


def _drop_path(x: jax.Array, rate: float, deterministic: bool,
               rngs: nnx.Rngs | None) -> jax.Array:
  """Stochastic depth: zeroes whole samples with prob. ``rate``, rescales.

  Args:
    x: ``[B, ...]`` residual branch output.
    rate: drop probability of this block.
    deterministic: no-op when ``True`` (or ``rate == 0``).
    rngs: streams with ``dropout``; required when the branch is dropped.

  Returns:
    ``x`` of the same shape, per-sample masked and scaled by ``1/(1-rate)``.
  """
  if deterministic or rate == 0.0:
    return x
  if rngs is None:
    raise ValueError("drop path with deterministic=False needs rngs with a"
                     " 'dropout' stream")
  keep = 1.0 - rate
  mask = jax.random.bernoulli(rngs.dropout(), keep,
                              (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(mask, x / keep, jnp.zeros_like(x))


class MultiHeadSelfAttention(nnx.Module):
  """Global MHSA, optionally with LePE (official ``Attention`` /
  ``AttentionLePE`` used for ``topk`` -1 / -2).

  Quirks kept: ``qkv`` has no bias; ``scale = head_dim ** -0.5``; the block
  does not pass ``num_heads`` so it is 8; the LePE (``side_dwconv`` depthwise
  conv with bias) is applied to the attention *input* ``x``, not to ``v``.

  Attributes:
    qkv: ``nnx.Linear`` ``dim → 3·dim`` without bias, output ``[q | k | v]``.
    proj: output ``nnx.Linear`` ``dim → dim``.
    lepe: depthwise ``nnx.Conv`` on the input, or ``None``.
  """

  def __init__(self, dim: int, num_heads: int = 8, *, side_dwconv: int = 0,
               dtype: jnp.dtype = jnp.float32,
               param_dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
    """Builds the layers.

    Args:
      dim: channels ``C``; must be divisible by ``num_heads``.
      num_heads: heads (official default 8).
      side_dwconv: LePE kernel size (5 for ``AttentionLePE``), 0 for none.
      dtype: compute dtype.
      param_dtype: parameter dtype.
      rngs: NNX RNG streams; uses ``params``.
    """
    if dim % num_heads:
      raise ValueError(f"{dim=} must be divisible by {num_heads=}")
    self.num_heads = num_heads
    self.scale = (dim // num_heads) ** -0.5
    layer = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.qkv = _linear(dim, 3 * dim, use_bias=False, **layer)
    self.proj = _linear(dim, dim, **layer)
    self.lepe = nnx.data(
        _depthwise_conv(dim, side_dwconv, **layer) if side_dwconv else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Applies attention over all ``H·W`` tokens.

    Args:
      x: ``[batch, H, W, dim]`` (normalised).

    Returns:
      ``[batch, H, W, dim]``.
    """
    b, h, w, c = x.shape
    heads = self.num_heads
    qkv = self.qkv(x).reshape(b, h * w, 3, heads, c // heads)
    q, k, v = (qkv[:, :, i] for i in range(3))  # [B, N, heads, d]
    logits = jnp.einsum("bnhd,bmhd->bhnm", q * self.scale, k)
    probs = jax.nn.softmax(
        logits.astype(jnp.promote_types(logits.dtype, jnp.float32)),
        axis=-1).astype(v.dtype)
    out = jnp.einsum("bhnm,bmhd->bnhd", probs, v).reshape(b, h, w, c)
    if self.lepe is not None:
      out = out + self.lepe(x)
    return self.proj(out)


class BiFormerBlock(nnx.Module):
  """One BiFormer block (pre-norm; official ``Block``), NHWC in and out.

  ``x += DWConv3x3(x)``; ``x += DropPath(γ₁·Mixer(LN(x)))``;
  ``x += DropPath(γ₂·MLP(LN(x)))``, where the mixer is BRA for ``topk > 0``,
  MHSA for ``topk == -1`` and MHSA + LePE for ``topk == -2`` (8 heads).

  Attributes:
    pos_embed: depthwise 3x3 conv (conditional positional encoding).
    norm1, norm2: ``LayerNorm`` (eps 1e-6).
    attn: the token mixer.
    fc1, fc2: MLP ``dim → mlp_ratio·dim → dim`` with exact GELU.
    gamma1, gamma2: layer scale ``nnx.Param`` ``[dim]`` or ``None``.
  """

  def __init__(
      self, dim: int, *, num_heads: int, n_win: int, topk: int,
      mlp_ratio: float = 3.0, drop_path: float = 0.0,
      layer_scale_init_value: float = -1.0, side_dwconv: int = 5,
      dtype: jnp.dtype = jnp.float32, param_dtype: jnp.dtype = jnp.float32,
      attention_impl: str = "reference", rngs: nnx.Rngs):
    """Builds the block.

    Args:
      dim: channels ``C``.
      num_heads: BRA heads (``qk_dim // head_dim``); unused for MHSA.
      n_win: BRA regions per side.
      topk: routed regions (> 0), or -1 (MHSA) / -2 (MHSA + LePE).
      mlp_ratio: hidden width factor of the MLP.
      drop_path: stochastic depth rate of this block.
      layer_scale_init_value: > 0 enables layer scale with this init.
      side_dwconv: LCE / LePE kernel size.
      dtype: compute dtype.
      param_dtype: parameter dtype.
      attention_impl: BRA backend (see ``ATTENTION_IMPLS``).
      rngs: NNX RNG streams; uses ``params``.

    Raises:
      ValueError: ``topk`` is 0 or below -2 (the conv mixer is not ported).
    """
    layer = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.drop_path = drop_path
    self.pos_embed = _depthwise_conv(dim, 3, **layer)
    self.norm1 = nnx.LayerNorm(dim, epsilon=1e-6, **layer)
    if topk > 0:
      attn = BiLevelRoutingAttention(
          dim, num_heads, n_win, topk, side_dwconv=side_dwconv,
          attention_impl=attention_impl, **layer)
    elif topk in (-1, -2):
      attn = MultiHeadSelfAttention(
          dim, side_dwconv=side_dwconv if topk == -2 else 0, **layer)
    else:
      raise ValueError(f"{topk=} not supported (> 0, -1 or -2)")
    self.attn = attn
    self.norm2 = nnx.LayerNorm(dim, epsilon=1e-6, **layer)
    hidden = int(mlp_ratio * dim)
    self.fc1 = _linear(dim, hidden, **layer)
    self.fc2 = _linear(hidden, dim, **layer)
    gamma1 = gamma2 = None
    if layer_scale_init_value > 0:
      gamma1, gamma2 = (
          nnx.Param(jnp.full((dim,), layer_scale_init_value, param_dtype))
          for _ in range(2))
    self.gamma1, self.gamma2 = nnx.data(gamma1), nnx.data(gamma2)

  def __call__(self, x: jax.Array, *, deterministic: bool = True,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    """Applies the block.

    Args:
      x: ``[batch, H, W, dim]``.
      deterministic: disables drop path.
      rngs: streams with ``dropout`` (only read if ``deterministic=False``).

    Returns:
      ``[batch, H, W, dim]``.
    """
    x = x + self.pos_embed(x)
    y = self.attn(self.norm1(x))
    if self.gamma1 is not None:
      y = y * self.gamma1[...]
    x = x + _drop_path(y, self.drop_path, deterministic, rngs)
    y = self.fc2(_GELU(self.fc1(self.norm2(x))))
    if self.gamma2 is not None:
      y = y * self.gamma2[...]
    return x + _drop_path(y, self.drop_path, deterministic, rngs)


class BiFormer(nnx.Module):
  """BiFormer image classifier (Zhu et al., CVPR 2023; official ``BiFormer``).

  Stem: Conv3x3/2 (3 → C₁/2) + BN + GELU + Conv3x3/2 (→ C₁) + BN (stride 4);
  merging before stages 2-4: Conv3x3/2 + BN; four stages of
  ``BiFormerBlock``; BN; global average pool; linear head. Input is NHWC.
  BatchNorm uses batch statistics when ``deterministic=False`` (training).

  Attributes:
    downsample: ``nnx.List`` of 4 ``nnx.List`` layer sequences.
    stages: ``nnx.List`` of 4 ``nnx.List`` of ``BiFormerBlock``.
    norm: final ``BatchNorm``.
    head: ``nnx.Linear`` ``C₄ → num_classes`` or ``None``.
  """

  def __init__(
      self, *, depths=(2, 2, 8, 2), embed_dims=(64, 128, 256, 512),
      head_dim: int = 32, n_win: int = 7, topks=(1, 4, 16, -2),
      mlp_ratios=(3, 3, 3, 3), in_chans: int = 3, num_classes: int = 1000,
      drop_path_rate: float = 0.0, layer_scale_init_value: float = -1.0,
      side_dwconv: int = 5, stem_strides: tuple[int, int] = (2, 2),
      dtype: jnp.dtype = jnp.float32, param_dtype: jnp.dtype = jnp.float32,
      attention_impl: str = "reference", rngs: nnx.Rngs):
    """Builds the network.

    Args:
      depths: blocks per stage.
      embed_dims: channels per stage (``qk_dim == dim`` as released).
      head_dim: BRA head width; heads = ``dim // head_dim``.
      n_win: BRA regions per side; stage maps must be divisible by it.
      topks: per stage: routed regions, or -1 / -2 (see ``BiFormerBlock``).
      mlp_ratios: MLP widths per stage.
      in_chans: input channels.
      num_classes: classes; 0 for no head (pooled features).
      drop_path_rate: final stochastic depth rate, linear from 0 over blocks.
      layer_scale_init_value: > 0 enables layer scale; -1 (released) off.
      side_dwconv: LCE / LePE kernel size.
      stem_strides: strides of the stem's two convs: the official
        ``(2, 2)`` (total stride 4); ``(1, 2)`` halves every stage map, e.g.
        16², 8², 4², 2² for 32² images.
      dtype: compute dtype.
      param_dtype: parameter dtype.
      attention_impl: BRA backend.
      rngs: NNX RNG streams; uses ``params``.
    """
    layer = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    c0 = embed_dims[0]
    s1, s2 = stem_strides
    downsample = [nnx.List([
        _conv3x3(in_chans, c0 // 2, s1, **layer),
        _batch_norm(c0 // 2, **layer), _GELU,
        _conv3x3(c0 // 2, c0, s2, **layer), _batch_norm(c0, **layer)])]
    for cin, cout in zip(embed_dims[:-1], embed_dims[1:]):
      downsample.append(nnx.List([_conv3x3(cin, cout, 2, **layer),
                                  _batch_norm(cout, **layer)]))
    self.downsample = nnx.List(downsample)
    rates = np.linspace(0.0, drop_path_rate, sum(depths)).tolist()
    stages, i = [], 0
    for depth, dim, topk, ratio in zip(depths, embed_dims, topks, mlp_ratios):
      stages.append(nnx.List([
          BiFormerBlock(
              dim, num_heads=dim // head_dim, n_win=n_win, topk=topk,
              mlp_ratio=ratio, drop_path=rates[i + j],
              layer_scale_init_value=layer_scale_init_value,
              side_dwconv=side_dwconv, attention_impl=attention_impl,
              **layer)
          for j in range(depth)]))
      i += depth
    self.stages = nnx.List(stages)
    self.norm = _batch_norm(embed_dims[-1], **layer)
    self.head = nnx.data(
        _linear(embed_dims[-1], num_classes, **layer) if num_classes > 0
        else None)

  def __call__(self, x: jax.Array, *, deterministic: bool = True,
               rngs: nnx.Rngs | None = None,
               use_running_average: bool | None = None) -> jax.Array:
    """Classifies a batch.

    Args:
      x: ``[batch, H, W, in_chans]``; H, W divisible by the total stride
        (32 with the official stem) and the stage maps (H/4, ..., H/32) by
        ``n_win`` for BRA stages.
      deterministic: eval mode (running BN statistics, no drop path).
      rngs: streams with ``dropout``; needed if ``deterministic=False`` and
        ``drop_path_rate > 0``.
      use_running_average: BatchNorm mode if not None, else
        ``deterministic``; ``False`` with ``deterministic=True`` gives batch
        statistics without drop path (to recalibrate BatchNorm).

    Returns:
      ``[batch, num_classes]`` logits (``[batch, C₄]`` without a head).
    """
    if use_running_average is None:
      use_running_average = deterministic
    for down, stage in zip(self.downsample, self.stages):
      for op in down:
        if isinstance(op, nnx.BatchNorm):
          x = op(x, use_running_average=use_running_average)
        else:
          x = op(x)
      for block in stage:
        x = block(x, deterministic=deterministic, rngs=rngs)
    x = self.norm(x, use_running_average=use_running_average).mean(
        axis=(1, 2))
    return x if self.head is None else self.head(x)


def biformer_tiny(rngs: nnx.Rngs, num_classes: int = 1000,
                  **kwargs) -> BiFormer:
  """BiFormer-T (13,142,760 params at 1000 classes)."""
  return BiFormer(depths=(2, 2, 8, 2), embed_dims=(64, 128, 256, 512),
                  num_classes=num_classes, rngs=rngs, **kwargs)


def biformer_small(rngs: nnx.Rngs, num_classes: int = 1000,
                   **kwargs) -> BiFormer:
  """BiFormer-S (25,536,232 params at 1000 classes)."""
  return BiFormer(depths=(4, 4, 18, 4), embed_dims=(64, 128, 256, 512),
                  num_classes=num_classes, rngs=rngs, **kwargs)


def biformer_base(rngs: nnx.Rngs, num_classes: int = 1000,
                  **kwargs) -> BiFormer:
  """BiFormer-B (56,804,968 params at 1000 classes)."""
  return BiFormer(depths=(4, 4, 18, 4), embed_dims=(96, 192, 384, 768),
                  num_classes=num_classes, rngs=rngs, **kwargs)
