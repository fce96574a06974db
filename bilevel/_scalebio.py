r"""ScaleBiO: first-order data reweighting by a penalised minimax.

K training sources with weights ``λ = softmax(p)`` on the simplex and a
model ``w``:

* lower level: ``w*(λ) = argmin_w L₂(w, λ)``,
  ``L₂(w, λ) = Σ_s λ_s · mean_{i ∈ batch, src(i) = s} ℓ(w; xᵢ)``;
* upper level: ``min_λ L₁(w*(λ))`` on a trusted validation set.

With a second model copy ``u`` and a penalty ``α > 0`` the problem becomes
the first-order minimax (Kwon et al.'s value-function penalty)

    min_{p, w} max_u  L₁(w) + α [L₂(w, λ) − L₂(u, λ)],

whose inner max is attained at ``u = w*(λ)``, so the bracket is a
non-negative value-function penalty; as ``α → ∞`` the minimiser in
``(p, w)`` approaches the bilevel solution (the ``λ``-gradient error is
``O(1/α)``, ``shared/reference/bilevel_problems.md`` R4).

One step ``k`` (Jacobi style: every gradient at the input ``p, w, u``),
with the same training batch ``B`` for ``u`` and ``w`` and a validation
batch ``V``:

1. ``u ← OptU(u, α ∇_u L₂(u, λ; B))`` inside the solver state;
2. ``d_w = ∇_w L₁(w; V) + α ∇_w L₂(w, λ; B)``;
3. ``d_p = ∇_p L₁ + α ∇_p [L₂(w, λ; B) − L₂(u, λ; B)]`` through the softmax.

``d_p, d_w`` go to the per-level optimizers (AdamW for both in the released
code).

References:
  Pan, Liu, Diao, Zhang, Zhang, *ScaleBiO: Scalable Bilevel Optimization for
  LLM Data Reweighting*, ACL 2025 (arXiv 2406.19976), Alg. 1; released code
  2003pro/ScaleBiO ``python/minmax.py``.
  Kwon, Kwon, Wright, Nowak, *A Fully First-Order Method for Stochastic
  Bilevel Optimization*, ICML 2023.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from bilevel import _lisa
from bilevel._base import (
  OuterGradsNotUsed,
  Params,
  cast_like,
  check_params,
  per_level,
  require_extra_args,
)
from bilevel._wrappers import declare_static

PyTree = Any


def source_weighted_loss(example_losses: jax.Array, sources: jax.Array,
                         logits: jax.Array) -> jax.Array:
  r"""``L₂ = Σ_s softmax(p)_s · mean_{i: src(i) = s} ℓᵢ``, per-source means.

  A source absent from the batch contributes 0 (its weight gets no gradient
  from this batch). Under ``jax.jit`` over a sharded batch the per-source
  sums and counts are over the global batch, as the released code's
  all-gathered counts.

  Args:
    example_losses: ``[N]`` loss of each example.
    sources: int ``[N]`` source ids in ``[0, K)``.
    logits: ``[K]`` source logits ``p``.

  Returns:
    The scalar weighted loss, NaN when a source id lies outside ``[0, K)``
    (``segment_sum`` would drop such examples in silence).

  Raises:
    ValueError: mismatched shapes.
  """
  means, counts = per_source_means(example_losses, sources, logits.shape[0])
  weights = jax.nn.softmax(logits.astype(means.dtype))
  value = jnp.sum(weights * means)
  return jnp.where(jnp.sum(counts) == example_losses.shape[0], value, jnp.nan)


def per_source_means(example_losses: jax.Array, sources: jax.Array,
                     num_sources: int) -> tuple[jax.Array, jax.Array]:
  """Per-source mean loss ``[K]`` (0 where absent) and counts ``[K]``.

  Raises:
    ValueError: ``example_losses`` and ``sources`` are not both ``[N]``.
  """
  if example_losses.ndim != 1 or sources.shape != example_losses.shape:
    raise ValueError(
        f"need example_losses [N] and sources [N], got "
        f"{example_losses.shape=} and {sources.shape=}")
  # At least float32 (bf16 sums lose the per-source means), float64 kept.
  losses = example_losses.astype(jnp.promote_types(example_losses.dtype,
                                                   jnp.float32))
  sums = jax.ops.segment_sum(losses, sources, num_segments=num_sources)
  counts = jax.ops.segment_sum(jnp.ones_like(losses), sources,
                               num_segments=num_sources)
  return sums / jnp.maximum(counts, 1.0), counts


class ScaleBiOState(NamedTuple):
  """State of :func:`scale_by_scalebio`.

  Attributes:
    copy: ``u``, the second model copy, a pytree like ``params.lower``
      (same dtypes and structure, so it shards like ``w``).
    copy_opt_state: the state of ``u``'s optimizer.
    count: int32 scalar, the step ``k``.
    alpha: float32 scalar, the penalty ``α_k`` of the last update.
    key: uint32 key data of the LISA draws (``jax.random.key_data``), None
      without LISA.
    copy_blocks: bool ``[num_blocks]``, ``u``'s active blocks in the last
      update (None without LISA).
    model_blocks: bool ``[num_blocks]``, ``w``'s active blocks.
    inner_loss: float32 scalar, ``L₂(w, λ; B)`` at the input.
    lower_gap: float32 scalar, ``L₂(w, λ; B) − L₂(u, λ; B)`` at the input
      (the penalty bracket; ``≥ 0`` once ``u`` tracks ``w*(λ)``).
    weights: float32 ``[K]``, ``λ = softmax(p)`` at the input (for logs).
  """
  copy: PyTree
  copy_opt_state: optax.OptState
  count: jax.Array
  alpha: jax.Array
  key: jax.Array | None
  copy_blocks: jax.Array | None
  model_blocks: jax.Array | None
  inner_loss: jax.Array
  lower_gap: jax.Array
  weights: jax.Array


def _alpha_at(alpha, count):
  value = alpha(count) if callable(alpha) else alpha
  return jnp.asarray(value, jnp.float32)


def _clip(tree, max_norm, enabled):
  if not enabled:
    return tree
  norm = optax.tree.norm(tree)
  scale = jnp.minimum(1.0, max_norm / jnp.maximum(norm, 1e-30))
  return optax.tree.scale(scale, tree)


def _lisa_masks(state, lisa, params):
  """Per-leaf masks of ``u`` and ``w`` this step, and the block draws."""
  if lisa is None:
    return None, None, None, None
  key = jax.random.wrap_key_data(state.key)
  copy_blocks, model_blocks = _lisa.draw_blocks(key, state.count, lisa)
  return (_lisa.leaf_mask(params.lower, copy_blocks, lisa),
          _lisa.leaf_mask(params.lower, model_blocks, lisa),
          copy_blocks, model_blocks)


@declare_static("copy_optimizer", "lisa", "seed", "clip_at_alpha")
def scale_by_scalebio(
    alpha: float | optax.Schedule,
    copy_optimizer: optax.GradientTransformation,
    *,
    lisa: _lisa.Lisa | None = None,
    seed: int = 0,
    clip_at_alpha: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""ScaleBiO's ``u`` step and the directions ``(d_p, d_w)``.

  ``update(outer_grads, state, params, *, inner_loss, inner_batch=None)``
  with ``outer_grads = ∇L₁(p, w; V)`` (``make_step`` computes it) and
  ``inner_loss(p, w, batch) = L₂(w, softmax(p); batch)`` (e.g. built on
  :func:`source_weighted_loss`) does steps 1–3 of the module docstring and
  returns ``Params(upper=d_p, lower=d_w)``.

  Args:
    alpha: the penalty ``α`` (the released scripts: 10 for GPT-2, 100 for
      the large models), or a schedule ``k -> α_k`` for a growing penalty.
    copy_optimizer: ``u``'s optimizer (released code: AdamW, the same as
      ``w``'s).
    lisa: train only a few random blocks of ``u`` and of ``w`` at a time
      (drawn separately for the two); None trains everything. ``w``'s mask
      zeroes ``d_w`` on frozen blocks; :func:`scalebio` also holds ``w``'s
      optimizer state there (it passes the mask to the lower optimizer,
      wrapped in ``bilevel.lisa_frozen_aware``, as the ``lisa_mask`` extra
      argument; a hand-made chain must do the same, or that state decays).
    seed: seed of the LISA draws.
    clip_at_alpha: clip ``α∇_u L₂`` and ``d_w`` to global norm ``≤ α``
      (the later release's ``--clip_model``).

  Returns:
    A transformation whose state is a :class:`ScaleBiOState`.
  """
  if lisa is not None:
    lisa = lisa.check("scalebio")
  copy_optimizer = optax.with_extra_args_support(copy_optimizer)

  def init_fn(params):
    params = check_params(params, "scalebio")
    # Distinct buffers: a step may donate params and state together.
    copy = jax.tree.map(lambda l: jnp.array(l, copy=True), params.lower)
    scalar = lambda: jnp.zeros([], jnp.float32)
    blocks = (lambda: None) if lisa is None else (
        lambda: jnp.zeros([lisa.num_blocks], bool))
    key = None if lisa is None else jax.random.key_data(
        jax.random.key(seed))
    if jnp.ndim(params.upper) != 1:
      raise ValueError("scalebio: params.upper must be the source logits p"
                       f" [K], got shape {jnp.shape(params.upper)}")
    weights = jax.nn.softmax(jnp.asarray(params.upper, jnp.float32))
    return ScaleBiOState(copy, copy_optimizer.init(copy),
                         jnp.zeros([], jnp.int32), scalar(), key, blocks(),
                         blocks(), scalar(), scalar(), weights)

  def update_fn(outer_grads, state, params=None, **extra_args):
    params = check_params(params, "scalebio")
    if outer_grads is None or isinstance(outer_grads, OuterGradsNotUsed):
      raise ValueError("scalebio.update() needs outer_grads = ∇L₁(params) "
                       "on the validation batch (make_step computes it).")
    (inner_loss,) = require_extra_args("scalebio", extra_args, "inner_loss")
    batch = extra_args.get("inner_batch")
    p, w, u = params.upper, params.lower, state.copy
    alpha_k = _alpha_at(alpha, state.count)
    copy_mask, model_mask, copy_blocks, model_blocks = _lisa_masks(
        state, lisa, params)

    l2_w, (gp_w, gw) = jax.value_and_grad(inner_loss, argnums=(0, 1))(
        p, w, batch)
    l2_u, (gp_u, gu) = jax.value_and_grad(inner_loss, argnums=(0, 1))(
        p, u, batch)
    copy_grads = _clip(optax.tree.scale(alpha_k, gu), alpha_k, clip_at_alpha)
    copy_updates, copy_opt_state = _lisa.masked_update(
        copy_optimizer, copy_grads, state.copy_opt_state, u, copy_mask)
    d_w = _clip(optax.tree.add_scale(outer_grads.lower, alpha_k, gw),
                alpha_k, clip_at_alpha)
    if model_mask is not None:
      d_w = _lisa.zero_inactive(d_w, model_mask)
    d_p = optax.tree.add_scale(outer_grads.upper, alpha_k,
                               optax.tree.sub(gp_w, gp_u))
    state = ScaleBiOState(
        copy=optax.apply_updates(u, copy_updates),
        copy_opt_state=copy_opt_state,
        count=optax.safe_int32_increment(state.count), alpha=alpha_k,
        key=state.key, copy_blocks=copy_blocks, model_blocks=model_blocks,
        inner_loss=jnp.asarray(l2_w, jnp.float32),
        lower_gap=jnp.asarray(l2_w - l2_u, jnp.float32),
        weights=jax.nn.softmax(jnp.asarray(p, jnp.float32)))
    return cast_like(Params(d_p, d_w), params), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _lisa_chain(solver, levels, lisa):
  """``optax.chain(solver, levels)`` passing ``w``'s LISA mask to ``levels``.

  The state is ``(solver_state, levels_state)``, as ``optax.chain``'s.
  """

  def init_fn(params):
    return solver.init(params), levels.init(params)

  def update_fn(updates, state, params=None, **extra_args):
    directions, solver_state = solver.update(updates, state[0], params,
                                             **extra_args)
    mask = _lisa.leaf_mask(params.lower, solver_state.model_blocks,
                           lisa)
    updates, levels_state = levels.update(
        directions, state[1], params, lisa_mask=Params(None, mask),
        **extra_args)
    return updates, (solver_state, levels_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


@declare_static("lisa", "seed", "clip_at_alpha", "upper_optimizer",
                "lower_optimizer", "copy_optimizer")
def scalebio(
    alpha: float | optax.Schedule,
    *,
    upper_optimizer: optax.GradientTransformation,
    lower_optimizer: optax.GradientTransformation,
    copy_optimizer: optax.GradientTransformation | None = None,
    lisa: _lisa.Lisa | None = None,
    seed: int = 0,
    clip_at_alpha: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """ScaleBiO (Pan et al., ACL 2025, Alg. 1) as one optax chain.

  ``chain(scale_by_scalebio(α, copy_optimizer), per_level(upper_optimizer,
  lower_optimizer))``; with ``lisa`` the lower optimizer also gets ``w``'s
  block mask, so frozen blocks get zero updates and keep their optimizer
  state.

  Args:
    alpha: see :func:`scale_by_scalebio`.
    upper_optimizer: the optimizer of the source logits ``p`` (released
      code: AdamW, lr 1e-2, weight decay 0.01).
    lower_optimizer: ``w``'s optimizer (released code: AdamW).
    copy_optimizer: ``u``'s optimizer; default ``lower_optimizer``.
    lisa: see :func:`scale_by_scalebio`.
    seed: see :func:`scale_by_scalebio`.
    clip_at_alpha: see :func:`scale_by_scalebio`.

  Returns:
    A transformation over :class:`bilevel.Params`.
  """
  solver = scale_by_scalebio(alpha, copy_optimizer or lower_optimizer,
                             lisa=lisa, seed=seed,
                             clip_at_alpha=clip_at_alpha)
  if lisa is None:
    return optax.chain(solver, per_level(upper_optimizer, lower_optimizer))
  levels = per_level(upper_optimizer, _lisa.frozen_aware(lower_optimizer))
  return _lisa_chain(solver, levels, lisa)
