"""Tests for experiments.metrics."""

import glob
import math
import os

import jax.numpy as jnp
import numpy as np
import pytest

from experiments import metrics


class FakeClock:

  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


def test_jsonl_records_round_trip(tmp_path):
  with metrics.MetricWriter(tmp_path, total_steps=10) as writer:
    floats = writer.write(
        1, {"loss": jnp.asarray(0.5, jnp.bfloat16), "acc": np.float32(0.25)}
    )
    writer.write(2, {"loss": jnp.array([0.125])}, prefix="eval")
    writer.write(3, {"loss": float("nan"), "n": 7})
  assert floats == {"loss": 0.5, "acc": 0.25}
  assert all(type(v) is float for v in floats.values())
  records = metrics.read_jsonl(tmp_path / metrics.JSONL_NAME)
  assert records[:2] == [
      {"step": 1, "prefix": "train", "loss": 0.5, "acc": 0.25},
      {"step": 2, "prefix": "eval", "loss": 0.125},
  ]
  assert math.isnan(records[2]["loss"]) and records[2]["n"] == 7.0


def test_reopening_appends(tmp_path):
  for step in (1, 2):
    with metrics.MetricWriter(tmp_path, total_steps=2) as writer:
      writer.write(step, {"loss": step})
  records = metrics.read_jsonl(tmp_path / metrics.JSONL_NAME)
  assert [r["step"] for r in records] == [1, 2]


def test_rejects_bad_metrics(tmp_path):
  with metrics.MetricWriter(tmp_path, total_steps=2) as writer:
    with pytest.raises(ValueError, match="scalar"):
      writer.write(1, {"loss": jnp.ones(2)})
    with pytest.raises(ValueError, match="reserved"):
      writer.write(1, {"step": 1})


def test_event_files_hold_the_scalars(tmp_path):
  with metrics.MetricWriter(tmp_path, total_steps=3) as writer:
    for step in range(3):
      writer.write(step, {"outer_loss": 1.0 / (step + 1)})
  assert glob.glob(os.path.join(tmp_path, "events.out.tfevents.*"))
  accumulator = pytest.importorskip(
      "tensorboard.backend.event_processing.event_accumulator"
  )
  events = accumulator.EventAccumulator(str(tmp_path))
  events.Reload()
  scalars = events.Scalars("train/outer_loss")
  assert [e.step for e in scalars] == [0, 1, 2]
  np.testing.assert_allclose([e.value for e in scalars], [1.0, 0.5, 1 / 3])


def test_progress_line_has_rate_and_eta(tmp_path, caplog):
  clock = FakeClock()
  writer = metrics.MetricWriter(
      tmp_path, total_steps=500, start_step=100, time_fn=clock
  )
  clock.now = 10.0
  with caplog.at_level("INFO"):
    line = writer.progress(120, {"outer_loss": jnp.float32(0.41234)})
  writer.close()
  assert line == "step 120/500 | outer_loss 0.4123 | 2.0 steps/s | ETA 0:03:10"
  assert any(line in r.getMessage() for r in caplog.records)


def test_progress_rate_is_since_the_previous_call(tmp_path):
  clock = FakeClock()
  with metrics.MetricWriter(tmp_path, total_steps=100, time_fn=clock) as w:
    clock.now = 100.0  # Compilation.
    w.progress(1)
    clock.now = 101.0
    assert w.progress(51).endswith("50.0 steps/s | ETA 0:00:01")
    assert w.progress(51).endswith("0 steps/s | ETA ?")


def test_inactive_writer_writes_nothing(tmp_path):
  with metrics.MetricWriter(tmp_path, total_steps=1, active=False) as writer:
    assert writer.write(1, {"loss": 1}) == {"loss": 1.0}
    assert "steps/s" in writer.progress(1)
  assert not os.listdir(tmp_path)
