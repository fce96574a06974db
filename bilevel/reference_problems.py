"""Closed-form bi-level problems: correctness tooling for solvers.

Each constructor returns a :class:`ReferenceProblem` with the losses in the
contract's form ``loss(upper, lower, batch)``, a starting point, the batches
to pass as extra arguments, and the closed forms of ``∇Φ(x)``, ``y*(x)`` and
(where known) ``x*``. Labels follow ``reference/bilevel_problems.md``.

Data live in ``batches`` (losses read them from their ``batch`` argument) in
the requested ``dtype``; closed forms evaluate in at least float32 on the
same (rounded) data, and return that dtype. Constructors are eager: call them
inside ``with jax.enable_x64(True):`` for float64.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from bilevel._base import Params, Problem
from bilevel._scalebio import source_weighted_loss

PyTree = Any


class ReferenceProblem(NamedTuple):
  """A bi-level problem with known answers.

  Attributes:
    problem: the losses (and constraints, evaluated on the inner batch).
    init: a starting point ``Params(upper, lower)``.
    batches: ``{'outer_batch': ..., 'inner_batch': ...}`` (``None`` where
      unused), to pass as ``**batches`` to ``tx.update`` or ``make_step``.
    hypergradient: ``upper -> ∇Φ(upper)``, ``Φ(x) = F(x, y*(x))``.
    lower_solution: ``upper -> y*(upper)``.
    upper_optimum: ``x*`` or ``None`` where it has no closed form.
  """
  problem: Problem
  init: Params
  batches: dict[str, Any]
  hypergradient: Callable[[PyTree], PyTree]
  lower_solution: Callable[[PyTree], PyTree]
  upper_optimum: PyTree | None


def _wide(dtype) -> jnp.dtype:
  return jnp.promote_types(dtype, jnp.float32)


def _spd(key, dim, low, high, dtype) -> jax.Array:
  """A random ``[dim, dim]`` SPD matrix, spectrum ``linspace(low, high)``."""
  q, _ = jnp.linalg.qr(jax.random.normal(key, (dim, dim), _wide(dtype)))
  return (q * jnp.linspace(low, high, dim, dtype=q.dtype)) @ q.T


def _cast(tree, dtype):
  return jax.tree.map(lambda a: jnp.asarray(a).astype(dtype), tree)


def _batches(outer, inner):
  return {"outer_batch": outer, "inner_batch": inner}


def r1(dtype=jnp.float32) -> ReferenceProblem:
  """R1, scalar sanity: ``f = ½(y − x)²``, ``F = ½(y − 1)² + ½x²``.

  ``y*(x) = x``, ``Φ′(x) = 2x − 1``, ``x* = 0.5``, ``Φ* = 0.25``; the inner
  Hessian is 1. Scalars of shape ``[]``.
  """
  outer = lambda x, y, batch: 0.5 * (y - 1) ** 2 + 0.5 * x ** 2
  inner = lambda x, y, batch: 0.5 * (y - x) ** 2
  return ReferenceProblem(
      problem=Problem(outer, inner),
      init=Params(jnp.asarray(2.0, dtype), jnp.asarray(0.0, dtype)),
      batches=_batches(None, None),
      hypergradient=lambda x: 2 * x - 1,
      lower_solution=lambda x: x,
      upper_optimum=jnp.asarray(0.5, dtype))


def _r2_inner(x, z, b):
  return (0.5 * z @ b["A"] @ z + 0.5 * x @ b["B"] @ x + x @ b["C"] @ z
          + b["a"] @ z + b["b"] @ x)


def _r2_outer(x, z, b):
  return (0.5 * z @ b["F"] @ z + 0.5 * x @ b["H"] @ x + x @ b["K"] @ z
          + b["f0"] @ z + b["h"] @ x)


def r2(key, dim_upper=20, dim_lower=20, dtype=jnp.float32) -> ReferenceProblem:
  """R2, general quadratic (benchopt form), ``x ∈ ℝᵖ``, ``z ∈ ℝᵈ``.

  ``f(x,z) = ½zᵀAz + ½xᵀBx + xᵀCz + aᵀz + bᵀx`` (inner),
  ``F(x,z) = ½zᵀFz + ½xᵀHx + xᵀKz + f₀ᵀz + hᵀx`` (outer).
  ``z*(x) = −A⁻¹(Cᵀx + a)``,
  ``∇Φ(x) = Hx + Kz* + h − CA⁻¹(Fz* + Kᵀx + f₀)``,
  ``x* = −Q⁻¹(Km + MᵀFm + Mᵀf₀ + h)`` with ``M = −A⁻¹Cᵀ``, ``m = −A⁻¹a``,
  ``Q = H + KM + MᵀKᵀ + MᵀFM``.

  Spectra: inner Hessian ``A`` and ``B``, ``H`` in ``[1, 2]`` exactly,
  ``F`` in ``[0, 1]``; ``‖C‖ ≈ 0.5``, ``‖K‖ ≈ 0.1``, so ``Q`` lies in about
  ``[0.9, 2.4]`` (inner step 0.5 and outer step 0.3 both contract).

  Args:
    key: PRNG key.
    dim_upper: ``p``.
    dim_lower: ``d``.
    dtype: dtype of the data and of ``init``.
  """
  p, d, wide = dim_upper, dim_lower, _wide(dtype)
  ks = jax.random.split(key, 12)
  normal = lambda k, shape: jax.random.normal(k, shape, wide)
  inner = _cast(dict(
      A=_spd(ks[0], d, 1.0, 2.0, wide), B=_spd(ks[1], p, 1.0, 2.0, wide),
      C=0.25 * normal(ks[2], (p, d)) / jnp.sqrt(max(p, d)),
      a=normal(ks[3], (d,)), b=normal(ks[4], (p,))), dtype)
  outer = _cast(dict(
      F=_spd(ks[5], d, 0.0, 1.0, wide), H=_spd(ks[6], p, 1.0, 2.0, wide),
      K=0.05 * normal(ks[7], (p, d)) / jnp.sqrt(max(p, d)),
      f0=normal(ks[8], (d,)), h=normal(ks[9], (p,))), dtype)
  i, o = _cast(inner, wide), _cast(outer, wide)

  def lower_solution(x):
    return -jnp.linalg.solve(i["A"], i["C"].T @ x + i["a"])

  def hypergradient(x):
    z = lower_solution(x)
    adjoint = jnp.linalg.solve(i["A"], o["F"] @ z + o["K"].T @ x + o["f0"])
    return o["H"] @ x + o["K"] @ z + o["h"] - i["C"] @ adjoint

  m_mat = -jnp.linalg.solve(i["A"], i["C"].T)
  m_vec = -jnp.linalg.solve(i["A"], i["a"])
  q = (o["H"] + o["K"] @ m_mat + m_mat.T @ o["K"].T
       + m_mat.T @ o["F"] @ m_mat)
  x_star = -jnp.linalg.solve(q, o["K"] @ m_vec + m_mat.T @ o["F"] @ m_vec
                             + m_mat.T @ o["f0"] + o["h"])
  return ReferenceProblem(
      problem=Problem(_r2_outer, _r2_inner),
      init=Params(normal(ks[10], (p,)).astype(dtype), jnp.zeros([d], dtype)),
      batches=_batches(outer, inner),
      hypergradient=hypergradient,
      lower_solution=lower_solution,
      upper_optimum=x_star.astype(dtype))


def _r3_inner(log_lam, w, b):
  residual = b["x"] @ w - b["y"]
  return 0.5 * residual @ residual + 0.5 * jnp.exp(log_lam) * w @ w


def _r3_outer(log_lam, w, b):
  del log_lam
  residual = b["x"] @ w - b["y"]
  return 0.5 * residual @ residual


def r3(key, n=40, d=8, dtype=jnp.float32) -> ReferenceProblem:
  """R3, ridge hyper-parameter; the upper variable is ``log λ`` (a scalar).

  ``w*(λ) = (XᵀX + λI)⁻¹Xᵀy``, ``Φ = ½‖X_v w* − y_v‖²``,
  ``dΦ/d log λ = −λ (X_vᵀ(X_v w* − y_v))ᵀ(XᵀX + λI)⁻¹w*``. No closed-form
  ``x*``. ``X`` has ``N(0, 1/n)`` entries, so the inner Hessian
  ``XᵀX + λI`` has spectrum about ``[(1 − √(d/n))² + λ, (1 + √(d/n))² + λ]``
  (``[1.3, 3.1]`` at the defaults and ``λ = 1``, the ``init``).

  Args:
    key: PRNG key.
    n: training samples (the validation set has ``n // 2``).
    d: features.
    dtype: dtype of the data and of ``init``.
  """
  wide = _wide(dtype)
  kx, kw, kn, kv, knv = jax.random.split(key, 5)
  w_true = jax.random.normal(kw, (d,), wide)

  def data(kx, kn, rows):
    x = jax.random.normal(kx, (rows, d), wide) / jnp.sqrt(n)
    return dict(x=x, y=x @ w_true + 0.1 * jax.random.normal(kn, (rows,), wide))

  inner = _cast(data(kx, kn, n), dtype)
  outer = _cast(data(kv, knv, n // 2), dtype)
  i, o = _cast(inner, wide), _cast(outer, wide)

  def lower_solution(log_lam):
    lam = jnp.exp(jnp.asarray(log_lam, wide))
    return jnp.linalg.solve(i["x"].T @ i["x"] + lam * jnp.eye(d, dtype=wide),
                            i["x"].T @ i["y"])

  def hypergradient(log_lam):
    lam = jnp.exp(jnp.asarray(log_lam, wide))
    w = lower_solution(log_lam)
    grad_w = o["x"].T @ (o["x"] @ w - o["y"])
    hessian = i["x"].T @ i["x"] + lam * jnp.eye(d, dtype=wide)
    return -lam * grad_w @ jnp.linalg.solve(hessian, w)

  return ReferenceProblem(
      problem=Problem(_r3_outer, _r3_inner),
      init=Params(jnp.zeros([], dtype), jnp.zeros([d], dtype)),
      batches=_batches(outer, inner),
      hypergradient=hypergradient,
      lower_solution=lower_solution,
      upper_optimum=None)


def _r4_inner(logits, w, b):
  losses = 0.5 * jnp.sum((w[None, :] - b["centres"]) ** 2, axis=-1)
  return source_weighted_loss(losses, b["sources"], logits)


def _r4_outer(logits, w, b):
  del logits
  return 0.5 * jnp.sum((w - b["target"]) ** 2)


def r4(key, num_sources=4, dim=6, weights=(0.4, 0.3, 0.2, 0.1),
       dtype=jnp.float32) -> ReferenceProblem:
  r"""R4, K-source data reweighting (ScaleBiO), weights ``softmax(p)``.

  Source ``k`` has the loss ``½‖w − c_k‖²`` (one example per source in the
  inner batch, weighted by :func:`bilevel.source_weighted_loss`), so
  ``L₂(w, λ) = Σ λ_k ½‖w − c_k‖²`` and ``w*(λ) = Σ λ_k c_k``; the outer loss
  is ``½‖w − c_val‖²`` with ``c_val = Σ λ°_k c_k``. With the ``c_k``
  linearly independent (``K ≤ dim``) the optimum is ``λ* = λ°`` with
  ``Φ* = 0``; in logits ``x* = log λ° − mean(log λ°)`` (the shift that
  gradient steps from ``p = 0`` keep). ``∂Φ/∂λ_k = (w* − c_val)ᵀ(c_k −
  w*)`` and ``∇_p Φ = (diag λ − λλᵀ) ∇_λ Φ``.

  Args:
    key: PRNG key.
    num_sources: ``K``.
    dim: dimension of ``w``.
    weights: ``λ°``, positive, on the simplex, length ``K``.
    dtype: dtype of the data and of ``init``.
  """
  wide = _wide(dtype)
  target_weights = jnp.asarray(weights, wide)
  if target_weights.shape != (num_sources,) or num_sources > dim:
    raise ValueError(f"need len(weights) == num_sources <= dim, got "
                     f"{len(weights)=}, {num_sources=}, {dim=}")
  centres = jax.random.normal(key, (num_sources, dim), wide)
  target = target_weights @ centres
  inner = {"centres": centres.astype(dtype),
           "sources": jnp.arange(num_sources, dtype=jnp.int32)}
  outer = {"target": target.astype(dtype)}
  c, t = inner["centres"].astype(wide), outer["target"].astype(wide)

  def lower_solution(logits):
    return jax.nn.softmax(jnp.asarray(logits, wide)) @ c

  def hypergradient(logits):
    lam = jax.nn.softmax(jnp.asarray(logits, wide))
    w = lam @ c
    grad_lam = (c - w) @ (w - t)
    return lam * grad_lam - lam * (lam @ grad_lam)

  log_w = jnp.log(target_weights)
  return ReferenceProblem(
      problem=Problem(_r4_outer, _r4_inner),
      init=Params(jnp.zeros([num_sources], dtype), jnp.zeros([dim], dtype)),
      batches=_batches(outer, inner),
      hypergradient=hypergradient,
      lower_solution=lower_solution,
      upper_optimum=(log_w - jnp.mean(log_w)).astype(dtype))


def r9(key, dim=5, dtype=jnp.float32) -> ReferenceProblem:
  """R9, lower level with a linear equality constraint.

  ``y*(x) = argmin ½‖y‖² s.t. aᵀy = x = x·a/‖a‖²`` (multiplier
  ``ν* = −x/‖a‖²``), ``F = ½‖y − t‖²``, ``dΦ/dx = (x − aᵀt)/‖a‖²``,
  ``x* = aᵀt``. ``problem.constraints(x, y, inner_batch) = [aᵀy − x]``;
  ``x`` is a scalar, ``y ∈ ℝᵈⁱᵐ``.

  Args:
    key: PRNG key.
    dim: dimension of ``y``.
    dtype: dtype of the data and of ``init``.
  """
  wide = _wide(dtype)
  ka, kt, kx = jax.random.split(key, 3)
  inner = {"a": jax.random.normal(ka, (dim,), wide).astype(dtype)}
  outer = {"t": jax.random.normal(kt, (dim,), wide).astype(dtype)}
  a, t = inner["a"].astype(wide), outer["t"].astype(wide)
  return ReferenceProblem(
      problem=Problem(
          outer_loss=lambda x, y, b: 0.5 * jnp.sum((y - b["t"]) ** 2),
          inner_loss=lambda x, y, b: 0.5 * jnp.sum(y ** 2),
          constraints=lambda x, y, b: jnp.atleast_1d(b["a"] @ y - x)),
      init=Params(jax.random.normal(kx, (), wide).astype(dtype),
                  jnp.zeros([dim], dtype)),
      batches=_batches(outer, inner),
      hypergradient=lambda x: (x - a @ t) / (a @ a),
      lower_solution=lambda x: x * a / (a @ a),
      upper_optimum=(a @ t).astype(dtype))


def _r10_inner(x, z, batch):
  del batch
  log_s = jax.nn.log_softmax(z)
  gauge = 0.5 * jnp.sum(z) ** 2 / z.shape[-1]
  return jnp.exp(log_s) @ (log_s - x) + gauge


def _r10_outer(x, z, b):
  del x
  return 0.5 * jnp.sum((jax.nn.softmax(z) - b["t"]) ** 2)


def r10(key, dim=5, dtype=jnp.float32) -> ReferenceProblem:
  """R10, entropy-regularised simplex lower level, in logits.

  The lower variable is logits ``z`` with ``y = softmax(z)``:
  ``f(x, z) = −xᵀy + Σ yᵢ log yᵢ + (1ᵀz)²/(2·dim)``, ``F = ½‖y − t‖²``.
  The last term fixes the gauge ``z → z + c·1`` without moving ``y``, so
  ``z*(x) = x − mean(x)``, ``y* = softmax(x)`` and the inner Hessian at
  ``z*`` is ``diag(y*) − y*y*ᵀ + 11ᵀ/dim`` (spectrum in about
  ``[min yᵢ, 1]``). ``∇Φ(x) = (diag(y*) − y*y*ᵀ)(y* − t)``,
  ``x* = log t − mean(log t)`` (any shift of it is optimal, ``Φ* = 0``).

  Args:
    key: PRNG key.
    dim: simplex dimension.
    dtype: dtype of the data and of ``init``.
  """
  wide = _wide(dtype)
  kt, kx = jax.random.split(key)
  outer = {"t": jax.nn.softmax(0.5 * jax.random.normal(kt, (dim,), wide))
                .astype(dtype)}
  t = outer["t"].astype(wide)

  def hypergradient(x):
    y = jax.nn.softmax(jnp.asarray(x, wide))
    return y * (y - t) - y * (y @ (y - t))

  log_t = jnp.log(t)
  return ReferenceProblem(
      problem=Problem(_r10_outer, _r10_inner),
      init=Params((0.5 * jax.random.normal(kx, (dim,), wide)).astype(dtype),
                  jnp.zeros([dim], dtype)),
      batches=_batches(outer, None),
      hypergradient=hypergradient,
      lower_solution=lambda x: x - jnp.mean(x),
      upper_optimum=(log_t - jnp.mean(log_t)).astype(dtype))


def r12(key, dim=10, lam=1.0, dtype=jnp.float32) -> ReferenceProblem:
  """R12, proximal meta-learning (iMAML-type).

  ``φ*(θ) = argmin ½(φ − c)ᵀA(φ − c) + (λ/2)‖φ − θ‖² =
  (A + λI)⁻¹(Ac + λθ)``, ``F = ½‖φ − d‖²``,
  ``∇Φ(θ) = λ(A + λI)⁻¹(φ* − d)``, ``θ* = ((A + λI)d − Ac)/λ``.
  ``A`` has spectrum ``linspace(0, 4)``, so the inner Hessian ``A + λI`` has
  spectrum ``[λ, λ + 4]``: CG is exact in ``dim`` steps, Neumann with step
  ``1/(λ + 4)`` contracts by ``4/(λ + 4)`` per term.

  Args:
    key: PRNG key.
    dim: dimension of ``θ`` and ``φ``.
    lam: proximal weight ``λ > 0``.
    dtype: dtype of the data and of ``init``.
  """
  wide = _wide(dtype)
  ka, kc, kd, kx = jax.random.split(key, 4)
  inner = _cast(dict(A=_spd(ka, dim, 0.0, 4.0, wide),
                     c=jax.random.normal(kc, (dim,), wide)), dtype)
  outer = {"d": jax.random.normal(kd, (dim,), wide).astype(dtype)}
  a_mat, c = inner["A"].astype(wide), inner["c"].astype(wide)
  d = outer["d"].astype(wide)
  hessian = a_mat + lam * jnp.eye(dim, dtype=wide)

  def inner_loss(theta, phi, b):
    return (0.5 * (phi - b["c"]) @ b["A"] @ (phi - b["c"])
            + 0.5 * lam * jnp.sum((phi - theta) ** 2))

  def lower_solution(theta):
    return jnp.linalg.solve(hessian, a_mat @ c + lam * theta)

  return ReferenceProblem(
      problem=Problem(lambda t, phi, b: 0.5 * jnp.sum((phi - b["d"]) ** 2),
                      inner_loss),
      init=Params(jax.random.normal(kx, (dim,), wide).astype(dtype),
                  jnp.zeros([dim], dtype)),
      batches=_batches(outer, inner),
      hypergradient=lambda theta: lam * jnp.linalg.solve(
          hessian, lower_solution(theta) - d),
      lower_solution=lower_solution,
      upper_optimum=((hessian @ d - a_mat @ c) / lam).astype(dtype))


def _r7_outer(x, y, batch):
  del batch
  y1, y2 = y
  return 0.5 * jnp.sum((x - y2) ** 2) + 0.5 * jnp.sum((y1 - 1) ** 2)


def _r7_inner(x, y, batch):
  del batch
  y1, y2 = y
  return 0.5 * jnp.sum(y1 ** 2) - x @ y1 + jnp.sum(y2)


def _r7_constraints(x, y, batch):
  del batch
  y1, y2 = y
  return jnp.atleast_1d(jnp.sum(x) + jnp.sum(y1) + jnp.sum(y2))


def r7(n=100, dtype=jnp.float32) -> ReferenceProblem:
  """R7, LV-HBA's coupled-equality toy; the lower-level solution is a set.

  ``F(x, y) = ½‖x − y₂‖² + ½‖y₁ − 1‖²``, ``f(x, y) = ½‖y₁‖² − xᵀy₁ + 1ᵀy₂``
  s.t. ``h(x, y) = 1ᵀx + 1ᵀy₁ + 1ᵀy₂ = 0`` (coupled, equality;
  ``problem.constraints`` returns ``[h]``). The lower solution set is
  ``{y₁ = x + 1, 1ᵀy₂ = −2·1ᵀx − n}`` with multiplier ``−1``
  (``∇_{y₂}f + λ∇_{y₂}h = 0``); the optimum is ``x* = −0.3·1``,
  ``y₁* = 0.7·1``, ``y₂* = −0.4·1``, ``F* = 5`` (for ``n = 100``). Project
  ``(x, y)`` onto the constraint with :func:`r7_projection`.

  The upper variable is ``x: [n]``; the lower one the tuple ``(y₁, y₂)`` of
  two ``[n]`` arrays. ``init`` is the official script's ``10·1`` for all
  three. ``hypergradient`` and ``lower_solution`` are ``None`` (set-valued
  lower level). No data: both batches are ``None``.

  Args:
    n: dimension of ``x``, ``y₁`` and ``y₂``.
    dtype: dtype of ``init`` and ``upper_optimum``.
  """
  ten = lambda: jnp.full([n], 10.0, dtype)  # distinct buffers, donatable.
  return ReferenceProblem(
      problem=Problem(_r7_outer, _r7_inner, _r7_constraints),
      init=Params(ten(), (ten(), ten())),
      batches=_batches(None, None),
      hypergradient=None,
      lower_solution=None,
      upper_optimum=jnp.full([n], -0.3, dtype))


def r7_projection(params: Params) -> Params:
  """Projects ``(x, (y₁, y₂))`` onto ``1ᵀx + 1ᵀy₁ + 1ᵀy₂ = 0`` (R7's ``C``).

  The hyperplane's normal is the all-ones vector, so the projection
  subtracts the mean of all ``3n`` entries from each.
  """
  leaves, treedef = jax.tree.flatten(params)
  mean = sum(jnp.sum(l) for l in leaves) / sum(l.size for l in leaves)
  return jax.tree.unflatten(treedef, [l - mean for l in leaves])


def _distance_outer(rho):
  def outer_loss(x, y, b):
    return (0.5 * jnp.sum((y - b["t"]) ** 2)
            + 0.5 * rho * jnp.sum((x - b["s"]) ** 2))
  return outer_loss


def _distance_inner(x, y, batch):
  del batch
  return 0.5 * jnp.sum((y - x) ** 2)


def _coupled_constraints(x, y, b):
  return jnp.atleast_1d(b["a"] @ y - b["c"] @ x - b["b"])


def coupled_equality(key, dim=5, rho=1.0,
                     dtype=jnp.float32) -> ReferenceProblem:
  """Projection onto a hyperplane that moves with ``x`` (coupled equality).

  ``y*(x) = argmin_y ½‖y − x‖² s.t. h(x, y) = aᵀy − cᵀx − b = 0
  = x − a(dᵀx − b)/‖a‖² =: Mx + m``, ``d = a − c``,
  ``M = I − adᵀ/‖a‖²``, ``m = ab/‖a‖²``, with multiplier
  ``λ*(x) = (dᵀx − b)/‖a‖²`` (``y − x + λa = 0``;
  :func:`coupled_equality_multiplier`). Upper level
  ``F = ½‖y − t‖² + (ρ/2)‖x − s‖²``: ``∇Φ(x) = Mᵀ(y*(x) − t) + ρ(x − s)``,
  ``x* = (MᵀM + ρI)⁻¹(Mᵀ(t − m) + ρs)``. Feasible set of ``(x, y)``:
  :func:`coupled_equality_projection`. ``x, y ∈ ℝᵈⁱᵐ``.

  Args:
    key: PRNG key.
    dim: dimension of ``x`` and ``y``.
    rho: weight ``ρ > 0`` of the upper regulariser.
    dtype: dtype of the data and of ``init``.
  """
  wide = _wide(dtype)
  ks = jax.random.split(key, 6)
  normal = lambda k, shape: jax.random.normal(k, shape, wide)
  unit = lambda k: (lambda v: v / jnp.linalg.norm(v))(normal(k, (dim,)))
  inner = _cast(dict(a=unit(ks[0]), c=0.5 * unit(ks[1]),
                     b=jnp.asarray(1.0, wide)), dtype)
  outer = _cast(dict(t=normal(ks[2], (dim,)), s=normal(ks[3], (dim,))), dtype)
  i, o = _cast(inner, wide), _cast(outer, wide)
  aa = i["a"] @ i["a"]
  m_mat = jnp.eye(dim, dtype=wide) - jnp.outer(i["a"], i["a"] - i["c"]) / aa
  m_vec = i["a"] * i["b"] / aa
  lower_solution = lambda x: m_mat @ x + m_vec
  x_star = jnp.linalg.solve(m_mat.T @ m_mat + rho * jnp.eye(dim, dtype=wide),
                            m_mat.T @ (o["t"] - m_vec) + rho * o["s"])
  return ReferenceProblem(
      problem=Problem(_distance_outer(rho), _distance_inner,
                      _coupled_constraints),
      init=Params(normal(ks[4], (dim,)).astype(dtype), jnp.zeros([dim], dtype)),
      batches=_batches(outer, inner),
      hypergradient=lambda x: (m_mat.T @ (lower_solution(x) - o["t"])
                               + rho * (x - o["s"])),
      lower_solution=lower_solution,
      upper_optimum=x_star.astype(dtype))


def coupled_equality_multiplier(inner_batch, x) -> jax.Array:
  """``λ*(x) = [(a − c)ᵀx − b]/‖a‖²``, ``[1]``, of :func:`coupled_equality`.

  The sign is that of ``∇_y f + λ∇_y h = 0``.
  """
  a, c, b = inner_batch["a"], inner_batch["c"], inner_batch["b"]
  return jnp.atleast_1d(((a - c) @ x - b) / (a @ a))


def coupled_equality_projection(inner_batch) -> Callable[[Params], Params]:
  """``Π_C`` onto ``{(x, y): aᵀy − cᵀx = b}`` of :func:`coupled_equality`."""
  a, c, b = inner_batch["a"], inner_batch["c"], inner_batch["b"]

  def projection(params: Params) -> Params:
    x, y = params
    step = (a @ y - c @ x - b) / (a @ a + c @ c)
    return Params(x + step * c, y - step * a)

  return projection


def halfspace(key, dim=5, rho=1.0, dtype=jnp.float32) -> ReferenceProblem:
  """Projection onto a halfspace; the constraint is active at the optimum.

  ``y*(x) = argmin_y ½‖y − x‖² s.t. g(y) = aᵀy − b ≤ 0
  = x − a·max(0, aᵀx − b)/‖a‖²``, multiplier
  ``λ*(x) = max(0, aᵀx − b)/‖a‖²`` (:func:`halfspace_multiplier`). Upper
  level ``F = ½‖y − t‖² + (ρ/2)‖x − s‖²`` with ``aᵀs > b``, ``aᵀt > b``
  (``b`` is set so): the stationary point of the inactive piece lies in the
  active region, so the optimum is that of the active piece,
  ``x* = s + P(t − s)/(1 + ρ)``, ``P = I − aaᵀ/‖a‖²``, where the constraint
  is active with ``λ* = (aᵀs − b)/‖a‖² > 0``. ``∇Φ(x) = J(x)(y*(x) − t)
  + ρ(x − s)``, ``J = P`` where ``aᵀx > b``, else ``I``. Feasible set of
  ``y``: :func:`halfspace_projection`. ``x, y ∈ ℝᵈⁱᵐ``.

  Args:
    key: PRNG key.
    dim: dimension of ``x`` and ``y``.
    rho: weight ``ρ > 0`` of the upper regulariser.
    dtype: dtype of the data and of ``init``.
  """
  wide = _wide(dtype)
  ka, kt, ks, kx = jax.random.split(key, 4)
  a = jax.random.normal(ka, (dim,), wide)
  a = a / jnp.linalg.norm(a)
  outer = _cast(dict(t=jax.random.normal(kt, (dim,), wide),
                     s=jax.random.normal(ks, (dim,), wide)), dtype)
  o = _cast(outer, wide)
  b = jnp.minimum(a @ o["t"], a @ o["s"]) - 0.5
  inner = _cast(dict(a=a, b=b), dtype)
  a, b = _cast((inner["a"], inner["b"]), wide)
  p_mat = jnp.eye(dim, dtype=wide) - jnp.outer(a, a) / (a @ a)
  lower_solution = lambda x: x - a * jnp.maximum(a @ x - b, 0) / (a @ a)

  def hypergradient(x):
    residual = lower_solution(x) - o["t"]
    active = a @ x > b
    return (jnp.where(active, p_mat @ residual, residual)
            + rho * (x - o["s"]))

  return ReferenceProblem(
      problem=Problem(_distance_outer(rho), _distance_inner,
                      lambda x, y, b: jnp.atleast_1d(b["a"] @ y - b["b"])),
      init=Params(jax.random.normal(kx, (dim,), wide).astype(dtype),
                  jnp.zeros([dim], dtype)),
      batches=_batches(outer, inner),
      hypergradient=hypergradient,
      lower_solution=lower_solution,
      upper_optimum=(o["s"] + p_mat @ (o["t"] - o["s"]) / (1 + rho)).astype(
          dtype))


def halfspace_multiplier(inner_batch, x) -> jax.Array:
  """``λ*(x) = max(0, aᵀx − b)/‖a‖²``, ``[1]``, of :func:`halfspace`."""
  a, b = inner_batch["a"], inner_batch["b"]
  return jnp.atleast_1d(jnp.maximum(a @ x - b, 0) / (a @ a))


def halfspace_projection(inner_batch) -> Callable[[Params], Params]:
  """``Π_C`` of :func:`halfspace`: ``y`` onto ``{aᵀy ≤ b}``, ``x`` free."""
  a, b = inner_batch["a"], inner_batch["b"]

  def projection(params: Params) -> Params:
    x, y = params
    return Params(x, y - a * jnp.maximum(a @ y - b, 0) / (a @ a))

  return projection


def _masked_squared_loss(m, theta, batch):
  x, y = batch
  return 0.5 * jnp.sum((x @ (m * theta) - y) ** 2)


def masked_regression(key, n=40, dim=16, k=4, gamma=0.1,
                      dtype=jnp.float32) -> ReferenceProblem:
  """R5's support recovery: BiP on a masked linear regression.

  ``ℓ(z) = ½‖Xz − y‖²`` with ``X: [n, dim]`` orthonormal columns and
  ``y = Xθ°``, ``θ°`` ``k``-sparse (magnitudes in ``[1, 2]``). Both losses are
  ``ℓ(m ⊙ θ)`` (upper = mask ``m``, lower = weights ``θ``); the lower level is
  ridge-regularised by the solver, ``g = ℓ(m ⊙ θ) + (γ/2)‖θ‖²`` (BiP adds
  ``γθ`` itself). Then ``θ*(m) = m ⊙ θ°/(m² + γ)``,
  ``Φ(m) = ½Σ θ°ᵢ² γ²/(mᵢ² + γ)²``,
  ``∇Φ(m) = −2γ² θ°² ⊙ m/(m² + γ)³``, and over the capped simplex
  ``{m ∈ [0, 1]ᵈ, 1ᵀm ≤ k}`` the optimum is the support mask
  ``x* = 1[θ° ≠ 0]``. ``init`` is the uniform mask ``k/(2·dim)`` with
  ``θ = 0``.
  """
  wide = _wide(dtype)
  keys = jax.random.split(key, 2)
  x, _ = jnp.linalg.qr(jax.random.normal(keys[0], (n, dim), wide))
  support = jax.random.choice(keys[1], dim, (k,), replace=False)
  theta0 = jnp.zeros(dim, wide).at[support].set(
      jnp.linspace(1.0, 2.0, k, dtype=wide))
  batch = _cast((x, x @ theta0), dtype)
  return ReferenceProblem(
      problem=Problem(_masked_squared_loss, _masked_squared_loss),
      init=Params(jnp.full([dim], 0.5 * k / dim, dtype),
                  jnp.zeros([dim], dtype)),
      batches=_batches(batch, batch),
      hypergradient=lambda m: (-2 * gamma ** 2 * theta0 ** 2 * m
                               / (m ** 2 + gamma) ** 3).astype(dtype),
      lower_solution=lambda m: (m * theta0 / (m ** 2 + gamma)).astype(dtype),
      upper_optimum=(theta0 != 0).astype(dtype))
