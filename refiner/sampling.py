"""Samplers as pure functions (k-diffusion style): timestep grids, the DDIM/DDPM step, whole-grid samplers.

Refinement through window experts that switch by t is :mod:`refiner.experts` (built on these steps).

A *model* is any callable ``model(x_t, t) -> output`` where ``t`` is a ``(B,)`` long tensor of
diffusion timesteps (t=0 clean, t=T-1 pure noise) and ``output`` is eps, x0 or v, as the caller
declares with ``parameterization``. Conversions go through :func:`refiner.diffusion.to_x0_eps`.

Conventions shared by every sampler here (they match CompVis LDM's DDIM sampler and diffusers'
``DDIMScheduler(set_alpha_to_one=False)``):

* A grid is a strictly descending list of timesteps ``[t_0 > t_1 > ... > t_{S-1}]``; step ``i``
  evaluates the model at ``t_i`` and moves the latent to the noise level of ``t_{i+1}``.
* After the last grid point the target level is ``alphas_cumprod[0]`` (not 1): the returned latent
  is at the noise level of t=0, exactly like CompVis (``alphas_prev`` starts with ``ab[0]``).
* Img2img noising happens at exactly the first evaluated timestep (diffusers style), which avoids
  the off-by-one of CompVis ``stochastic_encode(t_enc)`` followed by ``ddim_timesteps[:t_enc]``.

Callback protocol (used by artifact detectors and correctors): after step ``i`` has been computed,
``callback(i, t, x_t, model_output, x0_pred)`` is called with

* ``i``: the step index into the grid, ``t``: the timestep the model was evaluated at (an int),
* ``x_t``: the *updated* latent, i.e. already at the noise level of the next grid point
  (``timesteps[i+1]``, or ``ab[0]`` after the last step) — like diffusers' ``callback_on_step_end``,
* ``model_output``: the raw model output at ``t`` (in the declared parameterization),
* ``x0_pred``: the model's x0 prediction at ``t`` (not clipped).

If the callback returns a Tensor (same shape as ``x_t``) it replaces the latent for the remaining
steps (e.g. re-noise a region, blend with a per-pixel strength map); if it returns None, nothing
changes. The callback is called exactly once per step, including the last one.
"""

from __future__ import annotations

import math
from typing import Callable, Literal, Sequence, Union

import torch
from torch import Tensor

from refiner.diffusion import PARAMETERIZATIONS, Parameterization, to_x0_eps

Model = Callable[[Tensor, Tensor], Tensor]
Callback = Callable[[int, int, Tensor, Tensor, Tensor], "Tensor | None"]
# None (torch's global RNG), one generator for the whole batch, or one per batch row (see randn_like)
Generators = Union[torch.Generator, Sequence[torch.Generator], None]
Spacing = Literal["uniform", "trailing"]
SPACINGS = ("uniform", "trailing")


# --------------------------------------------------------------------------------------------- grids
def timestep_grid(
    t_start: int, steps: int, t_end: int = 0, spacing: Spacing = "uniform", num_timesteps: int = 1000
) -> list[int]:
    """Strictly descending timesteps to evaluate inside ``[t_end, t_start]``; the first is ``t_start``.

    Let ``L = t_start - t_end + 1`` be the number of available timesteps.

    * ``"uniform"`` (CompVis DDIM 'uniform', top-anchored): constant integer stride
      ``c = (t_start - t_end) // (steps - 1)`` (the largest stride that fits ``steps`` points in the
      range), ``t_i = t_start - i*c`` for ``i = 0..steps-1``. The lowest point is ``>= t_end`` and at most
      ``c - 1`` above it. The CompVis full grid ``range(0, T, T//S) + 1`` (= diffusers "leading" with
      ``steps_offset=1``), whenever it has S points, is exactly
      ``timestep_grid((S-1)*(T//S) + 1, S, t_end=1, spacing="uniform")``.
    * ``"trailing"`` (diffusers 'trailing', generalised): ``t_i = t_end + round(L - i*L/steps) - 1``
      with round-half-to-even like ``np.round``. For ``t_start = T-1, t_end = 0`` this is diffusers'
      ``round(arange(T, 0, -T/steps)) - 1``. Strides differ by at most one; the lowest point is
      ``t_end + round(L/steps) - 1``.

    ``steps = 1`` gives ``[t_start]``. Requires ``0 <= t_end < t_start <= T-1`` and
    ``1 <= steps <= L``.
    """
    for name, value in (("t_start", t_start), ("steps", steps), ("t_end", t_end), ("num_timesteps", num_timesteps)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"timestep_grid: {name} must be an int, got {value!r}")
    if not 0 <= t_end < t_start <= num_timesteps - 1:
        raise ValueError(
            f"timestep_grid: need 0 <= t_end < t_start <= T-1={num_timesteps - 1}, got t_end={t_end}, "
            f"t_start={t_start} (t=0 is clean, t=T-1 is pure noise)"
        )
    available = t_start - t_end + 1
    if not 1 <= steps <= available:
        raise ValueError(
            f"timestep_grid: steps must be in [1, {available}] for the range [t_end={t_end}, t_start={t_start}], "
            f"got {steps}"
        )
    if spacing == "uniform":
        stride = (t_start - t_end) // (steps - 1) if steps > 1 else 0
        grid = [t_start - i * stride for i in range(steps)]
    elif spacing == "trailing":
        ratio = available / steps
        grid = [t_end + int(round(available - i * ratio)) - 1 for i in range(steps)]
    else:
        raise ValueError(f"timestep_grid: unknown spacing {spacing!r}; expected one of {SPACINGS}")
    if grid[0] != t_start or grid[-1] < t_end or any(a <= b for a, b in zip(grid, grid[1:])):
        raise AssertionError(f"timestep_grid produced an invalid grid {grid}")  # internal invariant
    return grid


