"""The settings of ``refiner bench-artifacts``: the ``artifacts`` block of
``conf/bench.yaml`` as :class:`ArtifactsSettings` and its blocks (:class:`PasteBack` with :class:`PastePoint` and
:class:`PasteSweep`, :class:`TtcSettings`, and :class:`~refiner.artifacts.color_fix.ColorFix`). Like every
benchmark settings class (:mod:`refiner.bench.settings`), each checks its values once, in ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from refiner.artifacts.color_fix import ColorFix
from refiner.artifacts.composite import change_config
from refiner.bench.checks import NUM_TIMESTEPS, BenchError, ints, names
from refiner.errors import SettingError
from refiner.inference.probe import DETECTORS
from refiner.settings import optional, require_int, require_number, to_plain

ARTIFACT_SOURCES = ("generator", "defects")  # what refiner.bench.artifacts builds and refines
TTC_DETECTORS = ("asced", "asced_code")      # what watches generation (refiner.bench.artifacts.generate_with_ttc)


@dataclass(frozen=True)
class TtcSettings:
    """Generation by the benchmark's generator with a detector watching and ASCED's TTC correcting
    (``artifacts.ttc``; :class:`refiner.artifacts.correct.TrajectoryCorrection`).

    Args:
        detectors: what watches: ``asced`` (the paper's score dynamics) and/or ``asced_code`` (the public code's x0
            changes); empty: no generation section.
        t_correct: the correction's timestep (ASCED's latest viable one is about 0.48 T).
        t_detect: the score bank holds changes at t in ``(t_correct, t_detect]``; ``t_correct < t_detect <= 999``.
        gamma: perturbation of x0 before re-noising (the code's ``noise_ptb_scale``), >= 0.
        correction_eta: 1 = fresh noise (the code's ``q_sample``), 0 = DDIM re-projection; in [0, 1].
    """

    detectors: tuple[str, ...] = TTC_DETECTORS
    t_correct: int = 480
    t_detect: int = 999
    gamma: float = 0.0
    correction_eta: float = 1.0

    def __post_init__(self):
        names("artifacts.ttc.detectors", self.detectors, TTC_DETECTORS, empty=True)
        require_int("artifacts.ttc.t_correct", self.t_correct, 1, NUM_TIMESTEPS - 2)
        require_int("artifacts.ttc.t_detect", self.t_detect, self.t_correct + 1, NUM_TIMESTEPS - 1)
        require_number("artifacts.ttc.gamma", self.gamma, 0.0)
        require_number("artifacts.ttc.correction_eta", self.correction_eta, 0.0, 1.0)


@dataclass(frozen=True)
class AscedSettings:
    """``refiner bench-asced`` (``asced``; :mod:`refiner.bench.asced`): ASCED at its own operating point, the
    generator sampled with ``nfe`` DDIM steps. The detectors, ``T_c``, the bank's top, gamma and the correction's
    eta are ``artifacts.ttc``'s (:class:`TtcSettings`): one place for ASCED's settings.

    Args:
        nfe: DDIM steps of the generator's sampling, each >= 1 (the paper's 25 and, as its sec. 7.1 check, 50); the
            score bank must hold at least two changes at each.
        calibration_split: the split (a key of ``seeds``) whose samples fix each detector's image-level severity
            threshold (the best balanced accuracy there); the numbers are reported on ``split``. The same split
            twice makes the thresholded numbers in-sample (the ROC AUC never depends on a threshold).
        random_masks: also correct with a random latent mask of each image's flagged area, per detector: the
            control that says whether the place a detector flags matters.
    """

    nfe: tuple[int, ...] = (25, 50)
    calibration_split: str = "tune"
    random_masks: bool = True

    def __post_init__(self):
        ints("asced.nfe", self.nfe, 1, NUM_TIMESTEPS)
        if not isinstance(self.calibration_split, str) or not self.calibration_split:
            raise BenchError(f"asced.calibration_split must be a split name, got {self.calibration_split!r}")
        if not isinstance(self.random_masks, bool):
            raise BenchError(f"asced.random_masks must be true or false, got {self.random_masks!r}")


@dataclass(frozen=True)
class PastePoint:
    """One paste-back point (``artifacts.paste_back.points[i]``; :mod:`refiner.artifacts.composite`): the refinement
    ``onto`` kept only inside ``region``, grown by ``grow`` px and feathered outward over ``feather`` px, the input's
    own pixels elsewhere.

    Args:
        onto: which refinement: one of :meth:`ArtifactsSettings.paste_bases` (``fixed``, ``fixed t_start <t>``,
            ``<colour fix label> on fixed t_start <t>``, ``t_start=auto``, ``strength map (rest from <t_low>)``).
        region: ``probe`` (the probe's residual mask), ``output`` (the residual rule on [input, that refinement]:
            one pass, no probe) or ``output>L`` (every blurred change of that refinement above L, 0 <= L < 255).
        grow: pixels the region is grown by, >= 0.
        feather: pixels it is feathered over, >= 0.
        whole_above: optional: images whose severity (that region's detector) exceeds it keep their whole
            refinement; a number >= 0. Left out of records while unset.
    """

    onto: str
    region: str
    grow: int
    feather: int
    whole_above: float | None = optional()

    def __post_init__(self):
        if not isinstance(self.onto, str):
            raise BenchError(f"onto must be a string, got {self.onto!r}")
        self.rule()
        for key in ("grow", "feather"):
            require_int(key, getattr(self, key), 0)
        if self.whole_above is not None:
            require_number("whole_above", self.whole_above, 0.0)

    def rule(self) -> tuple[str, float | None]:
        """(the region's label in row names, its change level: None for ``probe`` and ``output``)."""
        region = self.region
        if region in ("probe", "output"):
            return region, None
        text = region[len("output>"):] if isinstance(region, str) and region.startswith("output>") else ""
        try:
            level = float(text)
        except ValueError:
            raise BenchError(f"region must be probe, output or output>L (a change level), got {region!r}") from None
        change_config(level)
        return f"output change > {text}", level

    def key(self) -> tuple:
        """What makes two points the same point (as written: ``whole_above`` 0 and 0.0 are two points)."""
        return tuple(sorted((k, str(v)) for k, v in to_plain(self).items()))


@dataclass(frozen=True)
class PasteSweep:
    """Every combination of these lists as a paste-back point (``artifacts.paste_back.sweep``), for tuning; an
    empty list makes none. Each list holds values of the :class:`PastePoint` field of that name (``regions`` holds
    ``region`` values).
    """

    onto: tuple[str, ...] = ()
    regions: tuple[str, ...] = ()
    grow: tuple[int, ...] = (4,)
    feather: tuple[int, ...] = (4,)
    whole_above: tuple[float | None, ...] = (None,)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if not isinstance(getattr(self, f.name), tuple):
                raise BenchError(f"artifacts.paste_back.sweep.{f.name} must be a list, got {getattr(self, f.name)!r}")
        try:
            self.points()  # each combination is checked by PastePoint
        except SettingError as err:
            raise BenchError(f"artifacts.paste_back.sweep: {err}") from err

    def points(self) -> list[PastePoint]:
        return [PastePoint(onto, region, grow, px, above) for onto in self.onto for region in self.regions
                for grow in self.grow for px in self.feather for above in self.whole_above]


@dataclass(frozen=True)
class PasteBack:
    """Paste back in pixel space (``artifacts.paste_back``).

    Args:
        points: the points measured (the README's, chosen on split=tune).
        sweep: more points, every combination of its lists.
    """

    points: tuple[PastePoint, ...] = ()
    sweep: PasteSweep = PasteSweep()

    def all_points(self) -> list[PastePoint]:
        """``points``, then the sweep's; a point given twice is measured once."""
        seen, out = set(), []
        for point in (*self.points, *self.sweep.points()):
            if point.key() not in seen:
                seen.add(point.key())
                out.append(point)
        return out


@dataclass(frozen=True)
class ArtifactsSettings:
    """``refiner bench-artifacts`` (``artifacts``; :mod:`refiner.bench.artifacts`): detection in input
    images, ASCED + TTC during generation, adaptive strength, colour fix and paste back in refinement.

    Args:
        detectors: the probe's detectors measured (:data:`refiner.inference.probe.DETECTORS`); must include
            ``residual``, whose masks and severities drive the adaptive points.
        probe_t_start: where the probe starts (through the top window), and the strength maps' t_start; in [1, 999].
        sources: what is refined at fixed t_starts, ``t_start=auto`` and with strength maps (of ``generator``,
            ``defects``).
        t_starts: the fixed points, and the values ``t_start=auto`` chooses between; in [1, 999].
        strength_t_low: strength maps: flagged pixels start at ``probe_t_start``, the rest at each of these
            (0..probe_t_start; empty: no strength maps).
        strength_dilate_px: the residual mask is grown by this many pixels first (an int >= 0, or a list of them:
            one strength map per value and t_low).
        paste_back: the paste-back points (:class:`PasteBack`).
        color_fix: the colour fixes measured on every fixed t_start's outputs (:class:`ColorFix`, method wavelet or
            adain; ``none`` is refused).
        calibration: the severity -> t_start map (``t_start_auto.json``) splits other than ``tune`` load; ``tune``
            fits it and writes it into ``output_dir``.
        ttc: generation with a detector and TTC (:class:`TtcSettings`).
    """

    detectors: tuple[str, ...] = DETECTORS
    probe_t_start: int = 499
    sources: tuple[str, ...] = ARTIFACT_SOURCES
    t_starts: tuple[int, ...] = (99, 199, 299, 399, 499)
    strength_t_low: tuple[int, ...] = (0, 99, 199)
    strength_dilate_px: int | tuple[int, ...] = 4
    paste_back: PasteBack = PasteBack()
    color_fix: tuple[ColorFix, ...] = ()
    calibration: str | None = None
    ttc: TtcSettings = TtcSettings()

    def __post_init__(self):
        names("artifacts.detectors", self.detectors, DETECTORS)
        if "residual" not in self.detectors:
            raise BenchError(f"artifacts.detectors must include residual (its masks drive the adaptive points), got "
                             f"{list(self.detectors)}")
        require_int("artifacts.probe_t_start", self.probe_t_start, 1, NUM_TIMESTEPS - 1)
        names("artifacts.sources", self.sources, ARTIFACT_SOURCES)
        ints("artifacts.t_starts", self.t_starts, 1, NUM_TIMESTEPS - 1)
        ints("artifacts.strength_t_low", self.strength_t_low, 0, self.probe_t_start, empty=True)
        grows = self.strength_dilate_px
        ints("artifacts.strength_dilate_px", grows if isinstance(grows, tuple) else (grows,), 0)
        if not isinstance(self.color_fix, tuple) or any(not f.active for f in self.color_fix):
            raise BenchError("artifacts.color_fix lists method: none; list only the colour fixes to measure")
        if self.calibration is not None and not isinstance(self.calibration, str):
            raise BenchError(f"artifacts.calibration must be a file path, got {self.calibration!r}")
        bases = self.paste_bases()
        for point in self.paste_back.all_points():
            if point.onto not in bases:
                raise BenchError(f"artifacts.paste_back onto={point.onto!r} must be one of {bases}")

    def strength_maps(self) -> list[tuple[int, int, str]]:
        """(grow, t_low, label) of every strength map."""
        grows = self.strength_dilate_px
        grows = list(grows) if isinstance(grows, tuple) else [grows]
        return [(g, t, f"rest from {t}" if len(grows) == 1 else f"grown {g}, rest from {t}")
                for g in grows for t in self.strength_t_low]

    def paste_bases(self) -> list[str]:
        """What a paste-back point may be pasted from (its ``onto``): ``fixed`` (the fixed t_start ``probe_t_start``),
        any ``fixed t_start T`` of ``t_starts``, a colour fix of one (``<colour fix label> on fixed t_start T``),
        ``t_start=auto`` and the strength maps."""
        return ["fixed", *(f"fixed t_start {t}" for t in self.t_starts),
                *(f"{fix.label()} on fixed t_start {t}" for fix in self.color_fix for t in self.t_starts),
                "t_start=auto", *(f"strength map ({label})" for _, _, label in self.strength_maps())]
