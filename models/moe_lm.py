r"""A small decoder-only language model whose FFN is dense or a routed MoE.

Tokens ``[B, L]`` → embedding → ``num_layers`` pre-norm blocks

    h ← h + Attn(RMSNorm(h)),    h ← h + FFN(RMSNorm(h))

(causal multi-head self-attention with rotary position embeddings, no
biases) → RMSNorm → output projection (its own matrix, or the embedding's
transpose scaled by ``d^{-1/2}`` when ``tie_embeddings``) → logits
``[B, L, V]``. The FFN is chosen by ``MoeLMConfig.ffn`` (``FFN_KINDS``),
each built on :mod:`models.moe` (router, then :func:`models.moe.moe_ffn`
with a configurable dispatch ``path``; experts ``FFN_e(x) = gelu(x W_in[e])
W_out[e]`` with ``W_in [E, d, f]`` and ``W_out [E, f, d]`` as ``nnx.Param``):

================  ===========================================================
``ffn``           FFN
================  ===========================================================
``dense``         ``gelu(x W_in) W_out`` with hidden ``h`` (below)
``top2``          :func:`~models.moe.top_k_routing`, ``k`` experts per token
``top_p``         :func:`~models.moe.top_p_routing` (``p = 0.4``)
``expert_choice`` :func:`~models.moe.expert_choice_routing` with capacity
                  factor ``k`` (each expert takes ``k T / E`` of the batch's
                  ``T`` tokens); it sees the whole batch, so a token's routing
                  depends on later tokens: a leak in a causal LM
``coe``           :func:`~models.moe.chain_of_experts`, ``C`` iterations of
                  top-``k/C`` with one gate each; the block adds
                  ``x⁽ᶜ⁾ − x⁽⁰⁾`` (the released layer returns ``x⁽ᶜ⁾`` and
                  drops the outer residual; keeping it makes the blocks of
                  every variant identical outside the FFN)
``dynmole_lora``  a dense FFN of hidden ``h_b`` whose two projections carry
                  ``E`` routed LoRA adapters (rank ``r``, scale ``α / r``,
                  :func:`~models.moe.routed_lora_linear`) under DynMoLE's
                  hybrid router (:func:`~models.moe.dynmole_routing`)
================  ===========================================================

Matched active parameters. *Active* parameters are those a token's forward
pass multiplies with, counted once per use (so they are proportional to the
FLOPs). Per layer, with ``d`` the width, ``E`` experts of hidden ``f``,
``k`` (``active_experts``) experts per token, ``C`` CoE iterations and LoRA
rank ``r``:

* ``top2``, ``top_p``, ``expert_choice``: ``A = 2 k d f + d E`` (``k``
  experts and the router). ``top_p`` and ``expert_choice`` use ``k``
  experts per token *on average* only: top-p's count is learnt (the
  ``experts_per_token`` metric), expert choice's is ``k`` exactly on
  average over the batch.
* ``coe``: ``C`` iterations of ``k / C`` experts: ``2 k d f + C d E``.
* ``dense``: ``2 d h`` with ``h = round(A / 2d) = k f + E / 2``.
* ``dynmole_lora``: ``2 d h_b + d E + 2 E r (d + h_b)`` (every adapter is
  evaluated, :func:`~models.moe.routed_lora` being dense over experts),
  with ``h_b = round((A − d E − 2 E r d) / (2 d + 2 E r))``.

With the defaults (``d = 128, E = 8, f = 256, k = 2, C = 2, r = 16``):
``A = 132,096`` for the routed variants and dense (``h = 516``) and
dynmole_lora (``h_b = 192``), ``133,120`` for coe (+0.8 %). Attention
(``4 d²``), norms and the output projection (``V d``) are the same in every
variant; :func:`active_params` adds them up.

The model returns ``(logits, aux)``; ``aux`` holds the router losses,
unscaled and averaged over layers (``'load_balancing_loss'``,
``'router_z_loss'``, ``'router_entropy'``: only those the variant defines),
and per-layer metrics stacked on a leading ``num_layers`` axis:
``'expert_load'`` ``[NL, E]`` (kept assignments), ``'experts_per_token'``
``[NL, E + 1]`` (histogram of experts per token), ``'num_dropped'``
``[NL]`` (assignments cut by a capacity or by ``k_max``, top-p's truncated
ones included) and, for expert choice, ``'num_unrouted'`` ``[NL]``. A dense
model's ``aux`` is empty.

Every parameter names its dimensions' logical axes in its ``out_sharding``
metadata (``'vocab'``, ``'embed'``, ``'heads'``, ``'mlp'``, ``'experts'``,
``'layers'`` for CoE's gates, ``'lora'`` for adapter ranks);
:mod:`models.sharding` maps them to mesh axes. Nothing is sharded at
construction, so the model builds with or without a mesh.

References:
  Su et al., *RoFormer*, 2021 (rotary embeddings); Zhang & Sennrich,
  *Root Mean Square Layer Normalization*, NeurIPS 2019. The routing papers
  are cited in :mod:`models.moe`.
"""

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from models import moe

