"""GM-NAS: split a weight-sharing supernet by gradient matching.

Independent of any particular supernet. A sub-supernet is a dict of op masks,
``{"normal": bool[E, K], "reduce": bool[E, K]}`` (E = 14 edges, K = 8 ops in
the DARTS space; True = op enabled), and the supernet is reached only
through ``grad_fn(weights, masks, batch) -> grads``, the gradient of a loss in
which disabled ops get zero weight in the mixed op. Which weights sit on
which edge is said by a *labels* pytree (:func:`label_leaves`).

The procedure (Hu et al. 2022): for an unsplit edge ``e`` and each op
``o_i`` on it, ``g_i`` is the gradient of the training loss w.r.t. the shared
weights (all but those of ``e``) with ``e`` restricted to ``o_i``; the score
is ``GM(o_i, o_j) = cos(g_i, g_j)`` averaged over R mini-batches
(:func:`gradient_matching_scores`). The ops are split into B = 2 groups by a
min-cut over the GM graph (:func:`min_cut_partition`); the edge whose best
cut costs least is split (:func:`choose_edge`); each child keeps the parent's
masks with ``e`` restricted to one group (:func:`split_supernet`) and starts
from copies of its weights and optimizer state (:func:`replicate_pytree`).
The derived architectures are ranked by successive halving
(:func:`successive_halving`).

Where the official code (skhu101/GM-NAS, ``WS-GM/sota/cnn``) differs from the
paper, the paper is the default and the code is an option; each difference is
stated where it applies.

References:
  Hu, Wang, Hong, Li, Hsieh, Feng, *Generalizing Few-Shot NAS with Gradient
  Matching*, ICLR 2022 (GM score, min-cut partition, edge selection,
  successive halving of the derived architectures).
"""

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

CELL_TYPES = ("normal", "reduce")
SHARED = -1  # label of a leaf on no edge: always a shared weight.
EXCLUDED = -2  # label of a leaf never compared (see `label_leaves`).
OBJECTIVES = ("cut", "within_distance")
EDGE_CRITERIA = ("grad", "rand")

Masks = dict[str, jax.Array]


# --------------------------------------------------------------------------
# Op masks and their encoding.


def cell_index(cell: str | int | jax.Array) -> int | jax.Array:
  """Index of a cell type in :data:`CELL_TYPES`; ints pass through."""
  if isinstance(cell, str):
    if cell not in CELL_TYPES:
      raise ValueError(f"unknown cell {cell!r}; valid: {CELL_TYPES}")
    return CELL_TYPES.index(cell)
  return cell


def op_masks_full(num_edges: int = 14, num_ops: int = 8,
                  cells: Sequence[str] = CELL_TYPES) -> Masks:
  """The one-shot supernet: ``{cell: bool[num_edges, num_ops]}``, all True."""
  return {c: jnp.ones((num_edges, num_ops), bool) for c in cells}


def ops_row(ops: Sequence[int], num_ops: int = 8) -> np.ndarray:
  """``bool[num_ops]``, True at the given op indices."""
  row = np.zeros(num_ops, bool)
  row[np.asarray(ops, int)] = True
  return row


def restrict_edge(masks: Masks, cell, edge, row) -> Masks:
  """``masks`` with edge ``edge`` of ``cell`` set to ``row``.

  Jit-friendly: ``cell`` (an index) and ``edge`` may be traced, so one
  compiled function serves every edge of every cell.

  Args:
    masks: ``{cell: bool[E, K]}``.
    cell: a name in :data:`CELL_TYPES` or its index.
    edge: edge index in ``[0, E)``.
    row: ``bool[K]``, the ops left enabled on that edge.
  """
  c = cell_index(cell)
  return {name: jnp.where(c == CELL_TYPES.index(name),
                          jnp.asarray(m).at[edge].set(jnp.asarray(row, bool)),
                          m)
          for name, m in masks.items()}


def unsplit_edges(masks: Masks, cell: str) -> tuple[int, ...]:
  """Edges of ``cell`` with every op enabled (the official split candidates)."""
  return tuple(int(e) for e in np.flatnonzero(np.asarray(masks[cell]).all(-1)))


