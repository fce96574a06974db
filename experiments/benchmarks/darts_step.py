r"""DARTS / PC-DARTS search steps: ours (JAX) against PyTorch and the official.

At the official search configuration (C = 16, 8 cells, batch 32 or 64,
32×32 random images) for DARTS and PC-DARTS (K = 4, edge normalisation):

* ours: the weight step (``∇_w L_train`` + clip 5, weight decay, SGD
  momentum, jitted), the architecture step of first order (``∇_α L_val`` +
  clip 10, weight decay, Adam), of second order (the upper direction of
  ``bilevel.scale_by_darts(2, hvp="finite_difference")`` — virtual step,
  ``v = ∇_{w′}L_val``, FD at ``w ± εv`` as the official code — + the same
  Adam), and the fused step ``bilevel.darts(2)`` under ``make_step`` (both
  directions and both optimizer updates in one executable; Jacobi order, 4
  forward/backward passes where official weight + arch-2 take 5);
* PyTorch: the same three steps of :mod:`darts_torch` (the official code's
  arithmetic, NCHW), ``torch.set_num_threads`` = the CPUs we may use;
* the official code's CPU figures of ``performance_targets.md``.

Times: one subprocess builds every system and calls the steps interleaved
(``timing.median_times``: one warm-up call, then ``repeats`` rounds), so
load on the machine hits all of them alike; JAX compile time (AOT
``lower().compile()``) is reported apart. Memory: every (net, system, step)
in its own subprocess, which loads the JAX executable from the persistent
compilation cache the timing run filled (no compiler in the measured
process), returns freed heap to the OS (``malloc_trim``), reads its RSS,
resets the high-water mark (``/proc/self/clear_refs``) and runs the step 3
times: peak RSS − RSS before the first step is the step's memory; the
absolute peak RSS (comparable to the official figures, which include the
interpreter and the framework) is printed next to it. For JAX, also the
executable's ``memory_analysis()`` (arguments + outputs − aliased +
temporaries).

Run (the full measurement, on a quiet machine: PyTorch's two OpenMP threads
slow down 10× when a third process competes for two cores):

  python -m experiments.benchmarks.darts_step [--batch=64] [--repeats=5] \
      [--json=/tmp/darts_step.json]

Smoke (C = 4, 3 cells, 8×8 images, batch 2):

  python -m experiments.benchmarks.darts_step --smoke

Subsets: ``--nets=darts``, ``--steps=weight,arch1``, ``--no_jax`` (PyTorch
against the official figures), ``--no_memory``; ``--channels`` /
``--cells`` / ``--image`` override the network's size (a proxy when
compiling the full one is out of reach); ``--kernels=xla`` traces our
depthwise convolutions and poolings as XLA's own ops (faster to compile,
slower to run: ``models.darts.functional``).

Compilation bounds the JAX half (``darts_profile --program`` measures it):
with the supernet of aa4fd7c the smoke network's weight step is 66.5k
StableHLO ops and took 27 min and ~7 GB to compile on a shared 2-core CPU;
at the official size the weight step is 139k ops, the first-order arch step
88k and the second-order one 441k.
"""

import argparse
import ctypes
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

NETS = {"darts": None, "pc_darts": 4}  # name -> K
# (weights, architecture logits) of the official C = 16, 8-cell networks.
OFFICIAL_COUNTS = {None: (1_930_618, 224), 4: (299_578, 252)}
STEPS = ("weight", "arch1", "arch2", "fused")
STEP_NAMES = {"weight": "weight step", "arch1": "arch step, 1st order",
              "arch2": "arch step, 2nd order",
              "fused": "fused darts(2) step (vs weight + arch 2)"}
# performance_targets.md, official code on a 2-core AMD CPU: seconds, GB.
OFFICIAL = {
    ("darts", 32): {"weight": (10.6, 4.9), "arch1": (12.6, 5.0),
                    "arch2": (41.3, 6.6)},
    ("darts", 64): {"weight": (22.6, 9.4), "arch1": (21.4, 9.6),
                    "arch2": (70.3, 12.7)},
    ("pc_darts", 32): {"weight": (4.3, 1.8), "arch1": (4.2, 1.9),
                       "arch2": (16.1, 2.6)},
    ("pc_darts", 64): {"weight": (8.4, 3.3), "arch1": (7.6, 3.4),
                       "arch2": (25.2, 4.6)},
}
# The official train_search.py defaults (darts_torch uses the same).
LR, MOMENTUM, WEIGHT_DECAY, GRAD_CLIP = 0.025, 0.9, 3e-4, 5.0
ARCH_LR, ARCH_B1, ARCH_WEIGHT_DECAY, ARCH_CLIP = 3e-4, 0.5, 1e-3, 10.0
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


