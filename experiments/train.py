"""The generic training and evaluation loops of the experiment binary.

``train_and_evaluate(config, workdir)`` builds the task and solver named by
the config, resumes from the latest checkpoint in ``workdir`` if there is one,
runs the jitted bilevel step, logs metrics, checkpoints, and evaluates.
``evaluate(config, workdir)`` restores the latest checkpoint and evaluates.

A run resumed from a checkpoint continues exactly as the uninterrupted run:
the checkpoint holds params, solver state, step, RNG key and data position,
and the data stream is a pure function of the step. A run refuses a workdir
that another run holds or that holds a run of another config (see
``experiments.workdir``), and stops at a non-finite loss without saving it.
"""

import contextlib
import json
import math
import pathlib
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from experiments import checkpointing, config_checks, distributed, registry
from experiments import metrics as metrics_lib
from experiments import workdir as workdir_lib
from experiments.task import DeferredStage, Pipeline, Stage


class NonFiniteError(FloatingPointError):
  """A loss or a parameter became NaN or infinite during training."""


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


# Solver-state vectors logged entry by entry (ScaleBiO's source weights).
_LOGGED_VECTORS = frozenset({"weights"})


def _diagnostics(solver_state) -> dict[str, float]:
  """Floating fields of the solver state: scalars by their field's name,
  the vectors named in ``_LOGGED_VECTORS`` as ``<field>/<i>``."""
  out = {}
  # Model-shaped state (optimizer moments of nnx params) is not a metric:
  # its nnx.Variable leaves are skipped whole.
  leaves = jax.tree_util.tree_flatten_with_path(
      solver_state, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
  for path, leaf in leaves:
    last = path[-1] if path else None
    if isinstance(leaf, nnx.Variable) or not (
        isinstance(last, jax.tree_util.GetAttrKey)
        and jnp.issubdtype(jnp.result_type(leaf), jnp.floating)):
      continue
    if jnp.ndim(leaf) == 0:
      out[last.name] = leaf
    elif jnp.ndim(leaf) == 1 and last.name in _LOGGED_VECTORS:
      out.update({f"{last.name}/{i}": leaf[i] for i in range(leaf.size)})
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


def _train_loop(config, solver, problem, batches, num_steps, directory,
                init_params, train_key, params_like=None, log_params=None):
  """Runs (or resumes) one bi-level training loop; returns the final params.

  Checkpoints and metrics go to ``directory``. ``init_params()`` is called
  only when ``directory`` holds no checkpoint; ``params_like`` (default: its
  result) gives the structure to restore against. ``log_params(params)``
  adds metrics of the params at every log step.
  """
  ckpt = _checkpointer(config, directory)
  if params_like is None:
    params_like = init_params()
  abstract = jax.eval_shape(lambda: _train_state(
      params_like, solver.init(params_like), 0, train_key))
  place = distributed.placement(abstract, config_checks.mesh_shape(config))
  state = _restore(ckpt, place.abstract(abstract))
  if state is None:
    # A copy: the step donates its inputs, and the initial params may share
    # buffers with what other stages still need (e.g. rewound weights).
    params = jax.tree.map(jnp.copy, init_params())
    state = place.state(_train_state(params, solver.init(params), 0,
                                     train_key))
  params, solver_state = state["params"], state["solver_state"]
  key = jax.random.wrap_key_data(state["key"])
  start = int(state["step"])
  if start > num_steps:
    ckpt.close()
    raise ValueError(f"{ckpt.directory} holds step {start}, past this run's"
                     f" {num_steps} steps")
  if start == num_steps:
    ckpt.close()
    return place.host(params)
  step_fn = place.make_step(solver, problem)
  batches = place.batches(batches)
  with metrics_lib.MetricWriter(
      directory, total_steps=num_steps, start_step=start) as writer:
    for step in range(start, num_steps):
      params, solver_state, step_metrics = step_fn(
          params, solver_state, batches(step))
      done = step + 1
      log = done % config.train.log_every == 0 or done == num_steps
      save = done % config.train.checkpoint_every == 0 or done == num_steps
      if log:
        scalars = {**step_metrics, **_diagnostics(solver_state),
                   **(log_params(params) if log_params else {})}
        writer.write(done, scalars)
        writer.progress(done, scalars)
      if log or save:
        _stop_if_not_finite(step_metrics, params if save else None, done,
                            ckpt)
      if save:
        ckpt.save(done, place.state(
            _train_state(params, solver_state, done, key)))
  ckpt.wait()
  ckpt.close()
  return place.host(params)


def _stop_if_not_finite(step_metrics, params, step: int, ckpt) -> None:
  """Raises NonFiniteError on a non-finite loss or (if given) parameter."""
  bad = [name for name, value in metrics_lib.to_floats(
      {k: v for k, v in step_metrics.items() if "loss" in k}).items()
         if not math.isfinite(value)]
  if params is not None and not all(
      bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(params)
      if jnp.issubdtype(x.dtype, jnp.inexact)):
    bad.append("parameters")
  if bad:
    ckpt.close()
    raise NonFiniteError(
        f"non-finite {', '.join(bad)} at step {step}: training stopped; the"
        f" last finite checkpoint is step {ckpt.latest_step()} in"
        f" {ckpt.directory} (try a smaller learning rate in a new workdir)")


def _prepare_workdir(workdir: pathlib.Path) -> None:
  if workdir.exists() and not workdir.is_dir():
    raise NotADirectoryError(f"--workdir {workdir} exists and is not a"
                             " directory")
  try:
    workdir.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise OSError(e.errno, f"cannot create --workdir {workdir}:"
                  f" {e.strerror}") from e


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str | pathlib.Path, *,
                       allow_config_change: Sequence[str] = ()
                       ) -> dict[str, Any]:
  """Trains the configured bilevel task (or pipeline), then evaluates it.

  Args:
    config: the experiment config (see ``experiments/configs``); an
      optional ``config.mesh`` puts the run on a ``(data, fsdp)`` mesh
      (``experiments.config_checks``).
    workdir: checkpoints, metrics (TensorBoard, ``metrics.jsonl``),
      ``config.json`` and ``results.json`` go here; a run with an existing
      checkpoint resumes. A pipeline puts each stage in a subdirectory named
      after it.
    allow_config_change: dotted config keys that may differ from the config
      saved in ``workdir`` (only ``workdir.SAFE_TO_CHANGE`` ones).

  Returns:
    The final evaluation metrics.

  Raises:
    ValueError: an invalid config value, or a config that differs from the
      workdir's (``workdir.ConfigChangedError``).
    workdir.WorkdirLockedError: another run is training in ``workdir``.
    NonFiniteError: a loss or parameter became NaN or infinite.
  """
  config_checks.validate(config)
  workdir = pathlib.Path(workdir)
  _prepare_workdir(workdir)
  # One lock and one saved config per run, not per process.
  owner = jax.process_index() == 0
  with workdir_lib.lock(workdir) if owner else contextlib.nullcontext():
    changed = owner and workdir_lib.check_config(workdir, config,
                                                 allow_config_change)
    results = _train_and_evaluate(config, workdir)
    if changed:
      workdir_lib.save_config(workdir, config)
    return results