def split_edges(masks: Masks) -> tuple[tuple[str, int, tuple[int, ...]], ...]:
  """``((cell, edge, enabled ops), ...)`` of every restricted edge, in order."""
  out = []
  for cell in CELL_TYPES:
    if cell in masks:
      m = np.asarray(masks[cell])
      out += [(cell, int(e), tuple(int(o) for o in np.flatnonzero(m[e])))
              for e in np.flatnonzero(~m.all(-1))]
  return tuple(out)


def encode_masks(masks: Masks) -> np.ndarray:
  """``int32[len(CELL_TYPES), E]``: bit ``o`` of entry ``[c, e]`` is op ``o``.

  ``2**K - 1`` marks an unsplit edge. A missing cell type encodes as -1.
  Plain integers, so a checkpoint (orbax) stores a sub-supernet's identity.
  """
  shapes = {np.shape(m) for m in masks.values()}
  if len(shapes) != 1:
    raise ValueError(f"cells disagree on the mask shape: {shapes}")
  (num_edges, num_ops), = shapes
  if num_ops > 30:
    raise ValueError(f"{num_ops=} does not fit an int32 bit mask")
  bits = 1 << np.arange(num_ops)
  return np.stack([
      (np.asarray(masks[c], np.int64) * bits).sum(-1) if c in masks
      else np.full(num_edges, -1) for c in CELL_TYPES]).astype(np.int32)


def decode_masks(code: np.ndarray, num_ops: int = 8) -> Masks:
  """Inverse of :func:`encode_masks`."""
  code = np.asarray(code)
  bits = 1 << np.arange(num_ops)
  return {c: jnp.asarray((code[i][:, None] & bits) != 0)
          for i, c in enumerate(CELL_TYPES) if (code[i] >= 0).all()}


# --------------------------------------------------------------------------
# Gradient-matching scores.


def label_leaves(weights: Any, label_fn: Callable[[tuple, Any], Any]) -> Any:
  """Labels saying which edge owns each weight, for the shared-weight filter.

  Args:
    weights: the pytree ``grad_fn`` differentiates.
    label_fn: ``(path, leaf) -> int label`` or an int array broadcastable to
      the leaf (e.g. ``[E, 1, ...]`` for a leaf stacking the E edges):
      ``edge_label(cell, e, E)`` for weights of edge ``e``, :data:`SHARED` for
      weights on no edge (stem, preprocessing, classifier), :data:`EXCLUDED`
      to leave a weight out. The official code compares only the mixed ops'
      weights (``model_search_ws.py::get_split_gradients`` walks
      ``cell._ops`` and skips stem, ``preprocess0/1`` and classifier);
      labelling those :data:`EXCLUDED` reproduces it, :data:`SHARED` follows
      the paper ("all weights except those of the edge").

  Returns:
    A pytree like ``weights`` of int32 arrays.
  """
  return jax.tree_util.tree_map_with_path(
      lambda p, x: np.asarray(label_fn(p, x), np.int32), weights)


def edge_label(cell, edge, num_edges: int = 14):
  """The label of the weights on ``edge`` of ``cell`` (traceable)."""
  return cell_index(cell) * num_edges + edge


def _enabled_row(masks: Masks, cell, edge) -> jax.Array:
  c = cell_index(cell)
  row = jnp.zeros(next(iter(masks.values())).shape[1], bool)
  for name, m in masks.items():
    row = jnp.where(c == CELL_TYPES.index(name), m[edge], row)
  return row


