r"""DARTS / PC-DARTS on CIFAR-10: search → genotype → retrain (and random).

``experiments/tasks/nas_search.py``: stage ``search`` runs the supernet on a
50/50 split of training images (train half for the weights, val half for
the architecture), stage ``retrain`` trains the derived genotype from
scratch and reports test accuracy; ``random`` retrains a uniformly sampled
genotype instead.

Run (stages in DIR/search and DIR/retrain; the genotype is printed and kept
in DIR/stages.json, the α trajectories in DIR/search/metrics.jsonl; CIFAR-10
as ``python -m experiments.data_prepare cifar10`` writes it):

  python -m experiments.main \
      --config=experiments/configs/darts_cifar10.py --workdir=/tmp/darts1
  python -m experiments.main \
      --config=experiments/configs/darts_cifar10.py --workdir=/tmp/darts1 \
      --mode=eval
  python -m experiments.main \
      --config=experiments/configs/darts_cifar10.py:random \
      --workdir=/tmp/random1 --config.random.seed=1

One command per stage: ``--config.last_stage=search`` stops after the
search (the genotype is in DIR/stages.json); the same command without it
and with ``--allow_config_change=last_stage`` restores the search and
retrains. The whole comparison:
``python -m experiments.benchmarks.darts_comparison``.

Variants (comma-separated after a colon):
  darts1    first-order DARTS (the default; named for the tables)
  darts2    second order: one virtual step with ξ = the weights' learning
            rate and weight decay, finite-difference mixed product
  pc_darts  PC-DARTS: K = 4 partial channels, edge normalisation, α frozen
            for the first 30 % of the search (official: 15 of 50 epochs),
            Adam 2× DARTS's (its official batch 256 and weight lr 0.1 only in
            ``full``: the CPU protocol keeps one batch and weight
            learning rate for all methods, the official ratio of the two
            is the same)
  gm_nas    GM-NAS over first-order DARTS: the supernet with α frozen
            for half a search, one gradient-matching split into two
            sub-supernets, each searched as darts1 from scratch, the better
            by val accuracy retrained (experiments/tasks/nas_few_shot.py)
  random    no search: retrain random_genotype(random.seed)
  full      the official sizes (GPU): search C = 16, 8 cells, batch 64,
            50 epochs of 25k/25k 32x32 images; retrain C = 36, 20 cells,
            batch 96, 600 epochs of 50k, auxiliary head, drop path 0.2,
            cutout 16
  smoke     generated images (8x8), C = 4, 3 cells of 2 nodes, 4 steps per
            stage (tests)

The CPU protocol (the default sizes): DARTS-1st, DARTS-2nd, PC-DARTS,
GM-NAS and three random genotypes, each searched (not the random ones) and
retrained, inside the 3-hour budget on one 2-core CPU: on 2026-12-03 the
seven runs took under two hours of wall time, two to four at a time and
beside a benchmark, so that they fit one working session:

* search: the papers' cell (4 nodes, 14 edges, 8 ops), C = 8, 5 cells
  (reductions at cells 1 and 3), 8x8 images (CIFAR-10 downsampled,
  bilinear), 10k training images cut 5k/5k, batch 32, 150 steps (~1 epoch
  of the 5k); the official optimisers but for the architecture's
  learning rate, 10× the official (3e-3; PC-DARTS 6e-3): the search has
  ~130× fewer steps, and at 3e-4 Adam moves each α by at most 0.045 in
  150 steps, so the op weights stayed uniform to four digits (entropy
  log 8 = 2.0794 in a first darts1 run); XLA's convolution kernels
  (``model.kernels='xla'``).
* retrain: C = 16, 6 cells, 16x16 images, the first 20k training images
  (a fixed random subset), batch 64, 400 steps (1.3 epochs), SGD 0.025
  cosine to 0; no auxiliary head (it needs 32x32), drop path and cutout
  off (regularisers only slow a schedule this short); BatchNorm
  recalibrated on 2,560 training images, evaluated on all 10k test images.

Why these sizes: XLA's compile time on the CPU, not the step, bounds a
search network here: a 5-cell search step compiles in about 2 minutes with
XLA's kernels (and did not finish in 10 with the faster-running shifted
taps of ``models.darts.functional``), and each method compiles its own
steps. Measured on the 2-core CPU (2026-12-03, a second job running): the
5-cell first-order step took 3.8 s at 16x16 and batch 32 and 2.3 s at 8x8
and batch 64, so 16x16 searches would not fit. The search keeps the
official cell, optimisers and 50/50 split and shrinks width, depth,
resolution and length; the retrain, shared by all methods and run seven
times, ranks genotypes with a short schedule and does not reproduce the
97 % of 600 epochs.
"""

import ml_collections

from experiments.configs import parse_variants

VARIANTS = ("darts1", "darts2", "pc_darts", "gm_nas", "random", "full",
            "smoke")


def _section(**fields) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(fields)


def _sgd(lr: float, steps, final_lr_fraction: float = 0.0):
  return _section(name="momentum", lr=lr, momentum=0.9, schedule="cosine",
                  decay_steps=steps, final_lr_fraction=final_lr_fraction)


