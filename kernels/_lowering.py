"""Which Pallas lowering a kernel call uses, shared by every op in kernels/.

Each op has a ``"triton"`` (NVIDIA GPU) and a ``"mosaic_tpu"`` (TPU)
lowering; on the CPU either one runs in the Pallas interpreter.
"""

import jax

IMPLEMENTATIONS = ("triton", "mosaic_tpu")


def resolve(interpret: bool | None,
            implementation: str | None) -> tuple[bool, str]:
  """Fills in the defaults: the interpreter when the default backend is the
  CPU; ``"mosaic_tpu"`` on a TPU backend, else ``"triton"``.

  Raises:
    ValueError: an implementation not in ``IMPLEMENTATIONS``.
  """
  backend = jax.default_backend()
  if interpret is None:
    interpret = backend == "cpu"
  if implementation is None:
    implementation = "mosaic_tpu" if backend == "tpu" else "triton"
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"{implementation=} is not one of {IMPLEMENTATIONS}")
  return bool(interpret), implementation