@functools.partial(jax.jit, static_argnames=("grad_fn", "op_batching"))
def gradient_matching_matrix(grad_fn, weights, masks, cell, edge, batches,
                             labels, *, op_batching="vmap", eps=1e-12):
  """GM scores of every op slot of one edge: the jitted core.

  One compilation serves all edges and cells (``cell`` index and ``edge``
  are traced); it recompiles only for a new ``grad_fn`` object, so build
  ``grad_fn = jax.grad(loss_fn)`` once.

  Args:
    grad_fn: ``(weights, masks, batch) -> grads`` (a pytree like weights).
    weights: supernet weights.
    masks: ``{cell: bool[E, K]}``, the sub-supernet.
    cell: cell index (see :func:`cell_index`).
    edge: edge index.
    batches: a pytree whose leaves have a leading axis of R mini-batches.
    labels: from :func:`label_leaves`.
    op_batching: ``"vmap"`` (K gradients at once) or ``"map"`` (one at a
      time, K times less activation memory).
    eps: floor of ``||g_i|| ||g_j||``; a zero gradient has cosine 0.

  Returns:
    ``f32[K, K]``, ``mean_r cos(g_i^r, g_j^r)``; NaN where op ``i`` or ``j``
    is disabled on the edge.
  """
  num_edges, num_ops = next(iter(masks.values())).shape
  code = edge_label(cell, edge, num_edges)
  shared = jax.tree.map(lambda l: (l != code) & (l != EXCLUDED), labels)

  def op_grads(op, batch):
    restricted = restrict_edge(masks, cell, edge, jnp.arange(num_ops) == op)
    g = grad_fn(weights, restricted, batch)
    return jax.tree.map(lambda g, s: jnp.where(s, g, 0).astype(jnp.float32),
                        g, shared)

  def batch_cosines(total, batch):
    ops = jnp.arange(num_ops)
    if op_batching == "vmap":
      g = jax.vmap(op_grads, in_axes=(0, None))(ops, batch)
    elif op_batching == "map":
      g = jax.lax.map(lambda op: op_grads(op, batch), ops)
    else:
      raise ValueError(f"{op_batching=}; valid: 'vmap', 'map'")
    gram = sum(jnp.einsum("id,jd->ij", x.reshape(num_ops, -1),
                          x.reshape(num_ops, -1),
                          precision=jax.lax.Precision.HIGHEST)
               for x in jax.tree.leaves(g))
    norm = jnp.sqrt(jnp.diagonal(gram))
    return total + gram / jnp.maximum(norm[:, None] * norm[None, :], eps), None

  num_batches = jax.tree.leaves(batches)[0].shape[0]
  total, _ = jax.lax.scan(batch_cosines, jnp.zeros((num_ops, num_ops)),
                          batches)
  row = _enabled_row(masks, cell, edge)
  return jnp.where(row[:, None] & row[None, :], total / num_batches, jnp.nan)


def gradient_matching_scores(grad_fn, weights, masks, cell, edge, batches,
                             shared_filter, *, op_batching="vmap",
                             eps=1e-12) -> jax.Array:
  """Gradient-matching scores between the enabled ops of one edge.

  ``GM(o_i, o_j) = <g_i, g_j> / (||g_i|| ||g_j||)`` with ``g_i`` the gradient
  w.r.t. the shared weights (every leaf whose label is not the edge's and not
  :data:`EXCLUDED`) with the edge restricted to ``o_i``, all shared weights
  flattened into one vector (the code's ``dis_metric='cos'``), and the
  *scores* averaged over the R mini-batches: as the paper, and as the
  official code (``train_search_ws.py`` L502-L555 accumulates the distance
  matrix ``1 - cos`` over ``repeat = 100`` fresh training batches, then
  divides), not the cosine of averaged gradients.

  The edge is restricted through its mask row (one-hot at ``o_i``); how the
  supernet weighs the lone op is ``grad_fn``'s business. The code keeps the
  op's softmax weight over *all* the edge's ops (L527: ``1/K`` with the
  uniform alphas of ``--fix_alpha_equal``), while a supernet that
  renormalises over enabled ops gives it 1. The code's cosine divides by
  ``||g_i|| ||g_j|| + 1e-6`` (``nasbench201/utils.py::match_loss``); this one
  by ``max(||g_i|| ||g_j||, eps)``.

  Args:
    grad_fn, weights, masks, batches, op_batching, eps: as in
      :func:`gradient_matching_matrix`.
    cell: ``"normal"`` or ``"reduce"``.
    edge: edge index.
    shared_filter: the labels pytree of :func:`label_leaves`.

  Returns:
    ``f32[n, n]`` over the ``n`` enabled ops of the edge, in op order.
  """
  enabled = np.flatnonzero(np.asarray(masks[cell])[edge])
  full = gradient_matching_matrix(
      grad_fn, weights, masks, jnp.int32(cell_index(cell)), jnp.int32(edge),
      batches, shared_filter, op_batching=op_batching, eps=eps)
  return full[np.ix_(enabled, enabled)]


