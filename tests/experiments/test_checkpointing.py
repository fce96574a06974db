"""Tests for experiments.checkpointing."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from experiments import checkpointing


def _make_state(seed=0):
  params = {
      "w": jnp.arange(16, dtype=jnp.float32).reshape(8, 2) + seed,
      "b": jnp.linspace(-1, 1, 3, dtype=jnp.bfloat16),
  }
  return {
      "params": params,
      "opt_state": optax.adam(1e-3).init(params),
      "step": jnp.asarray(seed, jnp.int32),
      "key": jax.random.split(jax.random.key(seed), 8),
      "raw_key": jax.random.PRNGKey(seed),
      "data_position": jnp.asarray(100 * seed, jnp.int32),
  }


def _assert_bit_identical(actual, expected):
  actual = checkpointing.key_to_data(actual)
  expected = checkpointing.key_to_data(expected)
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    assert (a.dtype, a.shape) == (e.dtype, e.shape)
    assert np.asarray(a).tobytes() == np.asarray(e).tobytes()


def _save_steps(directory, steps, **kwargs):
  with checkpointing.Checkpointer(directory, **kwargs) as ckpt:
    for step in steps:
      ckpt.save(step, _make_state(step))


def test_roundtrip_is_bit_identical(tmp_path):
  state = _make_state(3)
  with checkpointing.Checkpointer(tmp_path) as ckpt:
    assert ckpt.latest_step() is None
    assert ckpt.restore_or_none(jax.eval_shape(lambda: state)) is None
    assert ckpt.save(3, state)
    ckpt.wait()
    step, restored = ckpt.restore(jax.eval_shape(lambda: state))
  assert step == 3
  _assert_bit_identical(restored, state)
  adam_state = restored["opt_state"][0]
  assert isinstance(adam_state, optax.ScaleByAdamState)
  assert isinstance(restored["opt_state"][1], optax.EmptyState)
  assert jax.dtypes.issubdtype(restored["key"].dtype, jax.dtypes.prng_key)
  assert restored["params"]["b"].dtype == jnp.bfloat16


def test_restore_applies_requested_sharding(tmp_path):
  if jax.device_count() < 8:
    pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
  mesh = jax.make_mesh(
      (8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,)
  )
  rows = NamedSharding(mesh, P("data"))
  replicated = NamedSharding(mesh, P())

  def with_sharding(x):
    sharding = rows if x.ndim and x.shape[0] == 8 else replicated
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

  state = _make_state(1)
  _save_steps(tmp_path, [1])
  abstract = jax.tree.map(with_sharding, jax.eval_shape(lambda: state))
  with checkpointing.Checkpointer(tmp_path) as ckpt:
    _, restored = ckpt.restore(abstract)
  _assert_bit_identical(restored, state)
  for leaf, target in zip(jax.tree.leaves(restored), jax.tree.leaves(abstract)):
    assert leaf.sharding == target.sharding
  assert len(restored["params"]["w"].addressable_shards) == 8
  assert restored["params"]["w"].addressable_shards[0].data.shape == (1, 2)
  assert restored["key"].sharding == rows


def test_keeps_the_newest_max_to_keep_steps(tmp_path):
  _save_steps(tmp_path, range(5), max_to_keep=2)
  with checkpointing.Checkpointer(tmp_path, max_to_keep=2) as ckpt:
    assert ckpt.all_steps() == [3, 4]
    assert ckpt.latest_step() == 4


def test_save_interval_skips_off_steps_unless_forced(tmp_path):
  with checkpointing.Checkpointer(tmp_path, save_interval_steps=2) as ckpt:
    saved = [ckpt.save(step, _make_state(step)) for step in (2, 3)]
    saved.append(ckpt.save(5, _make_state(5), force=True))
    ckpt.wait()
    assert saved == [True, False, True]
    assert ckpt.all_steps() == [2, 5]


def _truncate_files(step_dir):
  for path in (step_dir / "default").rglob("*"):
    if path.is_file():
      path.write_bytes(b"")


def _truncate_manifests(step_dir):
  for path in step_dir.rglob("manifest.ocdbt"):
    path.write_bytes(b"")


def _delete_array_data(step_dir):
  # Keeps the commit markers and metadata so that orbax lists the step.
  for path in step_dir.rglob("*"):
    if path.is_file() and path.parent != step_dir and path.name[0] != "_":
      path.unlink()


# Orbax leaves an asyncio callback behind when a read fails.
_IGNORE_CLOSED_LOOP = pytest.mark.filterwarnings(
    "ignore::pytest.PytestUnraisableExceptionWarning"
)


@_IGNORE_CLOSED_LOOP
@pytest.mark.parametrize(
    "damage", [_truncate_files, _truncate_manifests, _delete_array_data]
)
def test_unreadable_latest_step_falls_back(tmp_path, damage, caplog):
  _save_steps(tmp_path, [1, 2, 3])
  damage(tmp_path / "3")
  damage(tmp_path / "2")
  abstract = jax.eval_shape(lambda: _make_state(1))
  with checkpointing.Checkpointer(tmp_path) as ckpt:
    assert ckpt.latest_step() == 3
    with caplog.at_level("WARNING"):
      step, restored = ckpt.restore(abstract)
    assert step == 1
    _assert_bit_identical(restored, _make_state(1))
    warnings = [r.getMessage() for r in caplog.records]
    for bad in (2, 3):
      assert any(f"step {bad} in {tmp_path}" in m for m in warnings), warnings
    # The rerun's steps replace the unreadable ones instead of being skipped.
    assert ckpt.save(2, _make_state(2))
    ckpt.wait()
    assert ckpt.all_steps() == [1, 2]
    assert ckpt.restore(abstract)[0] == 2


@_IGNORE_CLOSED_LOOP
def test_no_readable_step_raises(tmp_path):
  _save_steps(tmp_path, [1])
  _truncate_files(tmp_path / "1")
  abstract = jax.eval_shape(lambda: _make_state(1))
  with checkpointing.Checkpointer(tmp_path) as ckpt:
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
      ckpt.restore(abstract)
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
      ckpt.restore_or_none(abstract)


def test_empty_directory_raises(tmp_path):
  abstract = jax.eval_shape(lambda: _make_state(1))
  with checkpointing.Checkpointer(tmp_path / "none") as ckpt:
    with pytest.raises(FileNotFoundError, match="none"):
      ckpt.restore(abstract)
    with pytest.raises(FileNotFoundError, match="step 7"):
      ckpt.restore(abstract, step=7)


def test_leftover_tmp_directory_is_ignored(tmp_path):
  _save_steps(tmp_path, [1])
  # What a save killed mid-write leaves behind.
  shutil.copytree(tmp_path / "1", tmp_path / "2.orbax-checkpoint-tmp-1234")
  _truncate_files(tmp_path / "2.orbax-checkpoint-tmp-1234")
  with checkpointing.Checkpointer(tmp_path) as ckpt:
    assert ckpt.all_steps() == [1]
    step, restored = ckpt.restore(jax.eval_shape(lambda: _make_state(1)))
    assert step == 1
    _assert_bit_identical(restored, _make_state(1))
    assert ckpt.save(2, _make_state(2))
    ckpt.wait()
    assert ckpt.all_steps() == [1, 2]


def test_key_helpers_roundtrip():
  keys = {"a": jax.random.key(0, impl="rbg"), "b": jnp.ones(2)}
  data = checkpointing.key_to_data(keys)
  assert data["a"].dtype == jnp.uint32
  back = checkpointing.data_to_key(data, jax.eval_shape(lambda: keys))
  assert jax.random.key_impl(back["a"]) == jax.random.key_impl(keys["a"])
  np.testing.assert_array_equal(
      jax.random.key_data(back["a"]), jax.random.key_data(keys["a"])
  )



def _garble_array_data(step_dir):
  """Flips a byte in the middle of the array data; the size is unchanged.

  The array chunks carry no checksum of their own (orbax's b-tree index
  does), so the step still reads, with wrong values.
  """
  # Array chunks, not OCDBT index nodes (magic 0cdb20de, checksummed).
  data_file = max((p for p in step_dir.glob("default/ocdbt.process_*/d/*")
                   if p.read_bytes()[:4] != b"\x0c\xdb\x20\xde"),
                  key=lambda p: p.stat().st_size)
  data = bytearray(data_file.read_bytes())
  data[len(data) // 2] ^= 0xFF
  data_file.write_bytes(bytes(data))


def _big_state(step):
  # Incompressible data: the largest data file is then the array's chunk.
  w = jax.random.normal(jax.random.key(step), (64, 64))
  return {"w": w, "step": jnp.asarray(step, jnp.int32)}


@_IGNORE_CLOSED_LOOP
def test_garbled_same_size_step_fails_its_checksum_and_falls_back(
    tmp_path, caplog):
  with checkpointing.Checkpointer(tmp_path) as ckpt:
    for step in (1, 2):
      ckpt.save(step, _big_state(step))
  _garble_array_data(tmp_path / "2")
  abstract = jax.eval_shape(lambda: _big_state(1))
  with checkpointing.Checkpointer(tmp_path) as ckpt:
    with caplog.at_level("WARNING"):
      step, restored = ckpt.restore(abstract)
    assert step == 1
    _assert_bit_identical(restored, _big_state(1))
    assert any(f"step 2 in {tmp_path}" in r.getMessage() and "checksum" in
               r.getMessage() for r in caplog.records)
    with pytest.raises(checkpointing.CorruptCheckpointError, match="step 2"):
      ckpt.restore(abstract, step=2)


def test_shape_mismatch_is_reported_as_such(tmp_path):
  _save_steps(tmp_path, [1, 2])
  state = _make_state(1)
  state["params"]["w"] = jnp.zeros((8, 3))
  with checkpointing.Checkpointer(tmp_path) as ckpt:
    with pytest.raises(checkpointing.ShapeMismatchError,
                       match=r"params.w has shape \(8, 2\) there and \(8, 3\)"):
      ckpt.restore(jax.eval_shape(lambda: state))


def test_checksum_depends_on_every_byte():
  state = _make_state(1)
  assert checkpointing.checksum(state) == checkpointing.checksum(
      _make_state(1))
  state["params"]["w"] = state["params"]["w"].at[3, 1].add(1e-6)
  assert checkpointing.checksum(state) != checkpointing.checksum(
      _make_state(1))
