"""One contract test that every bilevel solver joins.

Each solver is a row of ``SOLVERS``; every check below runs on every row. A
row holds what the solver needs (its factory, the extra arguments it must
have, the steps it takes to converge); checks never branch on the name.
"""

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import bilevel
from bilevel import reference_problems
from experiments import checkpointing


@dataclasses.dataclass(frozen=True)
class SolverCase:
  """A row of the contract table.

  Attributes:
    name: test id.
    factory: the public factory (``bilevel.implicit``, ...).
    kwargs: ``kwargs(problem_name, upper_optimizer) -> dict`` for
      ``factory``; the problem name lets a row pick step sizes suited to it
      (never the checks); an ``upper_optimizer`` given by a check (None
      otherwise) replaces the row's default.
    required: extra arguments whose absence must raise ``TypeError``.
    steps: outer steps to converge on each of ``problems``.
    tol: relative distance to x* accepted after ``steps``.
    problems: names of the reference problems (keys of ``_PROBLEMS``) the
      checks run the row on: convergence on each, the cheap checks on the
      first, the dtype, sharding and checkpoint checks on the last.
    parts: ``parts(problem_name) -> (directions, optimizer)``, the solver
      split as its alias chains it (for ``bilevel.accumulate``); None where
      the alias is not such a chain (BiP's sequential order).
    hyper: ``(name, value)`` of a numeric factory argument to change through
      ``inject_hyperparams`` (None: the factory has none).
    uses_outer_grads: whether the solver reads ``outer_grads``.
    meta_steps: steps before ``F`` depends on the upper learning rate plus
      one, for the meta-gradient check (ScaleBiO's first ``d_p`` is zero at
      ``u = w``, so it needs three).
  """
  name: str
  factory: Callable[..., optax.GradientTransformation]
  kwargs: Callable[..., dict]
  required: tuple[str, ...]
  steps: int = 60
  tol: float = 1e-3
  problems: tuple[str, ...] = ("r1", "r2")
  parts: Callable[[str], tuple] | None = None
  hyper: tuple[str, float] | None = None
  uses_outer_grads: bool = False
  meta_steps: int = 2

  def make(self, problem_name, upper=None):
    return self.factory(**self.kwargs(problem_name, upper))


# Inner step sizes: R1's inner Hessian is 1; R2's has spectrum in
# [mu, L] given by `reference_problems.r2` (documented there).
_INNER_LR = {"r1": 0.5, "r2": 0.5}
_OUTER_LR = {"r1": 0.3, "r2": 0.3}


def _reference_kwargs(p, upper):
  return dict(upper_optimizer=upper or optax.sgd(_OUTER_LR[p]),
              inner_optimizer=optax.sgd(_INNER_LR[p]), inner_steps=40)


def _lv_hba_kwargs(p, upper):
  del p
  return dict(num_constraints=0, alpha=0.5, beta=0.5, eta=0.5, gamma1=10.0,
              gamma2=10.0, c=10.0, upper_optimizer=upper)


def _bip_kwargs(sequential, lower_steps=1):
  def kwargs(p, upper):
    del p
    return dict(upper_optimizer=upper or optax.sgd(0.1),
                lower_optimizer=optax.sgd(0.5), gamma=0.1, budget=4,
                sequential=sequential, lower_steps=lower_steps)
  return kwargs


def _scalebio_kwargs(p, upper):
  del p
  return dict(alpha=10.0, upper_optimizer=upper or optax.sgd(1.0),
              lower_optimizer=optax.sgd(1 / 11), copy_optimizer=optax.sgd(0.1))


def _darts_kwargs(order, upper_lr, lower_lr, **solver_kwargs):
  def kwargs(p, upper):
    del p
    return dict(order=order, upper_optimizer=upper or optax.sgd(upper_lr),
                lower_optimizer=optax.sgd(lower_lr), **solver_kwargs)
  return kwargs


def _sgd_pair(upper_lr, lower_lr):
  return bilevel.per_level(optax.sgd(upper_lr), optax.sgd(lower_lr))


