"""Tests of models/levels.py."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from bilevel import Params
from models import (
    ArchParam,
    GraphParam,
    merge_levels,
    split_levels,
    updated_rest,
)

_X = jax.random.normal(jax.random.key(0), (8, 4)) * 2.0 + 1.0
_Y = jnp.array([0, 1, 2, 0, 1, 2, 0, 1])


class MixedOp(nnx.Module):
  """A DARTS edge: ``Σ_i softmax(α)_i op_i(x)`` over three candidate ops."""

  def __init__(self, features: int, *, rngs: nnx.Rngs):
    self.linear = nnx.Linear(features, features, rngs=rngs)
    self.mlp = nnx.Linear(features, features, rngs=rngs)
    self.alpha = ArchParam(jnp.array([0.3, -0.2, 0.5]))

  def __call__(self, x):
    w = jax.nn.softmax(self.alpha[...])
    return (w[0] * x + w[1] * self.linear(x)
            + w[2] * jax.nn.relu(self.mlp(x)))


class Supernet(nnx.Module):
  """BatchNorm, one mixed op, dropout (RNG counts) and a linear head."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.norm = nnx.BatchNorm(4, rngs=rngs)
    self.cell = MixedOp(4, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)
    self.head = nnx.Linear(4, 3, rngs=rngs)

  def __call__(self, x, *, train: bool):
    x = self.norm(x, use_running_average=not train)
    x = self.drop(self.cell(x), deterministic=not train)
    return self.head(x)


def _model():
  return Supernet(rngs=nnx.Rngs(0))


def _flat(state):
  return {path: v[...] for path, v in nnx.to_flat_state(state)}


def _types(state):
  return {path: type(v) for path, v in nnx.to_flat_state(state)}


