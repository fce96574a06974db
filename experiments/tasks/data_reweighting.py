r"""Learning per-source data weights for a byte-level LM (ScaleBiO).

The registry's ``'data_reweighting'`` pipeline: a dense decoder-only LM
(:class:`models.moe_lm.MoeLM` with ``ffn='dense'``) on the multi-source
corpus of :mod:`experiments.tasks.source_corpus` — a seeded corruption
ladder of one clean prose source and pure-noise sources — with validation
and test windows from held-out clean prose. Three stages:

1. ``weights``: ScaleBiO (:func:`bilevel.scalebio`) over
   ``Params(upper=p [K], lower=w)``; the inner loss is the
   source-weighted mean next-byte cross-entropy of a stratified batch
   (:func:`bilevel.source_weighted_loss`), the outer loss the mean
   cross-entropy on a validation batch. ``reweight.method = 'fixed'``
   freezes ``p`` at the weights of ``reweight.sources`` (``'all'``: uniform,
   ``'clean'``: the uncorrupted sources only, or source indices ``'0,3'``)
   and trains ``w`` on the same objective: the baselines at equal steps.
2. ``resampled_uniform``: a fresh model trained on a fixed training set of
   ``resample.budget`` windows drawn uniformly over the sources.
3. ``resampled``: the same budget drawn by the weights of stage 1 (the
   paper's "reweight, then train" use).

Evaluation (per stage, in ``stages.json``): ``test_loss`` (nats/byte on the
held-out clean test windows); for ``weights`` also ``val_loss``,
``weight/<source>``, ``ladder_spearman`` (rank correlation of the ladder's
weights with its corruption levels) and ``noise_weight_max``.

References:
  Pan et al., *ScaleBiO*, ACL 2025 (arXiv 2406.19976), §4 (denoising study
  and "reweight, then fine-tune").
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx

import bilevel
from experiments import registry
from experiments.task import Pipeline, Stage
from experiments.tasks import source_corpus, text_corpus
from models import moe_lm

METHODS = ("scalebio", "fixed")
# Logit of an excluded source: its softmax weight is below 1e-13.
EXCLUDED_LOGIT = -30.0


def model_config(cfg: ml_collections.ConfigDict) -> moe_lm.MoeLMConfig:
  """A dense :class:`~models.moe_lm.MoeLMConfig` with FFN hidden
  ``cfg.ffn_hidden`` (the dense hidden is ``k f + E/2``: ``E = 2, k = 1``)."""
  return moe_lm.MoeLMConfig(
      ffn="dense", vocab_size=text_corpus.VOCAB_SIZE, dim=cfg.dim,
      num_layers=cfg.num_layers, num_heads=cfg.num_heads, num_experts=2,
      active_experts=1, expert_hidden=cfg.ffn_hidden - 1,
      dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.float32)


def sequence_losses(graphdef, lower, tokens: jax.Array) -> jax.Array:
  """Mean next-byte cross-entropy of each row: ``[B, L + 1] -> [B]``."""
  logits, _ = nnx.merge(graphdef, lower)(tokens[:, :-1])
  ce = optax.losses.softmax_cross_entropy_with_integer_labels(
      logits, tokens[:, 1:])
  return jnp.mean(ce, axis=-1)


def make_problem(graphdef) -> bilevel.Problem:
  """ScaleBiO's losses: ``L₁(w; V)`` and ``L₂(w, softmax(p); B)``."""

  def outer_loss(logits, lower, batch):
    del logits
    return jnp.mean(sequence_losses(graphdef, lower, batch["tokens"]))

  def inner_loss(logits, lower, batch):
    losses = sequence_losses(graphdef, lower, batch["tokens"])
    return bilevel.source_weighted_loss(losses, batch["source"], logits)

  return bilevel.Problem(outer_loss, inner_loss)


def plain_problem(graphdef) -> bilevel.Problem:
  """Single-level training on a fixed set: mean cross-entropy."""

  def loss(upper, lower, batch):
    del upper
    return jnp.mean(sequence_losses(graphdef, lower, batch["tokens"]))

  return bilevel.Problem(loss, loss)


