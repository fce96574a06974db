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
from models.darts import few_shot, ops
from models.darts import functional as F
from models.darts import gradient_matching as gm
from models.levels import ArchParam, merge_levels, split_levels

# LLVM -O0 compiles these tiny networks ~4x faster; they run in ms anyway.
_jit = functools.partial(jax.jit, compiler_options={
    "xla_backend_optimization_level": 0})
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


def _single_ops(stack, index, channels):
  """The 8 ops of edge ``index`` of an :class:`EdgeStack`, rebuilt from the
  single ops of :func:`ops.make_op` with its weights."""
  names = {("first", "depthwise"): "dw1", ("first", "pointwise"): "pw1",
           ("second", "depthwise"): "dw2", ("second", "pointwise"): "pw2",
           ("depthwise",): "dw", ("pointwise",): "pw", ("weight_1",): "w1",
           ("weight_2",): "w2"}
  single = []
  for name in darts.PRIMITIVES:
    op = ops.make_op(name, channels, stack.stride, affine=False, search=True,
                     rngs=nnx.Rngs(0))
    for path, variable in nnx.iter_graph(op):
      if isinstance(variable, nnx.Param):
        key = f"{name}.{names[tuple(path)]}"
        variable[...] = stack.weights[key][...][index]
    single.append(op)
  return single


def _mix(single, x, op_weights):
  """``Σ_o w_o · o(x)`` (running BN statistics)."""
  return sum(w * op(x, train=False) for w, op in zip(op_weights, single))


@pytest.mark.parametrize("stride", [1, 2])
def test_stacked_edges_equal_the_single_operations(stride):
  stack = darts.EdgeStack(2, 4, stride, 1,
                          darts.UniformSource(jax.random.key(3)))
  singles = [_single_ops(stack, e, 4) for e in range(2)]
  x = jax.random.normal(jax.random.key(4), (2, 2, 6, 6, 4))
  w = jax.nn.softmax(jax.random.normal(jax.random.key(5), (2, 8)))
  # Running statistics (train=False): no BN state to thread through jit.
  got, want = _jit(lambda: (stack(x, w, train=False), jnp.stack([
      _mix(singles[e], x[e], w[e]) for e in range(2)])))()
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_partial_channels_process_the_first_c_over_k_then_shuffle():
  stack = darts.EdgeStack(1, 8, 2, 4, darts.UniformSource(jax.random.key(3)))
  x = jax.random.normal(jax.random.key(6), (1, 2, 6, 6, 8))
  w = jax.nn.softmax(jax.random.normal(jax.random.key(7), (1, 8)))

  single = _single_ops(stack, 0, 2)

  def both():
    mixed = _mix(single, x[0, ..., :2], w[0])
    rest = F.max_pool(x[0, ..., 2:], 2, 2, 0)
    want = F.channel_shuffle(jnp.concatenate([mixed, rest], -1), 4)
    return stack(x, w, train=False)[0], want

  got, want = _jit(both)()
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# Two intermediate nodes (5 edges) compile several times faster than 4.
_TINY = dict(channels=4, num_cells=3, num_classes=5, steps=2)


def _tiny(**kwargs):
  return darts.SearchNetwork(darts.SearchConfig(**_TINY, **kwargs),
                             rngs=nnx.Rngs(0))


def test_pc_darts_with_k1_and_no_edge_normalisation_is_darts():
  images = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
  plain = _tiny()
  pc = _tiny(partial_channels=1, edge_normalization=False)
  forward = lambda model: _jit(lambda x: model(x, train=False))(images)
  np.testing.assert_array_equal(forward(pc), forward(plain))


def test_uniform_betas_weigh_a_node_by_one_over_its_in_degree():
  """Edge normalisation with β = 0 equals DARTS's sums with node j's op
  weights scaled by 1 / (j + 2)."""
  cell = _tiny(partial_channels=1).cells[0]
  s = jax.random.normal(jax.random.key(2), (2, 2, 8, 8, 12))
  edges = darts.num_edges(2)
  weights = darts.op_weights_of(
      jax.random.normal(jax.random.key(3), (edges, 8)), None)
  uniform = darts.edge_weights_of(jnp.zeros([edges]))
  in_degree = np.asarray([2, 2, 3, 3, 3])
  np.testing.assert_allclose(uniform, 1 / in_degree, rtol=1e-6)
  forward = _jit(lambda w, e: cell(s[0], s[1], w, e, train=False))
  np.testing.assert_allclose(
      forward(weights, uniform),
      forward(weights / in_degree[:, None], jnp.ones([edges])),
      rtol=1e-5, atol=1e-6)


def test_masked_ops_and_edges_get_no_gradient():
  """One compiled fwd+bwd of the PC-DARTS (K = 2) supernet with op masks:
  disabled ops' logits and weights get zero gradients, enabled ones not; an
  edge restricted to ``none`` owns exactly the weights GM-NAS's
  :func:`few_shot.edge_labels` gives it."""
  model = _tiny(partial_channels=2)
  graphdef, params, rest = split_levels(model, ArchParam)
  edges = darts.num_edges(2)
  on = ["max_pool_3x3", "avg_pool_3x3", "skip_connect", "sep_conv_3x3"]
  normal = np.zeros((edges, 8), bool)
  normal[3] = gm.ops_row([0])  # none only
  normal[[0, 1, 2, 4]] = gm.ops_row([darts.PRIMITIVES.index(o) for o in on])
  masks = {"normal": jnp.asarray(normal),
           "reduce": jnp.ones((edges, 8), bool)}
  images = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))

  @_jit
  def value_and_grads(params):
    def loss(upper, lower):
      net = merge_levels(graphdef, bilevel.Params(upper, lower), rest)
      return jnp.mean(net(images, train=True, op_masks=masks) ** 2)
    return jax.value_and_grad(loss, argnums=(0, 1))(*params)

  value, (g_upper, g_lower) = value_and_grads(params)
  assert np.isfinite(value) and len(jax.tree.leaves(g_upper)) == 4
  g_normal = np.asarray(g_upper["alphas_normal"][...])
  np.testing.assert_array_equal(g_normal[~normal], 0)
  others = [0, 1, 2, 4]  # edge 3's lone none has weight 1: zero gradient
  assert np.all(g_normal[others][normal[others]] != 0)
  assert np.all(np.asarray(g_upper["alphas_reduce"][...])[:, 1:] != 0)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(g_lower))
  # Edge 3 of the normal cell (cell 0) owns its rows of every stacked leaf.
  labels = few_shot.edge_labels(model, params.lower)
  target = gm.edge_label("normal", 3, edges)
  owned = 0
  for g, label in zip(jax.tree.leaves(g_lower), jax.tree.leaves(labels)):
    on_edge = np.broadcast_to(label == target, g.shape)
    owned += on_edge.sum()
    np.testing.assert_array_equal(np.asarray(g)[on_edge], 0)
  assert owned > 0
  g_sep = g_lower["cells"][0]["stacks"][0][0]["weights"][
      "sep_conv_3x3.pw1"][...]
  assert np.all(np.any(np.asarray(g_sep) != 0, axis=(1, 2)))  # edges 0, 1
  assert {int(x) for leaf in jax.tree.leaves(labels) for x in
          np.unique(leaf)} == ({gm.SHARED} | {gm.edge_label(k, e, edges)
                                for k in darts.CELL_KINDS
                                for e in range(edges)})


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