SOLVERS = (
    SolverCase(
        name="implicit",
        factory=bilevel.implicit,
        kwargs=_reference_kwargs,
        required=("outer_loss", "inner_loss"),
        parts=lambda p: (bilevel.scale_by_implicit(optax.sgd(_INNER_LR[p]),
                                                   40),
                         _sgd_pair(_OUTER_LR[p], 1.0)),
    ),
    SolverCase(
        name="unrolled",
        factory=bilevel.unrolled,
        kwargs=_reference_kwargs,
        required=("outer_loss", "inner_loss"),
        parts=lambda p: (bilevel.scale_by_unrolled(optax.sgd(_INNER_LR[p]),
                                                   40),
                         _sgd_pair(_OUTER_LR[p], 1.0)),
    ),
    # Unconstrained LV-HBA is a penalty method: x is biased by O(1/c_k).
    SolverCase(
        name="lv_hba",
        factory=bilevel.lv_hba,
        kwargs=_lv_hba_kwargs,
        required=("inner_loss",),
        steps=1000,
        tol=5e-3,
        parts=lambda p: (bilevel.scale_by_lv_hba(
            0, eta=0.5, beta=0.5, gamma1=10.0, gamma2=10.0, c=10.0),
                         _sgd_pair(0.5, 0.5)),
        hyper=("c", 3.0),
        uses_outer_grads=True,
    ),
    # BiP's upper level is a mask: R1/R2 do not fit its loss form.
    SolverCase(
        name="bip",
        factory=bilevel.bip,
        kwargs=_bip_kwargs(sequential=True),
        required=("outer_loss", "inner_loss"),
        problems=("masked_regression",),
        hyper=("gamma", 0.3),
    ),
    SolverCase(
        name="bip_simultaneous",
        factory=bilevel.bip,
        kwargs=_bip_kwargs(sequential=False),
        required=("outer_loss", "inner_loss"),
        problems=("masked_regression",),
        parts=lambda p: (bilevel.scale_by_bip(gamma=0.1),
                         _sgd_pair(0.1, 0.5)),
        hyper=("gamma", 0.3),
    ),
    # R4 is realisable (Φ* = 0), so the penalty has no bias at the optimum.
    SolverCase(
        name="scalebio",
        factory=bilevel.scalebio,
        kwargs=_scalebio_kwargs,
        required=("inner_loss",),
        steps=1000,
        problems=("r4",),
        parts=lambda p: (bilevel.scale_by_scalebio(10.0, optax.sgd(0.1)),
                         _sgd_pair(1.0, 1 / 11)),
        hyper=("alpha", 20.0),
        uses_outer_grads=True,
        meta_steps=3,
    ),
    # First-order DARTS drops the implicit term −∇²_xy f [∇²_yy f]⁻¹∇_y F
    # (on R2 it stops 22 % from x*; on R4 it never moves, F not depending
    # on the logits). The term vanishes where ∇_y F(x*, y*) = 0: the
    # realisable R2 below.
    SolverCase(
        name="darts",
        factory=bilevel.darts,
        kwargs=_darts_kwargs(1, 0.3, 0.5),
        required=("inner_loss",),
        problems=("r2_realisable",),
        parts=lambda p: (bilevel.scale_by_darts(1), _sgd_pair(0.3, 0.5)),
        uses_outer_grads=True,
    ),
    # Second order on R4, DARTS's shape (softmax logits over what w fits):
    # the inner Hessian is I, so the virtual step with ξ = 1 lands on
    # w*(λ) and the direction is ∇Φ itself. On R2, ξ·I for [∇²_yy f]⁻¹
    # leaves it 6 % off. The exact HVP: the float32 FD's rounding (about
    # u‖∇_α f‖‖v‖/fd_scale, 1e-6 here) exceeds the matrix's jit-vs-eager
    # tolerances; test_darts.py checks the FD.
    SolverCase(
        name="darts_second_order",
        factory=bilevel.darts,
        kwargs=_darts_kwargs(2, 1.0, 1.0, virtual_learning_rate=1.0,
                             hvp="exact"),
        required=("outer_loss", "inner_loss"),
        steps=100,
        problems=("r4",),
        parts=lambda p: (bilevel.scale_by_darts(
            2, virtual_learning_rate=1.0, hvp="exact"), _sgd_pair(1.0, 1.0)),
        hyper=("virtual_learning_rate", 0.5),
    ),
    # One mask step every second θ-step (the lax.cond path of the IG).
    SolverCase(
        name="bip_lower_steps2",
        factory=bilevel.bip,
        kwargs=_bip_kwargs(sequential=True, lower_steps=2),
        required=("outer_loss", "inner_loss"),
        steps=120,
        problems=("masked_regression",),
        hyper=("gamma", 0.3),
    ),
)
IDS = [c.name for c in SOLVERS]
CONVERGENCE = [pytest.param(c, p, id=f"{c.name}-{p}")
               for c in SOLVERS for p in c.problems]


