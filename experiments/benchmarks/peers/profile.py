r"""Where biroute's outer step spends its time (the overhead shape by default).

For each method and K: the compiled ``make_step`` (ms, XLA ops executed per
call, matmul work) and its parts compiled on their own — the inner loop, the
adjoint linear solve, the residual diagnostic (one more matvec and two
norms), the mixed VJP ``(∂_x G)ᵀ u``, and ``make_step``'s ``∇F`` at the old
params (unused by ``implicit`` and ``unrolled``) — timed interleaved
(``timing.median_times``). The parts need not add up to the step: XLA fuses
across them and each part pays its own dispatch.

Run:

  python -m experiments.benchmarks.peers.profile [--shape=overhead] \
      [--repeats=200]
"""

import argparse
import os
import tempfile

import jax
import numpy as np
import optax
import optax.tree_utils as otu

import bilevel
from bilevel import _implicit_diff, _inner, _linear_solve
from experiments.benchmarks import timing
from experiments.benchmarks.peers import bench, hlo, worker_biroute


def _stats(fn, args):
  text = jax.jit(fn).lower(*args).compile().as_text()
  return hlo.op_count(text), hlo.matmul_work(text)


def _parts(method, k, problem, params, batches):
  """``{name: (fn, args)}``: the outer step of ``method``, K = ``k``, parts."""
  inner_b, outer_b = batches["inner_batch"], batches["outer_batch"]
  x, y0, lr = params.upper, params.lower, bench.LR
  tx = worker_biroute.build_solver(method, k, lr, bench.OUTER_LR)
  step = bilevel.make_step(tx, problem, jit=False)
  parts = {"make_step (whole outer step)": (
      lambda p, s, b: step(p, s, b)[0], (params, tx.init(params), batches))}
  grad_f = jax.value_and_grad(
      lambda p: problem.outer_loss(p.upper, p.lower, outer_b))
  parts["∇F at old params (make_step)"] = (grad_f, (params,))
  parts[f"inner loop (K={k})"] = (
      lambda x, y: _inner.inner_solve(problem.inner_loss, optax.sgd(lr), k, x,
                                      y, inner_b), (x, y0))
  solve = worker_biroute.linear_solve(method, lr)
  if solve is None:
    return parts
  optimality = lambda y, x: jax.grad(problem.inner_loss, argnums=1)(
      x, y, inner_b)
  v = jax.grad(problem.outer_loss, argnums=1)(x, y0, outer_b)
  minus_v = otu.tree_scale(-1.0, v)

  def adjoint(x, y, b):
    _, vjp_sol = jax.vjp(lambda s: optimality(s, x), y)
    return solve(lambda w: vjp_sol(w)[0], b)

  def residual(x, y, u, b):
    _, vjp_sol = jax.vjp(lambda s: optimality(s, x), y)
    return _linear_solve.linear_solve_residual(lambda w: vjp_sol(w)[0], u, b)

  def mixed(x, y, u):
    return jax.vjp(lambda a: optimality(y, a), x)[1](u)

  def root(x, y, b):
    return _implicit_diff.root_vjp(optimality, y, (x,), b, solve)

  u = jax.jit(adjoint)(x, y0, minus_v)
  parts["adjoint solve"] = (adjoint, (x, y0, minus_v))
  parts["residual diagnostic"] = (residual, (x, y0, u, minus_v))
  parts["mixed VJP (∂_x G)ᵀu"] = (mixed, (x, y0, u))
  parts["root_vjp (all three)"] = (root, (x, y0, v))
  return parts


def profile(shape_name: str, repeats: int, methods, ks):
  """Prints one table per (method, K); returns ``{(method, k): rows}``."""
  with tempfile.TemporaryDirectory() as workdir:
    path = os.path.join(workdir, "problem.npz")
    source = bench.write_problem(path, bench.SHAPES[shape_name])
    with np.load(path) as npz:
      arrays = {k: npz[k] for k in npz.files}
  problem, params, batches = worker_biroute.build_problem(arrays)
  print(f"shape {shape_name}, data {source}, {jax.devices()[0]}, "
        f"median of {repeats} interleaved calls")
  results = {}
  for method in methods:
    for k in ks:
      parts = _parts(method, k, problem, params, batches)
      jitted = [(jax.jit(fn), args) for fn, args in parts.values()]
      times = timing.median_times(jitted, repeats)
      rows = []
      print(f"\n{method}, K={k}")
      print("| part | ms | XLA ops | matmul work |\n|---|---|---|---|")
      for (name, (fn, args)), t in zip(parts.items(), times):
        ops, work = _stats(fn, args)
        rows.append((name, t * 1e3, ops, work))
        print(f"| {name} | {t * 1e3:.3f} | {ops} | {work:.3f} |")
      results[(method, k)] = rows
  return results


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shape", default="overhead", choices=bench.SHAPES)
  parser.add_argument("--repeats", type=int, default=200)
  parser.add_argument("--methods", default="cg,identity,neumann,unrolled")
  parser.add_argument("--ks", default="1,10")
  a = parser.parse_args()
  profile(a.shape, a.repeats, a.methods.split(","),
          [int(k) for k in a.ks.split(",")])
