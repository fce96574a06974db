"""The DARTS / PC-DARTS supernet against the official counts and rules, and
its stacked edges against the single operations."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import bilevel
from models import darts
from models.darts import ops
from models.levels import ArchParam, merge_levels, split_levels

_size = lambda tree: sum(x.size for x in jax.tree.leaves(tree))


@pytest.mark.parametrize(("partial", "weights", "arch"),
                         [(None, 1_930_618, 224), (4, 299_578, 252)])
def test_parameter_counts_equal_the_official_ones(partial, weights, arch):
  """quark0/darts and yuhuixu1993/PC-DARTS, C = 16, 8 cells, CIFAR-10."""
  model = darts.SearchNetwork(darts.SearchConfig(partial_channels=partial),
                              rngs=nnx.Rngs(0))
  _, params, _ = split_levels(model, ArchParam)
  assert (_size(params.lower), _size(params.upper)) == (weights, arch)


def test_bad_configs_are_refused():
  with pytest.raises(ValueError, match="num_cells must be >= 3"):
    darts.SearchNetwork(darts.SearchConfig(num_cells=2), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="channels=6 must divide into K=4"):
    darts.SearchNetwork(darts.SearchConfig(channels=6, partial_channels=4),
                        rngs=nnx.Rngs(0))


def _stack_reference(stack, index, x, op_weights):
  """Edge ``index`` of an :class:`EdgeStack` rebuilt from the single ops of
  :func:`ops.make_op` with its weights: ``Σ_o w_o · o(x)``."""
  total = 0.0
  for o, name in enumerate(darts.PRIMITIVES):
    op = ops.make_op(name, x.shape[-1], stack.stride, affine=False,
                     search=True, rngs=nnx.Rngs(0))
    for path, variable in nnx.iter_graph(op):
      if not isinstance(variable, nnx.Param):
        continue
      key = {("first", "depthwise"): "dw1", ("first", "pointwise"): "pw1",
             ("second", "depthwise"): "dw2", ("second", "pointwise"): "pw2",
             ("depthwise",): "dw", ("pointwise",): "pw",
             ("weight_1",): "w1", ("weight_2",): "w2"}[tuple(path)]
      variable[...] = stack.weights[f"{name}.{key}"][...][index]
    total = total + op_weights[o] * op(x, train=True)
  return total


@pytest.mark.parametrize("stride", [1, 2])
def test_stacked_edges_equal_the_single_operations(stride):
  stack = darts.EdgeStack(2, 4, stride, 1,
                          darts.UniformSource(jax.random.key(3)))
  x = jax.random.normal(jax.random.key(4), (2, 2, 6, 6, 4))
  w = jax.nn.softmax(jax.random.normal(jax.random.key(5), (2, 8)))
  got = stack(x, w, train=True)
  for e in range(2):
    np.testing.assert_allclose(got[e], _stack_reference(stack, e, x[e], w[e]),
                               rtol=1e-5, atol=1e-5)


def test_partial_channels_process_the_first_c_over_k_then_shuffle():
  stack = darts.EdgeStack(1, 8, 2, 4, darts.UniformSource(jax.random.key(3)))
  x = jax.random.normal(jax.random.key(6), (1, 2, 6, 6, 8))
  w = jax.nn.softmax(jax.random.normal(jax.random.key(7), (1, 8)))
  mixed = _stack_reference(stack, 0, x[0, ..., :2], w[0])
  from models.darts import functional as F
  rest = F.max_pool(x[0, ..., 2:], 2, 2, 0)
  want = F.channel_shuffle(jnp.concatenate([mixed, rest], -1), 4)
  np.testing.assert_allclose(stack(x, w, train=True)[0], want, rtol=1e-5,
                             atol=1e-5)


_TINY = dict(channels=4, num_cells=3, num_classes=5)


def _tiny(**kwargs):
  return darts.SearchNetwork(darts.SearchConfig(**_TINY, **kwargs),
                             rngs=nnx.Rngs(0))


def test_pc_darts_with_k1_and_no_edge_normalisation_is_darts():
  images = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
  plain = _tiny()
  pc = _tiny(partial_channels=1, edge_normalization=False)
  np.testing.assert_array_equal(pc(images), plain(images))


def test_uniform_betas_weigh_a_node_by_one_over_its_in_degree():
  """Edge normalisation with β = 0 equals DARTS's sums with node j's op
  weights scaled by 1 / (j + 2)."""
  cell = _tiny(partial_channels=1).cells[0]
  s = jax.random.normal(jax.random.key(2), (2, 2, 8, 8, 12))
  alphas = jax.random.normal(jax.random.key(3), (darts.NUM_EDGES, 8))
  weights = darts.op_weights_of(alphas, None)
  uniform = darts.edge_weights_of(jnp.zeros([darts.NUM_EDGES]))
  in_degree = np.concatenate([[2 + j] * (2 + j) for j in range(darts.STEPS)])
  np.testing.assert_allclose(uniform, 1 / in_degree, rtol=1e-6)
  got = cell(s[0], s[1], weights, uniform, train=False)
  want = cell(s[0], s[1], weights / in_degree[:, None],
              jnp.ones([darts.NUM_EDGES]), train=False)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@functools.cache
def _value_and_grads(partial):
  model = _tiny(partial_channels=partial)
  graphdef, params, rest = split_levels(model, ArchParam)

  @jax.jit
  def value_and_grads(params, images, masks):
    def loss(upper, lower):
      net = merge_levels(graphdef, bilevel.Params(upper, lower), rest)
      return jnp.mean(net(images, train=True, op_masks=masks) ** 2)
    return jax.value_and_grad(loss, argnums=(0, 1))(*params)

  return value_and_grads, params


@pytest.mark.parametrize("partial", [None, 2])
def test_tiny_search_network_differentiates_and_masks_ops(partial):
  value_and_grads, params = _value_and_grads(partial)
  images = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
  mask = np.ones((darts.NUM_EDGES, 8), bool)
  mask[:, 4:] = False  # no convolutions
  masks = {"normal": jnp.asarray(mask),
           "reduce": jnp.ones((darts.NUM_EDGES, 8), bool)}
  value, (g_upper, g_lower) = value_and_grads(params, images, masks)
  assert np.isfinite(value)
  assert len(jax.tree.leaves(g_upper)) == (4 if partial else 2)
  g_normal = np.asarray(g_upper["alphas_normal"][...])
  assert np.all(g_normal[:, 4:] == 0) and np.all(g_normal[:, 1:4] != 0)
  assert np.all(np.asarray(g_upper["alphas_reduce"][...])[:, 1:] != 0)
  # The none op adds exactly zero, so its logit's gradient is
  # -softmax_none · Σ_o softmax_o ∂L/∂w_o: nonzero, and finite everywhere.
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(g_lower))


def _alphas(picks):
  """[14, 8] logits with the op ``picks[e]`` strong on edge ``e``."""
  alphas = np.zeros((darts.NUM_EDGES, len(darts.PRIMITIVES)))
  for edge, (op, strength) in picks.items():
    alphas[edge, darts.PRIMITIVES.index(op)] = strength
  return alphas


def test_genotype_follows_the_official_rule():
  # Node 0 (edges 0-1), node 1 (2-4), node 2 (5-8), node 3 (9-13).
  picks = {0: ("sep_conv_3x3", 2.0), 1: ("skip_connect", 1.0),
           2: ("none", 9.0), 3: ("dil_conv_5x5", 3.0), 4: ("max_pool_3x3",
                                                            2.5),
           6: ("sep_conv_5x5", 1.0), 8: ("avg_pool_3x3", 1.5),
           11: ("dil_conv_3x3", 0.5), 13: ("sep_conv_3x3", 0.7)}
  genotype = darts.derive_genotype(_alphas(picks), _alphas(picks))
  # Edge 2's strong 'none' is ignored (its best non-none op is weak);
  # ties (node 3's zero edges) keep the lower input; strongest first.
  assert genotype.normal == (
      ("sep_conv_3x3", 0), ("skip_connect", 1),
      ("dil_conv_5x5", 1), ("max_pool_3x3", 2),
      ("avg_pool_3x3", 3), ("sep_conv_5x5", 1),
      ("sep_conv_3x3", 4), ("dil_conv_3x3", 2))
  assert genotype.normal_concat == (2, 3, 4, 5)


def test_pc_darts_edge_weights_scale_the_strengths():
  alphas = _alphas({0: ("sep_conv_3x3", 1.0), 1: ("sep_conv_5x5", 1.2)})
  betas = np.zeros(darts.NUM_EDGES)
  betas[0] = 3.0  # edge 0 dominates node 0's normalised edge weights
  plain = darts.derive_cell(darts.edge_weights(alphas))
  weighted = darts.derive_cell(darts.edge_weights(alphas, betas))
  assert plain[:2] == (("sep_conv_5x5", 1), ("sep_conv_3x3", 0))
  assert weighted[:2] == (("sep_conv_3x3", 0), ("sep_conv_5x5", 1))
