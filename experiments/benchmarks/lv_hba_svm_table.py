r"""LV-HBA vs implicit differentiation vs grid search on the SVM problems.

(b) hyper-parameter optimisation (clean labels) and (c) data hyper-cleaning
(40 % of training labels sign-flipped), on breast cancer and CIFAR-10 (JPEG)
airplane vs automobile; every method from the configs in
experiments/configs/lv_hba_svm.py. Prints a markdown table; wall time is
given with compilation (lower + compile + run) and without (the compiled
run alone). With ``--seeds=N`` every cell is the mean ± std over N seeds
(each seed draws its own splits, label flips and initial c); wall times are
means.

  python -m experiments.benchmarks.lv_hba_svm_table \
      --data_dir=../shared/data/cifar10 --seeds=5
"""

import time

import jax
import numpy as np
from absl import app, flags

import bilevel
from experiments.configs import lv_hba_svm
from experiments.tasks import svm, svm_solvers

_DATA_DIR = flags.DEFINE_string("data_dir", "", "CIFAR-10 directory; empty"
                                " skips CIFAR-10.")
_SEEDS = flags.DEFINE_integer("seeds", 1, "Number of seeds (0, 1, ...).")
_GRID = np.linspace(-12.0, 4.0, 17)


def run_bilevel(config, data):
  """Trains the config's solver on ``data``: ``(metrics, compile_s, run_s)``."""
  _, init_key = jax.random.split(jax.random.key(config.seed))
  scale = config.problem.constraint_scale or len(data.train_y) ** -0.5
  task = svm.build_task(init_key, data, form=config.problem.form,
                        c_range=tuple(config.problem.c_range),
                        constraint_scale=scale)
  tx = svm.solver_from_config(config.solver)
  step = bilevel.make_step(tx, task.problem, jit=False)
  batches = task.batches(0)

  def loop(params, state):
    body = lambda carry, _: (step(*carry, batches)[:2], None)
    return jax.lax.scan(body, (params, state),
                        length=config.train.num_steps)[0][0]

  start = time.perf_counter()
  args = (task.init_params, tx.init(task.init_params))
  compiled = jax.jit(loop).lower(*args).compile()
  compiled_at = time.perf_counter()
  params = jax.block_until_ready(compiled(*args))
  done = time.perf_counter()
  return task.evaluate(params), done - start, done - compiled_at


def run_grid(data):
  start = time.perf_counter()
  metrics = svm_solvers.grid_search(data, _GRID)
  return metrics, time.perf_counter() - start


def _cells(name, variants, data_dir, seed):
  """One seed's cells: ``{(setting, method): (metrics, wall times)}``."""
  cells = {}
  for setting, extra in (("(b) clean", ""), ("(c) 40 % flipped",
                                             ",cleaning")):
    config = lv_hba_svm.get_config(variants + extra)
    config.data.data_dir = data_dir
    config.seed = seed
    data = svm.data_from_config(config, jax.random.key(config.seed))
    grid, grid_s = run_grid(data)
    cells[setting, f"grid search ({len(_GRID)} shared c)"] = (
        grid, (grid_s, grid_s))
    for label, variant in (("implicit (relaxed, Newton)", ",implicit"),
                           ("LV-HBA", "")):
      config = lv_hba_svm.get_config(variants + extra + variant)
      config.data.data_dir = data_dir
      config.seed = seed
      metrics, total, run = run_bilevel(config, data)
      cells[setting, f"{label}, {config.train.num_steps} steps"] = (
          metrics, (total, run))
  return cells


def _summary(values):
  values = [v for v in values if v is not None]
  if not values:
    return "—"
  if len(values) == 1:
    return f"{values[0]:.3f}"
  return f"{np.mean(values):.3f} ± {np.std(values):.3f}"


def rows_for(name, variants, data_dir, seeds):
  """The table rows of one dataset: both settings, all methods, all seeds."""
  per_seed = [_cells(name, variants, data_dir, s) for s in range(seeds)]
  rows = []
  for key in per_seed[0]:
    runs = [cells[key] for cells in per_seed]
    metric = lambda k, runs=runs: _summary([m.get(k) for m, _ in runs])
    total = np.mean([w[0] for _, w in runs])
    run = np.mean([w[1] for _, w in runs])
    rows.append((name, *key, metric("val_accuracy"), metric("test_accuracy"),
                 metric("auroc"), f"{total:.1f} s / {run:.1f} s"))
  return rows


def main(argv):
  del argv
  jax.config.update("jax_platforms", "cpu")
  seeds = _SEEDS.value
  rows = rows_for("breast cancer (300 / 120 / 149)", "", "", seeds)
  if _DATA_DIR.value:
    rows += rows_for("CIFAR-10 (JPEG) airplane/automobile, 8x8x3 (2000 /"
                     " 500 / 2000)", "cifar10", _DATA_DIR.value, seeds)
  print(f"seeds: {seeds}")
  print("| dataset | setting | method | val acc | test acc | AUROC of c |"
        " wall time (with / without compile) |")
  print("|---|---|---|---|---|---|---|")
  for row in rows:
    print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
  app.run(main)
