"""The worker side of the peers benchmark, shared by every framework.

A worker is one process running one system (framework, method, K). It reads
its spec (a JSON file), builds the system, then answers one-line JSON
commands on stdin, one JSON line each on stdout:

* ``{"cmd": "step"}``: one outer step, timed around the synchronised step
  with ``time.perf_counter``; answers ``{"t": seconds, "cpu": seconds}``
  (the process's CPU time over the step).
* ``{"cmd": "run", "n": n}``: ``n`` untimed outer steps.
* ``{"cmd": "report"}``: ``{"upper_at": [...], "upper_first": [...],
  "steps": n, ...info}``: the upper logits after ``auroc_steps`` outer steps
  and after the first one, plus the system's own information (threads,
  versions, matmul work).
* ``{"cmd": "quit"}``.

This module imports neither JAX nor torch: each framework's worker imports
it and passes a :class:`System`.
"""

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np


@dataclasses.dataclass
class System:
  """One built system, as a worker hands it to :func:`serve`.

  Attributes:
    step: one synchronised outer step (returns when the work is done).
    upper: returns the current upper logits ``c`` as a float64 numpy array.
    info: JSON-able facts about the system (threads, versions, work).
  """
  step: Callable[[], None]
  upper: Callable[[], np.ndarray]
  info: dict[str, Any]


def read_spec() -> dict[str, Any]:
  """The worker's spec from ``--spec=PATH`` (written by the coordinator)."""
  parser = argparse.ArgumentParser()
  parser.add_argument("--spec", required=True)
  with open(parser.parse_args().spec) as f:
    return json.load(f)


def load_problem(spec: dict[str, Any]) -> dict[str, np.ndarray]:
  """The data and initial weights every system starts from (one .npz)."""
  with np.load(spec["data"]) as npz:
    return {k: npz[k] for k in npz.files}


def _send(obj: dict[str, Any], out) -> None:
  out.write(json.dumps(obj) + "\n")
  out.flush()


def serve(spec: dict[str, Any], build: Callable[[dict[str, Any]], System]):
  """Builds the system and answers commands until ``quit`` or end of input.

  Args:
    spec: the worker spec (``auroc_steps`` among its keys).
    build: ``spec -> System``.
  """
  # The protocol owns stdout; frameworks' prints go to stderr.
  out, sys.stdout = sys.stdout, sys.stderr
  try:
    system = build(spec)
  except Exception as e:  # Reported to the coordinator, who carries on.
    _send({"error": f"{type(e).__name__}: {e}"}, out)
    raise
  _send({"ready": True}, out)
  steps, upper_first, upper_at = 0, None, None

  def one_step() -> float:
    nonlocal steps, upper_first, upper_at
    start = time.perf_counter()
    system.step()
    elapsed = time.perf_counter() - start
    steps += 1
    if steps == 1:
      upper_first = system.upper()
    if steps == spec["auroc_steps"]:
      upper_at = system.upper()
    return elapsed

  for line in sys.stdin:
    cmd = json.loads(line)
    if cmd["cmd"] == "step":
      cpu = time.process_time()
      t = one_step()
      _send({"t": t, "cpu": time.process_time() - cpu}, out)
    elif cmd["cmd"] == "run":
      for _ in range(cmd["n"]):
        one_step()
      _send({"steps": steps}, out)
    elif cmd["cmd"] == "report":
      as_list = lambda a: None if a is None else np.asarray(a).tolist()
      _send({"steps": steps, "upper_at": as_list(upper_at),
             "upper_first": as_list(upper_first), **system.info}, out)
    elif cmd["cmd"] == "quit":
      break
