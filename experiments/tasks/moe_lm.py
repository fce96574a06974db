r"""Byte-level language modelling with dense and routed-MoE FFNs.

The task of the registry's ``'moe_lm'`` entry: a :class:`models.moe_lm.MoeLM`
trained on next-byte prediction over the standard-library corpus of
:mod:`experiments.tasks.text_corpus`. It is single-level: ``Params(upper={},
lower=model state)`` with the solver ``'train'`` (AdamW on the lower level),
and the loss

    L = CE + λ_lb · LBL + λ_z · Z + λ_H · H,

CE the mean next-byte cross-entropy (nats) and ``LBL``, ``Z``, ``H`` the
model's ``'load_balancing_loss'``, ``'router_z_loss'`` and
``'router_entropy'`` (unscaled, averaged over layers). The coefficients are
each method's (``shared/reference/moe_routing.md``; set per variant in
``experiments/configs/moe_lm.py``); a non-zero coefficient for a loss the
variant does not define is an error.

Evaluation (``evaluate(params)``, also after ``--mode=eval``):

* ``val_loss`` (nats/byte) and ``val_bits_per_byte`` on a fixed set of
  validation windows (:func:`~experiments.tasks.text_corpus.validation_batches`,
  the training batch size, so expert choice routes groups of the size it
  was trained on);
* ``train_tokens_per_s``: tokens per second of the jitted loss gradient on a
  training batch (median of ``eval.timing_steps`` calls after compilation);
  ``eval_tokens_per_s``: of the validation forward passes;
* routed variants: expert load balance from the kept assignments over the
  validation set, per layer ``max_i load_i / mean_i load_i`` and the
  coefficient of variation ``std / mean``, averaged over layers
  (``load_max_over_mean``, ``load_cv``) and the worst layer's
  (``load_max_over_mean_worst``); ``experts_per_token`` (mean);
  ``drop_rate`` (assignments cut by a capacity or a ``k_max``, over the
  wanted ones) and, for dynamic-k variants (``top_p``, ``expert_choice``,
  ``dynmole_lora``), the histogram ``experts_per_token_<n>`` (fraction of
  tokens using ``n`` experts);
* ``active_params`` (:func:`models.moe_lm.active_params`) and
  ``total_params``.
"""

import statistics
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx

import bilevel
from experiments.task import Task
from experiments.tasks import text_corpus
from models import moe_lm

DYNAMIC_K = ("top_p", "expert_choice", "dynmole_lora")
# Loss coefficient key (config.loss) -> the model's aux name.
LOSS_TERMS = {"load_balancing": "load_balancing_loss",
              "z_loss": "router_z_loss",
              "entropy": "router_entropy"}


def model_config(cfg: ml_collections.ConfigDict) -> moe_lm.MoeLMConfig:
  """The :class:`~models.moe_lm.MoeLMConfig` of the ``model`` section.

  ``0`` stands for ``None`` in ``capacity_factor`` and the ``k_max`` keys.
  """
  return moe_lm.MoeLMConfig(
      ffn=cfg.ffn, vocab_size=text_corpus.VOCAB_SIZE, dim=cfg.dim,
      num_layers=cfg.num_layers, num_heads=cfg.num_heads,
      num_experts=cfg.num_experts, expert_hidden=cfg.expert_hidden,
      active_experts=cfg.active_experts, top_p=cfg.top_p,
      top_p_k_max=cfg.top_p_k_max or None,
      expert_choice_k_max=cfg.expert_choice_k_max or None,
      capacity_factor=cfg.capacity_factor or None,
      coe_iterations=cfg.coe_iterations, lora_rank=cfg.lora_rank,
      lora_alpha=cfg.lora_alpha, lbl_scope=cfg.lbl_scope,
      dispatch=cfg.dispatch, tie_embeddings=cfg.tie_embeddings,
      dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.float32)


def make_loss(graphdef, coefficients: dict[str, float]):
  """``loss(upper, lower, batch)`` (total) and ``parts(lower, tokens)``.

  ``parts`` returns ``(ce, aux)``; ``batch = {'tokens': [B, L + 1]}``.
  """

  def parts(lower, tokens):
    logits, aux = nnx.merge(graphdef, lower)(tokens[:, :-1])
    ce = optax.losses.softmax_cross_entropy_with_integer_labels(
        logits, tokens[:, 1:])
    return jnp.mean(ce), aux

  def loss(upper, lower, batch):
    del upper
    ce, aux = parts(lower, batch["tokens"])
    missing = [k for k, c in coefficients.items()
               if c and LOSS_TERMS[k] not in aux]
    if missing:
      defined = sorted(k for k, v in LOSS_TERMS.items() if v in aux)
      raise ValueError(f"config.loss sets {missing}, but this FFN defines"
                       f" only {defined}")
    return ce + sum(c * aux[LOSS_TERMS[k]] for k, c in coefficients.items()
                    if c)

  return loss, parts


