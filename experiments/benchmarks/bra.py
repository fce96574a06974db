r"""Times the whole bi-level routing attention (BRA) module per backend.

The module is ``models.BiLevelRoutingAttention`` as BiFormer builds it
(``qk_dim = dim``, ``scale = dim^-0.5``, 5×5 depthwise LCE on ``v``, output
projection): qkv projection, routing, token attention, LCE, projection. It
runs once per token-attention backend of ``models.biformer.ATTENTION_IMPLS``
(``reference``, the plain-``jnp`` oracle under XLA, and ``pallas`` once that
key exists), all with the same weights, plus ``dense``: the same qkv / LCE /
output layers around full multi-head attention over all ``H·W`` tokens
(``jax.nn.dot_product_attention``, cuDNN on a GPU when it compiles, else
XLA). Timed: the forward, and the forward+backward (gradient of ``Σ out`` in
f32 w.r.t. the input and every parameter), in the compute dtype, parameters
in f32.

Shapes (batch, ``H = W`` tokens, dim, heads, ``n_win``, topk), from
``performance_targets.md``, whose H200 figures (bf16, JAX 0.11.2,
PyTorch 2.11) are the ``OFFICIAL_MS`` constants below:

* ``t1``: 64, 56, 64, 2, 7, 1 (BiFormer-T/S stage 1 at 224²);
* ``t2``: 64, 28, 128, 4, 7, 4 (stage 2 at 224²);
* ``seg``: 16, 128, 64, 2, 8, 4 (dense prediction at 512²);
* ``cpu``: 2, 16, 32, 2, 4, 4, for the 2-core development CPU.

Before timing, every non-reference backend is checked against ``reference``
(``max |Δout|`` and ``max |Δdx|``, scaled by the reference's largest value;
bf16 tolerance ``2⁻⁶``), and the run stops if one disagrees. Peak memory of
the forward+backward is the compiled executable's ``memory_analysis()``:
arguments + outputs + temporaries (XLA's allocation, so comparable across
backends; PJRT's ``peak_bytes_in_use`` cannot be reset between backends and
is printed only as the process-wide high-water mark). On a GPU, in bf16,
``pallas`` is held to the targets (seg forward ≤ 0.5 ms, ≥ 4.5× the XLA
reference, ≥ 6.5× official; seg forward+backward ≤ 2.0 ms and ≤ 1 GB;
t1 forward ≤ 0.15 ms). On the CPU only ratios are printed, and ``pallas``
runs in the Pallas interpreter: a correctness path, slow by construction,
left out unless ``--impls`` names it.

Run:

  python -m experiments.benchmarks.bra [--shapes=t1,t2,seg|cpu] \
      [--impls=reference,pallas,dense] [--dtype=bfloat16|float32] \
      [--repeats=20]

Defaults: the three target shapes on a GPU/TPU, ``cpu`` on the CPU; every
backend (less ``pallas`` on the CPU). Each function is compiled first; the
medians over ``repeats`` interleaved calls (``timing.median_times``) are
reported, with speed-ups against ``reference`` timed in the same run.
"""

import argparse
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from experiments.benchmarks import timing
from models.biformer import ATTENTION_IMPLS, BiLevelRoutingAttention


class Shape(NamedTuple):
  """Batch, ``H = W`` tokens per side, channels, heads, regions per side
  and routed regions per query region."""

  batch: int
  tokens: int
  dim: int
  heads: int
  n_win: int
  topk: int


