"""DARTS against the one-step-unrolled hypergradient it approximates.

The contract (jit, dtypes, sharding, checkpoint resume, wrappers) is checked
by the ``darts`` and ``darts_second_order`` rows of ``test_contract.py``.
Here, in float64 on a small supernet of mixed ops: Eq. 7 with the exact
HVP equals ``d/dα L_val(w − ξ∇_w L_train(w, α), α)`` differentiated through
the step; the finite difference is off by its predicted O(fd_scale²)
truncation term; first order, ``d_w``, the ξ schedule, ``v = 0`` and the
argument errors.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import bilevel
from bilevel import reference_problems

EDGES, OPS, WIDTH = 2, 3, 3


def _model(alpha, w, x):
  """Two mixed-op edges ``h ← Σ_k softmax(α_e)_k op_k(h)``, a linear head.

  The ops are ``tanh(hA_e)``, ``hB_e`` and the skip ``h``.
  """
  h = x
  for e in range(EDGES):
    ops = jnp.stack([jnp.tanh(h @ w["conv"][e]), h @ w["linear"][e], h])
    h = jnp.einsum("k,k...->...", jax.nn.softmax(alpha[e]), ops)
  return h @ w["head"]


def _loss(alpha, w, batch):
  return jnp.mean((_model(alpha, w, batch["x"]) - batch["y"]) ** 2)


@functools.cache
def _supernet(dtype=np.float64):
  """``(params, batches)`` as numpy arrays (drawn in float64)."""

  def draw():
    keys = jax.random.split(jax.random.key(0), 6)
    normal = lambda k, shape, scale=1.0: scale * jax.random.normal(
        k, shape, jnp.float64)
    alpha = normal(keys[0], (EDGES, OPS), 0.5)
    w = {"conv": normal(keys[1], (EDGES, WIDTH, WIDTH), 0.7),
         "linear": normal(keys[2], (EDGES, WIDTH, WIDTH), 0.7),
         "head": normal(keys[3], (WIDTH,))}

    def data(kx, rows):
      x = normal(kx, (rows, WIDTH))
      return {"x": x, "y": jnp.sin(x @ jnp.arange(1.0, WIDTH + 1))}

    return bilevel.Params(alpha, w), {"inner_batch": data(keys[4], 16),
                                      "outer_batch": data(keys[5], 12)}

  if dtype != np.float64:
    return jax.tree.map(lambda a: a.astype(dtype), _supernet())
  with jax.enable_x64(True):
    return jax.tree.map(np.asarray, jax.jit(draw)())


def _jit_update(tx):
  """``(params, state, outer_grads, batches) -> (directions, state)``."""
  return jax.jit(lambda p, s, g, b: tx.update(
      g, s, p, outer_loss=_loss, inner_loss=_loss, **b))


def _update(tx, params, batches, outer_grads=None):
  return _jit_update(tx)(params, tx.init(params), outer_grads, batches)


def _virtual_step(alpha, w, batches, xi, decay=0.0):
  grad = jax.grad(_loss, argnums=1)(alpha, w, batches["inner_batch"])
  return jax.tree.map(lambda p, g: p - xi * (g + decay * p), w, grad)


@jax.jit
def _reference(params, batches, xi, decay=0.0):
  """The one-step-unrolled quantities, by reverse mode through the step.

  Returns ``{'hypergradient': d/dα L_val(w′(α), α), 'at_virtual':
  ∇_α L_val(w′, α), 'v': ∇_{w′} L_val(w′, α), 'outer_loss': L_val(w′, α),
  'grad_w': ∇_w L_train(w, α)}``.
  """
  alpha, w = params
  outer_batch = batches["outer_batch"]
  virtual = _virtual_step(alpha, w, batches, xi, decay)
  outer_loss, (at_virtual, v) = jax.value_and_grad(_loss, argnums=(0, 1))(
      alpha, virtual, outer_batch)
  hypergradient = jax.grad(lambda a: _loss(
      a, _virtual_step(a, w, batches, xi, decay), outer_batch))(alpha)
  return dict(hypergradient=hypergradient, at_virtual=at_virtual, v=v,
              outer_loss=outer_loss, grad_w=jax.grad(_loss, argnums=1)(
                  alpha, w, batches["inner_batch"]))


def _assert_close(got, want, rtol):
  got, want = ravel_pytree(got)[0], ravel_pytree(want)[0]
  error = jnp.linalg.norm(got - want) / jnp.linalg.norm(want)
  assert error <= rtol, float(error)


def test_exact_hvp_is_the_one_step_unrolled_hypergradient():
  with jax.enable_x64(True):
    params, batches = _supernet()
    xi, decay = 0.3, 0.1
    tx = bilevel.scale_by_darts(2, virtual_learning_rate=xi, hvp="exact",
                                virtual_weight_decay=decay)
    directions, state = _update(tx, params, batches)
    ref = _reference(params, batches, xi, decay)
    want = ref["hypergradient"]
    # The check has teeth: the second-order term is not small here.
    second_order_term = jnp.linalg.norm(want - ref["at_virtual"])
    assert second_order_term > 0.1 * jnp.linalg.norm(want)
    # Forward-over-reverse against reverse-over-reverse: rounding only.
    _assert_close(directions.upper, want, rtol=1e-10)
    _assert_close(directions.lower, ref["grad_w"], rtol=1e-12)
    np.testing.assert_allclose(state.outer_loss, ref["outer_loss"],
                               rtol=1e-6)
    np.testing.assert_allclose(state.correction_norm, second_order_term,
                               rtol=1e-6)
    assert float(state.fd_eps) == 0.0 and int(state.count) == 1


def test_finite_difference_error_is_its_truncation_term():
  """FD − exact = −ξ(s²/6)‖v‖ T + O(s⁴), ``T = d³/dt³ ∇_α L_train(w + tv̂)``.

  ``s = fd_scale = ε‖v‖``; in float64 the rounding (≈ 1e-16‖∇_α‖‖v‖/s) is
  ten orders below the truncation, so the error matches the leading term
  (measured: to 8e-4 at s = 0.04, the O(s⁴) rest) and quarters each time
  ``s`` halves (measured 4.0006).
  """
  with jax.enable_x64(True):
    params, batches = _supernet()
    xi = 0.3
    ref = _reference(params, batches, xi)
    v_norm = optax.tree.norm(ref["v"])
    alpha, w = params

    @jax.jit
    def third_derivative(v_hat):
      grad_alpha = lambda t: jax.grad(_loss)(
          alpha, jax.tree.map(lambda p, d: p + t * d, w, v_hat),
          batches["inner_batch"])
      return jax.jacfwd(jax.jacfwd(jax.jacfwd(grad_alpha)))(0.0)

    third = third_derivative(jax.tree.map(lambda d: d / v_norm, ref["v"]))
    exact = ref["hypergradient"]

    @jax.jit  # fd_scale traced: one compile for the three.
    def fd_update(fd_scale):
      tx = bilevel.scale_by_darts(2, virtual_learning_rate=xi,
                                  fd_scale=fd_scale)
      return tx.update(None, tx.init(params), params, outer_loss=_loss,
                       inner_loss=_loss, **batches)

    errors = []
    for s in (0.04, 0.02, 0.01):
      directions, state = fd_update(s)
      np.testing.assert_allclose(state.fd_eps, s / v_norm, rtol=1e-6)
      np.testing.assert_allclose(state.virtual_grad_norm, v_norm, rtol=1e-6)
      predicted = -xi * s ** 2 / 6 * v_norm * third
      _assert_close(directions.upper - exact, predicted, rtol=0.01)
      errors.append(float(jnp.linalg.norm(directions.upper - exact)))
    ratios = np.asarray(errors[:-1]) / np.asarray(errors[1:])
    np.testing.assert_allclose(ratios, 4.0, rtol=0.01)
    # At the official fd_scale: 6.7e-6 of the hypergradient here.
    assert errors[-1] < 2e-5 * float(jnp.linalg.norm(exact)), errors


def test_float32_finite_difference_under_jit():
  with jax.enable_x64(True):
    want = np.asarray(_reference(*_supernet(), 0.3)["hypergradient"])
  params, batches = _supernet(np.float32)
  tx = bilevel.scale_by_darts(2, virtual_learning_rate=0.3)
  directions, _ = _update(tx, params, batches)
  assert directions.upper.dtype == jnp.float32
  # float32 rounding amplified by ‖v‖/fd_scale plus the 6.7e-6 truncation
  # above (measured 7.2e-6 in all; the exact HVP: 2e-7).
  _assert_close(directions.upper, want, rtol=1e-4)


def test_first_order_is_the_validation_gradient_at_the_input():
  with jax.enable_x64(True):
    params, batches = _supernet()
    ref = _reference(params, batches, 0.0)  # ξ = 0: w′ = w.
    outer_grads = bilevel.Params(ref["at_virtual"], ref["v"])
    tx = bilevel.scale_by_darts()
    directions, state = _update(tx, params, batches, outer_grads)
    np.testing.assert_array_equal(directions.upper, outer_grads.upper)
    _assert_close(directions.lower, ref["grad_w"], rtol=1e-12)
    np.testing.assert_allclose(
        state.inner_loss, _loss(*params, batches["inner_batch"]), rtol=1e-6)
    assert isinstance(state, bilevel.DARTSState)
    assert bilevel.uses_outer_grads(state)
    assert not bilevel.uses_outer_grads(bilevel.scale_by_darts(
        2, virtual_learning_rate=0.1).init(params))


@pytest.mark.parametrize("hvp", ["exact", "finite_difference"])
def test_second_order_with_xi_one_over_the_curvature_is_exact_on_r4(hvp):
  """R4's inner Hessian is I: ``w − ∇_w L₂ = w*(λ)`` from any ``w``."""
  with jax.enable_x64(True):
    ref = reference_problems.r4(jax.random.key(0), dtype=jnp.float64)
    keys = jax.random.split(jax.random.key(2))
    params = bilevel.Params(jax.random.normal(keys[0], (4,), jnp.float64),
                            jax.random.normal(keys[1], (6,), jnp.float64))
    tx = bilevel.scale_by_darts(2, virtual_learning_rate=1.0, hvp=hvp)
    directions, _ = jax.jit(lambda p: tx.update(
        None, tx.init(p), p, outer_loss=ref.problem.outer_loss,
        inner_loss=ref.problem.inner_loss, **ref.batches))(params)
    # ∇_p L₂ is quadratic in w, so even the FD is exact up to rounding.
    _assert_close(directions.upper, ref.hypergradient(params.upper),
                  rtol=1e-9)