def _check_grid(timesteps: Sequence[int], alphas_cumprod: Tensor) -> list[int]:
    timesteps = [int(t) for t in timesteps]
    T = alphas_cumprod.shape[0]
    if not timesteps:
        raise ValueError("timesteps is empty; build it with timestep_grid()")
    if any(not 0 <= t < T for t in timesteps):
        raise ValueError(f"timesteps must lie in [0, {T - 1}] (len(alphas_cumprod)={T}), got {timesteps}")
    if any(a <= b for a, b in zip(timesteps, timesteps[1:])):
        raise ValueError(f"timesteps must be unique and strictly descending, got {timesteps}")
    return timesteps


def _alpha_bar(alphas_cumprod: Tensor, t: int) -> float:
    """ab_t as a python float (float64); t < 0 means "after the last step" and gives ab_0 (CompVis)."""
    return float(alphas_cumprod[max(t, 0)])


def randn_like(x: Tensor, generator: Generators) -> Tensor:
    """Standard normal noise of ``x``'s shape, device and dtype: every random draw of the samplers.

    ``generator`` is None (torch's global RNG), one ``torch.Generator`` (one draw of the whole batch on ``x``'s
    device, CompVis's and diffusers' convention: row ``i`` then depends on the rows before it, i.e. on batching),
    or one generator per batch row: row ``i`` is ``randn(x.shape[1:], generator=generator[i])``, drawn on that
    generator's device and moved to ``x``'s. Then row ``i``'s noise depends only on its own generator and on how
    many draws were made from it, never on the other rows; a batch of one row with ``[g]`` draws exactly what ``g``
    alone draws on the same device.
    """
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    generators = list(generator)
    if len(generators) != x.shape[0] or not all(isinstance(g, torch.Generator) for g in generators):
        raise ValueError(f"generator: expected one torch.Generator per batch row ({x.shape[0]}), got "
                         f"{len(generators)} item(s) of types {sorted({type(g).__name__ for g in generators})}")
    return torch.stack([torch.randn(x.shape[1:], generator=g, device=g.device, dtype=x.dtype)
                        for g in generators]).to(x.device)


def _t_batch(t: int, x: Tensor) -> Tensor:
    return torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)


def _check_parameterization(parameterization: str) -> None:
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(f"unknown parameterization {parameterization!r}; expected one of {PARAMETERIZATIONS}")


# --------------------------------------------------------------------------------------------- eta
def ddim_sigma(eta: float, a: float, a_prev: float) -> float:
    """``sigma = eta * sqrt((1-a_prev)/(1-a) * (1 - a/a_prev))`` (Song et al. 2021, eq. 16)."""
    return eta * math.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev)) if eta else 0.0


def max_ddim_eta(a: float, a_prev: float) -> float:
    """The largest eta for one DDIM step: the update's ``sqrt(1 - a_prev - sigma^2)`` needs
    ``sigma^2 <= 1 - a_prev``, i.e. ``eta^2 (1 - a/a_prev) / (1 - a) <= 1``. Always >= 1 (eta = 1 is the DDPM
    posterior), so eta in [0, 1] is valid on every grid; eta > 1 only where this bound allows it."""
    gap = 1 - a / a_prev
    return math.sqrt((1 - a) / gap) if gap > 0 else math.inf  # a == a_prev (t=0 -> ab[0]): sigma is 0


