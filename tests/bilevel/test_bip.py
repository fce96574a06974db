"""BiP: the implicit gradient (R5), support recovery, straight-through masks."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bilevel

GAMMA = 0.5


def _linear_loss(m, theta, c):
  return c @ (m * theta)


def _r5(dim=6, dtype=jnp.float64):
  """R5: ℓ(z) = cᵀz, θ*(m) = −(m ⊙ c)/γ (float64 needs ``enable_x64``)."""
  keys = jax.random.split(jax.random.key(0))
  c = jax.random.normal(keys[0], (dim,), dtype)
  m = jax.random.uniform(keys[1], (dim,), dtype, 0.1, 0.9)
  return c, m, -(m * c) / GAMMA


def _bip_upper(c, m, theta, **kwargs):
  tx = bilevel.scale_by_bip(gamma=GAMMA, **kwargs)
  params = bilevel.Params(m, theta)
  updates, _ = tx.update(None, tx.init(params), params,
                         outer_loss=_linear_loss, inner_loss=_linear_loss,
                         outer_batch=c, inner_batch=c)
  return updates


def test_r5_implicit_gradient_is_exact():
  with jax.enable_x64(True):
    c, m, theta = _r5()
    updates = _bip_upper(c, m, theta)
    exact = -(2 / GAMMA) * m * c ** 2
    np.testing.assert_allclose(updates.upper, exact, rtol=1e-6)
    # At θ*(m), the lower direction ∇_θ g vanishes.
    np.testing.assert_allclose(updates.lower, 0.0, atol=1e-12)


def test_r5_matches_scale_by_implicit():
  with jax.enable_x64(True):
    c, m, theta = _r5()
    inner = lambda m, t, c: _linear_loss(m, t, c) + 0.5 * GAMMA * t @ t
    tx = bilevel.scale_by_implicit(
        optax.sgd(0.1), 1,
        inner_solver=lambda upper, lower, c: -(upper * c) / GAMMA)
    params = bilevel.Params(m, theta)
    reference, _ = tx.update(None, tx.init(params), params,
                             outer_loss=_linear_loss, inner_loss=inner,
                             outer_batch=c, inner_batch=c)
    np.testing.assert_allclose(_bip_upper(c, m, theta).upper,
                               reference.upper, rtol=1e-6)


def test_without_correction_is_the_first_order_gradient():
  with jax.enable_x64(True):
    c, m, theta = _r5()
    first_order = _bip_upper(c, m, theta, correction=False).upper
    np.testing.assert_allclose(first_order, -(1 / GAMMA) * m * c ** 2,
                               rtol=1e-6)
    assert not np.allclose(first_order, _bip_upper(c, m, theta).upper)


@pytest.mark.parametrize("correction", [True, False])
def test_sequential_order_takes_the_ig_after_the_theta_step(correction):
  """Algorithm A1 by hand on ℓ(z) = cᵀz, at a θ off the lower optimum."""
  alpha, beta = 0.3, 0.7
  with jax.enable_x64(True):
    c, m, _ = _r5()
    theta = jax.random.normal(jax.random.key(5), c.shape, jnp.float64)
    scale = 1 / GAMMA if correction else 0.0
    theta_next = theta - alpha * (m * c + GAMMA * theta)
    expected_upper = -beta * (theta_next * c - scale * m * c ** 2)
    params = bilevel.Params(m, theta)
    extra = dict(outer_loss=_linear_loss, inner_loss=_linear_loss,
                 outer_batch=c, inner_batch=c)
    updates = {}
    for sequential in (True, False):
      tx = bilevel.bip(optax.sgd(beta), optax.sgd(alpha), gamma=GAMMA,
                       relaxed=False, mask_fn=lambda s: s,
                       correction=correction, sequential=sequential)
      updates[sequential], _ = tx.update(None, tx.init(params), params,
                                         **extra)
    np.testing.assert_allclose(updates[True].upper, expected_upper,
                               rtol=1e-12)
    np.testing.assert_allclose(updates[True].lower, theta_next - theta,
                               rtol=1e-12)
    # The simultaneous order differs by β·(θ' − θ) ⊙ c, first order in α.
    np.testing.assert_allclose(
        updates[True].upper - updates[False].upper,
        -beta * (theta_next - theta) * c, rtol=1e-9)
    np.testing.assert_array_equal(updates[True].lower, updates[False].lower)


def test_bip_alias_argument_errors():
  with pytest.raises(ValueError, match="budget is required"):
    bilevel.bip(optax.sgd(1.0), optax.sgd(1.0), gamma=1.0)
  with pytest.raises(ValueError, match="mask_fn applies to scores"):
    bilevel.bip(optax.sgd(1.0), optax.sgd(1.0), gamma=1.0, budget=2,
                mask_fn=lambda s: s)


def test_upper_steps_every_lower_steps():
  c, m, theta = _r5(dtype=jnp.float32)
  tx = bilevel.scale_by_bip(gamma=GAMMA, lower_steps=3)
  params, state = bilevel.Params(m, theta), tx.init(bilevel.Params(m, theta))
  taken = []
  for _ in range(6):
    updates, state = tx.update(None, state, params, outer_loss=_linear_loss,
                               inner_loss=_linear_loss, outer_batch=c,
                               inner_batch=c)
    taken.append(bool(jnp.any(updates.upper != 0)))
  assert taken == [False, False, True] * 2


def test_structured_mask_sums_over_its_group():
  with jax.enable_x64(True):
    c, m, theta = _r5(dim=6)
    c, theta = c.reshape(2, 3), theta.reshape(2, 3)
    column = m[:3].reshape(1, 3)
    loss = lambda m, t, c: jnp.sum(c * m * t)
    tx = bilevel.scale_by_bip(gamma=GAMMA)
    params = bilevel.Params(column, theta)
    updates, _ = tx.update(None, tx.init(params), params, outer_loss=loss,
                           inner_loss=loss, outer_batch=c, inner_batch=c)
    z_grad = c
    expected = jnp.sum(z_grad * (theta - column * z_grad / GAMMA), axis=0,
                       keepdims=True)
    np.testing.assert_allclose(updates.upper, expected, rtol=1e-6)


def _squared_loss(m, theta, batch):
  x, y = batch
  return 0.5 * jnp.sum((x @ (m * theta) - y) ** 2)


def test_support_recovery_on_orthogonal_design():
  n, d, k = 40, 20, 4
  keys = jax.random.split(jax.random.key(1), 3)
  x, _ = jnp.linalg.qr(jax.random.normal(keys[0], (n, d)))
  support = jax.random.choice(keys[1], d, (k,), replace=False)
  signs = jnp.sign(jax.random.normal(keys[2], (k,)))
  theta0 = jnp.zeros(d).at[support].set(signs * jnp.linspace(1.0, 2.0, k))
  batch = (x, x @ theta0)
  problem = bilevel.Problem(_squared_loss, _squared_loss)
  tx = bilevel.bip(optax.sgd(0.1), optax.sgd(0.5), gamma=0.1, budget=k)
  params = bilevel.Params(jnp.full(d, 0.5 * k / d), jnp.zeros(d))
  state = tx.init(params)
  step = bilevel.make_step(tx, problem)
  for _ in range(300):
    params, state, _ = step(params, state, dict(outer_batch=batch,
                                                inner_batch=batch))
  mask = bilevel.binarize(params.upper, k)
  np.testing.assert_array_equal(mask, (theta0 != 0).astype(mask.dtype))
  assert jnp.all((params.upper >= 0) & (params.upper <= 1))
  assert jnp.sum(params.upper) <= k + 1e-5


def test_straight_through_scores_get_the_implicit_gradient_of_the_mask():
  c, _, theta = _r5(dtype=jnp.float32)
  scores = jax.random.normal(jax.random.key(3), c.shape)
  extra = dict(outer_loss=_linear_loss, inner_loss=_linear_loss,
               outer_batch=c, inner_batch=c)
  hard = bilevel.topk_mask(scores, 3)
  relaxed = bilevel.scale_by_bip(gamma=GAMMA)
  expected, _ = relaxed.update(None, relaxed.init(None),
                               bilevel.Params(hard, theta), **extra)
  scored = bilevel.scale_by_bip(gamma=GAMMA, mask_fn=functools.partial(
      bilevel.straight_through_topk, k=3))
  got, _ = scored.update(None, scored.init(None),
                         bilevel.Params(scores, theta), **extra)
  jax.tree.map(np.testing.assert_array_equal, got, expected)


def _scores():
  keys = jax.random.split(jax.random.key(2))
  return {"a": jax.random.normal(keys[0], (4, 5)),
          "b": jnp.round(jax.random.normal(keys[1], (7,)))}  # has ties


def test_topk_mask_global_count_and_ties():
  mask = bilevel.topk_mask(_scores(), 9)
  assert sum(int(jnp.sum(m)) for m in jax.tree.leaves(mask)) == 9
  ties = bilevel.topk_mask(jnp.ones(5), 2)
  np.testing.assert_array_equal(ties, [1, 1, 0, 0, 0])
  with pytest.raises(ValueError, match="k="):
    bilevel.topk_mask(jnp.ones(5), 6)


def test_topk_mask_per_leaf_counts():
  mask = bilevel.topk_mask_per_leaf(_scores(), 0.3)
  assert int(jnp.sum(mask["a"])) == 6 and int(jnp.sum(mask["b"])) == 2


@pytest.mark.parametrize("make", [
    functools.partial(bilevel.straight_through_topk, k=9),
    functools.partial(bilevel.straight_through_topk_per_leaf, fraction=0.3),
])
def test_straight_through_forward_hard_backward_identity(make):
  scores = _scores()
  hard = make(scores)
  for leaf in jax.tree.leaves(hard):
    assert set(np.unique(np.asarray(leaf))) <= {0.0, 1.0}
  cotangent = jax.tree.map(lambda s: jnp.arange(s.size, dtype=s.dtype)
                           .reshape(s.shape), scores)
  grads = jax.grad(lambda s: sum(
      jnp.vdot(w, m) for w, m in zip(jax.tree.leaves(cotangent),
                                      jax.tree.leaves(make(s)))))(scores)
  jax.tree.map(np.testing.assert_array_equal, grads, cotangent)


def test_binarize_keeps_k_largest():
  m = jnp.array([0.1, 0.9, 0.4, 0.8, 0.0])
  np.testing.assert_array_equal(bilevel.binarize(m, 2), [0, 1, 0, 1, 0])
