"""Evaluation metrics: accuracy and exact rank-based AUROC."""

import jax
import jax.numpy as jnp
import numpy as np


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Fraction of examples whose arg-max logit is the label.

  Args:
    logits: ``[batch, num_classes]``.
    labels: int ``[batch]``.

  Returns:
    float32 scalar in [0, 1].

  Raises:
    ValueError: mismatched shapes.
  """
  if logits.ndim != 2 or labels.shape != logits.shape[:1]:
    raise ValueError(f"accuracy expects logits [batch, num_classes] and labels"
                     f" [batch], got {logits.shape} and {labels.shape}")
  return jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))


def _average_ranks(x: np.ndarray) -> np.ndarray:
  """1-based ranks of ``x``, tied values sharing the mean of their ranks."""
  order = np.argsort(x, kind="stable")
  sorted_x = x[order]
  # Each run of equal values [start, end) gets rank (start + 1 + end) / 2.
  new_run = np.concatenate([[True], sorted_x[1:] != sorted_x[:-1]])
  run_id = np.cumsum(new_run) - 1
  starts = np.flatnonzero(new_run)
  ends = np.append(starts[1:], len(x))
  ranks = np.empty(len(x), np.float64)
  ranks[order] = ((starts + 1 + ends) / 2.0)[run_id]
  return ranks


def auroc(scores, labels) -> float:
  """Exact area under the ROC curve (Mann–Whitney U, ties count one half).

  ``AUROC = P(s⁺ > s⁻) + ½ P(s⁺ = s⁻)`` for a random positive score ``s⁺``
  and a random negative score ``s⁻``: 1.0 when every positive scores above
  every negative, 0.5 for uninformative scores.

  Args:
    scores: ``[n]`` real scores, higher meaning "more positive".
    labels: ``[n]`` bool (or 0/1) labels, True for positives.

  Returns:
    The AUROC in [0, 1] (a Python float).

  Raises:
    ValueError: mismatched shapes, non-finite scores, or only one class.
  """
  scores = np.asarray(scores, np.float64)
  labels = np.asarray(labels)
  if scores.ndim != 1 or labels.shape != scores.shape:
    raise ValueError(f"auroc expects scores [n] and labels [n], got"
                     f" {scores.shape} and {labels.shape}")
  if not np.all(np.isfinite(scores)):
    raise ValueError("auroc scores must be finite")
  positive = labels.astype(bool)
  num_pos = int(positive.sum())
  num_neg = len(positive) - num_pos
  if num_pos == 0 or num_neg == 0:
    raise ValueError(f"auroc needs both classes, got {num_pos} positives and"
                     f" {num_neg} negatives")
  rank_sum = _average_ranks(scores)[positive].sum()
  u_statistic = rank_sum - num_pos * (num_pos + 1) / 2.0
  return float(u_statistic / (num_pos * num_neg))
