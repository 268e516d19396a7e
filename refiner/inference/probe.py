"""Finding artifacts in *input images* (ASCED's setting (b)): a probe pass through the top window of a chain.

The windows cover only t < 500, so the generation-time detector of ASCED (which watches a sampler from pure noise
and corrects at ``T_c ~ 480``) has nothing to watch when an existing picture is refined. The probe gives it a
trajectory: encode the images, noise them to ``t_start`` (the top of the chain, with the same per-image noise as
the refinement would use: seed + i), run the top expert's steps down to its window's lower edge while a
:class:`~refiner.artifacts.dynamics.StepRecorder` watches, and read a mask from what it saw:

* ``asced``: the paper's rule on the recorded weighted scores (:func:`~refiner.artifacts.detect.asced_paper_mask`),
  the bank being every recorded change;
* ``asced_code``: the public code's rule on the decoded x0 predictions
  (:func:`~refiner.artifacts.detect.pixel_change_mask`);
* ``residual``: the public code's rule on ``[input, the probe's last x0 prediction]``
  (:func:`~refiner.artifacts.detect.residual_mask`): where the window's denoiser wants the picture to change.

The probe costs the top window's share of the refinement's steps (about half of them with the demo chain).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from refiner.artifacts.detect import (
    Detection,
    PixelChangeConfig,
    asced_paper_mask,
    pixel_change_mask,
    residual_mask,
)
from refiner.artifacts.dynamics import StepRecorder
from refiner.inference.pipeline import Pipeline, image_noise

DETECTORS = ("asced", "asced_code", "residual")


def _crop_detection(det: Detection, size: tuple[int, int], factor: int) -> Detection:
    lat = (-(-size[0] // factor), -(-size[1] // factor))
    return Detection(det.latent[:, :lat[0], :lat[1]], det.pixel[:, :size[0], :size[1]], det.severity, det.method)


def probe_t_end(chain, t_start: int) -> int:
    """Where a probe from ``t_start`` stops by default: the lower edge of the window that contains ``t_start``."""
    return next((s.weights.window.t_min for s in chain.experts if s.weights.window.contains(t_start)), 0)


@torch.no_grad()
def probe_detect(pipeline: Pipeline, images: Sequence[np.ndarray], method: str, t_start: int, steps: int, *,
                 seed: int = 0, indices: Sequence[int] | None = None, t_end: int | None = None,
                 pixel_cfg: PixelChangeConfig | None = None, paper_scale: float = 1.0) -> Detection:
    """Detect artifacts in same-size uint8 ``images`` with a probe pass (module docstring): ``steps`` DDIM steps from
    ``t_start`` down to ``t_end`` (default: the lower edge of the window containing ``t_start``). Returns masks
    cropped to the images' size."""
    if method not in DETECTORS:
        raise ValueError(f"detect must be one of {DETECTORS}, got {method!r}")
    chain, f4 = pipeline.chain, pipeline.f4
    indices = list(range(len(images))) if indices is None else [int(i) for i in indices]
    if t_end is None:
        t_end = probe_t_end(chain, t_start)
    parameterizations = {s.weights.parameterization for s in chain.experts}
    size, factor = images[0].shape[:2], int(f4.factor)
    x = pipeline.pad(images).full()
    z = f4.encode(x) * chain.scale_factor
    noise = image_noise(z.shape[1:], [seed + i for i in indices]).to(z)
    if method == "asced" and len(parameterizations) != 1:
        raise ValueError("detect=asced needs every expert of the chain to share one parameterization")
    recorder = StepRecorder(chain.alphas_cumprod, next(iter(parameterizations)), keep_scores=method == "asced",
                            keep_x0=method != "asced")
    chain.refine(z, t_start, steps, t_end=t_end, noise=noise, callback=recorder)
    if method == "asced":
        det = asced_paper_mask(recorder.timesteps, recorder.scores, t_correct=t_end - 1, t_detect=t_start,
                               factor=factor, scale=paper_scale)
        det.pixel = det.pixel[..., :x.shape[-2], :x.shape[-1]]
    else:
        decode = lambda lat: pipeline.decode(lat.to(pipeline.device) / chain.scale_factor).clamp(-1, 1)  # noqa: E731
        if method == "asced_code":
            det = pixel_change_mask([decode(x0) for x0 in recorder.x0], factor=factor, cfg=pixel_cfg)
        else:
            det = residual_mask(x, decode(recorder.x0[-1]), factor=factor, cfg=pixel_cfg)
    return _crop_detection(det, size, factor)
