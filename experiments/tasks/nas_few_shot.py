r"""GM-NAS in the ``architecture_search`` pipeline: ``method='gm_nas'``.

Few-shot NAS by gradient matching (Hu et al., ICLR 2022) on the DARTS
supernet of :mod:`experiments.tasks.nas_search`, as stages:

1. ``supernet``: the one-shot supernet trained with ``α`` frozen at its
   uniform start (the official ``--fix_alpha_equal``) for
   ``gm.warmup_steps`` steps.
2. The split (no training): for every unsplit edge of ``gm.cells`` and each
   pair of its ops, the gradient-matching score ``cos(g_i, g_j)`` of the
   shared weights' gradients with the edge restricted to ``o_i`` / ``o_j``,
   averaged over ``gm.score_batches`` training batches
   (:func:`models.darts.gradient_matching.gradient_matching_scores`); each
   edge's ops cut into B = 2 groups by the least cut, and the edge whose
   cut costs least is split (:func:`gradient_matching.choose_edge`): two
   sub-supernets, each the parent with that edge restricted to one group.
   It is recomputed from the restored ``supernet`` params on a resumed run
   (deterministic), and logged.
3. ``sub0``, ``sub1``: each sub-supernet searched with the configured DARTS
   solver for ``gm.search_steps`` steps, from the supernet's *initial*
   weights and ``α`` (the paper's re-initialisation after the last split,
   code ``--restart final``; ``gm.restart=False`` continues from the
   warmed-up weights instead).
4. Selection: the sub-supernet with the best ``val_accuracy`` (its own
   mixture of ops on the search's val half) gives the genotype that the
   pipeline's ``retrain`` stage trains.

Where the CPU protocol departs from the paper, for budget: one split
(2 sub-supernets; the paper splits at epochs 2, 4, 6 into 8) and
selection by the sub-supernets' validation accuracy instead of
successive halving over short retrainings of the 8 genotypes
(:func:`gradient_matching.successive_halving` implements that one).

References:
  Hu, Wang, Hong, Li, Hsieh, Feng, *Generalizing Few-Shot NAS with Gradient
  Matching*, ICLR 2022, §3 and Appendix (DARTS-space schedule).
"""

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

import bilevel
from experiments.task import DeferredStage, Stage
from experiments.tasks import nas_search
from models import darts, merge_levels
from models.darts import few_shot, functional
from models.darts import gradient_matching as gm

NUM_CHILDREN = 2  # B in the paper's DARTS-space runs
_FROZEN = 2**31 - 1  # warm-up steps that never end: α stays put


def check_config(cfg: ml_collections.ConfigDict) -> None:
  """Checks the ``gm`` section.

  Raises:
    ValueError: naming the key.
  """
  for key in ("warmup_steps", "search_steps", "score_batches"):
    if cfg[key] < 1:
      raise ValueError(f"config key gm.{key}={cfg[key]} must be >= 1")
  if not set(cfg.cells) <= set(darts.CELL_KINDS) or not cfg.cells:
    raise ValueError(f"config key gm.cells={tuple(cfg.cells)}: a non-empty"
                     f" subset of {darts.CELL_KINDS}")
  if cfg.objective not in gm.OBJECTIVES:
    raise ValueError(f"config key gm.objective={cfg.objective!r}; valid:"
                     f" {gm.OBJECTIVES}")


def frozen_solver_config(solver: ml_collections.ConfigDict
                         ) -> ml_collections.ConfigDict:
  """The ``solver`` section with ``α`` frozen for good (its warm-up never
  ends)."""
  frozen = solver.copy_and_resolve_references()
  frozen.warmup_steps = _FROZEN
  return frozen


def score_batches(split: nas_search.SearchSplit, num: int, batch_size: int,
                  key: jax.Array) -> dict[str, jax.Array]:
  """``{"images": [num, B, H, W, 3], "labels": [num, B]}``: the first
  ``num`` batches of a shuffled stream over the train half, not
  augmented (the official scoring batches are plain training batches)."""
  stream = split.train.stream(key, batch_size)
  batches = [split.train.batch(stream, step, key) for step in range(num)]
  return {"images": jnp.stack([b["image"] for b in batches]),
          "labels": jnp.stack([b["label"] for b in batches])}


