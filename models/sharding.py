"""Logical axis names → mesh axes: one rules table, a (data, fsdp) mesh.

Parameters name their dimensions with logical axes (``'embed'``, ``'mlp'``,
...) in the ``nnx.Variable`` metadata key ``out_sharding`` (set with
``nnx.Param(x, out_sharding=names, eager_sharding=False)`` or a layer's
``kernel_metadata=``); :data:`LOGICAL_RULES` maps each to a mesh axis. The
mesh has two axes, ``('data', 'fsdp')``: parameters shard over ``'fsdp'``
(FSDP: the ``'embed'`` dimension of every weight), examples over both, since
FSDP is data parallel too. There is no tensor parallelism yet: every other
logical axis is replicated.

A leaf's names are the aux data of its ``Variable`` node, so they survive
``jax.tree.map``: an optimizer state built by mapping over an ``nnx.State``
(optax's ``mu`` and ``nu``) carries its parameters' names and shards like
them, with no extra code.

Typical use, big_vision style::

  mesh = make_mesh(data=1, fsdp=-1)
  abstract = jax.eval_shape(init_state)
  shardings = tree_shardings(abstract, mesh)
  state = jax.jit(init_state, out_shardings=shardings)()
  batch = shard_batch(host_batch, mesh)
"""

from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

PyTree = Any
MeshAxes = str | tuple[str, ...] | None
DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)
# Logical axis -> mesh axis (None: replicated). FSDP only: shard the model
# width, keep every other dimension whole until tensor parallelism lands.
LOGICAL_RULES: Mapping[str, MeshAxes] = MappingProxyType({
    "embed": FSDP_AXIS,
    "vocab": None,
    "mlp": None,
    "heads": None,
    "experts": None,
    "layers": None,
    "lora": None,
})


