"""The DARTS search → genotype → retrain pipeline (``architecture_search``).

The smoke pipeline (generated 8x8 images, a C = 4, 3-cell supernet) runs
once per module; the resume test reruns it from a copy, with JAX's
persistent compilation cache so the second run reuses the first's
compiled steps.
"""

import json
import pathlib
import shutil

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx
from jax.experimental.compilation_cache import compilation_cache as jax_cache

import bilevel
from experiments import metrics, train
from experiments.configs import darts_cifar10
from experiments.task import DeferredStage, Pipeline, Stage
from experiments.tasks import nas_retrain, nas_search
from models import darts
from models.levels import ArchParam


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory):
  """A persistent compilation cache for this module's runs, then none.

  The cache is set up once per process, at the first compilation, so it is
  reset to take the new directory (and again to drop it).
  """
  names = ("jax_compilation_cache_dir",
           "jax_persistent_cache_min_compile_time_secs",
           "jax_persistent_cache_min_entry_size_bytes")
  saved = {name: getattr(jax.config, name) for name in names}
  jax.config.update(names[0], str(tmp_path_factory.mktemp("jax_cache")))
  jax.config.update(names[1], 0.0)
  jax.config.update(names[2], 0)
  jax_cache.reset_cache()
  yield
  for name, value in saved.items():
    jax.config.update(name, value)
  jax_cache.reset_cache()


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, compilation_cache):
  """The GM-NAS smoke pipeline trained once: ``(config, workdir, results)``.

  GM-NAS runs every part of the plain DARTS pipeline (its sub-supernets are
  DARTS searches), plus the frozen-α supernet, the split and the selection.
  """
  del compilation_cache
  config = darts_cifar10.get_config("smoke,gm_nas")
  workdir = tmp_path_factory.mktemp("darts") / "run"
  return config, workdir, train.train_and_evaluate(config, workdir)


def _stages(workdir):
  return json.loads((pathlib.Path(workdir) / "stages.json").read_text())


def test_darts_pipeline_is_search_then_retrain():
  pipeline = nas_search.pipeline_from_config(
      darts_cifar10.get_config("smoke"), jax.random.key(0))
  assert [s.name for s in pipeline.stages] == ["search", "retrain"]
  assert isinstance(pipeline.stages[1], DeferredStage)


def test_gm_nas_splits_selects_the_better_child_and_retrains_it(smoke):
  config, workdir, results = smoke
  stages = _stages(workdir)
  assert list(stages) == ["supernet", "sub0", "sub1", "retrain"]
  # The supernet trains with α frozen: its final α are its initial ones.
  pipeline = nas_search.pipeline_from_config(config, train.task_key(config))
  initial = pipeline.stages[0].init({})
  supernet = train.load_params(workdir, config, stage="supernet")
  chex.assert_trees_all_equal(supernet.upper, initial.upper)
  assert not np.array_equal(
      jax.tree.leaves(supernet.lower)[0], jax.tree.leaves(initial.lower)[0])
  # One split, shared by both children: an edge's 8 ops cut in two groups.
  split = {k: v for k, v in stages["sub0"].items() if k.startswith("split")}
  assert split == {k: v for k, v in stages["sub1"].items()
                   if k.startswith("split")}
  groups = split["split_groups"]
  assert len(groups) == 2 and sorted(sum(groups, [])) == sorted(
      darts.PRIMITIVES)
  # The child with the better val accuracy (ties: sub0) is retrained.
  accuracies = [stages[f"sub{k}"]["val_accuracy"] for k in (0, 1)]
  best = f"sub{int(np.argmax(accuracies))}"
  assert results["genotype"] == stages[best]["genotype"]
  assert 0.0 <= results["test_accuracy"] <= 1.0
  assert results["steps/darts1"] == 2 + 2 * 4
  assert results["steps/train"] == 4


def test_search_logs_alpha_trajectories_and_eval_restores(smoke):
  config, workdir, results = smoke
  final = train.load_params(workdir, config, stage="sub0")
  logged = [r for r in metrics.read_jsonl(workdir / "sub0" /
                                          metrics.JSONL_NAME)
            if r["prefix"] == "train"]
  assert [r["step"] for r in logged] == [2, 4]
  for record in logged:
    total = sum(v for k, v in record.items()
                if k.startswith("alpha/normal/0-2/"))
    assert total == pytest.approx(1.0, abs=1e-6)
  assert logged[-1]["alpha/reduce/1-3/sep_conv_3x3"] == pytest.approx(
      nas_search.arch_weights(final.upper)["alpha/reduce/1-3/sep_conv_3x3"])
  evaluated = train.evaluate(config, workdir)
  for key in ("test_accuracy", "test_loss", "genotype"):
    assert evaluated[key] == results[key], key


