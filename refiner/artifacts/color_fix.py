"""Colour fix: give the refined picture the input's own low frequencies (its colours and shading), keep the
refinement's high frequencies (its shapes and edges).

Every refined pixel goes through the VQ-f4. The demo's tiny f4 pulls backgrounds and skins toward a few colours
(docs/experiments/demo-benchmark.md, "Faithfulness is limited by the f4"), so a refinement repaints the colours of regions that had nothing
wrong with them, and the RMSE to the input never drops below that drift. Diffusion super-resolution has the same
problem with its VAE and fixes it after decoding; StableSR (Wang et al., "Exploiting Diffusion Prior for Real-World
Image Super-Resolution", IJCV 2024; ``scripts/wavelet_color_fix.py`` in IceClear/StableSR, after Li Yi's
sd-webui-stablesr ``colorfix.py``) offers two rules, both here:

* ``wavelet``: an a-trous ("with holes") wavelet decomposition. One level blurs with the 3x3 kernel
  ``[1, 2, 1]^T [1, 2, 1] / 16`` dilated by ``2^i`` (level ``i = 0 .. levels-1``) with replicate padding; the high
  band is the sum of what each level removed, the low band what is left after the last. StableSR returns the
  refined picture's high band plus the input's low band. The bands of one picture telescope to the picture, and the
  low-pass ``L`` is linear, so that is ``refined + L(input - refined)``: :func:`wavelet_color_fix` computes it in that
  form, with one cascade instead of two. StableSR uses 5 levels (a support of 63 px); fewer levels restore more of
  the input's local structure, which on an artifact image includes the artifact.
* ``adain``: adaptive instance normalisation (Huang and Belongie 2017): per channel, the refined picture's mean and
  standard deviation become the input's, ``(refined - mean_r) / std_r * std_i + mean_i`` with ``std =
  sqrt(var + 1e-5)`` (StableSR's ``calc_mean_std``, unbiased variance). A global shift and gain per channel: it
  cannot bring back any shape.

Ours on top: ``max_shift`` caps how far the wavelet rule moves any pixel (levels of 0..255). A cap of 8 removes much
of the f4's colour drift (RMSE 0.015-0.019 lower at every t_start on the benchmark), while the low band of a blob or a
melted outline, which the refinement removed, mostly stays out; uncapped, the rule brings it back and re-breaks
images (docs/experiments/artifacts.md).

Both work on [0, 1] floats in float64 and return uint8 (rounded, clipped). Neither calls a model. Written here
rather than taken from a library: StableSR's script is not a package, and its wavelet form builds both cascades.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from refiner.errors import SettingError
from refiner.settings import require_choice, require_int, require_number

COLOR_FIXES = ("none", "wavelet", "adain")
ADAIN_EPS = 1e-5  # StableSR's calc_mean_std


def _check_levels(levels) -> int:
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 1:
        raise SettingError(f"color_fix levels must be an int >= 1, got {levels!r}")
    return levels


def _check_max_shift(name: str, value) -> float | None:
    """``None`` (no cap) or a number in (0, 255]: the one check of the cap, for the library and the settings."""
    if value is None:
        return None
    value = require_number(name, value, 0.0, 255.0)
    if value == 0:
        raise SettingError(f"{name} must be > 0 (or null for no cap); use method=none to switch the colour fix off")
    return value


def atrous_lowpass(x: Tensor, levels: int) -> Tensor:
    """The low band of ``x`` (B, C, H, W) after ``levels`` a-trous levels (module docstring): level ``i`` convolves
    with ``[1, 2, 1] / 4`` along each axis, taps ``2^i`` apart, over a replicate-padded border. The 2-D kernel is
    the outer product, so the two 1-D passes equal StableSR's 3x3 ``wavelet_blur`` (replicate padding commutes with
    the separable form: both read ``x[clamp(i + a d), clamp(j + b d)]``)."""
    _check_levels(levels)
    if x.ndim != 4:
        raise ValueError(f"atrous_lowpass takes (B, C, H, W), got shape {tuple(x.shape)}")
    b, c, h, w = x.shape
    taps = torch.tensor([0.25, 0.5, 0.25], dtype=x.dtype, device=x.device)
    flat = x.reshape(b * c, 1, h, w)
    for i in range(levels):
        d = 2 ** i
        # replicate padding takes any width, also wider than the image (a 5 px side at dilation 8 is tested)
        flat = F.conv2d(F.pad(flat, (0, 0, d, d), mode="replicate"), taps.view(1, 1, 3, 1), dilation=(d, 1))
        flat = F.conv2d(F.pad(flat, (d, d, 0, 0), mode="replicate"), taps.view(1, 1, 1, 3), dilation=(1, d))
    return flat.reshape(b, c, h, w)


def _as_float(images: Sequence[np.ndarray]) -> Tensor:
    return torch.from_numpy(np.stack(images).astype(np.float64) / 255.0).permute(0, 3, 1, 2)


def _as_uint8(x: Tensor) -> list[np.ndarray]:
    arr = np.round(x.permute(0, 2, 3, 1).numpy() * 255.0).clip(0, 255).astype(np.uint8)
    return list(arr)


def _pairs(refined: Sequence[np.ndarray], inputs: Sequence[np.ndarray]) -> None:
    if len(refined) != len(inputs):
        raise ValueError(f"{len(refined)} refined images and {len(inputs)} inputs")
    for r, i in zip(refined, inputs):
        if r.shape != i.shape or r.ndim != 3 or r.shape[2] != 3 or r.dtype != np.uint8 or i.dtype != np.uint8:
            raise ValueError(f"color fix takes same-size uint8 (H, W, 3) pairs, got {r.shape} {r.dtype} and "
                             f"{i.shape} {i.dtype}")


def wavelet_color_fix(refined: Sequence[np.ndarray], inputs: Sequence[np.ndarray], levels: int = 5,
                      max_shift: float | None = None, band_rows: int = 256) -> list[np.ndarray]:
    """``refined + clip(L(input - refined), -max_shift, max_shift)`` with ``L`` = :func:`atrous_lowpass` over
    ``levels``: StableSR's wavelet reconstruction (the refined high band, the input's low band) when ``max_shift``
    is None. ``max_shift`` (levels of the 0..255 scale) caps how far a pixel moves toward the input's low band: the
    f4's colour drift is small, the low band of an artifact (a blob, a melted outline) is not, so a cap restores the
    first and leaves most of the second (ours; measured in docs/experiments/artifacts.md).

    Large images go through in bands of ``band_rows`` rows plus a halo of ``2^levels - 1`` rows on each side (the
    cascade's reach), so the result equals the whole-image one while memory stays a band's."""
    _pairs(refined, inputs)
    _check_levels(levels)
    max_shift = _check_max_shift("color_fix max_shift", max_shift)
    halo = 2 ** levels - 1
    out = []
    for r, i in zip(refined, inputs):
        h = r.shape[0]
        rows = []
        for top in range(0, h, band_rows):
            lo, hi = max(0, top - halo), min(h, top + band_rows + halo)
            x, y = _as_float([r[lo:hi]]), _as_float([i[lo:hi]])
            shift = atrous_lowpass(y - x, levels)
            if max_shift is not None:
                shift = shift.clamp(-max_shift / 255.0, max_shift / 255.0)
            rows.append(_as_uint8(x + shift)[0][top - lo:top - lo + min(band_rows, h - top)])
        out.append(np.concatenate(rows))
    return out


def adain_color_fix(refined: Sequence[np.ndarray], inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Per image and channel, the refined picture's mean and standard deviation set to the input's (module
    docstring)."""
    _pairs(refined, inputs)
    out = []
    for r, i in zip(refined, inputs):
        x, y = _as_float([r]), _as_float([i])
        mx, my = x.mean(dim=(2, 3), keepdim=True), y.mean(dim=(2, 3), keepdim=True)
        sx = (x.flatten(2).var(dim=2, unbiased=True) + ADAIN_EPS).sqrt()[..., None, None]
        sy = (y.flatten(2).var(dim=2, unbiased=True) + ADAIN_EPS).sqrt()[..., None, None]
        out += _as_uint8((x - mx) / sx * sy + my)
    return out


@dataclass(frozen=True)
class ColorFix:
    """The ``color_fix`` settings of ``refine.py`` and of the benchmark (``artifacts.color_fix``, a list of them),
    checked when made; :func:`refiner.settings.from_config` builds one from a config block, alone or as a field of a
    larger settings class. The defaults are the point chosen on the benchmark's ``split=tune``
    (docs/experiments/artifacts.md).

    Args:
        method: ``none`` (off), ``wavelet`` or ``adain`` (:data:`COLOR_FIXES`; module docstring).
        levels: a-trous levels of the wavelet rule, 1..12 (wavelet only).
        max_shift: cap on how far the wavelet rule moves a pixel, in levels of 0..255, in (0, 255]; ``None`` is
            StableSR's uncapped rule (wavelet only). Kept as given (an int stays an int in records);
            :meth:`digest` reads it as a float, as the settings did before they were typed.
    """

    method: str = "none"
    levels: int = 3
    max_shift: float | None = 8.0

    def __post_init__(self):
        require_choice("color_fix.method", self.method, COLOR_FIXES)
        require_int("color_fix.levels", self.levels, 1, 12)
        _check_max_shift("color_fix.max_shift", self.max_shift)

    @property
    def active(self) -> bool:
        return self.method != "none"

    def __call__(self, refined: Sequence[np.ndarray], inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        return color_fix(refined, inputs, self.method, self.levels, self.max_shift)

    def digest(self) -> dict:
        """What of these settings changes an output (empty when off, so other digests stay as they were)."""
        if not self.active:
            return {}
        cap = None if self.max_shift is None else float(self.max_shift)
        wavelet = {"levels": self.levels, "max_shift": cap} if self.method == "wavelet" else {}
        return {"method": self.method, **wavelet}

    def label(self) -> str:
        if self.method == "adain":
            return "colour fix (adain)"
        cap = "uncapped" if self.max_shift is None else f"shift <= {self.max_shift:g}"
        return f"colour fix (wavelet, {self.levels} levels, {cap})"


def color_fix(refined: Sequence[np.ndarray], inputs: Sequence[np.ndarray], method: str, levels: int = 5,
              max_shift: float | None = None) -> list[np.ndarray]:
    """Dispatch on ``method`` (:data:`COLOR_FIXES`); ``none`` returns ``refined`` as it is."""
    if method == "none":
        return list(refined)
    if method == "wavelet":
        return wavelet_color_fix(refined, inputs, levels, max_shift)
    if method == "adain":
        return adain_color_fix(refined, inputs)
    raise SettingError(f"color_fix must be one of {list(COLOR_FIXES)}, got {method!r}")
