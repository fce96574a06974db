"""Betty worker of the peers benchmark.

Two ``ImplicitProblem``s: ``outer`` holds the logits ``c`` (Adam), ``inner``
the net (SGD, ``unroll_steps = K``); the hypergradient method is the inner
problem's ``config.type``: ``darts`` (Betty's finite-difference
``H⁻¹ ≈ I``), ``neumann`` (10 iterations, ``alpha = lr``) or ``cg`` (10
iterations). One outer step is ``K`` engine train steps (the outer problem
steps after the ``K``-th inner one).
"""

import importlib.metadata

import torch
from betty import configs
from betty import engine as engine_lib
from betty.problems import ImplicitProblem
from torch import nn

from experiments.benchmarks.peers import torch_common, worker_loop

METHODS = ("darts", "neumann", "cg")


class _Weights(nn.Module):

  def __init__(self, n):
    super().__init__()
    self.c = nn.Parameter(torch.zeros(n))

  def forward(self):
    return torch.sigmoid(self.c)


class _Outer(ImplicitProblem):

  def training_step(self, batch):
    x, y = batch
    return torch.nn.functional.cross_entropy(self.inner(x), y)


class _Inner(ImplicitProblem):

  def training_step(self, batch):
    x, y = batch
    return torch_common.weighted_ce(self.outer(), self.module(x), y)


def build(spec) -> worker_loop.System:
  """The Betty system of ``spec``."""
  method, k, lr = spec["method"], spec["k"], spec["lr"]
  if method not in METHODS:
    raise ValueError(f"unknown Betty method {method!r}; valid: {METHODS}")
  data = torch_common.Data(spec)
  weights, net = _Weights(data.num_train), torch_common.Net(data)
  outer = _Outer(
      name="outer", module=weights, device="cpu",
      optimizer=torch.optim.Adam(weights.parameters(), lr=spec["outer_lr"]),
      train_data_loader=[(data.val_x, data.val_y)],
      config=configs.Config(type=method))
  inner = _Inner(
      name="inner", module=net, device="cpu",
      optimizer=torch.optim.SGD(net.parameters(), lr=lr),
      train_data_loader=[(data.train_x, data.train_y)],
      config=configs.Config(type=method, unroll_steps=k,
                            neumann_iterations=10, neumann_alpha=lr,
                            cg_iterations=10))
  engine = engine_lib.Engine(
      problems=[outer, inner],
      config=configs.EngineConfig(train_iters=10**9, valid_step=10**9),
      dependencies={"u2l": {outer: [inner]}, "l2u": {inner: [outer]}})
  engine.train()

  def step():
    for _ in range(k):
      engine.global_step += 1
      engine.train_step()

  return torch_common.system(
      step, lambda: weights.c,
      f"Betty {importlib.metadata.version('betty-ml')}, "
      f"PyTorch {torch.__version__}")


if __name__ == "__main__":
  worker_loop.serve(worker_loop.read_spec(), build)
