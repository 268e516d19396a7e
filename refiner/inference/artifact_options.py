"""``refine.py``'s artifact settings (issue #11): ``detect``, ``correct``, ``mask``, ``t_start=auto``, checked before
any image is refined.

* ``detect=none|asced|asced_code|residual``: a probe pass (:func:`refiner.inference.probe.probe_detect`) over each
  batch before it is refined; its masks are written beside the outputs and its severities go in the records.
  ``detect=output_residual`` runs no probe: the residual rule on ``[input, refined output]`` after refinement
  (:func:`refiner.artifacts.composite.changed_region`). Its mask exists only once the image is refined, so it can
  drive ``composite`` but no ``correct`` and no ``t_start=auto``. Its threshold ``output_residual_level`` (0..254;
  default 48, chosen on the benchmark's split=tune) is absolute: every blurred change above it
  (:func:`refiner.artifacts.composite.change_config`); ``null`` uses the residual's relative rule. Other detectors
  ignore it.
* ``correct=none|ttc|strength_map``: TTC (:class:`~refiner.artifacts.correct.TrajectoryCorrection`) re-noises the
  flagged region at ``ttc.t_correct``; a strength map (:class:`~refiner.artifacts.correct.StrengthPinning`) starts
  flagged pixels at ``t_start`` and the rest at ``strength.t_low``. Both need a mask source: ``detect`` or ``mask``.
* ``mask=<png or folder>``: user masks, greyscale (mode L or 1), the size of their input; a folder holds
  ``<input stem>.png`` per input, one file is shared by every input. Value/255 is a strength in [0, 1]. When both
  ``mask`` and ``detect`` are set, the user's mask drives the correction and the detector still reports.
* ``composite=none|paste_back``: ``paste_back`` keeps the input's own pixels outside the region (the user's mask,
  else the detected one grown by ``mask_dilate_px``), feathered outward over ``paste_back.feather_px``
  (:mod:`refiner.artifacts.composite`); ``paste_back.whole_above`` lets images whose detected severity exceeds it
  keep their whole refinement. Needs a region source (``detect`` or ``mask``); ``whole_above`` needs ``detect``.
* ``t_start=auto``: each image starts at :class:`~refiner.artifacts.correct.AutoStart` of its detected severity
  (``auto_calibration``). The calibration's recorded ``chain.experts`` must name the experts of this run, compared as
  a set of resolved paths (relative ones against the launch directory), unless ``allow_calibration_mismatch=true``;
  a calibration recording another detector (``source.detector``) is refused the same way, since severities of
  different detectors are in different units.

Every problem is a :class:`~refiner.errors.RefineError` (one line, exit 2). The per-batch work is
:mod:`refiner.inference.artifact_batch`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from omegaconf import DictConfig
from PIL import Image

from refiner.artifacts.composite import OUTPUT_DETECTOR
from refiner.artifacts.correct import AutoStart
from refiner.data.images import image_size
from refiner.errors import RefineError, SettingError
from refiner.inference.probe import DETECTORS
from refiner.settings import require_choice, require_int, require_number

CORRECTIONS = ("none", "ttc", "strength_map")
COMPOSITES = ("none", "paste_back")
MASK_MODES = ("L", "1")


@dataclass
class ArtifactOptions:
    """The checked artifact settings; ``masks`` (one uint8 (H, W) array per input, or empty) are filled by
    :meth:`load_masks` once the inputs are known."""

    detect: str = "none"
    correct: str = "none"
    mask: str | None = None
    auto: AutoStart | None = None
    calibration: str | None = None
    t_low: int = 99
    dilate_px: int = 4
    t_correct: int = 480
    gamma: float = 0.0
    correction_eta: float = 1.0
    composite: str = "none"
    feather_px: int = 4
    whole_above: float | None = None
    change_level: float | None = None
    masks: list[np.ndarray] = field(default_factory=list)

    @property
    def active(self) -> bool:
        return self.detect != "none" or self.mask is not None or self.auto is not None

    @property
    def probes(self) -> bool:
        """Whether a probe pass runs before refinement (every detector but ``output_residual``)."""
        return self.detect not in ("none", OUTPUT_DETECTOR)

    @classmethod
    def from_settings(cls, cfg: DictConfig) -> "ArtifactOptions":
        """Types, ranges and combinations; with ``t_start=auto`` the calibration file too (no checkpoint loaded)."""
        detect = require_choice("detect", cfg.get("detect", "none"), ("none", *DETECTORS, OUTPUT_DETECTOR))
        correct = require_choice("correct", cfg.get("correct", "none"), CORRECTIONS)
        composite = require_choice("composite", cfg.get("composite", "none"), COMPOSITES)
        mask = cfg.get("mask")
        if mask is not None and (not isinstance(mask, str) or not mask):
            raise RefineError(f"mask must be a png file or a folder of <input stem>.png masks, got {mask!r}")
        auto = cfg.t_start == "auto"
        probe = detect not in ("none", OUTPUT_DETECTOR)
        if correct != "none" and not probe and mask is None:
            after = (f" (detect={OUTPUT_DETECTOR} finds its mask after refinement, too late to correct it)"
                     if detect == OUTPUT_DETECTOR else "")
            raise RefineError(f"correct={correct} needs a mask source: set detect=asced|asced_code|residual or "
                              f"mask=<png or folder>{after}")
        if auto and not probe:
            after = f" (detect={OUTPUT_DETECTOR} measures it only after refinement)" if detect == OUTPUT_DETECTOR else ""
            raise RefineError("t_start=auto picks each image's start from its detected severity: set detect="
                              f"asced|asced_code|residual (the calibration's detector){after}")
        paste = cfg.get("paste_back") or {}
        whole_above = paste.get("whole_above")
        if composite != "none" and detect == "none" and mask is None:
            raise RefineError(f"composite={composite} needs a region: set detect=residual|output_residual|asced|"
                              "asced_code or mask=<png or folder>")
        if whole_above is not None:
            whole_above = require_number("paste_back.whole_above", whole_above, minimum=0.0)
            if detect == "none":
                raise RefineError("paste_back.whole_above compares each image's detected severity: set detect=...")
        level = cfg.get("output_residual_level") if detect == OUTPUT_DETECTOR else None  # only its threshold
        if level is not None:
            level = require_number("output_residual_level", level, 0.0, 254.0)
        strength, ttc = cfg.get("strength") or {}, cfg.get("ttc") or {}
        opts = cls(detect, correct, mask, None, None, require_int("strength.t_low", strength.get("t_low", 99), 0),
                   require_int("mask_dilate_px", cfg.get("mask_dilate_px", 4), 0),
                   require_int("ttc.t_correct", ttc.get("t_correct", 480), 1),
                   require_number("ttc.gamma", ttc.get("gamma", 0.0), minimum=0.0),
                   require_number("ttc.correction_eta", ttc.get("correction_eta", 1.0), 0.0, 1.0), composite,
                   require_int("paste_back.feather_px", paste.get("feather_px", 4), 0), whole_above, level)
        if opts.active:
            _refuse_combinations(cfg)
        if auto:
            opts.calibration = str(cfg.get("auto_calibration"))
            opts.auto = _load_calibration(cfg, opts.calibration, detect)
        elif correct == "strength_map" and opts.t_low > cfg.t_start:
            raise RefineError(f"strength.t_low={opts.t_low} must not exceed t_start={cfg.t_start} (unflagged pixels "
                              "start there, flagged ones at t_start)")
        return opts

    def start_range(self, t_start) -> tuple[int, int]:
        """The lowest and highest start a batch can run from (``t_start`` itself unless auto)."""
        if self.auto is None:
            return int(t_start), int(t_start)
        ys = [y for _, y in self.auto.knots]
        return int(round(min(ys))), int(round(max(ys)))

    def load_masks(self, paths: Sequence[Path]) -> None:
        """Read and check the user masks of ``paths`` (see the module docstring); bad ones raise before any
        image is refined."""
        if self.mask is None:
            return
        spec = Path(self.mask)
        if not spec.exists():
            raise RefineError(f"mask={self.mask}: no such file or folder")
        shared = _read_mask(spec) if spec.is_file() else None
        for path in paths:
            source = spec if shared is not None else _mask_file(spec, path)
            mask = shared if shared is not None else _read_mask(source)
            _check_mask_size(source, mask, path)
            self.masks.append(mask)

    def digest(self) -> dict:
        """What of these settings changes a refined image (part of the outputs' settings digest)."""
        if not self.active:
            return {}
        masks = hashlib.sha256()
        for m in self.masks:
            masks.update(f"{list(m.shape)}\n".encode() + m.tobytes())
        return {"detect": self.detect, "correct": self.correct, "t_low": self.t_low, "dilate_px": self.dilate_px,
                "ttc": [self.t_correct, self.gamma, self.correction_eta], "masks": masks.hexdigest() if self.masks
                else None, "auto_knots": self.auto.knots if self.auto is not None else None,
                **({"composite": [self.composite, self.feather_px, self.whole_above]} if self.composite != "none"
                   else {}), **({"output_residual_level": self.change_level} if self.change_level is not None else {})}

    def summary(self) -> dict:
        """The ``artifacts`` entry of summary.json (empty when nothing is on)."""
        if not self.active:
            return {}
        return {"artifacts": {"detect": self.detect, "correct": self.correct, "mask": self.mask,
                              "t_start": "auto" if self.auto is not None else None,
                              "auto_calibration": self.calibration, "strength_t_low": self.t_low,
                              "mask_dilate_px": self.dilate_px, "ttc": {"t_correct": self.t_correct,
                              "gamma": self.gamma, "correction_eta": self.correction_eta},
                              "composite": self.composite, "paste_back": {"feather_px": self.feather_px,
                                                                          "whole_above": self.whole_above},
                              "output_residual_level": self.change_level}}


def steps_for_start(steps: int, t_start: int, top: int) -> int:
    """``steps`` are for a grid from ``top``; a batch from a lower ``t_start`` (t_start=auto) keeps their density."""
    return max(1, min(t_start + 1, round(steps * (t_start + 1) / (top + 1))))


def _refuse_combinations(cfg: DictConfig) -> None:
    what = "detect/correct/mask/t_start=auto"
    if cfg.get("upscale", 1) != 1:
        raise RefineError(f"{what} work at the input size; upscale={cfg.upscale} is not supported with them "
                          "(use upscale=1)")
    if cfg.mode == "evaluate":
        raise RefineError(f"{what} are not supported with mode=evaluate (it measures the plain refinement); use "
                          "mode=refine")
    if (cfg.get("tiling") or {}).get("mode") == "always":
        raise RefineError(f"{what} need whole images (the probe and the per-pixel starts do not run on tiles): "
                          "set tiling.mode=auto or never")


def check_whole_images(paths: Sequence[Path], pipeline) -> None:
    """Refuse inputs that ``tiling.mode=auto`` would tile (from their headers, before any image is refined)."""
    m = pipeline.multiple
    for path in paths:
        size = image_size(path)
        if size is not None and pipeline.tiled(-(-size[0] // m) * m, -(-size[1] // m) * m):
            raise RefineError(f"{path} ({size[1]}x{size[0]}) would be refined on tiles (tiling.auto_above_pixels="
                              f"{pipeline.tiling.auto_above_pixels}); detect/correct/mask/t_start=auto need whole "
                              "images: set tiling.mode=never or leave such images out")


def _load_calibration(cfg: DictConfig, path: str, detect: str) -> AutoStart:
    try:
        auto = AutoStart.load(path)
    except SettingError as err:
        raise RefineError(f"auto_calibration: {err}") from err
    if cfg.get("allow_calibration_mismatch", False) is True:
        return auto
    hint = "; pass allow_calibration_mismatch=true to use it anyway"
    recorded = (auto.chain or {}).get("experts")
    ours = sorted(str(Path(s).resolve()) for s in cfg.experts)
    if not recorded or sorted(str(Path(s).resolve()) for s in recorded) != ours:
        raise RefineError(f"auto_calibration {path} was calibrated for experts {recorded}, not for this run's "
                          f"{list(cfg.experts)}{hint}")
    calibrated_with = (auto.source or {}).get("detector")
    if calibrated_with not in (None, detect):
        raise RefineError(f"auto_calibration {path} maps {calibrated_with} severities, but detect={detect}{hint}")
    return auto


def _mask_file(folder: Path, input_path: Path) -> Path:
    path = folder / f"{input_path.stem}.png"
    if not path.is_file():
        raise RefineError(f"mask={folder}: no mask {path.name} for input {input_path}")
    return path


def _read_mask(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as img:
            mode = img.mode
            pixels = np.asarray(img.convert("L")) if mode in MASK_MODES else None
    except (OSError, ValueError, SyntaxError) as err:
        raise RefineError(f"mask {path} cannot be read: {type(err).__name__}: {err}") from err
    if pixels is None:
        raise RefineError(f"mask {path} is mode {mode}; masks must be greyscale (mode L or 1)")
    return pixels


def _check_mask_size(source: Path, mask: np.ndarray, input_path: Path) -> None:
    size = image_size(input_path)  # None: an unreadable input, reported when it is loaded
    if size is not None and tuple(mask.shape) != tuple(size):
        raise RefineError(f"mask {source} is {mask.shape[1]}x{mask.shape[0]} but input {input_path} is "
                          f"{size[1]}x{size[0]}")