FFN_KINDS = ("dense", "top2", "top_p", "expert_choice", "coe", "dynmole_lora")
ROUTED_KINDS = FFN_KINDS[1:]
_LOSSES = ("load_balancing_loss", "router_z_loss", "router_entropy")
_init = jax.nn.initializers.lecun_normal
_expert_init = _init(in_axis=-2, out_axis=-1, batch_axis=(0,))


@dataclasses.dataclass(frozen=True)
class MoeLMConfig:
  """Sizes and routing options of :class:`MoeLM` (see the module docstring).

  Attributes:
    ffn: one of ``FFN_KINDS``.
    vocab_size: ``V`` (256 for bytes).
    dim: model width ``d``.
    num_layers: number of blocks.
    num_heads: attention heads (``d`` divisible by it, even head size).
    num_experts: ``E``, experts (or LoRA adapters).
    expert_hidden: ``f``, hidden width of one expert.
    active_experts: ``k``, experts per token every variant is matched to.
    top_p: ``p`` of top-p routing.
    top_p_k_max: slots per token of top-p (``None``: ``E``, never cut).
    expert_choice_k_max: slots per token of expert choice (``None``: ``E``).
    capacity_factor: ``top2`` only: ``None`` dropless, else the capacity
      factor of :func:`~models.moe.top_k_routing`.
    coe_iterations: ``C`` (``k`` must be a multiple of it).
    lora_rank: ``r`` of the DynMoLE adapters.
    lora_alpha: ``α``; the adapters are scaled by ``α / r``.
    lbl_scope: scope of the load-balancing loss (``models.moe.LBL_SCOPES``).
    dispatch: ``path`` of :func:`~models.moe.moe_ffn`.
    tie_embeddings: output projection = embedding transpose.
    rope_base: base of the rotary frequencies.
    dtype: compute dtype.
    param_dtype: parameter dtype.
  """
  ffn: str = "top2"
  vocab_size: int = 256
  dim: int = 128
  num_layers: int = 4
  num_heads: int = 4
  num_experts: int = 8
  expert_hidden: int = 256
  active_experts: int = 2
  top_p: float = 0.4
  top_p_k_max: int | None = None
  expert_choice_k_max: int | None = None
  capacity_factor: float | None = None
  coe_iterations: int = 2
  lora_rank: int = 16
  lora_alpha: float = 32.0
  lbl_scope: str = "micro_batch"
  dispatch: str = "ragged_dot"
  tie_embeddings: bool = False
  rope_base: float = 10_000.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32