def check_eta(eta: float, timesteps: Sequence[int], alphas_cumprod: Tensor) -> float:
    """Refuse an eta that is negative, not finite, or (above 1) too large for some step of ``timesteps``
    (see :func:`max_ddim_eta`); the error names the step and the largest eta it allows."""
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not math.isfinite(eta) or eta < 0:
        raise ValueError(f"eta must be a finite number >= 0 (0 = DDIM, 1 = DDPM posterior), got {eta!r}")
    if eta > 1:
        grid = [int(t) for t in timesteps]
        for t, t_prev in zip(grid, grid[1:] + [-1]):
            _check_eta_fits(eta, t, t_prev, _alpha_bar(alphas_cumprod, t), _alpha_bar(alphas_cumprod, t_prev))
    return float(eta)


def _check_eta_fits(eta: float, t: int, t_prev: int, a: float, a_prev: float) -> None:
    bound = max_ddim_eta(a, a_prev)
    if eta > bound:
        raise ValueError(f"eta={eta} is too large for the DDIM step t={t} -> {max(t_prev, 0)}: sigma^2 would exceed "
                         f"1 - alpha_bar_prev (that step allows eta <= {bound:.4f}); use eta in [0, 1]")


# --------------------------------------------------------------------------------------------- steps
def _step_terms(step: str, x_t: Tensor, t: int, t_prev: int, model_output: Tensor, alphas_cumprod: Tensor,
                parameterization: str) -> tuple[float, float, Tensor, Tensor]:
    """What every update from ``t`` to ``t_prev`` needs: ``(ab[t], ab[t_prev] or ab[0], x0_pred, eps_pred)``."""
    _check_parameterization(parameterization)
    T = alphas_cumprod.shape[0]
    if not 0 <= int(t) < T:
        raise ValueError(f"{step}: t={t} outside [0, {T - 1}] (len(alphas_cumprod)={T})")
    if t_prev >= t:
        raise ValueError(f"{step} goes down in t: need t_prev < t, got t={t}, t_prev={t_prev}")
    a, a_prev = _alpha_bar(alphas_cumprod, t), _alpha_bar(alphas_cumprod, t_prev)
    x0, eps = to_x0_eps(model_output, x_t, _t_batch(t, x_t), alphas_cumprod, parameterization)
    return a, a_prev, x0, eps