def make_mesh(data: int, fsdp: int,
              devices: Sequence[jax.Device] | None = None
              ) -> jax.sharding.Mesh:
  """A ``(data, fsdp)`` mesh with ``Auto`` axes over ``devices``.

  Args:
    data: size of the ``'data'`` axis, or -1 for the devices ``fsdp``
      leaves.
    fsdp: size of the ``'fsdp'`` axis, or -1 for the devices ``data``
      leaves.
    devices: the devices (default: ``jax.devices()``, every process's).

  Raises:
    ValueError: a size is neither positive nor -1, both are -1, or the
      sizes do not multiply to the number of devices.
  """
  devices = jax.devices() if devices is None else list(devices)
  n = len(devices)
  for name, size in (("data", data), ("fsdp", fsdp)):
    if isinstance(size, bool) or not isinstance(size, int) or not (
        size >= 1 or size == -1):
      raise ValueError(f"mesh {name}={size!r} must be a positive int or -1")
  if data == fsdp == -1:
    raise ValueError("at most one of mesh data and fsdp may be -1")
  if -1 in (data, fsdp):
    given = data * fsdp * -1
    if n % given:
      raise ValueError(f"mesh data={data}, fsdp={fsdp}: {given} does not"
                       f" divide the {n} devices")
    data, fsdp = (n // given, fsdp) if data == -1 else (data, n // given)
  if data * fsdp != n:
    raise ValueError(f"mesh data={data} × fsdp={fsdp} does not match the"
                     f" {n} devices")
  auto = jax.sharding.AxisType.Auto
  return jax.make_mesh((data, fsdp), BATCH_AXES, axis_types=(auto, auto),
                       devices=devices)


def logical_spec(names: Sequence[str | None],
                 rules: Mapping[str, MeshAxes] = LOGICAL_RULES) -> P:
  """The ``PartitionSpec`` of logical axis ``names`` (None: replicated).

  Raises:
    KeyError: a name the rules do not know.
    ValueError: two dimensions map to the same mesh axis.
  """
  axes = []
  for name in names:
    if name is not None and name not in rules:
      raise KeyError(f"unknown logical axis name {name!r}; known:"
                     f" {sorted(rules)}")
    axes.append(None if name is None else rules[name])
  used = [a for axis in axes if axis is not None
          for a in ((axis,) if isinstance(axis, str) else axis)]
  if len(used) != len(set(used)):
    raise ValueError(f"logical axes {tuple(names)} use a mesh axis twice:"
                     f" {tuple(axes)}")
  return P(*axes)


def _shape(x) -> tuple[int, ...]:
  return tuple(x.shape) if hasattr(x, "shape") else np.shape(x)


def _axis_size(mesh: jax.sharding.Mesh, axis: MeshAxes) -> int:
  axes = () if axis is None else (axis,) if isinstance(axis, str) else axis
  return int(np.prod([mesh.shape[a] for a in axes]))


def _named_spec(path, shape, names, mesh, rules) -> P:
  """The spec of logical ``names``, checked against ``shape`` and ``mesh``."""
  where = jax.tree_util.keystr(path)
  if len(names) != len(shape):
    raise ValueError(f"{where}: logical axes {tuple(names)} do not match"
                     f" shape {shape}")
  spec = logical_spec(names, rules)
  for dim, name, axis in zip(shape, names, spec):
    size = _axis_size(mesh, axis)
    if dim % size:
      raise ValueError(f"{where} of shape {shape}: dimension {dim}"
                       f" ({name!r}) is not divisible by mesh axis {axis!r}"
                       f" of size {size}")
  return spec


def _replicated(path, shape) -> P:
  del path, shape
  return P()


def tree_shardings(tree: PyTree, mesh: jax.sharding.Mesh,
                   rules: Mapping[str, MeshAxes] = LOGICAL_RULES,
                   fallback: Callable[[Any, tuple[int, ...]], P] = _replicated
                   ) -> PyTree:
  """A ``NamedSharding`` for each array of ``tree`` from its logical names.

  Args:
    tree: any pytree of arrays or ``jax.ShapeDtypeStruct`` s, which may
      hold ``nnx.Variable`` s (an ``nnx.State``, an optimizer state mapped
      over one); a Variable's ``out_sharding`` metadata names its value's
      dimensions.
    mesh: the mesh the rules' axes live on.
    rules: logical axis name → mesh axis (or axes, or None).
    fallback: ``(path, shape) -> PartitionSpec`` of a leaf without names
      (default: replicated; optimizer counts, PRNG keys, plain dicts).

  Returns:
    A tree of ``NamedSharding`` with the structure of
    ``jax.tree.map(lambda x: x, tree)`` (Variables kept, with their
    metadata), usable as ``out_shardings`` of ``jax.jit`` or as the
    shardings of an orbax restore target.

  Raises:
    KeyError: a logical name missing from ``rules``.
    ValueError: names whose count differs from the leaf's rank, or a
      dimension its mesh axis size does not divide (naming the leaf's path).
  """

  def place(path, x):
    if not isinstance(x, nnx.Variable):
      return NamedSharding(mesh, fallback(path, _shape(x)))
    shape = _shape(x.get_value())
    names = x.get_metadata().get("out_sharding")
    spec = (_named_spec(path, shape, names, mesh, rules) if names
            else fallback(path, shape))
    return x.replace(NamedSharding(mesh, spec))

  return jax.tree_util.tree_map_with_path(
      place, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Examples (the leading dimension) split over ``('data', 'fsdp')``."""
  return NamedSharding(mesh, P(BATCH_AXES))


def shard_batch(batch: PyTree, mesh: jax.sharding.Mesh) -> PyTree:
  """``batch`` as global arrays split along the examples.

  Every process passes the same global host batch and puts only its own
  devices' rows.

  Args:
    batch: a pytree of host arrays ``[B, ...]``.
    mesh: a :func:`make_mesh` mesh.

  Raises:
    ValueError: a leaf whose leading dimension the number of devices does
      not divide (naming its path and shape).
  """
  sharding = batch_sharding(mesh)

  def put(path, x):
    host = np.asarray(x)
    if not host.ndim or host.shape[0] % mesh.size:
      raise ValueError(f"batch leaf {jax.tree_util.keystr(path)} of shape"
                       f" {host.shape}: the leading dimension must be"
                       f" divisible by the {mesh.size} devices")
    return jax.make_array_from_callback(host.shape, sharding,
                                        lambda index: host[index])

  return jax.tree_util.tree_map_with_path(put, batch)


def bytes_per_device(tree: PyTree) -> dict[jax.Device, int]:
  """Bytes of ``tree`` 's arrays held on each (addressable) device."""
  held: dict[jax.Device, int] = {}
  for x in jax.tree.leaves(tree):
    for shard in x.addressable_shards:
      held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
  return held