def choose_split(supernet: nas_search.Supernet, params: bilevel.Params,
                 batches: Mapping[str, jax.Array],
                 cfg: ml_collections.ConfigDict) -> gm.SplitChoice:
  """The GM-NAS split of the one-shot supernet at ``params`` (module
  docstring, step 2)."""
  num_edges = params.upper["alphas_normal"][...].shape[0]
  masks = gm.op_masks_full(num_edges, len(darts.PRIMITIVES))
  network = merge_levels(supernet.graphdef, params, supernet.rest)
  labels = few_shot.edge_labels(network, params.lower)
  grad_fn = few_shot.cross_entropy_grad_fn(supernet.graphdef, params.upper,
                                           supernet.rest)
  scores = lambda cell, edge: gm.gradient_matching_scores(
      grad_fn, params.lower, masks, cell, edge, batches, labels,
      op_batching=cfg.op_batching)
  with functional.kernels(supernet.kernels):  # the scores trace here
    choice = gm.choose_edge(masks, scores, cells=tuple(cfg.cells),
                            objective=cfg.objective)
  groups = [[darts.PRIMITIVES[o] for o in g] for g in choice.groups]
  logging.info("GM-NAS split: %s edge %d (cut cost %.4f) into %s",
               choice.cell, choice.edge, choice.cost, groups)
  return choice


def split_metrics(choice: gm.SplitChoice) -> dict[str, Any]:
  """The split as JSON values for ``stages.json``."""
  return {"split_cell": choice.cell, "split_edge": choice.edge,
          "split_groups": [[darts.PRIMITIVES[o] for o in g]
                           for g in choice.groups],
          "split_cost": float(choice.cost)}


def child_masks(choice: gm.SplitChoice, num_edges: int
                ) -> tuple[dict[str, np.ndarray], ...]:
  """The sub-supernets' op masks, as numpy (for JSON and ``derive``)."""
  masks = gm.op_masks_full(num_edges, len(darts.PRIMITIVES))
  return tuple({k: np.asarray(v) for k, v in child.items()}
               for child in gm.split_supernet(masks, choice.cell,
                                              choice.edge, choice.groups))


def search_stages(config: ml_collections.ConfigDict,
                  supernet: nas_search.Supernet,
                  split: nas_search.SearchSplit,
                  batches: Callable[[int], dict],
                  accuracy: Callable[..., float], key: jax.Array
                  ) -> tuple[list[Stage | DeferredStage],
                             Callable[[Mapping[str, bilevel.Params]],
                                      tuple[str, Any]]]:
  """GM-NAS's stages, and ``chosen(finals) -> (stage name, op masks)`` of
  the selected sub-supernet (module docstring).

  Args:
    config: the pipeline's config (``gm``, ``solver``, ``search``).
    supernet: the one-shot supernet (:func:`nas_search.build_supernet`).
    split: the search's data halves.
    batches: the search batches (:func:`nas_search.search_batches`).
    accuracy: :func:`nas_search.val_accuracy_fn` of the supernet.
    key: the scoring batches' key.
  """
  cfg = config.gm
  check_config(cfg)
  frozen = nas_search.solver_from_config(frozen_solver_config(config.solver))
  warmup = nas_search.search_stage(
      config, supernet, batches, name="supernet",
      num_steps=cfg.warmup_steps, solver=frozen)
  num_edges = supernet.params.upper["alphas_normal"][...].shape[0]

  cache = {}

  def split_of(finals) -> gm.SplitChoice:
    """The split of ``finals['supernet']``, computed once per params."""
    parent = finals["supernet"]
    if cache.get("parent") is not parent:
      cache.update(parent=parent, choice=choose_split(
          supernet, parent, score_batches(
              split, cfg.score_batches, config.search.batch_size, key), cfg))
    return cache["choice"]

  def child(k: int) -> DeferredStage:
    def build(finals):
      choice = split_of(finals)
      init = (lambda f: supernet.params) if cfg.restart else (
          lambda f: f["supernet"])
      stage = nas_search.search_stage(
          config, supernet, batches, name=f"sub{k}",
          op_masks=child_masks(choice, num_edges)[k], init=init,
          num_steps=cfg.search_steps, accuracy=accuracy)
      evaluate = stage.evaluate
      return stage._replace(evaluate=lambda params: {
          **evaluate(params), **split_metrics(choice)})
    return DeferredStage(f"sub{k}", build)

  def chosen(finals) -> tuple[str, Any]:
    masks = child_masks(split_of(finals), num_edges)
    scores = [accuracy(finals[f"sub{k}"], masks[k])
              for k in range(NUM_CHILDREN)]
    best = int(np.argmax(scores))  # ties: the lower index
    logging.info("GM-NAS selection: val accuracies %s, sub%d chosen",
                 scores, best)
    return f"sub{best}", masks[best]

  return [warmup, *(child(k) for k in range(NUM_CHILDREN))], chosen
