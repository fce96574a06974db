r"""The derived DARTS network (NHWC), retrained from scratch on a genotype.

A cell has two input nodes (the previous two cells' outputs, preprocessed
by ReLU-1×1 conv-BN, or a :class:`~models.darts.ops.FactorizedReduce` after
a reduction cell) and one node per pair of the genotype's edges: node
``2 + j`` is ``o₁(h_{i₁}) + o₂(h_{i₂})`` for the ``j``-th pair
``(o₁, i₁), (o₂, i₂)``. The ops are the affine ones (``search=False``: no
BatchNorm after pooling); in a reduction cell the edges leaving the two
input nodes have stride 2. The output concatenates the genotype's concat
nodes (``len(concat) · C`` channels). In training every op's output but the
identity's (``skip_connect`` at stride 1) goes through drop path:

    drop_path(h) = h · m / (1 − p),   m ~ Bernoulli(1 − p) per sample.

The network: a 3×3 stem conv to ``3C`` channels + BN, ``L`` cells with
reductions (stride 2, channels doubled) at ``⌊L/3⌋`` and ``⌊2L/3⌋``, global
average pooling, a linear classifier; in training, an auxiliary classifier
on cell ``⌊2L/3⌋``'s output (weighted 0.4 in the official loss).

Drop path probability: the official script ramps it linearly,
``p = 0.2 · epoch / epochs``, by setting an attribute. Here the constructor's
``drop_path_prob`` is the default and the call's ``drop_path_prob=`` (a
float or a traced scalar) overrides it, so a jitted step takes ``p`` as an
argument and the ramp never recompiles.

References:
  Liu, Simonyan, Yang, *DARTS*, ICLR 2019, §3.2 and Appendix A.2
  (quark0/darts ``cnn/model.py::NetworkCIFAR``, ``utils.py::drop_path``).
  Larsson, Maire, Shakhnarovich, *FractalNet*, ICLR 2017 (drop path).
"""

import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from models.darts import ops
from models.darts.genotype import Genotype
from models.darts.search import reduction_cells

STEM_MULTIPLIER = 3
IMAGE_CHANNELS = 3
AUX_CHANNELS = (128, 768)


