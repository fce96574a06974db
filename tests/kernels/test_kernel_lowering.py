"""The kernels lower for the hardware this machine lacks.

``jax.export`` lowers the forward and backward of each op for CUDA (Pallas
Triton emits its Triton IR at this stage) and for TPU (Mosaic), on abstract
devices. Only the lowering is checked: compiling the IR needs the device.
"""

import contextlib

import jax
import jax.numpy as jnp
import pytest
from jax import export

import kernels

_TARGETS = {  # implementation: (export platform, abstract device, custom call)
    "triton": ("cuda", jax.sharding.AbstractDevice("NVIDIA H100", None, "gpu"),
               "__gpu$xla.gpu.triton"),
    "mosaic_tpu": ("tpu", jax.sharding.AbstractDevice("TPU v5 lite", 1,
                                                      "tpu"),
                   "tpu_custom_call"),
}


def _on_abstract_device(device):
  try:
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
  except TypeError:  # Older jax: lowering needs no device description.
    return contextlib.nullcontext()
  return jax.sharding.use_abstract_mesh(mesh)


def _lowered_kernels(fn, impl, *args):
  platform, device, call = _TARGETS[impl]
  checks = [export.DisabledSafetyCheck.custom_call(call)]
  with _on_abstract_device(device):
    exported = export.export(jax.jit(fn), platforms=[platform],
                             disabled_checks=checks)(*args)
  return exported.mlir_module().count(f"custom_call @{call}")


@pytest.mark.parametrize("impl", ["triton", "mosaic_tpu"])
def test_routed_attention_forward_and_backward_lower(impl):
  spec = jax.ShapeDtypeStruct((2, 2, 4, 64, 32), jnp.bfloat16)
  index = jax.ShapeDtypeStruct((2, 4, 2), jnp.int32)

  def loss(q, k, v, index):
    out = kernels.routed_attention(q, k, v, index, scale=0.125,
                                   interpret=False, implementation=impl)
    return jnp.sum(out.astype(jnp.float32))

  grads = jax.value_and_grad(loss, argnums=(0, 1, 2))
  # Forward, dQ and dK/dV: three kernels.
  assert _lowered_kernels(grads, impl, spec, spec, spec, index) == 3


@pytest.mark.parametrize("impl", ["triton", "mosaic_tpu"])
def test_grouped_matmul_forward_and_backward_lower(impl):
  lhs = jax.ShapeDtypeStruct((256, 128), jnp.bfloat16)
  rhs = jax.ShapeDtypeStruct((4, 128, 256), jnp.bfloat16)
  sizes = jax.ShapeDtypeStruct((4,), jnp.int32)

  def loss(lhs, rhs, sizes):
    out = kernels.grouped_matmul(lhs, rhs, sizes, interpret=False,
                                 implementation=impl)
    return jnp.sum(out.astype(jnp.float32))

  # Forward, dlhs (a grouped matmul) and drhs (the transposed one).
  value_and_grads = jax.value_and_grad(loss, argnums=(0, 1))
  assert _lowered_kernels(value_and_grads, impl, lhs, rhs, sizes) == 3
