"""Pruning masks over a flat weight dict: layouts and mask builders.

The one place for the masks of the pruning pipelines
(``experiments/tasks/pruning.py``); the masked layers that hold their scores
inside a model are in :mod:`models.masking`, whose :func:`score_shape` both
share.

* Layouts: :class:`MaskLayout` (mode, scope, excluded layers),
  :func:`prunable_paths`, the dense masks :func:`ones_mask` and
  :func:`dense_mask`, and :func:`apply_mask`.
* Scores: :func:`magnitude_scores`, ``|m ⊙ θ|`` per weight (unstructured)
  or its L1 norm per output filter / input channel (structured).
* Builders: :func:`magnitude_mask` (one-shot magnitude pruning, OMP, and
  each round of IMP), :func:`imp_schedule` (IMP's rounds and targets),
  :func:`topk_mask` (a hard global or per-layer top-k) and
  :func:`straight_through_mask_fn` (BiP's differentiable top-k).
* Reports: :func:`sparsity_report`.

A *mask tree* has the keys of a flat weight dict ``{dotted.path: array}``
(the weights of an image classifier's ``nnx.Param`` leaves, as
``experiments.tasks.image_classification.Network`` holds them). A prunable
leaf (a conv or dense ``kernel``) holds scores or a ``{0, 1}`` mask of
``models.masking.score_shape(kernel.shape, mode)``: the kernel's shape
(unstructured), one entry per output filter or per input channel
(structured). Every other leaf (BatchNorm scale and bias, biases, excluded
layers) holds a shape-``()`` one: never pruned, and constant under every mask
map here, so BiP's implicit gradient for it is zero. Pruned weights are
``z = m ⊙ θ`` leafwise, with broadcasting (BiP's bi-linear form).

References:
  Zhang et al., "Advancing Model Pruning via Bi-level Optimization",
  NeurIPS 2022 (global top-k of scores with a straight-through backward).
  Frankle & Carbin, "The Lottery Ticket Hypothesis", ICLR 2019 (IMP, 20 %
  of the remaining weights per round); Renda, Frankle & Carbin, "Comparing
  Rewinding and Fine-tuning in Neural Network Pruning", ICLR 2020.
"""

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import bilevel
from models.masking import score_shape

Tree = dict[str, jax.Array]

MODES = ("unstructured", "filter", "channel")
SCOPES = ("global", "per_layer")


@dataclasses.dataclass(frozen=True)
class MaskLayout:
  """Which weights are pruned, and in what groups.

  Attributes:
    mode: ``'unstructured'`` (single weights), ``'filter'`` (output filters)
      or ``'channel'`` (input channels).
    scope: ``'global'`` (one top-k over all layers) or ``'per_layer'`` (each
      layer keeps the same fraction).
    exclude: dotted-path prefixes of kernels never pruned (e.g. the
      classifier ``'head'`` under structured pruning, whose filters are the
      classes).
  """
  mode: str = "unstructured"
  scope: str = "global"
  exclude: tuple[str, ...] = ()

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"mask mode {self.mode!r} is not one of {MODES}")
    if self.scope not in SCOPES:
      raise ValueError(f"mask scope {self.scope!r} is not one of {SCOPES}")

  def is_prunable(self, path: str, leaf: jax.Array) -> bool:
    """Whether the weight at ``path`` is a pruned kernel."""
    return (path.rsplit(".", 1)[-1] == "kernel" and jnp.ndim(leaf) >= 2
            and not any(path == p or path.startswith(p + ".")
                        for p in self.exclude))


def prunable_paths(layout: MaskLayout, weights: Mapping[str, jax.Array]
                   ) -> list[str]:
  """The paths of ``weights`` that ``layout`` prunes, in key order."""
  paths = [p for p, w in weights.items() if layout.is_prunable(p, w)]
  if not paths:
    raise ValueError(f"{layout} prunes none of the weights"
                     f" {list(weights)[:8]}...")
  return paths


def ones_mask(layout: MaskLayout, weights: Mapping[str, jax.Array]) -> Tree:
  """The dense mask: ones of the score shape, shape ``()`` elsewhere."""
  prunable = set(prunable_paths(layout, weights))
  return {p: jnp.ones(score_shape(w.shape, layout.mode) if p in prunable
                      else (), jnp.float32)
          for p, w in weights.items()}


def dense_mask(weights: Mapping[str, jax.Array]) -> Tree:
  """A shape-``()`` one per leaf: no pruning, whatever the layout."""
  return {p: jnp.ones((), jnp.float32) for p in weights}


def apply_mask(mask: Mapping[str, jax.Array],
               weights: Mapping[str, jax.Array]) -> Tree:
  """``z = m ⊙ θ`` leafwise (broadcasting), in the weights' dtypes."""
  return {p: (mask[p] * w).astype(w.dtype) for p, w in weights.items()}


def magnitude_scores(layout: MaskLayout, mask: Mapping[str, jax.Array],
                     weights: Mapping[str, jax.Array]) -> Tree:
  """Magnitude importance of each mask entry of the pruned weights.

  ``|m ⊙ θ|`` for unstructured masks; its L1 norm over each filter / input
  channel for structured ones. Already-pruned entries score 0. Non-prunable
  leaves keep their shape-``()`` one.
  """
  prunable = set(prunable_paths(layout, weights))
  out = {}
  for p, w in weights.items():
    if p not in prunable:
      out[p] = jnp.ones((), jnp.float32)
      continue
    magnitude = jnp.abs(mask[p] * w).astype(jnp.float32)
    target = score_shape(w.shape, layout.mode)
    axes = tuple(i for i, n in enumerate(target) if n == 1 and w.shape[i] != 1)
    out[p] = jnp.sum(magnitude, axis=axes, keepdims=True).reshape(target)
  return out


