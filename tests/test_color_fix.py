"""The colour fix (refiner.artifacts.color_fix) against independent references: scipy's correlate with a dilated
3x3 kernel and nearest (= replicate) borders, closed forms for constants and the Nyquist checkerboard, AdaIN's
moments."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from refiner.artifacts.color_fix import adain_color_fix, atrous_lowpass, color_fix, wavelet_color_fix
from refiner.errors import SettingError


def _scipy_lowpass(img: np.ndarray, levels: int) -> np.ndarray:
    """StableSR's cascade written out with scipy: each level correlates with the 3x3 kernel [1,2,1]^T[1,2,1]/16
    dilated by 2^i (a (2d+1)^2 kernel with zeros between the taps), borders replicated."""
    out = img.astype(np.float64)
    base = np.outer([1, 2, 1], [1, 2, 1]) / 16.0
    for i in range(levels):
        d = 2 ** i
        k = np.zeros((2 * d + 1, 2 * d + 1))
        k[::d, ::d] = base
        out = ndimage.correlate(out, k, mode="nearest")
    return out


@pytest.mark.parametrize("levels, shape", [(1, (2, 3, 23, 37)), (3, (2, 3, 23, 37)), (5, (2, 3, 23, 37)),
                                           (4, (1, 2, 5, 6))])
def test_lowpass_equals_dilated_3x3_cascade(levels, shape):
    rng = np.random.default_rng(0)
    img = rng.random(shape)  # odd sizes; the last case dilates by 8, past both sides
    ours = atrous_lowpass(torch.from_numpy(img), levels).numpy()
    ref = np.stack([np.stack([_scipy_lowpass(c, levels) for c in im]) for im in img])
    np.testing.assert_allclose(ours, ref, atol=1e-12)


def test_wavelet_restores_a_colour_shift_and_keeps_high_frequencies():
    rng = np.random.default_rng(1)
    inp = rng.integers(40, 200, size=(32, 32, 3)).astype(np.uint8)
    shifted = (inp.astype(int) + np.array([20, -15, 9])).astype(np.uint8)  # a pure colour drift
    assert np.array_equal(wavelet_color_fix([shifted], [inp])[0], inp)
    # a Nyquist checkerboard is removed by the first level's [1, 2, 1] / 4 (1 - 2 + 1 = 0) and so by the cascade:
    # a refinement that differs from the input by one keeps that difference, away from the replicated border
    yy, xx = np.mgrid[:32, :32]
    board = np.where((yy + xx) % 2 == 0, 10, -10)[..., None]
    refined = (inp.astype(int) + board).astype(np.uint8)
    out = wavelet_color_fix([refined], [inp], levels=1)[0]
    assert np.array_equal(out[1:-1, 1:-1], refined[1:-1, 1:-1])


def test_wavelet_is_refined_plus_lowpass_of_the_difference():
    rng = np.random.default_rng(2)
    inp = rng.integers(0, 256, size=(16, 24, 3)).astype(np.uint8)
    ref = rng.integers(0, 256, size=(16, 24, 3)).astype(np.uint8)
    x, y = ref.astype(np.float64) / 255, inp.astype(np.float64) / 255
    # StableSR's form: the refined picture's high band plus the input's low band, each from its own cascade
    low = lambda a: np.stack([_scipy_lowpass(a[..., c], 3) for c in range(3)], -1)  # noqa: E731
    expected = np.round(((x - low(x)) + low(y)) * 255).clip(0, 255).astype(np.uint8)
    assert np.array_equal(wavelet_color_fix([ref], [inp], levels=3)[0], expected)


def test_adain_matches_the_inputs_moments():
    rng = np.random.default_rng(3)
    inp = rng.integers(30, 220, size=(20, 20, 3)).astype(np.uint8)
    ref = (rng.integers(0, 256, size=(20, 20, 3)) * 0.5 + 10).astype(np.uint8)
    out = adain_color_fix([ref], [inp])[0].astype(np.float64)
    np.testing.assert_allclose(out.mean((0, 1)), inp.mean((0, 1)), atol=0.6)  # rounding to uint8 only
    np.testing.assert_allclose(out.std((0, 1), ddof=1), inp.std((0, 1), ddof=1), rtol=0.02)
    # an image that is already the input comes back unchanged (up to the eps inside the std)
    assert np.abs(adain_color_fix([inp], [inp])[0].astype(int) - inp).max() <= 1


def test_dispatch_and_errors():
    img = np.zeros((8, 8, 3), np.uint8)
    other = np.full((8, 8, 3), 7, np.uint8)
    assert color_fix([img], [other], "none")[0] is img
    assert np.array_equal(color_fix([img], [other], "wavelet", 2)[0], other)
    with pytest.raises(SettingError, match="color_fix must be one of"):
        color_fix([img], [other], "hist")
    with pytest.raises(SettingError, match="levels must be an int >= 1"):
        wavelet_color_fix([img], [other], levels=0)
    with pytest.raises(ValueError, match="same-size uint8"):
        wavelet_color_fix([img], [np.zeros((8, 9, 3), np.uint8)])


def test_max_shift_caps_the_move_toward_the_inputs_low_band():
    rng = np.random.default_rng(4)
    inp = rng.integers(60, 190, size=(24, 24, 3)).astype(np.uint8)
    ref = inp.copy()
    ref[8:16, 8:16] = np.clip(ref[8:16, 8:16].astype(int) + 60, 0, 255)  # a large local change (a "fix")
    drift = (ref.astype(int) + 5).astype(np.uint8)  # plus a small colour drift everywhere
    full = wavelet_color_fix([drift], [inp], levels=2)[0].astype(int)
    capped = wavelet_color_fix([drift], [inp], levels=2, max_shift=8)[0].astype(int)
    moved = capped - drift.astype(int)
    assert np.abs(moved).max() <= 8  # (the cap is exact before rounding: |shift| <= 8 / 255)
    # away from the change, the drift is removed exactly under the cap; inside it only 8 levels come back
    assert np.array_equal(capped[:3, :3], inp[:3, :3].astype(int))
    assert (full[11:13, 11:13] - drift[11:13, 11:13].astype(int)).min() < -8
    with pytest.raises(SettingError, match="max_shift"):
        wavelet_color_fix([drift], [inp], max_shift=0)


@pytest.mark.parametrize("levels", [1, 3])
def test_bands_equal_the_whole_image(levels):
    rng = np.random.default_rng(5)
    inp = rng.integers(0, 256, size=(37, 19, 3)).astype(np.uint8)
    ref = rng.integers(0, 256, size=(37, 19, 3)).astype(np.uint8)
    whole = wavelet_color_fix([ref], [inp], levels=levels, band_rows=1000)[0]
    for rows in (1, 5, 16):
        assert np.array_equal(wavelet_color_fix([ref], [inp], levels=levels, band_rows=rows)[0], whole)


def test_settings_object_checks_labels_and_digests():
    from refiner.artifacts.color_fix import ColorFix
    from refiner.settings import from_config

    default = from_config(ColorFix, None, "color_fix.")
    assert (default.method, default.levels, default.max_shift, default.active) == ("none", 3, 8.0, False)
    assert default.digest() == {}  # off: digests of runs without it stay as they were
    fix = from_config(ColorFix, {"method": "wavelet", "levels": 4, "max_shift": None}, "color_fix.")
    assert fix.label() == "colour fix (wavelet, 4 levels, uncapped)"
    assert fix.digest() == {"method": "wavelet", "levels": 4, "max_shift": None}
    assert from_config(ColorFix, {"method": "adain", "levels": 9}, "color_fix.").digest() == {"method": "adain"}
    rng = np.random.default_rng(6)
    a, b = (rng.integers(0, 256, (12, 12, 3)).astype(np.uint8) for _ in range(2))
    assert np.array_equal(fix([a], [b])[0], wavelet_color_fix([a], [b], levels=4)[0])
    for bad, message in [({"method": "hsv"}, "color_fix.method must be one of"),
                         ({"levels": 0}, "color_fix.levels must be in"), ({"levels": 2.5}, "must be an integer"),
                         ({"max_shift": 0}, "max_shift must be > 0"), ({"max_shift": 300}, "max_shift must be in"),
                         ({"strength": 1}, "unknown setting color_fix.strength")]:
        with pytest.raises(SettingError, match=message):
            from_config(ColorFix, bad, "color_fix.")
