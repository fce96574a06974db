"""ScaleBiO's two-copy state on a (data=1, fsdp=8) mesh of simulated devices.

The mesh comes from the parameters' logical axis names
(``models.sharding``); ``u``, both optimizer states and ``p`` are placed
by the training loop's :class:`experiments.distributed.Placement`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import distributed, train
from experiments.configs import scalebio_lm
from experiments.tasks import data_reweighting
from models import sharding

_STEPS = 3


@pytest.fixture(scope="module")
def stage():
  config = scalebio_lm.get_config("smoke")
  pipeline = data_reweighting.pipeline_from_config(config,
                                                   train.task_key(config))
  return pipeline.stages[0]


def _state(stage):
  # A copy: the step donates its inputs (as the training loop's does).
  params = jax.tree.map(jnp.copy, stage.init({}))
  return {"params": params, "solver_state": stage.solver.init(params)}


def _run(stage, mesh_shape):
  state = _state(stage)
  place = distributed.placement(jax.eval_shape(lambda: state), mesh_shape)
  state = place.state(state)
  step = place.make_step(stage.solver, stage.problem)
  batches = place.batches(stage.batches)
  params, solver_state = state["params"], state["solver_state"]
  losses = []
  for i in range(_STEPS):
    params, solver_state, metrics = step(params, solver_state, batches(i))
    losses.append(float(metrics["outer_loss"]))
  return params, solver_state, losses


def _largest_share(tree) -> float:
  total = sum(x.nbytes for x in jax.tree.leaves(tree))
  return max(sharding.bytes_per_device(tree).values()) / total


@pytest.mark.skipif(jax.device_count() < 8,
                    reason="needs 8 simulated devices (tests/conftest.py)")
def test_eight_devices_follow_the_one_device_trajectory(stage):
  one = _run(stage, None)
  eight = _run(stage, (1, 8))
  np.testing.assert_allclose(eight[2], one[2], rtol=1e-5)
  np.testing.assert_allclose(np.asarray(eight[0].upper),
                             np.asarray(one[0].upper), rtol=1e-4, atol=1e-7)
  solver_state = eight[1][0]
  copy, model = solver_state.copy, eight[0].lower
  # w, u and u's Adam moments: each device holds an eighth.
  for tree in (model, copy, solver_state.copy_opt_state):
    assert _largest_share(tree) <= 1 / 8 + 1e-3
  # Sharded along the model width, as the logical names say.
  kernel = model["blocks"][0]["ffn"]["w_in"]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", None)
  assert len(sharding.bytes_per_device(copy)) == 8