def _train_and_evaluate(config, workdir: pathlib.Path) -> dict[str, Any]:
  keys = _root_keys(config.seed)
  task = registry.build_task(config, keys["task"])
  if isinstance(task, Pipeline):
    return _run_pipeline(config, task, workdir, keys["train"])
  tx = registry.build_solver(config.solver)
  params = _train_loop(
      config, tx, task.problem, task.batches, config.train.num_steps,
      workdir, lambda: task.init_params, keys["train"])
  with metrics_lib.MetricWriter(workdir, total_steps=0) as writer:
    return _evaluate_and_report(
        task.evaluate, params, writer, config.train.num_steps,
        workdir / "results.json", "final")


def _stage_directory(stage: Stage, workdir: pathlib.Path) -> pathlib.Path:
  return pathlib.Path(stage.workdir) if stage.workdir else workdir / stage.name


def _built(stage: Stage | DeferredStage, finals) -> Stage:
  """``stage``, or the stage a :class:`DeferredStage` builds from
  ``finals``."""
  if not isinstance(stage, DeferredStage):
    return stage
  built = stage.build(finals)
  if built.name != stage.name:
    raise ValueError(f"deferred stage {stage.name!r} built a stage named"
                     f" {built.name!r}")
  return built


def _results(raw) -> dict[str, Any]:
  """Numbers as floats; other JSON values (e.g. an architecture) as given."""
  return {k: v if isinstance(v, (str, list, tuple, dict)) else float(v)
          for k, v in raw.items()}


