r"""ScaleBiO data reweighting on a corruption ladder, then reweighted training.

A 4-layer, width-64 dense byte-level LM learns weights for K = 8 training
sources — copies of stdlib docstring prose with 0, 20, 40, 60, 80 and 100 %
of their bytes replaced by random bytes (seeded by ``seed``) and two
pure-noise sources — against validation windows of held-out clean prose
(``experiments/tasks/data_reweighting.py``). Then two fresh models train on
a fixed set of ``resample.budget`` windows drawn uniformly and by the
learned weights; both are scored on held-out clean test prose.

Run (``experiments/benchmarks/scalebio_ladder.py`` runs every method and
seed, and the greedy-selection baseline):

  python -m experiments.main --config=experiments/configs/scalebio_lm.py \
      --workdir=/tmp/scalebio/seed0
  python -m experiments.main --config=experiments/configs/scalebio_lm.py \
      --workdir=/tmp/scalebio/seed0 --mode=eval

Variants (comma-separated after a colon):
  uniform   p frozen at uniform weights (same objective, equal steps)
  oracle    p frozen on the clean source only
  lisa      LISA: 2 of the 4 blocks of u and of w train, redrawn every 20
            steps
  fsdp      w, u, both optimizer states and p on a (data=1, fsdp=all
            devices) mesh from the parameters' logical axis names
  smoke     a tiny model and a few steps, seconds on a CPU
"""

import ml_collections

from experiments.configs import parse_variants

VARIANTS = ("uniform", "oracle", "lisa", "fsdp", "smoke")


def _adamw(lr, steps, weight_decay, warmup=0, final=1.0):
  return ml_collections.ConfigDict(dict(
      name="adamw", lr=lr, warmup_steps=warmup, decay_steps=steps,
      final_lr_fraction=final, b1=0.9, b2=0.999, weight_decay=weight_decay,
      clip_norm=0.0))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the config; ``arg`` is a comma-separated list of VARIANTS."""
  variants = parse_variants(arg, VARIANTS, "scalebio_lm")
  config = ml_collections.ConfigDict()
  config.task = "data_reweighting"
  config.seed = 0  # corruption, model init and data order

  config.data = ml_collections.ConfigDict()
  config.data.corpus_dir = ""  # "": the running Python's stdlib.
  config.data.max_bytes = 1_000_000  # of docstring prose, all splits
  config.data.levels = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
  config.data.num_noise = 2
  # Corrupted and noise bytes drawn from the clean prose's byte frequencies:
  # uniform bytes (mostly >= 128, absent from prose) would mark noise by
  # value alone.
  config.data.replacement = "unigram"
  config.data.val_fraction = 0.1
  config.data.test_fraction = 0.1
  config.data.batch_size = 32  # stratified: 4 windows of each of 8 sources
  config.data.val_batch_size = 32
  config.data.seq_len = 64

  config.model = ml_collections.ConfigDict()
  config.model.dim = 64
  config.model.num_layers = 4
  config.model.num_heads = 4
  config.model.ffn_hidden = 256
  config.model.dtype = "float32"

  config.train = ml_collections.ConfigDict()
  config.train.num_steps = 400
  config.train.log_every = 50
  config.train.checkpoint_every = 200
  config.train.max_to_keep = 2

  # ScaleBiO: α = 10 (the released GPT-2 script), AdamW on the logits p
  # (lr 1e-2) and on both model copies. The registry's AdamW decays
  # matrices only, so p (a vector) gets no weight decay (released: 0.01).
  config.reweight = ml_collections.ConfigDict()
  config.reweight.method = "scalebio"  # or "fixed"
  config.reweight.sources = "all"  # fixed: "all", "clean" or "0,3"
  config.solver = ml_collections.ConfigDict()
  config.solver.alpha = 10.0
  steps = config.train.get_ref("num_steps")
  config.solver.upper_optimizer = _adamw(1e-2, steps, 0.0)
  config.solver.lower_optimizer = _adamw(3e-3, steps, 5e-4, warmup=30,
                                         final=0.1)
  config.solver.num_layers = config.model.get_ref("num_layers")
  config.solver.lisa_blocks = 0  # 0: off
  config.solver.lisa_every = 20
  config.solver.clip_at_alpha = False

  # Reweight, then train: fresh models on a fixed resampled set.
  config.resample = ml_collections.ConfigDict()
  config.resample.budget = 4096  # windows of seq_len + 1 bytes
  config.resample.num_steps = 400
  config.resample.solver = ml_collections.ConfigDict(dict(
      name="train", optimizer=_adamw(
          3e-3, config.resample.get_ref("num_steps"), 5e-4, warmup=30,
          final=0.1)))

  config.eval = ml_collections.ConfigDict()
  config.eval.num_batches = 16

  if "uniform" in variants or "oracle" in variants:
    if "uniform" in variants and "oracle" in variants:
      raise ValueError("scalebio_lm: choose one of 'uniform' and 'oracle'")
    config.reweight.method = "fixed"
    config.reweight.sources = "all" if "uniform" in variants else "clean"
  if "lisa" in variants:
    config.solver.lisa_blocks = 2
  if "fsdp" in variants:
    config.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1))
  if "smoke" in variants:
    _smoke(config)
  return config


def _smoke(config):
  config.data.max_bytes = 300_000
  config.data.batch_size = 16
  config.data.val_batch_size = 8
  config.data.seq_len = 16
  config.model.dim = 16
  config.model.num_layers = 2
  config.model.num_heads = 2
  config.model.ffn_hidden = 32
  config.train.num_steps = 4
  config.train.log_every = 2
  config.train.checkpoint_every = 2
  config.resample.budget = 64
  config.resample.num_steps = 4
  config.eval.num_batches = 2