def _check(c: MoeLMConfig) -> None:
  if c.ffn not in FFN_KINDS:
    raise ValueError(f"ffn={c.ffn!r} is not one of {FFN_KINDS}")
  if c.dim % c.num_heads or (c.dim // c.num_heads) % 2:
    raise ValueError(f"dim={c.dim} must split into num_heads={c.num_heads}"
                     " heads of even size")
  if not 1 <= c.active_experts <= c.num_experts:
    raise ValueError(f"active_experts={c.active_experts} must lie in"
                     f" [1, num_experts={c.num_experts}]")
  if c.ffn == "coe" and c.active_experts % c.coe_iterations:
    raise ValueError(f"active_experts={c.active_experts} must be a multiple"
                     f" of coe_iterations={c.coe_iterations}")
  if c.lbl_scope not in moe.LBL_SCOPES or c.lbl_scope == "global":
    raise ValueError(f"lbl_scope={c.lbl_scope!r} must be 'micro_batch' or"
                     " 'sequence'")


def _routed_active(c: MoeLMConfig) -> int:
  """``A = 2 k d f + d E``."""
  return 2 * c.active_experts * c.dim * c.expert_hidden + c.dim * c.num_experts


def dense_hidden(c: MoeLMConfig) -> int:
  """Hidden width of the ``dense`` FFN, ``round(A / 2d)``."""
  return max(1, round(_routed_active(c) / (2 * c.dim)))


def dynmole_hidden(c: MoeLMConfig) -> int:
  """Base hidden width ``h_b`` of ``dynmole_lora`` (module docstring).

  Raises:
    ValueError: the adapters alone exceed the budget ``A``.
  """
  d, e, r = c.dim, c.num_experts, c.lora_rank
  hidden = round((_routed_active(c) - d * e - 2 * e * r * d)
                 / (2 * d + 2 * e * r))
  if hidden < 1:
    raise ValueError(f"lora_rank={r} leaves no room for the base FFN under"
                     f" the active budget {_routed_active(c)}")
  return hidden


def ffn_active_params(c: MoeLMConfig) -> int:
  """Active parameters of one FFN per token (module docstring)."""
  _check(c)
  d, e = c.dim, c.num_experts
  if c.ffn == "dense":
    return 2 * d * dense_hidden(c)
  if c.ffn == "coe":
    return _routed_active(c) + (c.coe_iterations - 1) * d * e
  if c.ffn == "dynmole_lora":
    h = dynmole_hidden(c)
    return 2 * d * h + d * e + 2 * e * c.lora_rank * (d + h)
  return _routed_active(c)


def active_params(c: MoeLMConfig) -> int:
  """Active parameters per token of the whole model.

  ``num_layers · (4 d² + 2 d + FFN) + d + V d``: attention, the two norms
  and the FFN of each block, the final norm and the output projection (the
  embedding lookup multiplies nothing and is not counted).
  """
  d = c.dim
  block = 4 * d * d + 2 * d + ffn_active_params(c)
  return c.num_layers * block + d + c.vocab_size * d


def rope(x: jax.Array, base: float) -> jax.Array:
  """Rotary embedding of ``x [B, L, N, H]`` (halves rotated, f32 angles).

  ``(x₁, x₂) → (x₁ cos θ − x₂ sin θ, x₁ sin θ + x₂ cos θ)`` with
  ``θ_{l, j} = l · base^{−j / (H/2)}``.
  """
  half = x.shape[-1] // 2
  freqs = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles = jnp.arange(x.shape[1], dtype=jnp.float32)[:, None] * freqs
  cos, sin = jnp.cos(angles)[:, None, :], jnp.sin(angles)[:, None, :]
  x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(
      jnp.float32)
  out = jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)
  return out.astype(x.dtype)


def _names(*axes: str) -> dict[str, Any]:
  """Variable metadata naming each dimension (``models.sharding``).

  Not sharded at creation, so the model also builds outside a mesh.
  """
  return {"out_sharding": axes, "eager_sharding": False}


def _param(rngs, init, shape, dtype, axes: tuple[str, ...]) -> nnx.Param:
  return nnx.Param(init(rngs.params(), shape, dtype), **_names(*axes))