@dataclasses.dataclass(frozen=True)
class Shape:
  """Network and batch sizes."""
  channels: int = 16
  num_cells: int = 8
  image: int = 32
  batch: int = 32
  kernels: str = "taps"  # models.darts.functional.kernels


SMOKE = Shape(channels=4, num_cells=3, image=8, batch=2)


def batches(shape: Shape) -> dict[str, np.ndarray]:
  """Seeded random train and validation batches, NCHW float32 / int32."""
  rng = np.random.default_rng(0)
  image = lambda: rng.standard_normal(
      (shape.batch, 3, shape.image, shape.image), np.float32)
  label = lambda: rng.integers(0, 10, shape.batch).astype(np.int32)
  return {"x_train": image(), "y_train": label(), "x_val": image(),
          "y_val": label()}


# --------------------------------------------------------------------------
# Measuring inside a worker.

def _status_kib(field: str) -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1])
  raise KeyError(field)


def step_memory(run, calls: int = 3) -> dict[str, float]:
  """Peak RSS of ``calls`` calls of ``run`` over the RSS before them (MiB).

  Freed heap goes back to the OS first (``malloc_trim``) and the kernel's
  high-water mark is reset (``clear_refs`` 5), so earlier peaks (imports,
  building the network) do not count.
  """
  ctypes.CDLL("libc.so.6").malloc_trim(0)
  before = _status_kib("VmRSS")
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
  for _ in range(calls):
    run()
  peak = _status_kib("VmHWM")
  maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return {"rss_before_mib": before / 1024, "peak_rss_mib": peak / 1024,
          "step_rss_mib": (peak - before) / 1024,
          "process_maxrss_mib": maxrss / 1024}


def _jax_systems(nets, shape, data, names=None):
  from experiments.benchmarks import darts_jax  # noqa: PLC0415
  return {net: darts_jax.build(NETS[net], shape, data, names)
          for net in nets}


def _torch_systems(nets, shape, data, threads):
  from experiments.benchmarks import darts_torch  # noqa: PLC0415
  systems = {}
  for net in nets:
    search = darts_torch.build(shape.channels, shape.num_cells, NETS[net],
                               threads)
    systems[net] = darts_torch.steps(search, data)
  return systems


def time_worker(args, shape, data) -> dict:
  """Compiles, then times every step of every system, interleaved."""
  from experiments.benchmarks import timing  # noqa: PLC0415
  threads = len(os.sched_getaffinity(0))
  result, calls = {"threads": threads}, []
  jax_systems = (_jax_systems(args.nets, shape, data, args.steps)
                 if args.jax else {})
  for net, steps in jax_systems.items():
    for name, step in steps.items():
      result[f"jax/{net}/{name}"] = {"compile_s": step.compile_s,
                                     "xla_bytes": step.xla_bytes}
      calls.append((f"jax/{net}/{name}", step.run))
  if args.torch:
    for net, steps in _torch_systems(args.nets, shape, data,
                                     threads).items():
      calls += [(f"torch/{net}/{name}", run) for name, run in steps.items()
                if name.split("_")[0] in args.steps]
  times = timing.median_times([(run, ()) for _, run in calls], args.repeats)
  for (key, _), seconds in zip(calls, times):
    result.setdefault(key, {})["s"] = seconds
  return result


def memory_worker(args, shape, data) -> dict:
  """The memory of one step (``--system``, ``--nets``, ``--step``)."""
  net = args.nets[0]
  if args.system == "jax":
    run = _jax_systems([net], shape, data, [args.step])[net][args.step].run
  else:
    threads = len(os.sched_getaffinity(0))
    run = _torch_systems([net], shape, data, threads)[net][args.step]
  return step_memory(run)


# --------------------------------------------------------------------------
# The coordinator.

