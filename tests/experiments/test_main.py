"""End-to-end tests of the experiment binary on the smoke config."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from experiments import train
from experiments.configs import hyper_cleaning

ROOT = pathlib.Path(__file__).resolve().parents[2]
CONFIG = "experiments/configs/hyper_cleaning.py"


def _binary(*args, workdir=None, check=True, wait=True):
  cmd = [sys.executable, "-m", "experiments.main", *args]
  if workdir is not None:
    cmd.append(f"--workdir={workdir}")
  env = {**os.environ, "PYTHONUNBUFFERED": "1"}
  if not wait:
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
  result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
  if check and result.returncode != 0:
    raise AssertionError(f"{cmd} failed:\n{result.stdout}\n{result.stderr}")
  return result


def test_train_then_eval_restores_the_same_accuracy(tmp_path):
  config = hyper_cleaning.get_config("smoke")
  results = train.train_and_evaluate(config, tmp_path)
  for name in ("test_accuracy", "auroc", "clean_test_accuracy",
               "noisy_test_accuracy"):
    assert name in results and np.isfinite(results[name])
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert any("outer_loss" in json.loads(line) for line in lines)

  evaluated = train.evaluate(config, tmp_path)
  assert evaluated["test_accuracy"] == results["test_accuracy"]
  assert evaluated["auroc"] == results["auroc"]


def test_config_typo_is_a_clear_error(tmp_path):
  result = _binary(f"--config={CONFIG}:smoke", "--config.solver.lr_tpyo=1",
                   workdir=tmp_path, check=False)
  assert result.returncode != 0
  assert "unknown config key 'solver.lr_tpyo'" in result.stderr
  assert "Traceback" not in result.stderr


def test_missing_data_directory_names_the_path(tmp_path):
  config = hyper_cleaning.get_config("smoke,cifar10")
  config.data.data_dir = str(tmp_path / "no_such_dir")
  with pytest.raises(FileNotFoundError, match="no_such_dir"):
    train.train_and_evaluate(config, tmp_path / "work")


def test_eval_without_checkpoint_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match=str(tmp_path)):
    train.evaluate(hyper_cleaning.get_config("smoke"), tmp_path)


def _wait_for_checkpoint(process, directory: pathlib.Path, timeout=300):
  start = time.time()
  while time.time() - start < timeout:
    if process.poll() is not None:
      raise AssertionError("training ended before it could be killed:\n"
                           + process.stdout.read())
    steps = [p for p in directory.glob("*") if p.name.isdigit()]
    if steps:
      return
    time.sleep(0.05)
  raise AssertionError("no checkpoint appeared")


def test_sigkill_then_rerun_resumes_bit_identically(tmp_path):
  args = (f"--config={CONFIG}:smoke", "--config.train.num_steps=400",
          "--config.train.checkpoint_every=20",
          "--config.solver.inner_steps=20")
  _binary(*args, workdir=tmp_path / "uninterrupted")

  killed = tmp_path / "killed"
  process = _binary(*args, workdir=killed, wait=False)
  _wait_for_checkpoint(process, killed / "checkpoints")
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert process.returncode == -signal.SIGKILL

  resumed = _binary(*args, workdir=killed)
  assert "Resumed from checkpoint step" in resumed.stderr + resumed.stdout

  config = hyper_cleaning.get_config("smoke")
  config.train.num_steps = 400
  config.solver.inner_steps = 20
  expected = train.load_params(tmp_path / "uninterrupted", config)
  got = train.load_params(killed, config)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected),
                  strict=True):
    np.testing.assert_array_equal(a, b)
  assert (json.loads((killed / "results.json").read_text())
          == json.loads((tmp_path / "uninterrupted/results.json").read_text()))

