r"""The DARTS / PC-DARTS search network (NHWC) with architecture logits.

A cell has two input nodes (the previous two cells' outputs, preprocessed
by ReLU-1×1 conv-BN, or a :class:`~models.darts.ops.FactorizedReduce` after
a reduction cell) and ``steps = 4`` intermediate nodes; node ``j`` sums a
mixed op over every earlier node (2 + 3 + 4 + 5 = 14 edges); the output
concatenates the intermediate nodes. Mixed op on edge ``e``:

    DARTS:     ō(x) = Σ_o softmax(α_e)_o · o(x)
    PC-DARTS:  ō(x) = shuffle_K([Σ_o softmax(α_e)_o · o(x[..., :C/K]),
                                 x[..., C/K:] (max-pooled 2×2 at stride 2)])

and PC-DARTS weighs node ``j``'s incoming edges by ``softmax(β)`` over
those edges (edge normalisation). The network: a 3×3 stem conv to ``3C``
channels + BN, ``num_cells`` cells with reductions (stride 2, channels
doubled) at ``⌊L/3⌋`` and ``⌊2L/3⌋``, global average pooling, a linear
classifier. Architecture parameters are :class:`models.levels.ArchParam`
(``alphas_normal``, ``alphas_reduce`` ``[14, 8]``, and for PC-DARTS
``betas_normal``, ``betas_reduce`` ``[14]``), initialised ``1e-3·N(0, 1)``,
so :func:`models.levels.split_levels` gives ``Params(upper, lower)``.

References:
  Liu, Simonyan, Yang, *DARTS*, ICLR 2019, §2.1–2.2.
  Xu et al., *PC-DARTS: Partial Channel Connections for Memory-Efficient
  Architecture Search*, ICLR 2020, §3.2–3.3 (and the official code's fixed
  first ``C/K`` channels with a channel shuffle).
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from models.darts import ops
from models.levels import ArchParam

STEPS = 4
NUM_EDGES = sum(2 + j for j in range(STEPS))  # 14


@dataclasses.dataclass(frozen=True)
class SearchConfig:
  """Sizes of :class:`SearchNetwork` (official: C = 16, 8 cells).

  Attributes:
    channels: ``C``, the first cells' channels.
    num_cells: ``L``.
    num_classes: classifier outputs.
    partial_channels: ``K`` of PC-DARTS; None for DARTS (no partial
      channels, no edge normalisation).
    stem_multiplier: the stem's channels are ``stem_multiplier · C``.
  """
  channels: int = 16
  num_cells: int = 8
  num_classes: int = 10
  partial_channels: int | None = None
  stem_multiplier: int = 3


def channel_shuffle(x: jax.Array, groups: int) -> jax.Array:
  """Interleaves ``groups`` channel groups of ``x [..., C]`` (ShuffleNet)."""
  *lead, c = x.shape
  x = x.reshape(*lead, groups, c // groups)
  return jnp.swapaxes(x, -1, -2).reshape(*lead, c)


class MixedOp(nnx.Module):
  """Every candidate op on one edge, weighted by the edge's softmax."""

  def __init__(self, channels, stride, partial, *, rngs):
    self.k = partial or 1
    if channels % self.k:
      raise ValueError(f"channels={channels} must divide into K={self.k}")
    self.stride = stride
    self.ops = nnx.List([ops.make_op(name, channels // self.k, stride,
                                     affine=False, search=True, rngs=rngs)
                         for name in ops.PRIMITIVES])

  def __call__(self, x, weights, train: bool):
    c = x.shape[-1] // self.k
    y = sum(w * op(x[..., :c], train) for w, op in zip(weights, self.ops))
    if self.k == 1:
      return y
    rest = x[..., c:]
    if self.stride == 2:
      rest = ops.max_pool(rest, 2, 2, 0)
    return channel_shuffle(jnp.concatenate([y, rest], -1), self.k)


