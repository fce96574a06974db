"""Checkpoints of training state: the only module that uses orbax.

A checkpoint is one pytree of arrays, whatever the caller puts in it: params,
solver state (NamedTuples of arrays), step, PRNG key and data position. It is
written asynchronously and restored against an abstract target, so NamedTuple
types and shardings come back as the target describes them::

  ckpt = Checkpointer(workdir / "checkpoints", max_to_keep=3)
  abstract = jax.eval_shape(init_state, config)   # optionally with shardings
  restored = ckpt.restore_or_none(abstract)
  state = init_state(config) if restored is None else restored[1]
  for step in range(int(state["step"]), total_steps):
    state = train_step(state, next(batches))
    ckpt.save(step + 1, state)
  ckpt.close()

PRNG keys: typed keys (``jax.random.key``) are stored as their raw
``jax.random.key_data`` (uint32) and wrapped back with
``jax.random.wrap_key_data`` and the implementation named by the target's key
dtype, so the files never depend on orbax's own key support. Legacy raw keys
(``jax.random.PRNGKey``) are ordinary uint32 arrays and need nothing.
``key_to_data`` / ``data_to_key`` do the same by hand.

Orbax never checks a step on read, so each step carries the SHA-256 of its
arrays in its step metadata, checked on restore: a step that cannot be read or
whose arrays do not match (garbled bytes of the same size) makes ``restore``
walk back to the newest good step, with a warning naming the step. A target
whose shapes differ from a step's raises :class:`ShapeMismatchError` at once:
the checkpoint is fine, the config is not. Half-written steps of a killed save
stay in ``<step>.orbax-checkpoint-tmp*`` directories, which orbax ignores. Use
one ``Checkpointer`` per directory.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

PyTree = Any
_CHECKSUM_KEY = "sha256"


class ShapeMismatchError(ValueError):
  """A checkpoint's arrays do not have the shapes the target asks for."""


class CorruptCheckpointError(ValueError):
  """A checkpoint's arrays do not match the checksum saved with them."""


def checksum(tree: PyTree) -> str | None:
  """SHA-256 of a pytree's arrays (dtype, shape, bytes, in leaf order).

  None when an array is not fully addressable from this process, which
  cannot read the other processes' shards.
  """
  digest = hashlib.sha256()
  for leaf in jax.tree.leaves(key_to_data(tree)):
    if not getattr(leaf, "is_fully_addressable", True):
      return None
    array = np.ascontiguousarray(jax.device_get(leaf))
    digest.update(f"{array.dtype}{array.shape}".encode())
    digest.update(array.tobytes())
  return digest.hexdigest()


def _leaf_name(path) -> str:
  """Orbax's name of a leaf: its path's keys joined by dots."""
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
  return ".".join(parts)


def _is_key(x: Any) -> bool:
  dtype = getattr(x, "dtype", None)
  return dtype is not None and jax.dtypes.issubdtype(
      dtype, jax.dtypes.prng_key
  )


def key_to_data(tree: PyTree) -> PyTree:
  """Replaces every typed PRNG key leaf by its raw uint32 key data.

  Args:
    tree: a pytree of arrays; typed keys (``jax.random.key``) may be leaves.

  Returns:
    The same pytree with each typed key `k` replaced by
    ``jax.random.key_data(k)`` (shape ``k.shape + impl_shape``).
  """
  return jax.tree.map(
      lambda x: jax.random.key_data(x) if _is_key(x) else x, tree
  )


def data_to_key(tree: PyTree, like: PyTree) -> PyTree:
  """Wraps raw key data back into typed keys where `like` holds typed keys.

  Args:
    tree: a pytree of arrays, as returned by ``key_to_data``.
    like: a pytree of the same structure whose leaves (arrays or
      ``jax.ShapeDtypeStruct``) tell which leaves are typed keys and of what
      implementation.

  Returns:
    `tree` with the key leaves wrapped by ``jax.random.wrap_key_data``.
  """

  def wrap(x, ref):
    if not _is_key(ref):
      return x
    return jax.random.wrap_key_data(x, impl=_key_impl(ref.dtype))

  return jax.tree.map(wrap, tree, like)


def _key_impl(dtype) -> Any:
  # The public API reads the implementation from a key array, not a dtype;
  # a scalar key of that dtype costs nothing.
  return jax.random.key_impl(jnp.zeros((), dtype))


def _abstract_key_data(tree: PyTree) -> PyTree:
  """The abstract ``key_to_data(tree)``, keeping each leaf's sharding."""

  def convert(x):
    if not _is_key(x):
      return x
    data = jax.eval_shape(
        jax.random.key_data, jax.ShapeDtypeStruct(x.shape, x.dtype)
    )
    # A spec over the key's dims leaves the trailing key-data dim replicated.
    sharding = getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding)

  return jax.tree.map(convert, tree)


