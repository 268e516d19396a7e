"""Samplers as pure functions (k-diffusion style) and staged refinement that switches experts by t.

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
import warnings
from dataclasses import dataclass, field
from typing import Callable, Literal, Sequence, Union

import torch
from torch import Tensor

from refiner.diffusion import PARAMETERIZATIONS, Parameterization, Window, q_sample, to_x0_eps

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


# ---------------------------------------------------------------------------------- staged refinement
@dataclass
class Stage:
    """One expert: ``model`` is trusted for timesteps in ``window`` (half-open ``[t_min, t_max)``)."""

    model: Model
    window: Window
    parameterization: Parameterization = "eps"
    name: str = ""

    def label(self, index: int) -> str:
        return f"stage {index}{f' {self.name!r}' if self.name else ''} {self.window}"


@dataclass
class RefineResult:
    """Output of :func:`refine` with ``return_stage_outputs=True``.

    * ``latent``: the final latent (noise level ``ab[0]``), same as ``refine``'s plain return value.
    * ``stage_latents[k]``: the latent right after the last step of the k-th stage *that ran*, in run
      order (noisy for all but the last, at the level of the next grid point).
    * ``stage_x0[k]``: that stage's x0 prediction at its last step (the clean-looking picture to show
      in an "input | after stage 1 | after stage 2" grid).
    * ``timesteps``: the grid; ``stage_of_step[i]``: index into ``stages`` used at ``timesteps[i]``.
    """

    latent: Tensor
    stage_latents: list[Tensor]
    timesteps: list[int]
    stage_of_step: list[int]
    stage_x0: list[Tensor] = field(default_factory=list)


def check_stages(stages: Sequence[Stage], alphas_cumprod: Tensor) -> None:
    """Stages must be :class:`Stage` objects with a known parameterization, windows on the schedule of
    ``alphas_cumprod`` (same T), and windows that do not overlap. Raises ``ValueError`` / ``TypeError``."""
    if not stages:
        raise ValueError("refine needs at least one Stage")
    T = alphas_cumprod.shape[0]
    for k, s in enumerate(stages):
        if not isinstance(s, Stage):
            raise TypeError(f"stages[{k}] must be a refiner.sampling.Stage, got {type(s).__name__}")
        if not isinstance(s.window, Window):
            raise TypeError(f"{s.label(k)}: window must be a refiner.diffusion.Window, got {type(s.window).__name__}")
        _check_parameterization(s.parameterization)
        if s.window.num_timesteps != T:
            raise ValueError(
                f"{s.label(k)} has num_timesteps={s.window.num_timesteps} but alphas_cumprod has {T} entries; "
                "all stages must share one schedule"
            )
    order = sorted(range(len(stages)), key=lambda k: stages[k].window.t_min)
    for lo, hi in zip(order, order[1:]):
        if stages[hi].window.t_min < stages[lo].window.t_max:
            raise ValueError(
                f"overlapping stage windows: {stages[lo].label(lo)} and {stages[hi].label(hi)}; "
                "which expert handles the shared timesteps would be ambiguous"
            )


def _assign_stages(
    stages: Sequence[Stage], grid: list[int], allow_outside_window: bool
) -> list[int]:
    """Index of the stage whose window contains each grid t (nearest window if allowed)."""
    windows = [s.window for s in stages]
    assignment: list[int | None] = [
        next((k for k, w in enumerate(windows) if w.contains(t)), None) for t in grid
    ]
    uncovered = [t for t, k in zip(grid, assignment) if k is None]
    if not uncovered:
        return assignment  # type: ignore[return-value]

    lo = min(w.t_min for w in windows)
    hi = max(w.t_max for w in windows)
    ordered = sorted(windows, key=lambda w: w.t_min)
    problems = []
    above = [t for t in uncovered if t >= hi]
    below = [t for t in uncovered if t < lo]
    if above:
        problems.append(f"t={above} above the top window (t_start must be <= t_max-1 = {hi - 1})")
    if below:
        problems.append(f"t={below} below the bottom window (it starts at t_min={lo})")
    for a, b in zip(ordered, ordered[1:]):
        in_gap = [t for t in uncovered if a.t_max <= t < b.t_min]
        if in_gap:
            problems.append(f"t={in_gap} in the gap [{a.t_max}, {b.t_min}) between windows {a} and {b}")
    message = (
        f"grid timesteps not covered by any stage window: {'; '.join(problems)}. "
        f"Windows: {', '.join(s.label(k) for k, s in enumerate(stages))}; grid: {grid}"
    )
    if not allow_outside_window:
        raise ValueError(message + ". Pass allow_outside_window=True to use the nearest stage instead.")
    warnings.warn(message + ". Using the nearest stage for those steps (allow_outside_window=True).", stacklevel=4)

    def distance(w: Window, t: int) -> int:
        return 0 if w.contains(t) else (w.t_min - t if t < w.t_min else t - (w.t_max - 1))

    return [
        k if k is not None else min(range(len(windows)), key=lambda j: (distance(windows[j], t), windows[j].t_min))
        for t, k in zip(grid, assignment)
    ]


@dataclass
class StepPlan:
    """Which stage runs which grid step: ``timesteps`` is the grid, ``stage_of_step[i]`` the index into the
    stages used at ``timesteps[i]``."""

    timesteps: list[int]
    stage_of_step: list[int]

    @property
    def segments(self) -> list[int]:
        """Stage indices in run order (each stage once per contiguous run of steps)."""
        return [k for i, k in enumerate(self.stage_of_step) if i == 0 or self.stage_of_step[i - 1] != k]


def plan(
    stages: Sequence[Stage],
    t_start: int,
    steps: int,
    alphas_cumprod: Tensor,
    *,
    t_end: int = 0,
    spacing: Spacing = "uniform",
    eta: float = 0.0,
    allow_outside_window: bool = False,
) -> StepPlan:
    """Validate a chain of stages against one grid and say which stage runs each step, without calling any model.

    The checks :func:`refine` applies before any compute, and the only place they live: stage windows must not
    overlap and must share ``T = len(alphas_cumprod)``; the grid ``timestep_grid(t_start, steps, t_end, spacing, T)``
    must exist; ``eta`` must fit every step (:func:`check_eta`); every grid t must lie in a window (errors name
    uncovered t, gaps and windows; ``allow_outside_window=True`` warns and uses the nearest stage instead).
    Raises ``ValueError`` / ``TypeError``.
    """
    check_stages(stages, alphas_cumprod)
    grid = timestep_grid(t_start, steps, t_end, spacing, alphas_cumprod.shape[0])
    check_eta(eta, grid, alphas_cumprod)
    return StepPlan(grid, _assign_stages(stages, grid, allow_outside_window))


@torch.no_grad()
def refine(
    stages: Sequence[Stage],
    z: Tensor,
    t_start: int,
    steps: int,
    alphas_cumprod: Tensor,
    eta: float = 0.0,
    generator: Generators = None,
    spacing: Spacing = "uniform",
    callback: Callback | None = None,
    allow_outside_window: bool = False,
    return_stage_outputs: bool = False,
    noise: Tensor | None = None,
    t_end: int = 0,
) -> Tensor | RefineResult:
    """Img2img refinement of clean latents ``z`` (any shape ``(B, ...)``) with window experts.

    1. :func:`plan`: build one grid ``timestep_grid(t_start, steps, t_end, spacing, T)`` and assign each t to
       the stage whose window contains it, validating before any compute (overlap, shared T, coverage, eta).
       ``t_end > 0`` stops the grid early (e.g. at a window's lower edge); the last step still targets ``ab[0]``.
    2. Noise ``z`` to exactly ``t_start`` with ``q_sample`` using ``noise`` if given, else
       ``randn`` from ``generator``.
    3. Run DDIM(eta) over the grid, switching experts at window boundaries with no re-noising at the
       hand-off (as diffusers' SDXL base->refiner). ``eta=1`` is the DDPM posterior sampler; ``eta`` must be
       >= 0, and above 1 only where every step allows it (:func:`check_eta`), checked before any compute.

    Noise draws from ``generator`` happen in this order: the q_sample noise (if ``noise`` is None),
    then one tensor per step when ``eta > 0``. ``generator`` may be one generator per row of ``z``
    (:func:`randn_like`): then every draw of row ``i`` comes from ``generator[i]`` in that order, so with any eta
    a row's result is the same whether it is refined alone or in a batch (up to the model's own batch
    arithmetic). Returns the final latent, or a :class:`RefineResult`
    when ``return_stage_outputs``. See the module docstring for ``callback``.
    """
    step_plan = plan(stages, t_start, steps, alphas_cumprod, t_end=t_end, spacing=spacing, eta=eta,
                     allow_outside_window=allow_outside_window)
    return refine_with_plan(stages, z, step_plan, alphas_cumprod, eta=eta, generator=generator, callback=callback,
                            return_stage_outputs=return_stage_outputs, noise=noise)


@torch.no_grad()
def refine_with_plan(
    stages: Sequence[Stage],
    z: Tensor,
    step_plan: StepPlan,
    alphas_cumprod: Tensor,
    eta: float = 0.0,
    generator: Generators = None,
    callback: Callback | None = None,
    return_stage_outputs: bool = False,
    noise: Tensor | None = None,
) -> Tensor | RefineResult:
    """Steps 2-3 of :func:`refine` over a ``step_plan`` that :func:`plan` made for these ``stages``, ``eta`` and
    ``alphas_cumprod`` (so a caller that has validated once, like :meth:`refiner.inference.chain.Chain.refine`,
    does not plan twice). The grid starts at ``t_start = step_plan.timesteps[0]``."""
    grid, stage_of_step = step_plan.timesteps, step_plan.stage_of_step
    t_start = grid[0]
    if noise is None:
        noise = randn_like(z, generator)
    elif noise.shape != z.shape:
        raise ValueError(f"noise has shape {tuple(noise.shape)} but z has shape {tuple(z.shape)}")

    x = q_sample(z, _t_batch(t_start, z), alphas_cumprod, noise.to(device=z.device, dtype=z.dtype))
    stage_latents: list[Tensor] = []
    stage_x0: list[Tensor] = []
    for i, t in enumerate(grid):
        stage = stages[stage_of_step[i]]
        t_prev = grid[i + 1] if i + 1 < len(grid) else -1
        out = stage.model(x, _t_batch(t, x))
        step_noise = randn_like(x, generator) if eta > 0 else None
        x, x0 = ddim_step(x, t, t_prev, out, alphas_cumprod, stage.parameterization, eta, step_noise)
        x = _run_callback(callback, i, t, x, out, x0)
        if return_stage_outputs and (i + 1 == len(grid) or stage_of_step[i + 1] != stage_of_step[i]):
            stage_latents.append(x.clone())
            stage_x0.append(x0.clone())
    if not return_stage_outputs:
        return x
    return RefineResult(latent=x, stage_latents=stage_latents, timesteps=grid, stage_of_step=stage_of_step,
                        stage_x0=stage_x0)
