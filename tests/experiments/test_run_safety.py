"""Runs that cannot be corrupted, and errors as one line (issue 12).

One smoke run is trained once per module; each test works on a copy of it.
"""

import errno
import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from experiments import checkpointing, cli, train
from experiments import metrics as metrics_lib
from experiments import workdir as workdir_lib
from experiments.configs import hyper_cleaning

ROOT = pathlib.Path(__file__).resolve().parents[2]
CONFIG = "experiments/configs/hyper_cleaning.py"
# Orbax leaves an asyncio callback behind when a read fails.
pytestmark = pytest.mark.filterwarnings(
    "ignore::pytest.PytestUnraisableExceptionWarning")


def _config(**overrides):
  config = hyper_cleaning.get_config("smoke")
  config.eval.baselines = False  # not what these tests are about
  for dotted, value in overrides.items():
    *path, key = dotted.split(".")
    node = config
    for part in path:
      node = node[part]
    node[key] = value
  return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """``(workdir, results)`` of a finished smoke run (checkpoints 5 and 10)."""
  workdir = tmp_path_factory.mktemp("trained") / "run"
  return workdir, train.train_and_evaluate(_config(), workdir)


@pytest.fixture
def run_copy(trained, tmp_path):
  shutil.copytree(trained[0], tmp_path / "run")
  return tmp_path / "run"


def _garble(step_dir):
  # Array chunks, not OCDBT index nodes (magic 0cdb20de, checksummed).
  data_file = max((p for p in step_dir.glob("default/ocdbt.process_*/d/*")
                   if p.read_bytes()[:4] != b"\x0c\xdb\x20\xde"),
                  key=lambda p: p.stat().st_size)
  data = bytearray(data_file.read_bytes())
  data[100] ^= 0xFF  # inside the compressed chunk of the lower weights
  data_file.write_bytes(bytes(data))


def test_garbled_checkpoint_falls_back_warns_and_gives_correct_results(
    trained, run_copy, caplog, capsys):
  _garble(run_copy / "checkpoints" / "10")
  with caplog.at_level(logging.WARNING):
    train.evaluate(_config(), run_copy)
  assert any("step 10" in r.getMessage() and "checksum" in r.getMessage()
             for r in caplog.records)
  assert "eval: checkpoint step 5 of" in capsys.readouterr().out
  recorded = json.loads((run_copy / "eval_results.json").read_text())
  assert recorded["checkpoint_step"] == 5
  # The rerun retrains from step 5 and writes the uninterrupted results.
  assert train.train_and_evaluate(_config(), run_copy) == trained[1]
  assert json.loads((run_copy / "results.json").read_text()) == trained[1]


def test_changed_config_is_refused_with_the_keys_named(run_copy):
  saved = (run_copy / "config.json").read_text()
  changed = _config(**{"data.noise_rate": 0.3, "train.num_steps": 5})
  with pytest.raises(workdir_lib.ConfigChangedError,
                     match=r"data.noise_rate: 0.4 -> 0.3, train.num_steps:"
                     r" 10 -> 5\); use a new --workdir"):
    train.train_and_evaluate(changed, run_copy)
  with pytest.raises(workdir_lib.ConfigChangedError,
                     match="pass --allow_config_change=train.num_steps"):
    train.train_and_evaluate(_config(**{"train.num_steps": 5}), run_copy)
  with pytest.raises(workdir_lib.ConfigChangedError,
                     match="data.noise_rate cannot change"):
    train.train_and_evaluate(changed, run_copy,
                             allow_config_change=["data.noise_rate"])
  # Allowed, but fewer steps than the checkpoint holds: still refused.
  with pytest.raises(ValueError, match="holds step 10, past this run's 5"):
    train.train_and_evaluate(_config(**{"train.num_steps": 5}), run_copy,
                             allow_config_change=["train.num_steps"])
  assert (run_copy / "config.json").read_text() == saved


def test_more_steps_continue_when_allowed(run_copy):
  more = _config(**{"train.num_steps": 11})
  train.train_and_evaluate(more, run_copy,
                           allow_config_change=["train.num_steps"])
  assert json.loads((run_copy / "config.json").read_text())[
      "train.num_steps"] == 11
  assert checkpointing.Checkpointer(run_copy / "checkpoints").latest_step() \
      == 11


def test_a_second_run_is_refused_and_a_dead_owner_taken_over(run_copy):
  owner = subprocess.Popen([sys.executable, "-c", "import time;"
                            " time.sleep(60)"])
  try:
    lock = run_copy / workdir_lib.LOCK_NAME
    lock.write_text(json.dumps({"pid": owner.pid, "host": os.uname()[1]}))
    with pytest.raises(workdir_lib.WorkdirLockedError,
                       match=f"in use by process {owner.pid}"):
      train.train_and_evaluate(_config(), run_copy)
  finally:
    owner.kill()
    owner.wait()
  lines = (run_copy / metrics_lib.JSONL_NAME).read_text()
  train.train_and_evaluate(_config(), run_copy)  # the owner is dead now
  assert not lock.exists()
  assert len((run_copy / metrics_lib.JSONL_NAME).read_text()) > len(lines)


