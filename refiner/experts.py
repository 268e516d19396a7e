"""Window experts and staged refinement: which expert runs which step of one DDIM grid, and ``refine()``.

An :class:`Expert` is a model trusted on a timestep window ``[t_min, t_max)`` (:class:`refiner.diffusion.Window`).
:func:`plan` validates a set of experts against one grid (windows must not overlap and must share one schedule; every
grid t must fall in a window) and says which expert runs each step, without calling any model; :func:`refine` noises
clean latents to exactly ``t_start`` and runs DDIM over the grid, switching experts at the window boundaries with no
re-noising at the hand-off (as diffusers' SDXL base -> refiner). This is where experts switch; the step math is
:mod:`refiner.sampling`, and :class:`refiner.inference.chain.Chain` holds loaded experts around these functions.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

from refiner.diffusion import Parameterization, Window, q_sample
from refiner.sampling import (
    Callback,
    Generators,
    Model,
    Spacing,
    _check_parameterization,
    _run_callback,
    _t_batch,
    check_eta,
    ddim_step,
    randn_like,
    timestep_grid,
)


@dataclass
class Expert:
    """One expert: ``model`` is trusted for timesteps in ``window`` (half-open ``[t_min, t_max)``)."""

    model: Model
    window: Window
    parameterization: Parameterization = "eps"
    name: str = ""

    def label(self, index: int) -> str:
        return f"expert {index}{f' {self.name!r}' if self.name else ''} {self.window}"


@dataclass
class RefineResult:
    """Output of :func:`refine` with ``return_expert_outputs=True``.

    * ``latent``: the final latent (noise level ``ab[0]``), same as ``refine``'s plain return value.
    * ``expert_latents[k]``: the latent right after the last step of the k-th expert *that ran*, in run
      order (noisy for all but the last, at the level of the next grid point).
    * ``expert_x0[k]``: that expert's x0 prediction at its last step (the clean-looking picture to show
      in an "input | after expert 1 | after expert 2" grid).
    * ``timesteps``: the grid; ``expert_of_step[i]``: index into ``experts`` used at ``timesteps[i]``.
    """

    latent: Tensor
    expert_latents: list[Tensor]
    timesteps: list[int]
    expert_of_step: list[int]
    expert_x0: list[Tensor] = field(default_factory=list)


def check_experts(experts: Sequence[Expert], alphas_cumprod: Tensor) -> None:
    """Experts must be :class:`Expert` objects with a known parameterization, windows on the schedule of
    ``alphas_cumprod`` (same T), and windows that do not overlap. Raises ``ValueError`` / ``TypeError``."""
    if not experts:
        raise ValueError("refine needs at least one Expert")
    T = alphas_cumprod.shape[0]
    for k, s in enumerate(experts):
        if not isinstance(s, Expert):
            raise TypeError(f"experts[{k}] must be a refiner.experts.Expert, got {type(s).__name__}")
        if not isinstance(s.window, Window):
            raise TypeError(f"{s.label(k)}: window must be a refiner.diffusion.Window, got {type(s.window).__name__}")
        _check_parameterization(s.parameterization)
        if s.window.num_timesteps != T:
            raise ValueError(
                f"{s.label(k)} has num_timesteps={s.window.num_timesteps} but alphas_cumprod has {T} entries; "
                "all experts must share one schedule"
            )
    order = sorted(range(len(experts)), key=lambda k: experts[k].window.t_min)
    for lo, hi in zip(order, order[1:]):
        if experts[hi].window.t_min < experts[lo].window.t_max:
            raise ValueError(
                f"overlapping expert windows: {experts[lo].label(lo)} and {experts[hi].label(hi)}; "
                "which expert handles the shared timesteps would be ambiguous"
            )


def _assign_experts(
    experts: Sequence[Expert], grid: list[int], allow_outside_window: bool
) -> list[int]:
    """Index of the expert whose window contains each grid t (nearest window if allowed)."""
    windows = [s.window for s in experts]
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
        f"grid timesteps not covered by any expert window: {'; '.join(problems)}. "
        f"Windows: {', '.join(s.label(k) for k, s in enumerate(experts))}; grid: {grid}"
    )
    if not allow_outside_window:
        raise ValueError(message + ". Pass allow_outside_window=True to use the nearest expert instead.")
    warnings.warn(message + ". Using the nearest expert for those steps (allow_outside_window=True).", stacklevel=4)

    def distance(w: Window, t: int) -> int:
        return 0 if w.contains(t) else (w.t_min - t if t < w.t_min else t - (w.t_max - 1))

    return [
        k if k is not None else min(range(len(windows)), key=lambda j: (distance(windows[j], t), windows[j].t_min))
        for t, k in zip(grid, assignment)
    ]


@dataclass
class StepPlan:
    """Which expert runs which grid step: ``timesteps`` is the grid, ``expert_of_step[i]`` the index into the
    experts used at ``timesteps[i]``."""

    timesteps: list[int]
    expert_of_step: list[int]

    @property
    def segments(self) -> list[int]:
        """Expert indices in run order (each expert once per contiguous run of steps)."""
        return [k for i, k in enumerate(self.expert_of_step) if i == 0 or self.expert_of_step[i - 1] != k]


def plan(
    experts: Sequence[Expert],
    t_start: int,
    steps: int,
    alphas_cumprod: Tensor,
    *,
    t_end: int = 0,
    spacing: Spacing = "uniform",
    eta: float = 0.0,
    allow_outside_window: bool = False,
) -> StepPlan:
    """Validate a chain of experts against one grid and say which expert runs each step, without calling any model.

    The checks :func:`refine` applies before any compute, and the only place they live: expert windows must not
    overlap and must share ``T = len(alphas_cumprod)``; the grid ``timestep_grid(t_start, steps, t_end, spacing, T)``
    must exist; ``eta`` must fit every step (:func:`check_eta`); every grid t must lie in a window (errors name
    uncovered t, gaps and windows; ``allow_outside_window=True`` warns and uses the nearest expert instead).
    Raises ``ValueError`` / ``TypeError``.
    """
    check_experts(experts, alphas_cumprod)
    grid = timestep_grid(t_start, steps, t_end, spacing, alphas_cumprod.shape[0])
    check_eta(eta, grid, alphas_cumprod)
    return StepPlan(grid, _assign_experts(experts, grid, allow_outside_window))


@torch.no_grad()
def refine(
    experts: Sequence[Expert],
    z: Tensor,
    t_start: int,
    steps: int,
    alphas_cumprod: Tensor,
    eta: float = 0.0,
    generator: Generators = None,
    spacing: Spacing = "uniform",
    callback: Callback | None = None,
    allow_outside_window: bool = False,
    return_expert_outputs: bool = False,
    noise: Tensor | None = None,
    t_end: int = 0,
) -> Tensor | RefineResult:
    """Img2img refinement of clean latents ``z`` (any shape ``(B, ...)``) with window experts.

    1. :func:`plan`: build one grid ``timestep_grid(t_start, steps, t_end, spacing, T)`` and assign each t to
       the expert whose window contains it, validating before any compute (overlap, shared T, coverage, eta).
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
    when ``return_expert_outputs``. See the module docstring for ``callback``.
    """
    step_plan = plan(experts, t_start, steps, alphas_cumprod, t_end=t_end, spacing=spacing, eta=eta,
                     allow_outside_window=allow_outside_window)
    return refine_with_plan(experts, z, step_plan, alphas_cumprod, eta=eta, generator=generator, callback=callback,
                            return_expert_outputs=return_expert_outputs, noise=noise)


@torch.no_grad()
def refine_with_plan(
    experts: Sequence[Expert],
    z: Tensor,
    step_plan: StepPlan,
    alphas_cumprod: Tensor,
    eta: float = 0.0,
    generator: Generators = None,
    callback: Callback | None = None,
    return_expert_outputs: bool = False,
    noise: Tensor | None = None,
) -> Tensor | RefineResult:
    """Steps 2-3 of :func:`refine` over a ``step_plan`` that :func:`plan` made for these ``experts``, ``eta`` and
    ``alphas_cumprod`` (so a caller that has validated once, like :meth:`refiner.inference.chain.Chain.refine`,
    does not plan twice). The grid starts at ``t_start = step_plan.timesteps[0]``."""
    grid, expert_of_step = step_plan.timesteps, step_plan.expert_of_step
    t_start = grid[0]
    if noise is None:
        noise = randn_like(z, generator)
    elif noise.shape != z.shape:
        raise ValueError(f"noise has shape {tuple(noise.shape)} but z has shape {tuple(z.shape)}")

    x = q_sample(z, _t_batch(t_start, z), alphas_cumprod, noise.to(device=z.device, dtype=z.dtype))
    expert_latents: list[Tensor] = []
    expert_x0: list[Tensor] = []
    for i, t in enumerate(grid):
        expert = experts[expert_of_step[i]]
        t_prev = grid[i + 1] if i + 1 < len(grid) else -1
        out = expert.model(x, _t_batch(t, x))
        step_noise = randn_like(x, generator) if eta > 0 else None
        x, x0 = ddim_step(x, t, t_prev, out, alphas_cumprod, expert.parameterization, eta, step_noise)
        x = _run_callback(callback, i, t, x, out, x0)
        if return_expert_outputs and (i + 1 == len(grid) or expert_of_step[i + 1] != expert_of_step[i]):
            expert_latents.append(x.clone())
            expert_x0.append(x0.clone())
    if not return_expert_outputs:
        return x
    return RefineResult(latent=x, expert_latents=expert_latents, timesteps=grid, expert_of_step=expert_of_step,
                        expert_x0=expert_x0)
