"""The forward noise process: schedules, ``q_sample``, parameterization conversions, timestep windows.

Convention: ``t`` is the diffusion timestep, t=0 is (nearly) clean and t=T-1 is (nearly) pure
noise; ``alphas_cumprod[t]`` is written ``ab_t`` (DDPM's bar-alpha_t, indexed like CompVis LDM).
All functions are pure; schedules are float64 tensors, gathered values are cast to the input dtype.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import Tensor

Parameterization = Literal["eps", "x0", "v"]
PARAMETERIZATIONS = ("eps", "x0", "v")


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


def alphas_cumprod_from_betas(betas: Tensor) -> Tensor:
    return torch.cumprod(1.0 - betas.double(), dim=0)


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


@dataclass(frozen=True)
class Window:
    """A half-open timestep window ``[t_min, t_max)`` of a schedule with ``num_timesteps`` steps.

    This is where the window is enforced: training draws t only through :meth:`sample`, and the
    staged sampler asks :meth:`contains`. The blog's "sampling steps 500-750" are t in [250, 500).
    """

    t_min: int
    t_max: int
    num_timesteps: int = 1000

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

    @property
    def width(self) -> int:
        return self.t_max - self.t_min

    def contains(self, t) -> Tensor | bool:
        if isinstance(t, Tensor):
            return (t >= self.t_min) & (t < self.t_max)
        return self.t_min <= int(t) < self.t_max

    def sample(self, n: int, generator: torch.Generator | None = None, device=None) -> Tensor:
        """Draw n timesteps uniformly from the window (LDM draws from [0, T) with randint)."""
        return torch.randint(self.t_min, self.t_max, (n,), generator=generator, device=device)

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return f"[{self.t_min}, {self.t_max})"
