r"""Times the routed expert FFN by its three dispatch paths.

``moe_ffn(x, routing, w_in, w_out, path=...)`` with ``path`` one of
``one_hot`` (GShard dispatch/combine einsums, the baseline), ``ragged_dot``
(sort + ``jax.lax.ragged_dot``) and ``pallas`` (sort +
``kernels.grouped_matmul``): the forward ``y`` and the forward+backward, the
gradient of ``Σ y`` (in f32) w.r.t. ``x``, ``w_in`` and ``w_out``. Routing is
``top_k_routing`` (softmax then top-k, dropless) with fixed random router
weights, computed once outside the timed functions. The sorted paths are
dropless; the one-hot path needs a capacity (dropless it would hold
``[T, E, T]`` buffers), ``⌈cf · T · k / E⌉`` with ``cf = 1.25`` as in the
baseline of ``performance_targets.md``, and its drops are printed.

Shapes (tokens ``T``, ``d_model``, ``d_ff``, experts ``E``, top-``k``; GELU):

* ``target``: 16,384, 1,024, 4,096, 64, 2, the MoE shape of
  ``performance_targets.md``, whose H200 baselines (bf16, forward) are
  one-hot 5.28 ms, ragged_dot 49.3 ms, floor 0.94 ms (550 GFLOP at
  587 TFLOP/s), and whose grouped-matmul targets are forward ≤ 1.4 ms,
  forward+backward ≤ 4.2 ms, never slower than one-hot;
* ``cpu``: 1,024, 256, 1,024, 8, 2 (same ``d_ff / d_model``): about a
  minute at 20 repeats on the 2-core development CPU (shared with another
  job when measured), with or without ``pallas``. XLA:CPU runs
  ``ragged_dot`` densely over the experts, so CPU ratios say nothing about
  an accelerator.

On the CPU the Pallas kernel runs in interpret mode: slow by construction
and only a correctness path, so ``pallas`` is left out there unless
``--paths`` names it (about 0.3 s more per round at the ``cpu`` shape).
Pallas against ragged_dot, same routing and both dropless, is checked
(``max |Δy|``) so a broken lowering cannot pass for a fast one. On a GPU at
the ``target`` shape, in bf16, the script says whether the targets are met.

Run:

  python -m experiments.benchmarks.moe [--shape=target|cpu] \
      [--paths=one_hot,ragged_dot,pallas] [--dtype=bfloat16|float32] \
      [--repeats=20] [--capacity_factor=1.25] [--tiling=128,128,128]

``--shape`` defaults to ``target`` on a GPU or TPU and ``cpu`` on the CPU;
``--paths`` to all three, less ``pallas`` on the CPU. Every function is
jitted and compiled first; the medians over ``repeats`` interleaved calls
(each ended by ``block_until_ready``) are reported, with ratios against the
one-hot path timed in the same run.
"""

import argparse
from typing import NamedTuple

import jax
import jax.numpy as jnp

import kernels
from experiments.benchmarks import timing
from models.moe import DISPATCH_PATHS, expert_capacity, moe_ffn, top_k_routing

TARGET_FORWARD_S = 1.4e-3
TARGET_FORWARD_BACKWARD_S = 4.2e-3
H200_REFERENCE = ("H200 reference (performance_targets.md, bf16 forward): "
                  "one-hot 5.28 ms, ragged_dot 49.3 ms, floor 0.94 ms")


class Shape(NamedTuple):
  """Tokens ``T``, ``d_model``, ``d_ff``, experts ``E`` and top-``k``."""

  tokens: int
  d_model: int
  d_ff: int
  experts: int
  k: int


SHAPES = {
    "target": Shape(16_384, 1_024, 4_096, 64, 2),
    "cpu": Shape(1_024, 256, 1_024, 8, 2),
}
DTYPES = ("bfloat16", "float32")


def _problem(key, shape: Shape, dtype):
  """Tokens, dropless top-k routing (aux dropped) and expert weights."""
  key_x, key_router, key_in, key_out = jax.random.split(key, 4)
  t, d, f, e = shape.tokens, shape.d_model, shape.d_ff, shape.experts
  x = jax.random.normal(key_x, (t, d), dtype)
  w_router = jax.random.normal(key_router, (d, e)) / d**0.5
  w_in = (jax.random.normal(key_in, (e, d, f)) / d**0.5).astype(dtype)
  w_out = (jax.random.normal(key_out, (e, f, d)) / f**0.5).astype(dtype)
  route = jax.jit(lambda x, w: top_k_routing(x, w, k=shape.k))
  routing = route(x, w_router)._replace(aux={})
  return x, routing, w_in, w_out


def _path_fns(path, capacity, tiling):
  """Jitted ``forward(x, routing, w_in, w_out) -> y`` and
  ``forward_backward(...) -> (dx, dw_in, dw_out)`` of one path."""
  kwargs = {"path": path, "capacity": capacity}
  if path == "pallas":
    kwargs["tiling"] = tiling

  def forward(x, routing, w_in, w_out):
    return moe_ffn(x, routing, w_in, w_out, **kwargs).y

  def loss(x, w_in, w_out, routing):
    return jnp.sum(forward(x, routing, w_in, w_out).astype(jnp.float32))

  grad = jax.grad(loss, argnums=(0, 1, 2))
  forward_backward = lambda x, routing, w_in, w_out: grad(x, w_in, w_out,
                                                          routing)
  return jax.jit(forward), jax.jit(forward_backward)


