"""Splitting an NNX model into ``bilevel.Params(upper, lower)`` by type.

The level of a variable is its type. Weights are ``nnx.Param`` (lower level);
the upper-level variables get their own ``nnx.Param`` subclasses:
``ArchParam`` (architecture logits, DARTS), ``GraphParam`` (graph / edge
logits, CommFormer) and ``models.masking.MaskScore`` (pruning scores, BiP).
Everything else (BatchNorm statistics, RNG counts) is the *rest*: state that
is neither optimised nor differentiated, but may change in a forward pass.

A pure loss merges the levels back and returns the updated rest as aux::

    graphdef, params, rest = split_levels(model, ArchParam)

    def loss(upper, lower, batch):
      net = merge_levels(graphdef, bilevel.Params(upper, lower), batch["rest"])
      value = cross_entropy(net(batch["x"], train=True), batch["y"])
      return value, updated_rest(net, batch["rest"])

with ``Problem(..., has_aux=True)``; the rest may just as well come from a
closure when nothing updates it.

References:
  Liu, Simonyan, Yang, "DARTS: Differentiable Architecture Search", ICLR
  2019, Eq. 3-4 (architecture ``α`` upper, weights ``w`` lower).
"""

from typing import Any, NamedTuple

from flax import nnx

import bilevel

Filter = Any


class ArchParam(nnx.Param):
  """Upper-level architecture logits (DARTS ``α``); an ``nnx.Param``."""


class GraphParam(nnx.Param):
  """Upper-level graph or edge logits (CommFormer); an ``nnx.Param``."""


class Levels(NamedTuple):
  """The parts of a model split by :func:`split_levels`.

  Attributes:
    graphdef: the static structure, for :func:`merge_levels`.
    params: ``bilevel.Params(upper, lower)``, two ``nnx.State`` pytrees.
    rest: an ``nnx.State`` of every other variable.
  """
  graphdef: nnx.GraphDef
  params: bilevel.Params
  rest: nnx.State


def _types(name: str, level: Filter) -> tuple[type, ...] | None:
  """The variable types of a level given by types, None for other filters."""
  if level is None:
    return ()
  items = level if isinstance(level, (tuple, list)) else (level,)
  if not all(isinstance(t, type) for t in items):
    return None
  for t in items:
    if not issubclass(t, nnx.Variable):
      raise TypeError(f"{name}={t.__name__} is not an nnx.Variable type")
  return tuple(items)


def _describe(level: Filter) -> str:
  if isinstance(level, type):
    return level.__name__
  if isinstance(level, (tuple, list)):
    return "(" + ", ".join(_describe(t) for t in level) + ")"
  return repr(level)


def _check_order(upper: tuple[type, ...], lower: tuple[type, ...]) -> None:
  """Upper claims first, so no lower type may equal or refine an upper one."""
  for u in upper:
    for l in lower:
      if l is u:
        raise ValueError(
            f"overlapping filters: {u.__name__} is listed in both upper and"
            " lower")
      if issubclass(l, u):
        raise ValueError(
            f"filter order: lower type {l.__name__} is a subclass of upper"
            f" type {u.__name__}, so upper would claim every {l.__name__};"
            " the upper level must hold the subclass, e.g."
            f" upper={l.__name__}, lower={u.__name__}")


def _refines(var, upper: tuple[type, ...] | None,
             lower: tuple[type, ...] | None) -> bool:
  """Whether an upper type matching ``var`` subclasses every lower match."""
  if upper is None or lower is None:
    return False
  ups = [u for u in upper if isinstance(var, u)]
  lows = [l for l in lower if isinstance(var, l)]
  return any(all(issubclass(u, l) and u is not l for l in lows) for u in ups)


def _path(path) -> str:
  return ".".join(str(p) for p in path)


