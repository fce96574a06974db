"""biroute worker of the peers benchmark (see ``peers/__init__.py``).

The lower level is a :class:`models.MLP` whose weights are overwritten with
the shared initial weights; the losses are the hand-written torch ones:
``f(c, w) = mean_i σ(c_i)·CE_i`` on the noisy training set, ``F(w) =`` mean
validation CE. One outer step is ``bilevel.make_step(tx, problem)``.
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import bilevel
from experiments.benchmarks.peers import hlo, worker_loop
from models import MLP

SOLVERS = ("cg", "identity", "neumann", "default", "unrolled",
           "unrolled_remat")


def linear_solve(method: str, lr: float):
  """The adjoint solver of an implicit ``method`` (None for unrolled ones)."""
  if method == "cg":
    return functools.partial(bilevel.solve_cg, maxiter=10, tol=0.0,
                             stop_on_negative_curvature=False)
  if method == "identity":
    return functools.partial(bilevel.solve_identity, scale=lr)
  if method == "neumann":
    return functools.partial(bilevel.solve_neumann, step=lr, maxiter=10)
  return None


def build_solver(method: str, k: int, lr: float, outer_lr: float):
  """``bilevel`` transformation of ``method`` with ``k`` inner steps."""
  if method not in SOLVERS:
    raise ValueError(f"unknown biroute method {method!r}; valid: {SOLVERS}")
  upper, inner = optax.adam(outer_lr), optax.sgd(lr)
  if method.startswith("unrolled"):
    return bilevel.unrolled(upper, inner, k,
                            remat=method == "unrolled_remat")
  # The hand-written H⁻¹≈I step computes no residual; neither does ours.
  return bilevel.implicit(upper, inner, k,
                          linear_solve=linear_solve(method, lr),
                          track_residual=method != "identity")


def build_problem(arrays):
  """``(problem, params, batches)`` from the shared data and weights."""
  w1, w2 = arrays["w1"], arrays["w2"]
  model = MLP(w1.shape[0], (w1.shape[1],), w2.shape[1],
              rngs=nnx.Rngs(params=0))
  for layer, w, b in ((model.hidden[0], w1, arrays["b1"]),
                      (model.head, w2, arrays["b2"])):
    layer.kernel.value = jnp.asarray(w)
    layer.bias.value = jnp.asarray(b)
  graphdef, lower = nnx.split(model)

  def cross_entropy(lower, batch):
    logits = nnx.merge(graphdef, lower)(batch["x"])
    return optax.losses.softmax_cross_entropy_with_integer_labels(
        logits, batch["y"])

  def inner_loss(upper, lower, batch):
    return jnp.mean(jax.nn.sigmoid(upper) * cross_entropy(lower, batch))

  def outer_loss(upper, lower, batch):
    del upper
    return jnp.mean(cross_entropy(lower, batch))

  batch = lambda x, y: {"x": jnp.asarray(arrays[x]),
                        "y": jnp.asarray(arrays[y], jnp.int32)}
  batches = {"inner_batch": batch("train_x", "train_y"),
             "outer_batch": batch("val_x", "val_y")}
  params = bilevel.Params(upper=jnp.zeros(len(arrays["train_y"]),
                                          jnp.float32), lower=lower)
  return bilevel.Problem(outer_loss, inner_loss), params, batches


def build(spec) -> worker_loop.System:
  """The biroute system of ``spec`` (method, K, learning rates)."""
  problem, params, batches = build_problem(worker_loop.load_problem(spec))
  tx = build_solver(spec["method"], spec["k"], spec["lr"], spec["outer_lr"])
  step = bilevel.make_step(tx, problem, donate=True)
  state = tx.init(params)
  compiled = step.lower(params, state, batches).compile()
  text = compiled.as_text()
  carry = {"params": params, "state": state}

  def one_step():
    carry["params"], carry["state"], _ = compiled(
        carry["params"], carry["state"], batches)
    jax.block_until_ready(carry["params"])

  info = {
      "version": f"jax {jax.__version__}",
      "threads": (f"XLA CPU, {len(os.sched_getaffinity(0))} CPUs by "
                  "affinity, XLA_FLAGS=" + os.environ.get("XLA_FLAGS", "")),
      # CG exactly 10 runs its while loop 10 times (XLA cannot know it);
      # the other solvers' loops have known trip counts.
      "matmul_work": hlo.matmul_work(
          text, unknown_trip_count=10 if spec["method"] == "cg" else 1),
      "hlo_ops": hlo.op_count(text),
  }
  return worker_loop.System(
      one_step, lambda: np.asarray(carry["params"].upper, np.float64), info)


def main():
  worker_loop.serve(worker_loop.read_spec(), build)


if __name__ == "__main__":
  main()
