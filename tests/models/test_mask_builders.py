"""Mask layouts, magnitude and top-k masks, the IMP schedule, sparsity."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import mask_builders as pm


def _weights(seed=0):
  rng = np.random.default_rng(seed)
  return {
      "bn.scale": jnp.asarray(rng.normal(size=4), jnp.float32),
      "conv.kernel": jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32),
      "head.bias": jnp.asarray(rng.normal(size=3), jnp.float32),
      "head.kernel": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
  }


def test_imp_schedule_is_geometric_and_clipped_at_targets():
  rounds = pm.imp_schedule((0.9, 0.95), rate=0.2)
  # Each round keeps 80 % of the survivors: 0.8^10 = 0.107 > 0.1 > 0.8^11,
  # so round 11 stops at 0.1; then 0.1 · 0.8^3 = 0.0512 > 0.05 > 0.1 · 0.8^4.
  assert len(rounds) == 15
  kept = [k for k, _ in rounds]
  np.testing.assert_allclose(kept[:10], 0.8 ** np.arange(1, 11))
  assert kept[10] == pytest.approx(0.1) and rounds[10][1]
  np.testing.assert_allclose(kept[11:14], 0.1 * 0.8 ** np.arange(1, 4))
  assert kept[14] == pytest.approx(0.05) and rounds[14][1]
  assert [j for j, (_, t) in enumerate(rounds) if t] == [10, 14]


@pytest.mark.parametrize("targets", [(), (0.95, 0.9), (1.2,), (0.0,)])
def test_imp_schedule_rejects_bad_targets(targets):
  with pytest.raises(ValueError, match="targets"):
    pm.imp_schedule(targets)


def test_ones_mask_layouts():
  w = _weights()
  layout = pm.MaskLayout("filter", "per_layer", exclude=("head",))
  mask = pm.ones_mask(layout, w)
  assert mask["conv.kernel"].shape == (1, 1, 1, 4)
  for name in ("bn.scale", "head.bias", "head.kernel"):
    assert mask[name].shape == ()
  unstructured = pm.ones_mask(pm.MaskLayout(), w)
  assert unstructured["conv.kernel"].shape == (3, 3, 2, 4)
  assert unstructured["head.kernel"].shape == (4, 3)


def test_bad_layout_names_the_option():
  with pytest.raises(ValueError, match="mask mode 'rows'"):
    pm.MaskLayout("rows")
  with pytest.raises(ValueError, match="mask scope"):
    pm.MaskLayout(scope="everywhere")
  with pytest.raises(ValueError, match="prunes none"):
    pm.ones_mask(pm.MaskLayout(exclude=("conv", "head")), _weights())


def test_magnitude_scores_are_l1_norms_of_the_groups():
  w = _weights()
  kernel = np.asarray(w["conv.kernel"])
  for mode, axes in (("filter", (0, 1, 2)), ("channel", (0, 1, 3))):
    layout = pm.MaskLayout(mode, "per_layer", exclude=("head",))
    scores = pm.magnitude_scores(layout, pm.ones_mask(layout, w), w)
    np.testing.assert_allclose(
        np.asarray(scores["conv.kernel"]),
        np.abs(kernel).sum(axis=axes, keepdims=True), rtol=1e-6)
  layout = pm.MaskLayout()
  mask = pm.ones_mask(layout, w)
  mask["conv.kernel"] = mask["conv.kernel"].at[0, 0, 0, 0].set(0.0)
  scores = pm.magnitude_scores(layout, mask, w)
  expected = np.abs(kernel)
  expected[0, 0, 0, 0] = 0.0  # an already-pruned weight scores 0
  np.testing.assert_allclose(np.asarray(scores["conv.kernel"]), expected)


def test_global_topk_keeps_the_largest_entries_across_layers():
  w = _weights()
  layout = pm.MaskLayout()
  scores = pm.magnitude_scores(layout, pm.ones_mask(layout, w), w)
  mask = pm.topk_mask(layout, scores, 0.25)
  flat = np.concatenate([np.abs(np.asarray(w[p])).ravel()
                         for p in ("conv.kernel", "head.kernel")])
  k = round(0.25 * flat.size)
  threshold = np.sort(flat)[::-1][k - 1]
  for p in ("conv.kernel", "head.kernel"):
    np.testing.assert_array_equal(
        np.asarray(mask[p]), (np.abs(np.asarray(w[p])) >= threshold))
  assert mask["bn.scale"].shape == () and float(mask["bn.scale"]) == 1.0


@pytest.mark.parametrize("layout", [
    pm.MaskLayout(),
    pm.MaskLayout("filter", "per_layer", exclude=("head",)),
])
def test_magnitude_mask_is_topk_of_magnitudes_and_keeps_pruned_entries(
    layout):
  w = _weights()
  dense = pm.ones_mask(layout, w)
  first = pm.magnitude_mask(layout, dense, w, 0.5)
  chex.assert_trees_all_equal(
      first, pm.topk_mask(layout, pm.magnitude_scores(layout, dense, w), 0.5))
  # An IMP round on the surviving weights: what was pruned stays pruned.
  second = pm.magnitude_mask(layout, first, w, 0.25)
  for p in pm.prunable_paths(layout, w):
    assert not np.any(np.asarray(second[p])[np.asarray(first[p]) == 0])
  chex.assert_trees_all_equal_shapes(second, dense)


def test_per_layer_topk_keeps_the_fraction_of_each_layer():
  w = _weights()
  layout = pm.MaskLayout(scope="per_layer")
  scores = pm.magnitude_scores(layout, pm.ones_mask(layout, w), w)
  mask = pm.topk_mask(layout, scores, 0.5)
  assert int(mask["conv.kernel"].sum()) == 36
  assert int(mask["head.kernel"].sum()) == 6


def test_straight_through_mask_has_identity_gradient_on_prunable_only():
  w = _weights()
  layout = pm.MaskLayout()
  scores = pm.magnitude_scores(layout, pm.ones_mask(layout, w), w)
  mask_fn = pm.straight_through_mask_fn(layout, 0.3, scores)
  cotangent = jax.tree.map(lambda s: jnp.full(s.shape, 2.0), scores)
  _, vjp = jax.vjp(mask_fn, scores)
  (grad,) = vjp(cotangent)
  np.testing.assert_array_equal(grad["conv.kernel"], 2.0)
  np.testing.assert_array_equal(grad["head.kernel"], 2.0)
  assert float(grad["bn.scale"]) == 0.0 and float(grad["head.bias"]) == 0.0
  np.testing.assert_array_equal(
      mask_fn(scores)["conv.kernel"],
      pm.topk_mask(layout, scores, 0.3)["conv.kernel"])


def test_apply_mask_and_sparsity_report_match_numpy():
  w = _weights()
  layout = pm.MaskLayout("filter", "per_layer", exclude=("head",))
  mask = pm.ones_mask(layout, w)
  mask["conv.kernel"] = jnp.asarray([1.0, 0.0, 0.0, 1.0]).reshape(1, 1, 1, 4)
  pruned = pm.apply_mask(mask, w)
  expected = np.asarray(w["conv.kernel"]).copy()
  expected[..., 1:3] = 0
  np.testing.assert_array_equal(pruned["conv.kernel"], expected)
  np.testing.assert_array_equal(pruned["head.kernel"], w["head.kernel"])
  report = pm.sparsity_report(layout, mask, w)
  assert report["sparsity"] == pytest.approx(0.5)
  assert report["mask_sparsity"] == pytest.approx(0.5)
  assert report["sparsity/conv.kernel"] == pytest.approx(0.5)
  assert "sparsity/head.kernel" not in report  # excluded from pruning


def test_kept_fraction_out_of_range_is_an_error():
  w = _weights()
  layout = pm.MaskLayout()
  with pytest.raises(ValueError, match="kept fraction"):
    pm.topk_mask(layout, pm.ones_mask(layout, w), 0.0)
