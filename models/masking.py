"""Maskable convolution and dense layers for bi-level pruning (Flax NNX).

A masked layer computes with the pruned kernel ``z = kernel * mask_fn(scores)``
(BiP's ``z = m ⊙ θ``). The kernel is an ``nnx.Param`` (lower level) and the
scores a ``MaskScore`` (upper level), so
``models.split_levels(model, MaskScore)`` separates the two levels.

Mask modes and score shapes, for a conv kernel ``[kh, kw, in, out]`` and a
dense kernel ``[in, out]``:

* ``'none'``: no scores; the layer is a plain conv / dense layer.
* ``'unstructured'``: one score per kernel entry, the kernel's shape.
* ``'filter'``: one score per output filter, ``[1, 1, 1, out]`` / ``[1, out]``.
* ``'channel'``: one score per input channel, ``[1, 1, in, 1]`` / ``[in, 1]``.

Scores start at ones (the dense network). The default ``mask_fn`` is the
identity, so the scores are the relaxed mask ``m ∈ [0, 1]`` of the BiP paper,
kept feasible by the solver's projection. A per-layer straight-through top-k
can be injected as ``mask_fn``; a global top-k across layers (as in BiP's
unstructured code) belongs outside the model, applied to the upper pytree of
``models.split_levels`` before ``models.merge_levels``. Masks kept outside
the model, over a flat weight dict (layouts, magnitude, OMP and IMP masks,
structured scores, global or per-layer top-k), are built in
:mod:`models.mask_builders`.

References:
  Zhang et al., "Advancing Model Pruning via Bi-level Optimization",
  NeurIPS 2022, §3 (z = m ⊙ θ) and Algorithm 1.
"""

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

MASK_MODES = ("none", "unstructured", "filter", "channel")

MaskFn = Callable[[jax.Array], jax.Array]

_CONV_INIT = nnx.initializers.he_normal()
_DENSE_INIT = nnx.initializers.lecun_normal()


class MaskScore(nnx.Param):
  """Upper-level pruning scores; a subclass of ``nnx.Param``.

  ``models.split_levels(model, MaskScore)`` puts it in the upper level and
  the other ``nnx.Param`` leaves in the lower one.
  """


def identity_mask(scores: jax.Array) -> jax.Array:
  """The default ``mask_fn``: the relaxed mask is the scores themselves."""
  return scores


def score_shape(kernel_shape: Sequence[int], mask_mode: str) -> tuple[int, ...]:
  """The score shape of ``mask_mode`` for a ``[..., in, out]`` kernel.

  Args:
    kernel_shape: ``[*spatial, in, out]``.
    mask_mode: one of ``MASK_MODES`` other than ``'none'``.

  Returns:
    The kernel's shape (unstructured), ``[1, ..., 1, out]`` (filter) or
    ``[1, ..., in, 1]`` (channel); broadcastable against the kernel.

  Raises:
    ValueError: unknown ``mask_mode`` or ``'none'``.
  """
  *lead, fan_in, fan_out = kernel_shape
  ones = (1,) * len(lead)
  shapes = {
      "unstructured": tuple(kernel_shape),
      "filter": (*ones, 1, fan_out),
      "channel": (*ones, fan_in, 1),
  }
  if mask_mode not in shapes:
    raise ValueError(
        f"{mask_mode=} has no scores; valid modes with scores:"
        f" {tuple(shapes)}")
  return shapes[mask_mode]


class _Masked(nnx.Module):
  """Shared kernel, bias and score handling of the masked layers."""

  def _init_params(self, kernel_shape, use_bias, kernel_init, mask_mode,
                   mask_fn, dtype, param_dtype, rngs):
    if mask_mode not in MASK_MODES:
      raise ValueError(f"{mask_mode=} is not one of {MASK_MODES}")
    self.mask_mode = mask_mode
    self.mask_fn = mask_fn
    self.dtype = dtype
    self.kernel = nnx.Param(
        kernel_init(rngs.params(), kernel_shape, param_dtype))
    self.bias = (nnx.Param(jnp.zeros(kernel_shape[-1], param_dtype))
                 if use_bias else None)
    self.scores = (
        None if mask_mode == "none" else
        MaskScore(jnp.ones(score_shape(kernel_shape, mask_mode),
                           param_dtype)))

  def masked_kernel(self) -> jax.Array:
    """The pruned kernel ``kernel * mask_fn(scores)`` in the compute dtype."""
    kernel = self.kernel[...]
    if self.scores is not None:
      kernel = kernel * self.mask_fn(self.scores[...])
    return kernel.astype(self.dtype)

  def _add_bias(self, y: jax.Array) -> jax.Array:
    if self.bias is None:
      return y
    return y + self.bias[...].astype(self.dtype)


