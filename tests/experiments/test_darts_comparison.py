"""The DARTS comparison's table and α trajectories, from written workdirs."""

import json

import numpy as np
import pytest

from experiments import metrics
from experiments.benchmarks import darts_comparison
from experiments.tasks import nas_search
from models import darts

GENOTYPE = {"normal": [["sep_conv_3x3", 0], ["skip_connect", 1]],
            "normal_concat": [2], "reduce": [["max_pool_3x3", 1],
                                             ["dil_conv_5x5", 0]],
            "reduce_concat": [2]}


def _write_run(root, name, accuracy, seconds, stages=None):
  workdir = root / name
  workdir.mkdir()
  (workdir / "results.json").write_text(json.dumps(
      {"test_accuracy": accuracy, "params_millions": 0.5,
       "genotype": GENOTYPE}))
  (workdir / "stage_seconds.json").write_text(json.dumps(seconds))
  (workdir / "stages.json").write_text(json.dumps(stages or {}))


def test_rows_split_search_and_retrain_time_and_summarise_random(tmp_path):
  _write_run(tmp_path, "gm_nas", 0.5, {"supernet": 60.0, "sub0": 120.0,
                                        "sub1": 120.0, "retrain": 90.0},
             {"sub0": {"split_cell": "normal", "split_edge": 3,
                       "split_groups": [["none"], ["skip_connect"]],
                       "split_cost": 0.1, "val_accuracy": 0.3},
              "sub1": {"val_accuracy": 0.4}})
  _write_run(tmp_path, "random0", 0.4, {"retrain": 60.0})
  _write_run(tmp_path, "random1", 0.2, {"retrain": 60.0})
  rows = [darts_comparison._row(tmp_path, n)
          for n in ("gm_nas", "random0", "random1")]
  assert rows[0]["search_s"] == 300.0 and rows[0]["retrain_s"] == 90.0
  assert rows[0]["gm"]["val_accuracy"] == [0.3, 0.4]
  assert rows[1]["search_s"] == 0.0
  text = darts_comparison.table(rows)
  assert "| gm_nas | 50.00 % | 0.500 | 5.0 | 1.5 |" in text
  assert "sep_conv_3x3<0 skip_connect<1" in text
  assert "random genotypes (2): mean 30.00 % ± 10.00" in text


def test_alpha_trajectory_orders_edges_like_the_alpha_rows(tmp_path):
  edges = nas_search.edge_nodes(5)  # 2 nodes: 0-2, 1-2, 0-3, 1-3, 2-3
  rng = np.random.default_rng(0)
  records = []
  for step in (10, 20):
    weights = {kind: rng.dirichlet(np.ones(8), len(edges))
               for kind in darts.CELL_KINDS}
    record = {"step": step, "prefix": "train"}
    for kind, rows in weights.items():
      for (i, j), row in zip(edges, rows):
        for op, w in zip(darts.PRIMITIVES, row):
          record[f"alpha/{kind}/{i}-{j}/{op}"] = float(w)
    records.append((record, weights))
  with open(tmp_path / metrics.JSONL_NAME, "w") as f:
    for record, _ in records:
      f.write(json.dumps(record) + "\n")
  trajectory = darts_comparison.alpha_trajectory(tmp_path)
  assert trajectory["steps"] == [10, 20]
  assert trajectory["normal_edges"] == [f"{i}-{j}" for i, j in edges]
  for kind in darts.CELL_KINDS:
    np.testing.assert_allclose(
        trajectory[kind], [w[kind] for _, w in records])


@pytest.mark.parametrize("missing", ["results.json", "stage_seconds.json"])
def test_a_run_without_its_files_is_refused(tmp_path, missing):
  _write_run(tmp_path, "darts1", 0.5, {"search": 1.0, "retrain": 1.0})
  (tmp_path / "darts1" / missing).unlink()
  with pytest.raises(FileNotFoundError, match=missing):
    darts_comparison._row(tmp_path, "darts1")
