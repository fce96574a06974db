"""The generic training and evaluation loops of the experiment binary.

``train_and_evaluate(config, workdir)`` builds the task and solver named by
the config, resumes from the latest checkpoint in ``workdir`` if there is one,
runs the jitted bilevel step, logs metrics, checkpoints, and evaluates.
``evaluate(config, workdir)`` restores the latest checkpoint and evaluates.

A run resumed from a checkpoint continues exactly as the uninterrupted run:
the checkpoint holds params, solver state, step, RNG key and data position,
and the data stream is a pure function of the step.
"""

import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

import bilevel
from experiments import checkpointing, registry
from experiments import metrics as metrics_lib


def _root_keys(seed: int) -> dict[str, jax.Array]:
  root = jax.random.key(seed)
  task_key, train_key = jax.random.split(root)
  return {"task": task_key, "train": train_key}


def task_key(config: ml_collections.ConfigDict) -> jax.Array:
  """The PRNG key the loops build ``config``'s task with (data, init)."""
  return _root_keys(config.seed)["task"]


def _train_state(params, solver_state, step, key):
  return {
      "params": params,
      "solver_state": solver_state,
      "step": jnp.asarray(step, jnp.int32),
      "key": jax.random.key_data(key),
      # The data stream is indexed by the step, so its position is the step.
      "data_position": jnp.asarray(step, jnp.int32),
  }


def _diagnostics(solver_state) -> dict[str, float]:
  """Scalar floating leaves of the solver state, named by their field."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(solver_state)[0]:
    last = path[-1] if path else None
    if (isinstance(last, jax.tree_util.GetAttrKey) and jnp.ndim(leaf) == 0
        and jnp.issubdtype(jnp.result_type(leaf), jnp.floating)):
      out[last.name] = leaf
  return out


def _checkpointer(config, workdir: pathlib.Path) -> checkpointing.Checkpointer:
  return checkpointing.Checkpointer(
      workdir / "checkpoints", max_to_keep=config.train.max_to_keep)


def _restore(ckpt, abstract_state):
  if ckpt.latest_step() is None:
    return None
  step, state = ckpt.restore(abstract_state)
  logging.info("Resumed from checkpoint step %d in %s", step, ckpt.directory)
  return state


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str | pathlib.Path) -> dict[str, Any]:
  """Trains the configured bilevel task, then evaluates it.

  Args:
    config: the experiment config (see ``experiments/configs``).
    workdir: checkpoints, metrics (TensorBoard, ``metrics.jsonl``) and
      ``results.json`` go here; a run with an existing checkpoint resumes.

  Returns:
    The final evaluation metrics.
  """
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  keys = _root_keys(config.seed)
  task = registry.build_task(config, keys["task"])
  tx = registry.build_solver(config.solver)
  step_fn = bilevel.make_step(tx, task.problem, donate=True)

  state = _train_state(task.init_params, tx.init(task.init_params), 0,
                       keys["train"])
  ckpt = _checkpointer(config, workdir)
  state = _restore(ckpt, jax.eval_shape(lambda: state)) or state
  params, solver_state = state["params"], state["solver_state"]
  key = jax.random.wrap_key_data(state["key"])
  start = int(state["step"])

  num_steps = config.train.num_steps
  writer = metrics_lib.MetricWriter(
      workdir, total_steps=num_steps, start_step=start)
  for step in range(start, num_steps):
    params, solver_state, step_metrics = step_fn(
        params, solver_state, task.batches(step))
    done = step + 1
    if done % config.train.log_every == 0 or done == num_steps:
      scalars = {**step_metrics, **_diagnostics(solver_state)}
      writer.write(done, scalars)
      writer.progress(done, scalars)
    if done % config.train.checkpoint_every == 0 or done == num_steps:
      ckpt.save(done, _train_state(params, solver_state, done, key))
  ckpt.wait()
  ckpt.close()

  results = _evaluate_and_report(
      task, params, writer, num_steps, workdir / "results.json", "final")
  writer.close()
  return results


def _evaluate_and_report(task, params, writer, step, results_path, prefix):
  results = {k: float(v) for k, v in task.evaluate(params).items()}
  writer.write(step, results, prefix=prefix)
  results_path.write_text(json.dumps(results, indent=2) + "\n")
  logging.info("%s results: %s", prefix, results)
  print(f"{prefix} results:")
  for name, value in results.items():
    print(f"  {name:>28s}: {value:.4f}")
  return results


def evaluate(config: ml_collections.ConfigDict,
             workdir: str | pathlib.Path) -> dict[str, Any]:
  """Restores the latest checkpoint in ``workdir`` and evaluates it.

  Raises:
    FileNotFoundError: if ``workdir`` holds no readable checkpoint.
  """
  workdir = pathlib.Path(workdir)
  task, step, state = _restore_for_eval(config, workdir)
  writer = metrics_lib.MetricWriter(workdir, total_steps=step)
  results = _evaluate_and_report(
      task, state["params"], writer, step, workdir / "eval_results.json",
      "eval")
  writer.close()
  return results


def _restore_for_eval(config, workdir: pathlib.Path, step: int | None = None):
  keys = _root_keys(config.seed)
  task = registry.build_task(config, keys["task"])
  tx = registry.build_solver(config.solver)
  abstract = jax.eval_shape(lambda: _train_state(
      task.init_params, tx.init(task.init_params), 0, keys["train"]))
  ckpt = _checkpointer(config, workdir)
  step, state = ckpt.restore(abstract, step=step)
  ckpt.close()
  return task, step, state


def load_params(workdir: str | pathlib.Path, config, step: int | None = None):
  """The params of a checkpoint as numpy arrays (for comparisons and tools)."""
  _, _, state = _restore_for_eval(config, pathlib.Path(workdir), step)
  return jax.tree.map(np.asarray, state["params"])
