"""Smoke test of experiments/benchmarks/bra.py: one round at the CPU shape."""

from experiments.benchmarks import bra


def test_main_times_every_backend_at_cpu_shape(capsys):
  results = bra.main(("cpu",), ("reference", bra.DENSE), repeats=1)
  times, peaks = results["cpu"]
  assert set(times) == set(peaks) == {"reference", "dense (xla)"}
  assert all(t > 0 for pair in times.values() for t in pair)
  assert all(p > 0 for p in peaks.values())
  assert "reference" in capsys.readouterr().out
