"""Greedy forward selection of training sources by validation loss.

The data-selection baseline for :mod:`experiments.tasks.data_reweighting`:
starting from no source, each round trains a fresh proxy model for
``proxy_steps`` on every candidate set ``S ∪ {s}`` (uniform weights over
the set, the same stratified batches and objective as the ``fixed``
method's inner loss) and keeps the source whose set gives the lowest loss
on the validation windows; it stops when no candidate lowers the best loss
so far. The selected sources then train with uniform weights over them
(``reweight.method='fixed'``, ``reweight.sources='<indices>'``).

Each proxy run starts from the same initial model and sees the same batch
sequence; one compiled step serves every run (the set enters as logits).
"""

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx

from experiments import registry
from experiments.tasks import data_reweighting, source_corpus
from models import moe_lm


class Selection(NamedTuple):
  """The result of :func:`greedy_selection`.

  Attributes:
    selected: the chosen source indices, in the order chosen.
    rounds: per round, ``{candidate index: validation loss}``.
    best_loss: the validation loss of the selected set.
  """
  selected: tuple[int, ...]
  rounds: tuple[dict[int, float], ...]
  best_loss: float


def _logits(chosen: Sequence[int], num_sources: int) -> jax.Array:
  logits = np.full([num_sources], data_reweighting.EXCLUDED_LOGIT,
                   np.float32)
  logits[list(chosen)] = 0.0
  return jnp.asarray(logits)


def _proxy_runner(config, corpus, key):
  """``run(chosen) -> validation loss`` of a proxy model trained on it."""
  model_key, train_key = jax.random.split(key)
  graphdef, lower = nnx.split(moe_lm.MoeLM(
      data_reweighting.model_config(config.model),
      rngs=nnx.Rngs(params=model_key)))
  problem = data_reweighting.make_problem(graphdef)
  optimizer = registry.build_optimizer(config.solver.lower_optimizer)
  d = config.data
  batches = source_corpus.source_batches(train_key, corpus.sources,
                                         d.batch_size, d.seq_len)
  val_windows = source_corpus.evaluation_windows(
      corpus.validation, d.val_batch_size, d.seq_len,
      config.eval.num_batches)
  window_loss = data_reweighting.make_window_loss(graphdef)

  @jax.jit
  def step(params, opt_state, logits, batch):
    grads = jax.grad(problem.inner_loss, argnums=1)(logits, params, batch)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  def run(chosen, proxy_steps):
    params = jax.tree.map(jnp.copy, lower)
    opt_state = optimizer.init(params)
    logits = _logits(chosen, len(corpus.sources))
    for i in range(proxy_steps):
      params, opt_state = step(params, opt_state, logits, batches(i))
    return window_loss(params, val_windows)

  return run


def forward_selection(loss_of, num_sources: int, tolerance: float = 0.0
                      ) -> Selection:
  """Greedy forward selection of sources minimising ``loss_of(chosen)``.

  Args:
    loss_of: ``loss_of(list of indices) -> float``.
    num_sources: ``K``; candidates are ``0 … K − 1``.
    tolerance: a source is added only if it lowers the loss by more.

  Returns:
    The :class:`Selection`.
  """
  selected, rounds, best = [], [], float("inf")
  remaining = list(range(num_sources))
  while remaining:
    losses = {s: float(loss_of(selected + [s])) for s in remaining}
    rounds.append(losses)
    choice = min(losses, key=losses.get)
    if losses[choice] >= best - tolerance:
      break
    best = losses[choice]
    selected.append(choice)
    remaining.remove(choice)
  return Selection(tuple(selected), tuple(rounds), best)


def greedy_selection(config, key: jax.Array, proxy_steps: int,
                     tolerance: float = 0.0) -> Selection:
  """:func:`forward_selection` by proxy runs on ``config``'s corpus.

  Args:
    config: a ``scalebio_lm`` config (its data, model, optimizer, eval).
    key: PRNG key of the proxy models' init and data.
    proxy_steps: training steps of each proxy run.
    tolerance: see :func:`forward_selection`.

  Returns:
    The :class:`Selection`.
  """
  if proxy_steps < 1:
    raise ValueError(f"proxy_steps must be >= 1, got {proxy_steps}")
  corpus = data_reweighting.corpus_from_config(config)
  run = _proxy_runner(config, corpus, key)

  def loss_of(chosen):
    loss = run(chosen, proxy_steps)
    logging.info("greedy: %s -> %.4f", [corpus.names[s] for s in chosen],
                 loss)
    return loss

  return forward_selection(loss_of, len(corpus.sources), tolerance)
