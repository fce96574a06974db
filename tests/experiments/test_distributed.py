"""The binary under jax.distributed: 2 processes × 4 CPU devices on localhost.

One test, run as a few short launches of the hyper-cleaning smoke job:

1. one process × 8 devices and two processes × 4 devices train the same run
   on the same global mesh; their final params agree to float tolerance and
   only process 0 writes metrics and results;
2. each run's step-2 checkpoint is resumed by the other process count (2 → 1
   and 1 → 2) and finishes with the same params;
3. this plain (not distributed) pytest process restores all of them.
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

import jax
import numpy as np

from experiments import train
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
      "XLA_FLAGS": f"{xla_flags} "
                   f"--xla_force_host_platform_device_count={devices}",
      "JAX_PLATFORMS": "cpu",
      "PYTHONUNBUFFERED": "1",
      # Later launches reuse the earlier ones' compiled data and model init.
      "JAX_COMPILATION_CACHE_DIR": str(cache_dir),
      "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
      "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
  }


def _launch(workdir, num_processes, tmp_path):
  """Starts the processes of one run; returns ``[(process, log_path)]``."""
  port = _free_port()
  env = _env(8 // num_processes, tmp_path / "jax_cache")
  runs = []
  for i in range(num_processes):
    log = tmp_path / f"{workdir.name}.process{i}.log"
    cmd = [sys.executable, "-m", "experiments.main",
           f"--config={CONFIG}:smoke", *OVERRIDES, f"--workdir={workdir}",
           f"--coordinator_address=localhost:{port}",
           f"--num_processes={num_processes}", f"--process_id={i}"]
    with open(log, "w") as f:
      runs.append((subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f,
                                    stderr=subprocess.STDOUT), log))
  return runs


def _wait(*launches) -> None:
  """Waits for every process; on a failure or timeout, kills the rest and
  raises with each process's exit code and log tail."""
  runs = [run for launch in launches for run in launch]
  deadline = time.monotonic() + TIMEOUT_S
  try:
    for process, _ in runs:
      process.wait(timeout=max(deadline - time.monotonic(), 0.1))
      if process.returncode != 0:
        break
  except subprocess.TimeoutExpired:
    pass
  finally:
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


def _log(launch) -> str:
  return launch[0][1].read_text()


def test_two_processes_match_one_and_checkpoints_cross_over(tmp_path):
  one, two = tmp_path / "one", tmp_path / "two"
  # One after the other, so the second finds the compilation cache filled.
  _wait(_launch(one, 1, tmp_path))
  _wait(_launch(two, 2, tmp_path))
  two_to_one = _resume_dir(two, tmp_path / "two_to_one")
  one_to_two = _resume_dir(one, tmp_path / "one_to_two")
  resumed = (_launch(two_to_one, 1, tmp_path),
             _launch(one_to_two, 2, tmp_path))
  _wait(*resumed)
  for launch in resumed:
    assert "Resumed from checkpoint step 2" in _log(launch)

  # Only process 0 writes: one record per (step, prefix), as in one process.
  records = [json.loads(line) for line in
             (two / "metrics.jsonl").read_text().splitlines()]
  keys = [(r["step"], r["prefix"]) for r in records]
  assert keys == [(2, "train"), (4, "train"), (STEPS, "final")]
  results = {d: json.loads((d / "results.json").read_text())
             for d in (one, two, two_to_one, one_to_two)}
  for got in results.values():
    assert got.keys() == results[one].keys()
    np.testing.assert_allclose(list(got.values()),
                               list(results[one].values()), rtol=1e-4)

  config = _config()
  expected = train.load_params(one, config)
  for workdir in (two, two_to_one, one_to_two):
    got = train.load_params(workdir, config)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected),
                    strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6,
                                 err_msg=str(workdir))