class SearchCell(nnx.Module):
  """A normal or reduction search cell (module docstring)."""

  def __init__(self, c_prev_prev, c_prev, channels, reduction,
               reduction_prev, partial, *, rngs):
    if reduction_prev:
      self.pre0 = ops.FactorizedReduce(c_prev_prev, channels, False,
                                       rngs=rngs)
    else:
      self.pre0 = ops.ReLUConvBN(c_prev_prev, channels, 1, 1, 0, False,
                                 rngs=rngs)
    self.pre1 = ops.ReLUConvBN(c_prev, channels, 1, 1, 0, False, rngs=rngs)
    self.reduction = reduction
    self.edges = nnx.List([
        MixedOp(channels, 2 if reduction and i < 2 else 1, partial,
                rngs=rngs)
        for j in range(STEPS) for i in range(2 + j)])

  def __call__(self, s0, s1, alphas, betas, train: bool):
    """``alphas [14, 8]``; ``betas [14]`` or None (no edge normalisation)."""
    states = [self.pre0(s0, train), self.pre1(s1, train)]
    weights = jax.nn.softmax(alphas, axis=-1)
    offset = 0
    for _ in range(STEPS):
      n = len(states)
      edge_weights = (jnp.ones([n]) if betas is None
                      else jax.nn.softmax(betas[offset:offset + n]))
      states.append(sum(
          edge_weights[i] * self.edges[offset + i](h, weights[offset + i],
                                                   train)
          for i, h in enumerate(states)))
      offset += n
    return jnp.concatenate(states[2:], axis=-1)


def reduction_cells(num_cells: int) -> tuple[int, int]:
  """Indices of the reduction cells, ``⌊L/3⌋`` and ``⌊2L/3⌋``."""
  return num_cells // 3, 2 * num_cells // 3


class SearchNetwork(nnx.Module):
  """The weight-sharing supernet (module docstring).

  Attributes:
    config: the :class:`SearchConfig`.
  """

  def __init__(self, config: SearchConfig, *, rngs: nnx.Rngs):
    self.config = c = config
    stem = c.stem_multiplier * c.channels
    self.stem_conv = ops.conv2d(3, stem, 3, 1, 1, rngs=rngs)
    self.stem_bn = ops.batch_norm(stem, True, rngs)
    c_pp, c_p, cur, reduction_prev = stem, stem, c.channels, False
    cells = []
    for i in range(c.num_cells):
      reduction = i in reduction_cells(c.num_cells)
      cur = cur * 2 if reduction else cur
      cells.append(SearchCell(c_pp, c_p, cur, reduction, reduction_prev,
                              c.partial_channels, rngs=rngs))
      c_pp, c_p, reduction_prev = c_p, STEPS * cur, reduction
    self.cells = nnx.List(cells)
    self.classifier = nnx.Linear(c_p, c.num_classes, rngs=rngs)
    init = lambda shape: ArchParam(
        1e-3 * jax.random.normal(rngs.params(), shape))
    self.alphas_normal = init((NUM_EDGES, len(ops.PRIMITIVES)))
    self.alphas_reduce = init((NUM_EDGES, len(ops.PRIMITIVES)))
    if c.partial_channels:
      self.betas_normal = init((NUM_EDGES,))
      self.betas_reduce = init((NUM_EDGES,))

  def __call__(self, images: jax.Array, train: bool = True) -> jax.Array:
    """``images [B, H, W, 3] -> logits [B, num_classes]``."""
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"images must be [B, H, W, 3], got {images.shape}")
    s0 = s1 = self.stem_bn(self.stem_conv(images),
                           use_running_average=not train)
    pc = self.config.partial_channels
    for cell in self.cells:
      kind = "reduce" if cell.reduction else "normal"
      alphas = getattr(self, f"alphas_{kind}")[...]
      betas = getattr(self, f"betas_{kind}")[...] if pc else None
      s0, s1 = s1, cell(s0, s1, alphas, betas, train)
    return self.classifier(jnp.mean(s1, axis=(1, 2)))