def test_resumed_search_hands_the_same_genotype_to_retraining(smoke,
                                                              tmp_path):
  config, workdir, results = smoke
  copy = tmp_path / "run"
  shutil.copytree(workdir, copy)
  # Killed in the middle of the second child: the split is recomputed from
  # the restored supernet, the child resumes, the selection and the
  # retraining follow.
  shutil.rmtree(copy / "sub1" / "checkpoints" / "4")
  shutil.rmtree(copy / "retrain")
  resumed = train.train_and_evaluate(config, copy)
  for stage in ("sub1", "retrain"):
    chex.assert_trees_all_equal(
        train.load_params(copy, config, stage=stage),
        train.load_params(workdir, config, stage=stage))
  assert resumed == results


def _toy_upper(seed=0, betas=False):
  keys = jax.random.split(jax.random.key(seed), 4)
  state = {f"alphas_{kind}": ArchParam(jax.random.normal(k, (14, 8)))
           for kind, k in zip(darts.CELL_KINDS, keys)}
  if betas:
    state.update({f"betas_{kind}": ArchParam(jax.random.normal(k, (14,)))
                  for kind, k in zip(darts.CELL_KINDS, keys[2:])})
  return nnx.State(state)


def test_arch_weights_are_distributions_per_edge_and_node():
  weights = nas_search.arch_weights(_toy_upper(betas=True))
  assert len(weights) == 2 * (14 * 8 + 14)
  for kind in darts.CELL_KINDS:
    for i, j in nas_search.EDGES:
      ops = [weights[f"alpha/{kind}/{i}-{j}/{op}"] for op in darts.PRIMITIVES]
      assert sum(ops) == pytest.approx(1.0)
    for j in range(2, 6):
      edges = [weights[f"beta/{kind}/{i}-{j}"] for i in range(j)]
      assert sum(edges) == pytest.approx(1.0)


def test_derive_respects_op_masks_and_round_trips_through_json():
  upper = _toy_upper()
  genotype = nas_search.derive(upper)
  assert genotype == darts.derive_genotype(
      *(np.asarray(upper[f"alphas_{k}"][...]) for k in darts.CELL_KINDS))
  masks = {k: np.ones((14, 8), bool) for k in darts.CELL_KINDS}
  masks["normal"][:, darts.PRIMITIVES.index("sep_conv_3x3")] = False
  masked = nas_search.derive(upper, masks)
  assert all(op != "sep_conv_3x3" for op, _ in masked.normal)
  as_json = json.loads(json.dumps(nas_retrain.genotype_to_json(masked)))
  assert nas_retrain.genotype_from_json(as_json) == masked


def test_random_genotype_is_valid_uniform_and_seeded():
  assert nas_search.random_genotype(3) == nas_search.random_genotype(
      jax.random.key(3))
  samples = [nas_search.random_genotype(seed) for seed in range(120)]
  assert len(set(samples)) == len(samples)
  ops, firsts = set(), set()
  for genotype in samples:
    assert genotype.normal_concat == genotype.reduce_concat == (2, 3, 4, 5)
    for cell in (genotype.normal, genotype.reduce):
      assert len(cell) == 8
      for node in range(4):
        (op_a, a), (op_b, b) = cell[2 * node:2 * node + 2]
        assert a != b and 0 <= min(a, b) and max(a, b) < 2 + node
        ops.update((op_a, op_b))
      firsts.add(cell[6][1])  # node 5's first input
  assert ops == set(darts.PRIMITIVES) - {"none"}
  assert firsts == {0, 1, 2, 3, 4}