# --------------------------------------------------------------------------
# Partition and edge choice.


class Partition(NamedTuple):
  """A split of ``n`` ops: ``groups`` of indices, ``labels[i]`` = i's group."""
  groups: tuple[tuple[int, ...], ...]
  labels: np.ndarray
  cost: float


def _set_partitions(n: int, groups: int):
  """Restricted-growth strings: each partition into ``groups`` blocks once."""
  def grow(prefix, used):
    if len(prefix) == n:
      if used == groups:
        yield prefix
      return
    if groups - used > n - len(prefix):
      return
    for g in range(min(used + 1, groups)):
      yield from grow(prefix + (g,), max(used, g + 1))
  return np.array(list(grow((), 0)), np.int32).reshape(-1, n)


def _canonical_groups(labels: np.ndarray) -> tuple[tuple[int, ...], ...]:
  groups = [tuple(int(i) for i in np.flatnonzero(labels == g))
            for g in range(labels.max() + 1)]
  return tuple(sorted(groups, key=lambda g: (len(g), g)))


def _order_key(groups):
  return tuple((len(g), g) for g in groups)


def min_cut_partition(similarity, groups: int = 2, *,
                      objective: str = "cut",
                      min_group_size: int = 1) -> Partition:
  """The best split of the ops by exhaustive search.

  ``objective="cut"`` (paper): minimise the summed GM similarity of
  the op pairs that the split separates. ``objective="within_distance"``
  (official, ``train_search_ws.py::mincut_split_darts``, L689-L709):
  minimise the summed distance ``1 - GM`` of the pairs kept together. For
  fixed group sizes the two agree (``within_distance = pairs_within - total
  + cut``), but ``pairs_within`` grows with imbalance, so the code's scalar
  favours balanced splits and the two can pick different partitions (and
  different edges in :func:`choose_edge`, where ``total`` differs by edge).

  Every group is non-empty; ``min_group_size=2`` reproduces the code's
  subsets of size ``2..n//2`` (no single-op group), a restriction the
  paper's description (as summarised in our reference notes) does not make.
  Only pairs ``i < j`` are read, as the code does. Ties go to the split
  whose groups, sorted by (size, members), come first: the code's
  enumeration order.

  Args:
    similarity: ``[n, n]`` GM scores.
    groups: number of groups B (2 in the DARTS space).
    objective: one of :data:`OBJECTIVES`.
    min_group_size: smallest allowed group.

  Returns:
    The :class:`Partition` of least cost.

  Raises:
    ValueError: bad shape, objective, or no admissible split.
  """
  sim = np.asarray(similarity, np.float64)
  n = sim.shape[0]
  if sim.shape != (n, n):
    raise ValueError(f"similarity must be square, got {sim.shape}")
  if objective not in OBJECTIVES:
    raise ValueError(f"unknown {objective=}; valid: {OBJECTIVES}")
  labels = _set_partitions(n, groups)
  sizes = (labels[:, :, None] == np.arange(groups)).sum(1)
  labels = labels[(sizes >= min_group_size).all(-1)]
  if not len(labels):
    raise ValueError(f"no split of {n} ops into {groups=} with "
                     f"{min_group_size=}")
  i, j = np.triu_indices(n, 1)
  together = labels[:, i] == labels[:, j]
  if objective == "cut":
    cost = np.where(together, 0.0, sim[i, j]).sum(-1)
  else:
    cost = np.where(together, 1.0 - sim[i, j], 0.0).sum(-1)
  best = cost.min()
  ties = np.flatnonzero(cost <= best + 1e-12 * max(1.0, abs(best)))
  pick = min(ties, key=lambda t: _order_key(_canonical_groups(labels[t])))
  canon = _canonical_groups(labels[pick])
  out = np.zeros(n, np.int32)
  for g, members in enumerate(canon):
    out[list(members)] = g
  return Partition(canon, out, float(cost[pick]))


class SplitChoice(NamedTuple):
  """The edge to split and its groups of op indices (into the edge's K ops).

  ``edge_costs[c, e]`` is the best-partition cost of each scored edge (NaN
  for edges not scored), for logs.
  """
  cell: str
  edge: int
  groups: tuple[tuple[int, ...], ...]
  cost: float
  edge_costs: np.ndarray


