"""The CIFAR pruning pipelines on their smoke schedule (SmallCNN, 256 images).

On the generated CIFAR-10 stand-in (``cifar10_dir`` in ``tests/conftest.py``).
"""

import json
import pathlib
import shutil

import chex
import jax
import numpy as np
import pytest

from experiments import train
from experiments.configs import (
  bip_cifar10,
  bip_first_order_cifar10,
  imp_cifar10,
  omp_cifar10,
)
from experiments.tasks import pruning
from models import mask_builders as pm


def _config(module, data_dir, pretrain_dir, variant="smoke", **overrides):
  config = module.get_config(variant)
  config.unlock()
  config.data.data_dir = str(data_dir)
  config.pretrain.workdir = str(pretrain_dir)
  for key, value in overrides.items():
    config[key] = value
  config.lock()
  return config


def _stages(workdir):
  return json.loads((pathlib.Path(workdir) / "stages.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cifar10_dir):
  """One shared dense model, then BiP, OMP and IMP runs from it."""
  root = tmp_path_factory.mktemp("pruning")
  dense = root / "pretrain"
  out = {"root": root, "dense": dense}
  for name, module in (("bip", bip_cifar10), ("omp", omp_cifar10),
                       ("imp", imp_cifar10)):
    config = _config(module, cifar10_dir, dense)
    out[name] = (config, train.train_and_evaluate(config, root / name))
  return out


def test_bip_reaches_the_budget_and_eval_restores_it(runs):
  config, results = runs["bip"]
  assert results["sparsity"] == pytest.approx(0.9, abs=2e-3)
  assert results["steps/bip"] == config.prune.num_steps
  # The shared dense model is not this run's cost.
  assert results["steps/train"] == config.finetune.num_steps
  evaluated = train.evaluate(config, runs["root"] / "bip")
  for key in ("test_accuracy", "sparsity", "mask_sparsity"):
    assert evaluated[key] == results[key], key


def test_omp_mask_is_the_global_magnitude_topk_of_the_dense_model(runs):
  config, results = runs["omp"]
  dense = train.load_params(runs["root"] / "omp", config, stage="pretrain")
  final = train.load_params(runs["root"] / "omp", config)
  magnitudes = {p: np.abs(w) for p, w in dense.lower.items()
                if p.endswith("kernel")}
  flat = np.concatenate([m.ravel() for m in magnitudes.values()])
  k = round(0.1 * flat.size)
  threshold = np.sort(flat)[::-1][k - 1]
  for path, magnitude in magnitudes.items():
    np.testing.assert_array_equal(final.upper[path] != 0,
                                  magnitude >= threshold, err_msg=path)
  assert results["sparsity"] == pytest.approx(1 - k / flat.size)


def test_imp_masks_are_nested_and_reach_each_target(runs):
  config, results = runs["imp"]
  schedule = pm.imp_schedule(tuple(config.imp.targets), config.imp.rate)
  previous = None
  for j, (kept, _) in enumerate(schedule, start=1):
    params = train.load_params(runs["root"] / "imp", config,
                               stage=f"round_{j:02d}")
    kept_now = sum(int(np.sum(m != 0)) for m in params.upper.values()
                   if m.ndim)
    total = sum(m.size for m in params.upper.values() if m.ndim)
    assert kept_now == round(kept * total)
    if previous is not None:
      for path, mask in params.upper.items():
        assert np.all(mask <= previous[path]), (j, path)
    previous = params.upper
  stages = _stages(runs["root"] / "imp")
  targets = [f"round_{j:02d}" for j, (_, t) in enumerate(schedule, 1) if t]
  assert sorted(stages) == sorted(["pretrain", *targets])
  for name, target in zip(targets, config.imp.targets):
    assert stages[name]["sparsity"] == pytest.approx(target, abs=2e-3)
  assert results["sparsity"] == pytest.approx(config.imp.targets[-1],
                                              abs=2e-3)


def test_an_interrupted_stage_resumes_bit_identically(runs, tmp_path):
  config, _ = runs["bip"]
  workdir = tmp_path / "bip"
  shutil.copytree(runs["root"] / "bip", workdir)
  checkpoints = workdir / "finetune" / "checkpoints"
  last = max(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
  shutil.rmtree(checkpoints / str(last))  # as if killed before that save
  train.train_and_evaluate(config, workdir)
  resumed = train.load_params(workdir, config)
  original = train.load_params(runs["root"] / "bip", config)
  chex.assert_trees_all_equal(resumed, original)


def test_structured_bip_prunes_filters_per_layer_but_not_the_classifier(
    runs, tmp_path, cifar10_dir):
  config = _config(bip_first_order_cifar10, cifar10_dir, runs["dense"],
                   "smoke,structured")
  assert not config.prune.correction
  results = train.train_and_evaluate(config, tmp_path / "structured")
  final = train.load_params(tmp_path / "structured", config)
  assert final.upper["head.kernel"].shape == ()
  for path in ("conv1.kernel", "conv2.kernel"):
    mask = final.upper[path]
    assert mask.shape[:-1] == (1, 1, 1)
    assert mask.sum() == mask.size // 2
  assert results["sparsity"] == pytest.approx(0.5)


@pytest.mark.parametrize("overrides, message", [
    ({"method": "grow"}, "method='grow'"),
    ({"sparsity": 1.0}, "sparsity=1.0"),
])
def test_bad_config_keys_are_named(overrides, message, tmp_path,
                                  cifar10_dir):
  config = _config(bip_cifar10, cifar10_dir, tmp_path / "dense", **overrides)
  with pytest.raises(ValueError, match=message):
    pruning.pipeline_from_config(config, jax.random.key(0))


def test_unknown_model_is_named(tmp_path, cifar10_dir):
  config = _config(bip_cifar10, cifar10_dir, tmp_path / "dense")
  config.unlock()
  config.model.name = "vgg16"
  with pytest.raises(ValueError, match="model.name 'vgg16'"):
    pruning.build_model(config.model, jax.random.key(0))