def test_warmup_masks_architecture_updates_and_their_adam_state():
  cfg = darts_cifar10.get_config("pc_darts").solver
  cfg.warmup_steps = 2
  tx = nas_search.solver_from_config(cfg)
  loss = lambda a, w, batch: jnp.sum((w - a) ** 2) + jnp.sum(a ** 2)
  step = bilevel.make_step(tx, bilevel.Problem(loss, loss))
  params = bilevel.Params(jnp.ones([3]), jnp.zeros([3]))
  state = tx.init(params)
  history = []
  for _ in range(3):
    params, state, _ = step(params, state, {"outer_batch": None,
                                            "inner_batch": None})
    history.append(params)
  for p in history[:2]:
    np.testing.assert_array_equal(p.upper, np.ones([3]))
  assert not np.array_equal(history[0].lower, np.zeros([3]))
  assert not np.array_equal(history[2].upper, np.ones([3]))
  # The first unmasked step is Adam's first (bias-corrected) step:
  # lr·sign(g) for the gradient g of step 3.
  g = optax.tree.add_scale(
      jax.grad(loss)(history[1].upper, history[1].lower, None),
      cfg.arch_weight_decay, history[1].upper)
  np.testing.assert_allclose(history[1].upper - history[2].upper,
                             cfg.upper_optimizer.lr * np.sign(g), rtol=1e-4)


def _toy_deferred_pipeline(builds):
  """Stage ``a`` learns a length; stage ``b``'s params have that length."""
  loss = lambda u, l, b: jnp.sum((l - b["target"]) ** 2)
  sgd = bilevel.per_level(optax.set_to_zero(), optax.sgd(0.25))
  a = Stage("a", sgd, bilevel.Problem(loss, loss),
            lambda finals: bilevel.Params({}, jnp.zeros([1])),
            lambda step: {"outer_batch": {"target": jnp.full([1], 3.0)}}, 4)

  def build(finals):
    n = int(np.round(np.asarray(finals["a"].lower)[0]))
    builds.append(n)
    init = bilevel.Params({}, jnp.zeros([n]))
    return Stage("b", sgd, bilevel.Problem(loss, loss),
                 lambda finals: init,
                 lambda step: {"outer_batch": {"target": jnp.arange(n) + 0.}},
                 4, evaluate=lambda p: {"sum": float(jnp.sum(p.lower)),
                                        "size": str(n)},
                 params_like=init)

  return Pipeline(a.init({}), [a, DeferredStage("b", build)])


def test_deferred_stage_is_built_from_restored_results(tmp_path):
  config = ml_collections.ConfigDict(dict(seed=0, train=dict(
      max_to_keep=2, log_every=2, checkpoint_every=2)))
  builds = []
  first = train._run_pipeline(config, _toy_deferred_pipeline(builds),
                              tmp_path, jax.random.key(0))
  assert builds == [3] and first["size"] == "3"
  assert _stages(tmp_path)["b"]["size"] == "3"
  shutil.rmtree(tmp_path / "b" / "checkpoints" / "4")
  again = train._run_pipeline(config, _toy_deferred_pipeline(builds),
                              tmp_path, jax.random.key(0))
  assert builds == [3, 3] and again == first
  # Eval mode builds ``b`` from ``a``'s restored params.
  pipeline = _toy_deferred_pipeline(builds)
  stage = train._chosen_stage(config, pipeline, tmp_path, None)
  assert builds[-1] == 3 and stage.params_like.lower.shape == (3,)


def test_last_stage_stops_the_pipeline_and_a_rerun_goes_on(tmp_path):
  config = ml_collections.ConfigDict(dict(seed=0, last_stage="a", train=dict(
      max_to_keep=2, log_every=2, checkpoint_every=2)))
  builds = []
  train._run_pipeline(config, _toy_deferred_pipeline(builds), tmp_path,
                      jax.random.key(0))
  assert builds == [] and not (tmp_path / "b").exists()
  config.last_stage = ""
  again = train._run_pipeline(config, _toy_deferred_pipeline(builds),
                              tmp_path, jax.random.key(0))
  assert builds == [3] and again["size"] == "3"
  config.last_stage = "c"
  with pytest.raises(ValueError, match="last_stage='c'"):
    train._run_pipeline(config, _toy_deferred_pipeline(builds), tmp_path,
                        jax.random.key(0))


def test_bad_config_keys_are_named():
  config = darts_cifar10.get_config("smoke")
  config.method = "evolution"
  with pytest.raises(ValueError, match="method='evolution'"):
    nas_search.pipeline_from_config(config, jax.random.key(0))
  config = darts_cifar10.get_config("smoke")
  config.retrain.auxiliary = True
  with pytest.raises(ValueError, match="retrain.auxiliary"):
    nas_search.pipeline_from_config(config, jax.random.key(0))
  config = darts_cifar10.get_config("smoke")
  config.search.val_images = 12  # not a multiple of the batch of 8
  with pytest.raises(ValueError, match="search.val_images=12"):
    nas_search.pipeline_from_config(config, jax.random.key(0))
