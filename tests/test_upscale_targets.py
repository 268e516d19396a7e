"""DemoFusion beyond the training size (issue 23, item 2; refiner.bench.upscale_targets): the head count at any
size, DemoFusion's ablations, UNet evaluations counted against hand counts, a study on tiny untrained models, and
bad target sizes refused with one line and exit 2 before any compute."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import compose_config

from refiner.apps import bench as apps_bench
from refiner.bench import run as bench_run
from refiner.bench import upscale_targets
from refiner.bench.methods import BenchError
from refiner.bench.upscale_targets import (
    Study,
    UNetEvals,
    check_latent_multiple,
    equal_steps,
    progressive_evals,
    tiles_per_eval,
)
from refiner.data.checker import check, composed, count_heads
from refiner.data.synthetic import head_for, render
from refiner.diffusion import ScheduleConfig, Window
from refiner.experts import Expert
from refiner.inference.chain import Chain
from refiner.inference.progressive import DemoFusionPaths, progressive_refine
from refiner.models.unet import UNetModel, tiny_unet_params
from refiner.models.vq import VQModel, tiny_ddconfig
from refiner.settings import from_config

pytestmark = pytest.mark.usefixtures("one_thread")
AC = ScheduleConfig().alphas_cumprod()


# ------------------------------------------------------------------------------------------------ the checker
def two_heads(side: int, seed: int = 5) -> np.ndarray:
    """Two heads side by side: each a whole training-style picture at half the side, on the first's background."""
    half = side // 2
    a, b = render(head_for(seed, 0), half), render(head_for(seed, 1), half)
    canvas = np.empty((side, side, 3), np.uint8)
    canvas[:] = a[0, 0]
    canvas[half // 2:half // 2 + half, :half] = a
    canvas[half // 2:half // 2 + half, half:] = b
    return canvas


@pytest.mark.parametrize("side", [64, 128, 256])
def test_one_head_passes_and_two_heads_side_by_side_count_two_and_fail(side):
    for i in range(3):
        one = render(head_for(2, i), side)
        assert count_heads(one, 64) == 1 and composed(one, 64) == (True, 1)
    pair = two_heads(side)
    assert count_heads(pair, 64) == 2
    assert composed(pair, 64) == (False, 2)
    assert not check(pair).rules["one_head"]


def test_heads_repeated_at_the_training_scale_are_counted_where_the_one_head_rule_sees_none():
    tile = render(head_for(5, 2), 64)
    repeated = np.tile(tile, (4, 4, 1))  # 256 px: a head in every 64 px window
    assert count_heads(repeated, 64) == 16
    assert composed(repeated, 64) == (False, 16)
    # check's own rule counts regions of 4% of *this* picture: none of the 16 is that large
    assert check(repeated).info.get("reason") == "no head-sized skin region"
    yy, xx = np.mgrid[:128, :128]
    for radius, passes in ((10, True), (15, False)):  # a skin blob without an eye: not a head (check: too small /
        smeared = render(head_for(2, 0), 128)          # a second head-sized skin region)
        smeared[(yy - 16) ** 2 + (xx - 16) ** 2 <= radius ** 2] = smeared[64, 64]
        assert composed(smeared, 64) == (passes, 1) and check(smeared).rules["one_head"] == passes
    blank = np.full((128, 128, 3), (90, 140, 200), np.uint8)
    assert count_heads(blank, 64) == 0 and composed(blank, 64) == (False, 0)
    with pytest.raises(ValueError, match="training_size"):
        count_heads(blank, 16)


# ------------------------------------------------------------------------------------ counts and refusals
def tiny_unet(seed: int) -> UNetModel:
    torch.manual_seed(seed)
    net = UNetModel(**tiny_unet_params()).eval()
    torch.nn.init.normal_(net.out[2].weight, std=0.05)  # CompVis zero-inits the last conv
    return net


def test_progressive_evaluations_match_a_hand_count():
    unet = tiny_unet(1)
    z = torch.randn(1, 3, 8, 8)  # the training latent side is 8: tiles of 8, stride 4
    # x2 from 499 in 3 steps (no grid point at t = 0): per step 3 x 3 local tiles of the 16 x 16 latent + 4 lattices
    for paths, per_step in ((DemoFusionPaths(True, True), 9 + 4), (DemoFusionPaths(False, True), 9),
                            (DemoFusionPaths(True, False), 9 + 4), (DemoFusionPaths(False, False), 9)):
        with UNetEvals([unet], 8) as count:
            out = progressive_refine([Expert(unet, Window(0, 1000))], z, 499, 3, AC, upscale=2, tile=8, stride=4,
                                     jitter=True, generator=torch.Generator().manual_seed(0), **paths.kwargs())
        assert out.shape == (1, 3, 16, 16)
        assert count.calls == 3 * per_step and count.evals == 3 * per_step
        assert progressive_evals(8, 2, 499, 3, paths.global_path) == 3 * per_step
    # from T-1 in 10 steps the grid ends at t = 0, where the global weight c2 is 0: its 4 lattices are skipped once
    with UNetEvals([unet], 8) as count:
        progressive_refine([Expert(unet, Window(0, 1000))], z, 999, 10, AC, upscale=2, tile=8, stride=4)
    assert count.calls == 10 * 9 + 9 * 4 == progressive_evals(8, 2, 999, 10)
    # x4: a second phase on the 32 x 32 latent, 7 x 7 tiles and 16 lattices
    assert tiles_per_eval(32, 8, 4) == 49
    assert progressive_evals(8, 4, 499, 3) == 3 * (9 + 4) + 3 * (49 + 16)
    assert equal_steps(325, 4, 500) == 81 and equal_steps(325, 4, 50) == 50 and equal_steps(1, 9, 50) == 1


def test_the_ablations_change_the_result_and_each_has_its_label():
    unet = tiny_unet(2)
    z = torch.randn(1, 3, 8, 8)
    outs = [progressive_refine([Expert(unet, Window(0, 1000))], z, 499, 3, AC, upscale=2, tile=8, jitter=False,
                               generator=torch.Generator().manual_seed(0), **p.kwargs())
            for p in upscale_targets.ABLATIONS]
    for i in range(len(outs)):
        for j in range(i + 1, len(outs)):
            assert not torch.allclose(outs[i], outs[j], atol=1e-6), (i, j)
    assert [p.short() for p in upscale_targets.ABLATIONS] == [
        "DemoFusion", "DemoFusion w/o global", "DemoFusion w/o skip", "DemoFusion w/o global & skip"]
    with pytest.raises(ValueError, match="global_path"):
        DemoFusionPaths(global_path=1)


def test_demofusions_cosine_scale_and_blur_are_swept_with_both_paths_and_change_the_result():
    up = SimpleNamespace(ablations=False, alpha1=(3.0, 1.0), sigma=(1.0, 2.0))
    assert [p.short() for p in upscale_targets.variants(up)] == [
        "DemoFusion", "DemoFusion (alpha1 3, sigma 2)", "DemoFusion (alpha1 1, sigma 1)",
        "DemoFusion (alpha1 1, sigma 2)"]
    up = SimpleNamespace(ablations=True, alpha1=(1.0,), sigma=(1.0,))   # the ablations at the first of each list
    assert [p.alpha1 for p in upscale_targets.variants(up)] == [1.0] * 4
    unet, z = tiny_unet(2), torch.randn(1, 3, 8, 8)
    outs = [progressive_refine([Expert(unet, Window(0, 1000))], z, 999, 3, AC, upscale=2, tile=8, jitter=False,
                               generator=torch.Generator().manual_seed(0), **DemoFusionPaths(alpha1=a, sigma=g).kwargs())
            for a, g in ((3.0, 1.0), (1.0, 1.0), (3.0, 2.0))]
    assert not torch.allclose(outs[0], outs[1], atol=1e-6) and not torch.allclose(outs[0], outs[2], atol=1e-6)
    with pytest.raises(ValueError, match="alpha1 must be a number > 0"):
        DemoFusionPaths(alpha1=0)


def test_check_latent_multiple_names_the_size_that_does_not_fit():
    check_latent_multiple(64, [128, 256], 4, 4)
    with pytest.raises(BenchError, match=r"upscale.target_sizes: 80 px is not a multiple of 32, the f4 factor 4 "):
        check_latent_multiple(32, [64, 80], 4, 8)
    with pytest.raises(BenchError, match=r"size 72 px \(the training size\) is not a multiple of 16"):
        check_latent_multiple(72, [144], 4, 4)


def _compose(tmp_path, *overrides: str):
    return compose_config("bench", [f"output_dir={tmp_path / 'out'}", *overrides], tmp_path)


@pytest.mark.parametrize("targets, line", [
    ("[32]", "error: upscale.target_sizes: 32 px is not above the training size 64 px (size); beyond the training "
             "size means larger"),
    ("[64]", "error: upscale.target_sizes: 64 px is not above the training size 64 px (size); beyond the training "
             "size means larger"),
    ("[128,100]", "error: upscale.target_sizes: 100 px is not a multiple of 8, as size must be (the latent factor)"),
    ("[192]", "error: upscale.target_sizes: 192 px is not 64 px (size) times a power of 2; DemoFusion's phases "
              "double the side"),
    ("[-128]", "error: upscale.target_sizes must be in [1"),
])
def test_bad_target_sizes_are_one_error_line_and_exit_2_before_any_model_loads(targets, line, tmp_path, capsys,
                                                                               monkeypatch):
    monkeypatch.setattr(bench_run.Models, "__init__", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit) as exit_:
        apps_bench.upscale_task(_compose(tmp_path, f"upscale.target_sizes={targets}"))
    assert exit_.value.code == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(line) and not out, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("override, line", [
    ("upscale.alpha1=[3,0]", "error: upscale.alpha1 must be a non-empty list of numbers > 0, got (3, 0)"),
    ("upscale.sigma=[]", "error: upscale.sigma must be a non-empty list of numbers > 0, got ()"),
])
def test_bad_demofusion_knobs_are_one_error_line_before_any_model_loads(override, line, tmp_path, capsys,
                                                                         monkeypatch):
    monkeypatch.setattr(bench_run.Models, "__init__", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit) as exit_:
        apps_bench.upscale_task(_compose(tmp_path, "upscale.target_sizes=[128]", override))
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [line]


def test_a_target_the_models_latents_do_not_fit_is_refused_after_loading_before_any_compute(tmp_path, capsys,
                                                                                           monkeypatch):
    class FakeModels:  # what Models exposes, for UNets that downsample 8x behind an f4: sides must be multiples of 32
        def __init__(self, settings, methods, sources):
            chain = SimpleNamespace(multiple=8)
            self.f4, self.device = SimpleNamespace(factor=4), "cpu"
            self.generator_experts = tuple(settings.generator.experts)
            self.pipelines = {tuple(methods[0].experts): SimpleNamespace(chain=chain),
                              self.generator_experts: SimpleNamespace(chain=chain)}

    monkeypatch.setattr(upscale_targets, "Models", FakeModels)
    monkeypatch.setattr(upscale_targets, "Study", lambda *a, **k: pytest.fail("compute started"))
    with pytest.raises(SystemExit) as exit_:
        apps_bench.upscale_task(_compose(tmp_path, "size=48", "upscale.target_sizes=[96,192]"))
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["error: size 48 px (the training size) is not a multiple of 32, the f4 factor 4 times the "
                     "UNets' downsampling 8"]


# ------------------------------------------------------------------------------ the study on tiny models
@pytest.fixture(scope="module")
def tiny_models():
    torch.manual_seed(0)
    f4 = VQModel(tiny_ddconfig(4, resolution=32), 64, 3).eval()
    schedule = ScheduleConfig()
    params = tiny_unet_params()
    chain = Chain.from_unets([tiny_unet(1), tiny_unet(2)], [Window(250, 500), Window(0, 250)], schedule,
                             unet_params=params)
    gen = Chain.from_unets([tiny_unet(3)], [Window(0, 1000)], schedule, unet_params=params)
    return SimpleNamespace(f4=f4, device="cpu", generator_experts=("gen",),
                           pipelines={("a", "b"): SimpleNamespace(chain=chain), ("gen",): SimpleNamespace(chain=gen)})


def _settings(**upscale):
    plain = {"seeds": {"tune": {"images": 2, "generator": 100000, "references": 4}}, "split": "tune",
             "output_dir": "out", "n": 2, "size": 32, "generator": {"experts": ["gen"], "steps": 2},
             "t_per_step": 100, "grid_images": 1, "first_stage": {}, "swd": {"patches_per_level": 16},
             "methods": {"chain": {"experts": ["a", "b"], "t_starts": [299]}},
             "upscale": {"t_starts": [299], "target_sizes": [64], **upscale}}
    return from_config(upscale_targets.BenchSettings, plain)


@pytest.mark.parametrize("regime", ["noise", "defects"])
def test_every_method_makes_target_size_pictures_and_spends_the_evaluations_planned(tiny_models, regime):
    settings = _settings()
    study = Study(settings, tiny_models, ("a", "b"))
    rows, shown = study.regime(regime, 64, None if regime == "noise" else 299)
    assert all(img.shape == (64, 64, 3) for col in shown.values() for img in col)
    labels = [r["method"] for r in rows]
    steps = 2 if regime == "noise" else 3  # generator.steps; steps_for(299, 100)
    start = 999 if regime == "noise" else 299
    budget = (2 if regime == "noise" else 0) + progressive_evals(8, 2, start, steps)
    assert f"direct ({equal_steps(budget, 4, start + 1)} steps)" in labels
    assert f"tiles ({equal_steps(budget, 9, start + 1)} steps)" in labels
    assert sum(label.startswith("progressive") for label in labels) == 4
    for r in rows:  # what the hooks counted is what was planned (the generator sample a noise method starts from
        assert r["unet_evals"] == pytest.approx(r["planned_evals"]), r["method"]  # counted once per image)
        assert 0 <= r["more_than_one_head"] <= 1 and 0 <= r["artifact_rate"] <= 1
    if regime == "defects":
        assert rows[0]["method"] == "input (bicubic)" and rows[0]["artifact_rate"] == 1.0  # broken by construction
        assert all("psnr_to_clean" in r for r in rows)
    unequal = Study(_settings(equal_evals=False), tiny_models, ("a", "b")).regime(regime, 64, start)[0]
    assert f"direct ({steps} steps)" in [r["method"] for r in unequal]
