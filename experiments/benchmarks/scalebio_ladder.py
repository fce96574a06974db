r"""ScaleBiO on the corruption ladder: learned weights and their use, per seed.

For each seed, runs ``experiments/configs/scalebio_lm.py`` four ways, each
in ``<root>/seed<s>/<method>`` (a rerun resumes; finished stages are only
re-evaluated):

* ``scalebio``: weights learned by ScaleBiO;
* ``uniform``: p frozen at uniform weights (same objective and steps);
* ``oracle``: p frozen on the clean source only;
* ``greedy``: forward selection of sources by the validation loss of short
  proxy runs (``experiments/tasks/source_selection.py``), then uniform
  weights over the selected sources.

Each run's three stages give ``test_loss`` of the model trained with those
weights (equal steps), and of fresh models trained on a fixed budget of
windows resampled uniformly and by the weights. Prints a markdown table,
checks the issue's claims (ladder Spearman ρ ≤ −0.9, noise weights below
1/(2K), ScaleBiO below uniform in both uses), writes ``<root>/ladder.json``
and a plot of the weight trajectories and loss curves
(``<root>/ladder.png``).

  python -m experiments.benchmarks.scalebio_ladder --root=/tmp/ladder \
      --seeds=0,1 [--smoke]
"""

import json
import pathlib

import jax
from absl import app, flags, logging

from experiments import metrics, train
from experiments.configs import scalebio_lm
from experiments.tasks import source_selection

_ROOT = flags.DEFINE_string("root", None, "Directory of all the runs.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1"], "Seeds (corruption, init,"
                           " data order).")
_SMOKE = flags.DEFINE_bool("smoke", False, "The tiny smoke schedule.")
_PROXY_STEPS = flags.DEFINE_integer("proxy_steps", 100, "Training steps of"
                                    " each greedy proxy run.")

METHODS = {"scalebio": "", "uniform": "uniform", "oracle": "oracle"}


def _config(variant: str, seed: int, smoke: bool):
  arg = ",".join(v for v in (variant, "smoke" if smoke else "") if v)
  config = scalebio_lm.get_config(arg)
  config.seed = seed
  return config


def _run(config, workdir: pathlib.Path) -> dict:
  train.train_and_evaluate(config, workdir)
  return json.loads((workdir / "stages.json").read_text())


def _greedy(seed: int, smoke: bool, root: pathlib.Path) -> dict:
  config = _config("uniform", seed, smoke)
  cache = root / "greedy_selection.json"
  if cache.exists():
    selection = json.loads(cache.read_text())
  else:
    result = source_selection.greedy_selection(
        config, jax.random.key(seed), 4 if smoke else _PROXY_STEPS.value)
    selection = {"selected": list(result.selected),
                 "best_loss": result.best_loss,
                 "rounds": [{str(k): v for k, v in r.items()}
                            for r in result.rounds]}
    root.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(selection, indent=1))
  config.reweight.sources = ",".join(str(s) for s in selection["selected"])
  stages = _run(config, root / "greedy")
  stages["selection"] = selection
  return stages


def _trajectory(workdir: pathlib.Path) -> dict:
  """Steps, source weights and losses logged by the weights stage."""
  records = [r for r in metrics.read_jsonl(
      workdir / "weights" / metrics.JSONL_NAME) if "outer_loss" in r]
  keys = sorted((k for k in records[0] if k.startswith("weights/")),
                key=lambda k: int(k.split("/")[1])) if records else []
  return {"step": [r["step"] for r in records],
          "weights": [[r[k] for k in keys] for r in records],
          "outer_loss": [r["outer_loss"] for r in records],
          "inner_loss": [r.get("inner_loss") for r in records]}


def _row(seed, method, stages) -> dict:
  weights = stages["weights"]
  return {"seed": seed, "method": method,
          "test_loss": weights["test_loss"], "val_loss": weights["val_loss"],
          "resampled_test_loss": stages["resampled"]["test_loss"],
          "uniform_resampled_test_loss":
              stages["resampled_uniform"]["test_loss"],
          "ladder_spearman": weights["ladder_spearman"],
          "noise_weight_max": weights.get("noise_weight_max"),
          "weights": {k.split("/", 1)[1]: v for k, v in weights.items()
                      if k.startswith("weight/")}}


