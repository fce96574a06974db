r"""The DARTS / PC-DARTS search network (NHWC) with architecture logits.

A cell has two input nodes (the previous two cells' outputs, preprocessed
by ReLU-1×1 conv-BN, or :class:`~models.darts.ops.FactorizedReduce` after
a reduction cell) and ``STEPS = 4`` intermediate nodes; node ``j`` sums a
mixed op over every earlier node (2 + 3 + 4 + 5 = 14 edges); the output
concatenates the intermediate nodes. Mixed op on edge ``e``:

    DARTS:     ō_e(x) = Σ_o softmax(α_e)_o · o(x)
    PC-DARTS:  ō_e(x) = shuffle_K([Σ_o softmax(α_e)_o · o(x[..., :C/K]),
                                   x[..., C/K:] (max-pooled 2×2 at stride 2)])

and PC-DARTS's edge normalisation weighs node ``j``'s incoming edges by
``softmax(β)`` over those edges: ``x_j = Σ_{i<j} softmax(β_{·j})_i ō_ij(x_i)``
(DARTS: weight 1). The network: a 3×3 stem conv to ``3C`` channels + BN,
``num_cells`` cells with reductions (stride 2, channels doubled) at
``⌊L/3⌋`` and ``⌊2L/3⌋``, global average pooling, a linear classifier.
Architecture logits are :class:`models.levels.ArchParam`
(``alphas_normal``, ``alphas_reduce`` ``[14, 8]``; for edge normalisation
also ``betas_normal``, ``betas_reduce`` ``[14]``), initialised
``1e-3·N(0, 1)``, so :func:`models.levels.split_levels` gives
``Params(upper, lower)``. Every search BN is non-affine except the stem's.

Speed: the edges into a node that share a stride read inputs of one shape,
so their operations are stacked (parameters ``[n_edges, ...]``) and run as
one ``vmap``: 4–6 stacked mixed ops per cell instead of 14, which is what
keeps compilation of the 8-cell network short. The ``none`` operation adds
exactly zero (value and gradient) and is not computed.

References:
  Liu, Simonyan, Yang, *DARTS*, ICLR 2019, §2.1–2.2.
  Xu et al., *PC-DARTS: Partial Channel Connections for Memory-Efficient
  Architecture Search*, ICLR 2020, §3.2–3.3 (and the official code's fixed
  first ``C/K`` channels with a channel shuffle).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.darts import functional as F
from models.darts import ops
from models.levels import ArchParam

STEPS = 4  # the papers' intermediate nodes per cell
NUM_EDGES = 14  # 2 + 3 + 4 + 5 edges into them


def num_edges(steps: int) -> int:
  """Edges of a cell with ``steps`` intermediate nodes, ``Σ_j (2 + j)``."""
  return steps * (steps + 3) // 2


def steps_of(edges: int) -> int:
  """The ``steps`` of a cell with ``edges`` edges (inverse of
  :func:`num_edges`); ValueError if there is none."""
  for steps in range(1, edges + 1):
    if num_edges(steps) == edges:
      return steps
  raise ValueError(f"{edges} edges is no cell's count (2, 5, 9, 14, 20, ...)")
PRIMITIVES = ops.PRIMITIVES
CELL_KINDS = ("normal", "reduce")


@dataclasses.dataclass(frozen=True)
class SearchConfig:
  """Sizes of :class:`SearchNetwork` (official: C = 16, 8 cells).

  Attributes:
    channels: ``C``, the first cells' channels.
    num_cells: ``L``.
    num_classes: classifier outputs.
    partial_channels: ``K`` of PC-DARTS (the mixed op sees ``C/K``
      channels); None for DARTS.
    edge_normalization: PC-DARTS's ``softmax(β)`` edge weights; None means
      on exactly when ``partial_channels`` is set (the two papers' nets).
    stem_multiplier: the stem's channels are ``stem_multiplier · C``.
    steps: intermediate nodes per cell (the papers: 4, so 14 edges; fewer
      make small networks for tests, which compile several times faster).
  """
  channels: int = 16
  num_cells: int = 8
  num_classes: int = 10
  partial_channels: int | None = None
  edge_normalization: bool | None = None
  stem_multiplier: int = 3
  steps: int = STEPS

  @property
  def uses_betas(self) -> bool:
    if self.edge_normalization is None:
      return self.partial_channels is not None
    return self.edge_normalization


def reduction_cells(num_cells: int) -> tuple[int, int]:
  """Indices of the reduction cells, ``⌊L/3⌋`` and ``⌊2L/3⌋``."""
  return num_cells // 3, 2 * num_cells // 3


def node_edges(node: int) -> range:
  """Indices (into the 14 edges) of the edges entering node ``node``."""
  start = sum(2 + j for j in range(node))
  return range(start, start + 2 + node)


# Per candidate op: its stacked weights (name -> shape maker) and BNs.
def _op_weights(name: str, c: int, stride: int) -> dict:
  kernel = {"sep_conv_3x3": 3, "sep_conv_5x5": 5, "dil_conv_3x3": 3,
            "dil_conv_5x5": 5}.get(name)
  if name.startswith("sep_conv"):
    return {"dw1": ((kernel, kernel, c), kernel * kernel), "pw1": ((c, c), c),
            "dw2": ((kernel, kernel, c), kernel * kernel), "pw2": ((c, c), c)}
  if name.startswith("dil_conv"):
    return {"dw": ((kernel, kernel, c), kernel * kernel), "pw": ((c, c), c)}
  if name == "skip_connect" and stride == 2:
    return {"w1": ((c, c // 2), c), "w2": ((c, c // 2), c)}
  return {}


def _op_norms(name: str, stride: int) -> tuple[str, ...]:
  if name.startswith("sep_conv"):
    return ("1", "2")
  if name.startswith(("dil_conv", "max_pool", "avg_pool")):
    return ("",)
  if name == "skip_connect" and stride == 2:
    return ("",)
  return ()


def _key(name: str, part: str) -> str:
  return f"{name}.{part}" if part else name


def _edge_forward(weights, stats, x, op_weights, *, stride, k, train):
  """One edge's mixed op (module docstring); vmapped over stacked edges.

  Args:
    weights: ``{"<op>.<part>": array}`` of this edge.
    stats: ``{"<op>[.<i>]": {"mean", "var"}}`` BN statistics of this edge.
    x: ``[B, H, W, C]``, the edge's input node.
    op_weights: ``[8]``, this edge's ``softmax(α_e)`` (zero where masked).
    stride, k: the edge's stride and PC-DARTS's ``K`` (1 for DARTS).
    train: batch statistics (BN) or running ones.

  Returns:
    ``(y [B, H/stride, W/stride, C], new_stats)``.
  """
  c = x.shape[-1] // k
  x_in = x[..., :c]
  relu = jax.nn.relu(x_in)
  new_stats = {}

  def norm(name, y):
    y, new_stats[name] = F.batch_norm(y, stats[name], train)
    return y

  def sep_conv(name, size):
    w = lambda part: weights[_key(name, part)]
    y = F.pointwise_conv(F.depthwise_conv(relu, w("dw1"), stride, size // 2),
                         w("pw1"))
    y = jax.nn.relu(norm(name + ".1", y))
    y = F.pointwise_conv(F.depthwise_conv(y, w("dw2"), 1, size // 2), w("pw2"))
    return norm(name + ".2", y)

  def dil_conv(name, size):
    y = F.depthwise_conv(relu, weights[name + ".dw"], stride, size - 1, 2)
    return norm(name, F.pointwise_conv(y, weights[name + ".pw"]))

  def skip():
    if stride == 1:
      return x_in
    return norm("skip_connect", F.factorized_reduce(
        relu, weights["skip_connect.w1"], weights["skip_connect.w2"]))

  outputs = {
      "max_pool_3x3": lambda: norm("max_pool_3x3",
                                   F.max_pool(x_in, 3, stride, 1)),
      "avg_pool_3x3": lambda: norm("avg_pool_3x3",
                                   F.avg_pool(x_in, 3, stride, 1)),
      "skip_connect": skip,
      "sep_conv_3x3": lambda: sep_conv("sep_conv_3x3", 3),
      "sep_conv_5x5": lambda: sep_conv("sep_conv_5x5", 5),
      "dil_conv_3x3": lambda: dil_conv("dil_conv_3x3", 3),
      "dil_conv_5x5": lambda: dil_conv("dil_conv_5x5", 5),
  }
  y = sum(op_weights[PRIMITIVES.index(name)] * make()
          for name, make in outputs.items())
  if k > 1:
    rest = x[..., c:]
    if stride == 2:
      rest = F.max_pool(rest, 2, 2, 0)
    y = F.channel_shuffle(jnp.concatenate([y, rest], -1), k)
  return y, new_stats


class EdgeStack(nnx.Module):
  """The candidate operations of ``num_edges`` same-stride edges, stacked.

  Weights are ``nnx.Param`` ``[num_edges, ...]``, BN statistics
  ``nnx.BatchStat`` ``[num_edges, C/K]``, initialised like PyTorch
  (``U(±1/√fan_in)``; mean 0, variance 1).
  """

  def __init__(self, num_edges: int, channels: int, stride: int, k: int,
               init: ops.UniformSource):
    if channels % k:
      raise ValueError(f"channels={channels} must divide into K={k}")
    c = channels // k
    self.stride, self.k, self.num_edges = stride, k, num_edges
    self.weights = nnx.Dict({
        _key(name, part): nnx.Param(init.kaiming((num_edges,) + shape, fan))
        for name in PRIMITIVES
        for part, (shape, fan) in _op_weights(name, c, stride).items()})
    self.stats = nnx.Dict({
        _key(name, part): nnx.Dict(
            mean=nnx.BatchStat(jnp.asarray(np.zeros((num_edges, c),
                                                    np.float32))),
            var=nnx.BatchStat(jnp.asarray(np.ones((num_edges, c),
                                                  np.float32))))
        for name in PRIMITIVES for part in _op_norms(name, stride)})

  def __call__(self, inputs: jax.Array, op_weights: jax.Array,
               train: bool) -> jax.Array:
    """``inputs [n, B, H, W, C]``, ``op_weights [n, 8]`` → ``[n, B, H', W',
    C]``, one mixed op per edge."""
    weights = {name: v[...] for name, v in self.weights.items()}
    stats = {name: {"mean": s["mean"][...], "var": s["var"][...]}
             for name, s in self.stats.items()}
    forward = functools.partial(_edge_forward, stride=self.stride, k=self.k,
                                train=train)
    y, new_stats = jax.vmap(forward)(weights, stats, inputs, op_weights)
    if train:
      for name, s in new_stats.items():
        # set_value, not [...] =: indexing compares the traced value's
        # sharding, whose error message walks the whole trace (minutes).
        self.stats[name]["mean"].set_value(s["mean"])
        self.stats[name]["var"].set_value(s["var"])
    return y


class SearchCell(nnx.Module):
  """A normal or reduction search cell (module docstring)."""

  def __init__(self, c_prev_prev: int, c_prev: int, channels: int,
               reduction: bool, reduction_prev: bool, k: int,
               init: ops.UniformSource, steps: int = STEPS):
    if reduction_prev:
      self.pre0 = ops.FactorizedReduce(c_prev_prev, channels, False, rngs=init)
    else:
      self.pre0 = ops.ReLUConvBN(c_prev_prev, channels, 1, 1, 0, False,
                                 rngs=init)
    self.pre1 = ops.ReLUConvBN(c_prev, channels, 1, 1, 0, False, rngs=init)
    self.reduction = reduction
    self.stacks = nnx.List([
        nnx.List([EdgeStack(len(group), channels, stride, k, init)
                  for group, stride in self.groups(node)])
        for node in range(steps)])

  def groups(self, node: int) -> list[tuple[range, int]]:
    """The node's incoming edges by stride, as ``(input nodes, stride)``."""
    if not self.reduction:
      return [(range(0, 2 + node), 1)]
    groups = [(range(0, 2), 2)]
    if node:
      groups.append((range(2, 2 + node), 1))
    return groups

  def __call__(self, s0, s1, op_weights, edge_weights, train: bool):
    """``op_weights [14, 8]``; ``edge_weights [14]`` (ones for DARTS)."""
    states = [self.pre0(s0, train), self.pre1(s1, train)]
    for node, stacks in enumerate(self.stacks):
      edges = node_edges(node)
      total = 0.0
      for stack, (inputs, _) in zip(stacks, self.groups(node)):
        index = np.asarray([edges[i] for i in inputs])
        y = stack(jnp.stack([states[i] for i in inputs]), op_weights[index],
                  train)
        total = total + jnp.tensordot(edge_weights[index], y, axes=1)
      states.append(total)
    return jnp.concatenate(states[2:], axis=-1)


def op_weights_of(alphas: jax.Array, mask: jax.Array | None) -> jax.Array:
  """``softmax(α)`` per edge over the enabled ops (``mask [14, 8]``)."""
  if mask is None:
    return jax.nn.softmax(alphas, axis=-1)
  return jax.nn.softmax(jnp.where(mask, alphas, -jnp.inf), axis=-1)


def edge_weights_of(betas: jax.Array | None, edges: int = NUM_EDGES
                    ) -> jax.Array:
  """PC-DARTS's ``[edges]`` edge weights: ``softmax`` of ``β`` within
  each node's incoming edges; ones without edge normalisation (None)."""
  if betas is None:
    return jnp.ones([edges])
  return jnp.concatenate([jax.nn.softmax(betas[node_edges(j).start:
                                               node_edges(j).stop])
                          for j in range(steps_of(betas.shape[0]))])


class SearchNetwork(nnx.Module):
  """The weight-sharing supernet (module docstring).

  Attributes:
    config: the :class:`SearchConfig`.
  """

  def __init__(self, config: SearchConfig, *, rngs: nnx.Rngs):
    self.config = c = config
    if c.num_cells < 3:
      raise ValueError(f"num_cells must be >= 3 (two reduction cells), got "
                       f"{c.num_cells}")
    init = ops.UniformSource(rngs.params())
    stem = c.stem_multiplier * c.channels
    self.stem = ops.ConvBN(3, stem, 3, 1, 1, affine=True, rngs=init)
    c_pp, c_p, cur, reduction_prev = stem, stem, c.channels, False
    cells = []
    for i in range(c.num_cells):
      reduction = i in reduction_cells(c.num_cells)
      cur = cur * 2 if reduction else cur
      cells.append(SearchCell(c_pp, c_p, cur, reduction, reduction_prev,
                              c.partial_channels or 1, init, c.steps))
      c_pp, c_p, reduction_prev = c_p, c.steps * cur, reduction
    self.cells = nnx.List(cells)
    self.classifier = ops.Dense(c_p, c.num_classes, rngs=init)
    edges = num_edges(c.steps)
    logits = lambda shape: ArchParam(
        1e-3 * jax.random.normal(rngs.params(), shape))
    for kind in CELL_KINDS:
      setattr(self, f"alphas_{kind}", logits((edges, len(PRIMITIVES))))
    if c.uses_betas:
      for kind in CELL_KINDS:
        setattr(self, f"betas_{kind}", logits((edges,)))

  def arch_logits(self, kind: str) -> tuple[jax.Array, jax.Array | None]:
    """``(alphas [14, 8], betas [14] or None)`` of a cell kind."""
    betas = (getattr(self, f"betas_{kind}")[...] if self.config.uses_betas
             else None)
    return getattr(self, f"alphas_{kind}")[...], betas

  def __call__(self, images: jax.Array, train: bool = True,
               op_masks: dict | None = None) -> jax.Array:
    """``images [B, H, W, 3] -> logits [B, num_classes]``.

    Args:
      images: NHWC images.
      train: BN batch statistics (updating the running ones) or running.
      op_masks: optional ``{"normal": [14, 8], "reduce": [14, 8]}`` boolean
        masks of the enabled ops (GM-NAS sub-supernets); a disabled op
        gets weight 0 and the softmax runs over the enabled ones. Every
        edge must keep at least one op enabled.
    """
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"images must be [B, H, W, 3], got {images.shape}")
    s0 = s1 = self.stem(images, train)
    weights = {}
    for kind in CELL_KINDS:
      alphas, betas = self.arch_logits(kind)
      mask = None if op_masks is None else op_masks[kind]
      weights[kind] = (op_weights_of(alphas, mask),
                       edge_weights_of(betas, alphas.shape[0]))
    for cell in self.cells:
      kind = "reduce" if cell.reduction else "normal"
      s0, s1 = s1, cell(s0, s1, *weights[kind], train)
    return self.classifier(jnp.mean(s1, axis=(1, 2)))
