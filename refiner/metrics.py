"""Image-quality metrics that need no downloaded network: PSNR, SSIM, sliced Wasserstein distance.

Images are float tensors in [0, 1] of shape (B, C, H, W) (C=3 for PSNR/SSIM reporting).
FID/KID are available through :func:`fid_kid` only when local Inception weights are supplied.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor
from torchmetrics.functional.image import (
    peak_signal_noise_ratio,
    structural_similarity_index_measure,
)

from refiner.io import json_float


# ------------------------------------------------------------------------------------------ input checks
def _check_images(name: str, x: Tensor, channels: int | None = 3) -> None:
    if not isinstance(x, Tensor) or x.ndim != 4:
        raise ValueError(f"{name}: expected a (B, C, H, W) tensor, got {getattr(x, 'shape', type(x).__name__)}")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"{name}: expected {channels} channels in (B, C, H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name}: expected a float tensor in [0, 1], got dtype {x.dtype}")
    lo, hi = x.min().item(), x.max().item()
    if lo < -1e-4 or hi > 1 + 1e-4:
        raise ValueError(f"{name}: expected values in [0, 1], got range [{lo:.4g}, {hi:.4g}] (convert from [-1, 1]?)")


def _check_pair(a: Tensor, b: Tensor, channels: int | None = 3) -> None:
    _check_images("a", a, channels)
    _check_images("b", b, channels)
    if a.shape != b.shape:
        raise ValueError(f"image pairs must have equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")


# ------------------------------------------------------------------------------------------- PSNR, SSIM
def psnr(a: Tensor, b: Tensor) -> Tensor:
    """Per-image PSNR in dB, shape (B,), for images in [0, 1] (torchmetrics, data_range=1). ``.mean()``
    gives the set mean. Identical images give +inf."""
    _check_pair(a, b)
    return peak_signal_noise_ratio(a.double(), b.double(), data_range=1.0, reduction="none", dim=(1, 2, 3))


def ssim(a: Tensor, b: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """Per-image SSIM, shape (B,) (torchmetrics: Gaussian window 11, sigma 1.5, data_range=1).
    Images must be at least 11x11. ``dtype=torch.float32`` is several times faster on CPU (float64
    convolutions have no vectorised kernel) and agrees to about 1e-6; the benchmark uses it."""
    _check_pair(a, b)
    if min(a.shape[-2:]) < 11:
        raise ValueError(f"ssim needs images of at least 11x11 (its Gaussian window), got {tuple(a.shape[-2:])}")
    return structural_similarity_index_measure(a.to(dtype), b.to(dtype), data_range=1.0, reduction="none").double()


# ------------------------------------------------------------------------------------ Laplacian pyramid
_BINOMIAL_5 = (1 / 16, 4 / 16, 6 / 16, 4 / 16, 1 / 16)


def _blur(x: Tensor, gain: float = 1.0) -> Tensor:
    """Separable 5-tap binomial blur ([1,4,6,4,1]/16 per axis, times ``gain``), reflect padding
    (replicate if tiny). Written as shifted sums: float64 depthwise conv2d is very slow on CPU."""
    mode = "reflect" if min(x.shape[-2:]) > 2 else "replicate"
    xp = F.pad(x, (2, 2, 2, 2), mode=mode)
    H, W = x.shape[-2:]
    rows = sum(k * xp[..., i : i + H, :] for i, k in enumerate(_BINOMIAL_5))
    return gain * sum(k * rows[..., :, j : j + W] for j, k in enumerate(_BINOMIAL_5))


def pyr_down(x: Tensor) -> Tensor:
    """Blur then keep every second pixel: (H, W) -> (ceil(H/2), ceil(W/2)) (Burt & Adelson 1983)."""
    return _blur(x)[..., ::2, ::2]


def pyr_up(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Zero-insertion upsampling to ``size`` followed by the binomial blur with gain 4."""
    h, w = size
    if (h + 1) // 2 != x.shape[-2] or (w + 1) // 2 != x.shape[-1]:
        raise ValueError(f"pyr_up: cannot upsample {tuple(x.shape[-2:])} to {size}")
    up = x.new_zeros(*x.shape[:-2], h, w)
    up[..., ::2, ::2] = x
    return _blur(up, gain=4.0)