def test_virtual_learning_rate_schedule_is_read_at_the_count():
  with jax.enable_x64(True):
    params, batches = _supernet()
    schedule = lambda count: 0.1 * (count + 1)
    tx = bilevel.scale_by_darts(2, virtual_learning_rate=schedule,
                                hvp="exact")
    update, state = _jit_update(tx), tx.init(params)
    for k in range(3):
      directions, state = update(params, state, None, batches)
      np.testing.assert_allclose(state.virtual_learning_rate, schedule(k),
                                 rtol=1e-7)
      _assert_close(directions.upper, _reference(
          params, batches, schedule(k))["hypergradient"], rtol=1e-10)


def test_zero_validation_gradient_in_w_gives_a_finite_step():
  """``v = 0``: ε stays finite, the FD term is 0, gradients stay finite."""
  params = bilevel.Params(jnp.asarray([0.3, -0.2, 0.5]),
                          jnp.asarray([1.0, 2.0, -1.0]))
  inner = lambda alpha, w, batch: jnp.sum(jax.nn.softmax(alpha) * w ** 3)
  outer = lambda alpha, w, batch: 0.5 * jnp.sum(alpha ** 2)
  tx = bilevel.scale_by_darts(2, virtual_learning_rate=0.3)

  def d_alpha(params):
    directions, state = tx.update(None, tx.init(params), params,
                                  outer_loss=outer, inner_loss=inner)
    return directions.upper, state

  directions, state = jax.jit(d_alpha)(params)
  np.testing.assert_array_equal(directions, params.upper)
  assert float(state.virtual_grad_norm) == 0.0
  np.testing.assert_allclose(state.fd_eps, 0.01)
  meta = jax.jit(jax.grad(lambda p: jnp.sum(d_alpha(p)[0])))(params)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(meta))


def test_outer_grads_must_match_the_order():
  params, batches = _supernet(np.float32)
  grads = jax.tree.map(jnp.zeros_like, params)
  with pytest.raises(ValueError, match="needs outer_grads"):
    _update(bilevel.scale_by_darts(1), params, batches)
  with pytest.raises(TypeError, match="outer_grads=None"):
    _update(bilevel.scale_by_darts(2, virtual_learning_rate=0.1), params,
            batches, grads)


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(order=3), "order"),
    (dict(order=2), "virtual_learning_rate"),
    (dict(hvp="forward"), "hvp"),
    (dict(order=2, virtual_learning_rate=0.1, hvp="fd"), "hvp"),
    (dict(fd_scale=0.0), "fd_scale"),
])
def test_bad_arguments_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    bilevel.scale_by_darts(**kwargs)
  with pytest.raises(ValueError, match=match):
    bilevel.darts(**kwargs, upper_optimizer=optax.adam(3e-4),
                  lower_optimizer=optax.sgd(0.025))
