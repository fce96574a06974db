"""Hand-written PyTorch worker of the peers benchmark.

Methods (``K`` inner SGD steps from the current lower weights, then one
hypergradient, then Adam on ``c``):

* ``unrolled``: the ``K`` steps built with ``create_graph``, backprop to
  ``c`` through them.
* ``cg``: IFT with exactly 10 CG iterations on ``H q = ∇_y F``.
* ``identity``: ``H⁻¹ ≈ lr·I`` ("darts"): ``q = lr·∇_y F``, one mixed VJP.
* ``neumann``: ``q = lr·Σ_{k<10} (I − lr·H)^k ∇_y F`` (9 Hessian-vector
  products), the same series as ``bilevel.solve_neumann(step=lr,
  maxiter=10)``.

The hypergradient is ``−(∂_c ∇_y f)ᵀ q`` (``F`` does not see ``c``).
"""

import torch

from experiments.benchmarks.peers import torch_common, worker_loop

METHODS = ("unrolled", "cg", "identity", "neumann")


def _dot(a, b):
  return sum(torch.sum(x * y) for x, y in zip(a, b))


def _cg(hvp, b, iterations):
  x = [torch.zeros_like(v) for v in b]
  r = [v.clone() for v in b]
  p = [v.clone() for v in b]
  rr = _dot(r, r)
  for _ in range(iterations):
    ap = hvp(p)
    alpha = rr / _dot(p, ap)
    x = [xi + alpha * pi for xi, pi in zip(x, p)]
    r = [ri - alpha * ai for ri, ai in zip(r, ap)]
    rr_new = _dot(r, r)
    p = [ri + (rr_new / rr) * pi for ri, pi in zip(r, p)]
    rr = rr_new
  return x


def _neumann(hvp, b, lr, terms):
  term, total = b, list(b)
  for _ in range(terms - 1):
    term = [t - lr * h for t, h in zip(term, hvp(term))]
    total = [s + t for s, t in zip(total, term)]
  return [lr * s for s in total]


def build(spec) -> worker_loop.System:
  """The hand-written system of ``spec``."""
  method, k, lr = spec["method"], spec["k"], spec["lr"]
  if method not in METHODS:
    raise ValueError(f"unknown torch method {method!r}; valid: {METHODS}")
  data = torch_common.Data(spec)
  c = torch.zeros(data.num_train, requires_grad=True)
  opt = torch.optim.Adam([c], lr=spec["outer_lr"])
  state = {"w": [w.clone() for w in data.weights]}

  def inner(w, c_in, create_graph):
    w = [wi.detach().requires_grad_() for wi in w]
    for _ in range(k):
      g = torch.autograd.grad(torch_common.inner_loss(c_in, w, data), w,
                              create_graph=create_graph)
      if create_graph:
        w = [wi - lr * gi for wi, gi in zip(w, g)]
      else:
        with torch.no_grad():
          w = [(wi - lr * gi).requires_grad_() for wi, gi in zip(w, g)]
    return w

  def unrolled_step():
    w = inner(state["w"], c, create_graph=True)
    hyper, = torch.autograd.grad(torch_common.outer_loss(w, data), c)
    state["w"] = [wi.detach() for wi in w]
    return hyper

  def implicit_step():
    w = inner(state["w"], c.detach(), create_graph=False)
    v = torch.autograd.grad(torch_common.outer_loss(w, data), w)
    g = torch.autograd.grad(torch_common.inner_loss(c, w, data), w,
                            create_graph=True)
    hvp = lambda p: torch.autograd.grad(g, w, p, retain_graph=True)
    if method == "cg":
      q = _cg(hvp, v, 10)
    elif method == "neumann":
      q = _neumann(hvp, v, lr, 10)
    else:
      q = [lr * vi for vi in v]
    mixed, = torch.autograd.grad(g, c, q)
    state["w"] = [wi.detach() for wi in w]
    return -mixed

  hypergradient = unrolled_step if method == "unrolled" else implicit_step

  def step():
    c.grad = hypergradient()
    opt.step()

  return torch_common.system(step, lambda: c,
                             f"PyTorch {torch.__version__}")


if __name__ == "__main__":
  worker_loop.serve(worker_loop.read_spec(), build)