def laplacian_pyramid(x: Tensor, min_size: int = 16) -> list[Tensor]:
    """``[L_0, L_1, ..., G_K]``: band-pass levels ``L_k = G_k - pyr_up(G_{k+1})`` from full resolution
    down, then the low-pass residual ``G_K``, whose smaller side is the last one >= ``min_size``
    (Karras et al. 2018 stop at 16x16)."""
    if min(x.shape[-2:]) < min_size:
        raise ValueError(f"laplacian_pyramid: image {tuple(x.shape[-2:])} is smaller than min_size={min_size}")
    levels, g = [], x
    while min((s + 1) // 2 for s in g.shape[-2:]) >= min_size:
        down = pyr_down(g)
        levels.append(g - pyr_up(down, tuple(g.shape[-2:])))
        g = down
    levels.append(g)
    return levels


def reconstruct_laplacian_pyramid(levels: list[Tensor]) -> Tensor:
    """Inverse of :func:`laplacian_pyramid` (exact up to float rounding): upsample and add."""
    x = levels[-1]
    for band in reversed(levels[:-1]):
        x = pyr_up(x, tuple(band.shape[-2:])) + band
    return x


# ------------------------------------------------------------------------------ sliced Wasserstein (SWD)
def _sort_rows(x: Tensor) -> Tensor:
    """Each row sorted ascending. On CPU through NumPy: for (128, 8192) rows its vectorised sort took 12 ms
    (float32) and 38 ms (float64) here against 190-200 ms for ``torch.sort``, with identical results (sorting
    is exact); the sorts were 80% of an SWD."""
    if x.device.type == "cpu" and not x.requires_grad:
        return torch.from_numpy(np.sort(x.numpy(), axis=1))
    return torch.sort(x, dim=1).values


def sliced_wasserstein(
    a: Tensor, b: Tensor, directions_per_repeat: int = 128, repeats: int = 4, generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """Sliced Wasserstein-1 distance between two equal-size point clouds ``a, b`` of shape (N, D).

    For each of ``repeats`` batches, draw ``directions_per_repeat`` random unit directions, project,
    sort each projection (the 1-D optimal coupling of equal-size empirical measures), take the mean
    absolute difference; average over all directions (Karras et al. 2018, appendix D). The directions are
    drawn in float64 whatever ``dtype`` the projections and sorts use, so both dtypes see the same directions.
    """
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"sliced_wasserstein needs two (N, D) clouds of equal shape, got {tuple(a.shape)}, {tuple(b.shape)}")
    a, b = a.to(dtype), b.to(dtype)
    total = torch.zeros((), dtype=torch.float64, device=a.device)
    for _ in range(repeats):
        dirs = torch.randn(a.shape[1], directions_per_repeat, generator=generator, dtype=torch.float64).to(a.device)
        dirs = (dirs / dirs.norm(dim=0, keepdim=True)).to(dtype)
        # (directions, N), contiguous along the sorted axis (much faster than sorting dim 0)
        pa, pb = _sort_rows((a @ dirs).T.contiguous()), _sort_rows((b @ dirs).T.contiguous())
        total = total + (pa - pb).abs().mean().double()
    return total / repeats


def _sample_patches(level: Tensor, n: int, size: int, generator: torch.Generator) -> Tensor:
    """``n`` random ``size x size`` neighbourhoods (image, y, x drawn uniformly): (n, C, size, size)."""
    B, C, H, W = level.shape
    img = torch.randint(0, B, (n,), generator=generator)
    ys = torch.randint(0, H - size + 1, (n,), generator=generator)
    xs = torch.randint(0, W - size + 1, (n,), generator=generator)
    offs = torch.arange(size)
    rows = (ys[:, None] + offs)[:, :, None]  # (n, size, 1)
    cols = (xs[:, None] + offs)[:, None, :]  # (n, 1, size)
    dev = level.device
    patches = level[img[:, None, None].to(dev), :, rows.to(dev), cols.to(dev)]  # (n, size, size, C)
    return rearrange(patches, "n h w c -> n c h w")


def _normalize_channels(desc: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    return (desc - mean) / std.clamp_min(1e-12)


def _channel_stats(desc: Tensor) -> tuple[Tensor, Tensor]:
    return desc.mean(dim=(0, 2, 3), keepdim=True), desc.std(dim=(0, 2, 3), keepdim=True)


def swd(
    images_a: Tensor,
    images_b: Tensor,
    patches_per_level: int | None = None,
    patch_size: int = 7,
    min_size: int = 16,
    directions_per_repeat: int = 128,
    repeats: int = 4,
    normalize: Literal["per_set", "joint"] = "per_set",
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
) -> dict:
    """Sliced Wasserstein distance between two image sets on Laplacian-pyramid patches, x1e3.

    Follows Karras et al. 2018 ("Progressive Growing of GANs", appendix D): for each level of a
    Laplacian pyramid (5-tap binomial, down to ``min_size``), sample random ``patch_size``^2
    neighbourhoods ("descriptors", 7x7xC), normalise each channel by the mean/std over the set
    (``normalize="per_set"``, as in the paper; ``"joint"`` uses the pooled statistics of both sets,
    which keeps contrast/scale differences visible), flatten, and compute the sliced Wasserstein
    distance with ``repeats`` x ``directions_per_repeat`` random directions (4 x 128 in the paper).

    Hand-written because torchmetrics has no SWD and the reference implementation is TF/NumPy.

    * Small sets: ``patches_per_level`` defaults to ``max(4096, 128 * max(len(a), len(b)))`` (the paper
      takes 128 per image); patches are drawn uniformly over (image, y, x) with replacement.
    * Reproducible: everything is drawn from ``generator`` (seed 0 if None). Both sets use the *same*
      patch positions when they have equal size (common random numbers), so ``swd(x, x) == 0`` and
      paired comparisons (degraded vs clean) have low variance.

    * ``dtype``: of the projections and sorts (the pyramid and the patch statistics stay float64).
      ``torch.float32`` is about twice as fast on CPU and agrees with float64 to 1e-5 relative (tested).

    Returns ``{"levels": {"HxW": swd_x1e3, ...} (finest first), "mean": average over levels,
    "patches_per_level": n}`` with plain floats.
    """
    _check_images("images_a", images_a, channels=None)
    _check_images("images_b", images_b, channels=None)
    if images_a.shape[1:] != images_b.shape[1:]:
        raise ValueError(f"swd needs image sets of equal (C, H, W), got {tuple(images_a.shape[1:])} "
                         f"and {tuple(images_b.shape[1:])}")
    if normalize not in ("per_set", "joint"):
        raise ValueError(f"swd: normalize must be 'per_set' or 'joint', got {normalize!r}")
    if min_size < patch_size:
        raise ValueError(f"swd: min_size={min_size} must be >= patch_size={patch_size}")
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    n = patches_per_level or max(4096, 128 * max(len(images_a), len(images_b)))
    position_seed = int(torch.randint(0, 2**62, (1,), generator=generator))

    pyr_a = laplacian_pyramid(images_a.double(), min_size)
    pyr_b = laplacian_pyramid(images_b.double(), min_size)
    levels = {}
    for k, (la, lb) in enumerate(zip(pyr_a, pyr_b)):
        da = _sample_patches(la, n, patch_size, torch.Generator().manual_seed(position_seed + 2 * k))
        seed_b = position_seed + 2 * k + (0 if len(images_a) == len(images_b) else 1)
        db = _sample_patches(lb, n, patch_size, torch.Generator().manual_seed(seed_b))
        if normalize == "per_set":
            da, db = _normalize_channels(da, *_channel_stats(da)), _normalize_channels(db, *_channel_stats(db))
        else:
            stats = _channel_stats(torch.cat([da, db]))
            da, db = _normalize_channels(da, *stats), _normalize_channels(db, *stats)
        dist = sliced_wasserstein(da.flatten(1), db.flatten(1), directions_per_repeat, repeats, generator, dtype)
        levels[f"{la.shape[-2]}x{la.shape[-1]}"] = float(dist) * 1e3
    return {"levels": levels, "mean": sum(levels.values()) / len(levels), "patches_per_level": n}


# ------------------------------------------------------------------------------------------- reporting
def compare(images: Tensor, reference: Tensor, swd_kwargs: dict | None = None) -> dict:
    """PSNR/SSIM (mean and per image) and SWD of ``images`` against ``reference``; JSON-serialisable."""
    p, s = psnr(images, reference), ssim(images, reference)
    d = swd(images, reference, **(swd_kwargs or {}))
    return {
        "psnr": json_float(float(p.mean())),
        "psnr_per_image": [json_float(float(v)) for v in p],
        "ssim": float(s.mean()),
        "ssim_per_image": [float(v) for v in s],
        "swd_x1e3": d["mean"],
        "swd_x1e3_levels": d["levels"],
    }


def evaluate_pairs(degraded: Tensor, refined: Tensor, clean: Tensor, swd_kwargs: dict | None = None) -> dict:
    """``{"degraded_vs_clean": {...}, "refined_vs_clean": {...}}`` with the metrics of :func:`compare`.

    The SWD of both comparisons uses the same seed (``swd_kwargs`` may set ``generator``/others; a
    fresh seed-0 generator is used for each comparison by default) so the two numbers are comparable.
    """
    if not degraded.shape == refined.shape == clean.shape:
        raise ValueError(f"evaluate_pairs needs equal shapes, got degraded {tuple(degraded.shape)}, "
                         f"refined {tuple(refined.shape)}, clean {tuple(clean.shape)}")
    kwargs = dict(swd_kwargs or {})
    seed = kwargs.pop("seed", 0)
    results = {}
    for name, images in (("degraded_vs_clean", degraded), ("refined_vs_clean", refined)):
        results[name] = compare(images, clean, {**kwargs, "generator": torch.Generator().manual_seed(seed)})
    return results


# --------------------------------------------------------------------------------------------- FID/KID
def fid_kid(
    images_a: Tensor,
    images_b: Tensor,
    inception_weights_path: str | Path | None,
    kid_subset_size: int | None = None,
) -> dict:
    """FID and KID (torchmetrics) between ``images_a`` (treated as real) and ``images_b``, in [0, 1].

    Needs local Inception weights in torch-fidelity's format (``pt_inception-2015-12-05-*.pth``),
    passed as ``feature_extractor_weights_path`` so nothing is downloaded, and the ``torch-fidelity``
    package. KID reuses FID's feature extractor (torchmetrics' KID takes no weights path).
    Raises a clear error instead of downloading when either is missing.
    """
    if inception_weights_path is None:
        raise ValueError(
            "fid_kid needs local Inception weights: pass inception_weights_path=<pt_inception-2015-12-05 .pth "
            "file in torch-fidelity format>. Nothing is downloaded at run time; use swd/psnr/ssim otherwise."
        )
    path = Path(inception_weights_path)
    if not path.is_file():
        raise FileNotFoundError(f"fid_kid: Inception weights file not found: {path}")
    from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

    if not _TORCH_FIDELITY_AVAILABLE:
        raise ModuleNotFoundError(
            "fid_kid needs the torch-fidelity package (torchmetrics' Inception feature extractor). "
            "Install it with `pip install torch-fidelity`; note it depends on torchvision, which must match "
            "your torch build (on this project's CPU torch 2.13 env a torchvision install breaks torch, see FACTS.md)."
        )
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    _check_images("images_a", images_a)
    _check_images("images_b", images_b)
    fid = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(path))
    n = min(len(images_a), len(images_b))
    kid = KernelInceptionDistance(feature=fid.inception, subset_size=kid_subset_size or min(1000, n))
    to_uint8 = lambda x: (x.clamp(0, 1) * 255).round().to(torch.uint8)  # noqa: E731
    for images, real in ((images_a, True), (images_b, False)):
        fid.update(to_uint8(images), real=real)
        kid.update(to_uint8(images), real=real)
    kid_mean, kid_std = kid.compute()
    return {"fid": float(fid.compute()), "kid_mean": float(kid_mean), "kid_std": float(kid_std)}
