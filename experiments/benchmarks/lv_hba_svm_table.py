r"""LV-HBA vs implicit differentiation vs grid search on the SVM problems.

(b) hyper-parameter optimisation (clean labels) and (c) data hyper-cleaning
(40 % of training labels sign-flipped), on breast cancer and CIFAR-10 (JPEG)
airplane vs automobile; every method from the configs in
experiments/configs/lv_hba_svm.py. Prints a markdown table; wall time is
given with compilation (lower + compile + run) and without (the compiled
run alone).

  python -m experiments.benchmarks.lv_hba_svm_table \
      --data_dir=../shared/data/cifar10
"""

import time

import jax
import numpy as np
from absl import app, flags

import bilevel
from experiments import svm
from experiments.configs import lv_hba_svm

_DATA_DIR = flags.DEFINE_string("data_dir", "", "CIFAR-10 directory; empty"
                                " skips CIFAR-10.")
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
  metrics = svm.grid_search(data, _GRID)
  return metrics, time.perf_counter() - start


def rows_for(name, variants, data_dir):
  """The table rows of one dataset, both settings, all methods."""
  rows = []
  for setting, extra in (("(b) clean", ""), ("(c) 40 % flipped",
                                             ",cleaning")):
    config = lv_hba_svm.get_config(variants + extra)
    config.data.data_dir = data_dir
    data = svm.data_from_config(config, jax.random.key(config.seed))
    grid, grid_s = run_grid(data)
    rows.append((name, setting, f"grid search, c = {grid['log_c']:g}",
                 grid, f"{grid_s:.1f} s (vmapped {len(_GRID)} solves)"))
    for label, variant in (("implicit (relaxed, Newton)", ",implicit"),
                           ("LV-HBA", "")):
      config = lv_hba_svm.get_config(variants + extra + variant)
      config.data.data_dir = data_dir
      metrics, total, run = run_bilevel(config, data)
      label += f", {config.train.num_steps} steps"
      rows.append((name, setting, label, metrics,
                   f"{total:.1f} s / {run:.1f} s"))
  return rows


def main(argv):
  del argv
  jax.config.update("jax_platforms", "cpu")
  rows = rows_for("breast cancer (300 / 120 / 149)", "", "")
  if _DATA_DIR.value:
    rows += rows_for("CIFAR-10 (JPEG) airplane/automobile, 8x8x3 (2000 /"
                     " 500 / 2000)", "cifar10", _DATA_DIR.value)
  print("| dataset | setting | method | val acc | test acc | AUROC of c |"
        " wall time (with / without compile) |")
  print("|---|---|---|---|---|---|---|")
  for name, setting, method, m, wall in rows:
    auroc = m.get("auroc")
    auroc = "—" if auroc is None else f"{auroc:.3f}"
    print(f"| {name} | {setting} | {method} | {m['val_accuracy']:.3f} |"
          f" {m['test_accuracy']:.3f} | {auroc} | {wall} |")


if __name__ == "__main__":
  app.run(main)
