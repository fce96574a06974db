"""Projection of the joint parameters after a step, as an optax transformation.

Methods whose upper and lower variables share a feasible set ``C`` (coupled
constraints, e.g. LV-HBA) take a projected step
``(x, y) ← Π_C((x, y) + u)``. Because ``update`` receives ``params``, optax
can express it as the update ``u ↦ Π_C(params + u) − params``, chained after
the per-level optimizers.
"""

from collections.abc import Callable

import optax

from bilevel._base import Params, cast_like, upcast


def project_params(
    projection: Callable[[Params], Params],
) -> optax.GradientTransformationExtraArgs:
  """Turns updates into projected ones: ``u ↦ Π(params + u) − params``.

  After ``optax.apply_updates`` the parameters are ``Π(params + u)`` (up to
  rounding in the params' dtype). The projection runs in at least float32.

  Args:
    projection: ``Π: Params -> Params``, a (joint) projection onto the
      feasible set, e.g. :func:`bilevel.reference_problems.r7_projection`.
      Leaves of ``upper`` and ``lower`` may be any pytrees.

  Returns:
    A stateless transformation over :class:`bilevel.Params`; extra arguments
    are ignored.

  Raises:
    ValueError: from ``update`` if ``params`` is not given.
  """

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError("project_params.update() needs params.")
    wide = upcast(params)
    projected = projection(optax.tree.add(wide, upcast(updates)))
    return cast_like(optax.tree.sub(projected, wide), updates), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