def drop_path(key: jax.Array, x: jax.Array, drop_prob) -> jax.Array:
  """Zeroes whole samples of ``x`` with probability ``drop_prob``.

  Args:
    key: PRNG key of the per-sample keep mask.
    x: ``[batch, ...]`` an op's output.
    drop_prob: ``p`` in ``[0, 1)``, a float or a traced scalar.

  Returns:
    ``x · m / (1 − p)`` with ``m [batch, 1, ..., 1] ~ Bernoulli(1 − p)``;
    ``x`` itself when ``p = 0`` (every sample kept, divided by 1).
  """
  keep = 1.0 - drop_prob
  mask = jax.random.bernoulli(key, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(mask, x / keep, jnp.zeros_like(x))


def _check_genotype_cell(edges, concat, kind: str) -> None:
  if not edges or len(edges) % 2:
    raise ValueError(f"genotype.{kind} needs two (op, input) edges per node,"
                     f" got {len(edges)} edges")
  for k, (_, index) in enumerate(edges):
    if not 0 <= index < 2 + k // 2:
      raise ValueError(f"genotype.{kind} edge {k} reads node {index}; node"
                       f" {2 + k // 2} may read nodes 0..{1 + k // 2}")
  nodes = 2 + len(edges) // 2
  if not concat or any(not 0 <= i < nodes for i in concat):
    raise ValueError(f"genotype.{kind}_concat={tuple(concat)} must name"
                     f" nodes in 0..{nodes - 1}")


class EvalCell(nnx.Module):
  """A normal or reduction cell of a genotype (module docstring).

  Attributes:
    reduction: whether this cell halves H and W.
    indices: the input node of each op.
    concat: the nodes concatenated into the output.
    dropped: per op, whether drop path applies (all but the identity).
    multiplier: ``len(concat)``; the output has ``multiplier · C`` channels.
  """

  def __init__(self, genotype: Genotype, c_prev_prev: int, c_prev: int,
               channels: int, reduction: bool, reduction_prev: bool, *,
               rngs: nnx.Rngs):
    """Builds the cell.

    Args:
      genotype: the architecture; its ``reduce`` or ``normal`` half is used.
      c_prev_prev: channels of the cell two back (input node 0).
      c_prev: channels of the previous cell (input node 1).
      channels: ``C`` of every node of this cell.
      reduction: a reduction cell (stride 2 on the input nodes' edges).
      reduction_prev: the previous cell reduced, so node 0 is twice as
        large as node 1 and is factorized-reduced.
      rngs: the parameter RNG streams.

    Raises:
      ValueError: a malformed genotype half or an unknown op name.
    """
    kind = "reduce" if reduction else "normal"
    edges = getattr(genotype, kind)
    concat = tuple(getattr(genotype, f"{kind}_concat"))
    _check_genotype_cell(edges, concat, kind)
    if reduction_prev:
      self.preprocess0 = ops.FactorizedReduce(c_prev_prev, channels, True,
                                              rngs=rngs)
    else:
      self.preprocess0 = ops.ReLUConvBN(c_prev_prev, channels, 1, 1, 0, True,
                                        rngs=rngs)
    self.preprocess1 = ops.ReLUConvBN(c_prev, channels, 1, 1, 0, True,
                                      rngs=rngs)
    strides = [2 if reduction and index < 2 else 1 for _, index in edges]
    self.ops = nnx.List([
        ops.make_op(name, channels, stride, affine=True, search=False,
                    rngs=rngs)
        for (name, _), stride in zip(edges, strides)])
    self.reduction = reduction
    self.indices = tuple(index for _, index in edges)
    self.concat = concat
    self.dropped = tuple(not (name == "skip_connect" and stride == 1)
                         for (name, _), stride in zip(edges, strides))
    self.multiplier = len(concat)

  def __call__(self, s0: jax.Array, s1: jax.Array, train: bool,
               drop_prob=None, rngs: nnx.Rngs | None = None) -> jax.Array:
    """``[B, H, W, ·]`` inputs to ``[B, H', W', multiplier · C]``.

    Args:
      s0: the output of the cell two back (twice the size of ``s1`` after
        a reduction cell).
      s1: the previous cell's output.
      train: BatchNorm on batch statistics (else running averages).
      drop_prob: drop path probability; None: no drop path.
      rngs: streams with ``dropout``, read once per dropped op; needed iff
        ``drop_prob`` is not None.
    """
    if drop_prob is not None and rngs is None:
      raise ValueError("drop path needs rngs with a 'dropout' stream")
    states = [self.preprocess0(s0, train), self.preprocess1(s1, train)]
    outs = []
    for op, index, dropped in zip(self.ops, self.indices, self.dropped):
      h = op(states[index], train)
      if dropped and drop_prob is not None:
        h = drop_path(rngs.dropout(), h, drop_prob)
      outs.append(h)
      if len(outs) == 2:
        states.append(outs[0] + outs[1])
        outs = []
    return jnp.concatenate([states[i] for i in self.concat], axis=-1)


class AuxiliaryHead(nnx.Module):
  """The official ``AuxiliaryHeadCIFAR`` for an 8×8 feature map: ReLU,
  5×5 average pooling at stride 3 (to 2×2), 1×1 conv to 128 + BN + ReLU,
  2×2 conv to 768 + BN + ReLU (to 1×1), linear."""

  def __init__(self, channels: int, num_classes: int, *, rngs: nnx.Rngs):
    mid, out = AUX_CHANNELS
    self.conv1 = ops.conv2d(channels, mid, 1, rngs=rngs)
    self.bn1 = ops.batch_norm(mid, True, rngs)
    self.conv2 = ops.conv2d(mid, out, 2, rngs=rngs)
    self.bn2 = ops.batch_norm(out, True, rngs)
    self.classifier = ops.Dense(out, num_classes, rngs=rngs)

  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """``[B, H, W, C]`` with ``H, W`` in 8..10 to ``[B, num_classes]``."""
    if not (8 <= x.shape[1] <= 10 and 8 <= x.shape[2] <= 10):
      raise ValueError(f"the auxiliary head needs an 8x8 to 10x10 map (a"
                       f" 32x32 image), got {x.shape[1]}x{x.shape[2]}")
    # No padding, so count_include_pad=False changes nothing: a plain mean.
    x = jax.lax.reduce_window(jax.nn.relu(x), 0.0, jax.lax.add, (1, 5, 5, 1),
                              (1, 3, 3, 1), "VALID") / 25.0
    x = jax.nn.relu(self.bn1(self.conv1(x), use_running_average=not train))
    x = jax.nn.relu(self.bn2(self.conv2(x), use_running_average=not train))
    return self.classifier(x.reshape(x.shape[0], -1))


class _CellSpec(NamedTuple):
  c_prev_prev: int
  c_prev: int
  channels: int
  reduction: bool
  reduction_prev: bool


def _layout(genotype: Genotype, channels: int, num_cells: int
            ) -> tuple[list[_CellSpec], int, int]:
  """The cells' sizes, the auxiliary head's and the classifier's inputs."""
  c_pp = c_p = STEM_MULTIPLIER * channels
  cur, reduction_prev, specs, aux_channels = channels, False, [], None
  for i in range(num_cells):
    reduction = i in reduction_cells(num_cells)
    cur = cur * 2 if reduction else cur
    specs.append(_CellSpec(c_pp, c_p, cur, reduction, reduction_prev))
    concat = genotype.reduce_concat if reduction else genotype.normal_concat
    c_pp, c_p, reduction_prev = c_p, len(concat) * cur, reduction
    if i == reduction_cells(num_cells)[1]:
      aux_channels = c_p
  return specs, aux_channels, c_p


class EvalNetwork(nnx.Module):
  """The CIFAR network of a genotype (official ``NetworkCIFAR``).

  Attributes:
    drop_path_prob: the default drop path probability of a training call.
    auxiliary_head: the :class:`AuxiliaryHead`, or None.
  """

  def __init__(self, genotype: Genotype, channels: int = 36,
               num_cells: int = 20, num_classes: int = 10,
               auxiliary: bool = True, drop_path_prob: float = 0.2, *,
               rngs: nnx.Rngs):
    """Builds the network (official: C = 36, 20 cells, 3.3 M weights).

    Args:
      genotype: the cells' architecture.
      channels: ``C``, the first cells' node channels (even: the
        factorized reduction halves it).
      num_cells: ``L``.
      num_classes: classifier outputs.
      auxiliary: add the auxiliary head after cell ``⌊2L/3⌋``.
      drop_path_prob: default ``p`` of training calls, in ``[0, 1)``.
      rngs: the parameter RNG streams.

    Raises:
      ValueError: ``drop_path_prob`` out of range, a malformed genotype.
    """
    _check_prob(drop_path_prob)
    rngs = ops.UniformSource.of(rngs)  # one draw stream for every weight
    stem = STEM_MULTIPLIER * channels
    self.stem_conv = ops.conv2d(IMAGE_CHANNELS, stem, 3, 1, 1, rngs=rngs)
    self.stem_bn = ops.batch_norm(stem, True, rngs)
    specs, aux_channels, last = _layout(genotype, channels, num_cells)
    self.cells = nnx.List([EvalCell(genotype, *spec, rngs=rngs)
                           for spec in specs])
    self.auxiliary_head = nnx.data(
        AuxiliaryHead(aux_channels, num_classes, rngs=rngs) if auxiliary
        else None)
    self.classifier = ops.Dense(last, num_classes, rngs=rngs)
    self.drop_path_prob = drop_path_prob

  def __call__(self, images: jax.Array, train: bool, *, drop_path_prob=None,
               rngs: nnx.Rngs | None = None
               ) -> tuple[jax.Array, jax.Array | None]:
    """Classifies a batch.

    Args:
      images: ``[B, H, W, 3]`` (32×32 for the auxiliary head).
      train: BatchNorm on batch statistics, drop path, auxiliary logits;
        else running averages and the main logits only.
      drop_path_prob: ``p`` of this call (a float or a traced scalar, for
        the official linear ramp); None: the ``drop_path_prob`` attribute.
        Ignored unless ``train``; ``0.0`` in training (as a Python number)
        gives batch statistics without drop path (BatchNorm recalibration).
      rngs: streams with ``dropout``, needed in training unless ``p`` is a
        Python 0.

    Returns:
      ``(logits, aux_logits)``, both ``[B, num_classes]``; ``aux_logits``
      is None unless ``train`` with the auxiliary head.

    Raises:
      ValueError: ``images`` not ``[B, H, W, 3]``; ``p`` out of
        ``[0, 1)``; ``rngs`` missing when drop path needs it.
    """
    if images.ndim != 4 or images.shape[-1] != IMAGE_CHANNELS:
      raise ValueError(f"images must be [B, H, W, 3], got {images.shape}")
    p = self.drop_path_prob if drop_path_prob is None else drop_path_prob
    _check_prob(p)
    if not train or (isinstance(p, numbers.Real) and p == 0):
      p = None
    elif rngs is None:
      raise ValueError(f"drop path (p={p}) in training needs rngs with a"
                       " 'dropout' stream; pass drop_path_prob=0.0 for none")
    s0 = s1 = self.stem_bn(self.stem_conv(images),
                           use_running_average=not train)
    aux_logits, aux_cell = None, reduction_cells(len(self.cells))[1]
    for i, cell in enumerate(self.cells):
      s0, s1 = s1, cell(s0, s1, train, p, rngs)
      if i == aux_cell and train and self.auxiliary_head is not None:
        aux_logits = self.auxiliary_head(s1, train)
    return self.classifier(jnp.mean(s1, axis=(1, 2))), aux_logits


def _check_prob(p) -> None:
  if isinstance(p, numbers.Real) and not 0 <= p < 1:
    raise ValueError(f"drop_path_prob must be in [0, 1), got {p}")


def count_params(genotype: Genotype, channels: int = 36, num_cells: int = 20,
                 num_classes: int = 10, auxiliary: bool = True) -> int:
  """Weights (``nnx.Param`` entries) of ``EvalNetwork(genotype, channels,
  num_cells, num_classes, auxiliary)``.

  BatchNorm running statistics are not weights. The official
  ``count_parameters_in_MB`` leaves out the auxiliary head: compare it with
  ``auxiliary=False``. Builds the network (about a second: see
  :class:`~models.darts.ops.UniformSource`).
  """
  model = EvalNetwork(genotype, channels, num_cells, num_classes, auxiliary,
                      rngs=nnx.Rngs(0))
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
