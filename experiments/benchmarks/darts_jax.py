r"""Our DARTS / PC-DARTS search steps, compiled, for :mod:`darts_step`.

The supernet ``models.darts.SearchNetwork`` split into ``Params(α, w)`` and
the BatchNorm statistics (``rest``, held fixed: the losses run BN in train
mode and drop the updated running averages, as ``bip_step`` does — they do
not change the cost). The losses are the mean cross-entropy on a batch; the
optimizers are the official search's (``train_search.py`` defaults):

* weight: ``clip_by_global_norm(5)``, weight decay 3e-4, SGD(0.025,
  momentum 0.9);
* architecture: ``clip_by_global_norm(10)`` (as ``architect.step``), weight
  decay 1e-3, Adam(3e-4, b1 = 0.5, b2 = 0.999).

Steps (each ``jax.jit`` with its params and optimizer state donated, each
on its own copy of the arrays):

* ``weight``: ``∇_w L_train(w, α)`` + the weight optimizer;
* ``arch1``: ``∇_α L_val(w, α)`` + the architecture optimizer;
* ``arch2``: the upper direction of ``bilevel.scale_by_darts(2,
  hvp="finite_difference")`` (ξ = 0.025 and the virtual weight decay 3e-4)
  + the architecture optimizer — the official ``_backward_step_unrolled``'s
  work (its weight direction is dropped);
* ``fused``: ``bilevel.make_step(bilevel.darts(2, ...))``, both directions
  and both updates.
"""

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import bilevel
from experiments.benchmarks import darts_step
from models import darts
from models.darts import functional
from models.levels import ArchParam, merge_levels, split_levels


@dataclasses.dataclass
class Step:
  """A compiled step: ``run()`` calls it once (synchronised), threading the
  donated outputs into the next call; ``xla_bytes`` is its
  ``memory_analysis()`` peak (arguments + outputs − aliased + temporaries).
  """
  run: Callable[[], Any]
  compile_s: float
  xla_bytes: int


def weight_optimizer() -> optax.GradientTransformation:
  return optax.chain(optax.clip_by_global_norm(darts_step.GRAD_CLIP),
                     optax.add_decayed_weights(darts_step.WEIGHT_DECAY),
                     optax.sgd(darts_step.LR, momentum=darts_step.MOMENTUM))


def arch_optimizer() -> optax.GradientTransformation:
  return optax.chain(optax.clip_by_global_norm(darts_step.ARCH_CLIP),
                     optax.add_decayed_weights(darts_step.ARCH_WEIGHT_DECAY),
                     optax.adam(darts_step.ARCH_LR, b1=darts_step.ARCH_B1,
                                b2=0.999))


def supernet(k: int | None, shape) -> tuple[Callable, bilevel.Params]:
  """``(loss(α, w, batch), Params(α, w))`` of the seeded supernet."""
  config = darts.SearchConfig(channels=shape.channels,
                              num_cells=shape.num_cells, partial_channels=k)
  graphdef, params, rest = split_levels(
      darts.SearchNetwork(config, rngs=nnx.Rngs(0)), ArchParam)
  if (shape.channels, shape.num_cells) == (16, 8):
    size = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
    counts = (size(params.lower), size(params.upper))
    if counts != darts_step.OFFICIAL_COUNTS[k]:
      raise AssertionError(f"(weights, arch) = {counts}, official "
                           f"{darts_step.OFFICIAL_COUNTS[k]} (K={k})")

  def loss(alpha, w, batch):
    net = merge_levels(graphdef, bilevel.Params(alpha, w), rest)
    with functional.kernels(shape.kernels):
      logits = net(batch["x"], train=True)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, batch["y"]).mean()

  return loss, params


def step_functions(loss, params, batches):
  """``{name: (jitted fn, args)}`` of the four steps on ``loss(α, w,
  batch)``; a call's outputs ``[:2]`` replace its ``args[:2]``."""
  alpha, w = params.upper, params.lower
  w_opt, a_opt = weight_optimizer(), arch_optimizer()
  copy = lambda tree: jax.tree.map(jnp.copy, tree)
  jit = lambda fn: jax.jit(fn, donate_argnums=(0, 1))

  def weight(w, state, alpha, batch):
    grads = jax.grad(loss, argnums=1)(alpha, w, batch)
    updates, state = w_opt.update(grads, state, w)
    return optax.apply_updates(w, updates), state

  def arch_update(alpha, state, d_alpha):
    updates, state = a_opt.update(d_alpha, state, alpha)
    return optax.apply_updates(alpha, updates), state

  def arch1(alpha, state, w, batch):
    return arch_update(alpha, state, jax.grad(loss)(alpha, w, batch))

  second = bilevel.scale_by_darts(
      2, virtual_learning_rate=darts_step.LR,
      virtual_weight_decay=darts_step.WEIGHT_DECAY)

  def arch2(alpha, state, w, batches):
    directions, _ = second.update(
        None, second.init(None), bilevel.Params(alpha, w), outer_loss=loss,
        inner_loss=loss, **batches)
    return arch_update(alpha, state, directions.upper)

  fused = bilevel.darts(
      2, upper_optimizer=a_opt, lower_optimizer=w_opt,
      virtual_learning_rate=darts_step.LR,
      virtual_weight_decay=darts_step.WEIGHT_DECAY)
  return {
      "weight": (jit(weight), (copy(w), w_opt.init(w), alpha,
                               batches["inner_batch"])),
      "arch1": (jit(arch1), (copy(alpha), a_opt.init(alpha), w,
                             batches["outer_batch"])),
      "arch2": (jit(arch2), (copy(alpha), a_opt.init(alpha), w, batches)),
      "fused": (bilevel.make_step(fused, bilevel.Problem(loss, loss),
                                  donate=True),
                (copy(params), fused.init(params), batches)),
  }


def compile_step(fn, args) -> Step:
  """``fn`` compiled ahead of time for ``args``, as a :class:`Step`."""
  start = time.perf_counter()
  compiled = fn.lower(*args).compile()
  compile_s = time.perf_counter() - start
  stats = compiled.memory_analysis()
  xla_bytes = (stats.argument_size_in_bytes + stats.output_size_in_bytes
               - stats.alias_size_in_bytes + stats.temp_size_in_bytes)
  box = [args]

  def run():
    out = jax.block_until_ready(compiled(*box[0]))
    box[0] = (*out[:2], *box[0][2:])
    return out

  return Step(run, compile_s, xla_bytes)


def nhwc_batches(data) -> dict[str, dict[str, jax.Array]]:
  """``inner_batch`` / ``outer_batch`` of ``data`` (``darts_step.batches``,
  NCHW) as NHWC arrays."""
  nhwc = lambda x: jnp.asarray(x.transpose(0, 2, 3, 1))
  return {"inner_batch": {"x": nhwc(data["x_train"]),
                          "y": jnp.asarray(data["y_train"])},
          "outer_batch": {"x": nhwc(data["x_val"]),
                          "y": jnp.asarray(data["y_val"])}}


def build(k: int | None, shape, data, names=None) -> dict[str, Step]:
  """The compiled steps ``names`` (default all) of the supernet with ``K =
  k`` (None: DARTS) on ``data`` (``darts_step.batches``, NCHW)."""
  loss, params = supernet(k, shape)
  functions = step_functions(loss, params, nhwc_batches(data))
  return {name: compile_step(*functions[name])
          for name in names or functions}
