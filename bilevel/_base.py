"""The bilevel contract: joint parameters, problems, per-level optimizers.

A bi-level problem is

    min_x F(x, y*(x))  s.t.  y*(x) ∈ argmin_y f(x, y)  [and c(x, y) ≤ 0 | = 0]

with ``x`` the *upper* (outer) variables and ``y`` the *lower* (inner) ones,
both arbitrary pytrees. Every solver is an optax transformation over
``Params(upper, lower)``:

    updates, state = tx.update(outer_grads, state, params, *,
                               outer_loss=F, inner_loss=f, constraints=c,
                               outer_batch=..., inner_batch=...)

``outer_grads`` is ``∇F`` at ``params`` (what any optax loop computes). A
``scale_by_<method>`` transformation turns it into *directions*
``Params(upper=d_x, lower=d_y)`` — gradient-like, to be negated by the
per-level optimizers that :func:`per_level` chains after it. Everything else a
method needs arrives as keyword-only extra arguments.
"""

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

PyTree = Any
Loss = Callable[..., jax.Array]


class Params(NamedTuple):
  """Joint parameters of a bi-level problem.

  Attributes:
    upper: pytree of upper-level (outer) variables ``x``.
    lower: pytree of lower-level (inner) variables ``y``.
  """
  upper: PyTree
  lower: PyTree


class Problem(NamedTuple):
  """The callables that define a bi-level problem.

  Attributes:
    outer_loss: ``F(upper, lower, batch) -> scalar`` (``(scalar, aux)`` with
      ``has_aux``).
    inner_loss: ``f(upper, lower, batch) -> scalar`` (``(scalar, aux)`` with
      ``has_aux``).
    constraints: optional ``c(upper, lower, batch) -> [m]``, feasible where
      ``c ≤ 0`` (or ``c = 0`` for equality-constrained methods).
    has_aux: whether both losses return ``(value, aux)``, ``aux`` a pytree
      such as updated BatchNorm statistics or an advanced RNG key.
      :func:`bilevel.make_step` hands the solvers the values only (solvers
      differentiate values) and returns both auxes at the new parameters in
      its metrics; feed them back through the batches.
  """
  outer_loss: Loss
  inner_loss: Loss
  constraints: Loss | None = None
  has_aux: bool = False

  def values(self) -> "Problem":
    """The same problem with losses that return their value only."""
    if not self.has_aux:
      return self
    return Problem(_value_of(self.outer_loss), _value_of(self.inner_loss),
                   self.constraints)


def _value_of(loss: Loss) -> Loss:
  def value(*args):
    out = loss(*args)
    if not (isinstance(out, tuple) and len(out) == 2):
      raise TypeError("Problem(has_aux=True): the losses must return "
                      f"(value, aux), got {type(out).__name__}")
    return out[0]
  return value


def check_params(params: Any, method: str) -> Params:
  """Returns ``params`` if it is a :class:`Params`, else raises.

  Raises:
    ValueError: ``params`` is None (solvers need them).
    TypeError: naming the type received, for a tuple, dict or bare pytree.
  """
  if params is None:
    raise ValueError(f"{method}.update() needs params=Params(upper, lower).")
  if not isinstance(params, Params):
    raise TypeError(f"{method}: params must be bilevel.Params(upper, lower), "
                    f"got {type(params).__name__}; wrap the two levels as "
                    "bilevel.Params(upper=..., lower=...)")
  return params


def require_extra_args(
    method: str, extra_args: Mapping[str, Any], *names: str
) -> tuple[Any, ...]:
  """Returns the named extra arguments, raising if any is missing.

  Args:
    method: the solver's name, used in the error message.
    extra_args: the keyword arguments ``tx.update`` received.
    *names: the extra arguments the solver needs.

  Returns:
    The values of ``names``, in order.

  Raises:
    TypeError: naming every missing argument.
  """
  missing = [n for n in names if extra_args.get(n) is None]
  if missing:
    raise TypeError(
        f"{method}.update() missing required keyword-only extra argument(s):"
        f" {', '.join(repr(n) for n in missing)}"
    )
  return tuple(extra_args[n] for n in names)


def cast_like(tree: PyTree, like: PyTree) -> PyTree:
  """Casts each leaf of ``tree`` to the dtype of its counterpart in ``like``."""
  return jax.tree.map(lambda t, l: jnp.asarray(t).astype(jnp.result_type(l)),
                      tree, like)


def upcast(tree: PyTree, dtype=jnp.float32) -> PyTree:
  """Upcasts floating leaves narrower than ``dtype`` (bf16 → f32), keeps others.

  Linear solves and losses run in at least f32 even when parameters are bf16.
  """
  def _up(x):
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.floating) and (
        jnp.finfo(x.dtype).bits < jnp.finfo(dtype).bits):
      return x.astype(dtype)
    return x
  return jax.tree.map(_up, tree)


# The solvers that evaluate ∇F themselves (after an inner solve, through an
# unroll, at BiP's pruned weights) register their state type here, so that
# make_step knows not to compute outer_grads for them.
_SOLVER_STATES_WITHOUT_OUTER_GRADS: set[type] = set()


def evaluates_outer_loss_itself(state_type: type) -> type:
  """Class decorator: a solver with this state takes ``outer_grads=None``."""
  _SOLVER_STATES_WITHOUT_OUTER_GRADS.add(state_type)
  return state_type


