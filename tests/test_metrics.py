"""Tests for refiner.metrics against hand-computed values and closed forms."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from refiner.metrics import (
    _sort_rows,
    evaluate_pairs,
    fid_kid,
    laplacian_pyramid,
    psnr,
    reconstruct_laplacian_pyramid,
    sliced_wasserstein,
    ssim,
    swd,
)

FAST = dict(patches_per_level=1024, directions_per_repeat=64, repeats=2)


def _tiles() -> torch.Tensor:
    """Eight 64x64 crops of scikit-image's astronaut (ships with the package, no download)."""
    from skimage import data

    img = torch.from_numpy(data.astronaut()).permute(2, 0, 1).double() / 255
    return torch.stack([img[:, y : y + 64, x : x + 64] for y in (64, 192, 320, 448) for x in (64, 320)])


def _noisy(x, sigma, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (x + sigma * torch.randn(x.shape, generator=g, dtype=x.dtype)).clamp(0, 1)


def _box_blur(x, times):
    for _ in range(times):
        x = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), 3, stride=1)
    return x


# ------------------------------------------------------------------------------------------- PSNR, SSIM
def test_psnr_hand_values():
    a = torch.full((2, 3, 8, 8), 0.5, dtype=torch.float64)
    b = a.clone()
    b[0] += 0.1  # MSE 0.01 -> 10 log10(1 / 0.01) = 20 dB
    b[1] += 0.01  # MSE 1e-4 -> 40 dB
    p = psnr(a, b)
    assert p.shape == (2,)
    assert p.tolist() == pytest.approx([20.0, 40.0], abs=1e-4)  # torchmetrics uses a float32 log(10)


