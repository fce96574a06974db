"""Tests of models/macs.py: the counter itself and BiFormer-T/S/B at 224².

The official "FLOPs" of the rayleizhu/BiFormer README (2.2 G / 4.5 G /
9.8 G; 2.22 G / 4.46 G / 9.76 G in the reference note biformer_darts.md
§1.4, matmul + conv MACs at batch 1, 224², fvcore convention) are
multiply-accumulates of matmuls and convolutions only.
"""

import jax
import jax.numpy as jnp
import pytest

from experiments.benchmarks import biformer_macs
from models import count_macs


def _spec(*shape):
  return jax.ShapeDtypeStruct(shape, jnp.float32)


def _conv(x, kernel, groups=1, stride=1, padding="SAME"):
  return jax.lax.conv_general_dilated(
      x, kernel, (stride, stride), padding,
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=groups)


def test_matmul_and_conv_closed_form():
  # [2, 5, 8] @ [8, 3]: 2·5·3 outputs of 8 MACs each; the 3x3 SAME conv
  # 16 → 32 at stride 2 on 1×10×10: 5·5·32 outputs of 3·3·16 MACs each.
  def fn(a, w, x, kernel):
    return jnp.sum(a @ w) + jnp.sum(jax.nn.relu(_conv(x, kernel, stride=2)))

  macs = count_macs(fn, _spec(2, 5, 8), _spec(8, 3), _spec(1, 10, 10, 16),
                    _spec(3, 3, 16, 32))
  assert macs == 2 * 5 * 3 * 8 + 5 * 5 * 32 * 3 * 3 * 16


def test_batched_einsum_depthwise_conv_and_nested_calls():
  # Batched einsum [4, 6, 7] x [4, 7, 9] → 4·6·9·7; depthwise 5x5 on
  # 1×8×8×12 → 8·8·12·25; the inner jit is called twice.
  inner = jax.jit(lambda q, k: jnp.einsum("bij,bjk->bik", q, k))

  def fn(q, k, x, kernel):
    return (inner(q, k).sum() + inner(q, k).mean()
            + _conv(x, kernel, groups=12).sum())

  macs = count_macs(fn, _spec(4, 6, 7), _spec(4, 7, 9), _spec(1, 8, 8, 12),
                    _spec(5, 5, 1, 12))
  assert macs == 2 * 4 * 6 * 9 * 7 + 8 * 8 * 12 * 25


def test_agrees_with_xla_cost_analysis_on_pure_contractions():
  # XLA counts 2 flops per MAC; with nothing but one dot (or one conv) in
  # the module its total is all contraction. The conv is unpadded: XLA
  # skips taps on padding, the fvcore convention (ours) counts them.
  for fn, args in (
      (jnp.matmul, (_spec(3, 16, 32), _spec(3, 32, 24))),
      (lambda x, k: _conv(x, k, groups=4, padding="VALID"),
       (_spec(2, 9, 9, 8), _spec(3, 3, 2, 8)))):
    flops = jax.jit(fn).lower(*args).cost_analysis()["flops"]
    assert 2 * count_macs(fn, *args) == flops


@pytest.mark.parametrize("name", sorted(biformer_macs.OFFICIAL))
def test_biformer_params_and_macs_match_official(name):
  constructor, official_params, official_macs = biformer_macs.OFFICIAL[name]
  params, macs = biformer_macs.params_and_macs(constructor)
  assert params == official_params
  assert macs == pytest.approx(official_macs, rel=0.03)