def source_logits(corpus: source_corpus.SourceCorpus, sources: str
                  ) -> np.ndarray:
  """Fixed logits: 0 for the chosen sources, ``EXCLUDED_LOGIT`` elsewhere.

  Args:
    corpus: the corpus (for the number of sources and their corruption).
    sources: ``'all'``, ``'clean'`` (corruption 0) or indices ``'0,3'``.

  Raises:
    ValueError: an index out of range, or no source chosen.
  """
  k = len(corpus.sources)
  if sources == "all":
    chosen = list(range(k))
  elif sources == "clean":
    chosen = [i for i, c in enumerate(corpus.corruption) if c == 0.0]
  else:
    try:
      chosen = [int(s) for s in sources.split(",") if s.strip()]
    except ValueError:
      chosen = []
  if not chosen or any(not 0 <= i < k for i in chosen):
    raise ValueError(f"config key reweight.sources={sources!r}: need 'all',"
                     f" 'clean' or comma-separated indices in [0, {k})")
  logits = np.full([k], EXCLUDED_LOGIT, np.float32)
  logits[chosen] = 0.0
  return logits


def spearman(x, y) -> float:
  """Spearman rank correlation (average ranks for ties)."""
  rank = lambda v: _average_ranks(np.asarray(v, np.float64))
  rx, ry = rank(x), rank(y)
  rx, ry = rx - rx.mean(), ry - ry.mean()
  denominator = np.sqrt((rx ** 2).sum() * (ry ** 2).sum())
  return float((rx * ry).sum() / denominator) if denominator else 0.0


def _average_ranks(v: np.ndarray) -> np.ndarray:
  order = np.argsort(v, kind="stable")
  ranks = np.empty(len(v))
  ranks[order] = np.arange(len(v), dtype=np.float64)
  for value in np.unique(v):
    tied = v == value
    ranks[tied] = ranks[tied].mean()
  return ranks


def weight_metrics(corpus, logits) -> dict[str, float]:
  """``weight/<source>``, ``ladder_spearman``, ``noise_weight_max``."""
  weights = np.asarray(jax.nn.softmax(jnp.asarray(logits, jnp.float32)))
  out = {f"weight/{name}": float(w) for name, w in zip(corpus.names,
                                                       weights)}
  ladder = [i for i, n in enumerate(corpus.names) if n.startswith("corrupt")]
  noise = [i for i, n in enumerate(corpus.names) if n.startswith("noise")]
  out["ladder_spearman"] = spearman(
      weights[ladder], [corpus.corruption[i] for i in ladder])
  if noise:
    out["noise_weight_max"] = float(weights[noise].max())
  return out


def make_window_loss(graphdef):
  """``loss(lower, windows [N, B, L+1]) -> float``: mean cross-entropy.

  One compiled batch loss serves every set of windows of the same batch
  shape (validation, test, every stage).
  """

  @jax.jit
  def batch_loss(lower, tokens):
    return jnp.mean(sequence_losses(graphdef, lower, tokens))

  def loss(lower, windows) -> float:
    return float(np.mean([batch_loss(lower, t) for t in windows]))

  return loss


def solver_from_config(cfg: ml_collections.ConfigDict, *,
                       method: str = "scalebio",
                       seed: int = 0) -> optax.GradientTransformation:
  """ScaleBiO from the ``solver`` section (``method='fixed'``: frozen p).

  Reads ``alpha``, ``upper_optimizer``, ``lower_optimizer``,
  ``lisa_blocks`` (0: no LISA), ``lisa_every``, ``num_layers`` (the LISA
  block count) and ``clip_at_alpha``.
  """
  lisa = None
  if cfg.lisa_blocks:
    lisa = bilevel.Lisa(num_blocks=cfg.num_layers,
                        num_active=cfg.lisa_blocks, every=cfg.lisa_every)
  # Fixed weights: the same step with p frozen (u then never reaches w).
  upper = (registry.build_optimizer(cfg.upper_optimizer)
           if method == "scalebio" else optax.set_to_zero())
  return bilevel.scalebio(
      cfg.alpha, upper_optimizer=upper,
      lower_optimizer=registry.build_optimizer(cfg.lower_optimizer),
      lisa=lisa, seed=seed, clip_at_alpha=cfg.clip_at_alpha)


def corpus_from_config(config) -> source_corpus.SourceCorpus:
  """The multi-source corpus of ``config.data`` (seeded by ``config.seed``)."""
  d = config.data
  return source_corpus.build_source_corpus(
      d.corpus_dir or None, max_bytes=d.max_bytes,
      levels=tuple(float(x) for x in d.levels), num_noise=d.num_noise,
      seed=config.seed, val_fraction=d.val_fraction,
      test_fraction=d.test_fraction, replacement=d.replacement)