def num_kept(scores: Mapping[str, jax.Array], kept_fraction: float) -> int:
  """Global budget ``k = round(kept_fraction · #entries)``."""
  if not 0.0 < kept_fraction <= 1.0:
    raise ValueError(f"kept fraction must lie in (0, 1], got {kept_fraction}")
  total = sum(int(np.prod(scores[p].shape)) for p in _scored(scores))
  return max(1, int(round(kept_fraction * total)))


def _scored(scores: Mapping[str, jax.Array]) -> list[str]:
  """The keys of the prunable entries of a mask / score tree."""
  # A prunable entry is never shape (): kernels have ≥ 2 dimensions.
  return [p for p, s in scores.items() if jnp.ndim(s) > 0]


def _topk_fn(layout: MaskLayout, kept_fraction: float,
             straight_through: bool, scores_like: Mapping[str, jax.Array]
             ) -> Callable[[Mapping[str, jax.Array]], Tree]:
  keys = _scored(scores_like)
  if layout.scope == "global":
    k = num_kept(scores_like, kept_fraction)
    topk = (bilevel.straight_through_topk if straight_through
            else bilevel.topk_mask)
    select = lambda s: topk(s, k)
  else:
    per_leaf = (bilevel.straight_through_topk_per_leaf if straight_through
                else bilevel.topk_mask_per_leaf)
    select = lambda s: per_leaf(s, kept_fraction)

  def mask_fn(scores):
    kept = select({p: scores[p] for p in keys})
    return {p: kept[p] if p in kept else jnp.ones_like(s)
            for p, s in scores.items()}

  return mask_fn


def topk_mask(layout: MaskLayout, scores: Mapping[str, jax.Array],
              kept_fraction: float) -> Tree:
  """Hard ``{0, 1}`` mask of the largest scores (global or per layer)."""
  return _topk_fn(layout, kept_fraction, False, scores)(scores)


def magnitude_mask(layout: MaskLayout, mask: Mapping[str, jax.Array],
                   weights: Mapping[str, jax.Array],
                   kept_fraction: float) -> Tree:
  """Magnitude pruning: the hard mask of the largest ``|m ⊙ θ|``.

  One-shot magnitude pruning (OMP) of the pretrained weights, and each IMP
  round on the previous round's mask and trained weights.

  Args:
    layout: which weights are pruned, and in what groups.
    mask: the current mask (the dense :func:`ones_mask` for OMP and IMP's
      first round); pruned entries stay pruned.
    weights: the weights ranked by magnitude.
    kept_fraction: the fraction of mask entries kept, in ``(0, 1]``.

  Returns:
    The ``{0, 1}`` mask tree.
  """
  scores = magnitude_scores(layout, mask, weights)
  return topk_mask(layout, scores, kept_fraction)


def straight_through_mask_fn(
    layout: MaskLayout, kept_fraction: float,
    scores_like: Mapping[str, jax.Array],
) -> Callable[[Mapping[str, jax.Array]], Tree]:
  """``scores ↦ mask``: the top-k mask forward, the identity backward.

  The map BiP's solver differentiates through (``scale_by_bip(mask_fn=...)``);
  non-prunable leaves map to constant ones (zero gradient).
  """
  return _topk_fn(layout, kept_fraction, True, scores_like)


def imp_schedule(targets: Sequence[float], rate: float = 0.2
                 ) -> list[tuple[float, bool]]:
  """Kept fractions of IMP's rounds, each flagged if it is a target.

  Round ``j`` keeps ``(1 − rate)^j`` of the weights; a round that would pass
  below the next target sparsity is clipped to it (and evaluated), until the
  last target is reached.

  Args:
    targets: increasing sparsities in ``(0, 1)``, e.g. ``(0.9, 0.95)``.
    rate: fraction of the remaining weights pruned per round.

  Returns:
    ``[(kept_fraction, is_target), ...]``, one entry per round.
  """
  if not targets or list(targets) != sorted(set(targets)) or not all(
      0 < t < 1 for t in targets):
    raise ValueError(f"IMP targets must be increasing sparsities in (0, 1),"
                     f" got {targets}")
  if not 0 < rate < 1:
    raise ValueError(f"IMP rate must lie in (0, 1), got {rate}")
  rounds, kept, pending = [], 1.0, [1.0 - t for t in targets]
  while pending:
    kept *= 1.0 - rate
    if kept <= pending[0] * (1 + 1e-9):
      kept = pending.pop(0)
      rounds.append((kept, True))
    else:
      rounds.append((kept, False))
  return rounds


def sparsity_report(layout: MaskLayout, mask: Mapping[str, jax.Array],
                    weights: Mapping[str, jax.Array]) -> dict[str, float]:
  """Weight sparsity of the pruned layers, overall and per layer.

  Returns:
    ``{'sparsity': zeros / weights over all pruned kernels,
    'mask_sparsity': zero mask entries / entries, 'sparsity/<path>': ...}``.
  """
  paths = prunable_paths(layout, weights)
  report, zeros, total, mask_zeros, mask_total = {}, 0, 0, 0, 0
  for p in paths:
    kept = np.broadcast_to(np.asarray(mask[p]) != 0, weights[p].shape)
    report[f"sparsity/{p}"] = 1.0 - kept.mean()
    zeros += kept.size - int(kept.sum())
    total += kept.size
    mask_zeros += int(np.sum(np.asarray(mask[p]) == 0))
    mask_total += int(np.asarray(mask[p]).size)
  report["sparsity"] = zeros / total
  report["mask_sparsity"] = mask_zeros / mask_total
  return report

