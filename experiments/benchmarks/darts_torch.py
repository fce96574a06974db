r"""A PyTorch DARTS / PC-DARTS search network and its three search steps.

The baseline that ``darts_step`` times next to ours, written to do the same
arithmetic as the official search code (quark0/darts ``cnn/model_search.py``,
``cnn/architect.py``; yuhuixu1993/PC-DARTS ``model_search.py``) on the
current PyTorch, NCHW: the 8 candidate operations of every one of the 14
edges of a cell are computed (``none`` as a multiplication by 0), every BN of
the search is non-affine except the stem's, PC-DARTS runs the mixed op on the
first ``C/K`` channels, concatenates the rest (max-pooled 2×2 on stride-2
edges), shuffles ``K`` channel groups and weighs each node's incoming edges
by ``softmax(β)``. Parameter counts equal the official ones (asserted by
:func:`check_counts`).

The steps (:class:`Search`), as the official ``train_search.py`` calls them:

* weight step: ``L_train.backward()``, clip the weights' gradient norm to 5,
  SGD (lr 0.025, momentum 0.9, weight decay 3e-4);
* architecture step, first order: ``L_val.backward()`` (as the official code,
  which also fills the weights' gradients; ``alpha_only=True`` asks
  ``autograd.grad`` for ``∇_α`` alone), clip to 10, Adam (3e-4, betas
  (0.5, 0.999), weight decay 1e-3);
* architecture step, second order: the virtual step ``w′ = w − ξ(μm +
  ∇_w L_train + λw)`` (``m`` the SGD momentum buffer), ``∇_α L_val(w′)`` and
  ``v = ∇_{w′} L_val(w′)`` from one backward pass, then ``∇_α L_train`` at
  ``w ± εv``, ``ε = 0.01/‖v‖`` (central difference), ``d_α = ∇_α L_val(w′) −
  ξ(g⁺ − g⁻)/(2ε)``, clip, Adam. ``L_val(w′)`` is evaluated with
  ``torch.func.functional_call`` instead of a rebuilt network (the official
  code builds a fresh ``Network`` every step, which is slower), so these
  times are a lower bound for the official step.

Architecture logits live outside ``parameters()`` (as in the official
code), so ``net.parameters()`` are exactly the weights.
"""

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from experiments.benchmarks.darts_step import (
    ARCH_B1,
    ARCH_CLIP,
    ARCH_LR,
    ARCH_WEIGHT_DECAY,
    GRAD_CLIP,
    LR,
    MOMENTUM,
    OFFICIAL_COUNTS,
    WEIGHT_DECAY,
)

PRIMITIVES = ("none", "max_pool_3x3", "avg_pool_3x3", "skip_connect",
              "sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5")
STEPS = 4
NUM_EDGES = sum(2 + j for j in range(STEPS))
FD_SCALE = 1e-2


def _bn(c: int) -> nn.BatchNorm2d:
  return nn.BatchNorm2d(c, affine=False)


def _relu_dw_pw_bn(c: int, kernel: int, stride: int, dilation: int
                   ) -> nn.Sequential:
  """ReLU, depthwise ``k×k`` (stride, dilation), pointwise 1×1, BN."""
  return nn.Sequential(
      nn.ReLU(),
      nn.Conv2d(c, c, kernel, stride, dilation * (kernel - 1) // 2, dilation,
                groups=c, bias=False),
      nn.Conv2d(c, c, 1, bias=False), _bn(c))


class _Zero(nn.Module):

  def __init__(self, stride: int):
    super().__init__()
    self.stride = stride

  def forward(self, x):
    return x[:, :, ::self.stride, ::self.stride].mul(0.0)