def _check_claims(model, upper, lower, rest) -> None:
  """Raises on overlapping claims, unclaimed variables and empty levels."""
  up_types, low_types = _types("upper", upper), _types("lower", lower)
  if up_types is not None and low_types is not None:
    _check_order(up_types, low_types)
  claims = {name: nnx.filterlib.to_predicate(f if f is not None else ())
            for name, f in (("upper", upper), ("lower", lower),
                            ("rest", rest))}
  matched = {"upper": 0, "lower": 0}
  overlap, unclaimed = [], []
  variables = nnx.to_flat_state(nnx.state(model))
  for path, var in variables:
    up, low = claims["upper"](path, var), claims["lower"](path, var)
    matched["upper"] += up
    matched["lower"] += low
    if up and low and not _refines(var, up_types, low_types):
      overlap.append(f"{_path(path)} ({type(var).__name__})")
    if not (up or low or claims["rest"](path, var)):
      unclaimed.append(f"{_path(path)} ({type(var).__name__})")
  if overlap:
    raise ValueError(
        f"overlapping filters: upper={_describe(upper)} and"
        f" lower={_describe(lower)} both claim {overlap[:5]}"
        f" ({len(overlap)} variables); make them disjoint")
  if unclaimed:
    raise ValueError(
        f"no filter claims {unclaimed[:5]} ({len(unclaimed)} variables) of"
        f" {type(model).__name__}: upper={_describe(upper)},"
        f" lower={_describe(lower)}, rest={_describe(rest)}; use rest=...")
  kinds = sorted({type(v).__name__ for _, v in variables})
  for name, level in (("upper", upper), ("lower", lower)):
    if level not in (None, ()) and not matched[name]:
      raise ValueError(
          f"{name}={_describe(level)} matches no variable of"
          f" {type(model).__name__}, whose variable types are {kinds}; pass"
          f" {name}=() if the model has no {name}-level variables")


def split_levels(
    model: nnx.Module,
    upper: Filter,
    lower: Filter = nnx.Param,
    *,
    rest: Filter = ...,
) -> Levels:
  """Splits ``model`` into its graph, ``Params(upper, lower)`` and the rest.

  A variable goes to the first level whose filter matches it, in the order
  upper, lower, rest (as in ``nnx.split``), so ``upper=ArchParam`` and the
  default ``lower=nnx.Param`` leave the architecture logits out of the
  weights. Such a double match is only allowed when an upper type refines
  (subclasses) every lower type that matches; any other is an error.

  Args:
    model: an NNX module.
    upper: the upper level's variable type(s), e.g. ``ArchParam``,
      ``(ArchParam, GraphParam)`` or ``MaskScore``, or any ``nnx`` filter;
      ``()`` when the upper variables live outside the model (hyper-cleaning's
      per-example weights), which gives an empty ``upper`` state.
    lower: the lower level's variable type(s) or filter.
    rest: the filter of everything else (default: all remaining variables).

  Returns:
    ``Levels(graphdef, Params(upper, lower), rest)``, the states as
    ``nnx.split`` gives them.

  Raises:
    TypeError: a level type is not an ``nnx.Variable`` type.
    ValueError: a type in both levels; a lower type that subclasses an upper
      one (upper would claim all of it); a variable both filters claim
      without an upper refinement; a variable no filter claims; a non-empty
      ``upper`` or ``lower`` that matches no variable. Each names the types
      or paths at fault.
  """
  _check_claims(model, upper, lower, rest)
  graphdef, up, low, other = nnx.split(
      model, nnx.Nothing if upper in (None, ()) else upper,
      nnx.Nothing if lower in (None, ()) else lower, rest)
  return Levels(graphdef, bilevel.Params(up, low), other)


def merge_levels(graphdef: nnx.GraphDef, params: bilevel.Params,
                 rest: nnx.State) -> nnx.Module:
  """Inverse of :func:`split_levels`: rebuilds the module, e.g. in a loss.

  The module gets fresh copies of the variables: a training forward inside
  ``jax.grad`` mutates BatchNorm statistics and RNG counts, which NNX forbids
  on variables created outside that trace (``TraceContextError``). Read the
  updated state back with :func:`updated_rest`.

  Args:
    graphdef: from :func:`split_levels`.
    params: ``Params(upper, lower)`` with the structure of the split's.
    rest: the rest, with the structure of the split's.

  Returns:
    The module.
  """
  return nnx.merge(graphdef, params.upper, params.lower, rest, copy=True)


def updated_rest(module: nnx.Module, rest: nnx.State) -> nnx.State:
  """The module's current values of the variables in ``rest``.

  What a pure loss returns as aux after a forward that updates BatchNorm
  statistics or RNG counts; it has the structure of ``rest``.

  Args:
    module: from :func:`merge_levels`, after a forward pass.
    rest: the rest the module was merged with.

  Returns:
    An ``nnx.State`` with the paths of ``rest`` and the module's values.
  """
  paths = {path for path, _ in nnx.to_flat_state(rest)}
  return nnx.state(module, lambda path, _: path in paths)