class CausalSelfAttention(nnx.Module):
  """Multi-head causal self-attention with rotary embeddings, no biases."""

  def __init__(self, c: MoeLMConfig, *, rngs: nnx.Rngs):
    kw = dict(use_bias=False, dtype=c.dtype, param_dtype=c.param_dtype,
              rngs=rngs)
    self.qkv = nnx.Linear(c.dim, 3 * c.dim,
                          kernel_metadata=_names("embed", "heads"), **kw)
    self.out = nnx.Linear(c.dim, c.dim,
                          kernel_metadata=_names("heads", "embed"), **kw)
    self.num_heads, self.rope_base = c.num_heads, c.rope_base

  def __call__(self, x: jax.Array) -> jax.Array:
    """``x [B, L, d] -> [B, L, d]``."""
    b, length, d = x.shape
    qkv = self.qkv(x).reshape(b, length, 3, self.num_heads, -1)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    q, k = rope(q, self.rope_base), rope(k, self.rope_base)
    y = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    return self.out(y.reshape(b, length, d))


class DenseFFN(nnx.Module):
  """``gelu(x W_in) W_out``, ``W_in [d, h]``, ``W_out [h, d]``."""

  def __init__(self, c: MoeLMConfig, hidden: int, *, rngs: nnx.Rngs):
    self.w_in = _param(rngs, _init(), (c.dim, hidden), c.param_dtype,
                       ("embed", "mlp"))
    self.w_out = _param(rngs, _init(), (hidden, c.dim), c.param_dtype,
                        ("mlp", "embed"))

  def __call__(self, x):
    h = jax.nn.gelu(x @ self.w_in[...].astype(x.dtype))
    return h @ self.w_out[...].astype(x.dtype), {}


def _histogram(counts: jax.Array, num_experts: int) -> jax.Array:
  counts = jnp.clip(counts.reshape(-1), 0, num_experts)
  return jnp.bincount(counts, length=num_experts + 1).astype(jnp.float32)


def _metrics(routing: moe.Routing, num_experts: int) -> dict[str, jax.Array]:
  """Load, experts-per-token histogram and drops of one (stacked) routing."""
  active = moe.num_active(routing)
  if active.ndim == 2:  # CoE: [C, T], summed over the iterations.
    active = jnp.sum(active, axis=0)
  return {
      "expert_load": moe.expert_load(moe.dense_mask(routing, num_experts)),
      "experts_per_token": _histogram(active, num_experts),
      "num_dropped": jnp.sum(routing.aux["num_dropped"]
                             + routing.aux.get("num_truncated", 0),
                             dtype=jnp.int32),
  }


