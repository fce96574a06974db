r"""Byte-level LM on the Python stdlib: dense FFN against five MoE routers.

A 4-layer, width-128 decoder (``models/moe_lm.py``) whose FFN is dense or
routed, every variant with the same *active* parameters per token (the
arithmetic is in ``models/moe_lm.py``), trained with AdamW on next-byte
cross-entropy plus each method's router losses for a fixed token budget
(``num_steps = token_budget // (batch_size · seq_len)``). The corpus is the
running Python's standard-library source, built at run time
(``experiments/tasks/text_corpus.py``).

Run (one variant; ``experiments/benchmarks/moe_lm_table.py`` runs all six):

  python -m experiments.main --config=experiments/configs/moe_lm.py:top2 \
      --workdir=/tmp/moe_lm/top2
  python -m experiments.main --config=experiments/configs/moe_lm.py:top2 \
      --workdir=/tmp/moe_lm/top2 --mode=eval

Variants (comma-separated after a colon; at most one FFN):
  dense          MLP with the routed variants' active parameters
  top2           top-2 token choice, dropless (default)
  top_p          top-p dynamic routing, p = 0.4
  expert_choice  each expert its top-(2T/E) tokens of the batch
  coe            Chain-of-Experts, 2 iterations of top-1
  dynmole_lora   dense FFN + 8 routed LoRA experts, DynMoLE's router
  smoke          a tiny model and a few steps, seconds on a CPU
"""

import ml_collections

from experiments.configs import parse_variants

FFN_VARIANTS = ("dense", "top2", "top_p", "expert_choice", "coe",
                "dynmole_lora")
VARIANTS = (*FFN_VARIANTS, "smoke")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the config; ``arg`` is a comma-separated list of VARIANTS."""
  variants = parse_variants(arg, VARIANTS, "moe_lm")
  ffns = [v for v in variants if v in FFN_VARIANTS]
  if len(ffns) > 1:
    raise ValueError(f"at most one FFN variant, got {ffns}")

  config = ml_collections.ConfigDict()
  config.task = "moe_lm"
  config.seed = 0

  # Data: bytes of the stdlib .py files, split by file; windows of seq_len.
  config.data = ml_collections.ConfigDict()
  config.data.corpus_dir = ""  # "": the running Python's stdlib.
  config.data.max_bytes = 8_000_000
  config.data.val_fraction = 0.1
  config.data.batch_size = 16
  config.data.seq_len = 128
  # 200 steps of 16 × 128 bytes: 1–6.5 minutes per variant on a 2-core CPU
  # (experiments/benchmarks/moe_lm_table.py has the measured step times).
  config.data.token_budget = 409_600

  # Model: every FFN variant matched to k = 2 experts' active parameters.
  config.model = ml_collections.ConfigDict()
  config.model.ffn = "top2"
  config.model.dim = 128
  config.model.num_layers = 4
  config.model.num_heads = 4
  config.model.num_experts = 8
  config.model.expert_hidden = 256
  config.model.active_experts = 2
  config.model.top_p = 0.4
  # Slots per token of the dynamic-k routers (0: E). Assignments past the
  # cap are counted in drop_rate; 4 = 2k rarely cuts and halves the
  # dispatch of E slots.
  config.model.top_p_k_max = 4
  config.model.expert_choice_k_max = 4
  config.model.capacity_factor = 0.0  # top2; 0: dropless.
  config.model.coe_iterations = 2
  config.model.lora_rank = 16
  config.model.lora_alpha = 32.0
  config.model.lbl_scope = "micro_batch"
  config.model.dispatch = "ragged_dot"
  config.model.tie_embeddings = False
  config.model.dtype = "float32"

  # Router-loss coefficients (each method's, shared/reference/moe_routing.md);
  # the FFN variants set them.
  config.loss = ml_collections.ConfigDict()
  config.loss.load_balancing = 0.0
  config.loss.z_loss = 0.0
  config.loss.entropy = 0.0

  # Training loop: the token budget fixes the step count.
  config.train = ml_collections.ConfigDict()
  config.train.num_steps = config.data.get_ref("token_budget") // (
      config.data.get_ref("batch_size") * config.data.get_ref("seq_len"))
  config.train.log_every = 25
  config.train.checkpoint_every = 50
  config.train.max_to_keep = 2

  # Solver: AdamW on the model (single level), warm-up then cosine decay.
  config.solver = ml_collections.ConfigDict()
  config.solver.name = "train"
  config.solver.optimizer = ml_collections.ConfigDict()
  config.solver.optimizer.name = "adamw"
  config.solver.optimizer.lr = 3e-3
  config.solver.optimizer.warmup_steps = config.train.get_ref("num_steps") // 10
  config.solver.optimizer.decay_steps = config.train.get_ref("num_steps")
  config.solver.optimizer.final_lr_fraction = 0.1
  config.solver.optimizer.b1 = 0.9
  config.solver.optimizer.b2 = 0.95
  config.solver.optimizer.weight_decay = 0.1
  config.solver.optimizer.clip_norm = 1.0

  # Evaluation: fixed validation windows, step timing.
  config.eval = ml_collections.ConfigDict()
  config.eval.num_batches = 8
  config.eval.timing_steps = 5

  _VARIANT_FNS[ffns[0] if ffns else "top2"](config)
  if "smoke" in variants:
    _smoke(config)
  return config


def _dense(config):
  config.model.ffn = "dense"


def _top2(config):
  # Switch's balance loss and ST-MoE's z-loss.
  config.model.ffn = "top2"
  config.loss.load_balancing = 1e-2
  config.loss.z_loss = 1e-3


def _top_p(config):
  # Balance loss and the dynamic (entropy) loss of Huang et al. (both
  # coefficients unverified against the paper, moe_routing.md §1.2).
  config.model.ffn = "top_p"
  config.loss.load_balancing = 1e-2
  config.loss.entropy = 1e-4


def _expert_choice(config):
  # Balanced by construction: no balance loss; ST-MoE's z-loss only.
  config.model.ffn = "expert_choice"
  config.loss.z_loss = 1e-3


def _coe(config):
  # CoE's sequence-level balance loss per gate, α = 1e-3, no z-loss.
  config.model.ffn = "coe"
  config.model.lbl_scope = "sequence"
  config.loss.load_balancing = 1e-3


def _dynmole_lora(config):
  # DynMoLE: 1e-2 · Tsallis entropy + 1e-3 · balance (masked probabilities).
  config.model.ffn = "dynmole_lora"
  config.loss.load_balancing = 1e-3
  config.loss.entropy = 1e-2


def _smoke(config):
  config.data.max_bytes = 300_000
  config.data.batch_size = 4
  config.data.seq_len = 32
  config.data.token_budget = 6 * 4 * 32  # 6 steps
  config.model.dim = 32
  config.model.num_layers = 1
  config.model.num_heads = 2
  config.model.num_experts = 4
  config.model.expert_hidden = 32
  config.model.top_p_k_max = 0
  config.model.expert_choice_k_max = 0
  config.model.lora_rank = 4
  config.model.lora_alpha = 8.0
  config.train.log_every = 3
  config.train.checkpoint_every = 3
  config.eval.num_batches = 2
  config.eval.timing_steps = 1


_VARIANT_FNS = {"dense": _dense, "top2": _top2, "top_p": _top_p,
                "expert_choice": _expert_choice, "coe": _coe,
                "dynmole_lora": _dynmole_lora}
