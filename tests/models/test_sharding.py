"""Tests for models.sharding and the logical axis names of models.moe_lm."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from models import moe_lm, sharding


def _is_variable(x):
  return isinstance(x, nnx.Variable)


def _tiny(ffn: str, **overrides) -> moe_lm.MoeLMConfig:
  return moe_lm.MoeLMConfig(ffn=ffn, dim=32, num_layers=1, num_heads=2,
                            num_experts=4, expert_hidden=32, lora_rank=4,
                            **overrides)


def _param(shape, names):
  return nnx.Param(jnp.ones(shape), out_sharding=names,
                   eager_sharding=False)


def test_logical_spec_follows_the_rules():
  assert sharding.logical_spec(("vocab", "embed")) == P(None, "fsdp")
  assert sharding.logical_spec(("experts", "embed", "mlp")) == P(
      None, "fsdp", None)
  assert sharding.logical_spec(()) == P()
  rules = {"batch": ("data", "fsdp"), "embed": None}
  assert sharding.logical_spec(("batch", "embed"), rules) == P(
      ("data", "fsdp"), None)
  with pytest.raises(KeyError, match="'emb'.*known.*'embed'"):
    sharding.logical_spec(("emb",))
  with pytest.raises(ValueError, match="twice"):
    sharding.logical_spec(("embed", "embed"))


def test_make_mesh_sizes_and_errors():
  mesh = sharding.make_mesh(2, -1)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4}
  assert mesh.axis_types == (jax.sharding.AxisType.Auto,) * 2
  assert dict(sharding.make_mesh(-1, 8).shape) == {"data": 1, "fsdp": 8}
  assert sharding.make_mesh(1, 2, jax.devices()[:2]).size == 2
  with pytest.raises(ValueError, match="data=2 × fsdp=3 .* 8 devices"):
    sharding.make_mesh(2, 3)
  with pytest.raises(ValueError, match="data=-1, fsdp=3: 3 does not divide"
                     " the 8 devices"):
    sharding.make_mesh(-1, 3)
  with pytest.raises(ValueError, match="at most one"):
    sharding.make_mesh(-1, -1)
  with pytest.raises(ValueError, match="fsdp=0"):
    sharding.make_mesh(8, 0)


def test_tree_shardings_of_variables_dicts_and_abstract_leaves():
  mesh = sharding.make_mesh(2, 4)
  tree = {"w": _param((8, 16), ("embed", "mlp")),
          "unnamed": nnx.Param(jnp.ones((4, 4))),
          "plain": {"x": jnp.ones((4, 8)), "count": jnp.zeros((), jnp.int32)},
          "none": None}
  for t in (tree, jax.eval_shape(lambda: tree)):
    out = sharding.tree_shardings(t, mesh)
    assert jax.tree.structure(out) == jax.tree.structure(
        jax.tree.map(lambda x: x, t))
    assert isinstance(out["w"], nnx.Param)
    assert out["w"].get_metadata()["out_sharding"] == ("embed", "mlp")
    assert out["w"].get_value().spec == P("fsdp", None)
    assert out["unnamed"].get_value().spec == P()
    assert out["plain"]["x"].spec == P()

  by_largest = lambda path, shape: P("fsdp") if shape == (4, 8) else P()
  out = sharding.tree_shardings(tree, mesh, fallback=by_largest)
  assert out["plain"]["x"].spec == P("fsdp")
  assert out["plain"]["count"].spec == P()


def test_tree_shardings_reports_an_indivisible_dim_and_a_wrong_rank():
  mesh = sharding.make_mesh(1, 8)
  with pytest.raises(ValueError, match=r"\['layer'\]\['w'\] of shape"
                     r" \(12, 3\): dimension 12 \('embed'\) is not divisible"
                     r" by mesh axis 'fsdp' of size 8"):
    sharding.tree_shardings({"layer": {"w": _param((12, 3), ("embed",
                                                             "mlp"))}}, mesh)
  with pytest.raises(ValueError, match=r"\('embed',\) do not match shape"):
    sharding.tree_shardings({"w": _param((8, 3), ("embed",))}, mesh)


def test_adamw_state_over_an_nnx_state_carries_the_param_names():
  # optax builds mu and nu with jax.tree.map; a Variable's metadata is its
  # pytree aux data, so each moment keeps its parameter's names.
  _, params = nnx.split(nnx.eval_shape(
      lambda: moe_lm.MoeLM(_tiny("top2"), rngs=nnx.Rngs(0))))
  opt_state = jax.eval_shape(optax.adamw(1e-3).init, params)
  mesh = sharding.make_mesh(1, 8)
  param_shardings = sharding.tree_shardings(params, mesh)
  adam = opt_state[0]
  for moment in (adam.mu, adam.nu):
    assert jax.tree.structure(moment) == jax.tree.structure(params)
    assert sharding.tree_shardings(moment, mesh) == param_shardings
  assert param_shardings["blocks"][0]["ffn"]["w_in"].get_value().spec == P(
      None, "fsdp", None)
  assert sharding.tree_shardings(opt_state, mesh)[0].count.spec == P()


@pytest.mark.parametrize("ffn", moe_lm.FFN_KINDS)
def test_every_moe_lm_param_names_each_of_its_dims(ffn):
  for tie in (False, True):
    model = nnx.eval_shape(
        lambda t=tie: moe_lm.MoeLM(_tiny(ffn, tie_embeddings=t),
                                   rngs=nnx.Rngs(0)))
    _, state = nnx.split(model)
    leaves = jax.tree_util.tree_flatten_with_path(
        state, is_leaf=_is_variable)[0]
    assert leaves
    for path, variable in leaves:
      assert isinstance(variable, nnx.Param), path
      names = variable.get_metadata().get("out_sharding")
      assert names and len(names) == variable.get_value().ndim, (path, names)
      assert all(n in sharding.LOGICAL_RULES for n in names), (path, names)
    # Every parameter fits the 8-way FSDP mesh.
    sharding.tree_shardings(state, sharding.make_mesh(1, 8))


@pytest.fixture(scope="module")
def dense_lm():
  """A dense MoeLM's graphdef and params."""
  build = lambda: moe_lm.MoeLM(_tiny("dense"), rngs=nnx.Rngs(0))
  # One compiled init: faster than compiling each eager initializer.
  return (nnx.graphdef(nnx.eval_shape(build)),
          jax.jit(lambda: nnx.state(build()))())


