"""ScaleBiO against closed forms (R4) and its definition; LISA block masks.

The contract (jit, dtypes, sharding, checkpoint resume, donation, wrappers)
is checked by the ``scalebio`` row of ``test_contract.py``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import bilevel
from bilevel import reference_problems
from models import moe_lm


def _r4(dtype=jnp.float32):
  return reference_problems.r4(jax.random.key(0), dtype=dtype)


def _run(tx, ref, steps, params=None):
  params = ref.init if params is None else params
  state = tx.init(params)
  step = bilevel.make_step(tx, ref.problem)
  for _ in range(steps):
    params, state, metrics = step(params, state, ref.batches)
  return params, state, metrics


def test_r4_recovers_the_source_weights():
  ref = _r4()
  tx = bilevel.scalebio(10.0, upper_optimizer=optax.sgd(1.0),
                        lower_optimizer=optax.sgd(1 / 11),
                        copy_optimizer=optax.sgd(0.1))
  params, state, metrics = _run(tx, ref, 1500)
  np.testing.assert_allclose(jax.nn.softmax(params.upper),
                             [0.4, 0.3, 0.2, 0.1], atol=1e-3)
  # At the realisable optimum w = c_val and u = w*(λ) = w: no penalty left.
  assert float(metrics["outer_loss"]) < 1e-6
  assert abs(float(state[0].lower_gap)) < 1e-5


def _penalised_direction(alpha):
  """``d_p`` at ``w_α`` and ``u*`` for fixed ``p``, and ``∇_p Φ``."""
  with jax.enable_x64(True):
    ref = _r4(jnp.float64)
    p = jnp.asarray([0.3, -0.2, 0.1, -0.4])
    # SGD with 1/curvature reaches w_α (curvature 1 + α) and u* (α) in a
    # step; p stays put.
    tx = bilevel.scalebio(alpha, upper_optimizer=optax.set_to_zero(),
                          lower_optimizer=optax.sgd(1 / (1 + alpha)),
                          copy_optimizer=optax.sgd(1 / alpha))
    params, state, _ = _run(tx, ref, 3, bilevel.Params(p, ref.init.lower))
    outer_grads = jax.grad(lambda q: ref.problem.outer_loss(
        q.upper, q.lower, ref.batches["outer_batch"]))(params)
    solver = bilevel.scale_by_scalebio(alpha, optax.sgd(1 / alpha))
    directions, _ = solver.update(outer_grads, state[0], params,
                                  inner_loss=ref.problem.inner_loss,
                                  **ref.batches)
    return np.asarray(directions.upper), np.asarray(ref.hypergradient(p))


def test_penalty_error_falls_like_one_over_alpha():
  """R4: ``‖d_p(α) − ∇_pΦ‖ ≈ C/α`` (reference: 0.073, 0.008, 0.0008)."""
  errors = []
  for alpha in (10.0, 100.0, 1000.0):
    got, want = _penalised_direction(alpha)
    errors.append(np.linalg.norm(got - want))
  ratios = np.asarray(errors[:-1]) / np.asarray(errors[1:])
  assert np.all((ratios > 8) & (ratios < 12)), (errors, ratios)
  assert errors[-1] < 1e-3, errors


def test_directions_and_copy_step_match_their_definition():
  """Steps 1-3 of the module docstring, in closed form on R4."""
  with jax.enable_x64(True):
    ref = _r4(jnp.float64)
    c = np.asarray(ref.batches["inner_batch"]["centres"])
    target = np.asarray(ref.batches["outer_batch"]["target"])
    key_p, key_w, key_u = jax.random.split(jax.random.key(1), 3)
    p = jax.random.normal(key_p, (4,), jnp.float64)
    w = jax.random.normal(key_w, (6,), jnp.float64)
    u = jax.random.normal(key_u, (6,), jnp.float64)
    alpha, copy_lr = 7.0, 0.03
    tx = bilevel.scale_by_scalebio(alpha, optax.sgd(copy_lr))
    params = bilevel.Params(p, w)
    state = tx.init(params)._replace(copy=u)
    outer_grads = bilevel.Params(jnp.zeros(4), w - target)
    directions, new_state = tx.update(
        outer_grads, state, params, inner_loss=ref.problem.inner_loss,
        **ref.batches)

  p, w, u = np.asarray(p), np.asarray(w), np.asarray(u)
  lam = np.exp(p) / np.exp(p).sum()
  jac = np.diag(lam) - np.outer(lam, lam)
  losses = lambda v: 0.5 * ((v - c) ** 2).sum(-1)
  grad_l2 = lambda v: lam @ (v - c)
  np.testing.assert_allclose(directions.lower,
                             (w - target) + alpha * grad_l2(w), rtol=1e-12)
  np.testing.assert_allclose(directions.upper,
                             alpha * jac @ (losses(w) - losses(u)),
                             rtol=1e-10)
  np.testing.assert_allclose(new_state.copy,
                             u - copy_lr * alpha * grad_l2(u), rtol=1e-12)
  np.testing.assert_allclose(new_state.lower_gap,
                             lam @ (losses(w) - losses(u)), rtol=1e-6)


def test_alpha_schedule_and_clipping():
  ref = _r4()
  schedule = lambda k: 10.0 * 2.0 ** k
  tx = bilevel.scale_by_scalebio(schedule, optax.sgd(0.1),
                                 clip_at_alpha=True)
  params = bilevel.Params(ref.init.upper, ref.init.lower + 5.0)
  state = tx.init(params)
  grads = jax.grad(lambda q: ref.problem.outer_loss(
      q.upper, q.lower, ref.batches["outer_batch"]))(params)
  for k in range(3):
    directions, state = tx.update(grads, state, params,
                                  inner_loss=ref.problem.inner_loss,
                                  **ref.batches)
    assert float(state.alpha) == schedule(k)
    np.testing.assert_allclose(optax.tree.norm(directions.lower),
                               schedule(k), rtol=1e-5)


def test_source_weighted_loss_matches_a_loop():
  losses = jnp.asarray([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
  sources = jnp.asarray([0, 2, 2, 0, 2, 1])
  logits = jnp.asarray([0.5, -1.0, 0.2, 3.0])  # source 3 absent
  lam = np.exp(logits) / np.exp(logits).sum()
  want = lam[0] * 2.5 + lam[1] * 6.0 + lam[2] * (2 + 3 + 5) / 3
  np.testing.assert_allclose(
      bilevel.source_weighted_loss(losses, sources, logits), want,
      rtol=1e-6)
  grad = jax.grad(bilevel.source_weighted_loss, argnums=2)(losses, sources,
                                                           logits)
  means = np.asarray([2.5, 6.0, 10 / 3, 0.0])
  np.testing.assert_allclose(grad, lam * means - lam * (lam @ means),
                             rtol=1e-5)


def test_source_weighted_loss_refuses_bad_ids_and_shapes():
  losses = jnp.ones(4)
  out_of_range = bilevel.source_weighted_loss(
      losses, jnp.asarray([0, 1, 2, 7]), jnp.zeros(3))
  assert np.isnan(out_of_range)
  with pytest.raises(ValueError, match="sources"):
    bilevel.source_weighted_loss(jnp.ones((2, 2)), jnp.zeros(4, int),
                                 jnp.zeros(3))


# LISA on a blocky lower level: leaves outside 'blocks' always train.


def _blocky_problem(num_blocks=4, dim=3):
  keys = jax.random.split(jax.random.key(2), num_blocks + 1)
  lower = {"embed": jnp.ones(dim),
           "blocks": [jax.random.normal(k, (dim,)) for k in keys[1:]]}

  def inner(p, w, batch):
    total = w["embed"] + sum(w["blocks"])
    losses = 0.5 * jnp.sum((total - batch["centres"]) ** 2, -1)
    return bilevel.source_weighted_loss(losses, batch["sources"], p)

  def outer(p, w, batch):
    del p
    return 0.5 * jnp.sum((w["embed"] + sum(w["blocks"]) - batch) ** 2)

  batches = {"outer_batch": jnp.full([dim], 0.5),
             "inner_batch": {"centres": jax.random.normal(keys[0], (2, dim)),
                             "sources": jnp.asarray([0, 1])}}
  return (bilevel.Problem(outer, inner), bilevel.Params(jnp.zeros(2), lower),
          batches)


def _moved(before, after):
  return [bool(jnp.any(a != b)) for a, b in zip(before["blocks"],
                                                after["blocks"])]


def test_lisa_trains_the_drawn_blocks_only():
  problem, init, batches = _blocky_problem()
  params = init
  lisa = bilevel.Lisa(num_blocks=4, num_active=2, every=3)
  tx = bilevel.scalebio(10.0, upper_optimizer=optax.sgd(0.1),
                        lower_optimizer=optax.adamw(1e-2),
                        lisa=lisa, seed=3)
  state = tx.init(params)
  step = bilevel.make_step(tx, problem)
  draws = []
  for _ in range(9):
    before, copy_before = params.lower, state[0].copy
    params, state, _ = step(params, state, batches)
    solver = state[0]
    model, copy = np.asarray(solver.model_blocks), np.asarray(
        solver.copy_blocks)
    assert model.sum() == 2 and copy.sum() == 2
    assert _moved(before, params.lower) == list(model)
    assert _moved(copy_before, solver.copy) == list(copy)
    assert bool(jnp.all(before["embed"] != params.lower["embed"]))
    draws.append((tuple(model), tuple(copy)))
  assert draws[0] == draws[1] == draws[2] != draws[3]
  assert len(set(draws)) == 3
  # The draw is a pure function of (seed, step): the same on a fresh run.
  fresh = bilevel.scalebio(10.0, upper_optimizer=optax.sgd(0.1),
                           lower_optimizer=optax.adamw(1e-2), lisa=lisa,
                           seed=3)
  _, again, _ = _run_blocky(fresh, problem, init, batches, 9)
  np.testing.assert_array_equal(again[0].model_blocks, model)


def _run_blocky(tx, problem, params, batches, steps):
  state = tx.init(params)
  step = bilevel.make_step(tx, problem)
  for _ in range(steps):
    params, state, metrics = step(params, state, batches)
  return params, state, metrics


def test_lisa_holds_the_frozen_blocks_optimizer_state():
  problem, params, batches = _blocky_problem()
  lisa = bilevel.Lisa(num_blocks=4, num_active=1, every=100)
  tx = bilevel.scalebio(10.0, upper_optimizer=optax.sgd(0.1),
                        lower_optimizer=optax.adam(1e-2), lisa=lisa)
  _, state, _ = _run_blocky(tx, problem, params, batches, 2)
  active = np.asarray(state[0].model_blocks)
  adam = state[1].lower[0]
  for b, is_active in enumerate(active):
    assert bool(jnp.any(adam.mu["blocks"][b] != 0)) == is_active
  assert bool(jnp.all(adam.mu["embed"] != 0))


def test_lisa_refuses_a_block_structure_it_cannot_see():
  problem, params, batches = _blocky_problem()
  for lisa in (bilevel.Lisa(num_blocks=5), bilevel.Lisa(num_blocks=3)):
    tx = bilevel.scalebio(10.0, upper_optimizer=optax.sgd(0.1),
                          lower_optimizer=optax.sgd(0.1), lisa=lisa)
    with pytest.raises(ValueError, match="block_of found blocks"):
      bilevel.make_step(tx, problem)(params, tx.init(params), batches)
  with pytest.raises(ValueError, match="num_active"):
    bilevel.scalebio(1.0, upper_optimizer=optax.sgd(0.1),
                     lower_optimizer=optax.sgd(0.1),
                     lisa=bilevel.Lisa(num_blocks=2, num_active=3))


def test_lisa_blocks_of_the_language_model():
  """Every block of the LM is found; embedding, final norm, head are not."""
  config = moe_lm.MoeLMConfig(ffn="dense", dim=16, num_layers=3,
                              num_heads=2, num_experts=2, expert_hidden=8)
  _, state = nnx.split(moe_lm.MoeLM(config, rngs=nnx.Rngs(0)))
  block_of = bilevel.lisa_blocks_by_index()
  found = {}
  for path, _ in jax.tree.flatten_with_path(state)[0]:
    found.setdefault(block_of(path), []).append(path)
  assert sorted(k for k in found if k is not None) == [0, 1, 2]
  outside = {str(path[0]) for path in found[None]}
  assert all(any(name in s for name in ("embed", "final_norm", "head"))
             for s in outside), outside