def _cross_entropy(model, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(
      model(x, train=True), y).mean()


def _pure_loss(graphdef):
  """``loss(upper, lower, batch) -> (value, new rest)``; rest in the batch."""

  def loss(upper, lower, batch):
    net = merge_levels(graphdef, Params(upper, lower), batch["rest"])
    return (_cross_entropy(net, batch["x"], batch["y"]),
            updated_rest(net, batch["rest"]))

  return loss


def test_arch_logits_go_up_and_weights_down():
  _, (upper, lower), rest = split_levels(_model(), ArchParam)
  assert _types(upper) == {("cell", "alpha"): ArchParam}
  assert set(_types(lower).values()) == {nnx.Param}
  assert len(_types(lower)) == 8  # 3 Linear kernels and biases, BN scale, bias
  assert set(_types(rest).values()) == {
      nnx.BatchStat, nnx.RngCount, nnx.RngKey}


def test_split_merge_round_trip_is_exact():
  model = _model()
  graphdef, params, rest = split_levels(model, ArchParam)
  rebuilt = merge_levels(graphdef, params, rest)
  graphdef2, params2, rest2 = split_levels(rebuilt, ArchParam)
  assert graphdef2 == graphdef
  for before, after in zip((*params, rest), (*params2, rest2)):
    assert jax.tree.structure(after) == jax.tree.structure(before)
    assert _types(after) == _types(before)
    got, want = _flat(after), _flat(before)
    for path in want:
      if jnp.issubdtype(want[path].dtype, jax.dtypes.prng_key):
        got[path], want[path] = map(jax.random.key_data,
                                    (got[path], want[path]))
      np.testing.assert_array_equal(got[path], want[path])
  np.testing.assert_array_equal(rebuilt(_X, train=False),
                                model(_X, train=False))
  # Fresh variables: using the rebuilt module leaves the split untouched.
  rebuilt(_X, train=True)
  np.testing.assert_array_equal(_flat(rest)[("norm", "mean")], 0.0)


def test_pure_loss_matches_the_stateful_module():
  model = _model()
  graphdef, params, rest = split_levels(model, ArchParam)
  batch = {"x": _X, "y": _Y, "rest": rest}
  (value, new_rest), (g_upper, g_lower) = jax.jit(jax.value_and_grad(
      _pure_loss(graphdef), argnums=(0, 1), has_aux=True))(*params, batch)

  want_value, want_grads = nnx.value_and_grad(_cross_entropy)(model, _X, _Y)
  np.testing.assert_allclose(value, want_value, rtol=1e-6)
  want = _flat(want_grads)
  got = {**_flat(g_upper), **_flat(g_lower)}
  assert set(got) == set(want) and ("cell", "alpha") in _flat(g_upper)
  for path in want:
    np.testing.assert_allclose(got[path], want[path], rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(_flat(g_upper)[("cell", "alpha")]).sum()) > 0
  # The aux is the stateful module's updated rest: BatchNorm and RNG count.
  stateful = _flat(split_levels(model, ArchParam).rest)
  for path, leaf in _flat(new_rest).items():
    if path[-1] == "key":
      continue
    np.testing.assert_allclose(leaf, stateful[path], rtol=1e-6, atol=1e-7)


def test_batch_statistics_come_back_as_aux():
  graphdef, params, rest = split_levels(_model(), ArchParam)
  loss = jax.jit(_pure_loss(graphdef))
  momentum = 0.99
  mean, var = jnp.zeros(4), jnp.ones(4)
  count = _flat(rest)[("drop", "rngs", "count")]
  for step in range(3):
    x = _X + step
    _, rest = loss(*params, {"x": x, "y": _Y, "rest": rest})
    mean = momentum * mean + (1 - momentum) * x.mean(0)
    var = momentum * var + (1 - momentum) * x.var(0)
    stats = _flat(rest)
    np.testing.assert_allclose(stats[("norm", "mean")], mean, rtol=1e-5)
    np.testing.assert_allclose(stats[("norm", "var")], var, rtol=1e-5)
    assert stats[("drop", "rngs", "count")] == count + step + 1


def test_several_upper_types_and_upper_outside_the_model():
  model = _model()
  model.cell.edges = GraphParam(jnp.ones(2))
  _, (upper, lower), _ = split_levels(model, (ArchParam, GraphParam))
  assert set(_types(upper).values()) == {ArchParam, GraphParam}
  assert set(_types(lower).values()) == {nnx.Param}
  _, (upper, lower), _ = split_levels(_model(), ())
  assert not _flat(upper)
  assert ArchParam in set(_types(lower).values())


@pytest.mark.parametrize("kwargs, error, message", [
    ({"upper": nnx.Param, "lower": ArchParam}, ValueError,
     "filter order: lower type ArchParam is a subclass of upper type Param"),
    ({"upper": ArchParam, "lower": (nnx.Param, ArchParam)}, ValueError,
     "overlapping filters: ArchParam is listed in both upper and lower"),
    ({"upper": nnx.PathContains("head")}, ValueError,
     r"overlapping filters: .* both claim \['head.bias \(Param\)',"
     r" 'head.kernel \(Param\)'\]"),
    ({"upper": ArchParam, "rest": nnx.BatchStat}, ValueError,
     r"no filter claims \['drop.rngs.count \(RngCount\)',"
     r" 'drop.rngs.key \(RngKey\)'\]"),
    ({"upper": GraphParam}, ValueError,
     r"upper=GraphParam matches no variable of Supernet, whose variable types"
     r" are \['ArchParam', 'BatchStat', 'Param', 'RngCount', 'RngKey'\]"),
    ({"upper": ArchParam, "lower": nnx.Intermediate}, ValueError,
     "lower=Intermediate matches no variable"),
    ({"upper": nnx.Linear}, TypeError,
     "upper=Linear is not an nnx.Variable type"),
])
def test_errors_name_the_problem(kwargs, error, message):
  with pytest.raises(error, match=message):
    split_levels(_model(), **kwargs)
