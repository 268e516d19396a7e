"""Fixing only where it is broken: ASCED's trajectory-aware correction (TTC) and Differential Diffusion's per-pixel
start times, both as sampler callbacks (:mod:`refiner.sampling`'s protocol), plus the per-image start map.

* :class:`TrajectoryCorrection` (ASCED's TTC, Cao et al. 2025, sec. 4; public code ``src/correction.py``): at the
  first grid point ``t_c <= T_c`` (``T_c ~ 0.48 T``, the latest viable correction, the paper's Fig. 8), the masked
  region of the latent is replaced by ``q_sample(x0_pred + gamma * n1, t_c, n2)`` with fresh noise ``n1, n2`` (code:
  ``noise_ptb_scale`` and ``q_sample``), ``x_t <- x_c * M + x_t * (1 - M)``. ``correction_eta`` generalises the fresh
  noise: ``x_c = sqrt(ab) x0' + sqrt(1 - ab - sigma^2) eps + sigma n2`` with ``sigma = correction_eta * sqrt(1 - ab)``
  (1 = the code's ``q_sample``, fully fresh noise; 0 = a deterministic DDIM re-projection of the perturbed x0).
* :class:`StrengthPinning` (Differential Diffusion, Levin & Fried 2024; exx8/differential-diffusion): every latent
  pixel ``p`` has its own start ``s_p <= t_start``; it is *released* at the first grid point ``t_j <= s_p``: until
  then (and at ``t_j`` itself) it is pinned to the re-noised input ``q_sample(z0, t, noise)`` (the same noise the run
  started from), so from ``t_j`` on it follows plain SDEdit from ``t_j``. Concretely, after the step evaluated at
  ``t``, every pixel with ``s_p < t`` is reset to the input at the next level. A pixel whose start lies below the
  grid's last point is never released and ends as ``q_sample(z0, ab_0)``: the input.
  With ``s_p = t_start`` everywhere it changes nothing. Starts in the shape or the detail window both work: the chain
  switches experts by t on the one grid, whatever is pinned.
* :class:`AutoStart`: a monotone map from an image's severity to its start t (isotonic regression, calibrated on the
  benchmark by :func:`fit_auto_start`), stored as JSON with the identity of the chain it was calibrated for.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from refiner.artifacts.dynamics import eps_from_output
from refiner.errors import SettingError
from refiner.io import atomic_write_text

T_CORRECT_FRACTION = 0.48  # ASCED Fig. 8: the latest viable correction step, as a fraction of T


def _level(alphas_cumprod: Tensor, timesteps: Sequence[int], i: int) -> tuple[int, float]:
    """The grid point the latent is at after step ``i`` and its alpha-bar (``ab[0]`` after the last step)."""
    t_next = timesteps[i + 1] if i + 1 < len(timesteps) else -1
    return t_next, float(alphas_cumprod[max(t_next, 0)])


def _as_latent_mask(mask: Tensor, like: Tensor) -> Tensor:
    """(B, h, w) or (B, 1, h, w) -> (B, 1, h, w) on ``like``'s device, bool or float weights in [0, 1]."""
    m = mask if mask.ndim == like.ndim else mask[:, None]
    if m.shape[0] != like.shape[0] or m.shape[-2:] != like.shape[-2:]:
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not fit latents of shape {tuple(like.shape)}")
    return m.to(like.device)


@dataclass
class TrajectoryCorrection:
    """ASCED's TTC as a callback (module docstring). ``timesteps`` is the run's grid; ``mask_fn()`` is called once, at
    the correction, and returns the latent mask (B, h, w) (e.g. a detector over what a
    :class:`~refiner.artifacts.dynamics.StepRecorder` saw above ``t_correct``); a bool mask blends with
    ``torch.where``, so latents outside it are left bit-identical. ``generator`` draws ``n1`` (only when
    ``gamma > 0``) and then ``n2``. After the run, ``corrected_at`` is the grid point the correction happened at (None if
    the grid never crossed ``t_correct``) and ``mask`` the mask it used."""

    timesteps: Sequence[int]
    alphas_cumprod: Tensor
    mask_fn: Callable[[], Tensor]
    t_correct: int
    gamma: float = 0.0
    correction_eta: float = 1.0
    parameterization: str = "eps"
    generator: torch.Generator | None = None
    corrected_at: int | None = None
    mask: Tensor | None = None

    def __post_init__(self):
        if not 0.0 <= self.correction_eta <= 1.0:
            raise SettingError(f"correction_eta must be in [0, 1], got {self.correction_eta}")
        if self.gamma < 0:
            raise SettingError(f"gamma (the x0 perturbation) must be >= 0, got {self.gamma}")

    def __call__(self, i: int, t: int, x_t: Tensor, model_output: Tensor, x0_pred: Tensor) -> Tensor | None:
        if self.corrected_at is not None:
            return None
        t_next, ab = _level(self.alphas_cumprod, self.timesteps, i)
        if not (t > self.t_correct >= t_next):
            return None
        self.corrected_at = max(t_next, 0)
        self.mask = _as_latent_mask(self.mask_fn(), x_t)
        x0 = x0_pred
        if self.gamma > 0:
            x0 = x0 + self.gamma * torch.randn(x0.shape, generator=self.generator, device=x0.device, dtype=x0.dtype)
        fresh = torch.randn(x_t.shape, generator=self.generator, device=x_t.device, dtype=x_t.dtype)
        sigma = self.correction_eta * math.sqrt(1 - ab)
        x_c = math.sqrt(ab) * x0 + sigma * fresh
        if sigma ** 2 < 1 - ab:
            eps = eps_from_output(model_output, x0_pred, t, self.alphas_cumprod, self.parameterization)
            x_c = x_c + math.sqrt(1 - ab - sigma ** 2) * eps
        if self.mask.dtype == torch.bool:
            return torch.where(self.mask, x_c, x_t)
        return x_c * self.mask + x_t * (1 - self.mask)


