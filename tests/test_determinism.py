"""scripts/determinism.py (issue 22, item 5): its comparisons on hand-made values, and one training step repeated in
one process under one setting being bit-identical (what every cross-setting comparison in the study assumes)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from refiner.models.unet import UNetModel

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "determinism.py"


@pytest.fixture(scope="module")
def det():
    spec = importlib.util.spec_from_file_location("determinism_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_compare_tensors_finds_a_one_ulp_difference_and_its_size(det):
    a = {"w": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor([0.5])}
    one_ulp = torch.nextafter(torch.tensor(2.0), torch.tensor(3.0))
    b = {"w": torch.tensor([1.0, float(one_ulp), 3.0]), "b": torch.tensor([0.5])}
    same = det.compare_tensors(a, {k: v.clone() for k, v in a.items()})
    assert same == {"identical": True, "max_abs": 0.0, "differ": [], "missing": []}
    c = det.compare_tensors(a, b)
    assert not c["identical"] and c["differ"] == ["w"] and c["missing"] == []
    assert c["max_abs"] == 2.0 ** -22  # float32 spacing at 2.0: 2^(1-23)


def test_compare_tensors_missing_keys_shapes_and_nans(det):
    a = {"w": torch.zeros(2), "only_a": torch.zeros(1)}
    c = det.compare_tensors(a, {"w": torch.zeros(2)})
    assert not c["identical"] and c["missing"] == ["only_a"] and c["differ"] == []
    c = det.compare_tensors({"w": torch.zeros(2)}, {"w": torch.zeros(3)})
    assert not c["identical"] and c["max_abs"] == math.inf
    c = det.compare_tensors({"w": torch.tensor([float("nan")])}, {"w": torch.tensor([0.0])})
    assert not c["identical"] and c["max_abs"] == math.inf
    c = det.compare_tensors({"w": torch.zeros(2)}, {"w": torch.zeros(2, dtype=torch.float64)})
    assert not c["identical"]


def test_first_divergence(det):
    a = {0: 1.0, 1: 0.5, 2: 0.25}
    assert det.first_divergence(a, dict(a)) is None
    assert det.first_divergence(a, {0: 1.0, 1: 0.5000001, 2: 0.25}) == 1
    assert det.first_divergence(a, {0: 1.0, 1: 0.5}) == 2  # a step only one run logged
    assert det.first_divergence({0: float("nan")}, {0: float("nan")}) is None


def test_read_losses_takes_the_logged_steps_exactly(det, tmp_path):
    f = tmp_path / "metrics.csv"
    f.write_text("epoch,step,train/loss,val/loss\n,0,,\n0,0,1.0180429220199585,\n0,1,0.25,\n0,1,,0.4\n")
    assert det.read_losses(f) == {0: 1.0180429220199585, 1: 0.25}


def _two_steps(unet_kwargs: dict) -> dict:
    torch.manual_seed(0)
    unet = UNetModel(**unet_kwargs)
    with torch.no_grad():  # move the zero-initialised output layers off 0, so every layer gets a gradient
        for p in unet.parameters():
            p.add_(0.02 * torch.randn_like(p))
    opt = torch.optim.AdamW(unet.parameters(), lr=5e-4)
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        x, target = torch.randn(16, 3, 16, 16, generator=g), torch.randn(16, 3, 16, 16, generator=g)
        t = torch.randint(250, 500, (16,), generator=g)
        opt.zero_grad()
        F.mse_loss(unet(x, t), target).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in unet.state_dict().items()}


def test_a_training_step_repeats_bit_for_bit_under_one_setting(det):
    """The demo's UNet shape (conf/model/refiner_tiny.yaml), two AdamW steps, twice: identical weights. The
    comparison itself must see a change: one more step moves them."""
    before = _two_steps(det.UNET)
    again = _two_steps(det.UNET)
    assert det.compare_tensors(before, again)["identical"]
    moved = {k: v + (1e-3 if v.is_floating_point() else 0) for k, v in before.items()}
    assert not det.compare_tensors(before, moved)["identical"]
