r"""Dense FFN against five MoE routers on the byte-level stdlib LM.

Trains every variant of ``experiments/configs/moe_lm.py`` (``dense, top2,
top_p, expert_choice, coe, dynmole_lora``) for the same token budget, each
in ``<root>/<variant>`` (a rerun resumes from the checkpoints; a finished
variant is only re-evaluated), then prints a markdown table of validation
loss, throughput and load balance, and the experts-per-token histograms of
the dynamic-k variants (top_p, expert_choice, dynmole_lora),
and writes it to ``<root>/table.md``.

  python -m experiments.benchmarks.moe_lm_table --root=/tmp/moe_lm \
      [--smoke] [--variants=top2,top_p]

Default schedule: 200 steps of 16 × 128 bytes (409,600 tokens), width 128,
4 layers, 8 experts of hidden 256, k = 2. Measured on the 2-core development
CPU (median of 8 jitted training steps after compilation, dispatch
``ragged_dot``, which XLA:CPU emulates densely over the experts): 0.30 s
per step (dynmole_lora), 0.32 s (dense), 1.03 s (coe), 1.06 s (top2),
1.90 s (top_p and expert_choice, ``k_max = 4``). So a variant trains in
about 1 (dense, dynmole_lora), 3.5 (top2, coe) or 6.5 (top_p,
expert_choice) minutes, 3.6 minutes on average, plus 10–30 s of compilation
and evaluation: about 25 minutes for the six. ``--smoke`` runs the tiny
smoke model for 6 steps per variant (under a minute in all). CPU
throughput measures the emulated dispatch, not a grouped GEMM: compare
tokens/s across variants on an accelerator.
"""

import json
import pathlib
import time

import jax
from absl import app, flags, logging

from experiments import cli, train
from experiments.configs import moe_lm as moe_lm_config

_ROOT = flags.DEFINE_string("root", None, "Directory of all the runs.")
_SMOKE = flags.DEFINE_bool("smoke", False, "The tiny smoke schedule.")
_VARIANTS = flags.DEFINE_list("variants", list(moe_lm_config.FFN_VARIANTS),
                              "FFN variants to run, in table order.")

_COLUMNS = (
    ("val loss (nats/byte)", "val_loss", "{:.4f}"),
    ("bits/byte", "val_bits_per_byte", "{:.3f}"),
    ("train tok/s", "train_tokens_per_s", "{:,.0f}"),
    ("experts/token", "experts_per_token", "{:.2f}"),
    ("load max/mean", "load_max_over_mean", "{:.2f}"),
    ("load max/mean (worst layer)", "load_max_over_mean_worst", "{:.2f}"),
    ("load CV", "load_cv", "{:.3f}"),
    ("drop rate", "drop_rate", "{:.4f}"),
    ("active params", "active_params", "{:,.0f}"),
    ("total params", "total_params", "{:,.0f}"),
)


def _row(variant: str, results: dict[str, float]) -> str:
  cells = [fmt.format(results[key]) if key in results else "—"
           for _, key, fmt in _COLUMNS]
  return f"| {variant} | " + " | ".join(cells) + " |"


def _histogram(variant: str, results: dict[str, float]) -> str | None:
  bins = sorted((int(k.rsplit("_", 1)[1]), v) for k, v in results.items()
                if k.startswith("experts_per_token_"))
  if not bins:
    return None
  return f"{variant} experts per token: " + ", ".join(
      f"{n}: {v:.3f}" for n, v in bins)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  cli.quiet_library_info_logs()
  root = pathlib.Path(_ROOT.value)
  unknown = sorted(set(_VARIANTS.value) - set(moe_lm_config.FFN_VARIANTS))
  if unknown:
    raise app.UsageError(f"unknown --variants {unknown}; valid:"
                         f" {moe_lm_config.FFN_VARIANTS}")
  start = time.perf_counter()
  results, config = {}, None
  for variant in _VARIANTS.value:
    config = moe_lm_config.get_config(variant + ",smoke" * _SMOKE.value)
    run_start = time.perf_counter()
    results[variant] = train.train_and_evaluate(config, root / variant)
    print(f"[{time.perf_counter() - start:7.0f} s] {variant} done in"
          f" {time.perf_counter() - run_start:.0f} s", flush=True)
  tokens = config.data.token_budget
  lines = [
      f"device: {jax.devices()[0].device_kind}; {config.train.num_steps}"
      f" steps × {config.data.batch_size} × {config.data.seq_len} bytes"
      f" ({tokens:,} tokens) per variant; all runs"
      f" {time.perf_counter() - start:.0f} s wall (with compilation and"
      " evaluation)", "",
      "| variant | " + " | ".join(name for name, _, _ in _COLUMNS) + " |",
      "|---" * (len(_COLUMNS) + 1) + "|",
      *(_row(v, r) for v, r in results.items()), ""]
  lines += [h for v, r in results.items() if (h := _histogram(v, r))]
  table = "\n".join(lines)
  print("\n" + table)
  (root / "table.md").write_text(table + "\n")
  (root / "table.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
  flags.mark_flags_as_required(["root"])
  app.run(main)
