"""The derived DARTS network against the official counts and drop path."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import darts

_TINY = dict(channels=4, num_cells=3, num_classes=5)


@pytest.mark.parametrize(("genotype", "auxiliary", "official"), [
    (darts.DARTS_V2, False, 3_349_342),
    (darts.DARTS_V2, True, 3_825_768),
    (darts.PC_DARTS_CIFAR, False, 3_634_678),
    (darts.PC_DARTS_CIFAR, True, 4_111_104),
])
def test_parameter_counts_equal_the_official_ones(genotype, auxiliary,
                                                  official):
  """quark0/darts and yuhuixu1993/PC-DARTS, C = 36, 20 cells, CIFAR-10."""
  assert darts.count_params(genotype, auxiliary=auxiliary) == official


def _normal(shape):
  # Host-side: an eager jax.random draw compiles threefry (seconds).
  return jnp.asarray(np.random.default_rng(1).standard_normal(shape),
                     jnp.float32)


@pytest.fixture(scope="module")
def tiny():
  """A 3-cell network (reductions at cells 1 and 2), its state and a jitted
  forward ``(state, images, p, key, train) -> (logits, aux)``."""
  model = darts.EvalNetwork(darts.PC_DARTS_CIFAR, **_TINY, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)

  @functools.partial(jax.jit, static_argnames="train", compiler_options={
      "xla_backend_optimization_level": 0})  # tiny: -O0 compiles ~4x faster
  def forward(state, images, p, key, train):
    net = nnx.merge(graphdef, state)
    return net(images, train, drop_path_prob=p, rngs=nnx.Rngs(dropout=key))

  return model, state, forward


def test_count_params_counts_the_built_network_without_batch_stats(tiny):
  model, _, _ = tiny
  size = lambda kind: sum(x.size for x in
                          jax.tree.leaves(nnx.state(model, kind)))
  assert darts.count_params(darts.PC_DARTS_CIFAR, **_TINY) == size(nnx.Param)
  assert size(nnx.BatchStat) > 0
  no_aux = darts.count_params(darts.PC_DARTS_CIFAR, **_TINY, auxiliary=False)
  head = model.auxiliary_head
  assert no_aux == size(nnx.Param) - sum(
      x.size for x in jax.tree.leaves(nnx.state(head, nnx.Param)))


def test_train_mode_shapes_and_drop_path_through_the_network(tiny):
  _, state, forward = tiny
  images = _normal((2, 32, 32, 3))
  k1, k2 = jax.random.key(2), jax.random.key(3)
  logits, aux = forward(state, images, 0.0, k1, True)
  assert logits.shape == aux.shape == (2, 5)
  assert np.all(np.isfinite(logits)) and np.all(np.isfinite(aux))
  # p = 0: every sample kept and divided by 1, whatever the key.
  again, aux_again = forward(state, images, 0.0, k2, True)
  np.testing.assert_array_equal(logits, again)
  np.testing.assert_array_equal(aux, aux_again)
  dropped, _ = forward(state, images, 0.5, k1, True)
  assert not np.allclose(dropped, logits)
  np.testing.assert_array_equal(dropped,
                                forward(state, images, 0.5, k1, True)[0])


def test_eval_mode_is_deterministic_without_auxiliary_logits(tiny):
  _, state, forward = tiny
  images = _normal((2, 32, 32, 3))
  logits, aux = forward(state, images, 0.0, jax.random.key(2), False)
  assert logits.shape == (2, 5) and aux is None
  other, _ = forward(state, images, 0.5, jax.random.key(3), False)
  np.testing.assert_array_equal(logits, other)


def test_drop_path_needs_rngs_in_training_and_a_probability_below_one(tiny):
  model, _, _ = tiny
  images = jnp.zeros((2, 32, 32, 3))
  with pytest.raises(ValueError, match="rngs"):
    model(images, True)  # the default p = 0.2 without rngs
  with pytest.raises(ValueError, match=r"\[0, 1\)"):
    model(images, False, drop_path_prob=1.0)
  with pytest.raises(ValueError, match="8x8"):
    model.auxiliary_head(jnp.zeros((2, 4, 4, 64)), True)


def test_drop_path_keeps_whole_samples_and_is_unbiased():
  x = jnp.ones((20_000, 2, 2, 3))
  np.testing.assert_array_equal(darts.drop_path(jax.random.key(0), x, 0.0),
                                x)
  for p in (0.3, 0.99):
    y = np.asarray(darts.drop_path(jax.random.key(1), x, p))
    per_sample = y.reshape(len(y), -1)
    # One draw per sample: every element of a sample kept or none.
    assert np.all(per_sample == per_sample[:, :1])
    kept = per_sample[:, 0] != 0
    np.testing.assert_allclose(per_sample[kept, 0], 1 / (1 - p), rtol=1e-6)
    # The kept fraction is 1 - p (6 sigma), so the mean stays 1.
    sigma = np.sqrt(p * (1 - p) / len(y))
    assert abs(kept.mean() - (1 - p)) < 6 * sigma


def test_a_cell_drops_every_op_but_the_identity():
  # Node 2 = skip_connect(node 0) + sep_conv_3x3(node 1); node 3 =
  # max_pool(node 0) + dil_conv_3x3(node 2).
  edges = (("skip_connect", 0), ("sep_conv_3x3", 1),
           ("max_pool_3x3", 0), ("dil_conv_3x3", 2))
  genotype = darts.Genotype(edges, (2, 3), edges, (2, 3))
  cell = darts.EvalCell(genotype, 6, 6, 4, False, False, rngs=nnx.Rngs(0))
  assert cell.dropped == (False, True, True, True)
  s0, s1 = _normal((2, 2, 4, 4, 6))

  @functools.partial(jax.jit, compiler_options={
      "xla_backend_optimization_level": 0})
  def run(cell, key):
    """The cell with keep probability 1e-7, and its node 0."""
    return (cell(s0, s1, True, 1 - 1e-7, nnx.Rngs(dropout=key)),
            cell.preprocess0(s0, True))

  # Every dropped op is zero; node 2 is its skip, node 3 zero.
  out, skip = run(cell, jax.random.key(1))
  np.testing.assert_array_equal(
      out, jnp.concatenate([skip, jnp.zeros_like(skip)], -1))


def test_malformed_genotypes_are_refused():
  bad_input = darts.Genotype((("sep_conv_3x3", 2), ("skip_connect", 0)),
                             (2,), (("max_pool_3x3", 0),) * 2, (2,))
  with pytest.raises(ValueError, match="reads node 2"):
    nnx.eval_shape(lambda: darts.EvalCell(bad_input, 4, 4, 2, False, False,
                                          rngs=nnx.Rngs(0)))
  bad_concat = bad_input._replace(normal=(("sep_conv_3x3", 1),) * 2,
                                  normal_concat=(3,))
  with pytest.raises(ValueError, match="concat"):
    nnx.eval_shape(lambda: darts.EvalCell(bad_concat, 4, 4, 2, False, False,
                                          rngs=nnx.Rngs(0)))


def test_released_genotypes_use_search_space_ops_and_four_nodes():
  for name, genotype in darts.RELEASED.items():
    for cell in (genotype.normal, genotype.reduce):
      assert len(cell) == 8, name
      assert all(op in darts.PRIMITIVES and op != "none" for op, _ in cell)
    assert genotype.normal_concat == genotype.reduce_concat == (2, 3, 4, 5)
  assert darts.RELEASED["DARTS_V2"].normal[-1] == ("dil_conv_3x3", 2)
