"""GM-NAS split machinery against closed forms and plain enumerations.

The "supernet" is linear: ``f(x) = sum_{c,e,o} m[c,e,o] (x M[c,e,o] w +
s[c,o] x u[c,e]) + b`` with squared loss, so every gradient is a numpy
one-liner: ``w`` is shared, ``u[c, e]`` belongs to edge ``(c, e)`` and ``b``
is labelled EXCLUDED.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.darts import gradient_matching as gm

E, K, D, R, B = 3, 4, 5, 3, 6  # edges, ops, features, batches, examples


def _problem(seed=0, edge_scale=1.0):
  rng = np.random.default_rng(seed)
  consts = {"M": rng.normal(size=(2, E, K, D, D)) / D,
            "s": rng.normal(size=(2, K)) * edge_scale}
  weights = {"w": rng.normal(size=D), "b": np.float64(0.3),
             "u": {c: rng.normal(size=(E, D)) for c in gm.CELL_TYPES}}
  batches = {"x": rng.normal(size=(R, B, D)), "y": rng.normal(size=(R, B))}
  return consts, weights, batches


def _labels(weights):
  def label(path, leaf):
    del leaf
    keys = [p.key for p in path]
    if keys[0] == "u":
      return gm.edge_label(keys[1], np.arange(E)[:, None], E)
    return gm.EXCLUDED if keys[0] == "b" else gm.SHARED
  return gm.label_leaves(weights, label)


def _make_grad_fn(consts):
  M = jnp.asarray(consts["M"], jnp.float32)
  s = jnp.asarray(consts["s"], jnp.float32)

  def loss(weights, masks, batch):
    m = jnp.stack([masks[c] for c in gm.CELL_TYPES]).astype(jnp.float32)
    u = jnp.stack([weights["u"][c] for c in gm.CELL_TYPES])
    f = (jnp.einsum("ceo,bi,ceoij,j->b", m, batch["x"], M, weights["w"])
         + jnp.einsum("ceo,co,bi,cei->b", m, s, batch["x"], u)
         + weights["b"])
    return 0.5 * jnp.mean((f - batch["y"]) ** 2)
  return jax.grad(loss)


def _numpy_grads(consts, weights, m, x, y):
  """Closed-form gradients of the linear supernet; ``m``: [2, E, K]."""
  M, s = consts["M"], consts["s"]
  u = np.stack([weights["u"][c] for c in gm.CELL_TYPES])
  m_sum = np.einsum("ceo,ceoij->ij", m, M)
  u_coef = np.einsum("ceo,co->ce", m, s)
  f = x @ m_sum @ weights["w"] + x @ np.einsum("ce,cei->i", u_coef, u)
  f = f + weights["b"]
  xr = x.T @ (f - y) / len(y)
  return {"w": m_sum.T @ xr, "u": u_coef[..., None] * xr,
          "b": np.mean(f - y)}


def _numpy_scores(consts, weights, masks, cell, edge, batches, *,
                  include_edge=False, average="scores"):
  c = gm.CELL_TYPES.index(cell)
  base = np.stack([np.asarray(masks[n]) for n in gm.CELL_TYPES]).astype(float)
  ops = np.flatnonzero(base[c, edge])
  keep = np.ones((2, E), bool)
  keep[c, edge] = include_edge
  per_batch = []
  for r in range(R):
    vecs = []
    for o in ops:
      m = base.copy()
      m[c, edge] = np.eye(K)[o]
      g = _numpy_grads(consts, weights, m, batches["x"][r], batches["y"][r])
      vecs.append(np.concatenate([g["w"], g["u"][keep].ravel()]))
    per_batch.append(np.array(vecs))
  if average == "gradients":
    per_batch = [np.mean(per_batch, axis=0)]
  cos = []
  for v in per_batch:
    n = np.linalg.norm(v, axis=1)
    cos.append(v @ v.T / np.outer(n, n))
  return np.mean(cos, axis=0)


def _parent_masks():
  masks = gm.op_masks_full(E, K)
  return gm.restrict_edge(masks, "reduce", 2, gm.ops_row((1, 3), K))


def test_scores_equal_the_closed_form_and_one_compile_serves_all_edges():
  consts, weights, batches = _problem()
  grad_fn, labels = _make_grad_fn(consts), _labels(weights)
  masks = _parent_masks()
  cases = [("normal", 1), ("reduce", 0), ("reduce", 2), ("normal", 2)]
  compiled = None
  for cell, edge in cases:
    got = gm.gradient_matching_scores(grad_fn, weights, masks, cell, edge,
                                      batches, labels)
    want = _numpy_scores(consts, weights, masks, cell, edge, batches)
    np.testing.assert_allclose(got, want, atol=1e-6, err_msg=f"{cell} {edge}")
    compiled = compiled or gm.gradient_matching_matrix._cache_size()
  assert got.shape == (K, K)
  split = gm.gradient_matching_scores(grad_fn, weights, masks, "reduce", 2,
                                      batches, labels)
  assert split.shape == (2, 2)  # the two ops left on the split edge
  assert gm.gradient_matching_matrix._cache_size() == compiled
  mapped = gm.gradient_matching_scores(grad_fn, weights, masks, "normal", 2,
                                       batches, labels, op_batching="map")
  np.testing.assert_allclose(mapped, got, atol=1e-6)


def test_scores_exclude_the_considered_edge_and_average_scores():
  consts, weights, batches = _problem(seed=1, edge_scale=5.0)
  grad_fn, labels = _make_grad_fn(consts), _labels(weights)
  masks = _parent_masks()
  got = np.asarray(gm.gradient_matching_scores(
      grad_fn, weights, masks, "normal", 0, batches, labels))
  kw = dict(consts=consts, weights=weights, masks=masks, cell="normal",
            edge=0, batches=batches)
  np.testing.assert_allclose(got, _numpy_scores(**kw), atol=1e-6)
  # What a wrong implementation would return must differ measurably.
  assert np.abs(got - _numpy_scores(**kw, include_edge=True)).max() > 1e-2
  assert np.abs(got - _numpy_scores(**kw, average="gradients")).max() > 1e-2


def _brute_force(sim, groups, min_size, objective):
  n, best = len(sim), None
  for assign in itertools.product(range(groups), repeat=n):
    sizes = [assign.count(g) for g in range(groups)]
    if min(sizes) < min_size:
      continue
    cost = 0.0
    for i in range(n):
      for j in range(i + 1, n):
        same = assign[i] == assign[j]
        if objective == "cut" and not same:
          cost += sim[i, j]
        if objective == "within_distance" and same:
          cost += 1 - sim[i, j]
    if best is None or cost < best[0]:
      best = (cost, assign)
  groups_ = {frozenset(i for i in range(n) if best[1][i] == g)
             for g in range(groups)}
  return best[0], groups_


def _official_within_distance(dist):
  """``mincut_split_darts``, written out: subsets of size 2..n//2."""
  n, best = len(dist), (np.inf, None)
  for size in range(2, n // 2 + 1):
    for subset in itertools.combinations(range(n), size):
      cost = sum(dist[i, j] for i, j in itertools.combinations(range(n), 2)
                 if (i in subset) == (j in subset))
      if cost < best[0]:
        best = (cost, (subset, tuple(i for i in range(n) if i not in subset)))
  return best


@pytest.mark.parametrize("n", [4, 5, 6, 7, 8])
def test_min_cut_equals_brute_force(n):
  rng = np.random.default_rng(n)
  a = rng.uniform(-1, 1, size=(n, n))
  sim = (a + a.T) / 2
  np.fill_diagonal(sim, 1.0)
  settings = [(2, 1, "cut"), (2, 2, "cut"), (2, 1, "within_distance")]
  if n <= 6:
    settings.append((3, 1, "cut"))
  for groups, min_size, objective in settings:
    part = gm.min_cut_partition(sim, groups, objective=objective,
                                min_group_size=min_size)
    cost, want = _brute_force(sim, groups, min_size, objective)
    assert part.cost == pytest.approx(cost, abs=1e-12)
    assert set(map(frozenset, part.groups)) == want
    np.testing.assert_array_equal(
        [[i in g for i in range(n)] for g in part.groups],
        [[l == k for l in part.labels] for k in range(groups)])
  official = _official_within_distance(1 - sim)
  part = gm.min_cut_partition(sim, objective="within_distance",
                              min_group_size=2)
  assert part.cost == pytest.approx(official[0], abs=1e-12)
  assert part.groups == official[1]


def test_objectives_disagree():
  # Ops {0, 1} agree (0.9), {2, 3, 4, 5} agree weakly (0.2), across: 0.
  sim = np.zeros((6, 6))
  sim[:2, :2] = 0.9
  sim[2:, 2:] = 0.2
  np.fill_diagonal(sim, 1.0)
  cut = gm.min_cut_partition(sim, objective="cut", min_group_size=2)
  code = gm.min_cut_partition(sim, objective="within_distance",
                              min_group_size=2)
  assert cut.groups == ((0, 1), (2, 3, 4, 5)) and cut.cost == 0.0
  # The code's scalar prefers 3 + 3 (6 pairs within) over 2 + 4 (7 pairs).
  assert code.groups == ((0, 1, 2), (3, 4, 5))
  assert code.cost == pytest.approx(6 - 0.9 - 3 * 0.2)
  # ... whose cut (0.6) is worse, while 2 + 4 costs the code 7 - 0.9 - 1.2.
  assert gm.min_cut_partition(sim, objective="cut", min_group_size=3).cost \
      == pytest.approx(0.6)


def test_split_encode_round_trip():
  full = gm.op_masks_full(E, K)
  children = gm.split_supernet(full, "reduce", 1, ((0, 3), (1, 2)))
  assert len(children) == 2
  grandchildren = gm.split_supernet(children[1], "normal", 2, ((2,), (0, 1, 3)))
  for child, group in zip(grandchildren, ((2,), (0, 1, 3))):
    assert gm.split_edges(child) == (("normal", 2, group),
                                     ("reduce", 1, (1, 2)))
    code = gm.encode_masks(child)
    assert code.dtype == np.int32 and code.shape == (2, E)
    back = gm.decode_masks(code, K)
    for c in gm.CELL_TYPES:
      np.testing.assert_array_equal(back[c], child[c])
  assert gm.encode_masks(full).tolist() == [[2**K - 1] * E] * 2
  assert gm.unsplit_edges(grandchildren[0], "normal") == (0, 1)
  union = np.logical_or(*[np.asarray(c["reduce"]) for c in children])
  np.testing.assert_array_equal(union, np.asarray(full["reduce"]))
  for bad in [((0, 1), (1, 2, 3)), ((0, 1), (2,)), ((), (0, 1, 2, 3))]:
    with pytest.raises(ValueError, match="non-empty disjoint"):
      gm.split_supernet(full, "normal", 0, bad)
  with pytest.raises(ValueError, match="non-empty disjoint"):
    gm.split_supernet(children[0], "reduce", 1, ((0,), (1, 3)))
  tree = {"w": jnp.arange(3.0), "opt": (jnp.zeros(2), jnp.int32(4))}
  copies = gm.replicate_pytree(tree, 2)
  assert len(copies) == 2 and copies[0]["w"] is not tree["w"]
  for copy in copies:
    jax.tree.map(np.testing.assert_array_equal, copy, tree)


def test_choose_edge():
  masks = gm.split_supernet(gm.op_masks_full(E, K), "normal", 0,
                            ((0, 1), (2, 3)))[0]
  agree = np.full((K, K), 0.8)
  clear = np.array([[1, .9, -.5, -.5], [.9, 1, -.5, -.5],
                    [-.5, -.5, 1, .9], [-.5, -.5, .9, 1]])
  table = {("reduce", 2): clear}
  calls = []

  def similarity(cell, edge):
    calls.append((cell, edge))
    return table.get((cell, edge), agree)

  choice = gm.choose_edge(masks, similarity, edge_crit="grad")
  assert (choice.cell, choice.edge) == ("reduce", 2)
  assert choice.groups == ((0, 1), (2, 3)) and choice.cost == -2.0
  assert ("normal", 0) not in calls and len(calls) == 2 * E - 1
  assert np.isnan(choice.edge_costs[0, 0])
  assert choice.edge_costs[0, 1] == pytest.approx(0.8 * 3)
  normal_only = gm.choose_edge(masks, similarity, cells=("normal",))
  assert (normal_only.cell, normal_only.edge) == ("normal", 1)  # first tie
  picks = set()
  for i in range(40):
    calls.clear()
    c = gm.choose_edge(masks, similarity, edge_crit="rand",
                       key=jax.random.key(i))
    assert calls == [(c.cell, c.edge)]
    picks.add((c.cell, c.edge))
  assert picks == {(c, e) for c in gm.CELL_TYPES for e in range(E)} - {
      ("normal", 0)}
  same = [gm.choose_edge(masks, similarity, edge_crit="rand",
                         key=jax.random.key(7))[:2] for _ in range(2)]
  assert same[0] == same[1]
  with pytest.raises(ValueError, match="PRNG key"):
    gm.choose_edge(masks, similarity, edge_crit="rand")


def _official_moving_avg(values):
  avg = 0
  for i, v in enumerate(values):
    avg = avg * i * 0.1 + float(v) * 0.9
    avg = avg / (i + 1)
  return avg


def test_successive_halving_on_a_hand_table():
  # 8 candidates x 6 epochs; rounds over epochs [0, 3) then [3, 6).
  acc = np.array([
      [50, 60, 70, 70, 71, 72],   # 0: good late
      [80, 80, 40, 90, 90, 90],   # 1: best mean in round 1, last epoch bad
      [60, 61, 62, 60, 60, 60],   # 2
      [10, 20, 80, 80, 80, 95],   # 3: last epoch best
      [65, 66, 67, 10, 10, 10],   # 4
      [30, 30, 30, 30, 30, 30],   # 5
      [55, 55, 55, 55, 55, 99],   # 6
      [64, 64, 64, 64, 64, 64],   # 7
  ], float)
  np.testing.assert_allclose(
      gm.moving_average_accuracy(acc),
      [_official_moving_avg(row) for row in acc], rtol=1e-12)
  first, second = gm.successive_halving(acc, ((0, 3), (3, 6)))
  # Round 1 ranks by ~the last epoch: 3 (80), 0 (70), 4 (67), 7 (64); the
  # plain mean would rank 1 (66.7) first and drop 3 (36.7).
  assert first.tolist() == [3, 0, 4, 7]
  assert second.tolist() == [3, 0]
  with pytest.raises(ValueError, match="outside"):
    gm.successive_halving(acc, ((0, 3), (3, 7)))
