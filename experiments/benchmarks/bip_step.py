r"""Times one jitted BiP step against one plain jitted training step.

Model: ``ResNetCIFAR(depth, mask_mode='unstructured')``. BiP's upper level is
the list of the mask scores of every conv and dense layer, its lower level
the list of their kernels ``θ`` (same order, same shapes), so both losses
depend on ``(m, θ)`` only through ``z = m ⊙ θ``. BatchNorm scale and bias,
the classifier bias and the running statistics stay fixed in both steps.
The baseline is one ``optax.sgd(momentum=0.9)`` step on the cross-entropy +
``(γ/2)‖θ‖²`` of the same masked network with the mask held fixed: one
ordinary training step. Both run BatchNorm in train mode (batch statistics);
the updated running averages are discarded (``merge_levels`` copies), since
the point is cost, not training. Inputs are random ``[batch, 32, 32, 3]``
images and labels, which is fine for timing.

BiP computes ``∇_θ`` of the lower loss and one gradient of the upper loss at
``z`` (the implicit gradient), each one forward+backward pass; ``make_step``
adds the upper loss's value (its unused gradient is dead code), then comes
the capped-simplex projection of the mask. The BiP issue's target is a ratio
≤ 3.5× (the paper's analysis expects ≈ 3 forward+backward passes). One
forward and one forward+backward are timed too, as the breakdown, and the
same forward+backward under ``lax.cond`` (as ``scale_by_bip`` takes the IG),
which XLA:CPU runs far slower than the unconditioned one.

Run:

  python -m experiments.benchmarks.bip_step [--depth=20] [--batch=128] \
      [--repeats=20]

The steps are compiled first; the median over ``repeats`` interleaved calls
(each ended by ``block_until_ready``) is reported.
"""

import argparse

import jax
import optax
from flax import nnx
from jax import lax

import bilevel
from experiments.benchmarks import timing
from models import MaskScore, merge_levels, split_levels
from models.resnet_cifar import ResNetCIFAR

GAMMA = 1.0  # the cost does not depend on γ
DENSITY = 0.2  # budget k = 20% of the mask entries kept


def _problem(depth, key):
  """``(loss(mask, θ, batch), mask, θ)`` with mask and θ lists of arrays."""
  model = ResNetCIFAR(depth, mask_mode="unstructured", rngs=nnx.Rngs(key))
  kernels = nnx.All(nnx.Param, nnx.PathContains("kernel"))
  graphdef, (scores, weights), rest = split_levels(model, MaskScore, kernels)
  # Both states sort by layer path, so the leaf lists pair mask with kernel.
  mask, score_def = jax.tree.flatten(scores)
  theta, weight_def = jax.tree.flatten(weights)
  assert [m.shape for m in mask] == [t.shape for t in theta]

  def loss(mask, theta, batch):
    net = merge_levels(graphdef, bilevel.Params(
        jax.tree.unflatten(score_def, mask),
        jax.tree.unflatten(weight_def, theta)), rest)
    logits = net(batch["x"], train=True)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, batch["y"]).mean()

  return loss, mask, theta


def _batch(key, size):
  kx, ky = jax.random.split(key)
  return {"x": jax.random.normal(kx, (size, 32, 32, 3)),
          "y": jax.random.randint(ky, (size,), 0, 10)}


def main(depth: int = 20, batch: int = 128,
         repeats: int = 20) -> dict[str, float]:
  """Prints and returns the median times (seconds) and the ratio."""
  key_model, key_outer, key_inner = jax.random.split(jax.random.key(0), 3)
  loss, mask, theta = _problem(depth, key_model)
  batches = {"outer_batch": _batch(key_outer, batch),
             "inner_batch": _batch(key_inner, batch)}
  budget = DENSITY * sum(m.size for m in mask)
  tx = bilevel.bip(optax.sgd(0.1), optax.sgd(0.1, momentum=0.9),
                   gamma=GAMMA, budget=budget)
  bip_step = bilevel.make_step(tx, bilevel.Problem(loss, loss))
  params = bilevel.Params(mask, theta)

  sgd = optax.sgd(0.1, momentum=0.9)

  @jax.jit
  def plain_step(theta, opt_state, batch):
    def total(t):
      ridge = 0.5 * GAMMA * optax.tree.norm(t, squared=True)
      return loss(mask, t, batch) + ridge
    updates, opt_state = sgd.update(jax.grad(total)(theta), opt_state)
    return optax.apply_updates(theta, updates), opt_state

  forward = jax.jit(loss)
  grad = jax.grad(loss, argnums=1)
  forward_backward = jax.jit(grad)
  # scale_by_bip takes the IG under lax.cond (for lower_steps > 1).
  cond_forward_backward = jax.jit(lambda m, t, b, take: lax.cond(
      take, grad, lambda *_: optax.tree.zeros_like(t), m, t, b))
  inner = batches["inner_batch"]
  bip, plain, fwd, fwd_bwd, cond = timing.median_times(
      [(bip_step, (params, tx.init(params), batches)),
       (plain_step, (theta, sgd.init(theta), inner)),
       (forward, (mask, theta, inner)),
       (forward_backward, (mask, theta, inner)),
       (cond_forward_backward, (mask, theta, inner, True))], repeats)
  result = {"bip_s": bip, "plain_s": plain, "forward_s": fwd,
            "forward_backward_s": fwd_bwd, "cond_forward_backward_s": cond,
            "ratio": bip / plain}
  print(f"device: {jax.devices()[0].device_kind}; ResNet-{depth}, "
        f"batch {batch}, random inputs; median of {repeats}")
  print(f"BiP step:                   {bip * 1e3:9.1f} ms")
  print(f"SGD-momentum step:          {plain * 1e3:9.1f} ms  "
        f"ratio {result['ratio']:.2f}× (target ≤ 3.5×)")
  print(f"forward:                    {fwd * 1e3:9.1f} ms")
  print(f"forward+backward (∇_θ):     {fwd_bwd * 1e3:9.1f} ms  "
        f"BiP = {bip / fwd_bwd:.2f}× of it")
  print(f"the same under lax.cond:    {cond * 1e3:9.1f} ms")
  return result


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--depth", type=int, default=20)
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=20)
  args = parser.parse_args()
  main(args.depth, args.batch, args.repeats)
