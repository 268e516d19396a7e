"""refiner.artifacts: detectors on planted dynamics, the TTC invariant, strength-map pinning, t_start=auto."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from gaussian import GaussianDenoiser

from refiner.artifacts.correct import (
    AutoStart,
    StrengthPinning,
    TrajectoryCorrection,
    fit_auto_start,
    starts_from_strength,
)
from refiner.artifacts.detect import (
    PixelChangeConfig,
    asced_paper_mask,
    latent_from_pixel,
    mask_scores,
    pixel_change_mask,
    pixel_from_latent,
)
from refiner.artifacts.dynamics import StepRecorder, chain_callbacks, eps_from_output, weighted_score
from refiner.diffusion import ScheduleConfig, Window, q_sample, to_x0_eps
from refiner.errors import SettingError
from refiner.experts import Expert, refine
from refiner.sampling import sample_ddim, timestep_grid

AB = ScheduleConfig().alphas_cumprod()


def _t(t: int, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), t, dtype=torch.long)


# ------------------------------------------------------------------------------------------- dynamics
@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_eps_from_callback_arguments_matches_the_conversion_from_x_t(parameterization):
    g = torch.Generator().manual_seed(0)
    x_t, out = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64), torch.randn(2, 3, 4, 4, generator=g,
                                                                                        dtype=torch.float64)
    x0, eps = to_x0_eps(out, x_t, _t(321, x_t), AB, parameterization)
    assert torch.allclose(eps_from_output(out, x0, 321, AB, parameterization), eps, atol=1e-10)
    # the weighted score is the network's share of the x0 prediction: x_t / sqrt(ab) - x0 (module docstring)
    assert torch.allclose(weighted_score(eps, 321, AB), x_t / math.sqrt(AB[321]) - x0, atol=1e-10)
    with pytest.raises(ValueError, match="eps or v model"):
        eps_from_output(out, x0, 321, AB, "x0")


def test_recorder_keeps_only_its_window_and_chained_callbacks_compose():
    rec = StepRecorder(AB, t_low=300, t_high=600)
    add_one = lambda i, t, x, out, x0: x + 1  # noqa: E731
    seen = []
    both = chain_callbacks([rec, add_one, None, lambda i, t, x, out, x0: seen.append(float(x.mean()))])
    model = GaussianDenoiser(0.0, 1.0, AB)
    grid = timestep_grid(899, 7)
    sample_ddim(model, torch.zeros(1, 1, 2, 2, dtype=torch.float64), grid, AB, callback=both)
    assert rec.timesteps == [t for t in grid if 300 < t <= 600] and len(rec.scores) == len(rec.x0) == 2
    assert len(seen) == len(grid)  # the observer after add_one ran at every step
    assert chain_callbacks([None]) is None


# ------------------------------------------------------------------------------------------- detectors
def _planted_scores(plant: bool, steps=(520, 500, 480, 460)):
    """Scores that change by the same amount everywhere between steps, plus (if ``plant``) a jump in one region."""
    scores = []
    for k, _ in enumerate(steps):
        s = torch.full((2, 4, 16, 16), 0.1 * k)
        if plant and k == 2:
            s[0, :, 4:8, 10:14] += 3.0
        scores.append(s)
    return list(steps), scores


def test_paper_detector_finds_the_planted_region_and_nothing_when_none_is_planted():
    steps, scores = _planted_scores(True)
    det = asced_paper_mask(steps, scores, t_correct=470, t_detect=999, factor=4)
    truth = torch.zeros(2, 16, 16, dtype=torch.bool)
    truth[0, 4:8, 10:14] = True
    assert torch.equal(det.latent, truth)
    assert det.pixel.shape == (2, 64, 64) and torch.equal(det.pixel[0, 16:32, 40:56], torch.ones(16, 16).bool())
    assert det.area[0] == pytest.approx(16 / 256) and det.area[1] == 0
    # severity: the mean of the bank's changes (absolute), larger where the jump is
    bank = torch.stack([(b - a).norm(dim=1) for a, b in zip(scores[:2], scores[1:3])])  # changes at t 500, 480
    assert torch.allclose(det.severity, bank.transpose(0, 1).flatten(1).mean(1))
    assert det.severity[0] > det.severity[1]
    steps, scores = _planted_scores(False)
    assert not asced_paper_mask(steps, scores, t_correct=470, t_detect=999, factor=4).latent.any()
    # the bank is (t_correct, t_detect]: a jump below t_correct is not seen
    steps, scores = _planted_scores(True, steps=(520, 500, 460, 440))
    assert not asced_paper_mask(steps, scores, t_correct=470, t_detect=999, factor=4).latent.any()
    with pytest.raises(ValueError, match="score bank"):
        asced_paper_mask(steps, scores, t_correct=600, t_detect=999, factor=4)


def _frames(plant_side: int, side: int = 256):
    rng = np.random.default_rng(0)
    frames = [torch.from_numpy(rng.normal(0, 0.01, (1, 3, side, side))).float() for _ in range(3)]
    truth = torch.zeros(1, side, side, dtype=torch.bool)
    if plant_side:
        frames[2][:, :, 100:100 + plant_side, 60:60 + plant_side] += 0.8
        truth[:, 100:100 + plant_side, 60:60 + plant_side] = True
    return frames, truth


def test_code_detector_finds_a_planted_blob_filters_by_area_and_flags_nothing_on_noise():
    frames, truth = _frames(40)
    det = pixel_change_mask(frames, factor=4)
    assert det.pixel[truth].all()                                   # all of it, then dilated by 5 px (+ blur)
    assert not det.pixel[:, :80].any() and not det.pixel[:, 160:].any()
    grown = torch.zeros_like(truth)
    grown[:, 100 - 12:140 + 12, 60 - 12:100 + 12] = True              # the blur's reach (~2 sigma) + 5 px dilation
    assert not det.pixel[~grown].any() and det.area[0] == det.pixel.float().mean()
    expected = np.mean([(b - a).abs().mean().item() for a, b in zip(frames, frames[1:])]) / 2
    assert det.severity[0].item() == pytest.approx(expected, rel=1e-5)
    assert not pixel_change_mask(frames, factor=4, cfg=PixelChangeConfig(min_area=5000)).pixel.any()  # too small
    frames, _ = _frames(120)  # 14,400 px: above the code's max_area of 10,000 px
    assert not pixel_change_mask(frames, factor=4).pixel.any()
    frames, _ = _frames(0)
    assert not pixel_change_mask(frames, factor=4).pixel.any()


def test_code_constants_scale_with_the_image_side():
    assert PixelChangeConfig().at(256) == PixelChangeConfig(scale_to_size=False)
    small = PixelChangeConfig().at(64)
    assert (small.sigma, small.min_area, small.max_area, small.min_width, small.dilate) == (0.5, 6.25, 625.0, 1, 1)
    assert PixelChangeConfig(scale_to_size=False).at(64).min_area == 100


def test_mask_conversions_and_scores_by_hand():
    pixel = torch.zeros(1, 8, 8, dtype=torch.bool)
    pixel[0, 5, 1] = True
    assert latent_from_pixel(pixel, 4).tolist() == [[[False, False], [True, False]]]
    assert pixel_from_latent(latent_from_pixel(pixel, 4), 4)[0, 4:, :4].all()
    pred = torch.tensor([[[1, 1, 0, 0]], [[0, 0, 0, 0]], [[1, 0, 0, 0]]], dtype=torch.bool)
    true = torch.tensor([[[1, 0, 0, 0]], [[0, 1, 0, 0]], [[0, 0, 0, 0]]], dtype=torch.bool)
    s = mask_scores(pred, true)
    # tp 1, fp 2, fn 1 -> IoU 1/4, precision 1/3, recall 1/2; images: flagged {0, 2}, positive {0, 1}
    assert (s["pixel_iou"], s["pixel_precision"], s["pixel_recall"]) == (0.25, 1 / 3, 0.5)
    assert (s["image_precision"], s["image_recall"]) == (0.5, 0.5)
    assert s["mean_image_iou"] == pytest.approx((0.5 + 0.0) / 2)


# ------------------------------------------------------------------------------------------- TTC
def _plain_and_corrected(mask, **ttc):
    model = GaussianDenoiser(0.3, 0.7, AB)   # acts on each pixel alone: no spatial mixing
    grid = timestep_grid(999, 20)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    plain, fixed = [], []
    sample_ddim(model, x, grid, AB, callback=lambda i, t, xt, o, x0: plain.append(xt.clone()))
    correction = TrajectoryCorrection(grid, AB, lambda: mask, t_correct=480,
                                      generator=torch.Generator().manual_seed(5), **ttc)
    record = lambda i, t, xt, o, x0: fixed.append(xt.clone())  # noqa: E731
    sample_ddim(model, x, grid, AB, callback=chain_callbacks([correction, record]))
    return grid, plain, fixed, correction


def test_ttc_leaves_the_unmasked_region_bit_identical_and_corrects_once_at_t_c():
    mask = torch.zeros(2, 8, 8, dtype=torch.bool)
    mask[:, :, :4] = True
    grid, plain, fixed, correction = _plain_and_corrected(mask, gamma=0.1)
    c = next(i for i, t in enumerate(grid) if grid[i + 1] <= 480)
    assert correction.corrected_at == grid[c + 1] <= 480 < grid[c]
    for i in range(c):                                                   # before T_c: the same run
        assert torch.equal(fixed[i], plain[i])
    m = mask[:, None].expand_as(plain[c])
    assert torch.equal(fixed[c][~m], plain[c][~m]) and not torch.equal(fixed[c][m], plain[c][m])
    for i in range(c, len(grid)):                                        # a per-pixel denoiser: forever identical
        assert torch.equal(fixed[i][~m], plain[i][~m])


def test_ttc_correction_is_the_closed_form_renoising():
    mask = torch.ones(2, 8, 8, dtype=torch.bool)
    grid, plain, fixed, correction = _plain_and_corrected(mask, correction_eta=0.0)
    c = grid.index(correction.corrected_at) - 1
    assert torch.allclose(fixed[c], plain[c], atol=1e-12)  # eta_c 0, gamma 0: exactly the DDIM eta=0 update
    grid, plain, fixed, correction = _plain_and_corrected(mask, correction_eta=1.0)
    c = grid.index(correction.corrected_at) - 1
    model = GaussianDenoiser(0.3, 0.7, AB, "x0")
    x_in = plain[c - 1]
    x0 = model(x_in, _t(grid[c], x_in))
    fresh = torch.randn(x_in.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    expected = q_sample(x0, _t(grid[c + 1], x0), AB, fresh)             # the code's q_sample with fresh noise
    assert torch.allclose(fixed[c], expected, atol=1e-12)
    with pytest.raises(SettingError, match="correction_eta"):
        TrajectoryCorrection(grid, AB, lambda: mask, 480, correction_eta=1.5)


# ------------------------------------------------------------------------------------------- strength map
def _chain_stages():
    return [Expert(GaussianDenoiser(0.3, 0.7, AB), Window(250, 1000, 1000)),
            Expert(GaussianDenoiser(-0.2, 0.5, AB), Window(0, 250, 1000))]


def test_strength_map_pins_each_pixel_until_its_own_start_across_windows():
    g = torch.Generator().manual_seed(2)
    z0 = torch.randn(1, 2, 4, 4, generator=g, dtype=torch.float64)
    noise = torch.randn(1, 2, 4, 4, generator=g, dtype=torch.float64)
    grid = timestep_grid(599, 12)
    starts = torch.full((1, 4, 4), 599)
    starts[0, 0, :] = 0        # never released: stays the input
    starts[0, 1, :] = 200      # released inside the detail window
    pin = StrengthPinning(z0, noise, starts, grid, AB)
    seen = []
    out = refine(_chain_stages(), z0, 599, 12, AB, noise=noise,
                 callback=chain_callbacks([pin, lambda i, t, x, o, x0: seen.append(x.clone())]))
    a0 = AB[0]
    assert torch.equal(out[0, :, 0], (math.sqrt(a0) * z0 + math.sqrt(1 - a0) * noise)[0, :, 0])
    j = next(k for k, t in enumerate(grid) if t <= 200)
    for i in range(j):               # up to and including its release at grid[j]: row 1 is the re-noised input
        expected = q_sample(z0, _t(grid[i + 1], z0), AB, noise)
        assert torch.allclose(seen[i][0, :, 1], expected[0, :, 1], atol=1e-12)
    assert grid[j] < 250                                                 # all its steps are the detail expert's
    start = q_sample(z0, _t(grid[j], z0), AB, noise)
    released = sample_ddim(_chain_stages()[1].model, start, grid[j:], AB)   # SDEdit from its own start
    assert torch.allclose(out[0, :, 1], released[0, :, 1], atol=1e-10)
    plain = refine(_chain_stages(), z0, 599, 12, AB, noise=noise)
    assert torch.equal(out[0, :, 2:], plain[0, :, 2:])                    # start = t_start: untouched
    everywhere = StrengthPinning(z0, noise, torch.full((1, 4, 4), 599), grid, AB)
    assert torch.equal(refine(_chain_stages(), z0, 599, 12, AB, noise=noise, callback=everywhere), plain)
    with pytest.raises(ValueError, match="above the grid's first point"):
        StrengthPinning(z0, noise, torch.full((1, 4, 4), 700), grid, AB)


def test_starts_from_strength():
    m = torch.tensor([[[0.0, 0.5, 1.0]]])
    assert starts_from_strength(m, 99, 499).tolist() == [[[99, 299, 499]]]
    with pytest.raises(SettingError, match=r"\[0, 1\]"):
        starts_from_strength(m + 1, 99, 499)
    with pytest.raises(SettingError, match="t_low <= t_high"):
        starts_from_strength(m, 500, 499)


# ------------------------------------------------------------------------------------------- t_start=auto
def test_auto_start_is_a_monotone_fit_that_round_trips(tmp_path):
    severity = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]
    needed = [99, 299, 199, 399, 499, 499]          # one inversion: isotonic pools 299 and 199 to 249
    auto = fit_auto_start(severity, needed, 99, 499, chain={"experts": ["a", "b"]})
    assert auto([0.0, 0.1, 0.15, 0.2, 0.3, 1.0]) == [99, 249, 249, 249, 399, 499]
    assert auto([-1.0]) == [99]
    auto.save(tmp_path / "auto.json")
    again = AutoStart.load(tmp_path / "auto.json")
    assert again.knots == auto.knots and again.chain == {"experts": ["a", "b"]}
    (tmp_path / "bad.json").write_text(json.dumps({"knots": [[0.1, 400], [0.2, 300]]}))
    with pytest.raises(SettingError, match="non-decreasing"):
        AutoStart.load(tmp_path / "bad.json")
    with pytest.raises(SettingError, match="not found"):
        AutoStart.load(tmp_path / "missing.json")


def test_pipeline_starts_pin_pixels_and_uniform_starts_change_nothing():
    from test_chain import _loaded, _unet

    from refiner.inference.chain import Chain
    from refiner.inference.pipeline import Pipeline, Tiling
    from refiner.models.vq import VQModel, tiny_ddconfig

    torch.manual_seed(3)
    f4 = VQModel(tiny_ddconfig(4), 64, 3).eval()
    chain = Chain.from_experts([_loaded(_unet(1), (250, 500)), _loaded(_unet(2), (0, 250))])
    pipeline = Pipeline(f4, chain)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(2)]
    plain, _ = pipeline.refine_images(images, 499, 4, seed=7)
    same, _ = pipeline.refine_images(images, 499, 4, seed=7, starts=torch.full((2, 16, 16), 499))
    assert all(np.array_equal(a, b) for a, b in zip(plain, same))
    starts = torch.full((2, 16, 16), 499)
    starts[1] = 0                     # image 1 kept: the f4 round trip of its lightly re-noised latent
    mixed, _ = pipeline.refine_images(images, 499, 4, seed=7, starts=starts)
    assert np.array_equal(mixed[0], plain[0]) and not np.array_equal(mixed[1], plain[1])
    kept, _ = Pipeline(f4, chain).refine_images(images[1:], 1, 1, seed=8)   # t_start 1: almost no noise
    assert np.abs(mixed[1].astype(int) - kept[0].astype(int)).mean() < 2
    with pytest.raises(SettingError, match="whole images"):
        Pipeline(f4, chain, tiling=Tiling(mode="always", f4_tile=8, f4_overlap=0, latent_tile=4, latent_stride=4)
                 ).refine_images(images, 499, 4, starts=starts)
