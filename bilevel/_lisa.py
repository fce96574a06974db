"""LISA: layerwise importance sampling, a few random blocks trained at a time.

Every ``every`` steps, ``num_active`` of the model's ``num_blocks``
transformer blocks are drawn uniformly without replacement; the others are
frozen until the next draw. Leaves outside every block (embeddings, final
norm, output head) always train. A frozen leaf gets a zero update and its
optimizer state (Adam's moments) is held, as a PyTorch parameter with
``requires_grad=False`` is skipped by its optimizer.

Draw ``r = ⌊k / every⌋`` of step ``k`` uses ``fold_in(key, r)``, so the mask
is a pure function of ``(key, k)`` and a resumed run draws what the
uninterrupted run drew.

In JAX the masks are traced values (one compiled step serves every draw):
the frozen blocks' gradients are still computed and zeroed, and their
optimizer state stays allocated, so LISA here changes *what* trains, not the
memory or time of a step (PyTorch saves by not allocating gradients and
optimizer state for frozen parameters).

References:
  Pan, Liu, Diao, Pi, Zhang, Zhang, *LISA: Layerwise Importance Sampling for
  Memory-Efficient Large Language Model Fine-Tuning*, NeurIPS 2024.
  Pan et al., *ScaleBiO*, ACL 2025 (§3.4: 2 blocks every 20 steps, drawn
  separately for the two model copies).
"""

import re
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

PyTree = Any
BlockOf = Callable[[tuple[Any, ...]], int | None]


def blocks_by_index(container: str = "blocks") -> BlockOf:
  """``block_of(path)``: the integer key after ``container`` in the path.

  For an NNX model whose blocks live in ``self.blocks = nnx.List([...])``,
  the path ``('blocks', 3, 'attn', 'qkv', 'kernel')`` is in block 3; a
  path without ``container`` (embedding, head) is in no block (``None``).
  """

  def block_of(path):
    names = [_key_name(k) for k in path]
    for name, following in zip(names, names[1:]):
      if name == container and re.fullmatch(r"\d+", following):
        return int(following)
    return None

  return block_of


def _key_name(key: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


class Lisa(NamedTuple):
  """LISA's schedule (static: it fixes shapes and the block structure).

  Attributes:
    num_blocks: the model's blocks, ``B``.
    num_active: blocks trained at a time (ScaleBiO: 2).
    every: steps between draws (ScaleBiO: 20).
    block_of: ``path -> block index in [0, B) | None`` for each parameter
      leaf (``None``: always trained); default :func:`blocks_by_index`.
  """
  num_blocks: int
  num_active: int = 2
  every: int = 20
  block_of: BlockOf | None = None

  def check(self, method: str) -> "Lisa":
    """Returns ``self`` if consistent, else raises ``ValueError``."""
    if not 1 <= self.num_active <= self.num_blocks or self.every < 1:
      raise ValueError(
          f"{method}: Lisa needs 1 <= num_active <= num_blocks and every >="
          f" 1, got num_active={self.num_active}, num_blocks="
          f"{self.num_blocks}, every={self.every}")
    return self


def draw_blocks(key: jax.Array, count: jax.Array, lisa: Lisa
                ) -> tuple[jax.Array, jax.Array]:
  """The active blocks at step ``count`` for two model copies.

  Args:
    key: a typed PRNG key.
    count: int32 scalar step ``k``.
    lisa: the schedule.

  Returns:
    Two bool ``[num_blocks]`` masks (first copy, second copy), each with
    ``num_active`` True entries, drawn independently from
    ``fold_in(key, ⌊k / every⌋)``.
  """
  draw_key = jax.random.fold_in(key, count // lisa.every)

  def draw(k):
    order = jax.random.permutation(k, lisa.num_blocks)
    return jnp.zeros([lisa.num_blocks], bool).at[
        order[:lisa.num_active]].set(True)

  first, second = jax.random.split(draw_key)
  return draw(first), draw(second)


def leaf_mask(params: PyTree, active_blocks: jax.Array, lisa: Lisa
              ) -> PyTree:
  """Per leaf of ``params``: a bool scalar, whether it trains now.

  Raises:
    ValueError: ``block_of`` puts no leaf in some block, or gives an index
      outside ``[0, num_blocks)`` (a wrong ``num_blocks`` or ``block_of``
      would otherwise freeze nothing, or everything, in silence).
  """
  block_of = lisa.block_of or blocks_by_index()
  paths, treedef = jax.tree.flatten_with_path(params)
  blocks = [block_of(path) for path, _ in paths]
  seen = {b for b in blocks if b is not None}
  if seen != set(range(lisa.num_blocks)):
    raise ValueError(
        f"Lisa(num_blocks={lisa.num_blocks}): block_of found blocks "
        f"{sorted(seen)} among the parameters; every block in "
        f"[0, {lisa.num_blocks}) needs a leaf and no index may lie outside")
  masks = [jnp.asarray(True) if b is None else active_blocks[b]
           for b in blocks]
  return jax.tree.unflatten(treedef, masks)


def zero_inactive(tree: PyTree, mask: PyTree) -> PyTree:
  """``tree`` with the frozen leaves (``mask`` False) set to zero."""
  return jax.tree.map(lambda x, m: jnp.where(m, x, jnp.zeros_like(x)), tree,
                      mask)


def hold_inactive(new_state: optax.OptState, old_state: optax.OptState,
                  params: PyTree, mask: PyTree) -> optax.OptState:
  """An optimizer state with the frozen leaves' entries kept at ``old_state``.

  Every subtree of the state structured like ``params`` (Adam's ``mu`` and
  ``nu``, momentum traces) takes ``old`` where ``mask`` is False; scalars
  such as step counts advance (one count for all leaves, where PyTorch's
  AdamW counts per parameter).
  """
  structure = jax.tree.structure(params)
  shapes = [jnp.shape(x) for x in jax.tree.leaves(params)]

  def mirrors(x):
    return (jax.tree.structure(x) == structure
            and [jnp.shape(v) for v in jax.tree.leaves(x)] == shapes)

  def hold(new, old):
    if not mirrors(new):
      return new
    return jax.tree.map(lambda n, o, m: jnp.where(m, n, o), new, old, mask)

  return jax.tree.map(hold, new_state, old_state, is_leaf=mirrors)


def masked_update(tx: optax.GradientTransformation, grads: PyTree,
                  state: optax.OptState, params: PyTree,
                  mask: PyTree | None, **extra_args
                  ) -> tuple[PyTree, optax.OptState]:
  """``tx.update`` with frozen leaves getting zero updates and held state.

  ``mask`` None is ``tx.update`` itself.
  """
  tx = optax.with_extra_args_support(tx)
  if mask is None:
    return tx.update(grads, state, params, **extra_args)
  updates, new_state = tx.update(zero_inactive(grads, mask), state, params,
                                 **extra_args)
  return (zero_inactive(updates, mask),
          hold_inactive(new_state, state, params, mask))


def frozen_aware(tx: optax.GradientTransformation
                 ) -> optax.GradientTransformationExtraArgs:
  """``tx`` that honours a ``lisa_mask`` extra argument (see
  :func:`masked_update`); without it, ``tx`` unchanged."""
  tx = optax.with_extra_args_support(tx)

  def update_fn(updates, state, params=None, *, lisa_mask=None,
                **extra_args):
    return masked_update(tx, updates, state, params, lisa_mask, **extra_args)

  return optax.GradientTransformationExtraArgs(tx.init, update_fn)
