"""Scalar metrics to TensorBoard and JSON lines, and a progress line.

One ``MetricWriter`` per run writes into its workdir::

  workdir/events.out.tfevents.*   TensorBoard, tags '<prefix>/<name>'
  workdir/metrics.jsonl           one object per write:
                                  {"step": 120, "prefix": "train", "loss": 0.4}

and ``progress`` logs a line such as
``step 120/500 | outer_loss 0.412 | 37.2 steps/s | ETA 0:00:10``.

The JSONL file is appended to, so a resumed run may repeat steps after the
restored one; readers keep the last record for a (step, prefix). Non-finite
values are written as the JSON extensions ``NaN`` / ``Infinity``, which
``json.loads`` reads back.
"""

from __future__ import annotations

import datetime
import json
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import tensorboardX
from absl import logging

JSONL_NAME = "metrics.jsonl"
_RESERVED = ("step", "prefix")


def to_floats(scalars: Mapping[str, Any]) -> dict[str, float]:
  """Converts scalar arrays (jax, numpy) and numbers to Python floats.

  Args:
    scalars: name -> a value with exactly one element.

  Returns:
    name -> float, in the input's order.

  Raises:
    ValueError: a value has more than one element.
  """
  host = jax.device_get(dict(scalars))  # One transfer for all values.
  floats = {}
  for name, value in host.items():
    array = np.asarray(value)
    if array.size != 1:
      raise ValueError(f"Metric {name!r} must be a scalar, got {array.shape=}")
    floats[name] = float(array.reshape(()))
  return floats


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
  """Reads a JSON-lines file into a list of dicts, in file order."""
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


class MetricWriter:
  """Writes scalar metrics of a run and reports its progress.

  Args:
    workdir: directory for the event files and ``metrics.jsonl``.
    total_steps: the step the run ends at, for the ETA.
    start_step: the step the run starts (or resumes) from; TensorBoard
      discards events of an earlier run at or after it.
    active: whether this process writes files and logs; defaults to process 0
      only, so that multi-host runs write once.
    time_fn: seconds of a monotonic clock (injectable for tests).
  """

  def __init__(
      self,
      workdir: str | os.PathLike[str],
      *,
      total_steps: int,
      start_step: int = 0,
      active: bool | None = None,
      time_fn: Callable[[], float] = time.monotonic,
  ):
    self._workdir = os.fspath(workdir)
    self._total_steps = total_steps
    self._active = jax.process_index() == 0 if active is None else active
    self._time_fn = time_fn
    self._last_step = start_step
    self._last_time = time_fn()
    self._jsonl = None
    self._tb = None
    if self._active:
      os.makedirs(self._workdir, exist_ok=True)
      path = os.path.join(self._workdir, JSONL_NAME)
      self._jsonl = open(path, "a", encoding="utf-8")
      self._tb = tensorboardX.SummaryWriter(
          logdir=self._workdir, purge_step=start_step or None
      )

  @property
  def jsonl_path(self) -> str:
    return os.path.join(self._workdir, JSONL_NAME)

  def write(
      self, step: int, scalars: Mapping[str, Any], *, prefix: str = "train"
  ) -> dict[str, float]:
    """Writes one record of scalars at `step`.

    Args:
      step: the training step the values belong to.
      scalars: name -> scalar (jax or numpy array, or number).
      prefix: the split or group, e.g. 'train', 'eval'; TensorBoard tags are
        '<prefix>/<name>'.

    Returns:
      The values as Python floats.

    Raises:
      ValueError: a name is 'step' or 'prefix', or a value is not a scalar.
    """
    clashes = [name for name in _RESERVED if name in scalars]
    if clashes:
      raise ValueError(f"Metric names {clashes} are reserved.")
    floats = to_floats(scalars)
    if self._active:
      record = {"step": int(step), "prefix": prefix, **floats}
      self._jsonl.write(json.dumps(record) + "\n")
      self._jsonl.flush()  # A crash keeps every written line.
      for name, value in floats.items():
        self._tb.add_scalar(f"{prefix}/{name}", value, global_step=int(step))
    return floats

  def progress(
      self, step: int, scalars: Mapping[str, Any] | None = None
  ) -> str:
    """Logs and returns a progress line with rate and ETA.

    The rate counts the steps since the previous call (or since
    `start_step` at construction), so the first line includes compilation.

    Args:
      step: the current step.
      scalars: name -> scalar to show in the line.

    Returns:
      e.g. 'step 120/500 | outer_loss 0.412 | 37.2 steps/s | ETA 0:00:10'.
    """
    now = self._time_fn()
    elapsed = now - self._last_time
    rate = (step - self._last_step) / elapsed if elapsed > 0 else 0.0
    self._last_step, self._last_time = step, now
    parts = [f"step {step}/{self._total_steps}"]
    parts += [f"{k} {v:.4g}" for k, v in to_floats(scalars or {}).items()]
    parts += [f"{_format_rate(rate)} steps/s", f"ETA {self._eta(step, rate)}"]
    line = " | ".join(parts)
    if self._active:
      logging.info("%s", line)
    return line

  def _eta(self, step: int, rate: float) -> str:
    if rate <= 0:
      return "?"
    seconds = max(self._total_steps - step, 0) / rate
    return str(datetime.timedelta(seconds=round(seconds)))

  def flush(self) -> None:
    if self._active:
      self._jsonl.flush()
      self._tb.flush()

  def close(self) -> None:
    """Flushes and closes the files; the writer is unusable afterwards."""
    if self._active and not self._jsonl.closed:
      self._jsonl.close()
      self._tb.close()

  def __enter__(self) -> MetricWriter:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def _format_rate(rate: float) -> str:
  return f"{rate:.1f}" if rate >= 1 else f"{rate:.3g}"
