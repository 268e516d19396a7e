"""Watching a sampler run: what every artifact detector and corrector reads, step by step.

Everything here plugs into the sampler's per-step callback (:mod:`refiner.sampling`: after step ``i`` the callback
gets ``(i, t, x_t, model_output, x0_pred)``, with ``x_t`` already at the level of the next grid point, and may return
a replacement latent). :class:`StepRecorder` keeps what a detector needs; :func:`chain_callbacks` runs several
observers and correctors in order, each seeing the latent the previous one returned.

The quantity ASCED (Cao et al., CVPR 2025, arXiv 2503.16218) watches is the *weighted score*
``w(t) s_theta(x_t, t)`` with ``s_theta = -eps_theta / sqrt(1 - ab_t)`` and ``w(t) = (1 - ab_t) / sqrt(ab_t)``, i.e.
``-sqrt(1 - ab_t) / sqrt(ab_t) * eps_theta`` (the sign does not matter for a change's magnitude, so
:func:`weighted_score` returns ``+sqrt(1 - ab_t)/sqrt(ab_t) eps``). It equals ``x_t / sqrt(ab_t) - x0_theta``: the
part of the x0 prediction the network contributes, on one scale at every t.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

from refiner.sampling import Callback


def eps_from_output(model_output: Tensor, x0_pred: Tensor, t: int, alphas_cumprod: Tensor,
                    parameterization: str) -> Tensor:
    """The model's eps prediction from what the callback receives (no ``x_t`` before the step is needed):
    ``eps`` is the output itself; for ``v = sqrt(ab) eps - sqrt(1-ab) x0`` (Salimans & Ho 2022, eq. 11 in
    their notation) ``eps = (v + sqrt(1-ab) x0) / sqrt(ab)``. An ``x0`` model's eps needs ``x_t``, which the callback
    does not see: ``ValueError``."""
    if parameterization == "eps":
        return model_output
    if parameterization == "v":
        ab = float(alphas_cumprod[t])
        return (model_output + math.sqrt(1 - ab) * x0_pred) / math.sqrt(ab)
    raise ValueError(f"score dynamics need an eps or v model, got parameterization={parameterization!r} (an x0 "
                     "model's eps depends on x_t, which the step callback does not receive)")


def weighted_score(eps: Tensor, t: int, alphas_cumprod: Tensor) -> Tensor:
    """ASCED's weighted score on eps: ``sqrt(1 - ab_t) / sqrt(ab_t) * eps`` (see the module docstring)."""
    ab = float(alphas_cumprod[t])
    return math.sqrt((1 - ab) / ab) * eps


@dataclass
class StepRecorder:
    """A callback that records, for every step, ``t``, the weighted score (:func:`weighted_score`, if
    ``keep_scores``) and the x0 prediction (if ``keep_x0``), on CPU (or ``device``) in float32, for the steps whose ``t`` lies in ``(t_low, t_high]``.

    ``parameterization`` is the models' (every expert of a chain must share it for the dynamics to be comparable;
    :func:`eps_from_output` explains what is supported). It never changes the latent (returns None)."""

    alphas_cumprod: Tensor
    parameterization: str = "eps"
    t_low: int = -1
    t_high: int = 10**9
    keep_scores: bool = True
    keep_x0: bool = True
    device: str | torch.device = "cpu"
    timesteps: list[int] = field(default_factory=list)
    scores: list[Tensor] = field(default_factory=list)
    x0: list[Tensor] = field(default_factory=list)

    def __call__(self, i: int, t: int, x_t: Tensor, model_output: Tensor, x0_pred: Tensor) -> None:
        if not self.t_low < t <= self.t_high:
            return None
        self.timesteps.append(int(t))
        if self.keep_scores:
            eps = eps_from_output(model_output, x0_pred, t, self.alphas_cumprod, self.parameterization)
            self.scores.append(weighted_score(eps, t, self.alphas_cumprod).detach().float().to(self.device))
        if self.keep_x0:
            self.x0.append(x0_pred.detach().float().to(self.device))
        return None

    def clear(self) -> None:
        self.timesteps.clear()
        self.scores.clear()
        self.x0.clear()


def chain_callbacks(callbacks: Sequence[Callback | None]) -> Callback | None:
    """One callback that runs ``callbacks`` in order (None entries skipped); each sees the latent the previous one
    returned, and the last replacement is what the sampler continues with."""
    active = [c for c in callbacks if c is not None]
    if not active:
        return None
    if len(active) == 1:
        return active[0]

    def run_all(i: int, t: int, x_t: Tensor, model_output: Tensor, x0_pred: Tensor) -> Tensor | None:
        replaced = None
        for callback in active:
            out = callback(i, t, x_t, model_output, x0_pred)
            if out is not None:
                x_t = replaced = out
        return replaced

    return run_all