def test_lock_is_exclusive_within_one_host(tmp_path):
  with workdir_lib.lock(tmp_path):
    with pytest.raises(workdir_lib.WorkdirLockedError, match=str(os.getpid())):
      with workdir_lib.lock(tmp_path):
        pass
  with workdir_lib.lock(tmp_path):
    pass


def test_nan_stops_training_and_keeps_the_last_finite_checkpoint(tmp_path):
  config = _config(**{"train.log_every": 1, "train.checkpoint_every": 1})
  config.solver.inner_optimizer.lr = 1e6
  with pytest.raises(train.NonFiniteError,
                     match=r"at step (\d+): training stopped; the last finite"
                     r" checkpoint is step") as error:
    train.train_and_evaluate(config, tmp_path)
  ckpt = checkpointing.Checkpointer(tmp_path / "checkpoints")
  assert ckpt.latest_step() == int(error.value.args[0].split("step ")[1]
                                   .split(":")[0]) - 1
  params = train.load_params(tmp_path, config)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))
  assert not (tmp_path / "results.json").exists()


def _deny_writes(monkeypatch, workdir):
  if os.geteuid() != 0:
    for path in [workdir, *workdir.rglob("*")]:
      path.chmod(path.stat().st_mode & ~0o222)
    return
  # root ignores permissions: make the writers fail as on a read-only mount.
  def read_only(*args, **kwargs):
    raise OSError(errno.EROFS, "Read-only file system")
  monkeypatch.setattr(metrics_lib, "MetricWriter", read_only)
  monkeypatch.setattr(workdir_lib, "write_json", read_only)


def test_eval_on_a_read_only_workdir_prints_the_results(
    trained, run_copy, monkeypatch, capsys):
  _deny_writes(monkeypatch, run_copy)
  try:
    results = train.evaluate(_config(), run_copy)
  finally:
    for path in [run_copy, *run_copy.rglob("*")]:
      path.chmod(path.stat().st_mode | 0o200)
  out = capsys.readouterr().out
  assert "eval: checkpoint step 10 of" in out
  assert f"could not write the results to {run_copy}" in out
  assert f"{results['test_accuracy']:.4f}" in out
  assert results["test_accuracy"] == trained[1]["test_accuracy"]


def test_shape_mismatch_is_one_line(run_copy):
  with pytest.raises(SystemExit) as exit_info:
    with cli.one_line_errors():
      train.evaluate(_config(**{"data.num_train": 150}), run_copy)
  assert str(exit_info.value.code).startswith(
      "error: checkpoint step 10 in ")
  assert "params.upper has shape (200,) there and (150,) in the config" in (
      str(exit_info.value.code))


def test_eval_of_a_missing_workdir_does_not_create_it(tmp_path):
  with pytest.raises(FileNotFoundError, match="no checkpoints in"):
    train.evaluate(_config(), tmp_path / "missing")
  assert not (tmp_path / "missing").exists()


@pytest.mark.parametrize("mode, overrides, message", [
    ("train", {"train.num_steps": 0}, "train.num_steps must be > 0, got 0"),
    ("train", {"solver.upper_optimizer.lr": 0.0},
     "solver.upper_optimizer.lr must be > 0, got 0.0"),
    ("train", {"data.inner_batch_size": -2},
     "data.inner_batch_size must be >= 0, got -2"),
    ("train", {"data.name": "cifar10", "data.data_dir": "/no/such/dir"},
     "cifar10 data_dir '/no/such/dir' does not exist"),
    ("train", {"workdir": "a_file"}, "exists and is not a directory"),
    ("eval", {"workdir": "missing"}, "no checkpoints in"),
])
def test_bad_inputs_are_one_line_and_exit_non_zero(mode, overrides, message,
                                                    tmp_path, capsys):
  workdir = tmp_path / overrides.pop("workdir", "run")
  if workdir.name == "a_file":
    workdir.write_text("")
  config = _config(**overrides)
  run = train.train_and_evaluate if mode == "train" else train.evaluate
  with pytest.raises(SystemExit) as exit_info:
    with cli.one_line_errors():
      run(config, workdir)
  line = str(exit_info.value.code)
  assert line.startswith("error: ") and message in line
  assert "\n" not in line


def _binary(*args):
  return subprocess.run(
      [sys.executable, "-m", "experiments.main", *args], cwd=ROOT,
      capture_output=True, text=True, timeout=300,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})


@pytest.mark.parametrize("config, message", [
    ("experiments/configs/no_such.py", "No such file or directory"),
    (f"{CONFIG}:smok", "Unknown hyper_cleaning variant(s) ['smok']"),
])
def test_bad_config_files_are_one_line(config, message, tmp_path):
  result = _binary(f"--config={config}", f"--workdir={tmp_path / 'w'}")
  assert result.returncode != 0
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and message in lines[0], result.stderr


def test_library_info_logs_hidden_from_a_venv_inside_the_repository():
  info_filter = cli._OwnInfoOnly(ROOT)
  def record(path, level=logging.INFO):
    return logging.LogRecord("absl", level, str(path), 1, "m", None, None)
  orbax = ROOT / ".venv/lib/python3.11/site-packages/orbax/checkpoint/x.py"
  assert not info_filter.filter(record(orbax))
  assert info_filter.filter(record(orbax, logging.WARNING))
  assert info_filter.filter(record(ROOT / "experiments" / "train.py"))
