"""Multi-process runs: ``jax.distributed`` start-up and the global mesh.

The same command runs on one process or many::

  python -m experiments.main --config=... --workdir=DIR \
      --coordinator_address=HOST:PORT --num_processes=N --process_id=I

:func:`initialize` starts ``jax.distributed`` from those flags, from
``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``, or
from a multi-process cluster launcher that ``jax.distributed.initialize()``
detects (SLURM, Open MPI, GKE TPU; on Cloud TPU VMs ``--num_processes``
alone); with none of these the run stays single-process and nothing here
changes it.

Once started, the training loop places everything on one global mesh with a
single axis, ``'data'``, over every device of every process (see
:func:`placement`):

* the training state (params, solver state, step, key) is sharded FSDP-style:
  each leaf along its largest dimension that the device count divides, else
  replicated (big_vision's ``fsdp`` rule), so optimizer and solver state
  that mirrors a parameter shards like it;
* each batch leaf is split along its leading (example) dimension when the
  device count divides it, else replicated. Every process computes the same
  global batch from the step (the data stream is a pure function of it) and
  puts on its own devices only the rows of its shard;
* the step is ``jax.jit`` with those shardings out (GSPMD inserts the
  collectives) and donates the state;
* checkpoints are written by every process, each its own shards, and restored
  against the sharded abstract state, so a checkpoint restores on any number
  of processes and devices;
* evaluation gathers the params to every host and runs there unchanged; only
  process 0 writes files (:func:`is_primary`).

A config may instead ask for a two-axis ``(data, fsdp)`` mesh
(``config.mesh``, see :func:`placement`), in one process or many, over every
global device. Then leaves whose ``nnx.Variable`` names their logical axes
(``models.sharding``) are placed by its rules table, the others by the
largest-dimension rule over ``'fsdp'``, and batches split their examples
over both axes.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import bilevel
from models import sharding

PyTree = Any
DATA_AXIS = sharding.DATA_AXIS

_ENV = {"coordinator_address": "JAX_COORDINATOR_ADDRESS",
        "num_processes": "JAX_NUM_PROCESSES",
        "process_id": "JAX_PROCESS_ID"}


def _launcher_processes() -> int:
  """Processes a cluster launcher started (1 when there is none)."""
  for name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
    if os.environ.get(name, "").isdigit():
      return int(os.environ[name])
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return len(hosts.split(",")) if hosts else 1


def initialize(coordinator_address: str | None = None,
               num_processes: int | None = None,
               process_id: int | None = None) -> bool:
  """Starts ``jax.distributed`` when the run is one of several processes.

  Must run before anything touches a JAX backend. See
  :func:`distributed_args` for where the arguments come from.

  Args:
    coordinator_address: ``host:port`` of process 0's coordinator service.
    num_processes: the number of processes.
    process_id: this process's index in ``[0, num_processes)``.

  Returns:
    Whether ``jax.distributed`` was started.
  """
  args = distributed_args(coordinator_address, num_processes, process_id)
  if args is None:
    return False
  if jax.config.jax_cpu_collectives_implementation in (None, "none"):
    # Without CPU collectives a CPU mesh over several processes cannot run.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**args)
  logging.info("jax.distributed: process %d of %d, %d of %d devices local",
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
  return True


def distributed_args(coordinator_address: str | None = None,
                     num_processes: int | None = None,
                     process_id: int | None = None
                     ) -> dict[str, Any] | None:
  """The ``jax.distributed.initialize`` arguments, or None for one process.

  Each argument left None is read from its environment variable
  (``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``);
  those still missing are left to ``jax.distributed.initialize``'s cluster
  detection. With no argument, no variable and no multi-process launcher
  (SLURM ``SLURM_NTASKS``, Open MPI ``OMPI_COMM_WORLD_SIZE`` or a multi-host
  TPU's ``TPU_WORKER_HOSTNAMES``), the run is single-process: None.

  Args:
    coordinator_address: ``host:port`` of process 0's coordinator service.
    num_processes: the number of processes.
    process_id: this process's index in ``[0, num_processes)``.

  Returns:
    The keyword arguments that are known (possibly none, for cluster
    detection), or None.
  """
  given = {"coordinator_address": coordinator_address,
           "num_processes": num_processes, "process_id": process_id}
  for name, value in given.items():
    raw = os.environ.get(_ENV[name])
    if value is not None or not raw:
      continue
    if name != "coordinator_address" and not raw.isdigit():
      raise ValueError(f"{_ENV[name]}={raw!r} must be a non-negative integer")
    given[name] = raw if name == "coordinator_address" else int(raw)
  args = {k: v for k, v in given.items() if v is not None}
  if not args and _launcher_processes() < 2:
    return None
  return args


def is_primary() -> bool:
  """Whether this process writes the run's files (process 0)."""
  return jax.process_index() == 0


@functools.cache
def _global_mesh() -> jax.sharding.Mesh:
  return jax.make_mesh((jax.device_count(),), (DATA_AXIS,),
                       axis_types=(jax.sharding.AxisType.Auto,))


def state_spec(shape: tuple[int, ...], num_shards: int,
               axis: str = DATA_AXIS) -> P:
  """FSDP spec: the largest dim divisible by ``num_shards``, else none.

  The chosen dim is split over mesh ``axis`` (of size ``num_shards``).
  """
  dims = [d for d in range(len(shape)) if shape[d] % num_shards == 0]
  if num_shards == 1 or not dims:
    return P()
  largest = max(dims, key=lambda d: (shape[d], -d))
  return P(*(axis if d == largest else None for d in range(len(shape))))


def batch_spec(shape: tuple[int, ...], num_shards: int,
               axes: str | tuple[str, ...] = DATA_AXIS) -> P:
  """Examples split along the leading dim when ``num_shards`` divides it.

  ``axes``: the mesh axis (or axes, together of size ``num_shards``) the
  examples are split over.
  """
  if num_shards > 1 and shape and shape[0] % num_shards == 0:
    return P(axes)
  return P()


def _to_global(x, sharding: NamedSharding) -> jax.Array:
  if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(
      sharding, x.ndim):
    return x
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return jax.device_put(x, sharding)
  # The same value in every process; each puts only its own shards.
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, sharding,
                                      lambda index: host[index])


