"""Smoke tests of experiments/benchmarks/peers: biroute alone, tiny shape."""

import importlib.util
import json

import jax
import jax.numpy as jnp
import pytest

from experiments.benchmarks.peers import __main__ as cli
from experiments.benchmarks.peers import bench, hlo

_NO_TORCH = "needs torch: pip install -e '.[peers]'"


def test_matmul_work_of_a_lone_dot_is_2mnk():
  f = jax.jit(lambda a, b: a @ b)
  text = f.lower(jnp.ones((30, 50)), jnp.ones((50, 7))).compile().as_text()
  assert hlo.matmul_flops(text) == 2 * 30 * 7 * 50
  assert hlo.matmul_work(text) == 2 * 30 * 7 * 50 / hlo.UNIT_FLOPS


def test_matmul_work_counts_loop_iterations():
  def loop(a, b):
    return jax.lax.fori_loop(0, 5, lambda i, x: jnp.tanh(x @ b), a)

  text = jax.jit(loop).lower(jnp.ones((30, 50)),
                             jnp.ones((50, 50))).compile().as_text()
  assert hlo.matmul_flops(text) == 5 * 2 * 30 * 50 * 50


def test_matmul_work_counts_scan_with_long_carry():
  # Six carried arrays: XLA prints the tuple shape with /*index=5*/.
  def scan(*carry):
    def body(c, _):
      a, b, *rest = c
      return (jnp.tanh(a @ b), b, *(r + 1 for r in rest)), None
    return jax.lax.scan(body, carry, length=7)[0]

  args = (jnp.ones((30, 50)), jnp.ones((50, 50))) + tuple(
      jnp.ones(i) for i in range(1, 5))
  text = jax.jit(scan).lower(*args).compile().as_text()
  assert "/*index=5*/" in text
  assert hlo.matmul_flops(text) == 7 * 2 * 30 * 50 * 50


def test_biroute_worker_alone_gives_table_and_json(tmp_path, capsys):
  out = tmp_path / "peers.json"
  args = cli.parse_args([
      "--shape=tiny", "--systems=biroute:cg,biroute:unrolled", "--ks=2",
      "--rounds=2", "--warmup=1", "--auroc_steps=3", "--synthetic",
      "--max_foreign_cores=1e9", f"--json={out}"])
  bench.run(args)
  result = json.loads(out.read_text())
  assert result["meta"]["cpu"]["2"]["rounds_kept"] == 2
  rows = {r["system"]: r for r in result["rows"]}
  assert set(rows) == {"biroute:cg", "biroute:unrolled"}
  for row in rows.values():
    assert row["error"] is None
    assert row["steps_timed"] == 2
    assert 0 < row["ms_p10"] <= row["ms_median"] <= row["ms_p90"]
    assert 0.0 <= row["auroc"] <= 1.0
    assert row["matmul_work"] > 0 and row["hlo_ops"] > 0
  assert "| biroute:cg | IFT + CG(10) | 2 |" in capsys.readouterr().out
  assert "| biroute:cg |" in result["table"]


def test_unknown_system_lists_valid_names():
  with pytest.raises(ValueError, match="biroute:cg"):
    bench.select_systems("nope:*")


@pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                    reason=_NO_TORCH)
def test_hand_written_torch_matches_biroute_first_step(tmp_path):
  args = cli.parse_args([
      "--shape=tiny", "--systems=biroute:identity,torch:identity", "--ks=1",
      "--rounds=1", "--warmup=0", "--auroc_steps=1", "--synthetic",
      "--max_foreign_cores=1e9"])
  rows = {r["system"]: r for r in bench.run(args)["rows"]}
  assert rows["torch:identity"]["error"] is None
  assert rows["biroute:identity"]["first_step_sign_agreement_vs_torch"] > 0.9
  assert rows["biroute:identity"]["peer_ratio"] > 0
