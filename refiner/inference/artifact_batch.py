"""The per-batch side of ``refine.py``'s artifact options (:mod:`refiner.inference.artifact_options`): probe,
per-image starts, the TTC callback, the masks written beside the outputs and the grid's "detected" column.

For one batch of same-size images, :meth:`ArtifactRun.prepare`:

1. ``detect``: :func:`~refiner.inference.probe.probe_detect` from the batch's top start down to the lower edge of
   the window containing it, with as many steps as the refinement grid has in that range (at least two), the
   same noise (``seed + i``). The residual rule uses ``mad_scale`` 6 (tuned on the benchmark, docs/experiments/artifacts.md), the
   public-code rule its own 3.
2. Starts: each image's start ``s_i`` is ``t_start``, or with ``t_start=auto`` ``AutoStart(severity_i)``; the batch
   runs from ``max(s_i)`` with ``steps`` scaled by ``(max(s_i) + 1) / (top + 1)`` (top: the calibration's highest
   start, which ``steps`` is for), so every batch has about the same step density. Pixels are pinned
   (:class:`~refiner.artifacts.correct.StrengthPinning`) to: ``correct=strength_map``, ``starts_from_strength(m,
   min(strength.t_low, s_i), s_i)`` of the region ``m``; otherwise, with ``t_start=auto``, ``s_i`` everywhere.
3. The region ``m`` (B, H, W) in [0, 1]: the user's mask / 255, else the detected mask grown by ``mask_dilate_px``.
   ``correct=ttc`` blends :class:`~refiner.artifacts.correct.TrajectoryCorrection` in with ``m`` at the first grid
   point at or below ``min(ttc.t_correct, start - 1)``, its fresh noise from one generator per batch seeded with
   ``seed + indices[0]`` (so TTC results depend on batching, unlike the refinement's own noise).

After refinement, :meth:`BatchArtifacts.finish`: ``detect=output_residual`` finds its mask now
(:func:`~refiner.artifacts.composite.changed_region` of input and output, by the rule of
:func:`~refiner.artifacts.composite.change_config` with ``output_residual_level``), and ``composite=paste_back`` keeps the
input outside the region: :func:`~refiner.artifacts.composite.paste_back` with
:func:`~refiner.artifacts.composite.paste_weights` of ``m`` (feathered by ``paste_back.feather_px``; images whose
severity exceeds ``paste_back.whole_above`` keep their whole refinement). The output and its record are the pasted
image; the grid gets a last "output" column.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from refiner.artifacts.color_fix import ColorFix
from refiner.artifacts.composite import (
    OUTPUT_DETECTOR,
    change_config,
    changed_region,
    paste_back,
    paste_weights,
)
from refiner.artifacts.correct import TrajectoryCorrection, starts_from_strength
from refiner.artifacts.detect import MAD_SCALE, Detection, PixelChangeConfig, dilate
from refiner.data.images import encode_png, to_tensor
from refiner.inference.artifact_options import ArtifactOptions, steps_for_start
from refiner.inference.outputs import MASK_RECORD, mask_path, png_text
from refiner.inference.pipeline import Pipeline
from refiner.inference.probe import probe_detect, probe_t_end
from refiner.inference.settings import RefineSettings
from refiner.sampling import timestep_grid

TINT = torch.tensor([1.0, -1.0, -1.0])[:, None, None]  # red, in [-1, 1]


def grid_column(opts: ArtifactOptions) -> list[str]:
    """The "detected" column's title, when the grid gets one."""
    if not opts.active or (opts.detect == "none" and opts.mask is None):
        return []
    return [f"detected ({'mask ' + opts.mask if opts.mask is not None else opts.detect})"]


def output_column(opts: ArtifactOptions, color: ColorFix | None = None) -> list[str]:
    """The last column's title when the output is not the last expert's image (``color_fix``, then
    ``composite=paste_back``)."""
    parts = [color.label()] if color is not None and color.active else []
    if opts.composite != "none":
        parts.append(f"pasted back, feather {opts.feather_px} px")
    return [f"output ({'; '.join(parts)})"] if parts else []


@dataclass
class BatchArtifacts:
    """What :meth:`ArtifactRun.prepare` decided for one batch."""

    t_start: int
    steps: int
    image_starts: list[int]
    detection: Detection | None
    shown: Tensor | None  # (B, H, W) in [0, 1]: the mask shown in the grid (the user's, else the detected one)
    starts: Tensor | None = None
    callback: object = None
    auto: bool = False  # t_start=auto: each image's own start goes in its record
    region: Tensor | None = None  # (B, H, W) in [0, 1]: what corrections and the paste-back act on
    weights: Tensor | None = None  # (B, H, W): the paste-back weights, once finish() ran with composite=paste_back

    def refine_kwargs(self) -> dict:
        return {"starts": self.starts, "callback": self.callback}

    def finish(self, opts: ArtifactOptions, inputs: Sequence[np.ndarray], refined: list[np.ndarray], factor: int
               ) -> list[np.ndarray]:
        """After refinement: the output residual's detection (``detect=output_residual``) and the paste-back
        (``composite=paste_back``); returns the outputs to write."""
        if opts.detect == OUTPUT_DETECTOR:
            self.detection = changed_region(inputs, refined, factor=factor, cfg=change_config(opts.change_level))
            if opts.mask is None:
                self.shown = self.detection.pixel.float()
                self.region = dilate(self.detection.pixel, opts.dilate_px).float()
        if opts.composite == "none":
            return refined
        severity = self.detection.severity if self.detection is not None else None
        self.weights = paste_weights(self.region, opts.feather_px, severity, opts.whole_above)
        return paste_back(refined, inputs, self.weights)

    def mask_png(self, j: int) -> bytes | None:
        """The PNG bytes of image ``j``'s artifact mask (written beside its output,
        :func:`refiner.inference.outputs.mask_path`), None when nothing was detected."""
        if self.detection is None:
            return None
        pixels = self.detection.pixel[j].cpu().numpy().astype(np.uint8) * 255
        return encode_png(pixels, png_text(MASK_RECORD))

    def record(self, j: int, output: Path) -> dict:
        """The per-image summary fields: its start (t_start=auto), severity, mask file and flagged fraction."""
        out: dict = {"t_start": self.image_starts[j]} if self.auto else {}
        if self.detection is not None:
            out.update(severity=float(self.detection.severity[j]), mask=str(mask_path(output)),
                       flagged_fraction=float(self.detection.area[j]))
        if self.weights is not None:
            out.update(refined_fraction=float(self.weights[j].mean()), whole_image=bool((self.weights[j] == 1).all()))
        return out

    def overlay(self, j: int, src: np.ndarray) -> list[Tensor]:
        """The input with the shown mask tinted red (the grid's "detected" column), or nothing."""
        if self.shown is None:
            return []
        m = 0.5 * self.shown[j].float()[None]
        return [to_tensor(src) * (1 - m) + TINT * m]