class RoutedFFN(nnx.Module):
  """``top2``, ``top_p``, ``expert_choice`` and ``coe`` FFNs (see module)."""

  def __init__(self, c: MoeLMConfig, *, rngs: nnx.Rngs):
    e, d, f = c.num_experts, c.dim, c.expert_hidden
    if c.ffn == "coe":  # one gate per iteration
      self.router = _param(rngs, _expert_init, (c.coe_iterations, d, e),
                           c.param_dtype, ("layers", "embed", "experts"))
    else:
      self.router = _param(rngs, _init(), (d, e), c.param_dtype,
                           ("embed", "experts"))
    self.w_in = _param(rngs, _expert_init, (e, d, f), c.param_dtype,
                       ("experts", "embed", "mlp"))
    self.w_out = _param(rngs, _expert_init, (e, f, d), c.param_dtype,
                        ("experts", "mlp", "embed"))
    self.config = c

  def _experts(self, x: jax.Array, routing: moe.Routing) -> jax.Array:
    return moe.moe_ffn(x, routing, self.w_in[...], self.w_out[...],
                       path=self.config.dispatch).y

  def _route(self, x: jax.Array) -> moe.Routing:
    c, w = self.config, self.router[...]
    if c.ffn == "top2":
      return moe.top_k_routing(x, w, k=c.active_experts,
                               capacity_factor=c.capacity_factor)
    if c.ffn == "top_p":
      return moe.top_p_routing(x, w, p=c.top_p, k_max=c.top_p_k_max)
    return moe.expert_choice_routing(
        x, w, capacity_factor=float(c.active_experts),
        k_max=c.expert_choice_k_max)

  def __call__(self, x):
    c = self.config
    batch_shape, flat = x.shape[:-1], x.reshape(-1, x.shape[-1])
    if c.ffn == "coe":
      out, routing = moe.chain_of_experts(
          flat, self.router[...], k=c.active_experts // c.coe_iterations,
          experts_fn=self._experts)
      y = out - flat
    else:
      routing = self._route(flat)
      y = self._experts(flat, routing)
    aux = _metrics(routing, c.num_experts)
    probs, logits = routing.aux["probs"], routing.aux["logits"]
    aux["router_z_loss"] = moe.router_z_loss(logits)
    if "choice_mask" in routing.aux:
      # One loss per gate (CoE), each over the batch with the given scope.
      shape = (-1, *batch_shape, c.num_experts)
      lbl = jax.vmap(lambda p, m: moe.load_balancing_loss(
          p, m, scope=c.lbl_scope))(probs.reshape(shape),
                                    routing.aux["choice_mask"].reshape(shape))
      aux["load_balancing_loss"] = jnp.mean(lbl)
    if "entropy" in routing.aux:
      aux["router_entropy"] = routing.aux["entropy"]
    if "num_unrouted" in routing.aux:
      aux["num_unrouted"] = routing.aux["num_unrouted"]
    return y.reshape(x.shape), aux


class DynMoLEFFN(nnx.Module):
  """A dense FFN with routed LoRA adapters on both projections (DynMoLE)."""

  def __init__(self, c: MoeLMConfig, *, rngs: nnx.Rngs):
    e, d, r, h = c.num_experts, c.dim, c.lora_rank, dynmole_hidden(c)
    self.w_in = _param(rngs, _init(), (d, h), c.param_dtype,
                       ("embed", "mlp"))
    self.w_out = _param(rngs, _init(), (h, d), c.param_dtype,
                        ("mlp", "embed"))
    self.router = _param(rngs, _init(), (d, e), c.param_dtype,
                         ("embed", "experts"))
    # LoRA: A random, B zero, so every adapter starts as the identity delta.
    zeros = jax.nn.initializers.zeros
    self.lora_a_in = _param(rngs, _expert_init, (e, d, r), c.param_dtype,
                            ("experts", "embed", "lora"))
    self.lora_b_in = _param(rngs, zeros, (e, r, h), c.param_dtype,
                            ("experts", "lora", "mlp"))
    self.lora_a_out = _param(rngs, _expert_init, (e, h, r), c.param_dtype,
                             ("experts", "mlp", "lora"))
    self.lora_b_out = _param(rngs, zeros, (e, r, d), c.param_dtype,
                             ("experts", "lora", "embed"))
    self.config = c

  def __call__(self, x):
    c = self.config
    flat = x.reshape(-1, x.shape[-1])
    routing = moe.dynmole_routing(flat, self.router[...])
    scale = c.lora_alpha / c.lora_rank
    h = jax.nn.gelu(moe.routed_lora_linear(
        flat, self.w_in[...].astype(x.dtype), routing, self.lora_a_in[...],
        self.lora_b_in[...], scale=scale))
    y = moe.routed_lora_linear(
        h, self.w_out[...].astype(x.dtype), routing, self.lora_a_out[...],
        self.lora_b_out[...], scale=scale)
    aux = _metrics(routing, c.num_experts)
    probs, entropy = routing.aux["probs"], routing.aux["tsallis_entropy"]
    gates = moe.dense_weights(routing, c.num_experts)
    # DynMoLE's balance term (f = mean masked probability), unscaled.
    aux["load_balancing_loss"] = moe.dynmole_loss(
        probs, gates, entropy, entropy_coef=0.0, balance_coef=1.0)
    aux["router_entropy"] = jnp.mean(entropy)
    aux["router_z_loss"] = moe.router_z_loss(routing.aux["logits"])
    return y.reshape(x.shape), aux


