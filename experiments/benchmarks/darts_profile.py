r"""Where a DARTS search step's time goes: the supernet's operations alone.

Each candidate operation's kernel of ``models.darts.functional`` (shifted-tap
depthwise convolutions and pooling, BN, the pointwise matmul), forward +
backward (the gradient of ``Σ y·g`` with respect to the input and the
weights), ``vmap``-ed over ``--edges`` stacked edges as the supernet runs
them, at the first cells' shape (``[batch, 32, 32, 16]``), against

* the same operation through XLA's own ops (``lax.conv_general_dilated``
  with ``feature_group_count = C``, ``lax.reduce_window``), and
* PyTorch's (NCHW, ``torch.set_num_threads`` = the CPUs we may use), the
  baseline's kernels.

All timed interleaved (``timing.median_times``); compile time and the
optimised HLO's instruction count per operation are reported apart: the
supernet's compile time is the sum of many such graphs.

``--program`` instead lowers (without compiling) each step of
:mod:`darts_jax` for the nets and shape of ``darts_step`` and counts the
StableHLO operations (the program XLA must fuse and compile), with
``--compile`` also compiling them: seconds, peak RSS of this process,
optimised HLO instructions and fusions (each fusion a kernel call per step).

Run:

  python -m experiments.benchmarks.darts_profile [--batch=32] [--edges=3] \
      [--repeats=20] [--no_torch]
  python -m experiments.benchmarks.darts_profile --program [--smoke] \
      [--steps=weight] [--compile]
"""

import argparse
import os
import time

import jax
import jax.numpy as jnp
from jax import lax

from experiments.benchmarks import timing
from models.darts import functional as F

# name: (kind, kernel, stride, padding, dilation) of the search space.
OPS = {
    "sep/dil conv depthwise 3x3": ("conv", 3, 1, 1, 1),
    "depthwise 3x3 stride 2": ("conv", 3, 2, 1, 1),
    "depthwise 5x5": ("conv", 5, 1, 2, 1),
    "dil_conv 3x3 (dilation 2)": ("conv", 3, 1, 2, 2),
    "dil_conv 5x5 (dilation 2)": ("conv", 5, 1, 4, 2),
    "max_pool 3x3": ("max", 3, 1, 1, 1),
    "avg_pool 3x3": ("avg", 3, 1, 1, 1),
    "batch_norm (train)": ("bn", 0, 1, 0, 1),
    "pointwise 1x1": ("pw", 1, 1, 0, 1),
}


