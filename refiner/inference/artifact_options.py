"""A refine run's artifact options (issue #11): ``detect``, ``correct``, ``mask``, ``t_start=auto``, ``composite``;
their values are checked by :class:`~refiner.inference.settings.RefineSettings`, the files they name (calibration,
masks) here, before any image is refined.

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
from PIL import Image

from refiner.artifacts.composite import OUTPUT_DETECTOR
from refiner.artifacts.correct import AutoStart
from refiner.data.images import image_size
from refiner.errors import RefineError, SettingError
from refiner.inference.settings import RefineSettings

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
    def from_settings(cls, settings: RefineSettings) -> "ArtifactOptions":
        """The run's artifact options from its checked settings (:class:`~refiner.inference.settings.RefineSettings`
        checks every value and combination); with ``t_start=auto`` the calibration file is read and checked here."""
        s = settings
        level = s.output_residual_level if s.detect == OUTPUT_DETECTOR else None  # only its threshold
        opts = cls(s.detect, s.correct, s.mask, None, None, s.strength.t_low, s.mask_dilate_px, s.ttc.t_correct,
                   float(s.ttc.gamma), float(s.ttc.correction_eta), s.composite, s.paste_back.feather_px,
                   None if s.paste_back.whole_above is None else float(s.paste_back.whole_above),
                   None if level is None else float(level))
        if s.t_start == "auto":
            opts.calibration = str(s.auto_calibration)
            opts.auto = _load_calibration(s, opts.calibration)
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


def check_whole_images(paths: Sequence[Path], pipeline) -> None:
    """Refuse inputs that ``tiling.mode=auto`` would tile (from their headers, before any image is refined)."""
    m = pipeline.multiple
    for path in paths:
        size = image_size(path)
        if size is not None and pipeline.tiled(-(-size[0] // m) * m, -(-size[1] // m) * m):
            raise RefineError(f"{path} ({size[1]}x{size[0]}) would be refined on tiles (tiling.auto_above_pixels="
                              f"{pipeline.tiling.auto_above_pixels}); detect/correct/mask/t_start=auto need whole "
                              "images: set tiling.mode=never or leave such images out")


def _load_calibration(settings: RefineSettings, path: str) -> AutoStart:
    try:
        auto = AutoStart.load(path)
    except SettingError as err:
        raise RefineError(f"auto_calibration: {err}") from err
    if settings.allow_calibration_mismatch:
        return auto
    hint = "; pass allow_calibration_mismatch=true to use it anyway"
    chain = auto.chain or {}
    recorded = chain.get("experts", chain.get("stages"))  # "stages": files written before the word was "experts"
    ours = sorted(str(Path(s).resolve()) for s in settings.experts)
    if not recorded or sorted(str(Path(s).resolve()) for s in recorded) != ours:
        raise RefineError(f"auto_calibration {path} was calibrated for experts {recorded}, not for this run's "
                          f"{list(settings.experts)}{hint}")
    calibrated_with = (auto.source or {}).get("detector")
    if calibrated_with not in (None, settings.detect):
        raise RefineError(f"auto_calibration {path} maps {calibrated_with} severities, but detect={settings.detect}"
                          f"{hint}")
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