def _ffn(c: MoeLMConfig, rngs: nnx.Rngs) -> nnx.Module:
  if c.ffn == "dense":
    return DenseFFN(c, dense_hidden(c), rngs=rngs)
  if c.ffn == "dynmole_lora":
    return DynMoLEFFN(c, rngs=rngs)
  return RoutedFFN(c, rngs=rngs)


def _norm(c: MoeLMConfig, rngs: nnx.Rngs) -> nnx.RMSNorm:
  return nnx.RMSNorm(c.dim, dtype=c.dtype, param_dtype=c.param_dtype,
                     scale_metadata=_names("embed"), rngs=rngs)


class Block(nnx.Module):
  """``h + Attn(norm(h))``, then ``h + FFN(norm(h))``."""

  def __init__(self, c: MoeLMConfig, *, rngs: nnx.Rngs):
    self.attn_norm = _norm(c, rngs)
    self.attn = CausalSelfAttention(c, rngs=rngs)
    self.ffn_norm, self.ffn = _norm(c, rngs), _ffn(c, rngs)

  def __call__(self, h):
    h = h + self.attn(self.attn_norm(h))
    y, aux = self.ffn(self.ffn_norm(h))
    return h + y.astype(h.dtype), aux


class MoeLM(nnx.Module):
  """The decoder-only LM of the module docstring.

  Attributes:
    config: the :class:`MoeLMConfig`.
    embed: token embedding ``[V, d]``.
    blocks: the ``num_layers`` :class:`Block` s.
    final_norm: RMSNorm before the output projection.
    head: ``nnx.Linear(d, V)``, or ``None`` when embeddings are tied.
  """

  def __init__(self, config: MoeLMConfig, *, rngs: nnx.Rngs):
    """Builds the model.

    Raises:
      ValueError: an unknown ``ffn`` or inconsistent sizes.
    """
    _check(config)
    c = self.config = config
    self.embed = nnx.Embed(c.vocab_size, c.dim, dtype=c.dtype,
                           param_dtype=c.param_dtype, rngs=rngs,
                           embedding_metadata=_names("vocab", "embed"))
    self.blocks = nnx.List([Block(c, rngs=rngs) for _ in range(c.num_layers)])
    self.final_norm = _norm(c, rngs)
    self.head = None if c.tie_embeddings else nnx.Linear(
        c.dim, c.vocab_size, use_bias=False, dtype=c.dtype,
        param_dtype=c.param_dtype, rngs=rngs,
        kernel_metadata=_names("embed", "vocab"))

  def __call__(self, tokens: jax.Array
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Next-token logits and the routers' losses and metrics.

    Args:
      tokens: int ``[B, L]`` token ids in ``[0, V)``.

    Returns:
      ``(logits [B, L, V] f32, aux)``, ``aux`` as in the module docstring.

    Raises:
      ValueError: ``tokens`` is not ``[B, L]``.
    """
    if tokens.ndim != 2:
      raise ValueError(f"tokens must be [B, L], got {tokens.shape=}")
    h = self.embed(tokens)
    auxes = []
    for block in self.blocks:
      h, aux = block(h)
      auxes.append(aux)
    h = self.final_norm(h)
    if self.head is None:
      logits = self.embed.attend(h) / math.sqrt(self.config.dim)
    else:
      logits = self.head(h)
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *auxes)
    aux = {k: jnp.mean(v) if k in _LOSSES else v for k, v in stacked.items()}
    return logits.astype(jnp.float32), aux