def to_host(tree: PyTree) -> PyTree:
  """The tree as numpy arrays, whole on every process."""

  def gather(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x)

  return jax.tree.map(gather, tree)


class Placement:
  """Where the training loop puts its state, batches and step.

  Single-process (``mesh`` None) every method but :meth:`abstract` and
  :meth:`state` returns its input unchanged or what the loop used before, so
  single-process runs are as they were; :meth:`state` commits the state to
  the default device, where :meth:`abstract` restores it.

  On a ``('data',)`` mesh every state leaf is sharded by
  :func:`state_spec`; on a ``('data', 'fsdp')`` mesh
  (:func:`models.sharding.make_mesh`) leaves with logical axis names follow
  ``models.sharding.LOGICAL_RULES`` and the rest :func:`state_spec` over
  ``'fsdp'``, and batches split over both axes.

  Args:
    abstract_state: the training state as ``jax.ShapeDtypeStruct`` leaves.
    mesh: the global mesh, None for a single-process run.
  """

  def __init__(self, abstract_state: PyTree,
               mesh: jax.sharding.Mesh | None = None):
    self.mesh = mesh
    self.shardings = None
    if mesh is None:
      return
    if sharding.FSDP_AXIS in mesh.axis_names:
      fsdp = mesh.shape[sharding.FSDP_AXIS]
      self._batch_axes = sharding.BATCH_AXES
      self.shardings = sharding.tree_shardings(
          abstract_state, mesh, fallback=lambda _, shape: state_spec(
              shape, fsdp, sharding.FSDP_AXIS))
    else:
      self._batch_axes = DATA_AXIS
      self.shardings = jax.tree.map(
          lambda x: NamedSharding(mesh, state_spec(x.shape, mesh.size)),
          abstract_state)

  def abstract(self, abstract_state: PyTree) -> PyTree:
    """The abstract state with its shardings (the restore target).

    Single-process, leaves without a sharding get the default device: orbax
    would otherwise reuse the saved sharding, which names the devices of the
    run that wrote the checkpoint.
    """
    if self.mesh is None:
      device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
      shardings = jax.tree.map(
          lambda x: getattr(x, "sharding", None) or device, abstract_state)
    else:
      shardings = self.shardings
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        abstract_state, shardings)

  def state(self, state: PyTree) -> PyTree:
    """The state as global arrays sharded like :meth:`abstract`.

    Single-process, committed to the default device as a restored state
    is: a fresh and a resumed run then compile the same step (a committed
    argument changes the compiled module), so the second finds the first's
    in a persistent compilation cache.
    """
    if self.mesh is None:
      return jax.device_put(state, jax.local_devices()[0])
    return jax.tree.map(_to_global, state, self.shardings)

  def batches(self, batches: Callable[[int], PyTree]
              ) -> Callable[[int], PyTree]:
    """``batches`` with each batch made of global, data-sharded arrays."""
    if self.mesh is None:
      return batches
    mesh, axes = self.mesh, self._batch_axes

    def place(step):
      return jax.tree.map(
          lambda x: _to_global(x, NamedSharding(
              mesh, batch_spec(np.shape(x), mesh.size, axes))),
          batches(step))

    return place

  def make_step(self, solver, problem: bilevel.Problem) -> Callable:
    """``bilevel.make_step`` jitted to keep params and state in place.

    ``step(params, solver_state, batches)`` donates ``params`` and
    ``solver_state``.
    """
    if self.mesh is None:
      return bilevel.make_step(solver, problem, donate=True)
    step = bilevel.make_step(solver, problem, jit=False)
    replicated = NamedSharding(self.mesh, P())
    out = (self.shardings["params"], self.shardings["solver_state"],
           replicated)
    return jax.jit(step, out_shardings=out, donate_argnums=(0, 1))

  def host(self, tree: PyTree) -> PyTree:
    """``tree`` whole on every host (numpy), for evaluation."""
    return tree if self.mesh is None else to_host(tree)


def placement(abstract_state: PyTree,
              mesh_shape: tuple[int, int] | None = None) -> Placement:
  """The placement of a training state.

  Args:
    abstract_state: the training state as ``jax.ShapeDtypeStruct`` leaves.
    mesh_shape: ``(data, fsdp)`` (one may be -1: the rest of the devices)
      for a :func:`models.sharding.make_mesh` mesh over every global
      device, in one process or many; None: a ``('data',)`` mesh once
      ``jax.distributed`` is up, else nothing is placed.

  Raises:
    ValueError: ``mesh_shape`` does not fit the number of devices.
  """
  if mesh_shape is not None:
    mesh = sharding.make_mesh(*mesh_shape)
  elif jax.distributed.is_initialized():
    mesh = _global_mesh()
  else:
    mesh = None
  return Placement(abstract_state, mesh)