def _adamw_step(graphdef):
  """AdamW and ``step(params, opt_state, tokens) -> (loss, params, state)``.

  Adam's first step is ``lr · g / (|g| + eps)``. With optax's default
  ``eps = 1e-8``, of the order of the gradients' reduction-order noise here,
  a near-zero gradient's noise would move its parameter by up to ``lr``;
  a larger ``eps`` keeps the comparison to float tolerance.
  """
  tx = optax.adamw(1e-2, eps=1e-3)

  def step(params, opt_state, tokens):
    def loss_fn(p):
      logits, _ = nnx.merge(graphdef, p)(tokens[:, :-1])
      return jnp.mean(optax.losses.softmax_cross_entropy_with_integer_labels(
          logits, tokens[:, 1:]))

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return loss, optax.apply_updates(params, updates), opt_state

  return tx, step


def _total_bytes(tree) -> int:
  return sum(x.nbytes for x in jax.tree.leaves(tree))


def test_fsdp_placement_holds_an_eighth_and_steps_like_one_device(dense_lm):
  graphdef, params = dense_lm
  tx, step = _adamw_step(graphdef)
  opt_state = tx.init(params)
  tokens = np.random.default_rng(0).integers(0, 256, (8, 9), np.int32)
  mesh = sharding.make_mesh(1, 8)
  state = (params, opt_state)
  shardings = sharding.tree_shardings(state, mesh)
  placed = jax.device_put(state, shardings)

  chex.assert_trees_all_equal(placed, state)
  held = sharding.bytes_per_device(placed)
  assert len(held) == 8
  # Only adamw's int32 count is replicated.
  assert max(held.values()) <= _total_bytes(state) / 8 + 4

  loss, new_params, new_opt_state = jax.jit(step)(*state, tokens)
  replicated = NamedSharding(mesh, P())
  sharded_step = jax.jit(
      step, in_shardings=(*shardings, sharding.batch_sharding(mesh)),
      out_shardings=(replicated, *shardings))
  got = sharded_step(*placed, sharding.shard_batch(tokens, mesh))
  np.testing.assert_allclose(got[0], loss, rtol=1e-5)
  chex.assert_trees_all_close(got[1:], (new_params, new_opt_state),
                              rtol=1e-5, atol=1e-7)
  assert max(sharding.bytes_per_device(got[1:]).values()) <= (
      _total_bytes(got[1:]) / 8 + 4)


def test_shard_batch_splits_examples_over_both_axes():
  mesh = sharding.make_mesh(2, 4)
  batch = {"x": np.arange(32).reshape(16, 2), "y": np.arange(8)}
  placed = sharding.shard_batch(batch, mesh)
  assert placed["x"].sharding == sharding.batch_sharding(mesh)
  assert placed["x"].sharding.spec == P(("data", "fsdp"))
  assert {s.data.shape for s in placed["x"].addressable_shards} == {(2, 2)}
  chex.assert_trees_all_equal(jax.tree.map(np.asarray, placed), batch)
  with pytest.raises(ValueError, match=r"\['y'\] of shape \(12,\)"):
    sharding.shard_batch({"y": np.arange(12)}, mesh)