def uses_outer_grads(state: optax.OptState) -> bool:
  """Whether the transformation owning ``state`` reads ``outer_grads``.

  False when any solver state inside ``state`` (through chains,
  ``optax.MultiSteps``, ``inject_hyperparams``, ...) belongs to a solver
  registered with :func:`evaluates_outer_loss_itself`.
  """
  kinds = tuple(_SOLVER_STATES_WITHOUT_OUTER_GRADS)
  nodes = jax.tree.leaves(state, is_leaf=lambda n: isinstance(n, kinds))
  return not any(isinstance(n, kinds) for n in nodes)


_REFUSAL = (
    "{method} evaluates the outer gradient itself ({where}), so its "
    "outer_grads must be None and a transformation chained before it would "
    "act on nothing. Apply clipping or scaling to the directions instead "
    "(inside bilevel.per_level, or after the solver in the chain); use "
    "bilevel.accumulate instead of optax.MultiSteps and "
    "bilevel.apply_if_finite instead of optax.apply_if_finite.")


class OuterGradsNotUsed:
  """What :func:`bilevel.make_step` passes as ``outer_grads`` to a solver
  that evaluates ∇F itself.

  Any arithmetic on it (an optax transformation chained *before* the solver:
  clipping, ``optax.MultiSteps``, ``optax.apply_if_finite``) raises a
  ``TypeError`` that explains where to put the wrapper, instead of acting on
  nothing in silence.
  """
  __slots__ = ()

  def __repr__(self):
    return "OuterGradsNotUsed()"

  def _refuse(self, *args, **kwargs):
    raise TypeError(_REFUSAL.format(method="this bilevel solver",
                                    where="see its docstring"))

  __array__ = __add__ = __radd__ = __sub__ = __rsub__ = _refuse
  __mul__ = __rmul__ = __truediv__ = __rtruediv__ = __neg__ = _refuse
  __pow__ = __abs__ = __lt__ = __gt__ = __le__ = __ge__ = _refuse

  def __getattr__(self, name):
    self._refuse()


def check_outer_grads_unused(outer_grads: Any, method: str,
                             where: str) -> None:
  """Raises unless ``outer_grads`` is None or :class:`OuterGradsNotUsed`.

  Args:
    outer_grads: what the solver's ``update`` received.
    method: the solver's name, for the message.
    where: where the solver evaluates ∇F instead (e.g. ``"at y*"``).

  Raises:
    TypeError: gradients were passed (they would be silently ignored).
  """
  if outer_grads is None or isinstance(outer_grads, OuterGradsNotUsed):
    return
  raise TypeError(_REFUSAL.format(method=method, where=where)
                  + " Call its update with outer_grads=None.")


# What a solver reads; per-level optimizers never see these.
PROBLEM_ARGS = frozenset(
    {"outer_loss", "inner_loss", "constraints", "outer_batch", "inner_batch"})


class PerLevelState(NamedTuple):
  """State of :func:`per_level`: one optimizer state per level."""
  upper: optax.OptState
  lower: optax.OptState


def level_extra_args(extra_args: Mapping[str, Any], level: str,
                level_updates: PyTree, level_params: PyTree
                ) -> dict[str, Any]:
  """The extra arguments one level's transformation receives.

  The problem's own arguments (:data:`PROBLEM_ARGS`) stay with the solver
  (line searches pass every other argument to ``value_fn``). A
  :class:`Params`-valued argument is split by level; ``grad`` defaults to
  ``level_updates``; a ``value_fn`` sets ``value = value_fn(level_params)``.
  """
  args = {k: getattr(v, level) if isinstance(v, Params) else v
          for k, v in extra_args.items() if k not in PROBLEM_ARGS}
  args.setdefault("grad", level_updates)
  if callable(args.get("value_fn")) and level_params is not None:
    # value and value_fn must agree (line searches compare them).
    args["value"] = args["value_fn"](level_params)
  return args


def per_level(
    upper: optax.GradientTransformation,
    lower: optax.GradientTransformation,
) -> optax.GradientTransformationExtraArgs:
  """Applies one optax transformation to each level of ``Params``.

  Extra arguments other than the problem's (losses, constraints, batches)
  are forwarded to both levels, so optimizers that need them
  work inside (``optax.contrib.reduce_on_plateau`` reads ``value``,
  ``optax.lbfgs`` reads ``value``, ``grad`` and ``value_fn``); an extra
  argument given as a :class:`Params` is split, each level receiving its own
  part (e.g. ``value_fn=Params(upper=phi, lower=None)``). ``grad`` defaults
  to the level's incoming directions, and a level given a ``value_fn`` gets
  ``value = value_fn(level_params)``. Transformations that take no extra
  arguments ignore them.

  Args:
    upper: transformation for the upper level (e.g. ``optax.adam(1e-2)``).
    lower: transformation for the lower level (e.g. ``optax.sgd(0.1)``).

  Returns:
    A transformation over ``Params`` whose state is a :class:`PerLevelState`.
  """
  upper = optax.with_extra_args_support(upper)
  lower = optax.with_extra_args_support(lower)

  def init_fn(params):
    params = check_params(params, "per_level")
    return PerLevelState(upper.init(params.upper), lower.init(params.lower))

  def update_fn(updates, state, params=None, **extra_args):
    updates = check_params(updates, "per_level")
    if params is not None:
      params = check_params(params, "per_level")
    up_params = None if params is None else params.upper
    low_params = None if params is None else params.lower
    up, up_state = upper.update(
        updates.upper, state.upper, up_params,
        **level_extra_args(extra_args, "upper", updates.upper, up_params))
    low, low_state = lower.update(
        updates.lower, state.lower, low_params,
        **level_extra_args(extra_args, "lower", updates.lower, low_params))
    return Params(up, low), PerLevelState(up_state, low_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
