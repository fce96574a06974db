r"""How far BiP's final masks moved from the one-shot (OMP) mask they start at.

Reads the finished runs of ``pruning_table`` (``--root``) and prints, for
BiP and its first-order ablation at 90 % and 95 %, the fraction of the kept
weights that the OMP mask of the same sparsity also keeps. BiP's scores
start at the magnitudes OMP ranks by, so 1.0 means the mask never moved.

  python -m experiments.benchmarks.pruning_mask_overlap --root=/tmp/pruning
"""

import pathlib

import numpy as np
from absl import app, flags, logging

from experiments import cli, train
from experiments.configs import omp_cifar10

_ROOT = flags.DEFINE_string("root", None, "The pruning_table root.")


def _kept(params) -> np.ndarray:
  """The kept-weight indicator of all pruned kernels, flattened."""
  return np.concatenate([m.ravel() != 0 for m in params.upper.values()
                         if m.ndim])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  cli.quiet_library_info_logs()
  root = pathlib.Path(_ROOT.value)
  for suffix in ("90", "95"):
    config = omp_cifar10.get_config()
    config.unlock()
    config.sparsity = int(suffix) / 100
    config.pretrain.workdir = str(root / "pretrain")
    config.lock()
    omp = _kept(train.load_params(root / f"omp_{suffix}", config))
    for run in (f"bip_{suffix}", f"first_order_{suffix}"):
      kept = _kept(train.load_params(root / run, config))
      print(f"{run}: {kept.sum()} kept, {np.sum(kept & omp) / kept.sum():.4f}"
            " also kept by OMP")


if __name__ == "__main__":
  flags.mark_flags_as_required(["root"])
  app.run(main)