class MaskedConv(_Masked):
  """2-D convolution ``[batch, h, w, in] -> [batch, h', w', out]`` (NHWC).

  Attributes:
    kernel: ``nnx.Param`` ``[kh, kw, in, out]``.
    bias: ``nnx.Param`` ``[out]`` or ``None``.
    scores: ``MaskScore`` of ``score_shape(kernel.shape, mask_mode)``, or
      ``None`` when ``mask_mode='none'``.
  """

  def __init__(
      self,
      in_features: int,
      out_features: int,
      kernel_size: int,
      *,
      strides: int = 1,
      padding: str | Sequence[tuple[int, int]] = "SAME",
      use_bias: bool = True,
      mask_mode: str = "none",
      mask_fn: MaskFn = identity_mask,
      kernel_init: Any = _CONV_INIT,
      dtype: jnp.dtype = jnp.float32,
      param_dtype: jnp.dtype = jnp.float32,
      rngs: nnx.Rngs,
  ):
    """Builds the kernel, bias and scores.

    Args:
      in_features: input channels.
      out_features: output channels (filters).
      kernel_size: square window size ``k``.
      strides: spatial stride.
      padding: ``'SAME'``, ``'VALID'`` or ``((top, bottom), (left, right))``.
      use_bias: whether to add an (unmasked) bias.
      mask_mode: one of ``MASK_MODES``.
      mask_fn: pure map from scores to the mask, applied in every forward.
      kernel_init: initializer ``(key, shape, dtype) -> kernel``.
      dtype: compute dtype.
      param_dtype: dtype of kernel, bias and scores.
      rngs: NNX RNG streams; uses ``params``.

    Raises:
      ValueError: unknown ``mask_mode``.
    """
    self.strides = (strides, strides)
    self.padding = padding if isinstance(padding, str) else tuple(padding)
    self._init_params(
        (kernel_size, kernel_size, in_features, out_features), use_bias,
        kernel_init, mask_mode, mask_fn, dtype, param_dtype, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Convolves ``x`` ``[batch, h, w, in]`` with the pruned kernel."""
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), self.masked_kernel(), self.strides,
        self.padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return self._add_bias(y)


class MaskedLinear(_Masked):
  """Dense layer ``[batch, in] -> [batch, out]`` with a pruned kernel.

  Attributes:
    kernel: ``nnx.Param`` ``[in, out]``.
    bias: ``nnx.Param`` ``[out]`` or ``None``.
    scores: ``MaskScore`` of ``score_shape(kernel.shape, mask_mode)``, or
      ``None`` when ``mask_mode='none'``.
  """

  def __init__(
      self,
      in_features: int,
      out_features: int,
      *,
      use_bias: bool = True,
      mask_mode: str = "none",
      mask_fn: MaskFn = identity_mask,
      kernel_init: Any = _DENSE_INIT,
      dtype: jnp.dtype = jnp.float32,
      param_dtype: jnp.dtype = jnp.float32,
      rngs: nnx.Rngs,
  ):
    """Builds the kernel, bias and scores; arguments as in ``MaskedConv``."""
    self._init_params((in_features, out_features), use_bias, kernel_init,
                      mask_mode, mask_fn, dtype, param_dtype, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Applies ``x @ (kernel * mask) + bias`` to ``x`` ``[batch, in]``."""
    return self._add_bias(x.astype(self.dtype) @ self.masked_kernel())


def sparsity(masks: Any) -> float:
  """Fraction of exactly-zero entries over all leaves of ``masks``.

  Args:
    masks: a pytree of arrays, e.g. the upper level of
      ``models.split_levels(model, MaskScore)`` (or ``mask_fn`` applied to it
      when ``mask_fn`` is not the identity).

  Returns:
    ``#zeros / #entries`` as a Python float.

  Raises:
    ValueError: ``masks`` has no entries.
  """
  leaves = jax.tree.leaves(masks)
  total = sum(leaf.size for leaf in leaves)
  if total == 0:
    raise ValueError("sparsity of an empty mask pytree is undefined")
  zeros = sum(int(jnp.sum(leaf == 0)) for leaf in leaves)
  return zeros / total
