"""Start-up checks of numeric config values, named by their dotted key.

A key is checked by its last name: step counts, intervals, learning rates and
batch sizes must be positive (a zero step count or learning rate would
"succeed" with an untrained model). Hyper-cleaning's ``inner_batch_size`` and
``outer_batch_size`` may be 0, which means a full batch; warm-up may be 0.
"""

import math
import numbers

import ml_collections

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


def validate(config: ml_collections.ConfigDict) -> None:
  """Rejects non-positive step counts, intervals, learning rates, batches.

  Raises:
    ValueError: naming the first offending key and its value.
  """
  for dotted, name, value in _walk(config):
    minimum = _minimum(name)
    if (minimum is None or isinstance(value, bool)
        or not isinstance(value, numbers.Real)):
      continue
    if not (math.isfinite(value) and value >= minimum):
      bound = ">= 0" if minimum == 0 else "> 0"
      raise ValueError(f"config key {dotted} must be {bound}, got {value!r}")
