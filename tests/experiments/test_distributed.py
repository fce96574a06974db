"""The binary under jax.distributed: 2 processes × 4 CPU devices on localhost.

Short launches of the hyper-cleaning smoke job, as many at once as their
order allows (the single-threaded parts then use both CI cores):

1. one process × 8 devices and two processes × 4 devices train the same run
   on the same global mesh; their final params agree to float tolerance and
   only process 0 writes metrics and results;
2. a checkpoint written by one process is resumed by two, which finish with
   the same params;
3. this plain (not distributed) pytest process, on one device, restores the
   checkpoints the two processes wrote.
"""

import json
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys
import time

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from experiments import checkpointing, config_checks, distributed, train
from experiments.configs import hyper_cleaning

ROOT = pathlib.Path(__file__).resolve().parents[2]
CONFIG = "experiments/configs/hyper_cleaning.py"
# The smoke job, shortened: on CPU every collective of the sharded solver
# (several per CG iteration) costs far more than the arithmetic.
STEPS = 4
OVERRIDES = (
    f"--config.train.num_steps={STEPS}", "--config.train.checkpoint_every=2",
    "--config.train.log_every=2", "--config.solver.inner_steps=3",
    "--config.solver.linear_solve.maxiter=10", "--config.eval.baselines=False")
TIMEOUT_S = 300


def _config():
  config = hyper_cleaning.get_config("smoke")
  config.train.num_steps = STEPS
  config.train.checkpoint_every = 2
  config.train.log_every = 2
  config.solver.inner_steps = 3
  config.solver.linear_solve.maxiter = 10
  config.eval.baselines = False
  return config


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _env(devices: int, cache_dir) -> dict[str, str]:
  xla_flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                     os.environ.get("XLA_FLAGS", ""))
  return {
      **os.environ,
      # Unoptimized XLA:CPU code: a third less CPU for these tiny programs,
      # the same in every launch compared.
      "XLA_FLAGS": f"{xla_flags} "
                   f"--xla_force_host_platform_device_count={devices} "
                   "--xla_backend_optimization_level=0 "
                   "--xla_llvm_disable_expensive_passes=true",
      "JAX_PLATFORMS": "cpu",
      "PYTHONUNBUFFERED": "1",
      # Later launches reuse the earlier ones' compiled data and model init.
      "JAX_COMPILATION_CACHE_DIR": str(cache_dir),
      "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
      "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
  }


def _launch(workdir, num_processes, tmp_path, *, via_env=False):
  """Starts the processes of one run; returns ``[(process, log_path)]``.

  The coordinator, process count and id go in flags, or with ``via_env`` in
  the ``JAX_*`` environment variables.
  """
  port = _free_port()
  env = _env(8 // num_processes, tmp_path / "jax_cache")
  runs = []
  for i in range(num_processes):
    log = tmp_path / f"{workdir.name}.process{i}.log"
    where = {"coordinator_address": f"localhost:{port}",
             "num_processes": str(num_processes), "process_id": str(i)}
    cmd = [sys.executable, "-m", "experiments.main",
           f"--config={CONFIG}:smoke", *OVERRIDES, f"--workdir={workdir}"]
    if via_env:
      env = {**env, **{f"JAX_{k.upper()}": v for k, v in where.items()}}
    else:
      cmd += [f"--{k}={v}" for k, v in where.items()]
    with open(log, "w") as f:
      runs.append((subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f,
                                    stderr=subprocess.STDOUT), log))
  return runs


def _wait(*launches) -> None:
  """Waits for every process; once one fails or time is up, kills the rest
  and raises with each process's exit code and log tail."""
  runs = [run for launch in launches for run in launch]
  deadline = time.monotonic() + TIMEOUT_S
  # A process whose peer died would block in a collective until jax's
  # heartbeat timeout: stop at the first failure instead.
  while (time.monotonic() < deadline
         and any(p.poll() is None for p, _ in runs)
         and not any(p.poll() for p, _ in runs)):
    time.sleep(0.2)
  for process, _ in runs:
    if process.poll() is None:
      process.kill()
      process.wait()
  if all(process.returncode == 0 for process, _ in runs):
    return
  report = [f"--- {log.name}: exit code {process.returncode} ---\n"
            f"{log.read_text()[-4000:]}" for process, log in runs]
  raise AssertionError(
      f"a distributed run failed or timed out ({TIMEOUT_S} s):\n"
      + "\n".join(report))


def _resume_dir(source, target):
  """``target`` holds ``source``'s checkpoints up to step 2."""
  shutil.copytree(source / "checkpoints", target / "checkpoints")
  shutil.rmtree(target / "checkpoints" / str(STEPS))
  return target


def _assert_params_close(got, expected, what):
  chex.assert_trees_all_close(got, expected, rtol=1e-5, atol=1e-6,
                              custom_message=what)


def test_two_processes_match_one_and_checkpoints_cross_over(tmp_path):
  one, two = tmp_path / "one", tmp_path / "two"
  one_to_two = tmp_path / "one_to_two"
  two_run = _launch(two, 2, tmp_path)
  _wait(_launch(one, 1, tmp_path))
  resumed = _launch(_resume_dir(one, one_to_two), 2, tmp_path, via_env=True)
  config = _config()
  expected = train.load_params(one, config)
  _wait(two_run)
  # Written by 2 processes, restored by 1 on one device.
  _assert_params_close(train.load_params(two, config), expected, "2 vs 1")
  _wait(resumed)
  assert "Resumed from checkpoint step 2" in resumed[0][1].read_text()
  _assert_params_close(train.load_params(one_to_two, config), expected,
                       "1 then 2 vs 1")

  # Only process 0 writes: one record per (step, prefix), as in one process.
  records = [json.loads(line) for line in
             (two / "metrics.jsonl").read_text().splitlines()]
  keys = [(r["step"], r["prefix"]) for r in records]
  assert keys == [(2, "train"), (4, "train"), (STEPS, "final")]
  results = {d: json.loads((d / "results.json").read_text())
             for d in (one, two, one_to_two)}
  for got in results.values():
    assert got.keys() == results[one].keys()
    np.testing.assert_allclose(list(got.values()),
                               list(results[one].values()), rtol=1e-4)


