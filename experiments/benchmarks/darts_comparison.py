r"""The DARTS CPU comparison: every method searched and retrained, one table.

Runs ``experiments/configs/darts_cifar10.py`` once per method, one after
another, each in its own process (``python -m experiments.main``) and
workdir ``ROOT/<run>``: ``darts1``, ``darts2``, ``pc_darts`` and
``gm_nas`` (search → genotype → retrain), then ``random<s>``: the random
genotype of seed ``s`` retrained with the same budget. A finished run
(its ``results.json``) is skipped and a stopped one resumes from its
checkpoints, so the script can be rerun after an interruption. The runs
share a persistent JAX compilation cache (``ROOT/jax_cache``).

Then it writes ``ROOT/comparison.json`` and ``ROOT/comparison.md``: per
run the genotype, the search's wall time (all stages before ``retrain``),
the retraining's, the retrained network's size and its test accuracy, and
the random baseline's mean ± standard deviation.

Run (under three hours on a 2-core CPU at the config's default sizes):

  python -m experiments.benchmarks.darts_comparison --root=/tmp/darts_cpu \
      [--seed=0] [--random_seeds=0,1,2] [--methods=darts1,darts2,...] \
      [--table_only]
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np

from experiments import metrics
from models import darts

CONFIG = "experiments/configs/darts_cifar10.py"
METHODS = ("darts1", "darts2", "pc_darts", "gm_nas")


def _run(root: pathlib.Path, name: str, variant: str,
         overrides: list[str]) -> None:
  """Runs (or resumes) one pipeline unless its results exist."""
  workdir = root / name
  if (workdir / "results.json").is_file():
    print(f"{name}: done, skipped", flush=True)
    return
  env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(root / "jax_cache")}
  command = [sys.executable, "-m", "experiments.main",
             f"--config={CONFIG}:{variant}", f"--workdir={workdir}",
             *overrides]
  print(f"{name}: {' '.join(command[1:])}", flush=True)
  start = time.perf_counter()
  with open(root / f"{name}.log", "a") as log:
    subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                   check=True)
  print(f"{name}: {time.perf_counter() - start:.0f} s", flush=True)


def _row(root: pathlib.Path, name: str) -> dict:
  """One run's line of the table, from its workdir."""
  workdir = root / name
  results = json.loads((workdir / "results.json").read_text())
  seconds = json.loads((workdir / "stage_seconds.json").read_text())
  stages = json.loads((workdir / "stages.json").read_text())
  row = {"run": name, "test_accuracy": results["test_accuracy"],
         "params_millions": results["params_millions"],
         "search_s": sum(v for k, v in seconds.items() if k != "retrain"),
         "retrain_s": seconds["retrain"], "genotype": results["genotype"]}
  if "sub0" in stages:  # GM-NAS: the split and the selection
    row["gm"] = {k: v for k, v in stages["sub0"].items()
                 if k.startswith("split")}
    row["gm"]["val_accuracy"] = [stages[f"sub{k}"]["val_accuracy"]
                                 for k in (0, 1)]
  return row


def alpha_trajectory(stage_dir: pathlib.Path) -> dict:
  """A search stage's logged op weights: ``{"steps": [T], "<cell>":
  [T][edges][8]}`` (``softmax(α)`` per edge, edges in α-row order)."""
  records = [r for r in metrics.read_jsonl(stage_dir / metrics.JSONL_NAME)
             if r["prefix"] == "train"]
  out = {"steps": [r["step"] for r in records], "ops": list(darts.PRIMITIVES)}
  for kind in darts.CELL_KINDS:
    keys = [k for k in records[0] if k.startswith(f"alpha/{kind}/")]
    edges = sorted({k.split("/")[2] for k in keys},
                   key=lambda e: tuple(int(n) for n in e.split("-"))[::-1])
    out[kind] = [[[r[f"alpha/{kind}/{e}/{op}"] for op in darts.PRIMITIVES]
                  for e in edges] for r in records]
    out[f"{kind}_edges"] = edges
  return out


def export(root: pathlib.Path, rows: list[dict], dest: pathlib.Path) -> None:
  """Copies the table and each search stage's α trajectory
  (``alpha_<run>_<stage>.json``) to ``dest`` (for the notebook)."""
  dest.mkdir(parents=True, exist_ok=True)
  (dest / "comparison.json").write_text(json.dumps(rows, indent=1))
  (dest / "comparison.md").write_text(table(rows) + "\n")
  for row in rows:
    for stage in ("search", "sub0", "sub1"):
      stage_dir = root / row["run"] / stage
      if (stage_dir / metrics.JSONL_NAME).is_file():
        (dest / f"alpha_{row['run']}_{stage}.json").write_text(json.dumps(
            alpha_trajectory(stage_dir)))


def _cell(edges) -> str:
  return " ".join(f"{op}<{i}" for op, i in edges)


def table(rows: list[dict]) -> str:
  """The markdown table of the runs, then the random baseline's summary."""
  lines = ["| run | test acc. | params (M) | search (min) | retrain (min) |"
           " normal cell | reduction cell |", "|---|---|---|---|---|---|---|"]
  for r in rows:
    g = r["genotype"]
    lines.append(
        f"| {r['run']} | {100 * r['test_accuracy']:.2f} % |"
        f" {r['params_millions']:.3f} | {r['search_s'] / 60:.1f} |"
        f" {r['retrain_s'] / 60:.1f} | {_cell(g['normal'])} |"
        f" {_cell(g['reduce'])} |")
  random = [r["test_accuracy"] for r in rows if r["run"].startswith("random")]
  if random:
    lines.append("")
    lines.append(f"random genotypes ({len(random)}): mean"
                 f" {100 * np.mean(random):.2f} % ± {100 * np.std(random):.2f}"
                 " (population std)")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--root", required=True)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--random_seeds", default="0,1,2")
  parser.add_argument("--methods", default=",".join(METHODS))
  parser.add_argument("--table_only", action="store_true")
  parser.add_argument("--export", default="",
                      help="also copy the table and α trajectories here")
  parser.add_argument("overrides", nargs="*",
                      help="extra --config.x=y flags for every run")
  args = parser.parse_args()
  root = pathlib.Path(args.root)
  root.mkdir(parents=True, exist_ok=True)
  runs = [(m, m) for m in args.methods.split(",") if m]
  runs += [(f"random{s}", "random") for s in args.random_seeds.split(",")
           if s]
  for name, variant in runs:
    if args.table_only:
      continue
    extra = [f"--config.seed={args.seed}", *args.overrides]
    if variant == "random":
      extra.append(f"--config.random.seed={name[len('random'):]}")
    _run(root, name, variant, extra)
  rows = [_row(root, name) for name, _ in runs
          if (root / name / "results.json").is_file()]
  (root / "comparison.json").write_text(json.dumps(rows, indent=2))
  (root / "comparison.md").write_text(table(rows) + "\n")
  if args.export:
    export(root, rows, pathlib.Path(args.export))
  print(table(rows))


if __name__ == "__main__":
  main()
