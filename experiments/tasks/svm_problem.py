r"""The SVM bilevel problem of LV-HBA §5, as pure functions of pytrees.

Upper variables: one log-weight per training example, ``c ∈ ℝᴺ``. Lower
variables: the soft-margin SVM ``(w, b, ξ)``, ``ξ ∈ ℝᴺ`` one slack per
training example. With margins ``mᵢ = yᵢ(wᵀzᵢ + b)`` and labels ``yᵢ = ±1``:

    min_c  F(w, b) = (1/n_val) Σ_j LeakyReLU(2σ(−5 m_j^val / ‖w‖) − 1)
    s.t.   (w, b, ξ) ∈ argmin ½‖w‖² + ½ Σᵢ e^{cᵢ} ξᵢ²
                       s.t.  gᵢ = 1 − ξᵢ − mᵢ ≤ 0,  i = 1..N.

``F`` is a smoothed validation 0-1 error (``2σ(−5t) − 1 = −tanh(2.5 t)`` is
positive on misclassified points; LeakyReLU slope 0.01 as in PyTorch), a
*mean* over the validation set where the official code sums (a factor
``n_val`` that the penalty constant of LV-HBA absorbs). The constraints
couple the per-example slacks to ``(w, b)``; their feasible set does not
depend on ``c``.

The *relaxed* lower level eliminates ξ: at the optimum ``ξᵢ = max(0, 1 − mᵢ)``
(``ξᵢ < 1 − mᵢ`` is infeasible, larger ξ only raises the objective), giving
the smooth squared-hinge SVM ``½‖w‖² + ½ Σᵢ e^{cᵢ} max(0, 1 − mᵢ)²`` over
``(w, b)`` — the problem of the implicit-differentiation and grid-search
baselines (solved in :mod:`experiments.tasks.svm_solvers`).

Also :class:`SVMData`, the splits the problem is posed on (built by
:func:`experiments.tasks.svm.make_data`), and the :func:`accuracy` metric.

References:
  Yao, Yu, Zeng, Zhang, "Constrained Bi-Level Optimization: Proximal
  Lagrangian Value function Approach and Hessian-free Algorithm", ICLR 2024,
  §5 (SVM hyper-parameter optimisation and data hyper-cleaning).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import bilevel

_NORM_EPS = 1e-12


class SVMData(NamedTuple):
  """Binary splits with ``±1`` labels, partly flipped on the training split.

  Attributes:
    train_x: float32 ``[n, d]`` standardized features.
    train_y: float32 ``[n]`` in ``{−1, +1}``, the (noisy) labels trained on.
    train_clean_y: float32 ``[n]``, the true labels.
    flipped: bool ``[n]``, ``train_y != train_clean_y``.
    val_x: float32 ``[n_val, d]``; ``val_y: [n_val]`` clean labels.
    val_y: float32 ``[n_val]``.
    test_x: float32 ``[n_test, d]``.
    test_y: float32 ``[n_test]``.
  """
  train_x: np.ndarray
  train_y: np.ndarray
  train_clean_y: np.ndarray
  flipped: np.ndarray
  val_x: np.ndarray
  val_y: np.ndarray
  test_x: np.ndarray
  test_y: np.ndarray


# ----------------------------------------------------------------------------
# The bilevel problem, as pure functions of pytrees.


def margins(lower: dict[str, jax.Array], x: jax.Array, y: jax.Array
            ) -> jax.Array:
  """``mᵢ = yᵢ(wᵀxᵢ + b)``: ``lower = {'w': [d], 'b': []}``, ``x: [n, d]``."""
  return y * (x @ lower["w"] + lower["b"])


def smoothed_error(lower, batch) -> jax.Array:
  """``mean_j LeakyReLU(2σ(−5 m_j/‖w‖) − 1)`` on ``batch = {'x', 'y'}``."""
  norm = jnp.sqrt(jnp.sum(jnp.square(lower["w"])) + _NORM_EPS)
  t = margins(lower, batch["x"], batch["y"]) / norm
  return jnp.mean(jax.nn.leaky_relu(2.0 * jax.nn.sigmoid(-5.0 * t) - 1.0))


def outer_loss(upper: jax.Array, lower, batch) -> jax.Array:
  """``F``: the smoothed validation error; ``c`` enters only through ``y``."""
  del upper
  return smoothed_error(lower, batch)


def constrained_inner_loss(upper: jax.Array, lower, batch) -> jax.Array:
  """``f(c, w, b, ξ) = ½‖w‖² + ½ Σᵢ e^{cᵢ} ξᵢ²``; ``c, ξ: [N]``."""
  del batch
  return 0.5 * jnp.sum(jnp.square(lower["w"])) + 0.5 * jnp.sum(
      jnp.exp(upper) * jnp.square(lower["xi"]))


def constraints(upper: jax.Array, lower, batch) -> jax.Array:
  """``gᵢ = 1 − ξᵢ − yᵢ(wᵀzᵢ + b)``, ``[N]``, feasible where ``≤ 0``."""
  del upper
  return 1.0 - lower["xi"] - margins(lower, batch["x"], batch["y"])


def relaxed_inner_loss(upper: jax.Array, lower, batch) -> jax.Array:
  """``½‖w‖² + ½ Σᵢ e^{cᵢ} max(0, 1 − mᵢ)²`` (ξ eliminated)."""
  hinge = jax.nn.relu(1.0 - margins(lower, batch["x"], batch["y"]))
  return 0.5 * jnp.sum(jnp.square(lower["w"])) + 0.5 * jnp.sum(
      jnp.exp(upper) * jnp.square(hinge))


CONSTRAINED = bilevel.Problem(outer_loss, constrained_inner_loss, constraints)


def scaled_constraints(scale: float):
  """``s·g``: the same feasible set, multipliers ``λ/s`` (conditioning)."""
  return lambda upper, lower, batch: scale * constraints(upper, lower, batch)


RELAXED = bilevel.Problem(outer_loss, relaxed_inner_loss)


def accuracy(lower, x, y) -> jax.Array:
  """Fraction of ``sign(wᵀx + b) = y`` (a zero score counts as wrong)."""
  return jnp.mean((margins(lower, x, y) > 0).astype(jnp.float32))