class _Reduce(nn.Module):
  """ReLU, two 1×1 stride-2 convs (the second one pixel shifted), BN."""

  def __init__(self, c_in: int, c_out: int):
    super().__init__()
    self.a = nn.Conv2d(c_in, c_out // 2, 1, 2, bias=False)
    self.b = nn.Conv2d(c_in, c_out // 2, 1, 2, bias=False)
    self.bn = _bn(c_out)

  def forward(self, x):
    x = F.relu(x)
    return self.bn(torch.cat([self.a(x), self.b(x[:, :, 1:, 1:])], 1))


def make_op(name: str, c: int, stride: int) -> nn.Module:
  """The search-network operation ``name`` on ``c`` channels."""
  if name == "none":
    return _Zero(stride)
  if name == "max_pool_3x3":
    return nn.Sequential(nn.MaxPool2d(3, stride, 1), _bn(c))
  if name == "avg_pool_3x3":
    return nn.Sequential(
        nn.AvgPool2d(3, stride, 1, count_include_pad=False), _bn(c))
  if name == "skip_connect":
    return nn.Identity() if stride == 1 else _Reduce(c, c)
  kind, size = name.rsplit("_", 1)
  kernel = int(size[0])
  if kind == "sep_conv":
    return nn.Sequential(_relu_dw_pw_bn(c, kernel, stride, 1),
                         _relu_dw_pw_bn(c, kernel, 1, 1))
  if kind == "dil_conv":
    return _relu_dw_pw_bn(c, kernel, stride, 2)
  raise ValueError(f"unknown operation {name!r}; valid: {PRIMITIVES}")


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
  b, c, h, w = x.shape
  return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(
      b, c, h, w)


class MixedEdge(nn.Module):
  """``Σ_o softmax(α)_o o(x)``; with ``k > 1`` on the first ``C/k`` channels,
  the rest appended (pooled at stride 2) and ``k`` groups shuffled."""

  def __init__(self, c: int, stride: int, k: int):
    super().__init__()
    self.k = k
    self.ops = nn.ModuleList(make_op(p, c // k, stride) for p in PRIMITIVES)

  def forward(self, x, weights):
    part = x[:, :x.shape[1] // self.k] if self.k > 1 else x
    y = sum(w * op(part) for w, op in zip(weights, self.ops))
    if self.k == 1:
      return y
    rest = x[:, x.shape[1] // self.k:]
    if y.shape[2] != x.shape[2]:
      rest = F.max_pool2d(rest, 2, 2)
    return channel_shuffle(torch.cat([y, rest], 1), self.k)


def _preprocess(c_in: int, c_out: int) -> nn.Sequential:
  return nn.Sequential(nn.ReLU(), nn.Conv2d(c_in, c_out, 1, bias=False),
                       _bn(c_out))


class Cell(nn.Module):
  """Two preprocessed inputs, 4 nodes over 14 mixed edges, concat of 4."""

  def __init__(self, c_pp: int, c_p: int, c: int, reduction: bool,
               reduction_prev: bool, k: int):
    super().__init__()
    self.reduction = reduction
    self.pre0 = _Reduce(c_pp, c) if reduction_prev else _preprocess(c_pp, c)
    self.pre1 = _preprocess(c_p, c)
    self.edges = nn.ModuleList(
        MixedEdge(c, 2 if reduction and i < 2 else 1, k)
        for node in range(STEPS) for i in range(2 + node))

  def forward(self, s0, s1, op_weights, edge_weights):
    states, e = [self.pre0(s0), self.pre1(s1)], 0
    for _ in range(STEPS):
      terms = []
      for h in states:
        y = self.edges[e](h, op_weights[e])
        terms.append(y if edge_weights is None else edge_weights[e] * y)
        e += 1
      states.append(sum(terms))
    return torch.cat(states[2:], 1)


def _node_softmax(betas: torch.Tensor) -> torch.Tensor:
  """``softmax(β)`` within each node's incoming edges (2, 3, 4, 5)."""
  sizes = [2 + j for j in range(STEPS)]
  return torch.cat([F.softmax(b, -1) for b in torch.split(betas, sizes)])


class SearchNetwork(nn.Module):
  """The supernet: stem, ``layers`` cells (reductions at L/3, 2L/3), head.

  ``k`` is PC-DARTS's ``K`` (with edge normalisation), None for DARTS.
  ``arch`` holds the logits (``alphas_normal``, ``alphas_reduce`` and for
  PC-DARTS ``betas_*``), not registered as parameters.
  """

  def __init__(self, c: int = 16, layers: int = 8, k: int | None = None,
               num_classes: int = 10, stem_multiplier: int = 3):
    super().__init__()
    c_stem = stem_multiplier * c
    self.stem = nn.Sequential(nn.Conv2d(3, c_stem, 3, padding=1, bias=False),
                              nn.BatchNorm2d(c_stem))
    c_pp, c_p, cur, reduction_prev, cells = c_stem, c_stem, c, False, []
    for i in range(layers):
      reduction = i in (layers // 3, 2 * layers // 3)
      cur = 2 * cur if reduction else cur
      cells.append(Cell(c_pp, c_p, cur, reduction, reduction_prev, k or 1))
      c_pp, c_p, reduction_prev = c_p, STEPS * cur, reduction
    self.cells = nn.ModuleList(cells)
    self.classifier = nn.Linear(c_p, num_classes)
    logits = lambda *shape: (1e-3 * torch.randn(*shape)).requires_grad_()
    self.arch = {f"alphas_{kind}": logits(NUM_EDGES, len(PRIMITIVES))
                 for kind in ("normal", "reduce")}
    if k is not None:
      self.arch.update({f"betas_{kind}": logits(NUM_EDGES)
                        for kind in ("normal", "reduce")})

  def arch_parameters(self) -> list[torch.Tensor]:
    return list(self.arch.values())

  def forward(self, x):
    weights = {}
    for kind in ("normal", "reduce"):
      betas = self.arch.get(f"betas_{kind}")
      weights[kind] = (F.softmax(self.arch[f"alphas_{kind}"], -1),
                       None if betas is None else _node_softmax(betas))
    s0 = s1 = self.stem(x)
    for cell in self.cells:
      s0, s1 = s1, cell(s0, s1, *weights["reduce" if cell.reduction
                                          else "normal"])
    return self.classifier(s1.mean((2, 3)))


def check_counts(net: SearchNetwork, k: int | None) -> None:
  """Asserts the official parameter counts (C = 16, 8 cells only)."""
  got = (sum(p.numel() for p in net.parameters()),
         sum(a.numel() for a in net.arch_parameters()))
  if got != OFFICIAL_COUNTS[k]:
    raise AssertionError(f"(weights, arch) = {got}, official "
                         f"{OFFICIAL_COUNTS[k]} (K={k})")


def _global_norm(tensors) -> torch.Tensor:
  return torch.sqrt(sum(torch.sum(t * t) for t in tensors))


class Search:
  """The official search's optimizers and its three steps on ``net``."""

  def __init__(self, net: SearchNetwork):
    self.net = net
    self.weights = list(net.parameters())
    self.names = [n for n, _ in net.named_parameters()]
    self.w_opt = torch.optim.SGD(self.weights, LR, momentum=MOMENTUM,
                                 weight_decay=WEIGHT_DECAY)
    self.a_opt = torch.optim.Adam(net.arch_parameters(), ARCH_LR,
                                  betas=(ARCH_B1, 0.999),
                                  weight_decay=ARCH_WEIGHT_DECAY)

  def loss(self, x, y, weights=None):
    if weights is None:
      logits = self.net(x)
    else:
      logits = torch.func.functional_call(
          self.net, dict(zip(self.names, weights)), (x,))
    return F.cross_entropy(logits, y)

  def weight_step(self, x, y) -> None:
    self.w_opt.zero_grad()
    self.loss(x, y).backward()
    nn.utils.clip_grad_norm_(self.weights, GRAD_CLIP)
    self.w_opt.step()

  def _arch_update(self, grads) -> None:
    for a, g in zip(self.net.arch_parameters(), grads):
      a.grad = g
    nn.utils.clip_grad_norm_(self.net.arch_parameters(), ARCH_CLIP)
    self.a_opt.step()

  def arch_step_first(self, x_val, y_val, alpha_only: bool = False) -> None:
    self.a_opt.zero_grad()
    loss = self.loss(x_val, y_val)
    if alpha_only:
      grads = torch.autograd.grad(loss, self.net.arch_parameters())
    else:  # the official _backward_step: weights' gradients too
      loss.backward()
      grads = [a.grad for a in self.net.arch_parameters()]
    self._arch_update(grads)

  def _virtual_weights(self, x, y, xi):
    grads = torch.autograd.grad(self.loss(x, y), self.weights)
    virtual = []
    with torch.no_grad():
      for w, g in zip(self.weights, grads):
        buf = self.w_opt.state.get(w, {}).get("momentum_buffer")
        step = g + WEIGHT_DECAY * w
        if buf is not None:
          step = step + MOMENTUM * buf
        virtual.append((w - xi * step).requires_grad_())
    return virtual

  def _fd_mixed_hvp(self, v, x, y):
    """``∇²_{α,w} L_train(w) v`` by the central difference at ``w ± εv``."""
    eps = FD_SCALE / _global_norm(v)
    arch = self.net.arch_parameters()

    def shift(scale):
      with torch.no_grad():
        for w, d in zip(self.weights, v):
          w.add_(d, alpha=float(scale))

    shift(eps)
    plus = torch.autograd.grad(self.loss(x, y), arch)
    shift(-2 * eps)
    minus = torch.autograd.grad(self.loss(x, y), arch)
    shift(eps)
    return [(p - m) / (2 * eps) for p, m in zip(plus, minus)]

  def arch_step_second(self, x_train, y_train, x_val, y_val,
                       xi: float = LR) -> None:
    self.a_opt.zero_grad()
    virtual = self._virtual_weights(x_train, y_train, xi)
    arch = self.net.arch_parameters()
    grads = torch.autograd.grad(self.loss(x_val, y_val, virtual),
                                arch + virtual)
    d_alpha, v = grads[:len(arch)], grads[len(arch):]
    product = self._fd_mixed_hvp(v, x_train, y_train)
    self._arch_update([g - xi * h for g, h in zip(d_alpha, product)])


def build(c: int, layers: int, k: int | None, threads: int,
          seed: int = 0) -> Search:
  """A seeded network and its search, ``torch.set_num_threads(threads)``."""
  torch.set_num_threads(threads)
  torch.manual_seed(seed)
  net = SearchNetwork(c, layers, k)
  if (c, layers) == (16, 8):
    check_counts(net, k)
  return Search(net)


def steps(search: Search, data: dict[str, np.ndarray]
          ) -> dict[str, Callable[[], None]]:
  """One call of each step on ``data`` (``darts_step.batches``, NCHW).

  ``arch1_alpha`` is the first-order step with ``∇_α`` alone.
  """
  x_t, x_v = (torch.from_numpy(data[k]) for k in ("x_train", "x_val"))
  y_t, y_v = (torch.from_numpy(data[k]).long() for k in ("y_train", "y_val"))
  return {
      "weight": lambda: search.weight_step(x_t, y_t),
      "arch1": lambda: search.arch_step_first(x_v, y_v),
      "arch2": lambda: search.arch_step_second(x_t, y_t, x_v, y_v),
      "arch1_alpha": lambda: search.arch_step_first(x_v, y_v, True),
  }