def _worker(args, extra: list[str], cache_dir: str) -> tuple[dict, float]:
  """Runs this module as a worker; ``(its JSON result, foreign cores)``."""
  from experiments.benchmarks.peers import cpu  # noqa: PLC0415
  cmd = [sys.executable, "-m", "experiments.benchmarks.darts_step",
         f"--batch={args.batch}", f"--repeats={args.repeats}",
         f"--nets={','.join(args.nets)}", f"--steps={','.join(args.steps)}",
         f"--cache_dir={cache_dir}",
         *(["--smoke"] if args.smoke else []),
         *([f"--channels={args.channels}"] if args.channels else []),
         *([f"--cells={args.cells}"] if args.cells else []),
         *([f"--image={args.image}"] if args.image else []),
         f"--kernels={args.kernels}",
         *([] if args.jax else ["--no_jax"]),
         *([] if args.torch else ["--no_torch"]), *extra]
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      filter(None, [_ROOT, os.environ.get("PYTHONPATH")])))
  proc = subprocess.Popen(cmd, cwd=_ROOT, env=env, stdout=subprocess.PIPE,
                          text=True)
  meter = cpu.Meter([proc.pid])
  meter.start()
  out, _ = proc.communicate()
  _, foreign = meter.stop()
  if proc.returncode:
    raise RuntimeError(f"worker {extra} failed ({proc.returncode})")
  return json.loads(out.strip().splitlines()[-1]), foreign


def measure(args) -> dict:
  """All the numbers: ``{"time": ..., "memory": {key: ...}, ...}``."""
  with tempfile.TemporaryDirectory() as cache_dir:
    load_before = os.getloadavg()
    timed, foreign = _worker(args, ["--worker=time"], cache_dir)
    load_after = os.getloadavg()
    memory = {}
    if args.memory:
      systems = (["jax"] if args.jax else []) + (
          ["torch"] if args.torch else [])
      for system in systems:
        for net in args.nets:
          for step in args.steps:
            if system == "torch" and step == "fused":
              continue
            one = dict(vars(args), nets=[net])
            memory[f"{system}/{net}/{step}"], _ = _worker(
                argparse.Namespace(**one),
                ["--worker=memory", f"--system={system}", f"--step={step}"],
                cache_dir)
  return {"time": timed, "memory": memory, "foreign_cores": foreign,
          "load_before": load_before, "load_after": load_after}


def _official(net, shape, step):
  if (shape.channels, shape.num_cells, shape.image) != (16, 8, 32):
    return None
  table = OFFICIAL.get((net, shape.batch), {})
  if step == "fused":
    if "weight" not in table:
      return None
    return tuple(a + b for a, b in zip(table["weight"], table["arch2"]))
  return table.get(step)


def _seconds(result, system, net, step):
  """Median seconds; a fused row of torch or the official is weight +
  arch 2."""
  if system == "torch" and step == "fused":
    parts = [_seconds(result, system, net, s) for s in ("weight", "arch2")]
    return None if None in parts else sum(parts)
  return result["time"].get(f"{system}/{net}/{step}", {}).get("s")


def _row(result, shape, net, step) -> str:
  timed, memory = result["time"], result["memory"]
  fmt = lambda v, f="{:.3g}": "—" if v is None else f.format(v)
  ratio = lambda a, b, f="{:.2f}": fmt(None if None in (a, b) else a / b, f)
  ours, torch_s = (_seconds(result, s, net, step) for s in ("jax", "torch"))
  official = (_official(net, shape, step) or (None,))[0]
  compiled = timed.get(f"jax/{net}/{step}", {})
  def rss(system):
    m = memory.get(f"{system}/{net}/{step}")
    return "—" if m is None else (f"{m['step_rss_mib']:.0f}"
                                  f" ({m['peak_rss_mib']:.0f})")

  xla = compiled.get("xla_bytes")
  return (f"| {net} | {STEP_NAMES[step]} | {fmt(ours)} |"
          f" {fmt(compiled.get('compile_s'), '{:.0f}')} | {fmt(torch_s)} |"
          f" {ratio(ours, torch_s)} | {fmt(official)} |"
          f" {ratio(official, ours, '{:.1f}×')} |"
          f" {ratio(official, torch_s, '{:.1f}×')} | {rss('jax')} |"
          f" {fmt(xla and xla / 2**20, '{:.0f}')} | {rss('torch')} |")