def steps(epochs: float, examples: int, batch_size: int) -> int:
  """Steps of ``epochs`` passes over ``examples`` (the last batch partial,
  as the official loaders)."""
  return max(1, round(epochs * -(-examples // batch_size)))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the config; ``arg`` is a comma-separated list of VARIANTS."""
  variants = parse_variants(arg, VARIANTS, "darts_cifar10")
  config = ml_collections.ConfigDict()
  config.task = "architecture_search"
  config.method = "darts"  # or "random"
  config.seed = 0  # data order, split, initial weights
  config.last_stage = ""  # e.g. "search": stop after it ("": run them all)

  # CIFAR-10 as `python -m experiments.data_prepare cifar10` writes it;
  # 0 keeps the whole split.
  config.data = _section(name="cifar10", data_dir="data/cifar10",
                         max_train=20_000, max_test=0)

  # The supernet (models.darts.SearchConfig); partial_channels 0: DARTS.
  config.model = _section(channels=8, num_cells=5, num_classes=10,
                          partial_channels=0, edge_normalization=False,
                          steps=4, kernels="xla")

  # The search: num_images training images (0: all), cut 50/50.
  # val_images: the val-half images that score a (sub-)supernet.
  config.search = _section(image_size=8, num_images=10_000, batch_size=32,
                           num_steps=150, val_images=1024)

  # DARTS: one bilevel.darts step per iteration; the official optimizers.
  search_steps = config.search.get_ref("num_steps")
  config.solver = _section(
      name="darts", order=1, hvp="finite_difference", fd_scale=0.01,
      warmup_steps=0, clip_norm=5.0, weight_decay=3e-4,
      lower_optimizer=_sgd(0.025, search_steps, 0.001 / 0.025),
      arch_weight_decay=1e-3,
      upper_optimizer=_section(name="adam", lr=3e-3, b1=0.5, b2=0.999))

  # Retraining the genotype (models.darts.EvalNetwork), official recipe.
  config.retrain = _section(
      image_size=16, channels=16, num_cells=6, auxiliary=False,
      kernels="taps", auxiliary_weight=0.4, drop_path_prob=0.0, cutout=0,
      batch_size=64, num_steps=400, clip_norm=5.0, weight_decay=3e-4)
  config.retrain.optimizer = _sgd(0.025,
                                  config.retrain.get_ref("num_steps"))

  config.random = _section(seed=0)  # method "random": the genotype's seed
  # method "gm_nas" (experiments/tasks/nas_few_shot.py): α-frozen supernet
  # steps, then one split into two sub-supernets searched from scratch.
  config.gm = _section(
      warmup_steps=config.search.get_ref("num_steps") // 2,
      search_steps=config.search.get_ref("num_steps"), score_batches=2,
      cells=("normal", "reduce"), objective="cut", op_batching="map",
      restart=True)
  config.eval = _section(batch_size=500, calibration_images=2560,
                         calibration_batch_size=128)
  config.train = _section(log_every=10, checkpoint_every=50, max_to_keep=2)

  if "darts2" in variants:
    config.solver.order = 2
  if "pc_darts" in variants:
    config.model.update(partial_channels=4, edge_normalization=True)
    config.solver.warmup_steps = (
        config.search.get_ref("num_steps") * 3) // 10
    config.solver.upper_optimizer.lr = 6e-3
  if "random" in variants:
    config.method = "random"
  if "gm_nas" in variants:
    config.method = "gm_nas"
  if "full" in variants:
    _full(config, "pc_darts" in variants)
  if "smoke" in variants:
    _smoke(config, "pc_darts" in variants)
  return config


def _full(config, pc_darts: bool) -> None:
  """The papers' sizes (a GPU run)."""
  config.model.update(channels=16, num_cells=8)
  batch = 256 if pc_darts else 64
  config.data.max_train = 0
  config.solver.upper_optimizer.lr = 6e-4 if pc_darts else 3e-4
  config.search.update(image_size=32, num_images=0, batch_size=batch,
                       num_steps=steps(50, 25_000, batch))
  if pc_darts:
    config.solver.warmup_steps = steps(15, 25_000, batch)
    config.solver.lower_optimizer.update(lr=0.1, final_lr_fraction=0.0)
  config.retrain.update(image_size=32, channels=36, num_cells=20,
                        auxiliary=True, drop_path_prob=0.2, cutout=16,
                        batch_size=96, num_steps=steps(600, 50_000, 96))
  config.train.update(log_every=100, checkpoint_every=2000)


def _smoke(config, pc_darts: bool) -> None:
  """Generated 8x8 images and a tiny supernet: tests, seconds per stage."""
  config.data.update(name="synthetic_cifar10", data_dir="", max_train=64,
                     max_test=32)
  # K = 4 needs C / K >= 2 channels (the factorized reduction halves them).
  config.model.update(channels=8 if pc_darts else 4, num_cells=3, steps=2)
  config.search.update(image_size=8, num_images=0, batch_size=8,
                       num_steps=4, val_images=16)
  config.gm.update(warmup_steps=2, search_steps=4, score_batches=1)
  if pc_darts:
    config.solver.warmup_steps = 2
  config.retrain.update(image_size=8, channels=4, num_cells=3,
                        auxiliary=False, cutout=4, drop_path_prob=0.2,
                        batch_size=8, num_steps=4)
  config.eval.update(batch_size=16, calibration_images=16,
                     calibration_batch_size=8)
  config.train.update(log_every=2, checkpoint_every=2)
