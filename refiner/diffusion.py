"""The forward noise process: schedules, ``q_sample``, parameterization conversions, timestep windows.

Convention: ``t`` is the diffusion timestep, t=0 is (nearly) clean and t=T-1 is (nearly) pure
noise; ``alphas_cumprod[t]`` is written ``ab_t`` (DDPM's bar-alpha_t, indexed like CompVis LDM).
All functions are pure; schedules are float64 tensors, gathered values are cast to the input dtype.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, Mapping

import torch
from torch import Tensor

from refiner.errors import SettingError
from refiner.settings import require_choice, require_number

Parameterization = Literal["eps", "x0", "v"]
PARAMETERIZATIONS = ("eps", "x0", "v")
LOSS_WEIGHTINGS = ("none", "min_snr")
DISTRIBUTIONS = ("uniform", "logit_normal", "piecewise")


def make_betas(
    kind: str = "linear",
    num_timesteps: int = 1000,
    linear_start: float = 0.0015,
    linear_end: float = 0.0195,
    cosine_s: float = 8e-3,
) -> Tensor:
    """Beta schedule in float64, numerically identical to CompVis ``make_beta_schedule``.

    * ``linear``: LDM's "linear" is linear in sqrt(beta):
      ``beta_t = (sqrt(b0) + t/(T-1) * (sqrt(b1) - sqrt(b0)))**2``.
    * ``cosine``: Nichol & Dhariwal 2021, eq. 17, ``ab(t) = cos(((t/T)+s)/(1+s) * pi/2)**2``,
      betas clipped to 0.999.
    * ``linear_beta``: the original DDPM schedule, linear in beta.
    """
    if num_timesteps < 2:
        raise ValueError(f"num_timesteps must be >= 2, got {num_timesteps}")
    if kind == "linear":
        return torch.linspace(linear_start**0.5, linear_end**0.5, num_timesteps, dtype=torch.float64) ** 2
    if kind == "linear_beta":
        return torch.linspace(linear_start, linear_end, num_timesteps, dtype=torch.float64)
    if kind == "cosine":
        steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps + cosine_s
        f = torch.cos(steps / (1 + cosine_s) * math.pi / 2) ** 2
        f = f / f[0]
        return (1 - f[1:] / f[:-1]).clamp(min=0.0, max=0.999)
    raise ValueError(f"unknown beta schedule {kind!r}; expected 'linear', 'linear_beta' or 'cosine'")


@dataclass(frozen=True)
class ScheduleConfig:
    """Plain description of a noise schedule; stored in checkpoints' hyperparameters and exports."""

    kind: str = "linear"
    num_timesteps: int = 1000
    linear_start: float = 0.0015
    linear_end: float = 0.0195
    cosine_s: float = 8e-3

    def betas(self) -> Tensor:
        return make_betas(self.kind, self.num_timesteps, self.linear_start, self.linear_end, self.cosine_s)

    def alphas_cumprod(self) -> Tensor:
        return torch.cumprod(1.0 - self.betas(), dim=0)

    def to_dict(self) -> dict:
        return asdict(self)


def gather(values: Tensor, t: Tensor, like: Tensor) -> Tensor:
    """``values[t]`` broadcast to ``like``'s rank, in ``like``'s dtype and device."""
    t = torch.as_tensor(t, device=values.device).long()
    if t.ndim == 0:
        t = t.expand(like.shape[0])
    out = values[t].to(device=like.device, dtype=like.dtype)
    return out.reshape(out.shape[0], *([1] * (like.ndim - 1)))


def q_sample(x0: Tensor, t: Tensor, alphas_cumprod: Tensor, noise: Tensor) -> Tensor:
    """Sample q(x_t | x_0) = N(sqrt(ab_t) x0, (1 - ab_t) I)  (DDPM eq. 4)."""
    ab = gather(alphas_cumprod, t, x0)
    return ab.sqrt() * x0 + (1 - ab).sqrt() * noise


