r"""A narrowed BiFormer on CIFAR-10 (JPEG), trained on the CPU.

The official BiFormer block structure (``models/biformer.py``): the official
stem (two 3x3/2 convs with BatchNorm, stride 4), four stages of BiFormer
blocks (depthwise 3x3 position conv, BRA with LCE, MLP ratio 3), 3x3/2
conv + BatchNorm merging between stages, BatchNorm, pooling, linear head.
Narrowed for 32² input: widths (32, 64, 128, 256) (BiFormer-T's halved),
depths (2, 2, 4, 2), head width 32; the stage maps are 8², 4², 2², 1²;
``n_win = 2`` (2x2 regions) divides the three BRA stages' maps, which route
to (1, 2, 2) of the 4 regions; stage 4 (1²) is global attention with LePE
(``topk = -2``) like the official one. 2,521,994 parameters. Keys per
query in stages 1–3: 16, 8, 2 (the official 224² models: 64 each). A stem
of stride 2 (``model.stem_strides = (1, 2)``, maps 16² … 2²) was timed at
2.5× the step cost and not used.

Schedule (one seed, 0): 2,800 steps of batch 128 (7.2 epochs) of AdamW
(lr 1.5e-3, 200 linear warm-up steps, cosine decay to 1 % of the peak,
weight decay 0.05 on matrices and conv kernels, β = (0.9, 0.999), no
clipping) on cross-entropy with label smoothing 0.1, drop path 0.05, the
standard CIFAR augmentation. About 0.55 s a step on a shared 2-core CPU
(30 minutes in all).
Evaluation recalibrates BatchNorm on 2,560 random training images and
scores all 10,000 test images.

Run, then evaluate the restored checkpoint:

  python -m experiments.main --config=experiments/configs/biformer_cifar10.py \
      --workdir=/tmp/biformer_cifar10
  python -m experiments.main --config=experiments/configs/biformer_cifar10.py \
      --workdir=/tmp/biformer_cifar10 --mode=eval

Variants (comma-separated after a colon):
  smoke   a 1-block-per-stage width-16 model, 256 training and 64 test
          images, 4 steps of batch 8 (tests, seconds).
"""

import ml_collections

from experiments.configs import parse_variants

VARIANTS = ("smoke",)


def _section(**fields) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(fields)


def base_config() -> ml_collections.ConfigDict:
  """Everything but the model and the schedule, shared with
  ``biformer_imagenet.py``."""
  config = ml_collections.ConfigDict()
  config.task = "biformer_classification"
  config.seed = 0

  # Data: CIFAR-10 as `python -m experiments.data_prepare cifar10` writes it
  # (or the JPEG npz); 0 keeps the whole split, else a random subset.
  config.data = _section(name="cifar10", data_dir="data/cifar10",
                         max_train=0, max_test=0, image_size=32,
                         batch_size=128)

  # Model: set by the caller (see models.biformer.BiFormer).
  config.model = _section(
      depths=(2, 2, 8, 2), embed_dims=(64, 128, 256, 512), head_dim=32,
      n_win=7, topks=(1, 4, 16, -2), mlp_ratios=(3, 3, 3, 3),
      stem_strides=(2, 2), num_classes=10, drop_path_rate=0.1,
      layer_scale_init_value=-1.0, side_dwconv=5,
      # "reference" (jnp); a Pallas kernel runs interpreted (slowly) on CPU.
      attention_impl="reference")

  config.loss = _section(label_smoothing=0.1)

  # Training loop and solver: AdamW on the model, warm-up then cosine.
  config.train = _section(num_steps=2800, log_every=25, checkpoint_every=100,
                          max_to_keep=2)
  config.solver = _section(name="train")
  config.solver.optimizer = _section(
      name="adamw", lr=1.5e-3, warmup_steps=200,
      decay_steps=config.train.get_ref("num_steps"), final_lr_fraction=0.01,
      b1=0.9, b2=0.999, weight_decay=0.05, clip_norm=0.0)

  # Evaluation: BatchNorm recalibration images, test batch size.
  config.eval = _section(batch_size=500, calibration_images=2560,
                         calibration_batch_size=128)
  return config


def _smoke(config: ml_collections.ConfigDict) -> None:
  config.data.update(max_train=256, max_test=64, batch_size=8)
  config.model.update(depths=(1, 1, 1, 1), embed_dims=(16, 16, 16, 16),
                      head_dim=16)
  config.train.update(num_steps=4, log_every=2, checkpoint_every=2)
  config.solver.optimizer.warmup_steps = 1
  config.eval.update(batch_size=32, calibration_images=32,
                     calibration_batch_size=16)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the config; ``arg`` is a comma-separated list of VARIANTS."""
  variants = parse_variants(arg, VARIANTS, "biformer_cifar10")
  config = base_config()
  config.model.update(depths=(2, 2, 4, 2), embed_dims=(32, 64, 128, 256),
                      n_win=2, topks=(1, 2, 2, -2), drop_path_rate=0.05)
  if "smoke" in variants:
    _smoke(config)
  return config
