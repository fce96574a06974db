r"""BiP against IMP, OMP and the first-order ablation on CIFAR-10 (ResNet-20).

Runs every pipeline of the comparison (skipping finished ones: each run
resumes from its checkpoints), all from one shared pretrained model, then
times one plain training step and one BiP step of the same pipelines in this
process and prints a markdown table. Compute is counted in training steps:
``train steps + (BiP step / train step) × BiP steps``, without the shared
pretraining (its cost is printed apart).

  python -m experiments.benchmarks.pruning_table --root=/tmp/pruning \
      [--smoke]

Settings: 90 % and 95 % unstructured (global budget; one IMP run reaches
both) and 50 % filters per layer (structured). Schedules and optimisers:
``experiments/configs/pruning_common.py``.
"""

import json
import pathlib
import time

import jax
from absl import app, flags, logging

import bilevel
from experiments import cli, train
from experiments.benchmarks import timing
from experiments.configs import (
  bip_cifar10,
  bip_first_order_cifar10,
  imp_cifar10,
  omp_cifar10,
)
from experiments.tasks import pruning
from models import mask_builders

_ROOT = flags.DEFINE_string("root", None, "Directory of all the runs.")
_SMOKE = flags.DEFINE_bool("smoke", False, "The tiny smoke schedule.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Step-timing repeats.")

# (run name, config module, variant, sparsity override)
_RUNS = (
    ("imp", imp_cifar10, "", None),
    ("imp_structured", imp_cifar10, "structured", None),
    ("omp_90", omp_cifar10, "", 0.9),
    ("omp_95", omp_cifar10, "", 0.95),
    ("omp_structured", omp_cifar10, "structured", None),
    ("bip_90", bip_cifar10, "", 0.9),
    ("bip_95", bip_cifar10, "", 0.95),
    ("bip_structured", bip_cifar10, "structured", None),
    ("first_order_90", bip_first_order_cifar10, "", 0.9),
    ("first_order_95", bip_first_order_cifar10, "", 0.95),
    ("first_order_structured", bip_first_order_cifar10, "structured", None),
)

# (setting, IMP run and its evaluated round, suffix of the other runs)
_SETTINGS = (
    ("90 % unstructured", "imp", 0.9, "90"),
    ("95 % unstructured", "imp", 0.95, "95"),
    ("50 % filters (structured)", "imp_structured", 0.5, "structured"),
)


def _config(module, variant, sparsity, root: pathlib.Path, smoke: bool):
  config = module.get_config(",".join(v for v in (variant, "smoke" * smoke)
                                      if v))
  config.unlock()
  if sparsity is not None:
    config.sparsity = sparsity
  config.pretrain.workdir = str(root / "pretrain")
  config.lock()
  return config


def _imp_round(run_dir: pathlib.Path, config, target: float):
  """(name, step count through it) of the IMP round that reached target."""
  schedule = mask_builders.imp_schedule(tuple(config.imp.targets),
                                        config.imp.rate)
  for j, (kept, is_target) in enumerate(schedule, start=1):
    if is_target and abs(1 - kept - target) < 1e-9:
      return f"round_{j:02d}", j * config.imp.round_steps
  raise ValueError(f"{run_dir}: no IMP round reaches sparsity {target}")


def _step_costs(config, repeats: int) -> tuple[float, float]:
  """Median seconds of one BiP step and one plain training step."""
  pipe = pruning.pipeline_from_config(config, jax.random.key(0))
  stages = {s.name: s for s in pipe.stages}
  calls = []
  for name in ("prune", "finetune"):
    stage = stages[name]
    params = pipe.params_like
    step = bilevel.make_step(stage.solver, stage.problem)
    calls.append((step, (params, stage.solver.init(params),
                         stage.batches(0))))
  bip_s, train_s = timing.median_times(calls, repeats)
  return bip_s, train_s


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  cli.quiet_library_info_logs()
  root = pathlib.Path(_ROOT.value)
  start = time.perf_counter()
  results, configs = {}, {}
  for name, module, variant, sparsity in _RUNS:
    config = _config(module, variant, sparsity, root, _SMOKE.value)
    configs[name] = config
    run_start = time.perf_counter()
    train.train_and_evaluate(config, root / name)
    results[name] = json.loads((root / name / "stages.json").read_text())
    print(f"[{time.perf_counter() - start:7.0f} s] {name} done in"
          f" {time.perf_counter() - run_start:.0f} s", flush=True)
  wall = time.perf_counter() - start
  bip_s, train_s = _step_costs(configs["bip_90"], _REPEATS.value)
  ratio = bip_s / train_s
  pretrain = configs["bip_90"].pretrain.num_steps
  dense = results["bip_90"]["pretrain"]["test_accuracy"]

  rows = []
  for setting, imp_run, target, suffix in _SETTINGS:
    round_name, imp_steps = _imp_round(root / imp_run, configs[imp_run],
                                       target)
    entries = [("IMP (rewinding, 20 %/round)",
                results[imp_run][round_name], imp_steps, 0)]
    for label, prefix in (("OMP", "omp"), ("BiP", "bip"),
                          ("BiP, no correction", "first_order")):
      cfg = configs[f"{prefix}_{suffix}"]
      stage = results[f"{prefix}_{suffix}"]["finetune"]
      if prefix == "omp":
        entries.append((label, stage, cfg.finetune.num_steps, 0))
      else:
        entries.append((label, stage, cfg.finetune.num_steps,
                        cfg.prune.num_steps))
    imp_compute = imp_steps
    for label, stage, train_steps, bip_steps in entries:
      compute = train_steps + ratio * bip_steps
      rows.append(
          f"| {setting} | {label} | {stage['test_accuracy']:.4f} |"
          f" {stage['sparsity']:.4f} | {train_steps} + {bip_steps} |"
          f" {compute:.0f} | {compute / imp_compute:.2f} |")
  print(f"\ndevice: {jax.devices()[0].device_kind}; all runs: {wall:.0f} s"
        f" wall (with compilation and evaluation)")
  print(f"dense pretrained model: {pretrain} steps, test accuracy"
        f" {dense:.4f}")
  print(f"step cost: BiP {bip_s * 1e3:.0f} ms, train {train_s * 1e3:.0f} ms,"
        f" ratio {ratio:.2f}x (median of {_REPEATS.value})\n")
  table = "\n".join([
      "| setting | method | test acc. | sparsity | train + BiP steps |"
      " compute (train steps) | vs IMP |",
      "|---|---|---|---|---|---|---|", *rows])
  print(table)
  (root / "table.md").write_text(table + "\n")


if __name__ == "__main__":
  flags.mark_flags_as_required(["root"])
  app.run(main)
