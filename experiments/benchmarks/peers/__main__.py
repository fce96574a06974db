"""Flags of the peers benchmark; the run is ``bench.run``."""

import argparse

from experiments.benchmarks.peers import __doc__ as doc
from experiments.benchmarks.peers import bench


def parse_args(argv=None) -> argparse.Namespace:
  """The benchmark's flags."""
  parser = argparse.ArgumentParser(
      description=doc.splitlines()[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--shape", choices=sorted(bench.SHAPES),
                      default="compute")
  parser.add_argument("--systems", default="*",
                      help="comma-separated globs over " +
                      ", ".join(bench.SYSTEMS))
  parser.add_argument("--ks", default="",
                      help="comma-separated K values (default: the shape's)")
  parser.add_argument("--rounds", type=int, default=30)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--auroc_steps", type=int, default=200,
                      help="outer steps before the AUROC (0: none)")
  parser.add_argument("--threads", type=int, default=2)
  parser.add_argument("--max_foreign_cores", type=float, default=0.1)
  parser.add_argument("--window_s", type=float, default=0.5,
                      help="rounds are judged in windows of at least this")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--synthetic", action="store_true",
                      help="random features instead of MNIST (timing only)")
  parser.add_argument("--json", default="")
  return parser.parse_args(argv)


if __name__ == "__main__":
  bench.run(parse_args())
