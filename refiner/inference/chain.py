"""A chain of window experts: the one object through which refiner denoises latents.

A :class:`Chain` holds the loaded experts (:class:`LoadedExpert`) together with what they must share: one noise
schedule (``alphas_cumprod``), one ``scale_factor`` and one first stage (the VQ-f4 fingerprint they recorded).
It is built from checkpoint paths (:meth:`Chain.from_paths`), from in-memory UNets (:meth:`Chain.from_unets`),
or from a training module for its validation grid (:meth:`Chain.from_module`, :meth:`Chain.preview`); it plans a
grid without running any model (:meth:`Chain.plan`, which is :func:`refiner.experts.plan`) and refines *scaled*
latents (:meth:`Chain.refine`, which is :func:`refiner.experts.refine`, optionally in MultiDiffusion tiles;
:meth:`Chain.refine_progressive` for DemoFusion-style upscaling). Images around it (pad, encode, decode, crop) are
:class:`refiner.inference.pipeline.Pipeline`'s job.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from refiner.diffusion import ScheduleConfig, Window
from refiner.errors import RefineError
from refiner.experts import (
    Expert,
    RefineResult,
    StepPlan,
    plan,
    refine_with_plan,
)
from refiner.formats.fingerprint import (
    check_first_stage_architecture,
    check_first_stage_match,
    first_stage_fingerprint,
)
from refiner.formats.loading import load_window_weights
from refiner.formats.window_files import (
    WindowSetError,
    WindowWeights,
    check_window_set,
    recorded_first_stage_params,
)
from refiner.inference.progressive import progressive_refine
from refiner.inference.tiling import MultiDiffusion
from refiner.models.vq import VQModel
from refiner.sampling import Callback, Generators

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16")


class ChainError(RefineError):
    """Window experts that cannot run as one chain (schedule, scale factor, channels, windows vs the grid)."""


@dataclass
class LoadedExpert:
    """One window expert: its checkpoint contents (:class:`~refiner.formats.window_files.WindowWeights`) and
    its built UNet; :meth:`expert` turns it into a :class:`~refiner.experts.Expert` for the sampler."""

    weights: WindowWeights
    unet: nn.Module
    precision: str = "fp32"

    @property
    def downsample(self) -> int:
        """The UNet's spatial downsampling: latents must be divisible by it."""
        return 2 ** (self.unet.num_levels - 1)

    @property
    def name(self) -> str:
        """The checkpoint's file name."""
        return Path(self.weights.source).name

    def expert(self, z_cond: Tensor | None) -> Expert:
        """A Expert whose model is ``unet(x, t)`` or, for ``conditioning == "concat"``, ``unet(x, t, concat=z_cond)``.
        A concat expert built without ``z_cond`` can be planned with but raises if its model is called."""
        unet, source = self.unet, self.weights.source
        if self.weights.conditioning != "concat":
            model = lambda x, t: unet(x, t)  # noqa: E731
        elif z_cond is None:
            def model(x: Tensor, t: Tensor) -> Tensor:
                raise ValueError(f"{source} needs the degraded latent (conditioning='concat'); pass z_cond")
        else:  # an optional third argument replaces z_cond: MultiDiffusion passes each tile's crop of it
            model = lambda x, t, cond=z_cond: unet(x, t, concat=cond)  # noqa: E731
        if self.precision == "bf16":  # autocast only the UNet; the sampler's update stays in fp32
            model = _bf16_autocast(model, next(unet.parameters()).device.type)
        return Expert(model=model, window=self.weights.window, parameterization=self.weights.parameterization,
                     name=self.name)


def _bf16_autocast(model, device_type: str):
    def autocast_model(x: Tensor, t: Tensor, *cond: Tensor) -> Tensor:
        with torch.autocast(device_type, dtype=torch.bfloat16):
            return model(x, t, *cond).float()

    return autocast_model