def _xla_op(kind, kernel, stride, padding, dilation):
  """The operation through XLA's own convolution / reduce_window."""
  window = lambda x, init, op: lax.reduce_window(
      x, init, op, (1, kernel, kernel, 1), (1, stride, stride, 1),
      ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  if kind == "conv":
    return lambda x, w: lax.conv_general_dilated(
        x, w[:, :, None, :], (stride, stride), ((padding, padding),) * 2,
        rhs_dilation=(dilation, dilation),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=x.shape[-1])
  if kind == "max":
    return lambda x, w: window(x, -jnp.inf, lax.max)
  if kind == "avg":
    return lambda x, w: window(x, 0.0, lax.add) / window(
        jnp.ones_like(x[:1, ..., :1]), 0.0, lax.add)
  return None


def _ours(kind, kernel, stride, padding, dilation):
  """The operation as ``models.darts.functional`` computes it."""
  if kind == "conv":
    return lambda x, w: F.depthwise_conv(x, w, stride, padding, dilation)
  if kind == "max":
    return lambda x, w: F.max_pool(x, kernel, stride, padding)
  if kind == "avg":
    return lambda x, w: F.avg_pool(x, kernel, stride, padding)
  if kind == "bn":
    return lambda x, w: F.batch_norm(
        x, {"mean": jnp.zeros(x.shape[-1]), "var": jnp.ones(x.shape[-1])},
        True)[0]
  return lambda x, w: F.pointwise_conv(x, w)


def _weight_shape(kind, kernel, c):
  return {"conv": (kernel, kernel, c), "pw": (c, c)}.get(kind, (1,))


def _fwd_bwd(op):
  """``(x, w, g) -> (∂/∂x, ∂/∂w) Σ op(x, w)·g``, vmapped over edges."""
  def one(x, w, g):
    return jax.grad(lambda x, w: jnp.sum(op(x, w) * g), argnums=(0, 1))(x, w)
  return jax.jit(jax.vmap(one))


def _compiled(fn, args):
  start = time.perf_counter()
  compiled = fn.lower(*args).compile()
  seconds = time.perf_counter() - start
  ops = sum(1 for line in compiled.as_text().splitlines() if " = " in line)
  return compiled, seconds, ops


def _torch_op(kind, kernel, stride, padding, dilation, c, threads):
  import torch  # noqa: PLC0415
  from torch.nn import functional as tf  # noqa: PLC0415
  torch.set_num_threads(threads)
  if kind == "conv":
    return lambda x, w: tf.conv2d(x, w, None, stride, padding, dilation, c)
  if kind == "max":
    return lambda x, w: tf.max_pool2d(x, kernel, stride, padding)
  if kind == "avg":
    return lambda x, w: tf.avg_pool2d(x, kernel, stride, padding,
                                      count_include_pad=False)
  if kind == "bn":
    return lambda x, w: tf.batch_norm(x, None, None, training=True)
  return lambda x, w: tf.conv2d(x, w)


def _torch_call(op, shape, kind, kernel, c, edges):
  """One fwd+bwd of ``op`` over ``edges`` edges (a Python loop, as the
  official code runs its edges)."""
  import torch  # noqa: PLC0415
  weight_shape = {"conv": (c, 1, kernel, kernel), "pw": (c, c, 1, 1)}
  x = torch.randn(edges, *shape, requires_grad=True)
  w = torch.randn(edges, *weight_shape.get(kind, (1,)), requires_grad=True)
  with torch.no_grad():
    g = torch.randn_like(op(x[0], w[0]))

  def call():
    total = sum(torch.sum(op(x[e], w[e]) * g) for e in range(edges))
    return torch.autograd.grad(total, (x, w), allow_unused=True)

  return call


def profile(batch: int, edges: int, repeats: int, with_torch: bool):
  """Prints and returns ``{op: {impl: (ms, compile_s, hlo_ops)}}``."""
  c, size = 16, 32
  threads = len(os.sched_getaffinity(0))
  key_x, key_w, key_g = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(key_x, (edges, batch, size, size, c))
  calls, rows = [], {}
  for name, spec in OPS.items():
    kind, kernel, stride = spec[:3]
    w = jax.random.normal(key_w, (edges, *_weight_shape(kind, kernel, c)))
    impls = {"ours": _ours(*spec), "xla op": _xla_op(*spec)}
    for impl, op in impls.items():
      if op is None:
        continue
      out = jax.eval_shape(jax.vmap(op), x, w)
      g = jax.random.normal(key_g, out.shape)
      compiled, seconds, ops = _compiled(_fwd_bwd(op), (x, w, g))
      rows.setdefault(name, {})[impl] = [None, seconds, ops]
      calls.append(((name, impl), (compiled, (x, w, g))))
    if with_torch:
      op = _torch_op(*spec, c, threads)
      call = _torch_call(op, (batch, c, size, size), kind, kernel, c, edges)
      rows[name]["torch"] = [None, None, None]
      calls.append(((name, "torch"), (call, ())))
  times = timing.median_times([fn_args for _, fn_args in calls], repeats)
  for ((name, impl), _), seconds in zip(calls, times):
    rows[name][impl][0] = seconds * 1e3
  _print(rows, batch, edges, repeats, threads)
  return rows


def _print(rows, batch, edges, repeats, threads):
  print(f"fwd+bwd of {edges} stacked edges, [{batch}, 32, 32, 16] each;"
        f" median of {repeats}; {threads} threads; load average"
        f" {os.getloadavg()[0]:.2f}")
  print("| op | ours ms | compile s | HLO ops | XLA op ms | compile s |"
        " HLO ops | torch ms | ours/torch |\n|" + "---|" * 9)
  fmt = lambda v, f: "—" if v is None else f.format(v)
  for name, impls in rows.items():
    ours = impls["ours"]
    xla = impls.get("xla op", [None] * 3)
    torch_ms = impls.get("torch", [None])[0]
    ratio = None if torch_ms is None else ours[0] / torch_ms
    print(f"| {name} | {ours[0]:.2f} | {ours[1]:.1f} | {ours[2]} |"
          f" {fmt(xla[0], '{:.2f}')} | {fmt(xla[1], '{:.1f}')} |"
          f" {fmt(xla[2], '{}')} | {fmt(torch_ms, '{:.2f}')} |"
          f" {fmt(ratio, '{:.2f}')} |")


def program_sizes(shape, nets, steps, compile_too: bool) -> dict:
  """Prints and returns ``{(net, step): {...}}``: lowering time and
  StableHLO ops; compiled, also compile time, RSS, HLO ops and fusions."""
  from experiments.benchmarks import darts_jax, darts_step  # noqa: PLC0415
  data = darts_step.batches(shape)
  print(f"{shape}; load average {os.getloadavg()[0]:.2f}")
  print("| net | step | lower s | StableHLO ops | compile s | compile CPU s"
        " | peak RSS MiB | HLO instructions | fusions |\n|" + "---|" * 9)
  rows = {}
  for net in nets:
    loss, params = darts_jax.supernet(darts_step.NETS[net], shape)
    batches = darts_jax.nhwc_batches(data)
    functions = darts_jax.step_functions(loss, params, batches)
    for step in steps:
      fn, args = functions[step]
      start = time.perf_counter()
      lowered = fn.lower(*args)
      row = {"lower_s": time.perf_counter() - start,
             "stablehlo_ops": _count_ops(lowered.as_text())}
      if compile_too:
        row.update(_compile_stats(lowered))
      rows[(net, step)] = row
      get = lambda k, f, row=row: "—" if k not in row else f.format(row[k])
      print(f"| {net} | {step} | {row['lower_s']:.0f} |"
            f" {row['stablehlo_ops']} | {get('compile_s', '{:.0f}')} |"
            f" {get('compile_cpu_s', '{:.0f}')} |"
            f" {get('peak_rss_mib', '{:.0f}')} |"
            f" {get('hlo_ops', '{}')} | {get('fusions', '{}')} |",
            flush=True)
  return rows


def _count_ops(text: str) -> int:
  return sum(1 for line in text.splitlines() if " = " in line)


def _compile_stats(lowered) -> dict:
  start, cpu = time.perf_counter(), time.process_time()
  compiled = lowered.compile()
  stats = {"compile_s": time.perf_counter() - start,
           "compile_cpu_s": time.process_time() - cpu}
  with open("/proc/self/status") as f:
    hwm = next(int(line.split()[1]) for line in f
               if line.startswith("VmHWM:"))
  text = compiled.as_text()
  return {**stats, "peak_rss_mib": hwm / 1024, "hlo_ops": _count_ops(text),
          "fusions": text.count(" fusion(")}


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--edges", type=int, default=3)
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--no_torch", dest="torch", action="store_false")
  parser.add_argument("--program", action="store_true")
  parser.add_argument("--smoke", action="store_true")
  parser.add_argument("--nets", default="darts,pc_darts")
  parser.add_argument("--steps", default="weight,arch1,arch2,fused")
  parser.add_argument("--compile", action="store_true")
  a = parser.parse_args()
  if a.program:
    from experiments.benchmarks import darts_step  # noqa: PLC0415
    size = darts_step.SMOKE if a.smoke else darts_step.Shape(batch=a.batch)
    program_sizes(size, a.nets.split(","), a.steps.split(","), a.compile)
  else:
    profile(a.batch, a.edges, a.repeats, a.torch)
