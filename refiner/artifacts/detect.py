"""Artifact masks from what a sampler did: ASCED as its paper states it and as its public code does it.

ASCED (Cao et al., "Temporal Score Analysis for Understanding and Correcting Diffusion Artifacts", CVPR 2025,
arXiv 2503.16218; code YuCao16/ASCED) flags the regions whose prediction changes abnormally from one sampling step to
the next in the "mutation" phase above the correction step ``T_c``. The two versions differ (``../shared/FACTS.md``):

* :func:`asced_paper_mask` (paper): on latents. The weighted score ``g_t = w(t) s_theta`` of
  :mod:`refiner.artifacts.dynamics`; its change between consecutive steps ``d_i = |g_{t_i} - g_{t_{i-1}}|`` (the L2
  norm over channels, per latent pixel); the score bank = the ``d_i`` with ``T_c < t_i <= T_d``; per image the
  threshold ``tau = max(MAD(bank), mean(bank))`` (the paper's rule; ``scale`` multiplies it, 1 = the paper); the mask
  is the union over the bank of ``d_i > tau``.
* :func:`pixel_change_mask` (public code, ``src/detection.py:get_artifact_mask``): on decoded pictures in uint8. The
  absolute difference of consecutive frames; a Gaussian blur (``sigma`` 2, applied to all three array axes, colour
  included, as ``scipy.ndimage.gaussian_filter`` does there); per frame the threshold ``median + 3 * 1.4826 * MAD``
  over the whole difference and the flag ``max over colour > threshold``; the OR over frames; connected components
  kept when ``100 < area < 10000`` px and when they survive a ``5 x 5`` erosion; then a dilation by ``5`` px (the
  code's correction step, ``src/correction.py:expand_mask``). The code ran on 256 px FFHQ: :class:`PixelChangeConfig`
  scales every length (``sigma``, erosion, dilation) by ``side / 256`` and the areas by its square, which leaves the
  code's numbers unchanged at 256 px.

The defaults follow the public code for pixel masks (its constants, scaled) and the paper for latent masks. The
same pixel rule applied to the two frames ``[input, the model's x0 prediction]`` is the *residual* detector
(:func:`residual_mask`): where the denoiser wants to change the picture.

Every detector returns a :class:`Detection`: a boolean mask per image at latent and pixel resolution and a severity
per image, an absolute measure of how much the watched trajectory moved (the paper rule: the mean of the bank; the
pixel rules: the mean absolute change between consecutive frames, on the [0, 1] scale). The flagged fraction is
:attr:`Detection.area`. An absolute severity ranks a picture that is broken everywhere above one with a small
defect; the masks' thresholds are relative to each picture and cannot.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

REFERENCE_SIDE = 256  # ASCED's public code ran on 256 x 256 FFHQ / LSUN


@dataclass
class Detection:
    """Per-image artifact masks: ``latent`` (B, h, w) and ``pixel`` (B, H, W) booleans, ``severity`` (B,) float (how
    much the watched trajectory moved, in the detector's own absolute units: see each detector), and the detector's
    name. :attr:`area` is the flagged fraction of each picture."""

    latent: Tensor
    pixel: Tensor
    severity: Tensor
    method: str

    def __len__(self) -> int:
        return self.pixel.shape[0]

    @property
    def area(self) -> Tensor:
        return self.pixel.float().mean(dim=(-2, -1))


def latent_from_pixel(mask: Tensor, factor: int) -> Tensor:
    """(B, H, W) bool -> (B, ceil(H/f), ceil(W/f)): a latent pixel is set when any pixel it covers is."""
    m = mask.float()[:, None]
    return F.max_pool2d(m, factor, factor, ceil_mode=True)[:, 0] > 0


def pixel_from_latent(mask: Tensor, factor: int, size: tuple[int, int] | None = None) -> Tensor:
    """(B, h, w) bool -> (B, h*f, w*f) by repetition, cropped to ``size``."""
    out = mask.repeat_interleave(factor, -2).repeat_interleave(factor, -1)
    return out if size is None else out[..., :size[0], :size[1]]


def detection(pixel: Tensor | None = None, latent: Tensor | None = None, *, factor: int, method: str,
              severity: Tensor, size: tuple[int, int] | None = None) -> Detection:
    """A :class:`Detection` from either resolution (the other is derived with ``factor``)."""
    if pixel is None:
        pixel = pixel_from_latent(latent, factor, size)
    if latent is None:
        latent = latent_from_pixel(pixel, factor)
    return Detection(latent.bool(), pixel.bool(), severity.float(), method)


def dilate(mask: Tensor, px: int) -> Tensor:
    """(B, H, W) bool grown by ``px`` pixels in every direction (a (2 px + 1)^2 square)."""
    if px <= 0:
        return mask.bool()
    return F.max_pool2d(mask.float()[:, None], 2 * px + 1, 1, px)[:, 0] > 0


# ------------------------------------------------------------------------------------------------- paper
def score_dynamics(timesteps: Sequence[int], scores: Sequence[Tensor]) -> tuple[list[int], Tensor]:
    """``d_i = || g_{t_i} - g_{t_{i-1}} ||_2`` over channels for consecutive recorded steps: returns the later step's
    t per change and a (K, B, h, w) tensor (K = steps - 1)."""
    if len(scores) < 2:
        raise ValueError(f"score dynamics need at least two recorded steps, got {len(scores)}")
    d = torch.stack([(b - a).norm(dim=1) for a, b in zip(scores, scores[1:])])
    return [int(t) for t in timesteps[1:]], d


def _mad(values: Tensor) -> Tensor:
    """Median absolute deviation along the last axis (no 1.4826 factor)."""
    med = values.median(dim=-1, keepdim=True).values
    return (values - med).abs().median(dim=-1).values


def asced_paper_mask(timesteps: Sequence[int], scores: Sequence[Tensor], *, t_correct: int, t_detect: int,
                     factor: int, size: tuple[int, int] | None = None, scale: float = 1.0) -> Detection:
    """ASCED's detector as the paper states it (module docstring), over the recorded steps ``timesteps`` (descending)
    and weighted scores ``scores`` (each (B, C, h, w), :class:`~refiner.artifacts.dynamics.StepRecorder`): the bank
    holds the changes whose later step lies in ``(t_correct, t_detect]``; ``tau = scale * max(MAD, mean)`` per image;
    the latent mask is the union of ``d > tau`` over the bank. ``factor`` (the first stage's) gives the pixel mask."""
    ts, d = score_dynamics(timesteps, scores)
    bank = [k for k, t in enumerate(ts) if t_correct < t <= t_detect]
    if not bank:
        raise ValueError(f"the score bank (t_correct={t_correct}, t_detect={t_detect}] holds no change between "
                         f"two recorded steps {list(timesteps)}; widen it or use more sampling steps")
    d = d[bank]                                           # (K, B, h, w)
    per_image = d.permute(1, 0, 2, 3).flatten(1)         # (B, K*h*w)
    tau = scale * torch.maximum(_mad(per_image), per_image.mean(dim=1))
    mask = (d > tau[None, :, None, None]).any(dim=0)
    return detection(latent=mask, factor=factor, method="asced", size=size, severity=per_image.mean(dim=1))


# ------------------------------------------------------------------------------------------------- code
@dataclass(frozen=True)
class PixelChangeConfig:
    """The public code's constants (``src/detection.py``, ``src/correction.py``) at ``REFERENCE_SIDE`` px: blur
    ``sigma``, the ``mad_scale`` of ``median + mad_scale * 1.4826 * MAD``, component areas strictly between
    ``min_area`` and ``max_area`` px, the ``min_width`` square erosion a component must survive, the ``dilate``
    radius. With ``scale_to_size`` they are rescaled to the image side (lengths by ``side/256``, areas by its
    square; widths at least 1 px). ``level`` (ours, not the code's): an absolute threshold on the blurred difference
    (0..255 scale) in place of the relative ``median + mad_scale * 1.4826 * MAD``; ``max_area`` may be ``inf``."""

    sigma: float = 2.0
    mad_scale: float = 3.0
    min_area: float = 100.0
    max_area: float = 10000.0
    min_width: int = 5
    dilate: int = 5
    scale_to_size: bool = True
    level: float | None = None

    def at(self, side: int) -> "PixelChangeConfig":
        if not self.scale_to_size:
            return self
        r = side / REFERENCE_SIDE
        return PixelChangeConfig(self.sigma * r, self.mad_scale, self.min_area * r * r, self.max_area * r * r,
                                 max(1, round(self.min_width * r)), round(self.dilate * r), False, self.level)


def _frame_uint8(x: Tensor) -> np.ndarray:
    """(3, H, W) in [-1, 1] -> (H, W, 3) float32 of the uint8 picture (the code compares saved frames)."""
    return np.round((x.clamp(-1, 1).float().cpu().numpy().transpose(1, 2, 0) + 1) * 127.5).astype(np.float32)


def pixel_change_mask_one(frames: Sequence[np.ndarray], cfg: PixelChangeConfig) -> np.ndarray:
    """The public code's rule for one image: ``frames`` are (H, W, 3) arrays on the 0..255 scale."""
    from scipy import ndimage

    mask = np.zeros(frames[0].shape[:2], dtype=bool)
    for a, b in zip(frames, frames[1:]):
        diff = ndimage.gaussian_filter(np.abs(b - a), sigma=cfg.sigma) if cfg.sigma > 0 else np.abs(b - a)
        if cfg.level is not None:
            threshold = cfg.level
        else:
            median = np.median(diff)
            threshold = median + cfg.mad_scale * 1.4826 * np.median(np.abs(diff - median))
        mask |= diff.max(axis=2) > threshold
    labels, count = ndimage.label(mask)
    if count:
        sizes = np.bincount(labels.ravel())[1:]
        keep = np.zeros(count + 1, dtype=bool)
        keep[1:] = (sizes > cfg.min_area) & (sizes < cfg.max_area)
        structure = np.ones((cfg.min_width, cfg.min_width), dtype=bool)
        for k in np.flatnonzero(keep):
            if not ndimage.binary_erosion(labels == k, structure=structure).any():
                keep[k] = False
        mask = keep[labels]
    if cfg.dilate > 0 and mask.any():
        mask = ndimage.binary_dilation(mask, structure=np.ones((2 * cfg.dilate + 1,) * 2, dtype=bool))
    return mask


def pixel_change_mask(frames: Sequence[Tensor], *, factor: int, cfg: PixelChangeConfig | None = None,
                      method: str = "asced_code") -> Detection:
    """ASCED's public-code detector (module docstring) over decoded frames, each (B, 3, H, W) in [-1, 1] (e.g. the
    x0 predictions of consecutive steps, decoded)."""
    if len(frames) < 2:
        raise ValueError(f"pixel_change_mask needs at least two frames, got {len(frames)}")
    cfg = (cfg or PixelChangeConfig()).at(max(frames[0].shape[-2:]))
    masks = [pixel_change_mask_one([_frame_uint8(f[b]) for f in frames], cfg) for b in range(frames[0].shape[0])]
    change = torch.stack([(b - a).abs().float().mean(dim=(1, 2, 3)) for a, b in zip(frames, frames[1:])]).mean(0)
    return detection(pixel=torch.from_numpy(np.stack(masks)), factor=factor, method=method, severity=change / 2)


# The threshold's k in median + k * 1.4826 * MAD: the public code's 3, and for the residual 6, chosen on the
# benchmark's split=tune (docs/experiments/artifacts.md). refine.py and the benchmark both read it from here.
MAD_SCALE = {"asced_code": 3.0, "residual": 6.0}


def residual_mask(inputs: Tensor, x0_pixels: Tensor, *, factor: int, cfg: PixelChangeConfig | None = None,
                  method: str = "residual") -> Detection:
    """Where the denoiser's clean guess disagrees with the input: :func:`pixel_change_mask` on the two frames
    ``[inputs, x0_pixels]`` (both (B, 3, H, W) in [-1, 1]); by default with ``mad_scale = MAD_SCALE["residual"]``.
    The same rule on ``[inputs, refined outputs]`` is :func:`refiner.artifacts.composite.changed_region`."""
    cfg = cfg or PixelChangeConfig(mad_scale=MAD_SCALE["residual"])
    return pixel_change_mask([inputs, x0_pixels], factor=factor, cfg=cfg, method=method)


# ------------------------------------------------------------------------------------------------- scores
def mask_scores(predicted: Tensor, truth: Tensor) -> dict:
    """Detection quality of boolean masks (B, H, W) against true masks: pixel-level IoU, precision and recall over
    the whole set (pooled), the mean per-image IoU over images with a true defect, and image-level precision and
    recall (an image is flagged when its predicted mask is non-empty and is positive when its true mask is)."""
    p, g = predicted.bool().flatten(1), truth.bool().flatten(1)
    tp, fp, fn = (p & g).sum().item(), (p & ~g).sum().item(), (~p & g).sum().item()
    inter, union = (p & g).sum(1).float(), (p | g).sum(1).float()
    has_truth = g.any(1)
    flagged = p.any(1)
    ratio = lambda a, b: float(a / b) if b else float("nan")  # noqa: E731
    return {
        "pixel_iou": ratio(tp, tp + fp + fn), "pixel_precision": ratio(tp, tp + fp), "pixel_recall": ratio(tp, tp + fn),
        "mean_image_iou": float((inter[has_truth] / union[has_truth]).mean()) if has_truth.any() else float("nan"),
        "image_precision": ratio((flagged & has_truth).sum().item(), flagged.sum().item()),
        "image_recall": ratio((flagged & has_truth).sum().item(), has_truth.sum().item()),
        "flagged_fraction": float(p.float().mean()),
    }
