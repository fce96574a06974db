"""BiFormer on CIFAR-10: the smoke run, eval restore, config checks.

The training test runs on the generated CIFAR-10 stand-in (``cifar10_dir``
in ``tests/conftest.py``). The 224² smoke runs of ``biformer_imagenet.py``
take 30–50 s on an idle 2-core CPU (minutes on a busy one), so only their
configs are checked here.
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import train
from experiments.configs import biformer_cifar10, biformer_imagenet
from experiments.tasks import biformer_classification as task_lib

ROOT = pathlib.Path(__file__).resolve().parents[3]
CONFIG = "experiments/configs/biformer_cifar10.py"


def _smoke_config(data_dir="", **model):
  config = biformer_cifar10.get_config("smoke")
  config.data.data_dir = str(data_dir)
  config.model.update(model)
  return config


def test_smoke_training_then_eval_restores_the_same_numbers(tmp_path,
                                                           cifar10_dir):
  config = _smoke_config(cifar10_dir)
  results = train.train_and_evaluate(config, tmp_path)
  assert 0.0 <= results["test_accuracy"] <= 1.0
  assert np.isfinite(results["test_loss"])
  losses = [json.loads(line).get("outer_loss") for line in
            (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert len([x for x in losses if x is not None]) == 2  # steps 2 and 4

  evaluated = train.evaluate(config, tmp_path)
  assert evaluated == results


def test_config_typo_is_a_clear_error(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "experiments.main", f"--config={CONFIG}:smoke",
       "--config.model.n_wim=2", f"--workdir={tmp_path}"],
      cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"},
      capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert "unknown config key 'model.n_wim'" in result.stderr
  assert "Traceback" not in result.stderr


@pytest.mark.parametrize("model, message", [
    ({"n_win": 3}, "model.n_win: stage 1 map 8x8"),
    ({"attention_impl": "cuda"}, "model.attention_impl: 'cuda' unknown"),
    ({"topks": (1, 2, -2)}, "model.topks: needs 4 entries"),
    ({"topks": (1, 5, 2, -2)}, "model.topks: stage 2 routes 5 of 4"),
    ({"head_dim": 12}, "model.embed_dims: stage 1 width 16"),
])
def test_bad_model_values_are_named(model, message):
  config = _smoke_config(**model)
  with pytest.raises(ValueError, match=message):
    task_lib.task_from_config(config, jax.random.key(0))


class _CallRecorder(nnx.Module):
  """Stands in for a BiFormer; records the keywords it is called with."""

  def __init__(self, calls: list):
    self.calls = nnx.data(calls)

  def __call__(self, x, **kwargs):
    self.calls.append(kwargs)
    return x


def test_classifier_drops_paths_only_with_a_key():
  calls = []
  model = task_lib.Classifier(_CallRecorder(calls))
  x, key = jnp.zeros((1, 4, 4, 3)), jax.random.key(0)
  model(x, train=True, key=key)
  model(x, train=True)  # BatchNorm recalibration
  model(x, train=False)
  drop, calibrate, evaluate = calls
  assert drop["deterministic"] is False and "dropout" in drop["rngs"]
  assert calibrate == {"deterministic": True, "use_running_average": False}
  assert evaluate == {"deterministic": True, "use_running_average": True}


def _num_params(model_cfg) -> int:
  model = nnx.eval_shape(lambda: task_lib.build_model(
      model_cfg, model_cfg.num_classes, jax.random.key(0)))
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("name, depths, dims", [
    ("tiny", (2, 2, 8, 2), (64, 128, 256, 512)),
    ("small", (4, 4, 18, 4), (64, 128, 256, 512)),
    ("base", (4, 4, 18, 4), (96, 192, 384, 768))])
def test_imagenet_configs_are_the_official_models(name, depths, dims):
  for variant in (name, f"{name},smoke"):
    config = biformer_imagenet.get_config(variant)
    task_lib.validate_model(config.model, config.data.image_size)
    assert tuple(config.model.depths) == depths
    assert tuple(config.model.embed_dims) == dims
    assert (config.model.n_win, tuple(config.model.topks)) == (
        7, (1, 4, 16, -2))
    assert (config.data.image_size, config.model.num_classes) == (224, 1000)
  assert config.data.name == "cifar10"  # the smoke stand-in
  if name == "tiny":  # S and B: tests/models/test_biformer.py
    assert _num_params(config.model) == 13_142_760
  with pytest.raises(ValueError, match="exactly one model"):
    biformer_imagenet.get_config("smoke")


def test_cifar_config_is_the_stated_model():
  config = biformer_cifar10.get_config()
  task_lib.validate_model(config.model, config.data.image_size)
  assert _num_params(config.model) == 2_521_994
  with pytest.raises(ValueError, match="variant"):
    biformer_cifar10.get_config("smok")