class Checkpointer:
  """Saves and restores one pytree per step in a directory.

  Wraps an ``orbax.checkpoint.CheckpointManager`` holding a single
  ``StandardSave`` item per step.

  Args:
    directory: where step directories live; created if missing.
    max_to_keep: keep the newest this many steps (None keeps all).
    save_interval_steps: ``save`` writes only steps that are multiples of
      this, unless forced.
    async_save: write in a background thread; ``save`` returns once the
      arrays are copied off the device, so they may be donated afterwards.
    create: create `directory` if missing (False for read-only use).
  """

  def __init__(
      self,
      directory: str | os.PathLike[str],
      *,
      max_to_keep: int | None = 3,
      save_interval_steps: int = 1,
      async_save: bool = True,
      create: bool = True,
  ):
    self._directory = os.path.abspath(os.fspath(directory))
    # `max_to_keep` rather than the newer `preservation_policy`, which
    # orbax-checkpoint 0.11.0 (our lower bound) lacks.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        save_interval_steps=save_interval_steps,
        enable_async_checkpointing=async_save,
        create=create,
    )
    # The handler named up front lets `item_metadata` read unrestored steps.
    self._manager = ocp.CheckpointManager(
        self._directory, options=options,
        item_handlers=ocp.StandardCheckpointHandler())
    # Steps `restore` could not read; see `_drop_unreadable_from`.
    self._unreadable: set[int] = set()

  @property
  def directory(self) -> str:
    return self._directory

  def save(self, step: int, state: PyTree, *, force: bool = False) -> bool:
    """Starts writing `state` as `step`.

    After ``restore`` fell back past unreadable steps, the first save deletes
    those at or after `step`: orbax skips any step not newer than the latest
    one on disk, so they would otherwise block saving the rerun steps.

    Args:
      step: the step number naming the checkpoint.
      state: a pytree of arrays (NamedTuples, dicts, typed or raw keys,
        Python scalars).
      force: save even if `step` is off the save interval.

    Returns:
      Whether a save was started.
    """
    step = int(step)
    self._drop_unreadable_from(step)
    if not (force or self._manager.should_save(step)):
      return False
    return self._manager.save(
        step, args=ocp.args.StandardSave(key_to_data(state)), force=force,
        custom_metadata={_CHECKSUM_KEY: checksum(state)},
    )

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases the manager."""
    self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  def all_steps(self) -> list[int]:
    """The committed steps, oldest first (unfinished saves excluded)."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """The newest committed step, or None when there is none."""
    return self._manager.latest_step()

  def restore(
      self, abstract_state: PyTree, step: int | None = None
  ) -> tuple[int, PyTree]:
    """Restores a step against an abstract target.

    Args:
      abstract_state: a pytree like the saved one whose leaves are
        ``jax.ShapeDtypeStruct`` (e.g. from ``jax.eval_shape``) or arrays;
        a leaf's ``sharding``, when set, places the restored array.
      step: the step to restore; None tries the newest step, then each older
        one while the newer cannot be read, logging a warning for each.

    Returns:
      ``(step, state)``, with `state` shaped like `abstract_state`.

    Raises:
      FileNotFoundError: no readable checkpoint (or not `step`) exists.
      ShapeMismatchError: the step's arrays differ in shape from the target.
      CorruptCheckpointError: `step` was given and fails its checksum.
    """
    self.wait()
    if step is not None:
      if step not in self.all_steps():
        raise FileNotFoundError(
            f"No checkpoint for step {step} in {self._directory}; "
            f"steps: {self.all_steps()}."
        )
      return step, self._restore_step(abstract_state, step)
    return self._restore_newest(abstract_state, self.all_steps()[::-1])

  def restore_or_none(
      self, abstract_state: PyTree
  ) -> tuple[int, PyTree] | None:
    """Like ``restore(abstract_state)``, but None when no step exists.

    A directory whose steps all fail to read still raises, so that damaged
    checkpoints are never silently replaced by a fresh start.
    """
    if self.latest_step() is None:
      return None
    return self.restore(abstract_state)

  def _restore_newest(
      self, abstract_state: PyTree, steps: Sequence[int]
  ) -> tuple[int, PyTree]:
    for step in steps:
      try:
        return step, self._restore_step(abstract_state, step)
      except ShapeMismatchError:
        raise
      except Exception as e:  # noqa: BLE001 - any failure means unreadable.
        self._unreadable.add(step)
        logging.warning(
            "Skipping unreadable checkpoint step %d in %s: %s: %.1000s",
            step, self._directory, type(e).__name__, e,
        )
    raise FileNotFoundError(
        f"No readable checkpoint in {self._directory} "
        f"(tried steps {list(steps)})."
    )

  def _drop_unreadable_from(self, step: int) -> None:
    stale = sorted(s for s in self._unreadable if s >= step)
    self._unreadable.difference_update(stale)
    for s in stale:
      if s in self._manager.all_steps():
        logging.warning(
            "Deleting unreadable checkpoint step %d in %s before saving step "
            "%d.", s, self._directory, step,
        )
        self._manager.delete(s)

  def _check_shapes(self, target: PyTree, step: int) -> None:
    saved = {leaf.name: tuple(leaf.shape) for leaf in jax.tree.leaves(
        self._manager.item_metadata(step).tree)
             if hasattr(leaf, "name") and hasattr(leaf, "shape")}
    for path, leaf in jax.tree_util.tree_flatten_with_path(target)[0]:
      name = _leaf_name(path)
      if name in saved and saved[name] != tuple(leaf.shape):
        raise ShapeMismatchError(
            f"checkpoint step {step} in {self._directory} does not fit the"
            f" config: {name} has shape {saved[name]} there and"
            f" {tuple(leaf.shape)} in the config")

  def _restore_step(self, abstract_state: PyTree, step: int) -> PyTree:
    target = _abstract_key_data(abstract_state)
    self._check_shapes(target, step)
    restored = self._manager.restore(
        step, args=ocp.args.StandardRestore(target)
    )
    metadata = self._manager.metadata(step).custom_metadata or {}
    expected = metadata.get(_CHECKSUM_KEY)
    if expected is not None and checksum(restored) not in (expected, None):
      raise CorruptCheckpointError(
          f"step {step} does not match its checksum (damaged files)")
    return data_to_key(restored, abstract_state)
