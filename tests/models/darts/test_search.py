"""The DARTS / PC-DARTS supernet against the official counts and rules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import bilevel

from models import darts
from models.levels import ArchParam, merge_levels, split_levels


def _count(config):
  model = nnx.eval_shape(lambda: darts.SearchNetwork(config,
                                                     rngs=nnx.Rngs(0)))
  _, params, _ = split_levels(model, ArchParam)
  size = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
  return size(params.lower), size(params.upper)


@pytest.mark.parametrize(("partial", "weights", "arch"),
                         [(None, 1_930_618, 224), (4, 299_578, 252)])
def test_parameter_counts_equal_the_official_ones(partial, weights, arch):
  """quark0/darts and yuhuixu1993/PC-DARTS, C = 16, 8 cells, CIFAR-10."""
  assert _count(darts.SearchConfig(partial_channels=partial)) == (weights,
                                                                  arch)


@pytest.mark.parametrize("partial", [None, 2])
def test_tiny_search_network_runs_and_differentiates(partial):
  config = darts.SearchConfig(channels=4, num_cells=3, num_classes=5,
                              partial_channels=partial)
  model = darts.SearchNetwork(config, rngs=nnx.Rngs(0))
  images = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
  graphdef, params, rest = split_levels(model, ArchParam)

  @jax.jit
  def value_and_grads(upper, lower, rest):
    def loss(upper, lower, rest):
      net = merge_levels(graphdef, bilevel.Params(upper, lower), rest)
      return jnp.mean(net(images, train=True) ** 2)
    return jax.value_and_grad(loss, argnums=(0, 1))(upper, lower, rest)

  value, (g_upper, g_lower) = value_and_grads(params.upper, params.lower,
                                              rest)
  assert np.isfinite(value)
  norms = [float(jnp.linalg.norm(g)) for g in jax.tree.leaves(g_upper)]
  assert len(norms) == (4 if partial else 2) and all(n > 0 for n in norms)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(g_lower))


def test_channel_shuffle_interleaves_groups():
  x = jnp.arange(6.0)[None]
  np.testing.assert_array_equal(darts.channel_shuffle(x, 2),
                                [[0, 3, 1, 4, 2, 5]])
  np.testing.assert_array_equal(darts.channel_shuffle(x, 1), x)


def test_avg_pool_does_not_count_padding():
  from models.darts import ops
  x = jnp.ones((1, 3, 3, 1))
  np.testing.assert_array_equal(ops.avg_pool(x, 3, 1, 1), x)


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