SHAPES = {
    "t1": Shape(64, 56, 64, 2, 7, 1),
    "t2": Shape(64, 28, 128, 4, 7, 4),
    "seg": Shape(16, 128, 64, 2, 8, 4),
    "cpu": Shape(2, 16, 32, 2, 4, 4),
}
DTYPES = ("bfloat16", "float32")
DENSE = "dense"
DIRECTIONS = ("fwd", "fwd+bwd")
# performance_targets.md, "Bi-level routing attention": official PyTorch BRA
# module on one H200, bf16, medians of 20 calls; milliseconds.
OFFICIAL_MS = {"t1": (1.12, 4.99), "t2": (0.94, 3.48), "seg": (3.39, 12.63)}
# (shape, direction index, bound in seconds) on ``pallas``'s time.
TIME_TARGETS = (("seg", 0, 0.5e-3), ("seg", 1, 2.0e-3), ("t1", 0, 0.15e-3))
SPEEDUP_TARGETS = (("seg", 0, "reference", 4.5), ("seg", 0, "official", 6.5))
SEG_PEAK_TARGET_BYTES = 1e9
_TOLERANCE = {"bfloat16": 2**-6, "float32": 1e-4}


def _module(shape: Shape, impl: str, dtype) -> BiLevelRoutingAttention:
  """BiFormer's BRA (same seed, so same weights, for every backend)."""
  return BiLevelRoutingAttention(
      shape.dim, shape.heads, shape.n_win, shape.topk, side_dwconv=5,
      dtype=dtype, param_dtype=jnp.float32,
      attention_impl="reference" if impl == DENSE else impl,
      rngs=nnx.Rngs(0))


def _dense(module: BiLevelRoutingAttention, x: jax.Array,
           implementation: str | None) -> jax.Array:
  """``module``'s layers around full attention over all ``H·W`` tokens.

  Args:
    module: supplies ``qkv``, ``lepe``, ``wo`` and ``scale``.
    x: ``[batch, H, W, dim]``.
    implementation: of ``jax.nn.dot_product_attention`` (``None``: XLA).

  Returns:
    ``[batch, H, W, dim]``.
  """
  b, h, w, c = x.shape
  q, k, v = jnp.split(module.qkv(x), [module.qk_dim, 2 * module.qk_dim], -1)
  q, k, vh = (t.reshape(b, h * w, module.num_heads, -1) for t in (q, k, v))
  out = jax.nn.dot_product_attention(
      q, k, vh, scale=module.scale, implementation=implementation)
  out = out.reshape(b, h, w, c)
  if module.lepe is not None:
    out = out + module.lepe(v)
  return module.wo(out)


def _compiled_pair(impl: str, shape: Shape, dtype, x, implementation=None):
  """``(forward, forward_backward)`` compiled, and the parameters.

  ``forward(params, x)`` gives the module output, ``forward_backward(params,
  x)`` the gradients ``(dx, dparams)`` of ``Σ out`` (in f32).
  """
  graphdef, params = nnx.split(_module(shape, impl, dtype))

  def forward(params, x):
    module = nnx.merge(graphdef, params)
    return _dense(module, x, implementation) if impl == DENSE else module(x)

  def loss(x, params):
    return jnp.sum(forward(params, x).astype(jnp.float32))

  grad = jax.grad(loss, argnums=(0, 1))
  forward_backward = lambda params, x: grad(x, params)
  return tuple(jax.jit(f).lower(params, x).compile()
               for f in (forward, forward_backward)), params


def _first_line(error: Exception) -> str:
  return f"{type(error).__name__}: {(str(error) or '?').splitlines()[0][:120]}"


def _build(impl: str, shape: Shape, dtype, x):
  """``(label, (fwd, fwd+bwd), params)``, or ``None`` if ``dense`` cannot
  run at all; ``dense`` tries cuDNN first, then XLA."""
  if impl != DENSE:
    return impl, *_compiled_pair(impl, shape, dtype, x)
  implementations = (("cudnn", "xla") if jax.default_backend() == "gpu"
                     else ("xla",))
  for implementation in implementations:
    try:
      pair, params = _compiled_pair(
          impl, shape, dtype, x, None if implementation == "xla"
          else implementation)
      # XLA's dense logits are [B, heads, HW, HW]: too big at seg on a GPU.
      jax.block_until_ready([fn(params, x) for fn in pair])
      return f"{DENSE} ({implementation})", pair, params
    except Exception as error:  # noqa: BLE001 - any failure: try the next
      print(f"dense ({implementation}) left out: {_first_line(error)}")
  return None


