r"""Step times of the DARTS CPU protocol, and its projected total.

Times the stages of ``experiments/configs/darts_cifar10.py`` at the
config's sizes: one search step of each search variant (``darts1``,
``darts2``, ``pc_darts``), one retraining step of the released DARTS_V2
cell, and the retrained network's evaluation (BatchNorm recalibration and
test batches). Generated images stand in for CIFAR-10 (same shapes, same
cost). Each function is compiled first (the compile time is reported);
then the median of ``repeats`` interleaved calls.

The projection: each searched method costs its search steps, one retrain
and one evaluation; the three random genotypes a retrain and an evaluation
each; GM-NAS is budgeted as 2.5 DARTS-1st searches and one retrain. Each
run compiles its own steps once: the compile times are added per run.

Run (one process, an otherwise idle machine for meaningful numbers):

  python -m experiments.benchmarks.darts_protocol [--repeats=5] \
      [--variants=darts1,darts2,pc_darts]
"""

import argparse
import time

import jax
import ml_collections

import bilevel
from experiments.benchmarks import timing
from experiments.configs import darts_cifar10
from experiments.tasks import nas_retrain, nas_search
from models import darts

RANDOM_GENOTYPES = 3
# GM-NAS's budget in DARTS-1st searches: the α-frozen half search and two
# sub-supernet searches (the split's scoring is not counted).
GM_NAS_SEARCHES = 2.5
TEST_IMAGES = 10_000


def _generated(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  config.data.update(name="synthetic_cifar10", data_dir="", max_train=0,
                     max_test=0)
  config.search.num_images = 0
  config.eval.update(calibration_images=256, calibration_batch_size=128)
  return config


def _compiled(stage, params):
  """``(compiled step, its arguments, compile seconds)`` of a stage."""
  step = bilevel.make_step(stage.solver, stage.problem)
  args = (params, stage.solver.init(params), stage.batches(0))
  start = time.perf_counter()
  compiled = step.lower(*args).compile()
  return compiled, args, time.perf_counter() - start


def _evaluation_seconds(evaluate, params, test_images: int) -> float:
  """Seconds of ``evaluate`` scaled to ``TEST_IMAGES`` test images (its
  first call compiles, the second is timed)."""
  evaluate(params)
  start = time.perf_counter()
  evaluate(params)
  return (time.perf_counter() - start) * TEST_IMAGES / test_images


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--variants", default="darts1,darts2,pc_darts")
  args = parser.parse_args()
  key = jax.random.key(0)
  steps, compiles, counts = [], {}, {}
  for variant in args.variants.split(","):
    config = _generated(darts_cifar10.get_config(variant))
    stage = nas_search.pipeline_from_config(config, key).stages[0]
    compiled, step_args, compiles[variant] = _compiled(stage,
                                                       stage.init({}))
    steps.append((compiled, step_args))
    counts[variant] = config.search.num_steps
    print(f"{variant}: search step compiled in {compiles[variant]:.0f} s",
          flush=True)
  config = _generated(darts_cifar10.get_config())
  data = nas_retrain.resized(nas_search.load_data(config.data),
                             config.retrain.image_size)
  retrain = nas_retrain.retrain_stage(config, darts.DARTS_V2, data, key)
  params = retrain.init({})
  compiled, step_args, compiles["retrain"] = _compiled(retrain, params)
  steps.append((compiled, step_args))
  print(f"retrain step compiled in {compiles['retrain']:.0f} s", flush=True)
  medians = dict(zip([*counts, "retrain"],
                     timing.median_times(steps, args.repeats)))
  evaluation = _evaluation_seconds(retrain.evaluate, params,
                                   data.test_y.shape[0])
  retrain_s = (config.retrain.num_steps * medians["retrain"] + evaluation
               + compiles["retrain"])
  print(f"retrain: {medians['retrain']:.3f} s/step x"
        f" {config.retrain.num_steps} + evaluation {evaluation:.0f} s"
        f" = {retrain_s / 60:.1f} min with compilation")
  total = 0.0
  for variant, count in counts.items():
    search_s = count * medians[variant] + compiles[variant]
    print(f"{variant}: {medians[variant]:.3f} s/step x {count}"
          f" = {search_s / 60:.1f} min with compilation")
    total += search_s + retrain_s
  if "darts1" in counts:
    total += GM_NAS_SEARCHES * (counts["darts1"] * medians["darts1"]
                                + compiles["darts1"]) + retrain_s
  total += RANDOM_GENOTYPES * retrain_s
  print(f"projected protocol ({', '.join(counts)}, GM-NAS as"
        f" {GM_NAS_SEARCHES} DARTS-1st searches, {RANDOM_GENOTYPES} random):"
        f" {total / 3600:.2f} h")


if __name__ == "__main__":
  main()
