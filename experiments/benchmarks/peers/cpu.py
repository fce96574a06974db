"""Who used the CPU: the whole machine versus the benchmark's own processes.

``/proc/stat`` gives the machine's busy time (clock ticks, all CPUs); the
benchmark's own time is the sum of ``/proc/<pid>/task/*/schedstat``
(nanoseconds on a CPU, every thread) over its processes. The difference over
a window is CPU time other processes took while the benchmark was stepping.
"""

import os
import time

_TICK = os.sysconf("SC_CLK_TCK")


def machine_busy_s() -> float:
  """Busy CPU-seconds of the whole machine since boot (all CPUs)."""
  with open("/proc/stat") as f:
    fields = [int(v) for v in f.readline().split()[1:]]
  idle = fields[3] + fields[4]  # idle + iowait
  # guest time is already counted in user / nice.
  return (sum(fields[:8]) - idle) / _TICK


def process_cpu_s(pid: int) -> float:
  """CPU-seconds of every live thread of ``pid`` (0 if it is gone)."""
  total = 0
  try:
    tasks = os.listdir(f"/proc/{pid}/task")
  except FileNotFoundError:
    return 0.0
  for tid in tasks:
    try:
      with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
        total += int(f.read().split()[0])
    except (FileNotFoundError, ProcessLookupError):
      pass
  return total / 1e9


class Meter:
  """Foreign CPU load over windows: ``start()`` … ``stop() -> cores``."""

  def __init__(self, pids):
    self._pids = list(pids) + [os.getpid()]
    self._start = None

  def _sample(self):
    return (time.monotonic(), machine_busy_s(),
            sum(process_cpu_s(p) for p in self._pids))

  def start(self) -> None:
    self._start = self._sample()

  def elapsed(self) -> float:
    """Seconds since ``start()``."""
    return time.monotonic() - self._start[0]

  def stop(self) -> tuple[float, float]:
    """``(wall_s, foreign_cores)`` since ``start()``.

    ``foreign_cores`` is the CPU time used outside the benchmark's processes
    divided by the wall time (0.5 = half a core busy on average).
    """
    (t0, busy0, ours0), (t1, busy1, ours1) = self._start, self._sample()
    wall = max(t1 - t0, 1e-9)
    return wall, max(0.0, (busy1 - busy0) - (ours1 - ours0)) / wall