def _check(fns, params, x, shape: Shape, dtype: str) -> None:
  """Each backend's output and ``dx`` against ``reference``'s; raises."""
  if "reference" in fns:
    reference, reference_params = fns["reference"], params["reference"]
  else:
    _, reference, reference_params = _build("reference", shape,
                                            jnp.dtype(dtype), x)
  want = [fn(reference_params, x) for fn in reference]
  want = (want[0], want[1][0])
  for label, pair in fns.items():
    if label == "reference" or label.startswith(DENSE):
      continue
    got = (pair[0](params[label], x), pair[1](params[label], x)[0])
    for name, g, w in zip(("out", "dx"), got, want):
      g, w = g.astype(jnp.float32), w.astype(jnp.float32)
      absolute = float(jnp.max(jnp.abs(g - w)))
      error = absolute / max(float(jnp.max(jnp.abs(w))), 1e-30)
      print(f"{label} vs reference: max |Δ{name}| = {absolute:.3g}, "
            f"/ max |{name}| = {error:.3g} (tolerance "
            f"{_TOLERANCE[dtype]:.3g})")
      if not error <= _TOLERANCE[dtype]:
        raise RuntimeError(f"{label} disagrees with reference on {name}: "
                           f"relative max error {error:.3g}")


def _peak_bytes(compiled) -> int:
  stats = compiled.memory_analysis()
  return (stats.argument_size_in_bytes + stats.output_size_in_bytes
          - stats.alias_size_in_bytes + stats.temp_size_in_bytes)


def _print_table(name: str, times, peaks, on_gpu: bool) -> None:
  official = OFFICIAL_MS.get(name) if on_gpu else None
  base = times.get("reference")
  header = f"{'impl':<14}"
  for direction in DIRECTIONS:
    header += f"{direction:>12}{'vs ref':>8}" + (f"{'vs off.':>9}"
                                                 if official else "")
  print(header + f"{'fwd+bwd mem':>13}")
  for label, pair in times.items():
    row = f"{label:<14}"
    for i, value in enumerate(pair):
      row += f"{value * 1e3:9.3f} ms"
      row += f"{base[i] / value:7.2f}×" if base else f"{'—':>8}"
      if official:
        row += f"{official[i] * 1e-3 / value:8.2f}×"
    print(row + f"{peaks[label] / 2**20:9.1f} MiB")


def _report_targets(all_times, all_peaks) -> None:
  """The fused-kernel targets of performance_targets.md, on ``pallas``."""
  for name, i, bound in TIME_TARGETS:
    if "pallas" in all_times.get(name, {}):
      value = all_times[name]["pallas"][i]
      verdict = "met" if value <= bound else "MISSED"
      print(f"target {name} pallas {DIRECTIONS[i]} ≤ {bound * 1e3:.2f} ms: "
            f"{verdict} ({value * 1e3:.3f} ms)")
  for name, i, against, factor in SPEEDUP_TARGETS:
    times = all_times.get(name, {})
    if "pallas" in times and (against == "official" or against in times):
      base = (OFFICIAL_MS[name][i] * 1e-3 if against == "official"
              else times[against][i])
      speedup = base / times["pallas"][i]
      verdict = "met" if speedup >= factor else "MISSED"
      print(f"target {name} pallas {DIRECTIONS[i]} ≥ {factor}× {against}: "
            f"{verdict} ({speedup:.2f}×)")
  if "pallas" in all_peaks.get("seg", {}):
    peak = all_peaks["seg"]["pallas"]
    verdict = "met" if peak <= SEG_PEAK_TARGET_BYTES else "MISSED"
    print(f"target seg pallas fwd+bwd peak ≤ 1 GB: {verdict} "
          f"({peak / 1e9:.3f} GB)")