def _r2(dtype=jnp.float32, dim=16):
  return reference_problems.r2(
      jax.random.key(0), dim_upper=dim, dim_lower=dim, dtype=dtype)


def _r2_realisable(dtype=jnp.float32, dim=16):
  """R2 with F's linear terms set so that ∇F(x*, y*(x*)) = 0, x* drawn.

  Φ is the same convex quadratic up to a linear term, so x* is its unique
  minimiser; first-order methods (∇_x F alone) are unbiased there.
  """
  ref = _r2(dtype, dim)
  o = ref.batches["outer_batch"]
  x_star = jax.random.normal(jax.random.key(1), (dim,), dtype)
  y_star = ref.lower_solution(x_star)
  outer = dict(o, f0=-(o["F"] @ y_star + o["K"].T @ x_star).astype(dtype),
               h=-(o["H"] @ x_star + o["K"] @ y_star).astype(dtype))
  phi = lambda x: ref.problem.outer_loss(x, ref.lower_solution(x), outer)
  return ref._replace(batches=dict(ref.batches, outer_batch=outer),
                      hypergradient=jax.grad(phi), upper_optimum=x_star)


_PROBLEMS = {
    "r1": lambda dtype: reference_problems.r1(dtype=dtype),
    "r2": _r2,
    "r2_realisable": _r2_realisable,
    "r4": lambda dtype: reference_problems.r4(
        jax.random.key(0), num_sources=8, dim=16,
        weights=(0.16, 0.15, 0.14, 0.13, 0.12, 0.11, 0.10, 0.09),
        dtype=dtype),
    "masked_regression": lambda dtype: reference_problems.masked_regression(
        jax.random.key(0), dim=16, k=4, dtype=dtype),
}


def _problem(name, dtype=jnp.float32):
  return _PROBLEMS[name](dtype)


def _extra_args(ref):
  return dict(outer_loss=ref.problem.outer_loss,
              inner_loss=ref.problem.inner_loss, **ref.batches)


def _run(tx, ref, params, state, steps):
  step = bilevel.make_step(tx, ref.problem)
  for _ in range(steps):
    params, state, _ = step(params, state, ref.batches)
  return params, state


def _outer_grads(ref, params, state):
  """``∇F(params)`` for solvers that read it, else None."""
  if not bilevel.uses_outer_grads(state):
    return None
  return jax.grad(lambda p: ref.problem.outer_loss(
      p.upper, p.lower, ref.batches.get("outer_batch")))(params)


@pytest.mark.parametrize("case", SOLVERS, ids=IDS)
def test_declares_whether_it_reads_outer_grads(case):
  ref = _problem(case.problems[0])
  state = case.make(case.problems[0]).init(ref.init)
  assert bilevel.uses_outer_grads(state) == case.uses_outer_grads


@pytest.mark.parametrize("case", SOLVERS, ids=IDS)
def test_compiles_under_jit(case):
  ref = _problem(case.problems[-1])
  tx = case.make(case.problems[-1])
  state = jax.jit(tx.init)(ref.init)
  update = jax.jit(lambda g, s, p: tx.update(g, s, p, **_extra_args(ref)))
  updates, _ = update(_outer_grads(ref, ref.init, state), state, ref.init)
  same_shapes = jax.tree.map(lambda u, p: u.shape == p.shape, updates,
                             ref.init)
  assert all(jax.tree.leaves(same_shapes))


@pytest.mark.parametrize("case", SOLVERS, ids=IDS)
def test_ignores_unknown_extra_args(case):
  ref = _problem(case.problems[0])
  tx = case.make(case.problems[0])
  state = tx.init(ref.init)
  grads = _outer_grads(ref, ref.init, state)
  expected, _ = tx.update(grads, state, ref.init, **_extra_args(ref))
  got, _ = tx.update(grads, state, ref.init, **_extra_args(ref),
                     not_an_argument=123, another_one="x")
  jax.tree.map(np.testing.assert_array_equal, got, expected)