def test_single_process_without_flags_variables_or_launcher(monkeypatch):
  for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES",
               "JAX_PROCESS_ID", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE",
               "TPU_WORKER_HOSTNAMES"):
    monkeypatch.delenv(name, raising=False)
  assert distributed.distributed_args() is None
  monkeypatch.setenv("SLURM_NTASKS", "1")
  assert distributed.distributed_args() is None
  monkeypatch.setenv("SLURM_NTASKS", "4")  # jax detects the rest
  assert distributed.distributed_args() == {}


def test_flags_take_precedence_over_variables(monkeypatch):
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "head:1234")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
  monkeypatch.setenv("JAX_PROCESS_ID", "3")
  assert distributed.distributed_args(process_id=1) == {
      "coordinator_address": "head:1234", "num_processes": 4,
      "process_id": 1}
  monkeypatch.setenv("JAX_NUM_PROCESSES", "four")
  with pytest.raises(ValueError, match="JAX_NUM_PROCESSES='four'"):
    distributed.distributed_args()


@pytest.mark.parametrize("shape,spec", [
    ((), P()),
    ((10,), P()),
    ((200,), P("data")),
    ((64, 10), P("data", None)),
    ((16, 64), P(None, "data")),
    ((8, 8, 3), P("data", None, None)),
])
def test_state_spec_shards_the_largest_divisible_dim(shape, spec):
  assert distributed.state_spec(shape, 8) == spec
  assert distributed.state_spec(shape, 1) == P()


def test_batch_spec_splits_examples_when_divisible():
  assert distributed.batch_spec((200, 64), 8) == P("data")
  assert distributed.batch_spec((100, 64), 8) == P()
  assert distributed.batch_spec((), 8) == P()


def test_solver_state_shards_like_the_params():
  mesh = jax.make_mesh((8,), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))
  params = {"w": jnp.zeros((64, 10)), "u": jnp.zeros(200),
            "b": jnp.zeros(10)}
  abstract = jax.eval_shape(lambda: {
      "params": params, "solver_state": optax.adam(0.1).init(params)})
  place = distributed.Placement(abstract, mesh)
  state = place.state({"params": params,
                       "solver_state": optax.adam(0.1).init(params)})
  mu = state["solver_state"][0].mu
  for name in params:
    assert mu[name].sharding == state["params"][name].sharding
  assert state["params"]["u"].sharding.spec == P("data")
  restore_target = place.abstract(abstract)
  assert restore_target["params"]["w"].sharding.spec == P("data", None)


def _named_and_plain_state():
  named = nnx.state(nnx.Linear(
      16, 24, rngs=nnx.Rngs(0),
      kernel_metadata={"out_sharding": ("embed", "mlp"),
                       "eager_sharding": False}))
  params = {"named": named, "plain": {"w": jnp.ones((8, 64))}}
  solver_state = optax.adam(0.1).init(params)
  return {"params": params, "solver_state": solver_state,
          "step": jnp.asarray(0, jnp.int32)}


def test_data_fsdp_mesh_places_by_names_then_largest_dim(tmp_path):
  state = _named_and_plain_state()
  abstract = jax.eval_shape(lambda: state)
  place = distributed.placement(abstract, (2, -1))
  assert dict(place.mesh.shape) == {"data": 2, "fsdp": 4}
  placed = place.state(state)
  params, mu = placed["params"], placed["solver_state"][0].mu
  assert params["named"]["kernel"].sharding.spec == P("fsdp", None)
  assert params["named"]["bias"].sharding.spec == P("fsdp")  # unnamed: [24]
  assert params["plain"]["w"].sharding.spec == P(None, "fsdp")
  assert mu["named"]["kernel"].sharding == params["named"]["kernel"].sharding
  assert placed["step"].sharding.spec == P()
  batch = place.batches(lambda step: {"x": np.ones((16, 3)),
                                      "odd": np.ones((5,))})(0)
  assert batch["x"].sharding.spec == P(("data", "fsdp"))
  assert batch["odd"].sharding.spec == P()

  with checkpointing.Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, placed)
    ckpt.wait()
    _, restored = ckpt.restore(place.abstract(abstract))
  chex.assert_trees_all_equal(restored, state)
  assert jax.tree.leaves(jax.tree.map(lambda x: x.sharding, restored)) == (
      jax.tree.leaves(jax.tree.map(lambda x: x.sharding, placed)))
  assert distributed.placement(abstract).mesh is None  # as before


@pytest.mark.parametrize("mesh,error", [
    ({"data": 2, "fsdp": 4}, None),
    ({"fsdp": 8}, None),
    ({"data": 2, "model": 4}, "unknown config.mesh keys \\['model'\\]"),
    ({"data": 2, "fsdp": 4.0}, "mesh.fsdp must be a positive int or -1"),
    ({"data": -1, "fsdp": -1}, "cannot both be -1"),
])
def test_config_mesh_is_checked(mesh, error):
  config = ml_collections.ConfigDict({"mesh": mesh})
  if error:
    with pytest.raises(ValueError, match=error):
      config_checks.validate(config)
  else:
    sizes = {"data": 1, "fsdp": -1, **mesh}
    assert config_checks.mesh_shape(config) == (sizes["data"],
                                                sizes["fsdp"])
  assert config_checks.mesh_shape(ml_collections.ConfigDict()) is None