def table(result, shape) -> str:
  """The results as a markdown table, then the PC-DARTS / DARTS ratios."""
  lines = [
      "| net | step | ours s | compile s | torch s | ours/torch | official s"
      " | official/ours | official/torch | ours Δ RSS MiB (peak) | XLA plan"
      " MiB | torch Δ RSS MiB (peak) |", "|" + "---|" * 12]
  nets = [n for n in NETS if any(k.split("/")[1:2] == [n]
                                 for k in result["time"])]
  lines += [_row(result, shape, net, step) for net in nets for step in STEPS
            if any(_seconds(result, s, net, step) for s in ("jax", "torch"))]
  alpha = [(n, _seconds(result, "torch", n, "arch1_alpha")) for n in nets]
  if any(s for _, s in alpha):
    lines.append("\ntorch arch step, 1st order, with ∇_α alone (the official"
                 " backward also fills ∇_w): " + ", ".join(
                     f"{n} {s:.3g} s" for n, s in alpha if s))
  if {"darts", "pc_darts"} <= set(nets):
    for system in ("jax", "torch"):
      ratios = [_pc_ratio(result, system, step) for step in STEPS]
      if any(ratios):
        lines.append(f"\nPC-DARTS / DARTS ({system}): "
                     + ", ".join(filter(None, ratios)))
  return "\n".join(lines)


def _pc_ratio(result, system, step) -> str | None:
  """``step time a× Δ RSS b× [XLA c×]`` of PC-DARTS over DARTS."""
  times = [_seconds(result, system, n, step) for n in ("pc_darts", "darts")]
  if None in times or (system == "torch" and step == "fused"):
    return None
  text = f"{step} time {times[0] / times[1]:.2f}×"
  mems = [result["memory"].get(f"{system}/{n}/{step}")
          for n in ("pc_darts", "darts")]
  if None not in mems:
    for key, label in (("step_rss_mib", "Δ RSS"), ("peak_rss_mib", "peak RSS")):
      text += f", {label} {mems[0][key] / mems[1][key]:.2f}×"
  xla = [result["time"].get(f"{system}/{n}/{step}", {}).get("xla_bytes")
         for n in ("pc_darts", "darts")]
  if None not in xla:
    text += f", XLA plan {xla[0] / xla[1]:.2f}×"
  return text


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--smoke", action="store_true")
  parser.add_argument("--channels", type=int, help="override C")
  parser.add_argument("--cells", type=int, help="override the cell count")
  parser.add_argument("--image", type=int, help="override the image size")
  parser.add_argument("--kernels", default="taps",
                      choices=("taps", "xla"),
                      help="our depthwise convolutions and poolings")
  parser.add_argument("--nets", type=lambda s: s.split(","),
                      default=list(NETS))
  parser.add_argument("--steps", type=lambda s: s.split(","),
                      default=list(STEPS),
                      help="a subset of weight,arch1,arch2,fused")
  parser.add_argument("--no_jax", dest="jax", action="store_false",
                      help="time PyTorch alone (against the official)")
  parser.add_argument("--no_torch", dest="torch", action="store_false")
  parser.add_argument("--no_memory", dest="memory", action="store_false")
  parser.add_argument("--json", help="also write the results here")
  # Worker flags (set by the coordinator).
  parser.add_argument("--worker", choices=("time", "memory"))
  parser.add_argument("--system", choices=("jax", "torch"))
  parser.add_argument("--step", choices=STEPS)
  parser.add_argument("--cache_dir")
  args = parser.parse_args(argv)
  for given, valid in ((args.nets, NETS), (args.steps, STEPS)):
    if set(given) - set(valid):
      raise ValueError(f"unknown {sorted(set(given) - set(valid))}; valid:"
                       f" {list(valid)}")
  shape = SMOKE if args.smoke else Shape(batch=args.batch)
  shape = dataclasses.replace(
      shape, channels=args.channels or shape.channels,
      num_cells=args.cells or shape.num_cells,
      image=args.image or shape.image, kernels=args.kernels)
  if args.worker:
    if args.cache_dir:
      _use_compilation_cache(args.cache_dir)
    data = batches(shape)
    work = time_worker if args.worker == "time" else memory_worker
    start = time.perf_counter()
    out = work(args, shape, data)
    out["worker_s"] = time.perf_counter() - start
    print(json.dumps(out), flush=True)
    return out
  result = measure(args)
  result["shape"] = dataclasses.asdict(shape)
  print(f"{shape}; median of {args.repeats}; {result['time']['threads']}"
        f" threads; load average {result['load_before'][0]:.2f} before,"
        f" {result['load_after'][0]:.2f} after the timing; other processes"
        f" used {result['foreign_cores']:.2f} cores meanwhile")
  print(table(result, shape))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1)
  return result


def _use_compilation_cache(path: str) -> None:
  import jax  # noqa: PLC0415
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


if __name__ == "__main__":
  main()
