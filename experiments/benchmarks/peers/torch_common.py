"""What the PyTorch workers share: the net, the losses, threads, flop count.

Imported only by the torch workers (torch is the optional ``peers`` extra).
"""

import os

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch.utils import flop_counter

from experiments.benchmarks.peers import hlo, worker_loop


class Data:
  """The shared data and initial weights as torch tensors."""

  def __init__(self, spec):
    torch.set_num_threads(spec["threads"])
    arrays = worker_loop.load_problem(spec)
    t = lambda k: torch.from_numpy(np.ascontiguousarray(arrays[k]))
    self.train_x, self.val_x = t("train_x"), t("val_x")
    self.train_y = t("train_y").long()
    self.val_y = t("val_y").long()
    # torch's Linear holds [out, in]; the .npz holds JAX's [in, out].
    self.weights = [t("w1").T.contiguous(), t("b1"), t("w2").T.contiguous(),
                    t("b2")]
    self.num_train = len(self.train_y)


def logits(w, x):
  """The 2-layer ReLU MLP as a function of ``w = [W1, b1, W2, b2]``."""
  return F.linear(F.relu(F.linear(x, w[0], w[1])), w[2], w[3])


def inner_loss(c, w, data: Data):
  """``mean_i σ(c_i)·CE_i`` on the noisy training set."""
  ce = F.cross_entropy(logits(w, data.train_x), data.train_y,
                       reduction="none")
  return torch.mean(torch.sigmoid(c) * ce)


def outer_loss(w, data: Data):
  """Mean validation cross-entropy."""
  return F.cross_entropy(logits(w, data.val_x), data.val_y)


class Net(nn.Module):
  """The same MLP as an ``nn.Module`` (for TorchOpt and Betty)."""

  def __init__(self, data: Data):
    super().__init__()
    self.fc1 = nn.Linear(*data.weights[0].T.shape)
    self.fc2 = nn.Linear(*data.weights[2].T.shape)
    with torch.no_grad():
      for p, w in zip(self.parameters(), data.weights):
        p.copy_(w)

  def forward(self, x):
    return self.fc2(F.relu(self.fc1(x)))


def weighted_ce(weights, out, y):
  """``mean_i weights_i · CE(out_i, y_i)``."""
  return torch.mean(weights * F.cross_entropy(out, y, reduction="none"))


def system(step, upper, name: str) -> worker_loop.System:
  """Wraps ``step`` so its first call (a warm-up) counts the matmul flops."""
  info = {"version": name, "threads": (
      f"torch {torch.get_num_threads()} intra-op threads, "
      f"{len(os.sched_getaffinity(0))} CPUs by affinity")}

  def counted_step():
    if "matmul_work" in info:
      step()
      return
    with flop_counter.FlopCounterMode(display=False) as counter:
      step()
    info["matmul_work"] = counter.get_total_flops() / hlo.UNIT_FLOPS

  return worker_loop.System(
      counted_step, lambda: upper().detach().double().numpy().copy(), info)