@pytest.mark.parametrize("case", SOLVERS, ids=IDS)
def test_missing_required_extra_args_raise(case):
  ref = _problem(case.problems[0])
  tx = case.make(case.problems[0])
  state = tx.init(ref.init)
  grads = _outer_grads(ref, ref.init, state)
  for name in case.required:
    extra = _extra_args(ref)
    del extra[name]
    with pytest.raises(TypeError, match=name):
      tx.update(grads, state, ref.init, **extra)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("case", SOLVERS, ids=IDS)
def test_keeps_param_dtype(case, dtype):
  ref = _problem(case.problems[-1], dtype)
  params = jax.tree.map(lambda x: x.astype(dtype), ref.init)
  tx = case.make(case.problems[-1])
  state = tx.init(params)
  updates, _ = tx.update(_outer_grads(ref, params, state), state, params,
                         **_extra_args(ref))
  for u in jax.tree.leaves(updates):
    assert u.dtype == dtype
  new_params, _ = _run(tx, ref, params, state, steps=2)
  for p in jax.tree.leaves(new_params):
    assert p.dtype == dtype
    assert np.all(np.isfinite(np.asarray(p, np.float32)))


@pytest.mark.parametrize("case", SOLVERS, ids=IDS)
def test_state_structure_is_stable(case):
  ref = _problem(case.problems[-1])
  tx = case.make(case.problems[-1])
  state0 = tx.init(ref.init)
  _, state3 = _run(tx, ref, ref.init, state0, steps=3)
  assert jax.tree.structure(state0) == jax.tree.structure(state3)
  for a, b in zip(jax.tree.leaves(state0), jax.tree.leaves(state3)):
    assert (a.shape, a.dtype) == (b.shape, b.dtype)


@pytest.mark.parametrize("case", SOLVERS, ids=IDS)
def test_state_shards_like_params(case):
  if jax.device_count() < 8:
    pytest.skip("needs 8 simulated devices (tests/conftest.py sets them)")
  mesh = jax.make_mesh((8,), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))
  sharding = NamedSharding(mesh, P("data"))
  ref = _problem(case.problems[-1])
  params = jax.device_put(ref.init, sharding)
  # Adam's moments are state shaped like the params.
  tx = case.make(case.problems[-1], optax.adam(1e-2))
  state = jax.jit(tx.init)(params)
  step = bilevel.make_step(tx, ref.problem)
  params, state, _ = step(params, state, ref.batches)
  param_leaves = jax.tree.leaves(params)
  for p in param_leaves:
    assert p.sharding.is_equivalent_to(sharding, p.ndim)
  shaped_like_params = [s for s in jax.tree.leaves(state)
                        if s.ndim and s.shape == param_leaves[0].shape]
  assert shaped_like_params, "expected Adam moments shaped like the params"
  for s in shaped_like_params:
    assert s.sharding.is_equivalent_to(sharding, s.ndim), s.sharding


@pytest.mark.parametrize(("case", "problem_name"), CONVERGENCE)
def test_converges(case, problem_name):
  ref = _problem(problem_name)
  tx = case.make(problem_name)
  params, _ = _run(tx, ref, ref.init, tx.init(ref.init), case.steps)
  x, x_star = params.upper, ref.upper_optimum
  error = jnp.linalg.norm(jnp.ravel(x - x_star)) / jnp.maximum(
      jnp.linalg.norm(jnp.ravel(x_star)), 1.0)
  assert error < case.tol, f"{case.name} on {problem_name}: {error=}"


@pytest.mark.parametrize("case", SOLVERS, ids=IDS)
def test_checkpoint_resume_is_bit_identical(case, tmp_path):
  ref = _problem(case.problems[-1])
  tx = case.make(case.problems[-1])
  state0 = tx.init(ref.init)
  params_a, state_a = _run(tx, ref, ref.init, state0, steps=6)

  params_b, state_b = _run(tx, ref, ref.init, state0, steps=3)
  ckpt = checkpointing.Checkpointer(tmp_path / "ckpt")
  ckpt.save(3, {"params": params_b, "state": state_b})
  ckpt.wait()
  abstract = jax.eval_shape(lambda: {"params": ref.init, "state": state0})
  step, restored = checkpointing.Checkpointer(tmp_path / "ckpt").restore(
      abstract)
  assert step == 3
  assert jax.tree.structure(restored["state"]) == jax.tree.structure(state0)
  params_b, state_b = _run(tx, ref, restored["params"], restored["state"], 3)

  jax.tree.map(np.testing.assert_array_equal, params_b, params_a)
  jax.tree.map(np.testing.assert_array_equal, state_b, state_a)