def choose_edge(masks: Masks, similarity_fn: Callable[[str, int], Any], *,
                edge_crit: str = "grad", key: jax.Array | None = None,
                cells: Sequence[str] = CELL_TYPES, groups: int = 2,
                objective: str = "cut",
                min_group_size: int = 1) -> SplitChoice:
  """Pick the unsplit edge to split next, and its partition.

  ``edge_crit="grad"`` (paper): score every unsplit edge of ``cells`` and
  take the one whose best partition costs least (first in cell, edge order
  on ties). The DARTS-space code ranks edges by the best partition's
  within-group distance (``train_search_ws.py`` L561-L568): pass
  ``objective="within_distance", min_group_size=2`` for it. The NAS-Bench-201
  code instead keeps the edge with the largest cross-cut distance
  (``nasbench201/utils.py`` L636, ``train_search.py`` L494), which with its
  fixed 2 + 3 groups is the paper's least cut. ``"rand"``: a uniform draw
  from the unsplit edges with ``key``; its ops are still partitioned by
  ``similarity_fn`` (the code's ``edge_crit='rand'`` with
  ``split_crit='grad'`` walks one permutation of the normal edges, drawn
  once per search, instead: L305, L323).

  The official code lists candidates from ``enc_normal`` only
  (``train_search_ws.py`` L498), so it never splits a reduction edge;
  ``cells=("normal",)`` reproduces that.

  Args:
    masks: ``{cell: bool[E, K]}`` of the supernet being split.
    similarity_fn: ``(cell, edge) -> [K, K]`` GM scores of an unsplit edge,
      e.g. :func:`gradient_matching_scores` with the rest bound.
    edge_crit: one of :data:`EDGE_CRITERIA`.
    key: PRNG key, required for ``"rand"``.
    cells: cell types whose edges may be split.
    groups, objective, min_group_size: as in :func:`min_cut_partition`.

  Returns:
    A :class:`SplitChoice`.

  Raises:
    ValueError: unknown criterion, missing key, or no unsplit edge.
  """
  if edge_crit not in EDGE_CRITERIA:
    raise ValueError(f"unknown {edge_crit=}; valid: {EDGE_CRITERIA}")
  candidates = [(c, e) for c in cells for e in unsplit_edges(masks, c)]
  if not candidates:
    raise ValueError(f"no unsplit edge left in {tuple(cells)}")
  if edge_crit == "rand":
    if key is None:
      raise ValueError("edge_crit='rand' needs a PRNG key")
    candidates = [candidates[int(jax.random.randint(
        key, (), 0, len(candidates)))]]
  num_edges = next(iter(masks.values())).shape[0]
  costs = np.full((len(CELL_TYPES), num_edges), np.nan)
  best = None
  for c, e in candidates:
    part = min_cut_partition(similarity_fn(c, e), groups,
                             objective=objective,
                             min_group_size=min_group_size)
    costs[cell_index(c), e] = part.cost
    if best is None or part.cost < best[2].cost:
      best = (c, e, part)
  c, e, part = best
  return SplitChoice(c, e, part.groups, part.cost, costs)


# --------------------------------------------------------------------------
# Splitting and final selection.


def split_supernet(masks: Masks, cell: str, edge: int,
                   partition: Sequence[Sequence[int]]) -> tuple[Masks, ...]:
  """Children of a sub-supernet: ``edge`` of ``cell`` restricted per group.

  ``partition`` holds op indices (``SplitChoice.groups``); child ``k`` keeps
  only group ``k`` on the edge and every other mask of the parent. The
  children take copies of the parent's weights and optimizer state
  (:func:`replicate_pytree`); the paper then re-initialises the weights after
  the last split (code: ``--restart final``), which is the caller's choice.

  Raises:
    ValueError: the groups are empty, overlap, or do not cover exactly the
      ops enabled on the edge.
  """
  enabled = np.asarray(masks[cell])[edge]
  num_ops = enabled.shape[0]
  members = [o for g in partition for o in g]
  if (any(len(g) == 0 for g in partition)
      or len(set(members)) != len(members)
      or sorted(members) != list(np.flatnonzero(enabled))):
    raise ValueError(f"{partition=} must split the enabled ops "
                     f"{tuple(np.flatnonzero(enabled))} of {cell} edge {edge} "
                     f"into non-empty disjoint groups")
  return tuple(restrict_edge(masks, cell, edge, ops_row(g, num_ops))
               for g in partition)


