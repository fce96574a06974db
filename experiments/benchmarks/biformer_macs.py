r"""BiFormer-T/S/B parameters and multiply-accumulates against the official.

Parameters of the abstract model (``nnx.eval_shape``: nothing allocated) and
MACs of one eval forward at batch 1 (matmuls and convolutions,
:func:`models.count_macs`, BRA ``reference`` backend), next to the official
numbers: 13,142,760 / 25,536,232 / 56,804,968 parameters and 2.22 / 4.46 /
9.76 G MACs at 224² (rayleizhu/BiFormer README, fvcore convention;
``../shared/reference/biformer_darts.md`` §1.4).

  python -m experiments.benchmarks.biformer_macs [--image_size=224]
"""

import argparse
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from models import count_macs
from models.biformer import biformer_base, biformer_small, biformer_tiny

# name: (constructor, official parameters, official MACs at 224²)
OFFICIAL: dict[str, tuple[Callable[..., nnx.Module], int, float]] = {
    "tiny": (biformer_tiny, 13_142_760, 2.22e9),
    "small": (biformer_small, 25_536_232, 4.46e9),
    "base": (biformer_base, 56_804_968, 9.76e9),
}


def params_and_macs(constructor, image_size: int = 224) -> tuple[int, int]:
  """Parameter count and forward MACs at ``[1, image_size, image_size, 3]``."""
  graphdef, state = nnx.split(
      nnx.eval_shape(lambda: constructor(nnx.Rngs(0))))
  params = sum(math.prod(p.shape)
               for p in jax.tree.leaves(nnx.state(nnx.merge(graphdef, state),
                                                  nnx.Param)))

  def forward(state, x):
    return nnx.merge(graphdef, state)(x, deterministic=True)

  image = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  return params, count_macs(forward, state, image)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--image_size", type=int, default=224)
  args = parser.parse_args()
  print(f"| model | parameters | official | MACs at {args.image_size}² |"
        " official (224²) | relative |")
  print("|---|---|---|---|---|---|")
  for name, (constructor, official_params, official_macs) in OFFICIAL.items():
    params, macs = params_and_macs(constructor, args.image_size)
    print(f"| {name} | {params:,} | {official_params:,} | {macs:,} |"
          f" {official_macs / 1e9:.2f} G | {macs / official_macs - 1:+.2%} |")


if __name__ == "__main__":
  main()
