"""Starts a worker pinned to given CPUs, before it imports its framework.

``python -m experiments.benchmarks.peers.launch CPUS MODULE ARGS...``: sets
this process's affinity to the comma-separated ``CPUS`` and runs ``MODULE``
as ``__main__`` with ``ARGS`` (XLA and torch size their thread pools from
the affinity at import).
"""

import os
import runpy
import sys

if __name__ == "__main__":
  cpus, module, *rest = sys.argv[1:]
  os.sched_setaffinity(0, {int(c) for c in cpus.split(",")})
  sys.argv = [module, *rest]
  runpy.run_module(module, run_name="__main__", alter_sys=True)