def v_from_x0_eps(x0: Tensor, eps: Tensor, t: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """v = sqrt(ab) eps - sqrt(1-ab) x0  (Salimans & Ho 2022, sec. 4)."""
    ab = gather(alphas_cumprod, t, x0)
    return ab.sqrt() * eps - (1 - ab).sqrt() * x0


def x0_from_eps(x_t: Tensor, eps: Tensor, t: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """Invert q_sample for x0: x0 = (x_t - sqrt(1-ab) eps) / sqrt(ab)."""
    ab = gather(alphas_cumprod, t, x_t)
    return (x_t - (1 - ab).sqrt() * eps) / ab.sqrt()


def eps_from_x0(x_t: Tensor, x0: Tensor, t: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """Invert q_sample for eps: eps = (x_t - sqrt(ab) x0) / sqrt(1-ab)."""
    ab = gather(alphas_cumprod, t, x_t)
    return (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()


def x0_eps_from_v(x_t: Tensor, v: Tensor, t: Tensor, alphas_cumprod: Tensor) -> tuple[Tensor, Tensor]:
    """x0 = sqrt(ab) x_t - sqrt(1-ab) v;  eps = sqrt(1-ab) x_t + sqrt(ab) v."""
    ab = gather(alphas_cumprod, t, x_t)
    return ab.sqrt() * x_t - (1 - ab).sqrt() * v, (1 - ab).sqrt() * x_t + ab.sqrt() * v


def to_x0_eps(
    output: Tensor, x_t: Tensor, t: Tensor, alphas_cumprod: Tensor, parameterization: Parameterization
) -> tuple[Tensor, Tensor]:
    """Convert a model output of the given parameterization to the pair (x0_pred, eps_pred)."""
    if parameterization == "eps":
        return x0_from_eps(x_t, output, t, alphas_cumprod), output
    if parameterization == "x0":
        return output, eps_from_x0(x_t, output, t, alphas_cumprod)
    if parameterization == "v":
        return x0_eps_from_v(x_t, output, t, alphas_cumprod)
    raise ValueError(f"unknown parameterization {parameterization!r}; expected one of {PARAMETERIZATIONS}")


def training_target(
    parameterization: Parameterization, x0: Tensor, noise: Tensor, t: Tensor, alphas_cumprod: Tensor
) -> Tensor:
    """What the network regresses for each parameterization."""
    if parameterization == "eps":
        return noise
    if parameterization == "x0":
        return x0
    if parameterization == "v":
        return v_from_x0_eps(x0, noise, t, alphas_cumprod)
    raise ValueError(f"unknown parameterization {parameterization!r}; expected one of {PARAMETERIZATIONS}")


def snr(t: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """Signal-to-noise ratio of q(x_t | x_0): SNR(t) = ab_t / (1 - ab_t), float64, one value per t."""
    ab = alphas_cumprod.double()[torch.as_tensor(t, device=alphas_cumprod.device).long()]
    return ab / (1 - ab)


def loss_weight(
    kind: str, t: Tensor, alphas_cumprod: Tensor, parameterization: Parameterization, gamma: float = 5.0
) -> Tensor:
    """Per-sample weight of the MSE on the network's own target, float64 with one value per t.

    ``none``: 1 for every t (plain MSE).

    ``min_snr``: Min-SNR-gamma (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting
    Strategy", arXiv 2303.09556, sec. 3.4): the x0-space loss ``||x0 - x0_hat||^2`` is weighted by
    ``min(SNR(t), gamma)``. The same weight expressed on each parameterization's own target follows from

        ||eps - eps_hat||^2 = SNR(t) * ||x0 - x0_hat||^2              (x0 = (x_t - sqrt(1-ab) eps) / sqrt(ab))
        ||v - v_hat||^2     = (SNR(t) + 1) * ||x0 - x0_hat||^2        (x0 = sqrt(ab) x_t - sqrt(1-ab) v)

    so, with SNR(t) = ab_t / (1 - ab_t):

        w_eps(t) = min(SNR(t), gamma) / SNR(t)
        w_x0(t)  = min(SNR(t), gamma)
        w_v(t)   = min(SNR(t), gamma) / (SNR(t) + 1)

    In CompVis's linear schedule SNR(t) runs from about 666 at t=0 down to about 1 near t=250, so with eps
    prediction and gamma=5 the low-noise end of a window [0, 250) is down-weighted by up to ~130x.
    """
    require_choice("model.loss_weighting", kind, LOSS_WEIGHTINGS)
    t = torch.as_tensor(t, device=alphas_cumprod.device).long()
    if kind == "none":
        return torch.ones(t.shape, dtype=torch.float64, device=alphas_cumprod.device)
    if not (require_number("model.min_snr_gamma", gamma) > 0):
        raise SettingError(f"model.min_snr_gamma must be > 0, got {gamma!r}")
    s = snr(t, alphas_cumprod)
    clipped = s.clamp(max=float(gamma))
    if parameterization == "eps":
        return clipped / s
    if parameterization == "x0":
        return clipped
    if parameterization == "v":
        return clipped / (s + 1)
    raise ValueError(f"unknown parameterization {parameterization!r}; expected one of {PARAMETERIZATIONS}")


@dataclass(frozen=True)
class Window:
    """A half-open timestep window ``[t_min, t_max)`` of a schedule with ``num_timesteps`` steps, and how
    training draws t inside it.

    This is where the window is enforced: training draws t only through :meth:`sample`, and the
    staged sampler asks :meth:`contains`. The blog's "sampling steps 500-750" are t in [250, 500).

    The draw distribution is a field of the window rather than a separate object because it is part of
    how a window is trained, is configured in the same ``window=`` preset, travels in the same checkpoint
    entry (``hyper_parameters['window']``) and is checked in the same place. Sampling ignores it:
    :meth:`contains` reads only the bounds. ``distribution`` is one of

    * ``uniform`` (default): ``torch.randint(t_min, t_max)``, as CompVis LDM draws over [0, T).
    * ``logit_normal``: ``t = t_min + floor(sigmoid(logit_mean + logit_std * n) * width)``, n ~ N(0, 1): the
      logit-normal density of Esser et al. 2024 (SD3, arXiv 2403.03206, sec. 3.1)
      ``pi_ln(u; m, s) = 1/(s sqrt(2 pi)) * 1/(u (1-u)) * exp(-(logit(u) - m)^2 / (2 s^2))`` on u in (0, 1),
      discretised onto the window's timesteps (u near 0 -> t_min, u near 1 -> t_max - 1). A positive
      ``logit_mean`` moves draws toward the noisy end. P(t_min + k) = Phi((logit((k+1)/W) - m)/s) -
      Phi((logit(k/W) - m)/s) for W = width.
    * ``piecewise``: ``piecewise = ((lo, hi, weight), ...)`` sub-ranges that tile [t_min, t_max) exactly;
      ``weight`` is a relative probability per timestep, so P(t) = weight(t) / sum_s weight(s) and a
      sub-range's share is ``weight * (hi - lo) / sum(weight_j * (hi_j - lo_j))``. Equal weights give the
      uniform distribution whatever the sub-ranges; weight 0 excludes a sub-range.

    Checkpoints written before these fields existed load as ``uniform``; :meth:`to_dict` omits the fields
    that are at their defaults, so a uniform window serialises exactly as it always did.
    """

    t_min: int
    t_max: int
    num_timesteps: int = 1000
    distribution: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    piecewise: tuple | None = None

    def __post_init__(self):
        for name in ("t_min", "t_max", "num_timesteps"):
            if not isinstance(getattr(self, name), int) or isinstance(getattr(self, name), bool):
                raise TypeError(f"Window.{name} must be an int, got {getattr(self, name)!r}")
        if not 0 <= self.t_min < self.t_max <= self.num_timesteps:
            hint = " (inverted: t_min must be below t_max)" if self.t_min >= self.t_max else ""
            raise ValueError(
                f"invalid timestep window [t_min={self.t_min}, t_max={self.t_max}) for T={self.num_timesteps}: "
                f"need 0 <= t_min < t_max <= T{hint}. Remember t=0 is clean and t=T-1 is pure noise; "
                f"the blog's 'steps 500-750' are t_min=250, t_max=500."
            )
        require_choice("window.distribution", self.distribution, DISTRIBUTIONS)
        object.__setattr__(self, "logit_mean", require_number("window.logit_mean", self.logit_mean))
        std = require_number("window.logit_std", self.logit_std)
        if std <= 0:
            raise SettingError(f"window.logit_std must be > 0, got {self.logit_std!r}")
        object.__setattr__(self, "logit_std", std)
        if self.distribution == "piecewise":
            object.__setattr__(self, "piecewise", self._checked_pieces())
        elif self.piecewise is not None:
            raise SettingError(f"window.piecewise={self.piecewise!r} is set but window.distribution="
                               f"{self.distribution!r}; set window.distribution=piecewise or window.piecewise=null")

    @classmethod
    def from_config(cls, window: Mapping[str, Any], num_timesteps: int) -> "Window":
        """A window from its config block on a schedule of ``num_timesteps``: the block need not name ``T``
        (``conf/window/*.yaml`` do not: the window does not read the model), ``t_max: null`` means ``T``, and a
        ``num_timesteps`` it does name must be the schedule's."""
        values = dict(window)
        given = values.pop("num_timesteps", None)
        if given is not None and given != num_timesteps:
            raise SettingError(f"window.num_timesteps={given} differs from the schedule's num_timesteps={num_timesteps}")
        if values.get("t_max") is None:
            values["t_max"] = num_timesteps
        try:
            return cls(num_timesteps=num_timesteps, **values)
        except TypeError as err:
            raise SettingError(f"window: {err}") from err

    def _checked_pieces(self) -> tuple:
        """``piecewise`` as sorted ``(lo, hi, weight)`` tuples that tile [t_min, t_max) with weights >= 0."""
        if self.piecewise is None or isinstance(self.piecewise, (str, bytes)) or not len(self.piecewise):
            raise SettingError(f"window.distribution=piecewise needs window.piecewise=[[lo, hi, weight], ...] "
                               f"tiling [{self.t_min}, {self.t_max}), got {self.piecewise!r}")
        pieces = []
        for piece in self.piecewise:
            if isinstance(piece, (str, bytes)) or not hasattr(piece, "__len__") or len(piece) != 3:
                raise SettingError(f"window.piecewise entries are [lo, hi, weight], got {piece!r}")
            lo, hi, weight = piece
            if any(not isinstance(v, int) or isinstance(v, bool) for v in (lo, hi)) or lo >= hi:
                raise SettingError(f"window.piecewise entry {list(piece)!r}: lo and hi must be integers with lo < hi")
            weight = require_number(f"window.piecewise weight of [{lo}, {hi})", weight)
            if weight < 0:
                raise SettingError(f"window.piecewise entry {list(piece)!r}: weight must be >= 0")
            pieces.append((lo, hi, weight))
        pieces.sort()
        edge = self.t_min
        for lo, hi, _ in pieces:
            if lo != edge:
                what = "overlaps" if lo < edge else "leaves a gap before"
                raise SettingError(f"window.piecewise sub-range [{lo}, {hi}) {what} t={edge}: the sub-ranges "
                                   f"must tile the window [{self.t_min}, {self.t_max}) exactly")
            edge = hi
        if edge != self.t_max:
            raise SettingError(f"window.piecewise ends at {edge}, not at t_max={self.t_max}: the sub-ranges must "
                               f"tile the window [{self.t_min}, {self.t_max}) exactly")
        if not any(w > 0 for _, _, w in pieces):
            raise SettingError(f"window.piecewise weights are all zero: {[list(p) for p in pieces]!r}")
        return tuple(pieces)

    @property
    def width(self) -> int:
        return self.t_max - self.t_min

    def contains(self, t) -> Tensor | bool:
        if isinstance(t, Tensor):
            return (t >= self.t_min) & (t < self.t_max)
        return self.t_min <= int(t) < self.t_max

    def sample(self, n: int, generator: torch.Generator | None = None, device=None) -> Tensor:
        """Draw n timesteps from the window with its ``distribution`` (see the class docstring).

        ``uniform`` is exactly the draw of earlier versions (LDM draws from [0, T) with randint), so runs
        and resumes stay bit-identical for the same generator.
        """
        if self.distribution == "uniform":
            return torch.randint(self.t_min, self.t_max, (n,), generator=generator, device=device)
        if self.distribution == "logit_normal":
            normal = torch.randn(n, generator=generator, dtype=torch.float64)
            u = torch.sigmoid(self.logit_mean + self.logit_std * normal)  # in (0, 1); may round to 1.0
            offset = torch.floor(u * self.width).long().clamp_(0, self.width - 1)
        else:
            per_t = torch.cat([torch.full((hi - lo,), w, dtype=torch.float64) for lo, hi, w in self.piecewise])
            offset = torch.multinomial(per_t, n, replacement=True, generator=generator)
        return (self.t_min + offset).to(device)

    def to_dict(self) -> dict:
        """Plain fields for checkpoints and JSON; the distribution fields only where they differ from the default."""
        out = {"t_min": self.t_min, "t_max": self.t_max, "num_timesteps": self.num_timesteps}
        for f in fields(self)[3:]:
            value = getattr(self, f.name)
            if value != f.default:
                out[f.name] = [list(p) for p in value] if f.name == "piecewise" else value
        return out

    def __str__(self) -> str:
        return f"[{self.t_min}, {self.t_max})"