def test_ssim_in_float32_agrees_with_float64():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(4, 3, 32, 32, generator=g, dtype=torch.float64)
    b = (a + 0.1 * torch.randn(a.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    fast, exact = ssim(a, b, dtype=torch.float32), ssim(a, b)
    assert fast.dtype == torch.float64 and (fast - exact).abs().max() < 1e-5 and (exact < 0.95).all()


def test_ssim_constant_images_hand_value():
    # constant images: variance/covariance terms are (0 + C2)/(0 + C2) = 1, only luminance remains
    a = torch.full((1, 3, 16, 16), 0.5, dtype=torch.float64)
    b = torch.full((1, 3, 16, 16), 0.6, dtype=torch.float64)
    c1 = (0.01 * 1.0) ** 2
    expected = (2 * 0.5 * 0.6 + c1) / (0.5**2 + 0.6**2 + c1)
    assert ssim(a, b).item() == pytest.approx(expected, rel=1e-9)
    x = _tiles()[:2]
    assert ssim(x, x).tolist() == pytest.approx([1.0, 1.0])
    assert (ssim(x, _noisy(x, 0.1)) < 0.9).all()


def test_image_validation():
    x = torch.rand(1, 3, 16, 16)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        psnr(x * 2 - 1, x)
    with pytest.raises(ValueError, match="equal shapes"):
        psnr(x, torch.rand(1, 3, 16, 8))
    with pytest.raises(ValueError, match="channels"):
        ssim(torch.rand(1, 1, 16, 16), torch.rand(1, 1, 16, 16))
    with pytest.raises(ValueError, match="11x11"):
        ssim(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8))


# ------------------------------------------------------------------------------------ Laplacian pyramid
@pytest.mark.parametrize("shape, sizes", [((2, 3, 64, 64), [64, 32, 16]), ((1, 3, 45, 37), [37, 19])])
def test_laplacian_pyramid_reconstructs_exactly(shape, sizes):
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    pyr = laplacian_pyramid(x, min_size=16)
    assert [min(level.shape[-2:]) for level in pyr] == sizes
    torch.testing.assert_close(reconstruct_laplacian_pyramid(pyr), x, rtol=0, atol=1e-12)
    # the band-pass levels carry detail: a constant image has exactly zero bands
    const = laplacian_pyramid(torch.full(shape, 0.3, dtype=torch.float64))
    assert all(band.abs().max() < 1e-12 for band in const[:-1])
    torch.testing.assert_close(const[-1], torch.full_like(const[-1], 0.3))
    # and the low-pass residual is a blurred, downsampled copy, not the image itself
    assert pyr[0].abs().mean() > 0.05


# ------------------------------------------------------------------------------ sliced Wasserstein core
def test_sliced_wasserstein_1d_equals_exact_w1():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(257, 1, generator=g, dtype=torch.float64)
    b = torch.rand(257, 1, generator=g, dtype=torch.float64) * 3
    # exact 1-D W1 of equal-size empirical measures: match sorted samples (by hand, plain python)
    sa, sb = sorted(a.flatten().tolist()), sorted(b.flatten().tolist())
    exact = sum(abs(u - v) for u, v in zip(sa, sb)) / len(sa)
    assert sliced_wasserstein(a, b, 16, 2, g).item() == pytest.approx(exact, rel=1e-12)


def test_sliced_wasserstein_shift_closed_form():
    # B = A + delta * 1: every projection shifts by delta * <u, 1>, so SW1 = delta * E|<u, 1>|
    # = delta * sqrt(D) * E|u_1| with E|u_1| = Gamma(D/2) / (sqrt(pi) Gamma((D+1)/2)) for u uniform on S^{D-1}
    D, delta = 5, 0.7
    g = torch.Generator().manual_seed(1)
    a = torch.randn(500, D, generator=g, dtype=torch.float64)
    expected = delta * math.sqrt(D) * math.gamma(D / 2) / (math.sqrt(math.pi) * math.gamma((D + 1) / 2))
    got = sliced_wasserstein(a, a + delta, 512, 8, g).item()
    assert got == pytest.approx(expected, rel=0.03)
    with pytest.raises(ValueError, match="equal shape"):
        sliced_wasserstein(a, a[:10])


def test_sliced_wasserstein_float32_matches_float64_and_sort_is_exact():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(300, 6, generator=g, dtype=torch.float64)
    b = torch.randn(300, 6, generator=g, dtype=torch.float64) * 1.5 + 0.3
    d64 = sliced_wasserstein(a, b, 32, 2, torch.Generator().manual_seed(5)).item()
    d32 = sliced_wasserstein(a, b, 32, 2, torch.Generator().manual_seed(5), dtype=torch.float32).item()
    assert d32 == pytest.approx(d64, rel=1e-5) and d32 != d64
    # the CPU sort path (NumPy) gives exactly torch.sort's order
    x = torch.randn(7, 1001, generator=g)
    assert torch.equal(_sort_rows(x), torch.sort(x, dim=1).values)


# ------------------------------------------------------------------------------------------------- SWD
def test_swd_self_is_zero_and_grows_with_noise():
    x = _tiles()
    same = swd(x, x, **FAST)
    assert same["mean"] == 0.0 and list(same["levels"]) == ["64x64", "32x32", "16x16"]
    noise = [swd(_noisy(x, s), x, **FAST)["mean"] for s in (0.01, 0.05, 0.2)]
    assert all(a < b for a, b in zip(noise, noise[1:])), noise
    assert noise[0] > 1.0
    # a different sample of the same distribution is closer than a degraded one
    assert swd(x[:4], x[4:], **FAST)["mean"] < swd(_noisy(x[:4], 0.2), x[4:], **FAST)["mean"]


def test_swd_grows_with_blur():
    x = _tiles()
    blur = [swd(_box_blur(x, k), x, **FAST)["mean"] for k in (1, 2, 4)]
    assert all(a < b for a, b in zip(blur, blur[1:])), blur
    assert blur[0] > 1.0


def test_swd_normalisation_modes():
    x = _tiles()[:4]
    dimmer = x * 0.7 + 0.1  # per-channel affine change
    per_set = swd(dimmer, x, **FAST)["mean"]
    joint = swd(dimmer, x, normalize="joint", **FAST)["mean"]
    assert per_set < 1e-6  # the paper's per-set normalisation is blind to contrast changes
    assert joint > 10.0
    with pytest.raises(ValueError, match="normalize"):
        swd(x, x, normalize="none")


def test_swd_reproducible_and_small_sets():
    x = _tiles()[:2, :, :32, :32]  # two 32x32 images: levels 32 and 16
    y = _noisy(x, 0.05)
    r1 = swd(x, y, generator=torch.Generator().manual_seed(3), **FAST)
    r2 = swd(x, y, generator=torch.Generator().manual_seed(3), **FAST)
    r3 = swd(x, y, generator=torch.Generator().manual_seed(4), **FAST)
    assert r1 == r2 and r1 != r3
    assert list(r1["levels"]) == ["32x32", "16x16"]
    assert swd(x, y)["patches_per_level"] == 4096  # small sets still get enough patches
    assert swd(x[:1], y, **FAST)["mean"] > 0  # unequal set sizes work
    with pytest.raises(ValueError, match="equal"):
        swd(x, _tiles()[:2])
    with pytest.raises(ValueError, match="smaller than min_size"):
        swd(x[..., :8, :8], x[..., :8, :8])


# ------------------------------------------------------------------------------------------- reporting
def test_evaluate_pairs_json_and_values():
    clean = _tiles()[:3]
    degraded = _noisy(clean, 0.1)
    refined = _noisy(clean, 0.02, seed=1)
    res = evaluate_pairs(degraded, refined, clean, swd_kwargs=FAST)
    json.dumps(res, allow_nan=False)
    d, r = res["degraded_vs_clean"], res["refined_vs_clean"]
    assert d["psnr"] == pytest.approx(psnr(degraded, clean).mean().item())
    assert d["psnr_per_image"] == pytest.approx(psnr(degraded, clean).tolist())
    assert d["ssim"] == pytest.approx(ssim(degraded, clean).mean().item())
    assert d["swd_x1e3"] == pytest.approx(swd(degraded, clean, **FAST)["mean"])
    assert r["psnr"] > d["psnr"] and r["ssim"] > d["ssim"] and r["swd_x1e3"] < d["swd_x1e3"]
    perfect = evaluate_pairs(degraded[:1], clean[:1], clean[:1], swd_kwargs=FAST)["refined_vs_clean"]
    assert perfect["psnr"] == "inf" and perfect["swd_x1e3"] == 0.0
    json.dumps(perfect, allow_nan=False)
    with pytest.raises(ValueError, match="equal shapes"):
        evaluate_pairs(degraded[:2], refined, clean)


# --------------------------------------------------------------------------------------------- FID/KID
def test_fid_kid_refuses_without_local_weights(tmp_path):
    x = torch.rand(2, 3, 32, 32)
    with pytest.raises(ValueError, match="local Inception weights"):
        fid_kid(x, x, None)
    with pytest.raises(FileNotFoundError, match="not found"):
        fid_kid(x, x, tmp_path / "missing.pth")
    from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

    if not _TORCH_FIDELITY_AVAILABLE:
        fake = tmp_path / "weights.pth"
        fake.write_bytes(b"not weights")
        with pytest.raises(ModuleNotFoundError, match="torch-fidelity"):
            fid_kid(x, x, fake)