def ddim_step(
    x_t: Tensor,
    t: int,
    t_prev: int,
    model_output: Tensor,
    alphas_cumprod: Tensor,
    parameterization: Parameterization = "eps",
    eta: float = 0.0,
    noise: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One DDIM update from timestep ``t`` to ``t_prev`` (Song et al. 2021, eq. 12 and 16).

    ``sigma = eta * sqrt((1-a_prev)/(1-a) * (1 - a/a_prev))``,
    ``x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma * noise``, x0 not clipped.
    ``a = ab[t]``; ``a_prev = ab[t_prev]``, or ``ab[0]`` when ``t_prev < 0`` (the last step, like CompVis
    and diffusers ``set_alpha_to_one=False``). ``noise`` is required when ``sigma > 0``. ``eta`` must be >= 0
    and at most :func:`max_ddim_eta` for this step (any eta in [0, 1] is valid).
    Returns ``(x_prev, x0_pred)``.
    """
    a, a_prev, x0, eps = _step_terms("ddim_step", x_t, t, t_prev, model_output, alphas_cumprod, parameterization)
    check_eta(eta, [], alphas_cumprod)
    if eta > 1:
        _check_eta_fits(eta, t, t_prev, a, a_prev)
    sigma = ddim_sigma(eta, a, a_prev)
    x_prev = math.sqrt(a_prev) * x0 + math.sqrt(max(1 - a_prev - sigma**2, 0.0)) * eps
    if sigma > 0:
        if noise is None:
            raise ValueError(f"ddim_step with eta={eta} needs a noise tensor (sigma={sigma:.3g} > 0)")
        x_prev = x_prev + sigma * noise
    return x_prev, x0


def ddpm_posterior_step(
    x_t: Tensor,
    t: int,
    t_prev: int,
    model_output: Tensor,
    alphas_cumprod: Tensor,
    parameterization: Parameterization = "eps",
    noise: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Ancestral step: sample q(x_prev | x_t, x0_pred) between two grid points (DDPM eqs. 6-7).

    With ``alpha = a/a_prev`` and ``beta = 1 - alpha`` (the effective beta between the two points):
    mean ``= sqrt(a_prev) beta/(1-a) x0 + sqrt(alpha) (1-a_prev)/(1-a) x_t``, variance
    ``beta_tilde = (1-a_prev)/(1-a) beta``. On the full grid this is Ho et al.'s sampler; on any grid
    it equals DDIM with eta=1. ``t_prev < 0`` targets ``ab[0]`` like :func:`ddim_step`.
    Returns ``(x_prev, x0_pred)``.
    """
    a, a_prev, x0, _ = _step_terms("ddpm_posterior_step", x_t, t, t_prev, model_output, alphas_cumprod,
                                   parameterization)
    alpha = a / a_prev
    beta = 1 - alpha
    mean = (math.sqrt(a_prev) * beta / (1 - a)) * x0 + (math.sqrt(alpha) * (1 - a_prev) / (1 - a)) * x_t
    var = (1 - a_prev) / (1 - a) * beta
    if var > 0:
        if noise is None:
            raise ValueError("ddpm_posterior_step needs a noise tensor (posterior variance > 0)")
        mean = mean + math.sqrt(var) * noise
    return mean, x0


# ------------------------------------------------------------------------------------------ samplers
def _run_callback(callback, i, t, x, out, x0) -> Tensor:
    if callback is None:
        return x
    replaced = callback(i, t, x, out, x0)
    if replaced is None:
        return x
    if not isinstance(replaced, Tensor) or replaced.shape != x.shape:
        raise ValueError(
            f"callback at step {i} (t={t}) must return None or a Tensor of shape {tuple(x.shape)}, "
            f"got {type(replaced).__name__} {getattr(replaced, 'shape', '')}"
        )
    return replaced


@torch.no_grad()
def sample_ddim(
    model: Model,
    x: Tensor,
    timesteps: Sequence[int],
    alphas_cumprod: Tensor,
    parameterization: Parameterization = "eps",
    eta: float = 0.0,
    generator: Generators = None,
    callback: Callback | None = None,
) -> Tensor:
    """DDIM from ``x`` (at the noise level of ``timesteps[0]``) down to the level of ``ab[0]``.

    ``timesteps`` is a strictly descending grid (see :func:`timestep_grid`). With ``eta > 0`` one noise
    tensor per step is drawn with ``generator`` (:func:`randn_like`: one generator, or one per batch row so
    that each row's result does not depend on the others). See the module docstring for the callback protocol.
    """
    timesteps = _check_grid(timesteps, alphas_cumprod)
    check_eta(eta, timesteps, alphas_cumprod)
    for i, t in enumerate(timesteps):
        t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        out = model(x, _t_batch(t, x))
        noise = randn_like(x, generator) if eta > 0 else None
        x, x0 = ddim_step(x, t, t_prev, out, alphas_cumprod, parameterization, eta, noise)
        x = _run_callback(callback, i, t, x, out, x0)
    return x


@torch.no_grad()
def sample_ddpm(
    model: Model,
    x: Tensor,
    timesteps: Sequence[int],
    alphas_cumprod: Tensor,
    parameterization: Parameterization = "eps",
    generator: Generators = None,
    callback: Callback | None = None,
) -> Tensor:
    """Ancestral DDPM sampling over ``timesteps`` with :func:`ddpm_posterior_step` (also adds noise at
    the last step, whose target is ``ab[0]``). Draws noise exactly like ``sample_ddim(eta=1)``, so with
    equal generators the two agree up to float rounding."""
    timesteps = _check_grid(timesteps, alphas_cumprod)
    for i, t in enumerate(timesteps):
        t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        out = model(x, _t_batch(t, x))
        noise = randn_like(x, generator)
        x, x0 = ddpm_posterior_step(x, t, t_prev, out, alphas_cumprod, parameterization, noise)
        x = _run_callback(callback, i, t, x, out, x0)
    return x


T_PER_STEP = 20  # one DDIM step per 20 timesteps of t_start: t_start 499 -> 25 steps


def steps_for(t_start: int, t_per_step: int = T_PER_STEP) -> int:
    """The equal-compute rule of the benchmark, whole-chain validation and the presets: DDIM grid points in [0, t_start]: one per ``t_per_step`` timesteps, at least 1 (so t_start 499 gets
    25 steps at the default 20, and the compute of two methods at equal t_start is equal)."""
    return max(1, min(t_start + 1, round((t_start + 1) / t_per_step)))
