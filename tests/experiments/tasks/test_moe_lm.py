"""The byte-level MoE LM: corpus, model variants, matched sizes, the loop."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import train
from experiments.configs import moe_lm as moe_lm_config
from experiments.tasks import moe_lm as task_lib
from experiments.tasks import text_corpus
from models import moe_lm

SMALL = 300_000  # bytes of the smoke corpus


def _build_uncached(root=None, max_bytes=SMALL):
  return text_corpus.load_corpus.__wrapped__(root, max_bytes=max_bytes)


def test_corpus_is_deterministic_and_split_by_file():
  a, b = _build_uncached(), _build_uncached()
  assert a.fingerprint == b.fingerprint
  np.testing.assert_array_equal(a.train, b.train)
  np.testing.assert_array_equal(a.validation, b.validation)
  assert not set(a.train_files) & set(a.validation_files)
  assert a.train_files and a.validation_files
  # The kept files are a prefix of the sorted list, each split in order.
  kept = sorted(a.train_files + a.validation_files)
  root = text_corpus.stdlib_dir()
  assert kept == text_corpus.source_files(root)[:len(kept)]
  for path in kept:
    assert text_corpus.is_validation_file(path, 0.1) == (
        path in a.validation_files)
  sep = bytes([text_corpus.SEPARATOR])
  expected = b"".join(
      open(os.path.join(root, p), "rb").read() + sep
      for p in a.validation_files)
  assert a.validation.tobytes() == expected
  assert a.train.size + a.validation.size <= SMALL + len(kept)


def test_corpus_errors_name_the_directory(tmp_path):
  missing = tmp_path / "no_such_dir"
  with pytest.raises(FileNotFoundError, match="no_such_dir"):
    _build_uncached(str(missing))
  with pytest.raises(FileNotFoundError, match="no .py files"):
    _build_uncached(str(tmp_path))


def test_batches_are_pure_functions_of_the_step():
  corpus = text_corpus.load_corpus(max_bytes=SMALL)
  batch = text_corpus.train_batches(jax.random.key(0), corpus.train, 3, 16)
  x = np.asarray(batch(5))
  assert x.shape == (3, 17) and x.dtype == np.int32
  np.testing.assert_array_equal(x, np.asarray(batch(5)))
  assert not np.array_equal(x, np.asarray(batch(6)))
  text = corpus.train.tobytes()
  assert all(bytes(row.astype(np.uint8)) in text for row in x)
  val = text_corpus.validation_batches(corpus.validation, 3, 16, 2)
  assert val.shape == (2, 3, 17)
  np.testing.assert_array_equal(
      val, text_corpus.validation_batches(corpus.validation, 3, 16, 2))


def _tiny(ffn: str) -> moe_lm.MoeLMConfig:
  return moe_lm.MoeLMConfig(ffn=ffn, dim=32, num_layers=1, num_heads=2,
                            num_experts=4, expert_hidden=32, lora_rank=4)


@pytest.mark.parametrize("ffn", moe_lm.FFN_KINDS)
def test_each_variant_runs_forward(ffn):
  config = _tiny(ffn)
  graphdef, state = nnx.split(moe_lm.MoeLM(config, rngs=nnx.Rngs(0)))
  tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, 256)
  logits, aux = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(
      state, tokens[:, :-1])
  assert logits.shape == (2, 8, 256) and logits.dtype == jnp.float32
  ce = np.mean(-jax.nn.log_softmax(logits)[
      np.arange(2)[:, None], np.arange(8), tokens[:, 1:]])
  assert np.isfinite(ce) and abs(ce - np.log(256)) < 2.0
  if ffn == "dense":
    assert aux == {}
    return
  assert aux["expert_load"].shape == (1, 4)
  assert aux["experts_per_token"].shape == (1, 5)
  assert aux["num_dropped"].shape == (1,)
  assert float(aux["experts_per_token"].sum()) == 16  # every token counted
  for name in ("router_z_loss", "load_balancing_loss", "router_entropy"):
    if name in aux:
      assert aux[name].shape == () and np.isfinite(float(aux[name]))


def _ffn_active_from_arrays(config: moe_lm.MoeLMConfig) -> int:
  """Active FFN parameters per token, from the parameter arrays' shapes.

  Each of the ``E`` routed experts' ``[E, ·, ·]`` weights counts ``k / E``
  (every routed variant is built to use ``k`` experts per token on
  average); everything else (routers, dense and LoRA weights) counts fully.
  """
  model = nnx.eval_shape(lambda: moe_lm.MoeLM(config, rngs=nnx.Rngs(0)))
  state = nnx.state(model.blocks[0].ffn, nnx.Param)
  total = 0.0
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    name = str(path[0].key)
    per_token = (config.active_experts / config.num_experts
                 if name in ("w_in", "w_out") and leaf.ndim == 3 else 1.0)
    total += per_token * leaf.size
  return round(total)


def test_active_params_are_matched_across_variants():
  counts = {ffn: _ffn_active_from_arrays(moe_lm.MoeLMConfig(ffn=ffn))
            for ffn in moe_lm.FFN_KINDS}
  assert max(counts.values()) <= 1.05 * min(counts.values()), counts
  for ffn, count in counts.items():
    config = moe_lm.MoeLMConfig(ffn=ffn)
    assert moe_lm.ffn_active_params(config) == count, ffn
    model = nnx.eval_shape(lambda c=config: moe_lm.MoeLM(c, rngs=nnx.Rngs(0)))
    everything = sum(x.size for x in jax.tree.leaves(
        nnx.state(model, nnx.Param)))
    ffn_total = sum(x.size for b in model.blocks
                    for x in jax.tree.leaves(nnx.state(b.ffn, nnx.Param)))
    embedding = config.vocab_size * config.dim
    assert moe_lm.active_params(config) == (
        everything - embedding - ffn_total + config.num_layers * count)


def test_loss_coefficient_for_an_undefined_loss_is_an_error():
  graphdef, state = nnx.split(moe_lm.MoeLM(_tiny("dense"),
                                           rngs=nnx.Rngs(0)))
  loss, _ = task_lib.make_loss(graphdef, {"load_balancing": 1e-2})
  tokens = jnp.zeros((1, 5), jnp.int32)
  with pytest.raises(ValueError, match="load_balancing"):
    jax.eval_shape(loss, {}, state, {"tokens": tokens})


def test_token_budget_sets_the_step_count():
  config = moe_lm_config.get_config("coe,smoke")
  assert config.train.num_steps == 6
  assert config.solver.optimizer.decay_steps == 6
  config.data.token_budget = 10 * 4 * 32
  assert config.train.num_steps == 10
  with pytest.raises(ValueError, match="at most one FFN"):
    moe_lm_config.get_config("top2,coe")


def test_smoke_trains_then_eval_restores_the_same_loss(tmp_path):
  config = moe_lm_config.get_config("top_p,smoke")
  results = train.train_and_evaluate(config, tmp_path)
  for name in ("val_loss", "train_tokens_per_s", "load_max_over_mean",
               "load_cv", "experts_per_token", "experts_per_token_1"):
    assert np.isfinite(results[name]), name
  assert results["val_loss"] < np.log(256)
  histogram = sum(results[f"experts_per_token_{n}"] for n in range(5))
  assert histogram == pytest.approx(1.0)
  evaluated = train.evaluate(config, tmp_path)
  assert evaluated["val_loss"] == results["val_loss"]
  assert evaluated["load_cv"] == results["load_cv"]
