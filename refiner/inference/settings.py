"""The settings of one refine run (``refine.py``, ``refiner refine``, ``conf/refine.yaml``), typed and checked once.

:class:`RefineSettings` mirrors ``conf/refine.yaml`` key for key; the app builds it with
:func:`refiner.settings.from_config` and nothing below the app reads config. Every value is checked here, in
``__post_init__``, before any file is opened: types, ranges, and the combinations that cannot work (``correct``
without a mask source, ``upscale`` with the colour fix, ...). What needs files or models is checked later, still
before any image is refined: the calibration and user masks (:class:`~refiner.inference.artifact_options
.ArtifactOptions`), the experts' windows against the grid (:meth:`refiner.inference.chain.Chain.plan`), tile sizes
against the first stages' factors (:meth:`refiner.inference.pipeline.Tiling.check`).

Options that the project's own benchmark measured not to help are marked **experimental** in their field's comment
(and in ``conf/refine.yaml``, ``docs/reference/refine.md`` and ``--help``): they stay available for experiments, with the
number that put them there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from refiner.artifacts.color_fix import ColorFix
from refiner.artifacts.composite import OUTPUT_DETECTOR
from refiner.errors import RefineError
from refiner.inference.chain import PRECISIONS
from refiner.inference.pipeline import PAD_MODES, UPSCALES, Tiling
from refiner.inference.probe import DETECTORS
from refiner.sampling import SPACINGS
from refiner.settings import require_choice, require_int, require_number

MODES = ("refine", "evaluate")
GRID_MODES = ("none", "per_image", "combined", "both")
CORRECTIONS = ("none", "ttc", "strength_map")
COMPOSITES = ("none", "paste_back")
DETECT_CHOICES = ("none", *DETECTORS, OUTPUT_DETECTOR)
# Measured not to help on the composition benchmark (docs/experiments): kept, and labelled, not advertised.
EXPERIMENTAL = {
    "detect=asced": "flags ~81% of every picture; no better than a random mask of the same area (IoU 0.035)",
    "detect=asced_code": "flags 12-15% of a picture, mostly away from the defect (IoU 0.010)",
    "correct=ttc": "TTC during generation changed the artifact rate by noise (93.8% -> 98.4% / 93.8%)",
    "upscale=2": "bicubic then refine beats it at every t_start (clean heads at 299: 3.1% vs 42.2% broken)",
    "upscale=4": "as upscale=2, untested beyond x2",
}


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise RefineError(f"{name} must be true or false, got {value!r}")
    return value


@dataclass(frozen=True)
class FirstStages:
    """``first_stage``: the VQ-f4 the experts work in, and the VQ-f8 that ``mode=evaluate`` degrades with; each a
    ``{ckpt_path, params}`` mapping (see ``conf/first_stage/``)."""

    f4: Mapping[str, Any] | None = None
    f8: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class PasteBack:
    """``paste_back``: ``feather_px`` of raised-cosine feathering outward from the region; ``whole_above``: images
    whose detected severity exceeds it keep their whole refinement (needs ``detect``; null = never)."""

    feather_px: int = 4
    whole_above: float | None = None

    def __post_init__(self):
        require_int("paste_back.feather_px", self.feather_px, 0)
        if self.whole_above is not None:
            require_number("paste_back.whole_above", self.whole_above, minimum=0.0)


@dataclass(frozen=True)
class Strength:
    """``strength``: with ``correct=strength_map``, unflagged pixels start at ``t_low`` (Differential Diffusion)."""

    t_low: int = 99

    def __post_init__(self):
        require_int("strength.t_low", self.t_low, 0)


@dataclass(frozen=True)
class TTC:
    """``ttc`` (experimental): ASCED's trajectory correction at ``t_correct`` (about 0.48 T, the paper's Fig. 8);
    ``gamma`` perturbs x0 before re-noising, ``correction_eta`` is the fresh-noise share (1 = the code's q_sample)."""

    t_correct: int = 480
    gamma: float = 0.0
    correction_eta: float = 1.0

    def __post_init__(self):
        require_int("ttc.t_correct", self.t_correct, 1)
        require_number("ttc.gamma", self.gamma, minimum=0.0)
        require_number("ttc.correction_eta", self.correction_eta, 0.0, 1.0)


@dataclass(frozen=True)
class RefineSettings:
    """One refine run. Field by field (``conf/refine.yaml`` says the same with examples):

    * ``inputs``: a folder (its direct children), a glob (``**`` allowed), a file, or a list of these. Required.
    * ``experts``: window expert checkpoints (our ``.ckpt`` or exported ``.safetensors``), any order; each grid step
      goes to the expert whose window ``[t_min, t_max)`` contains it.
    * ``output_dir``: refined PNGs ``<input stem>.png``, ``summary.json`` and the reports go here.
    * ``mode``: ``refine`` the inputs, or ``evaluate``: inputs are clean references, degraded through the VQ-f8
      round trip, refined, and compared (``metrics.json``).
    * ``t_start``: noise to exactly this t (t = 0 clean, 999 pure noise), inside a window; ``"auto"`` (with
      ``detect``): each image from the calibration map of its detected severity.
    * ``steps``, ``spacing``, ``eta``: the DDIM grid (1 <= steps <= t_start + 1; ``uniform`` = CompVis, ``trailing``
      = diffusers) and its stochasticity (0 DDIM, 1 DDPM; above 1 only where DDIM's sigma fits).
    * ``seed``: image ``i`` of the sorted inputs draws every random number from a generator seeded ``seed + i``.
    * ``allow_outside_window``: a grid step no window covers uses the nearest expert (with a warning) instead of
      failing. ``allow_first_stage_mismatch``: run even if the f4 is not the one the experts were trained with.
    * ``use_ema``, ``trust_checkpoint``, ``device``, ``precision`` (``fp32`` | ``bf16`` autocast of the UNets).
    * ``batch_size``: same-size images refined together; ``max_pixels``: larger images are refused per file.
    * ``upscale`` (experimental above 1): DemoFusion-style progressive refinement into an image 2 or 4 times larger.
    * Artifacts: ``detect``, ``output_residual_level``, ``correct``, ``mask``, ``mask_dilate_px``, ``composite``,
      ``paste_back``, ``strength``, ``ttc``, ``auto_calibration``, ``allow_calibration_mismatch`` (see
      :mod:`refiner.inference.artifact_options`), and ``color_fix`` (:class:`~refiner.artifacts.color_fix.ColorFix`).
    * ``tiling`` (:class:`~refiner.inference.pipeline.Tiling`), ``pad_mode``.
    * ``overwrite``: replace outputs written by another run (never an input).
    * ``grid``, ``grid_max_images``, ``progress``: comparison grids and the progress bar.
    * ``swd``, ``inception_weights``: evaluate mode's metrics.
    * ``first_stage``: the VQ-f4 (and for ``mode=evaluate`` the VQ-f8) checkpoints and params.
    """

    inputs: Any = None
    experts: tuple[str, ...] = ()
    output_dir: str | None = None
    mode: str = "refine"
    t_start: int | str = 499
    steps: int = 50
    spacing: str = "uniform"
    eta: float = 0.0
    seed: int = 0
    allow_outside_window: bool = False
    allow_first_stage_mismatch: bool = False
    use_ema: bool = True
    trust_checkpoint: bool = False
    device: str = "cpu"
    precision: str = "fp32"
    batch_size: int = 4
    max_pixels: int | None = None
    upscale: int = 1
    detect: str = "none"
    output_residual_level: float | None = 48
    correct: str = "none"
    mask: str | None = None
    mask_dilate_px: int = 4
    composite: str = "none"
    color_fix: ColorFix = field(default_factory=ColorFix)
    paste_back: PasteBack = field(default_factory=PasteBack)
    strength: Strength = field(default_factory=Strength)
    ttc: TTC = field(default_factory=TTC)
    auto_calibration: str | None = None
    allow_calibration_mismatch: bool = False
    tiling: Tiling = field(default_factory=Tiling)
    pad_mode: str = "reflect"
    overwrite: bool = False
    grid: str = "combined"
    grid_max_images: int = 16
    progress: bool = True
    swd: Mapping[str, Any] = field(default_factory=dict)
    inception_weights: str | None = None
    first_stage: FirstStages = field(default_factory=FirstStages)

    def __post_init__(self):
        require_choice("mode", self.mode, MODES)
        require_choice("grid", self.grid, GRID_MODES)
        require_choice("spacing", self.spacing, SPACINGS)
        require_choice("pad_mode", self.pad_mode, PAD_MODES)
        require_choice("precision", self.precision, PRECISIONS)
        if self.inputs is None or self.inputs == "" or (not isinstance(self.inputs, str) and len(self.inputs) == 0):
            raise RefineError("inputs is not set: pass inputs=<folder|glob|[a.png,b.jpg]>")
        if isinstance(self.experts, str) or not self.experts:
            raise RefineError(f"experts must be a non-empty list of window checkpoint paths, got {self.experts!r}")
        if self.t_start != "auto":
            require_int("t_start", self.t_start, minimum=0)
        require_int("steps", self.steps, minimum=1)
        require_number("eta", self.eta, minimum=0.0)  # eta > 1 only where DDIM's sigma fits: Chain.plan
        require_int("seed", self.seed, minimum=0, maximum=2**63 - 1)  # seed + i must fit a torch generator (< 2**64)
        require_int("batch_size", self.batch_size, minimum=1)
        require_int("grid_max_images", self.grid_max_images, minimum=0)
        if self.max_pixels is not None:
            require_int("max_pixels", self.max_pixels, minimum=1)
        require_choice("upscale", require_int("upscale", self.upscale), UPSCALES)
        for name in ("allow_outside_window", "allow_first_stage_mismatch", "use_ema", "trust_checkpoint",
                     "overwrite", "allow_calibration_mismatch", "progress"):
            _flag(name, getattr(self, name))
        if self.output_dir in (None, ""):
            raise RefineError("output_dir is not set")
        if self.mode == "evaluate" and self.upscale != 1:
            raise RefineError(f"mode=evaluate compares refined with clean images of the same size; upscale="
                              f"{self.upscale} makes them larger (use upscale=1)")
        if self.color_fix.active and self.upscale != 1:
            raise RefineError(f"color_fix restores the input's colours at the input's size; upscale={self.upscale} "
                              "makes the output larger (use color_fix.method=none or upscale=1)")
        self._check_artifacts()

    def _check_artifacts(self) -> None:
        """The artifact options' values and combinations (issue 11's switches)."""
        detect = require_choice("detect", self.detect, DETECT_CHOICES)
        correct = require_choice("correct", self.correct, CORRECTIONS)
        composite = require_choice("composite", self.composite, COMPOSITES)
        require_int("mask_dilate_px", self.mask_dilate_px, 0)
        if self.mask is not None and (not isinstance(self.mask, str) or not self.mask):
            raise RefineError(f"mask must be a png file or a folder of <input stem>.png masks, got {self.mask!r}")
        probe = detect not in ("none", OUTPUT_DETECTOR)
        if correct != "none" and not probe and self.mask is None:
            after = (f" (detect={OUTPUT_DETECTOR} finds its mask after refinement, too late to correct it)"
                     if detect == OUTPUT_DETECTOR else "")
            raise RefineError(f"correct={correct} needs a mask source: set detect=asced|asced_code|residual or "
                              f"mask=<png or folder>{after}")
        if self.t_start == "auto" and not probe:
            after = f" (detect={OUTPUT_DETECTOR} measures it only after refinement)" if detect == OUTPUT_DETECTOR else ""
            raise RefineError("t_start=auto picks each image's start from its detected severity: set detect="
                              f"asced|asced_code|residual (the calibration's detector){after}")
        if composite != "none" and detect == "none" and self.mask is None:
            raise RefineError(f"composite={composite} needs a region: set detect=residual|output_residual|asced|"
                              "asced_code or mask=<png or folder>")
        if self.paste_back.whole_above is not None and detect == "none":
            raise RefineError("paste_back.whole_above compares each image's detected severity: set detect=...")
        if detect == OUTPUT_DETECTOR and self.output_residual_level is not None:
            require_number("output_residual_level", self.output_residual_level, 0.0, 254.0)
        if self.t_start == "auto" and not self.auto_calibration:
            raise RefineError("t_start=auto needs auto_calibration=<t_start_auto.json> (python -m refiner bench-artifacts "
                              "split=tune writes one)")
        if self.artifacts_active:
            what = "detect/correct/mask/t_start=auto"
            if self.upscale != 1:
                raise RefineError(f"{what} work at the input size; upscale={self.upscale} is not supported with them "
                                  "(use upscale=1)")
            if self.mode == "evaluate":
                raise RefineError(f"{what} are not supported with mode=evaluate (it measures the plain refinement); "
                                  "use mode=refine")
            if self.tiling.mode == "always":
                raise RefineError(f"{what} need whole images (the probe and the per-pixel starts do not run on tiles):"
                                  " set tiling.mode=auto or never")
        if correct == "strength_map" and self.t_start != "auto" and self.strength.t_low > self.t_start:
            raise RefineError(f"strength.t_low={self.strength.t_low} must not exceed t_start={self.t_start} "
                              "(unflagged pixels start there, flagged ones at t_start)")

    @property
    def artifacts_active(self) -> bool:
        """Whether any artifact option is on (a probe, user masks or per-image starts)."""
        return self.detect != "none" or self.mask is not None or self.t_start == "auto"

    def experimental(self) -> list[str]:
        """The experimental options this run uses, each with the measurement that labels it."""
        used = [f"detect={self.detect}", f"correct={self.correct}", f"upscale={self.upscale}"]
        return [f"{key}: {EXPERIMENTAL[key]}" for key in used if key in EXPERIMENTAL]