@dataclass
class StrengthPinning:
    """Differential Diffusion as a callback (module docstring): ``z0`` the clean (scaled) latents, ``noise`` the
    noise the run was started with, ``starts`` each latent pixel's start t ((B, h, w) or (B, 1, h, w) ints),
    ``timesteps`` the run's grid (its first point must be >= every start)."""

    z0: Tensor
    noise: Tensor
    starts: Tensor
    timesteps: Sequence[int]
    alphas_cumprod: Tensor

    def __post_init__(self):
        self.starts = _as_latent_mask(self.starts, self.z0).long()
        if int(self.starts.max()) > self.timesteps[0]:
            raise ValueError(f"a pixel starts at t={int(self.starts.max())}, above the grid's first point "
                             f"{self.timesteps[0]}: run the grid from the largest start")

    def __call__(self, i: int, t: int, x_t: Tensor, model_output: Tensor, x0_pred: Tensor) -> Tensor:
        _, ab = _level(self.alphas_cumprod, self.timesteps, i)
        pinned = self.starts < t  # step i at t acted on pixels that start below t: reset them to the input's level
        target = math.sqrt(ab) * self.z0 + math.sqrt(1 - ab) * self.noise
        return torch.where(pinned, target.to(x_t.dtype), x_t)


def starts_from_strength(strength: Tensor, t_low: int, t_high: int) -> Tensor:
    """Per-pixel start ``round(t_low + m (t_high - t_low))`` for a strength map ``m`` in [0, 1] (1 = refine from
    ``t_high``, 0 = from ``t_low``; a start of 0 keeps the pixel as the input)."""
    if not 0 <= t_low <= t_high:
        raise SettingError(f"strength map needs 0 <= t_low <= t_high, got t_low={t_low}, t_high={t_high}")
    if strength.numel() and (float(strength.min()) < 0 or float(strength.max()) > 1):
        raise SettingError("strength map values must lie in [0, 1]")
    return torch.round(t_low + strength.float() * (t_high - t_low)).long()


@dataclass
class AutoStart:
    """A non-decreasing map severity -> start t, piecewise linear through ``knots`` ((severity, t) pairs sorted by
    severity; flat outside them), rounded to an int. ``chain`` records which checkpoints (and first stage) it was
    calibrated for; ``source`` where (benchmark split, seeds)."""

    knots: list[tuple[float, float]]
    chain: dict = field(default_factory=dict)
    source: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.knots:
            raise SettingError("t_start=auto: the calibration holds no knots")
        xs, ys = zip(*self.knots)
        if any(b < a for a, b in zip(xs, xs[1:])) or any(b < a for a, b in zip(ys, ys[1:])):
            raise SettingError(f"t_start=auto: knots must be sorted and non-decreasing, got {self.knots}")

    def __call__(self, severity: Sequence[float] | Tensor) -> list[int]:
        xs, ys = zip(*self.knots)
        values = np.interp(np.asarray(severity, dtype=float), xs, ys)
        return [int(round(v)) for v in np.atleast_1d(values)]

    def save(self, path: str | Path) -> None:

        atomic_write_text(path, json.dumps({"kind": "refiner t_start=auto calibration", "knots": self.knots,
                                            "chain": self.chain, "source": self.source}, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "AutoStart":
        path = Path(path)
        if not path.is_file():
            raise SettingError(f"t_start=auto needs a calibration file; {path} not found (python -m "
                               "refiner.bench.calibrate writes one)")
        try:
            data = json.loads(path.read_text())
            return cls([tuple(map(float, k)) for k in data["knots"]], data.get("chain", {}), data.get("source", {}))
        except (ValueError, KeyError, TypeError) as err:
            raise SettingError(f"{path} is not a t_start=auto calibration: {err}") from err


def fit_auto_start(severity: Sequence[float], needed_t: Sequence[float], t_min: int, t_max: int, **identity
                   ) -> AutoStart:
    """Isotonic (non-decreasing) least-squares fit of each calibration image's needed start t (the smallest swept
    t_start that fixed it, ``t_max`` when none did) on its severity, clipped to ``[t_min, t_max]``
    (scikit-learn's ``IsotonicRegression``). ``identity`` (``chain=``, ``source=``) is stored with the map."""
    from sklearn.isotonic import IsotonicRegression

    if len(severity) != len(needed_t) or len(severity) < 2:
        raise ValueError(f"need at least two (severity, needed t) pairs of equal length, got {len(severity)} and "
                         f"{len(needed_t)}")
    x = np.asarray(severity, dtype=float)
    fit = IsotonicRegression(increasing=True, y_min=t_min, y_max=t_max, out_of_bounds="clip").fit(x, needed_t)
    xs = np.unique(x)
    ys = np.maximum.accumulate(fit.predict(xs))
    return AutoStart([(float(a), float(b)) for a, b in zip(xs, ys)], **identity)