def run_shape(name: str, impls: tuple[str, ...], dtype: str, repeats: int):
  """Checks, times and prints one shape; returns ``(times, peaks)`` keyed
  by backend label (seconds per call; bytes of the forward+backward)."""
  shape = SHAPES[name]
  x = jax.random.normal(
      jax.random.key(0),
      (shape.batch, shape.tokens, shape.tokens, shape.dim), jnp.dtype(dtype))
  fns, params = {}, {}
  print(f"\nshape {name}: batch {shape.batch}, {shape.tokens}×{shape.tokens} "
        f"tokens, dim {shape.dim}, heads {shape.heads}, n_win {shape.n_win}, "
        f"topk {shape.topk}; {dtype}")
  for impl in impls:
    if built := _build(impl, shape, jnp.dtype(dtype), x):
      label, fns[label], params[label] = built
  _check(fns, params, x, shape, dtype)
  medians = timing.median_times(
      [(fn, (params[label], x)) for label, pair in fns.items()
       for fn in pair], repeats)
  times = {label: tuple(medians[2 * i:2 * i + 2])
           for i, label in enumerate(fns)}
  peaks = {label: _peak_bytes(pair[1]) for label, pair in fns.items()}
  _print_table(name, times, peaks, jax.default_backend() == "gpu")
  return times, peaks


def main(shapes: tuple[str, ...], impls: tuple[str, ...],
         dtype: str = "bfloat16", repeats: int = 20) -> dict:
  """Prints and returns ``{shape: (times, peaks)}`` (see ``run_shape``)."""
  device = jax.devices()[0]
  on_gpu = jax.default_backend() == "gpu"
  print(f"device: {device.device_kind} ({jax.default_backend()}); jax "
        f"{jax.__version__}; median of {repeats}; speed-ups are time ratios "
        "(reference / impl, official / impl); fwd+bwd mem = arguments + "
        "outputs + temporaries of the compiled executable (memory_analysis)")
  if on_gpu:
    print("official: PyTorch BRA module on one H200, bf16 "
          "(performance_targets.md): " + "; ".join(
              f"{n} {f:.2f} / {b:.2f} ms" for n, (f, b) in OFFICIAL_MS.items()))
  elif "pallas" in impls:
    print("pallas runs in the Pallas interpreter on the CPU: correctness "
          "only, its times mean nothing")
  results = {name: run_shape(name, impls, dtype, repeats) for name in shapes}
  if on_gpu and (stats := device.memory_stats()):
    print(f"process peak_bytes_in_use (all runs, not reset between them): "
          f"{stats.get('peak_bytes_in_use', 0) / 2**30:.2f} GiB")
  if on_gpu and dtype == "bfloat16":
    if "pallas" not in impls:
      print("targets not assessed: no pallas backend in this run")
    _report_targets({n: r[0] for n, r in results.items()},
                    {n: r[1] for n, r in results.items()})
  return results


def _parse_list(text: str | None, valid: tuple[str, ...], default):
  if text is None:
    return default
  names = tuple(n.strip() for n in text.split(",") if n.strip())
  if not names or any(n not in valid for n in names):
    raise ValueError(f"{text!r}: each must be one of {valid}")
  return names


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shapes", default=None,
                      help="comma list of " + ",".join(SHAPES)
                      + " (default: t1,t2,seg on GPU/TPU, cpu on the CPU)")
  parser.add_argument("--impls", default=None,
                      help="comma list of " + ",".join(ATTENTION_IMPLS)
                      + f",{DENSE} (default: all; no pallas on the CPU)")
  parser.add_argument("--dtype", choices=DTYPES, default="bfloat16")
  parser.add_argument("--repeats", type=int, default=20)
  flags = parser.parse_args()
  cpu = jax.default_backend() == "cpu"
  all_impls = (*ATTENTION_IMPLS, DENSE)
  main(_parse_list(flags.shapes, tuple(SHAPES),
                   ("cpu",) if cpu else ("t1", "t2", "seg")),
       _parse_list(flags.impls, all_impls,
                   tuple(i for i in all_impls if not (cpu and i == "pallas"))),
       flags.dtype, flags.repeats)
