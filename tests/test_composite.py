"""refiner.artifacts.composite: feathering against an independent distance transform, paste-back exactness (the input
bit for bit where the weight is 0, the refinement where it is 1, a convex combination in between), the per-image
switch and the one-pass changed region."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from refiner.artifacts.composite import change_config, changed_region, feather, paste_back, paste_weights
from refiner.errors import SettingError


def _ramp(d: np.ndarray, px: int) -> np.ndarray:
    reach = px + 1
    return np.where(d < reach, 0.5 * (1 + np.cos(np.pi * np.minimum(d, reach) / reach)), 0.0)


@pytest.mark.parametrize("px", [1, 3, 6])
def test_feather_of_a_binary_region_is_the_raised_cosine_of_the_distance_transform(px):
    rng = np.random.default_rng(px)
    region = np.zeros((2, 40, 33), dtype=bool)
    region[0, 5:12, 8:20] = True
    region[0, 30, 30] = True
    region[1] = rng.random((40, 33)) > 0.97
    w = feather(torch.from_numpy(region), px).numpy()
    # scipy's exact Euclidean distance of every pixel to the nearest region pixel: an independent reference
    ref = np.stack([_ramp(ndimage.distance_transform_edt(~r), px) for r in region])
    assert np.allclose(w, ref, atol=1e-12)
    assert (w[region] == 1).all()                                   # the region is kept exactly
    far = np.stack([ndimage.distance_transform_edt(~r) >= px + 1 for r in region])
    assert (w[far] == 0).all() and ((w > 0) & (w < 1)).any()       # exactly 0 beyond px, a real ramp between
    assert torch.equal(feather(torch.from_numpy(region), 0), torch.from_numpy(region).double())


def test_feather_of_a_soft_region_by_hand():
    region = torch.zeros(1, 5, 5, dtype=torch.float64)
    region[0, 2, 2] = 0.5
    region[0, 0, 0] = 0.1
    w = feather(region, 1)                    # reach 2: distance 1 -> ramp 1/2, sqrt 2 -> (1 + cos(pi sqrt(2)/2)) / 2
    diag = 0.5 * (1 + math.cos(math.pi * math.sqrt(2) / 2))
    assert w[0, 2, 2] == 0.5 and w[0, 2, 3] == pytest.approx(0.25) and w[0, 3, 3] == pytest.approx(0.5 * diag)
    assert w[0, 2, 4] == 0 and w[0, 0, 0] == pytest.approx(0.1)
    assert w[0, 1, 1] == pytest.approx(max(0.5 * diag, 0.1 * diag))   # the larger neighbour wins (a soft dilation)
    assert float(w.min()) >= 0 and float(w.max()) <= 1


def test_paste_back_is_the_input_where_w_is_0_the_refinement_where_1_and_convex_between():
    rng = np.random.default_rng(0)
    inputs = [rng.integers(0, 256, (12, 10, 3), dtype=np.uint8) for _ in range(2)]
    refined = [rng.integers(0, 256, (12, 10, 3), dtype=np.uint8) for _ in range(2)]
    region = torch.zeros(2, 12, 10, dtype=torch.bool)
    region[0, 3:6, 2:5] = True
    w = feather(region, 2)
    out = paste_back(refined, inputs, w)
    for b in range(2):
        wb = w[b].numpy()
        assert np.array_equal(out[b][wb == 0], inputs[b][wb == 0])        # bit for bit
        assert np.array_equal(out[b][wb == 1], refined[b][wb == 1])
        lo = np.minimum(inputs[b], refined[b]).astype(int)
        hi = np.maximum(inputs[b], refined[b]).astype(int)
        assert ((out[b] >= lo) & (out[b] <= hi)).all()                   # weights w and 1 - w: a convex combination
        expected = np.round(wb[..., None] * refined[b] + (1 - wb[..., None]) * inputs[b].astype(float))
        assert np.array_equal(out[b], expected.astype(np.uint8))
    assert np.array_equal(out[1], inputs[1])                             # an empty region keeps the whole input
    same = paste_back(inputs, inputs, torch.rand(2, 12, 10, generator=torch.Generator().manual_seed(1)))
    assert all(np.array_equal(a, b) for a, b in zip(same, inputs))      # the weights sum to one
    with pytest.raises(ValueError, match="differ in size"):
        paste_back([refined[0][:, :9]], inputs[:1], w[:1])
    with pytest.raises(SettingError, match=r"\[0, 1\]"):
        paste_back(refined, inputs, w + 1)
    with pytest.raises(SettingError, match="int >= 0"):
        feather(region, -1)


def test_paste_weights_switches_severe_images_to_their_whole_refinement():
    region = torch.zeros(3, 4, 4, dtype=torch.bool)
    region[:, 0, 0] = True
    w = paste_weights(region, 0, [0.05, 0.2, 0.1], whole_above=0.1)
    assert (w[1] == 1).all()
    assert torch.equal(w[0], region[0].double()) and torch.equal(w[2], region[2].double())   # 0.1 is not above
    assert torch.equal(paste_weights(region, 0, [0.05, 0.2, 0.1]), region.double())
    with pytest.raises(SettingError, match="severity"):
        paste_weights(region, 0, None, whole_above=0.1)


def test_changed_region_finds_what_the_refinement_changed():
    rng = np.random.default_rng(3)
    inputs = [rng.integers(60, 200, (64, 64, 3), dtype=np.uint8) for _ in range(2)]
    refined = [img.copy() for img in inputs]
    refined[0][20:30, 35:45] = np.clip(refined[0][20:30, 35:45].astype(int) + 50, 0, 255).astype(np.uint8)
    det = changed_region(inputs, refined, factor=4)
    assert det.method == "output_residual"
    assert det.pixel[0, 20:30, 35:45].all()                              # the changed block is flagged
    outside = torch.ones(64, 64, dtype=torch.bool)
    outside[14:36, 29:51] = False
    assert not det.pixel[0][outside].any()                               # and nothing far from it
    assert not det.pixel[1].any()                                        # an unchanged image: nothing
    change = np.abs(refined[0].astype(float) - inputs[0]).mean() / 255
    assert float(det.severity[0]) == pytest.approx(change, rel=1e-5) and float(det.severity[1]) == 0


def test_a_change_level_flags_every_change_above_it_however_large():
    rng = np.random.default_rng(4)
    inputs = [rng.integers(60, 200, (64, 64, 3), dtype=np.uint8)]
    refined = [inputs[0].copy()]
    drift = rng.integers(-8, 9, (64, 64, 3))                      # the f4's small change everywhere
    refined[0] = np.clip(refined[0].astype(int) + drift, 0, 255).astype(np.uint8)
    refined[0][:, :40] = np.clip(refined[0][:, :40].astype(int) + 60, 0, 255).astype(np.uint8)   # 40 % of the image
    relative = changed_region(inputs, refined, factor=4)
    assert relative.pixel[0, :, :30].float().mean() < 0.1          # too large for the code's area limit
    det = changed_region(inputs, refined, factor=4, cfg=change_config(30))
    assert det.pixel[0, :, :38].all() and not det.pixel[0, :, 44:].any()
    for bad in (-1, 255, True, "30"):
        with pytest.raises(SettingError, match=r"\[0, 255\)"):
            change_config(bad)
