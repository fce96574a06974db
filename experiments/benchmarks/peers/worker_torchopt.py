"""TorchOpt worker of the peers benchmark.

* ``unrolled``: ``torchopt.MetaSGD`` on the net, ``K`` differentiable
  steps, ``torch.autograd.grad`` of the validation loss to ``c``, then
  ``torchopt.stop_gradient`` (the lower level continues from ``y_K``).
* ``cg``: an ``ImplicitMetaGradientModule`` whose ``solve`` runs ``K`` SGD
  steps, the adjoint by ``torchopt.linear_solve.solve_cg(maxiter=10,
  rtol=0, atol=0)`` (exactly 10 iterations).
"""

import torch
import torchopt

from experiments.benchmarks.peers import torch_common, worker_loop

METHODS = ("unrolled", "cg")


def _unrolled(data, c, k, lr):
  net = torch_common.Net(data)
  inner_opt = torchopt.MetaSGD(net, lr=lr)

  def hypergradient():
    for _ in range(k):
      inner_opt.step(torch_common.weighted_ce(
          torch.sigmoid(c), net(data.train_x), data.train_y))
    loss = torch.nn.functional.cross_entropy(net(data.val_x), data.val_y)
    hyper, = torch.autograd.grad(loss, c)
    torchopt.stop_gradient(net)
    torchopt.stop_gradient(inner_opt)
    return hyper

  return hypergradient


def _implicit(data, c, k, lr):
  solver = torchopt.linear_solve.solve_cg(maxiter=10, rtol=0.0, atol=0.0)

  class Inner(torchopt.nn.ImplicitMetaGradientModule, linear_solve=solver):
    """The lower level; ``c`` is its meta-parameter."""

    def __init__(self, meta_c):
      super().__init__()
      self.c = meta_c
      self.net = torch_common.Net(data)

    def forward(self, x):
      return self.net(x)

    def objective(self, x, y):
      return torch_common.weighted_ce(torch.sigmoid(self.c), self.net(x), y)

    def solve(self, x, y):
      params = tuple(self.parameters())
      with torch.enable_grad():
        for _ in range(k):
          grads = torch.autograd.grad(self.objective(x, y), params)
          with torch.no_grad():
            for p, g in zip(params, grads):
              p.sub_(lr * g)
      return self

  inner = Inner(c)

  def hypergradient():
    inner.solve(data.train_x, data.train_y)
    loss = torch.nn.functional.cross_entropy(inner(data.val_x), data.val_y)
    hyper, = torch.autograd.grad(loss, c)
    return hyper

  return hypergradient


def build(spec) -> worker_loop.System:
  """The TorchOpt system of ``spec``."""
  method = spec["method"]
  if method not in METHODS:
    raise ValueError(f"unknown TorchOpt method {method!r}; valid: {METHODS}")
  data = torch_common.Data(spec)
  c = torch.zeros(data.num_train, requires_grad=True)
  opt = torch.optim.Adam([c], lr=spec["outer_lr"])
  make = _unrolled if method == "unrolled" else _implicit
  hypergradient = make(data, c, spec["k"], spec["lr"])

  def step():
    c.grad = hypergradient()
    opt.step()

  return torch_common.system(
      step, lambda: c,
      f"TorchOpt {torchopt.__version__}, PyTorch {torch.__version__}")


if __name__ == "__main__":
  worker_loop.serve(worker_loop.read_spec(), build)