def replicate_pytree(tree: Any, num_children: int) -> tuple[Any, ...]:
  """``num_children`` independent copies of ``tree`` (weights, opt state).

  Real copies, so that donating one child's buffers to a jitted step leaves
  its siblings intact.
  """
  return tuple(jax.tree.map(lambda x: jnp.array(x, copy=True), tree)
               for _ in range(num_children))


def moving_average_accuracy(accuracies, decay: float = 0.1) -> np.ndarray:
  """The official successive-halving "moving average", per candidate.

  ``WS-GM/successive_halving.py::moving_avg_of_list`` computes
  ``a_k = (k * decay * a_{k-1} + (1 - decay) * v_k) / (k + 1)``, ``a_{-1} = 0``
  (decay 0.1). With ``m_k = (k + 1) a_k`` this is the exponential average
  ``m_k = decay * m_{k-1} + (1 - decay) * v_k`` divided by the epoch count, so
  over equal-length histories it ranks as an EMA that keeps only 10 % of the
  past per epoch: close to the last epochs' accuracy.

  Args:
    accuracies: ``[candidates, epochs]`` validation accuracies.
    decay: weight of the past.

  Returns:
    ``[candidates]``.
  """
  acc = np.asarray(accuracies, np.float64)
  avg = np.zeros(acc.shape[0])
  for k in range(acc.shape[1]):
    avg = (avg * k * decay + acc[:, k] * (1 - decay)) / (k + 1)
  return avg


def successive_halving(accuracies, windows=((0, 30), (30, 100)), *,
                       keep: float = 0.5,
                       decay: float = 0.1) -> tuple[np.ndarray, ...]:
  """Successive halving of the derived architectures by val accuracy.

  Round ``r`` ranks the survivors by :func:`moving_average_accuracy` over
  epochs ``windows[r] = (start, end)`` and keeps the best
  ``ceil(keep * count)`` (ties to the lower index). The paper's schedule, 8
  genotypes -> 4 over epochs 1-30 -> 2 over 31-100, is the default; the
  official script slices ``[0:30]`` then ``[31:100]``
  (``successive_halving.py``, ``avg_of_acc(31, 100, ...)``), skipping the
  31st epoch: ``windows=((0, 30), (31, 100))`` reproduces it.

  Args:
    accuracies: ``[candidates, epochs]`` recorded per-epoch accuracies.
    windows: one ``(start, end)`` epoch slice per round.
    keep: fraction kept per round.
    decay: passed to :func:`moving_average_accuracy`.

  Returns:
    The survivors' indices after each round, best first.
  """
  acc = np.asarray(accuracies, np.float64)
  alive = np.arange(acc.shape[0])
  rounds = []
  for start, end in windows:
    if not 0 <= start < end <= acc.shape[1]:
      raise ValueError(f"window ({start}, {end}) outside the "
                       f"{acc.shape[1]} recorded epochs")
    score = moving_average_accuracy(acc[alive, start:end], decay)
    order = np.argsort(-score, kind="stable")
    alive = alive[order[:max(1, math.ceil(keep * len(alive)))]]
    rounds.append(alive)
  return tuple(rounds)


__all__ = (
    "CELL_TYPES",
    "EDGE_CRITERIA",
    "EXCLUDED",
    "OBJECTIVES",
    "SHARED",
    "Partition",
    "SplitChoice",
    "cell_index",
    "choose_edge",
    "decode_masks",
    "edge_label",
    "encode_masks",
    "gradient_matching_matrix",
    "gradient_matching_scores",
    "label_leaves",
    "min_cut_partition",
    "moving_average_accuracy",
    "op_masks_full",
    "ops_row",
    "replicate_pytree",
    "restrict_edge",
    "split_edges",
    "split_supernet",
    "successive_halving",
)
