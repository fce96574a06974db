r"""The official BiFormer-T/S/B at 224² input (ImageNet-1k recipe, smoke only).

The models are ``models.biformer.biformer_tiny/small/base`` (official stem of
stride 4, stage maps 56², 28², 14², 7², ``n_win = 7``, ``topks = (1, 4, 16,
-2)``, 1,000 classes: 13,142,760 / 25,536,232 / 56,804,968 parameters).
The recipe is the official one as far as this task implements it
(``shared/reference/biformer_darts.md`` §1.3): 300 epochs of batch 1,024,
AdamW (lr 5e-4 · 1024/512, weight decay 0.05), 5 warm-up epochs then
cosine, label smoothing 0.1, drop path (S: 0.15 from the README; T and B
unverified, 0.1 and 0.3 here); RandAugment, mixup, cutmix, random erasing,
repeated augmentation and EMA are not implemented.

No ImageNet is on this machine, so only ``smoke`` runs: 8 CIFAR-10 training
and 4 test images, resized (bilinear) to 224², 2 steps of batch 2, scored
with the 1,000-class head (CIFAR's labels are classes 0–9). Without
``smoke`` the task stops at loading the dataset ``'imagenet'``, which the
data loader does not provide.

  python -m experiments.main \
      --config=experiments/configs/biformer_imagenet.py:tiny,smoke \
      --workdir=/tmp/biformer_imagenet_tiny_smoke

Variants (comma-separated after a colon; exactly one model):
  tiny, small, base   BiFormer-T / -S / -B
  smoke               the CIFAR-10 stand-in above (tens of seconds to
                      minutes on a CPU, see BENCHMARKS.md)
"""

import ml_collections

from experiments.configs import biformer_cifar10, parse_variants

MODELS = {
    "tiny": dict(depths=(2, 2, 8, 2), embed_dims=(64, 128, 256, 512),
                 drop_path_rate=0.1),
    "small": dict(depths=(4, 4, 18, 4), embed_dims=(64, 128, 256, 512),
                  drop_path_rate=0.15),
    "base": dict(depths=(4, 4, 18, 4), embed_dims=(96, 192, 384, 768),
                 drop_path_rate=0.3),
}
VARIANTS = (*MODELS, "smoke")
_IMAGENET_TRAIN = 1_281_167


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the config; ``arg`` is a comma-separated list of VARIANTS."""
  variants = parse_variants(arg, VARIANTS, "biformer_imagenet")
  models = [v for v in variants if v in MODELS]
  if len(models) != 1:
    raise ValueError(f"exactly one model of {tuple(MODELS)}, got {models}")

  config = biformer_cifar10.base_config()
  config.data.update(name="imagenet", data_dir="", image_size=224,
                     batch_size=1024)
  config.model.update(num_classes=1000, **MODELS[models[0]])
  epoch = _IMAGENET_TRAIN // config.data.batch_size
  config.train.update(num_steps=300 * epoch, log_every=100,
                      checkpoint_every=2000)
  config.solver.optimizer.update(lr=5e-4 * config.data.batch_size / 512,
                                 warmup_steps=5 * epoch,
                                 final_lr_fraction=1e-3)
  config.eval.update(batch_size=250, calibration_images=10240,
                     calibration_batch_size=256)

  if "smoke" in variants:
    config.data.update(name="cifar10", data_dir="data/cifar10",
                       max_train=8, max_test=4, batch_size=2)
    config.train.update(num_steps=2, log_every=1, checkpoint_every=2)
    config.solver.optimizer.warmup_steps = 1
    config.eval.update(batch_size=2, calibration_images=4,
                       calibration_batch_size=2)
  return config