def _weights_stage(config, corpus, graphdef, lower, keys, window_loss,
                   test_windows):
  k = len(corpus.sources)
  method = config.reweight.method
  if method not in METHODS:
    raise ValueError(f"config key reweight.method={method!r}: one of"
                     f" {METHODS}")
  logits = (np.zeros([k], np.float32) if method == "scalebio"
            else source_logits(corpus, config.reweight.sources))
  d = config.data
  train = source_corpus.source_batches(keys["train"], corpus.sources,
                                       d.batch_size, d.seq_len)
  val = text_corpus.train_batches(keys["val"], corpus.validation,
                                  d.val_batch_size, d.seq_len)
  val_windows = source_corpus.evaluation_windows(
      corpus.validation, d.val_batch_size, d.seq_len,
      config.eval.num_batches)

  def evaluate(params):
    return {"test_loss": window_loss(params.lower, test_windows),
            "val_loss": window_loss(params.lower, val_windows),
            **weight_metrics(corpus, params.upper)}

  return Stage(
      name="weights",
      solver=solver_from_config(config.solver, method=method,
                                seed=config.seed),
      problem=make_problem(graphdef),
      init=lambda finals: bilevel.Params(jnp.asarray(logits), lower),
      batches=lambda step: {"outer_batch": {"tokens": val(step)},
                            "inner_batch": train(step)},
      num_steps=config.train.num_steps, evaluate=evaluate,
      step_kind="scalebio")


def _resample_stage(name, config, corpus, graphdef, lower, key, window_loss,
                    test_windows, weights_of):
  r = config.resample
  data_key, order_key = jax.random.split(key)

  def batches_from(finals):
    weights = weights_of(finals)
    logging.info("stage %s: resampling %d windows by weights %s", name,
                 r.budget, np.round(weights, 4))
    fixed = source_corpus.resampled_training_set(
        data_key, corpus.sources, weights, r.budget, config.data.seq_len)
    stream = source_corpus.fixed_set_batches(order_key, fixed,
                                             config.data.batch_size)
    return lambda step: {"outer_batch": {"tokens": stream(step)["tokens"]}}

  return Stage(
      name=name, solver=registry.build_solver(r.solver),
      problem=plain_problem(graphdef),
      init=lambda finals: bilevel.Params({}, lower), batches=None,
      batches_from=batches_from, num_steps=r.num_steps,
      evaluate=lambda params: {"test_loss": window_loss(params.lower,
                                                        test_windows)},
      params_like=bilevel.Params({}, lower))


def learned_weights(finals) -> np.ndarray:
  """``softmax(p)`` of the ``weights`` stage's final logits."""
  return np.asarray(jax.nn.softmax(jnp.asarray(finals["weights"].upper,
                                               jnp.float32)))


def pipeline_from_config(config: ml_collections.ConfigDict,
                         key: jax.Array) -> Pipeline:
  """The ``data_reweighting`` pipeline (module docstring)."""
  corpus = corpus_from_config(config)
  logging.info("data_reweighting corpus %s: sources %s (%s bytes each),"
               " %d validation and %d test bytes", corpus.fingerprint[:12],
               corpus.names, [s.size for s in corpus.sources],
               corpus.validation.size, corpus.test.size)
  model_key, train_key, val_key, resample_key = jax.random.split(key, 4)
  graphdef, lower = nnx.split(moe_lm.MoeLM(
      model_config(config.model), rngs=nnx.Rngs(params=model_key)))
  d = config.data
  windows = source_corpus.evaluation_windows(
      corpus.test, d.val_batch_size, d.seq_len, config.eval.num_batches)
  loss = make_window_loss(graphdef)
  weights = _weights_stage(config, corpus, graphdef, lower,
                           {"train": train_key, "val": val_key}, loss,
                           windows)
  k = len(corpus.sources)
  uniform = _resample_stage(
      "resampled_uniform", config, corpus, graphdef, lower, resample_key,
      loss, windows, lambda finals: np.full([k], 1.0 / k))
  resampled = _resample_stage(
      "resampled", config, corpus, graphdef, lower, resample_key, loss,
      windows, learned_weights)
  return Pipeline(weights.init({}), [weights, uniform, resampled])