def _numbers(results: dict[str, Any]) -> dict[str, float]:
  return {k: v for k, v in results.items() if isinstance(v, float)}


def _params_like(stage: Stage, pipeline: Pipeline):
  return pipeline.params_like if stage.params_like is None else (
      stage.params_like)


def _run_pipeline(config, pipeline: Pipeline, workdir: pathlib.Path,
                  train_key) -> dict[str, Any]:
  """Runs the stages in order; a finished stage is restored, not rerun.

  Writes ``stages.json`` (each evaluated stage's results) and
  ``stage_seconds.json`` (each stage's wall seconds, training and
  evaluation, summed over the processes that ran it: a resumed run adds
  its part). ``config.last_stage`` (optional) stops after that stage, so
  that each stage can be its own command (a rerun without it resumes).

  Raises:
    ValueError: ``config.last_stage`` names no stage.
  """
  names = [s.name for s in pipeline.stages]
  last = config.get("last_stage") or names[-1]
  if last not in names:
    raise ValueError(f"config key last_stage={last!r} is none of the"
                     f" pipeline's stages {names}")
  pipeline = pipeline._replace(stages=pipeline.stages[:names.index(last) + 1])
  finals, stage_results = {}, {}
  steps_by_kind: dict[str, int] = {}
  seconds = _read_json(workdir / "stage_seconds.json")
  for stage in pipeline.stages:
    stage = _built(stage, finals)
    directory = _stage_directory(stage, workdir)
    start = time.perf_counter()
    batches = (stage.batches if stage.batches_from is None
               else stage.batches_from(finals))
    finals[stage.name] = _train_loop(
        config, stage.solver, stage.problem, batches, stage.num_steps,
        directory, lambda stage=stage: stage.init(finals), train_key,
        params_like=_params_like(stage, pipeline),
        log_params=stage.log_params)
    logging.info("stage %s: %d steps done (%.1f s in this process)",
                 stage.name, stage.num_steps, time.perf_counter() - start)
    if stage.workdir is None:  # a shared stage is not this pipeline's cost
      steps_by_kind[stage.step_kind] = (
          steps_by_kind.get(stage.step_kind, 0) + stage.num_steps)
    if stage.evaluate is not None:
      stage_results[stage.name] = _results(
          stage.evaluate(finals[stage.name]))
      _print_results(f"stage {stage.name}", stage_results[stage.name])
    seconds[stage.name] = (seconds.get(stage.name, 0.0)
                           + time.perf_counter() - start)
    if distributed.is_primary():
      workdir_lib.write_json(workdir / "stage_seconds.json", seconds)
  results = {**stage_results.get(stage.name, {}),
             **{f"steps/{k}": v for k, v in steps_by_kind.items()}}
  if distributed.is_primary():
    workdir_lib.write_json(workdir / "stages.json", stage_results)
  with metrics_lib.MetricWriter(workdir, total_steps=0) as writer:
    return _evaluate_and_report(lambda _: results, None, writer,
                                stage.num_steps, workdir / "results.json",
                                "final")


def _read_json(path: pathlib.Path) -> dict[str, Any]:
  """The JSON object at ``path``, or ``{}`` if there is no file."""
  return json.loads(path.read_text()) if path.is_file() else {}


def _print_results(prefix: str, results: dict[str, Any]) -> None:
  logging.info("%s results: %s", prefix, results)
  print(f"{prefix} results:")
  for name, value in results.items():
    shown = f"{value:.4f}" if isinstance(value, float) else value
    print(f"  {name:>28s}: {shown}")


def _evaluate_and_report(evaluate_fn, params, writer, step, results_path,
                         prefix):
  results = _results(evaluate_fn(params))
  writer.write(step, _numbers(results), prefix=prefix)
  if distributed.is_primary():
    workdir_lib.write_json(results_path, results)
  _print_results(prefix, results)
  return results


