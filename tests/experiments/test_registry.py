"""The registry: every entry resolves, optimizers match their optax forms."""

import importlib

import chex
import jax
import jax.numpy as jnp
import ml_collections
import optax
import pytest

from experiments import registry


@pytest.mark.parametrize("table", ["TASKS", "SOLVERS"])
def test_every_task_entry_names_an_existing_factory(table):
  for name, factory in getattr(registry, table).items():
    if "." not in factory.__name__:  # a platform factory, not a task's
      continue
    module, attribute = factory.__name__.split(".")
    task_module = importlib.import_module(f"experiments.tasks.{module}")
    assert callable(getattr(task_module, attribute, None)), (table, name)


def _run(tx, steps=5):
  params = {"w": jnp.arange(3.0), "b": jnp.ones(())}
  state = tx.init(params)
  for step in range(steps):
    grads = jax.tree.map(lambda p, s=step: jnp.sin(p + s), params)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  return params, state


@pytest.mark.parametrize("cfg,expected", [
    ({"name": "sgd", "lr": 0.1}, optax.sgd(0.1)),
    ({"name": "adam", "lr": 0.01}, optax.adam(0.01)),
    ({"name": "momentum", "lr": 0.1, "momentum": 0.8},
     optax.sgd(0.1, momentum=0.8)),
    # The pruning pipelines' SGD: momentum, cosine decay over the stage.
    ({"name": "momentum", "lr": 0.1, "momentum": 0.9, "schedule": "cosine",
      "decay_steps": 4},
     optax.sgd(optax.cosine_decay_schedule(0.1, 4), momentum=0.9)),
])
def test_optimizers_equal_their_optax_forms(cfg, expected):
  got = _run(registry.build_optimizer(ml_collections.ConfigDict(cfg)))
  chex.assert_trees_all_equal(got, _run(expected))
  # A plain mapping builds the same optimizer.
  chex.assert_trees_all_equal(_run(registry.build_optimizer(cfg)), got)


def test_unknown_names_list_the_valid_ones():
  with pytest.raises(ValueError, match="valid names: adam, adamw, momentum"):
    registry.build_optimizer({"name": "lamb", "lr": 0.1})
  with pytest.raises(ValueError, match="valid names: constant, cosine"):
    registry.build_optimizer({"name": "sgd", "lr": 0.1, "schedule": "step"})
  with pytest.raises(ValueError, match="valid names: .*lv_hba_svm"):
    registry.build_solver(ml_collections.ConfigDict({"name": "newton"}))
  with pytest.raises(ValueError, match="valid names: architecture_search,"
                     " biformer_classification"):
    registry.build_task(ml_collections.ConfigDict({"task": "mnist"}),
                        jax.random.key(0))
