r"""The shared config of the CIFAR-10 pruning pipelines (BiP and baselines).

``bip_cifar10.py``, ``bip_first_order_cifar10.py``, ``omp_cifar10.py`` and
``imp_cifar10.py`` call :func:`pruning_config` with their method. Every
method retrains with the same optimiser (SGD, momentum 0.9, cosine decay
from ``finetune.lr``, weight decay = BiP's ridge ``γ``) and the same number
of steps per retraining phase.

Variants (comma-separated after a colon):
  smoke       SmallCNN on 256 images, a few steps, IMP rounds of 50 %
              (tests, seconds).
  structured  filter pruning with a per-layer budget of 50 % (the classifier
              excluded: its filters are the classes).
  resnet56    ResNet-56 instead of ResNet-20.
"""

import ml_collections

from experiments.configs import parse_variants

VARIANTS = ("smoke", "structured", "resnet56")


def _section(**fields) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(fields)


def pruning_config(method: str, arg: str | None,
                   correction: bool = True) -> ml_collections.ConfigDict:
  """The config of ``method`` (``'bip'``, ``'omp'`` or ``'imp'``).

  Args:
    method: the pruning method.
    arg: comma-separated VARIANTS.
    correction: BiP's implicit-gradient correction (False: the ablation).

  Raises:
    ValueError: an unknown variant.
  """
  variants = parse_variants(arg, VARIANTS, "pruning")
  config = ml_collections.ConfigDict()
  config.task = "cifar_pruning"
  config.method = method
  config.seed = 0
  config.sparsity = 0.9  # fraction of the prunable weights removed
  # Written by `python -m experiments.data_prepare cifar10 --source=...`.
  config.data = _section(name="cifar10", data_dir="data/cifar10",
                         max_train=0, max_test=0, batch_size=128)
  config.model = _section(name="resnet20", num_classes=10)
  config.mask = _section(mode="unstructured", scope="global", exclude=())
  # The dense model; set workdir to share one pretrained model between runs.
  config.pretrain = _section(num_steps=1200, lr=0.1, momentum=0.9,
                             weight_decay=5e-4, workdir="")
  gamma = 1e-4
  # Retraining (OMP's finetune, each IMP round, BiP's finetune) and BiP's
  # θ-step share lr, momentum and decay; BiP's ridge γ is that decay.
  config.finetune = _section(num_steps=100, lr=0.01, momentum=0.9,
                             weight_decay=gamma)
  # sequential: the paper's order (θ-step, then the IG at the new θ).
  config.prune = _section(num_steps=100, lr=0.01, momentum=0.9, mask_lr=0.1,
                          gamma=gamma, correction=correction,
                          sequential=True)
  config.imp = _section(targets=(0.9, 0.95), rate=0.2, round_steps=100)
  config.eval = _section(batch_size=500, calibration_images=2560,
                         calibration_batch_size=128)
  config.train = _section(log_every=25, checkpoint_every=50, max_to_keep=2)

  if "structured" in variants:
    config.mask = _section(mode="filter", scope="per_layer",
                           exclude=("head",))
    config.sparsity = 0.5
    config.imp.targets = (0.5,)
  if "resnet56" in variants:
    config.model.name = "resnet56"
  if "smoke" in variants:
    config.model.name = "small_cnn"
    config.data.update(max_train=256, max_test=128, batch_size=32)
    config.pretrain.num_steps = 6
    config.finetune.num_steps = 4
    config.prune.num_steps = 4
    config.imp.update(round_steps=3, rate=0.5)
    config.eval.update(batch_size=64, calibration_images=64,
                       calibration_batch_size=32)
    config.train.update(log_every=2, checkpoint_every=2)
  return config
