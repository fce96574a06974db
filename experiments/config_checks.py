"""Start-up checks of numeric config values, named by their dotted key.

A key is checked by its last name: step counts, intervals, learning rates and
batch sizes must be positive (a zero step count or learning rate would
"succeed" with an untrained model). Hyper-cleaning's ``inner_batch_size`` and
``outer_batch_size`` may be 0, which means a full batch; warm-up may be 0.

The optional ``config.mesh`` asks for a ``(data, fsdp)`` device mesh
(``experiments.distributed.placement``)::

  config.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1})

Each size is a positive int or -1 (the devices the other leaves); a missing
one takes the default above. Absent or None: the mesh of
``experiments.distributed`` (none in a single process).
"""

import math
import numbers

import ml_collections

MESH_DEFAULTS = {"data": 1, "fsdp": -1}
# Last name (or its ``*_<name>`` suffix) -> the smallest valid value; the
# first entry that matches decides.
_MINIMUM = (
    ("inner_batch_size", 0), ("outer_batch_size", 0), ("warmup_steps", 0),
    ("steps", 1), ("every", 1), ("lr", math.ulp(0.0)), ("batch_size", 1),
)


def _minimum(name: str) -> float | None:
  for suffix, minimum in _MINIMUM:
    if name == suffix or name.endswith(f"_{suffix}"):
      return minimum
  return None


def _walk(node: ml_collections.ConfigDict, prefix: str = ""):
  for key, value in node.items():
    if isinstance(value, ml_collections.ConfigDict):
      yield from _walk(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", key, value


def mesh_shape(config: ml_collections.ConfigDict) -> tuple[int, int] | None:
  """``(data, fsdp)`` of ``config.mesh``, or None when it is absent or None.

  Raises:
    ValueError: ``config.mesh`` is not a ConfigDict, has a key other than
      ``data`` and ``fsdp``, a size that is not a positive int or -1, or
      both sizes -1.
  """
  mesh = config.get("mesh")
  if mesh is None:
    return None
  if not isinstance(mesh, ml_collections.ConfigDict):
    raise ValueError(f"config key mesh must be a ConfigDict with keys"
                     f" {sorted(MESH_DEFAULTS)}, got {mesh!r}")
  unknown = sorted(set(mesh) - set(MESH_DEFAULTS))
  if unknown:
    raise ValueError(f"unknown config.mesh keys {unknown}; valid:"
                     f" {sorted(MESH_DEFAULTS)}")
  sizes = {**MESH_DEFAULTS, **mesh}
  for name, size in sizes.items():
    if isinstance(size, bool) or not isinstance(size, int) or not (
        size >= 1 or size == -1):
      raise ValueError(f"config key mesh.{name} must be a positive int or"
                       f" -1, got {size!r}")
  if sizes["data"] == sizes["fsdp"] == -1:
    raise ValueError("config keys mesh.data and mesh.fsdp cannot both be -1")
  return sizes["data"], sizes["fsdp"]


def validate(config: ml_collections.ConfigDict) -> None:
  """Rejects non-positive step counts, intervals, learning rates, batches.

  Also checks ``config.mesh`` (:func:`mesh_shape`).

  Raises:
    ValueError: naming the first offending key and its value.
  """
  mesh_shape(config)
  for dotted, name, value in _walk(config):
    minimum = _minimum(name)
    if (minimum is None or isinstance(value, bool)
        or not isinstance(value, numbers.Real)):
      continue
    if not (math.isfinite(value) and value >= minimum):
      bound = ">= 0" if minimum == 0 else "> 0"
      raise ValueError(f"config key {dotted} must be {bound}, got {value!r}")