def _load_balance(loads: np.ndarray) -> dict[str, float]:
  """Max/mean and CV of ``loads [NL, E]``, mean over layers and worst."""
  mean = np.maximum(loads.mean(-1), 1e-12)
  ratio = loads.max(-1) / mean
  return {"load_max_over_mean": float(ratio.mean()),
          "load_max_over_mean_worst": float(ratio.max()),
          "load_cv": float((loads.std(-1) / mean).mean())}


def _routing_metrics(ffn, totals, num_tokens, num_layers):
  hist = totals["experts_per_token"].sum(0)  # over layers: [E + 1]
  counts = np.arange(len(hist))
  used = float((hist * counts).sum())
  dropped = float(totals["num_dropped"].sum())
  out = {**_load_balance(totals["expert_load"]),
         "experts_per_token": used / (num_tokens * num_layers),
         "drop_rate": dropped / max(used + dropped, 1.0)}
  if "num_unrouted" in totals:
    out["unrouted_fraction"] = float(totals["num_unrouted"].sum()) / (
        num_tokens * num_layers)
  if ffn in DYNAMIC_K:
    out.update({f"experts_per_token_{n}": float(h) / (num_tokens * num_layers)
                for n, h in enumerate(hist)})
  return out


def _median_seconds(fn, *args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))  # compile
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def make_evaluate(config, graphdef, loss, parts, val_tokens, train_batch):
  """``evaluate(params) -> metrics`` (module docstring)."""
  c = model_config(config.model)
  metric_keys = ("expert_load", "experts_per_token", "num_dropped",
                 "num_unrouted")

  @jax.jit
  def eval_step(lower, tokens):
    ce, aux = parts(lower, tokens)
    return ce, {k: aux[k] for k in metric_keys if k in aux}

  grad_fn = jax.jit(jax.grad(loss, argnums=1))

  def evaluate(params: bilevel.Params) -> dict[str, float]:
    ce_sum, totals, seconds = 0.0, None, 0.0
    for i, tokens in enumerate(val_tokens):
      start = time.perf_counter()
      ce, metrics = jax.block_until_ready(eval_step(params.lower, tokens))
      if i:  # the first call compiles
        seconds += time.perf_counter() - start
      metrics = jax.tree.map(np.asarray, metrics)
      totals = metrics if totals is None else jax.tree.map(
          np.add, totals, metrics)
      ce_sum += float(ce)
    num_batches, batch, length = val_tokens.shape[0], *val_tokens.shape[1:]
    per_batch = batch * (length - 1)
    val_loss = ce_sum / num_batches
    grad_s = _median_seconds(grad_fn, params.upper, params.lower,
                             train_batch, repeats=config.eval.timing_steps)
    out = {
        "val_loss": val_loss,
        "val_bits_per_byte": val_loss / np.log(2.0),
        "train_tokens_per_s": per_batch / grad_s,
        "eval_tokens_per_s": (per_batch * (num_batches - 1) / seconds
                              if num_batches > 1 else float("nan")),
        "active_params": float(moe_lm.active_params(c)),
        "total_params": float(sum(x.size for x in
                                  jax.tree.leaves(params.lower))),
    }
    if totals:
      out.update(_routing_metrics(c.ffn, totals, per_batch * num_batches,
                                  c.num_layers))
    return out

  return evaluate


def task_from_config(config: ml_collections.ConfigDict,
                     key: jax.Array) -> Task:
  """The ``moe_lm`` task of ``config`` (``experiments/configs/moe_lm.py``)."""
  model_key, data_key = jax.random.split(key)
  corpus = text_corpus.load_corpus(
      config.data.corpus_dir or None, max_bytes=config.data.max_bytes,
      val_fraction=config.data.val_fraction)
  logging.info("moe_lm corpus %s: %d train bytes (%d files), %d validation"
               " bytes (%d files)", corpus.fingerprint[:12],
               corpus.train.size, len(corpus.train_files),
               corpus.validation.size, len(corpus.validation_files))
  model = moe_lm.MoeLM(model_config(config.model),
                       rngs=nnx.Rngs(params=model_key))
  graphdef, lower = nnx.split(model)
  coefficients = {k: float(v) for k, v in config.loss.items()}
  unknown = sorted(set(coefficients) - set(LOSS_TERMS))
  if unknown:
    raise ValueError(f"unknown config.loss keys {unknown}; valid:"
                     f" {sorted(LOSS_TERMS)}")
  loss, parts = make_loss(graphdef, coefficients)
  batch = text_corpus.train_batches(data_key, corpus.train,
                                    config.data.batch_size,
                                    config.data.seq_len)
  val_tokens = text_corpus.validation_batches(
      corpus.validation, config.data.batch_size, config.data.seq_len,
      config.eval.num_batches)
  evaluate = make_evaluate(config, graphdef, loss, parts, val_tokens,
                           {"tokens": batch(0)})
  return Task(bilevel.Problem(outer_loss=loss, inner_loss=loss),
              bilevel.Params({}, lower),
              lambda step: {"outer_batch": {"tokens": batch(step)}},
              evaluate)