@dataclass
class ArtifactRun:
    """Per-batch artifact work for one ``refine.py`` run: ``t_start`` is the setting (an int, or ``"auto"``),
    ``steps``, ``spacing`` and ``seed`` the sampler's."""

    opts: ArtifactOptions
    pipeline: Pipeline
    t_start: int | str
    steps: int
    spacing: str
    seed: int

    def prepare(self, images: Sequence[np.ndarray], indices: Sequence[int]) -> BatchArtifacts:
        top = self.opts.start_range(self.t_start)[1]
        det = self._detect(images, indices, top) if self.opts.probes else None
        image_starts = self.opts.auto(det.severity) if self.opts.auto is not None else [top] * len(images)
        t_start = max(image_starts)
        steps = self.steps if t_start == top else steps_for_start(self.steps, t_start, top)
        region = self._region(det, indices)
        shown = self._user_masks(indices) if self.opts.mask is not None else (
            det.pixel.float() if det is not None else None)
        batch = BatchArtifacts(t_start, steps, image_starts, det, shown, auto=self.opts.auto is not None, region=region)
        batch.starts = self._starts(image_starts, region, images[0].shape[:2])
        if self.opts.correct == "ttc":
            batch.callback = self._ttc(region, t_start, steps, indices)
        return batch

    def finish(self, batch: BatchArtifacts, inputs: Sequence[np.ndarray], refined: list[np.ndarray]
               ) -> list[np.ndarray]:
        """:meth:`BatchArtifacts.finish` with this run's settings."""
        return batch.finish(self.opts, inputs, refined, int(self.pipeline.f4.factor))

    def _detect(self, images, indices, top: int) -> Detection:
        chain = self.pipeline.chain
        t_end = probe_t_end(chain, top)
        grid = timestep_grid(top, self.steps, 0, self.spacing, chain.alphas_cumprod.shape[0])
        steps = min(top - t_end + 1, max(2, sum(t >= t_end for t in grid)))
        cfg = PixelChangeConfig(mad_scale=MAD_SCALE.get(self.opts.detect, 3.0))  # detect.MAD_SCALE
        return probe_detect(self.pipeline, images, self.opts.detect, top, steps, seed=self.seed, indices=indices,
                            t_end=t_end, pixel_cfg=cfg)

    def _user_masks(self, indices) -> Tensor:
        return torch.stack([torch.from_numpy(self.opts.masks[i].astype(np.float32) / 255) for i in indices])

    def _region(self, det: Detection | None, indices) -> Tensor | None:
        if self.opts.mask is not None:
            return self._user_masks(indices)
        return dilate(det.pixel, self.opts.dilate_px).float() if det is not None else None

    def _starts(self, image_starts: list[int], region: Tensor | None, size) -> Tensor | None:
        if self.opts.correct == "strength_map":
            return torch.stack([starts_from_strength(m, min(self.opts.t_low, s), s)
                                for m, s in zip(region, image_starts)])
        if self.opts.auto is not None:
            return torch.tensor(image_starts)[:, None, None].expand(len(image_starts), *size).clone()
        return None

    def _ttc(self, region: Tensor, t_start: int, steps: int, indices) -> TrajectoryCorrection:
        chain, device = self.pipeline.chain, self.pipeline.device
        grid = timestep_grid(t_start, steps, 0, self.spacing, chain.alphas_cumprod.shape[0])
        t_correct = min(self.opts.t_correct, t_start - 1)
        fires_at = min((t for t in grid if t > t_correct), default=grid[0])
        expert = next((s for s in chain.experts if s.weights.window.contains(fires_at)), chain.experts[0])
        latent = self.pipeline.latent_map(region).to(device)
        return TrajectoryCorrection(grid, chain.alphas_cumprod, lambda: latent, t_correct, gamma=self.opts.gamma,
                                    correction_eta=self.opts.correction_eta,
                                    parameterization=expert.weights.parameterization,
                                    generator=torch.Generator(device=device).manual_seed(self.seed + indices[0]))


def artifact_run(opts: ArtifactOptions, pipeline: Pipeline, settings: RefineSettings) -> ArtifactRun | None:
    """The run's per-batch artifact work, or None when no artifact option is on."""
    if not opts.active:
        return None
    return ArtifactRun(opts, pipeline, settings.t_start, int(settings.steps), settings.spacing, int(settings.seed))