def evaluate(config: ml_collections.ConfigDict,
             workdir: str | pathlib.Path) -> dict[str, Any]:
  """Restores the latest good checkpoint in ``workdir`` and evaluates it.

  For a pipeline, the latest checkpoint of its last stage. Prints the step
  it evaluated and records it in ``eval_results.json`` (as
  ``checkpoint_step``) and ``metrics.jsonl``; a workdir it cannot write to
  gets a warning, the results are printed all the same.

  Raises:
    FileNotFoundError: if ``workdir`` holds no readable checkpoint.
  """
  config_checks.validate(config)
  workdir = pathlib.Path(workdir)
  evaluate_fn, step, state = _restore_for_eval(config, workdir)
  results = _results(evaluate_fn(state["params"]))
  print(f"eval: checkpoint step {step} of {workdir}")
  _print_results("eval", results)
  try:
    with metrics_lib.MetricWriter(workdir, total_steps=step) as writer:
      writer.write(step, _numbers(results), prefix="eval")
    workdir_lib.write_json(workdir / "eval_results.json",
                           {"checkpoint_step": step, **results})
  except OSError as e:
    logging.warning("Could not write the results to %s: %s", workdir, e)
    print(f"eval: could not write the results to {workdir}: {e.strerror}")
  return results


def _chosen_stage(config, pipeline: Pipeline, workdir: pathlib.Path,
                  name: str | None) -> Stage:
  """The stage ``name`` (default: the last), built from the restored final
  params of the stages before it if it is a :class:`DeferredStage`."""
  names = [s.name for s in pipeline.stages]
  if name is not None and name not in names:
    raise ValueError(f"pipeline has no stage {name!r}; stages: {names}")
  index = names.index(name) if name else len(names) - 1
  if not isinstance(pipeline.stages[index], DeferredStage):
    return pipeline.stages[index]
  finals = {}
  for stage in pipeline.stages[:index]:
    stage = _built(stage, finals)
    finals[stage.name] = _restore_stage(config, pipeline, stage,
                                        workdir)[1]["params"]
  return _built(pipeline.stages[index], finals)


def _restore_stage(config, pipeline: Pipeline, stage: Stage,
                   workdir: pathlib.Path, step: int | None = None):
  return _restore_checkpoint(config, _params_like(stage, pipeline),
                             stage.solver, _stage_directory(stage, workdir),
                             step)


def _restore_for_eval(config, workdir: pathlib.Path, step: int | None = None,
                      stage: str | None = None):
  task = registry.build_task(config, task_key(config))
  if isinstance(task, Pipeline):
    chosen = _chosen_stage(config, task, workdir, stage)
    step, state = _restore_stage(config, task, chosen, workdir, step)
    return chosen.evaluate, step, state
  tx = registry.build_solver(config.solver)
  step, state = _restore_checkpoint(config, task.init_params, tx, workdir,
                                    step)
  return task.evaluate, step, state


def _restore_checkpoint(config, params_like, tx, workdir: pathlib.Path,
                        step: int | None):
  """``(step, state)`` of the checkpoint at ``step`` (None: the latest good
  one) in ``workdir``, as numpy arrays on every host."""
  keys = _root_keys(config.seed)
  abstract = jax.eval_shape(lambda: _train_state(
      params_like, tx.init(params_like), 0, keys["train"]))
  if not (workdir / "checkpoints").is_dir():
    raise FileNotFoundError(f"no checkpoints in {workdir}: train there"
                            " first (--mode=train)")
  place = distributed.placement(abstract, config_checks.mesh_shape(config))
  ckpt = checkpointing.Checkpointer(
      workdir / "checkpoints", max_to_keep=config.train.max_to_keep,
      create=False)
  step, state = ckpt.restore(place.abstract(abstract), step=step)
  ckpt.close()
  return step, place.host(state)


def load_params(workdir: str | pathlib.Path, config, step: int | None = None,
                stage: str | None = None):
  """The params of a checkpoint as numpy arrays (for comparisons and tools).

  Args:
    workdir: the run's directory.
    config: its config.
    step: the checkpoint step; None for the latest.
    stage: a pipeline's stage (default: its last); None for a task.
  """
  _, _, state = _restore_for_eval(config, pathlib.Path(workdir), step, stage)
  return jax.tree.map(np.asarray, state["params"])
