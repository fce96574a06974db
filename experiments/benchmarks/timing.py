"""Timing helper shared by the benchmarks: interleaved medians."""

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax


def median_times(steps: Sequence[tuple[Callable[..., Any], tuple]],
                 repeats: int) -> list[float]:
  """Median seconds per call of each ``(fn, args)``.

  Every function is called once first (compilation); then the calls are
  interleaved, ``repeats`` rounds, each ended by ``block_until_ready``, so
  load on the machine affects every step alike and ratios stay fair.
  """
  for fn, args in steps:
    jax.block_until_ready(fn(*args))
  times = [[] for _ in steps]
  for _ in range(repeats):
    for (fn, args), out in zip(steps, times):
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      out.append(time.perf_counter() - start)
  return [statistics.median(t) for t in times]