def _report_targets(times):
  """The grouped-matmul targets, read at the target shape on a GPU."""
  fwd, fwd_bwd = times["pallas"]
  for name, value, bound in (("forward", fwd, TARGET_FORWARD_S),
                             ("forward+backward", fwd_bwd,
                              TARGET_FORWARD_BACKWARD_S)):
    verdict = "met" if value <= bound else "MISSED"
    print(f"target pallas {name} ≤ {bound * 1e3:.1f} ms: {verdict} "
          f"({value * 1e3:.2f} ms)")
  if "one_hot" in times:
    slower = [n for n, p, o in zip(("forward", "forward+backward"),
                                   times["pallas"], times["one_hot"]) if p > o]
    print("target pallas never slower than one-hot: "
          + (f"MISSED ({', '.join(slower)})" if slower else "met"))


def _print_times(times, flops):
  base = times.get("one_hot")
  print(f"{'path':<11}{'forward':>12}{'ratio':>8}{'TFLOP/s':>9}"
        f"{'fwd+bwd':>13}{'ratio':>8}{'TFLOP/s':>9}")
  for path, pair in times.items():
    cells = []
    for i, (value, work) in enumerate(zip(pair, (flops, 3 * flops))):
      ratio = f"{value / base[i]:.2f}×" if base else "—"
      cells.append(f"{value * 1e3:9.2f} ms{ratio:>8}{work / value / 1e12:9.3g}")
    print(f"{path:<11}{cells[0]}  {cells[1]}")


def _print_checks(fns, args, capacity, shape: Shape):
  """One-hot drops, and Pallas against ragged_dot (same routing, dropless)."""
  if "one_hot" in fns:
    count = jax.jit(lambda *a: moe_ffn(*a, path="one_hot",
                                       capacity=capacity).num_dropped)
    print(f"one-hot drops {int(count(*args))} of {shape.tokens * shape.k} "
          f"assignments; the sorted paths drop none")
  if "pallas" in fns:
    if "ragged_dot" in fns:
      ys = [fns[p][0](*args).astype(jnp.float32) for p in ("pallas",
                                                           "ragged_dot")]
      diff = float(jnp.max(jnp.abs(ys[0] - ys[1])))
      print(f"pallas vs ragged_dot forward: max |Δy| = {diff:.3g}")
    if jax.default_backend() == "cpu":
      print("pallas runs in interpret mode on the CPU: correctness only")


def main(shape_name: str, paths: tuple[str, ...], dtype: str = "bfloat16",
         repeats: int = 20, capacity_factor: float = 1.25,
         tiling: kernels.GroupedMatmulTiling | None = None) -> dict:
  """Prints and returns the median times (seconds) per path and direction."""
  shape = SHAPES[shape_name]
  tiling = kernels.GroupedMatmulTiling() if tiling is None else tiling
  capacity = expert_capacity(shape.tokens, shape.experts, shape.k,
                             capacity_factor)
  args = _problem(jax.random.key(0), shape, jnp.dtype(dtype))
  fns = {p: _path_fns(p, capacity if p == "one_hot" else None, tiling)
         for p in paths}
  medians = timing.median_times(
      [(fn, args) for pair in fns.values() for fn in pair], repeats)
  times = {p: tuple(medians[2 * i:2 * i + 2]) for i, p in enumerate(paths)}
  # Two matmuls of 2·T·k·d·f each; the backward does twice the forward.
  flops = 4 * shape.tokens * shape.k * shape.d_model * shape.d_ff
  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}); "
        f"shape {shape_name}: T={shape.tokens}, d={shape.d_model}, "
        f"f={shape.d_ff}, E={shape.experts}, k={shape.k}, GELU, {dtype}; "
        f"median of {repeats}")
  print(f"routing: top-{shape.k} softmax, dropless; one-hot capacity "
        f"{capacity} (cf {capacity_factor}); TFLOP/s count the dropless "
        f"{flops / 1e9:.1f} GFLOP forward (3× for forward+backward)")
  _print_checks(fns, args, capacity, shape)
  _print_times(times, flops)
  if shape_name == "target":
    print(H200_REFERENCE)
    if (jax.default_backend() == "gpu" and dtype == "bfloat16"
        and "pallas" in paths):
      _report_targets(times)
  return times


def _parse_paths(text: str | None) -> tuple[str, ...]:
  if text is None:
    cpu = jax.default_backend() == "cpu"
    return tuple(p for p in DISPATCH_PATHS if not (cpu and p == "pallas"))
  paths = tuple(p.strip() for p in text.split(",") if p.strip())
  unknown = [p for p in paths if p not in DISPATCH_PATHS]
  if unknown or not paths:
    raise ValueError(f"--paths={text!r}: each must be one of {DISPATCH_PATHS}")
  return paths


def _parse_tiling(text: str | None) -> kernels.GroupedMatmulTiling | None:
  if text is None:
    return None
  block_m, block_k, block_n = (int(b) for b in text.split(","))
  return kernels.GroupedMatmulTiling(block_m, block_k, block_n)


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shape", choices=tuple(SHAPES), default=None,
                      help="default: target on GPU/TPU, cpu on the CPU")
  parser.add_argument("--paths", default=None,
                      help="comma list of " + ",".join(DISPATCH_PATHS)
                      + " (default: all; no pallas on the CPU)")
  parser.add_argument("--dtype", choices=DTYPES, default="bfloat16")
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--capacity_factor", type=float, default=1.25,
                      help="capacity factor of the one-hot path")
  parser.add_argument("--tiling", default=None,
                      help="block_m,block_k,block_n of the pallas path")
  flags = parser.parse_args()
  default_shape = "cpu" if jax.default_backend() == "cpu" else "target"
  main(flags.shape or default_shape, _parse_paths(flags.paths), flags.dtype,
       flags.repeats, flags.capacity_factor, _parse_tiling(flags.tiling))
