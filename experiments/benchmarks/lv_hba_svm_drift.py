r"""Why LV-HBA's SVM hyper-cleaning falls behind the implicit baseline.

For each seed, trains LV-HBA and the implicit (relaxed-SVM) baseline with
the binary's ``lv_hba_svm.py:cleaning`` configs, then reports the test
accuracy of (1) the method's own lower level ``y``, (2) the exact
lower-level solution ``y*(c)`` at its learned ``c`` (Newton on the relaxed
SVM), (3) ``y*`` at ``c`` with its uniform drift removed (``c − mean(c) +
mean(c₀)``), the drift ``mean(c) − mean(c₀)`` and the AUROC of ``c``.

  python -m experiments.benchmarks.lv_hba_svm_drift [--seeds=5]
"""

import contextlib
import io
import tempfile

import jax.numpy as jnp
from absl import app, flags

from experiments import train
from experiments.configs import lv_hba_svm
from experiments.tasks import svm, svm_problem, svm_solvers

_SEEDS = flags.DEFINE_integer("seeds", 5, "Number of seeds (0, 1, ...).")


def diagnose(variant: str, seed: int) -> dict[str, float]:
  """Trains one method on one seed and measures its learned ``c``."""
  config = lv_hba_svm.get_config(variant)
  config.seed = seed
  config.train.log_every = config.train.num_steps
  workdir = tempfile.mkdtemp()
  with contextlib.redirect_stdout(io.StringIO()):
    results = train.train_and_evaluate(config, workdir)
  params = train.load_params(workdir, config)
  task_key = train.task_key(config)
  task = svm.task_from_config(config, task_key)
  data = svm.data_from_config(config, task_key)
  batch = task.batches(0)["inner_batch"]
  c, c0 = jnp.asarray(params.upper), jnp.asarray(task.init_params.upper)
  start = {"w": jnp.asarray(params.lower["w"]),
           "b": jnp.asarray(params.lower["b"])}
  test = lambda lower: float(svm_problem.accuracy(
      lower, jnp.asarray(data.test_x), jnp.asarray(data.test_y)))
  solve = lambda upper: svm_solvers.solve_relaxed(upper, start, batch,
                                                  num_iters=50)
  return {
      "test(y)": results["test_accuracy"],
      "test(y*(c))": test(solve(c)),
      "test(y*(c - drift))": test(solve(c - c.mean() + c0.mean())),
      "drift": float(c.mean() - c0.mean()),
      "auroc": results["auroc"],
  }


def main(argv):
  del argv
  for seed in range(_SEEDS.value):
    for name, variant in (("LV-HBA", "cleaning"),
                          ("implicit", "cleaning,implicit")):
      cells = "  ".join(f"{k}={v:.3f}"
                        for k, v in diagnose(variant, seed).items())
      print(f"seed {seed} {name:>8s}: {cells}")


if __name__ == "__main__":
  app.run(main)