@dataclass
class Chain:
    """Window experts plus their shared schedule, scale factor and first-stage fingerprint.

    Build it with :meth:`from_paths`, :meth:`from_experts` or :meth:`from_unets` (all check that the experts
    agree), or :meth:`from_module` (a training module's one window). ``first_stage_fingerprint`` is the windows' common recorded f4 fingerprint, None when
    none of them recorded one.
    """

    experts: list[LoadedExpert]
    alphas_cumprod: Tensor
    scale_factor: float
    first_stage_fingerprint: str | None = None

    # ------------------------------------------------------------------------------------ building
    @classmethod
    def from_paths(cls, paths: Sequence[str | Path], *, use_ema: bool = True, trust_checkpoint: bool = False,
                   device: str | torch.device = "cpu", precision: str = "fp32",
                   allow_first_stage_mismatch: bool = False) -> "Chain":
        """Load each window file (our ``.ckpt`` or an exported ``.safetensors``), build its UNet on ``device`` and
        check that the windows share schedule, scale factor and first stage (:meth:`from_experts`)."""
        if precision not in PRECISIONS:
            raise ChainError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
        if isinstance(paths, (str, Path)) or not paths:
            raise ChainError(f"experts must be a non-empty list of window checkpoint paths, got {paths!r}")
        weights = [load_window_weights(p, use_ema=use_ema, trust_checkpoint=trust_checkpoint) for p in paths]
        for w in weights:  # before any UNet is built
            if w.conditioning not in (None, "concat"):
                raise ChainError(f"{w.source}: conditioning={w.conditioning!r}; only null or 'concat' are supported")
        return cls.from_experts([LoadedExpert(w, w.build_unet().to(device), precision) for w in weights],
                               allow_first_stage_mismatch=allow_first_stage_mismatch)

    @classmethod
    def from_experts(cls, experts: Sequence[LoadedExpert], *, allow_first_stage_mismatch: bool = False) -> "Chain":
        """A chain of already loaded experts, checked by :func:`refiner.formats.window_files.check_window_set`
        (the check every set of windows gets, the diffusers export's too). Raises :class:`ChainError` if they do not
        share one noise schedule (``alphas_cumprod``) and one ``scale_factor`` or if their windows overlap, and
        :class:`~refiner.formats.fingerprint.FirstStageMismatch` if their recorded first stages differ (a warning
        with ``allow_first_stage_mismatch``). The UNets are not needed (``unet`` may be None)."""
        try:
            shared = check_window_set([s.weights for s in experts], allow_first_stage_mismatch)
        except WindowSetError as err:
            raise ChainError(str(err)) from err
        return cls(list(experts), shared.alphas_cumprod, shared.scale_factor, shared.first_stage_fingerprint)

    @classmethod
    def from_unets(cls, unets: Sequence[nn.Module], windows: Sequence[Window], schedule: ScheduleConfig, *,
                   unet_params: dict, parameterization: str = "eps", scale_factor: float = 1.0) -> "Chain":
        """A chain of in-memory UNets (``UNetModel(**unet_params)`` each, e.g. for benchmarks), one per window,
        unconditioned, checked like :meth:`from_experts`."""
        if len(unets) != len(windows):
            raise ChainError(f"{len(unets)} UNets but {len(windows)} windows; give one window per UNet")
        return cls.from_experts([LoadedExpert(WindowWeights(
            unet_state=unet.state_dict(), unet_params=dict(unet_params), window=window, schedule=schedule,
            parameterization=parameterization, global_step=None, source=f"unet {k} {window}", has_ema=False,
            scale_factor=float(scale_factor)), unet) for k, (unet, window) in enumerate(zip(unets, windows))])

    @classmethod
    def from_module(cls, module: Any, source: str = "the module being trained") -> "Chain":
        """A one-expert chain around a training module (:class:`refiner.lit.window_module.WindowRefiner`): its live
        UNet (not a copy), window, schedule buffer, parameterization, conditioning and scale factor."""
        hp = module.hparams
        weights = WindowWeights(
            unet_state=module.unet.state_dict(), unet_params=dict(hp.unet), window=module.window,
            schedule=module.schedule, parameterization=hp.parameterization, global_step=None, source=source,
            has_ema=False, conditioning=hp.conditioning, scale_factor=float(hp.scale_factor),
            first_stage_fingerprint=hp.get("first_stage_fingerprint"),
            first_stage_params=recorded_first_stage_params(hp))
        return cls([LoadedExpert(weights, module.unet)], module.alphas_cumprod, float(hp.scale_factor),
                   weights.first_stage_fingerprint)

    # ------------------------------------------------------------------------------------ checks
    def check_latent_channels(self, channels: int) -> None:
        """Every UNet's in/out channels must fit a ``channels``-channel latent (twice that in, for concat
        experts); raises :class:`ChainError` naming the expert."""
        for s in self.experts:
            p, cond = s.weights.unet_params, s.weights.conditioning
            want_in = channels * (2 if cond == "concat" else 1)
            if p["in_channels"] != want_in or p["out_channels"] != channels:
                raise ChainError(
                    f"{s.weights.source}: UNet in/out channels {p['in_channels']}/{p['out_channels']} do not fit the "
                    f"first stage's {channels}-channel latent (conditioning={cond!r} needs "
                    f"in_channels={want_in}, out_channels={channels}); wrong first_stage.f4 for these windows?")

    def check_first_stage(self, f4: VQModel, f4_source: str, allow_mismatch: bool = False) -> str:
        """Check that this chain can run on ``f4`` (named ``f4_source`` in messages): its latent channels
        (``f4.embed_dim``) fit every UNet, and every expert was trained with it: the same weights (fingerprints; an
        expert that recorded none only warns) read by the same network (the recorded architecture against
        ``f4.config``: norm groups, channels, factor, ...). A mismatch raises
        :class:`~refiner.formats.fingerprint.FirstStageMismatch`, a warning with ``allow_mismatch``. Returns
        ``f4``'s fingerprint."""
        self.check_latent_channels(int(f4.embed_dim))
        fingerprint = first_stage_fingerprint(f4)
        for s in self.experts:
            check_first_stage_match(s.weights.first_stage_fingerprint, s.weights.source, fingerprint, f4_source,
                                    allow_mismatch)
            check_first_stage_architecture(s.weights.first_stage_params, s.weights.source, f4.config, f4_source,
                                           allow_mismatch)
        return fingerprint

    @property
    def multiple(self) -> int:
        """Latent sides must be multiples of this: the lcm of the UNets' downsampling."""
        return math.lcm(*(s.downsample for s in self.experts))

    @property
    def device(self) -> torch.device:
        """Where the UNets (of the first stage) live."""
        return next(self.experts[0].unet.parameters()).device

    def sampling_experts(self, z_cond: Tensor | None = None) -> list[Expert]:
        """The experts as :class:`~refiner.experts.Expert` objects; concat experts see ``z_cond`` (the scaled latent
        being refined). For samplers that take a Expert list (MultiDiffusion tiles, progressive refinement)."""
        return [s.expert(z_cond) for s in self.experts]

    # ------------------------------------------------------------------------------------ sampling
    def plan(self, t_start: int, steps: int, *, spacing: str = "uniform", eta: float = 0.0,
             allow_outside_window: bool = False, t_end: int = 0) -> StepPlan:
        """Which expert runs which step of ``timestep_grid(t_start, steps, t_end, spacing)``, validated exactly as
        :meth:`refine` validates it (:func:`refiner.experts.plan`) and without running any model. Raises
        :class:`ChainError` (overlapping windows, uncovered steps, t_start above the top window, eta too large);
        a loaded expert that gets no step is logged."""
        result = self._plan(t_start, steps, spacing, eta, allow_outside_window, t_end)
        for k, s in enumerate(self.experts):
            if k not in result.expert_of_step:
                log.warning("expert %d (%s, window %s) gets no step of the grid %s..%s; it is loaded but unused",
                            k + 1, s.weights.source, s.weights.window, result.timesteps[0], result.timesteps[-1])
        return result

    def _plan(self, t_start: int, steps: int, spacing: str, eta: float, allow_outside_window: bool,
              t_end: int) -> StepPlan:
        try:
            return plan(self.sampling_experts(), t_start, steps, self.alphas_cumprod, t_end=t_end, spacing=spacing,
                        eta=eta, allow_outside_window=allow_outside_window)
        except (ValueError, TypeError) as err:
            raise ChainError(f"invalid expert chain for t_start={t_start}, steps={steps}: {err}") from err

    @torch.no_grad()
    def refine(self, z: Tensor, t_start: int, steps: int, *, eta: float = 0.0, spacing: str = "uniform",
               allow_outside_window: bool = False, noise: Tensor | None = None,
               generator: Generators = None, z_cond: Tensor | None = None,
               return_expert_outputs: bool = False, callback: Callback | None = None, t_end: int = 0,
               tiles: dict | None = None) -> RefineResult:
        """Img2img-refine the *scaled* latents ``z`` (``f4.encode(x) * scale_factor``) with the chain:
        :func:`refiner.experts.refine` (q_sample to ``t_start`` with ``noise`` or ``generator``, DDIM(eta) over one
        grid, experts switched by t; ``generator`` may be one generator per row, :func:`refiner.sampling.randn_like`). Concat experts see ``z_cond`` (default ``z``). ``tiles`` (keyword arguments
        of :func:`refiner.inference.tiling.tile_experts`, e.g. ``{"tile": 64, "stride": 48}``) denoises in
        MultiDiffusion tiles. The result carries the grid and expert assignment; its ``expert_latents`` and
        ``expert_x0`` are filled when ``return_expert_outputs``. Invalid settings raise :class:`ChainError` before
        any model runs."""
        step_plan = self._plan(t_start, steps, spacing, eta, allow_outside_window, t_end)
        cond = z if z_cond is None else z_cond
        experts = self.sampling_experts(cond)
        if tiles is not None:  # concat experts get their conditioning latent cropped with each tile

            experts = [replace(st, model=MultiDiffusion(st.model, **tiles, context=cond if ls.weights.conditioning
                                                       == "concat" else None))
                      for st, ls in zip(experts, self.experts)]
        out = refine_with_plan(experts, z, step_plan, self.alphas_cumprod, eta=eta, generator=generator,
                               callback=callback, return_expert_outputs=return_expert_outputs, noise=noise)
        if return_expert_outputs:
            return out
        return RefineResult(latent=out, expert_latents=[], timesteps=step_plan.timesteps,
                            expert_of_step=step_plan.expert_of_step)

    @torch.no_grad()
    def refine_progressive(self, z: Tensor, t_start: int, steps: int, *, upscale: int = 2, **kwargs) -> Tensor:
        """DemoFusion-style progressive upscaling of the *scaled* latents ``z`` by ``upscale`` with this chain:
        :func:`refiner.inference.progressive.progressive_refine` (``kwargs`` are its tile, DemoFusion and sampler
        settings). Concat experts are refused: their conditioning latent would not match the upscaled phases.
        The grid is validated by :meth:`plan` first."""

        concat = [s.weights.source for s in self.experts if s.weights.conditioning == "concat"]
        if concat:
            raise ChainError(f"progressive refinement cannot condition on a latent of another size: {concat} "
                             "are concat-conditioned windows")
        self._plan(t_start, steps, kwargs.get("spacing", "uniform"), kwargs.get("eta", 0.0),
                   kwargs.get("allow_outside_window", False), 0)
        return progressive_refine(self.sampling_experts(), z, t_start, steps, self.alphas_cumprod, upscale=upscale,
                                  **kwargs)

    @torch.no_grad()
    def preview(self, z: Tensor, steps: int = 10, seed: int = 0) -> Tensor:
        """The validation grid's picture: noise the *unscaled* latents ``z`` to the top of the chain's windows
        (``t_max - 1`` of the highest) with noise from ``seed``, DDIM through the windows only (down to the lowest
        ``t_min``, at most ``steps`` steps), and return the x0 prediction of the last step, unscaled."""
        windows = [s.weights.window for s in self.experts]
        t_start, t_end = max(w.t_max for w in windows) - 1, min(w.t_min for w in windows)
        scaled = z.to(self.device) * self.scale_factor
        noise = torch.randn(scaled.shape, generator=torch.Generator().manual_seed(seed)).to(scaled)
        result = self.refine(scaled, t_start, max(1, min(steps, t_start - t_end + 1)), t_end=t_end, noise=noise,
                             return_expert_outputs=True)
        return result.expert_x0[-1] / self.scale_factor
