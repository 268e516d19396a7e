"""Paste back in pixel space: keep the input's own pixels outside the region that needed fixing.

Every refined pixel goes through the VQ-f4 (decode of the refined latent), whose round trip alone costs the demo's
tiny f4 an RMSE of about 0.06 and a colour drift. Refinement of a whole picture therefore moves pixels that had
nothing wrong with them. Inpainting pipelines paste the original back outside the mask after decoding:

* diffusers, ``VaeImageProcessor.apply_overlay(mask, init_image, image)`` (``src/diffusers/image_processor.py``):
  the init image, masked by the inverted mask, is alpha-composited over the output, i.e.
  ``out = m * image + (1 - m) * init``; the mask is softened first with ``VaeImageProcessor.blur(mask,
  blur_factor)`` (a PIL Gaussian blur) when the caller asks for it;
* AUTOMATIC1111's stable-diffusion-webui (``modules/processing.py``): ``mask_blur`` (a Gaussian blur of the mask,
  default 4 px) and the overlay of the original image outside it ("inpaint only masked" pastes the refined crop
  back the same way).

Here :func:`paste_back` computes ``out = round(w * refined + (1 - w) * input)`` per pixel in float64, with weights
``w`` from :func:`feather`. The feather differs from a Gaussian blur in one respect: it only grows outward. A
Gaussian blur of a binary mask lowers the weight inside the mask near its edge and never reaches exactly 0 or 1.
:func:`feather` keeps every region pixel at its own weight (1 for a binary mask), and outside the region the
weight falls with the distance ``d`` to it along a raised cosine,
``w(p) = max_q m(q) * (1 + cos(pi |p - q| / (px + 1))) / 2`` over ``|p - q| < px + 1``. So a pixel farther than
``px`` from the region gets exactly 0 and is the input bit for bit, a region pixel of strength 1 is the refined
pixel bit for bit, and every output pixel is a convex combination of the two (the weights ``w`` and ``1 - w`` sum to
one: a partition of unity). For a binary region this is the raised cosine of the Euclidean distance transform.

:func:`changed_region` is the one-pass mask: the residual rule (:func:`refiner.artifacts.detect.residual_mask`)
applied to ``[input, refined output]``: where the refinement changed the picture most, found after it, at no
UNet cost. :func:`paste_weights` adds a per-image switch: images whose severity is above ``whole_above`` keep their
whole refinement (for pictures that are broken everywhere, where any mask is too small).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from refiner.artifacts.detect import (
    MAD_SCALE,
    Detection,
    PixelChangeConfig,
    residual_mask,
)
from refiner.data.images import to_tensor
from refiner.errors import SettingError

OUTPUT_DETECTOR = "output_residual"  # the name of changed_region's detector (refine.py's detect=output_residual)


def _check_region(region: Tensor) -> Tensor:
    region = torch.as_tensor(region)
    if region.ndim != 3:
        raise ValueError(f"a paste-back region is (B, H, W), got shape {tuple(region.shape)}")
    region = region.double()
    if region.numel() and (float(region.min()) < 0 or float(region.max()) > 1):
        raise SettingError("paste-back region values must lie in [0, 1]")
    return region


def feather(region: Tensor, px: int) -> Tensor:
    """Paste-back weights (B, H, W) float64 in [0, 1] from a region (B, H, W) (bool, or strengths in [0, 1]): the
    region itself, grown outward by a raised cosine over ``px`` pixels (module docstring). ``px = 0`` returns the
    region unchanged."""
    if isinstance(px, bool) or not isinstance(px, int) or px < 0:
        raise SettingError(f"feather px must be an int >= 0, got {px!r}")
    region = _check_region(region)
    if px == 0 or not region.numel():
        return region.clone()
    h, w = region.shape[-2:]
    padded = torch.nn.functional.pad(region, (px, px, px, px))
    out = region.clone()
    reach = px + 1
    for dy in range(-px, px + 1):
        for dx in range(-px, px + 1):
            d = math.hypot(dy, dx)
            if d == 0 or d >= reach:
                continue
            ramp = 0.5 * (1 + math.cos(math.pi * d / reach))
            shifted = padded[:, px + dy:px + dy + h, px + dx:px + dx + w]
            out = torch.maximum(out, ramp * shifted)
    return out


def paste_weights(region: Tensor, feather_px: int, severity: Sequence[float] | Tensor | None = None,
                  whole_above: float | None = None) -> Tensor:
    """:func:`feather` of ``region``, with every image whose ``severity`` exceeds ``whole_above`` set to 1 everywhere
    (it keeps its whole refinement). ``whole_above=None`` switches nothing."""
    weights = feather(region, feather_px)
    if whole_above is not None:
        if severity is None:
            raise SettingError("paste back whole_above needs each image's severity (a detector)")
        sev = torch.as_tensor(np.asarray(severity, dtype=float))
        if sev.shape != (weights.shape[0],):
            raise ValueError(f"{weights.shape[0]} regions but severities of shape {tuple(sev.shape)}")
        weights[sev > float(whole_above)] = 1.0
    return weights


def paste_back(refined: Sequence[np.ndarray], inputs: Sequence[np.ndarray], weights: Tensor) -> list[np.ndarray]:
    """``round(w * refined + (1 - w) * input)`` per pixel for same-size uint8 (H, W, 3) images and weights (B, H, W) in
    [0, 1] (:func:`feather`, :func:`paste_weights`): the input where ``w = 0`` and the refinement where ``w = 1``, bit
    for bit."""
    weights = _check_region(weights)
    if not (len(refined) == len(inputs) == weights.shape[0]):
        raise ValueError(f"{len(refined)} refined images, {len(inputs)} inputs and {weights.shape[0]} weight maps")
    out = []
    for ref, inp, w in zip(refined, inputs, weights.numpy()):
        if ref.shape != inp.shape or ref.shape[:2] != w.shape:
            raise ValueError(f"refined {ref.shape}, input {inp.shape} and weights {w.shape} differ in size")
        w = w[..., None]
        out.append(np.round(w * ref.astype(np.float64) + (1 - w) * inp.astype(np.float64)).astype(np.uint8))
    return out


def change_config(level: float | None = None) -> PixelChangeConfig:
    """The rule :func:`changed_region` applies: ``level=None``, the residual's (relative: ``median + 6 * 1.4826 *
    MAD`` of the picture's own change, components of the code's area limits); a ``level`` (0..255), every blurred
    change above it, in components of any size above the minimum area: where the refinement did more than the f4
    round trip's own error, however much of the picture that is."""
    if level is None:
        return PixelChangeConfig(mad_scale=MAD_SCALE["residual"])
    if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0 <= level < 255:
        raise SettingError(f"a change level must be a number in [0, 255), got {level!r}")
    return PixelChangeConfig(level=float(level), max_area=math.inf)


def changed_region(inputs: Sequence[np.ndarray], refined: Sequence[np.ndarray], *, factor: int,
                   cfg: PixelChangeConfig | None = None) -> Detection:
    """Where the refinement changed the picture: the residual rule (:func:`~refiner.artifacts.detect.residual_mask`,
    by default :func:`change_config`'s relative rule) on ``[input, refined]`` for same-size uint8 images. Its
    severity is the mean absolute change (on the [0, 1] scale) from input to output."""

    x = torch.stack([to_tensor(img) for img in inputs])
    y = torch.stack([to_tensor(img) for img in refined])
    return residual_mask(x, y, factor=factor, cfg=cfg or change_config(), method=OUTPUT_DETECTOR)