def _checks(rows, num_sources) -> list[str]:
  out = []
  for seed in sorted({r["seed"] for r in rows}):
    by = {r["method"]: r for r in rows if r["seed"] == seed}
    s, u = by["scalebio"], by["uniform"]
    out.append(
        f"seed {seed}: spearman {s['ladder_spearman']:.3f} (≤ −0.9:"
        f" {s['ladder_spearman'] <= -0.9}); noise max"
        f" {s['noise_weight_max']:.4f} (< 1/(2K) = {1 / (2 * num_sources):.4f}:"
        f" {s['noise_weight_max'] < 1 / (2 * num_sources)}); test loss"
        f" {s['test_loss']:.4f} vs uniform {u['test_loss']:.4f}"
        f" ({s['test_loss'] < u['test_loss']}); resampled"
        f" {s['resampled_test_loss']:.4f} vs uniform-resampled"
        f" {s['uniform_resampled_test_loss']:.4f}"
        f" ({s['resampled_test_loss'] < s['uniform_resampled_test_loss']})")
  return out


def _table(rows) -> str:
  lines = ["| seed | method | test loss (equal steps) | val loss |"
           " resampled → test loss | uniform-resampled → test loss |"
           " ladder ρ | max noise weight |",
           "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(
        f"| {r['seed']} | {r['method']} | {r['test_loss']:.4f} |"
        f" {r['val_loss']:.4f} | {r['resampled_test_loss']:.4f} |"
        f" {r['uniform_resampled_test_loss']:.4f} |"
        f" {r['ladder_spearman']:.3f} | {r['noise_weight_max']:.2e} |")
  return "\n".join(lines)


def _plot(trajectories, names, path: pathlib.Path) -> None:
  import matplotlib  # noqa: PLC0415 - optional, only for the figure.
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  seeds = sorted(trajectories)
  fig, axes = plt.subplots(2, len(seeds), figsize=(6 * len(seeds), 8),
                           squeeze=False)
  for col, seed in enumerate(seeds):
    t = trajectories[seed]
    for i, name in enumerate(names):
      axes[0, col].plot(t["step"], [w[i] for w in t["weights"]], label=name)
    axes[0, col].set(title=f"seed {seed}: source weights", xlabel="step",
                     yscale="log")
    axes[1, col].plot(t["step"], t["outer_loss"], label="validation L₁")
    axes[1, col].plot(t["step"], t["inner_loss"], label="weighted L₂")
    axes[1, col].set(title=f"seed {seed}: losses", xlabel="step")
    axes[0, col].legend(fontsize=7)
    axes[1, col].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def main(argv):
  del argv
  root = pathlib.Path(_ROOT.value)
  rows, trajectories, names = [], {}, None
  for seed in (int(s) for s in _SEEDS.value):
    seed_root = root / f"seed{seed}"
    for method, variant in METHODS.items():
      stages = _run(_config(variant, seed, _SMOKE.value), seed_root / method)
      rows.append(_row(seed, method, stages))
      logging.info("seed %d %s: %s", seed, method, rows[-1])
    greedy = _greedy(seed, _SMOKE.value, seed_root)
    rows.append({**_row(seed, "greedy", greedy),
                 "selected": greedy["selection"]["selected"]})
    trajectories[seed] = _trajectory(seed_root / "scalebio")
    names = list(rows[0]["weights"])
  table, checks = _table(rows), _checks(rows, len(names))
  print(table)
  print("\n".join(checks))
  (root / "ladder.json").write_text(json.dumps(
      {"rows": rows, "checks": checks, "trajectories":
       {str(k): v for k, v in trajectories.items()}, "sources": names},
      indent=1))
  (root / "ladder.md").write_text(table + "\n\n" + "\n".join(checks) + "\n")
  _plot(trajectories, names, root / "ladder.png")


if __name__ == "__main__":
  flags.mark_flag_as_required("root")
  app.run(main)
