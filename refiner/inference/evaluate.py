"""``mode=evaluate`` of refine.py: metrics of degraded-vs-clean and refined-vs-clean, and their table."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from refiner.io import json_float
from refiner.metrics import evaluate_pairs, fid_kid, psnr, ssim

MIN_EVAL_SIDE = 11  # SSIM's Gaussian window (torchmetrics, kernel 11)


def _center_crop(x: Tensor, size: tuple[int, int]) -> Tensor:
    h, w = x.shape[-2:]
    top, left = (h - size[0]) // 2, (w - size[1]) // 2
    return x[..., top:top + size[0], left:left + size[1]]


def _unit(img: np.ndarray) -> Tensor:
    """uint8 (H, W, 3) -> float64 (3, H, W) in [0, 1] (the metrics' range)."""
    return torch.from_numpy(np.array(img, copy=True)).permute(2, 0, 1).double() / 255.0


def evaluate(clean: Sequence[np.ndarray], degraded: Sequence[np.ndarray], refined: Sequence[np.ndarray],
             swd_kwargs: dict | None = None, inception_weights: str | None = None) -> dict:
    """Metrics of degraded-vs-clean and refined-vs-clean (:func:`refiner.metrics.evaluate_pairs`).

    Images of different sizes: SWD (and FID/KID) use all images center-cropped to the smallest common
    ``H x W``; PSNR/SSIM are always per image on the full image (their means are over images).
    """

    crop = (min(c.shape[0] for c in clean), min(c.shape[1] for c in clean))
    stack = lambda imgs: torch.stack([_center_crop(_unit(i), crop) for i in imgs]).float()  # noqa: E731
    c, d, r = stack(clean), stack(degraded), stack(refined)
    result = evaluate_pairs(d, r, c, swd_kwargs=swd_kwargs)
    same_size = all(img.shape == clean[0].shape for img in clean)
    if not same_size:
        for key, images in (("degraded_vs_clean", degraded), ("refined_vs_clean", refined)):
            p = [float(psnr(_unit(a)[None], _unit(b)[None])[0]) for a, b in zip(images, clean)]
            s = [float(ssim(_unit(a)[None], _unit(b)[None])[0]) for a, b in zip(images, clean)]
            result[key].update(psnr=json_float(sum(p) / len(p)), psnr_per_image=[json_float(v) for v in p],
                               ssim=sum(s) / len(s), ssim_per_image=s)
    result["swd_crop_size"] = list(crop)
    result["all_same_size"] = same_size
    if inception_weights:
        result["degraded_vs_clean"].update(fid_kid(c, d, inception_weights))
        result["refined_vs_clean"].update(fid_kid(c, r, inception_weights))
    return result


def format_metrics_table(metrics: dict) -> str:
    """The metrics of :func:`evaluate` as a plain-text table (degraded vs refined per metric)."""
    d, r = metrics["degraded_vs_clean"], metrics["refined_vs_clean"]
    rows = [("PSNR (dB)", "psnr"), ("SSIM", "ssim"), ("SWD x1e3", "swd_x1e3"), ("FID", "fid"), ("KID", "kid_mean")]
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = [f"{'metric':<12}{'degraded':>12}{'refined':>12}"]
    lines += [f"{label:<12}{fmt(d[key]):>12}{fmt(r[key]):>12}" for label, key in rows if key in d]
    return "\n".join(lines)
