"""Analytic denoiser for Gaussian data, the independent reference for sampler tests.

Data: x0 ~ N(mu, s^2 I) per dimension. Forward process x_t = sqrt(ab) x0 + sqrt(1-ab) eps gives
x_t ~ N(sqrt(ab) mu, (ab s^2 + 1 - ab) I), and the exact posterior means are
    E[eps | x_t] = sqrt(1-ab) (x_t - sqrt(ab) mu) / (ab s^2 + 1 - ab)
    E[x0  | x_t] = mu + sqrt(ab) s^2 (x_t - sqrt(ab) mu) / (ab s^2 + 1 - ab)
    E[v   | x_t] = sqrt(ab) E[eps|x_t] - sqrt(1-ab) E[x0|x_t].
The probability-flow ODE (DDIM eta=0 in the limit of many steps) maps the standardised value
(x - mean_t)/std_t unchanged from one level to another, which gives a closed-form endpoint.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class GaussianDenoiser:
    """``model(x_t, t)`` returning the exact E[eps|x_t], E[x0|x_t] or E[v|x_t] for N(mu, s^2) data."""

    def __init__(self, mu: float, s: float, alphas_cumprod: Tensor, parameterization: str = "eps"):
        if parameterization not in ("eps", "x0", "v"):
            raise ValueError(f"unknown parameterization {parameterization!r}")
        self.mu, self.s, self.ab, self.parameterization = mu, s, alphas_cumprod.double(), parameterization
        self.calls: list[list[int]] = []

    def _ab(self, t: Tensor, like: Tensor) -> Tensor:
        ab = self.ab[t.long().cpu()].to(like.dtype)
        return ab.reshape(-1, *([1] * (like.ndim - 1)))

    def marginal_var(self, ab: Tensor | float) -> Tensor | float:
        return ab * self.s**2 + 1 - ab

    def __call__(self, x_t: Tensor, t: Tensor) -> Tensor:
        assert t.dtype == torch.long and t.shape == (x_t.shape[0],), (t.dtype, t.shape)
        self.calls.append(t.tolist())
        ab = self._ab(t, x_t)
        centred = x_t - ab.sqrt() * self.mu
        var = self.marginal_var(ab)
        eps = (1 - ab).sqrt() * centred / var
        x0 = self.mu + ab.sqrt() * self.s**2 * centred / var
        if self.parameterization == "eps":
            return eps
        if self.parameterization == "x0":
            return x0
        return ab.sqrt() * eps - (1 - ab).sqrt() * x0

    def sample_marginal(self, t: int, shape, generator: torch.Generator) -> Tensor:
        """Draw x_t from q(x_t) = N(sqrt(ab_t) mu, ab_t s^2 + 1 - ab_t)."""
        ab = float(self.ab[t])
        z = torch.randn(shape, generator=generator, dtype=torch.float64)
        return math.sqrt(ab) * self.mu + math.sqrt(self.marginal_var(ab)) * z

    def flow_map(self, x: Tensor, ab_from: float, ab_to: float) -> Tensor:
        """Exact probability-flow ODE transport of x from level ab_from to level ab_to."""
        z = (x - math.sqrt(ab_from) * self.mu) / math.sqrt(self.marginal_var(ab_from))
        return math.sqrt(ab_to) * self.mu + math.sqrt(self.marginal_var(ab_to)) * z
