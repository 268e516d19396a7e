"""DemoFusion-style progressive upscaling of latents with a chain of window experts.

DemoFusion (Du et al., CVPR 2024, "DemoFusion: Democratising High-Resolution Image Generation With
No $$$"; code PRIS-CV/DemoFusion ``pipeline_demofusion_sdxl.py``, the "Phase Upscaling" loop of
``__call__``). Each phase of :func:`progressive_refine` does, at the phase's total scale ``s``
(relative to the input latent):

1. **Upsample and re-noise** (the paper's "progressive upscaling"): ``z_up = bicubic(z, x2)``
   (``F.interpolate(mode="bicubic")``); one noise tensor ``n`` gives the *noised upsampled latents*
   ``zhat_t = q_sample(z_up, t, n)`` at every grid ``t``; sampling starts from ``zhat_{t_start}``.
2. **Skip residual**: before the step at ``t``,
   ``z_t <- (1 - c1) z_t + c1 zhat_t`` with ``c1 = cos_factor(t) ** alpha1`` and
   ``cos_factor(t) = 0.5 (1 + cos(pi (T - t) / T))`` (``T`` = number of training timesteps).
3. **Local path**: MultiDiffusion over overlapping latent tiles with random jitter
   (:class:`~refiner.inference.tiling.MultiDiffusion`; DemoFusion: window = the UNet's sample size
   128, stride 64, jitter ``(window - stride) // 4``).
4. **Global path, dilated sampling**: the ``s^2`` sub-lattices ``z[..., h::s, w::s]``
   are denoised as images of the input's size. The model sees a Gaussian-blurred latent (kernel
   ``2s - 1``, std ``sigma * c3``, ``c3 = 0.99 cos_factor ** alpha3 + 0.01``, the blurred latent
   rescaled to the unblurred one's mean and std), but the step is applied to the unblurred lattice.
5. **Mix**: ``z_{t-1} = (1 - c2) local + c2 global`` with ``c2 = cos_factor ** alpha2``.
6. After the phase, **renormalise** ``z`` to the mean and std of the first phase's latent (the
   input ``z``): ``(z - mean(z)) / std(z) * anchor_std + anchor_mean``.

Defaults as DemoFusion's ``__call__``: ``cosine_scale_1 = alpha1 = 3``, ``cosine_scale_2 = alpha2 = 1``,
``cosine_scale_3 = alpha3 = 1``, ``sigma = 1.0``, ``view_batch_size = 16``, ``stride = 64`` with a
128 window (here ``stride = tile // 2``), 50 steps. Read at commit 5024487: the defaults in the
signature of ``__call__`` (lines 668-701), ``cosine_factor`` and ``c1`` (lines 1121-1124), the
jittered local views (1128-1199), ``c2`` (1201), ``c3`` and the blur (1218-1221), the dilated views
and the mix (1206-1291), the renormalisation (1303), ``get_views`` (551-601), ``gaussian_kernel`` (76).

How this differs from DemoFusion, on purpose:

* Refinement, not generation: each phase runs the *staged* img2img grid of
  :func:`refiner.experts.refine` from ``t_start`` (SDEdit), not the full 50-step schedule from T.
* Phases double the resolution (``upscale`` 2 = one phase, 4 = two phases at s = 2, 4). DemoFusion's
  phases are s = 2, 3, ..., K relative to the base. The dilation factor is the total scale ``s``, as
  in DemoFusion, so every sub-lattice has the input latent's size.
* Both paths average *model outputs* and apply one DDIM step (DemoFusion steps each view and
  averages the results): for fixed ``z_t`` the step is affine in the output, so the two are equal
  (see :mod:`refiner.inference.tiling`, tested against a per-view reference).
* Statistics (renormalisation, blur rescaling) are per sample over (C, H, W); DemoFusion uses the
  whole batch tensor (it generates one image at a time).
* The global path's sub-lattices go through the same tiled wrapper, so memory stays bounded by the
  tile when the input latent is itself larger than a tile.

**Ablations** (:class:`DemoFusionPaths`): ``global_path=False`` drops step 4 (the local path alone,
c2 = 0), ``skip_residual=False`` drops step 2 (c1 = 0): the two arms of the paper's ablation study
of its "Skip Residual" and "Dilated Sampling" mechanisms. With neither, a phase is MultiDiffusion tiles over the
re-noised bicubic upsampling.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from refiner.diffusion import q_sample
from refiner.experts import Expert, refine
from refiner.inference.tiling import PAD_MODES, MultiDiffusion, Weighting
from refiner.sampling import Model, Spacing, timestep_grid


# --------------------------------------------------------------------------------------- weights
def cosine_factor(t: float, num_timesteps: int = 1000) -> float:
    """DemoFusion's ``0.5 * (1 + cos(pi * (T - t) / T))``: about 1 at t = T-1 (noise), 0 at t = 0."""
    return 0.5 * (1.0 + math.cos(math.pi * (num_timesteps - float(t)) / num_timesteps))


def skip_weight(t: float, num_timesteps: int = 1000, alpha1: float = 3.0) -> float:
    """c1 = cos_factor ** alpha1: how much of the noised upsampled latent is mixed back in at t."""
    return cosine_factor(t, num_timesteps) ** alpha1


def global_weight(t: float, num_timesteps: int = 1000, alpha2: float = 1.0) -> float:
    """c2 = cos_factor ** alpha2: the share of the dilated (global) path in the step at t."""
    return cosine_factor(t, num_timesteps) ** alpha2


def blur_factor(t: float, num_timesteps: int = 1000, alpha3: float = 1.0) -> float:
    """c3 = 0.99 * cos_factor ** alpha3 + 0.01: the Gaussian std of the global path is sigma * c3."""
    return 0.99 * cosine_factor(t, num_timesteps) ** alpha3 + 0.01


# ------------------------------------------------------------------------------------- operators
def gaussian_blur(x: Tensor, kernel_size: int, sigma: float) -> Tensor:
    """Depthwise Gaussian blur with zero padding ``kernel_size // 2`` (DemoFusion ``gaussian_filter``):
    taps ``exp(-(i - (k-1)/2)^2 / (2 sigma^2))`` normalised to sum 1, separable. ``kernel_size = 1``
    is the identity."""
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"gaussian_blur: kernel_size must be a positive odd int, got {kernel_size}")
    if sigma <= 0:
        raise ValueError(f"gaussian_blur: sigma must be > 0, got {sigma}")
    if kernel_size == 1:
        return x
    i = torch.arange(kernel_size, dtype=torch.float64)
    taps = torch.exp(-((i - (kernel_size - 1) / 2) ** 2) / (2 * sigma**2))
    taps = (taps / taps.sum()).to(x)
    channels, pad = x.shape[1], kernel_size // 2
    x = F.conv2d(x, taps.view(1, 1, 1, -1).expand(channels, 1, 1, kernel_size), padding=(0, pad), groups=channels)
    return F.conv2d(x, taps.view(1, 1, -1, 1).expand(channels, 1, kernel_size, 1), padding=(pad, 0), groups=channels)


def latent_stats(z: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample mean and (unbiased, as ``Tensor.std``) std over all non-batch dims, shaped to broadcast."""
    flat = z.flatten(1)
    shape = (z.shape[0],) + (1,) * (z.ndim - 1)
    return flat.mean(1).view(shape), flat.std(1).view(shape)


def renormalize(z: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """``(z - mean(z)) / std(z) * std + mean`` per sample: DemoFusion's end-of-phase anchoring."""
    own_mean, own_std = latent_stats(z)
    return (z - own_mean) / own_std * std + mean


# -------------------------------------------------------------------------------- model wrappers
class DilatedSampling:
    """DemoFusion's global path as a model wrapper: ``out[..., h::s, w::s] = model(blur(x)[..., h::s, w::s], t)``.

    The blur is :func:`gaussian_blur` with kernel ``2s - 1`` and std ``sigma * c3(t)``, rescaled to
    ``x``'s per-sample mean and std. Because the output is assembled at the unblurred positions, a
    DDIM step with it applies to the unblurred lattice, as in DemoFusion. The ``s^2`` lattices go to
    ``model`` as one batch (wrap ``model`` in :class:`MultiDiffusion` to bound its batch and size).
    """

    def __init__(self, model: Model, scale: int, sigma: float = 1.0, alpha3: float = 1.0,
                 num_timesteps: int = 1000):
        if not isinstance(scale, int) or scale < 1:
            raise ValueError(f"DilatedSampling: scale must be a positive int, got {scale!r}")
        if sigma <= 0:
            raise ValueError(f"DilatedSampling: sigma must be > 0, got {sigma}")
        self.model, self.scale, self.sigma, self.alpha3, self.num_timesteps = model, scale, sigma, alpha3, num_timesteps

    def blurred(self, x: Tensor, t: int) -> Tensor:
        """What the model sees at timestep t (before taking the sub-lattices)."""
        sigma = self.sigma * blur_factor(t, self.num_timesteps, self.alpha3)
        mean, std = latent_stats(x)
        return renormalize(gaussian_blur(x, 2 * self.scale - 1, sigma), mean, std)

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        s, (batch, _, height, width) = self.scale, x.shape
        if height % s or width % s:
            raise ValueError(f"DilatedSampling: latent {height}x{width} is not divisible by the dilation {s}")
        t = torch.as_tensor(t, device=x.device).expand(batch)
        xb = self.blurred(x, int(t[0]))
        lattices = torch.cat([xb[..., h::s, w::s] for h in range(s) for w in range(s)])
        out = self.model(lattices, t.repeat(s * s))
        full = out.new_empty(batch, out.shape[1], height, width)
        for k, part in enumerate(out.split(batch)):
            full[..., k // s::s, k % s::s] = part
        return full


class DemoFusionModel:
    """``(1 - c2(t)) * local(x, t) + c2(t) * global(x, t)``: DemoFusion's mix of the two paths, on
    model outputs (equal to mixing their DDIM steps, which are affine in the output)."""

    def __init__(self, local: Model, global_: Model, alpha2: float = 1.0, num_timesteps: int = 1000):
        self.local, self.global_, self.alpha2, self.num_timesteps = local, global_, alpha2, num_timesteps

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        c2 = global_weight(int(torch.as_tensor(t).reshape(-1)[0]), self.num_timesteps, self.alpha2)
        if c2 == 0.0:
            return self.local(x, t)
        return (1 - c2) * self.local(x, t) + c2 * self.global_(x, t)


# ------------------------------------------------------------------------------------- the sampler
@dataclass(frozen=True)
class DemoFusionPaths:
    """Which of DemoFusion's two additions to MultiDiffusion a progressive phase uses (Du et al., CVPR 2024: the
    "Skip Residual" and "Dilated Sampling" mechanisms of its method section, and its ablation of both).

    Args:
        global_path: mix in the dilated global path (step 4 of the module docstring); False: local tiles alone.
        skip_residual: mix the noised upsampled latent back in before every step (step 2); False: c1 = 0.
        alpha1: the skip residual's cosine scale, ``c1 = cos_factor ** alpha1`` (DemoFusion's ``cosine_scale_1``,
            3): smaller keeps more of the upsampled layout for longer; > 0.
        sigma: the global path's blur, std ``sigma * c3`` (DemoFusion's ``sigma``, 1.0); > 0.
    """

    global_path: bool = True
    skip_residual: bool = True
    alpha1: float = 3.0
    sigma: float = 1.0

    def __post_init__(self):
        for name in ("global_path", "skip_residual"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"DemoFusionPaths.{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("alpha1", "sigma"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"DemoFusionPaths.{name} must be a number > 0, got {value!r}")

    def kwargs(self) -> dict:
        """Keyword arguments of :func:`progressive_refine`."""
        return asdict(self)

    def knobs(self) -> str:
        """`` (alpha1 a, sigma s)`` when either differs from DemoFusion's defaults (this class's), else empty."""
        if (self.alpha1, self.sigma) == (DemoFusionPaths.alpha1, DemoFusionPaths.sigma):
            return ""
        return f" (alpha1 {self.alpha1:g}, sigma {self.sigma:g})"

    def label(self) -> str:
        parts = [p for p, on in (("dilated global path", self.global_path), ("skip residual", self.skip_residual))
                 if on]
        return (" + ".join(parts) if parts else "local tiles only") + self.knobs()

    def short(self) -> str:
        """A column title: ``DemoFusion`` with both paths, else what it lacks."""
        missing = [p for p, on in (("global", self.global_path), ("skip", self.skip_residual)) if not on]
        return "DemoFusion" + (f" w/o {' & '.join(missing)}" if missing else "") + self.knobs()


def phase_scales(upscale: int) -> list[int]:
    """Total scale of each phase: ``upscale`` 2 -> [2], 4 -> [2, 4], 8 -> [2, 4, 8]."""
    if not isinstance(upscale, int) or isinstance(upscale, bool) or upscale < 2 or upscale & (upscale - 1):
        raise ValueError(f"upscale must be a power of 2 >= 2 (phases double the size), got {upscale!r}")
    return [2**k for k in range(1, upscale.bit_length())]


@torch.no_grad()
def progressive_refine(
    experts: Sequence[Expert],
    z: Tensor,
    t_start: int,
    steps: int,
    alphas_cumprod: Tensor,
    upscale: int = 2,
    tile: int = 64,
    stride: int | None = None,
    jitter: bool = True,
    view_batch_size: int = 16,
    weighting: Weighting = "uniform",
    pad_mode: str = "constant",
    alpha1: float = 3.0,
    alpha2: float = 1.0,
    alpha3: float = 1.0,
    sigma: float = 1.0,
    eta: float = 0.0,
    spacing: Spacing = "uniform",
    generator: torch.Generator | None = None,
    seed: int = 0,
    allow_outside_window: bool = False,
    return_phases: bool = False,
    global_path: bool = True,
    skip_residual: bool = True,
) -> Tensor | list[Tensor]:
    """Upscale clean latents ``z`` (B, C, h, w) by ``upscale`` in DemoFusion phases, refining with ``experts``.

    Every phase (see the module docstring for the equations): bicubic x2, then
    :func:`~refiner.experts.refine` over ``timestep_grid(t_start, steps, 0, spacing)`` with the
    expert chain unchanged except that each model is replaced by
    ``DemoFusionModel(MultiDiffusion(model), DilatedSampling(MultiDiffusion(model), s))`` and the
    skip residual ``z_t <- (1 - c1) z_t + c1 zhat_t`` is applied before every step (the first one is
    a no-op: sampling starts at ``zhat_{t_start}``); then the result is renormalised to ``z``'s
    per-sample mean and std.

    Args:
        experts, t_start, steps, alphas_cumprod, eta, spacing, allow_outside_window: as in
            :func:`~refiner.experts.refine` (windows validated the same way).
        upscale: a power of 2; phases of x2.
        tile, stride, jitter, view_batch_size, weighting, pad_mode: the MultiDiffusion tiles of the
            local path and of each global sub-lattice (latent pixels; ``stride`` defaults to
            ``tile // 2``; ``jitter`` on as DemoFusion's local path).
        alpha1, alpha2, alpha3, sigma: DemoFusion's ``cosine_scale_1..3`` and ``sigma``.
        generator: draws each phase's noise ``n`` (and the eta > 0 step noise).
        seed: jitter seed (phase ``k`` uses ``seed + k``; the two paths differ too).
        return_phases: return the list of every phase's result instead of the last one.
        global_path, skip_residual: DemoFusion's two paths (:class:`DemoFusionPaths`); off, the model is the local
            path alone / c1 = 0 (the global path's UNet evaluations are then not spent).

    Returns the latent (B, C, h * upscale, w * upscale) at the noise level of ``ab[0]``.
    """
    scales = phase_scales(upscale)
    if z.ndim != 4:
        raise ValueError(f"progressive_refine expects latents (B, C, h, w), got shape {tuple(z.shape)}")
    if pad_mode not in PAD_MODES:
        raise ValueError(f"unknown pad_mode {pad_mode!r}; expected one of {PAD_MODES}")
    T = alphas_cumprod.shape[0]
    grid = timestep_grid(t_start, steps, 0, spacing, T)
    anchor_mean, anchor_std = latent_stats(z)
    tiles = dict(tile=tile, stride=stride, jitter=jitter, view_batch_size=view_batch_size, weighting=weighting,
                 pad_mode=pad_mode)
    phases = []
    for k, s in enumerate(scales):
        z_up = F.interpolate(z, scale_factor=2, mode="bicubic")
        noise = torch.randn(z_up.shape, generator=generator, device=z_up.device, dtype=z_up.dtype)

        def add_skip_residual(i, t, x, out, x0, z_up=z_up, noise=noise):
            if i + 1 >= len(grid):
                return None
            t_next = grid[i + 1]
            c1 = skip_weight(t_next, T, alpha1)
            noised = q_sample(z_up, torch.full((x.shape[0],), t_next, device=x.device), alphas_cumprod, noise)
            return (1 - c1) * x + c1 * noised

        wrapped = [
            replace(st, model=DemoFusionModel(
                MultiDiffusion(st.model, seed=2 * (seed + k), **tiles),
                DilatedSampling(MultiDiffusion(st.model, seed=2 * (seed + k) + 1, **tiles), s, sigma, alpha3, T),
                alpha2, T) if global_path else MultiDiffusion(st.model, seed=2 * (seed + k), **tiles))
            for st in experts
        ]
        z = refine(wrapped, z_up, t_start, steps, alphas_cumprod, eta=eta, generator=generator, spacing=spacing,
                   callback=add_skip_residual if skip_residual else None, allow_outside_window=allow_outside_window,
                   noise=noise)
        z = renormalize(z, anchor_mean, anchor_std)
        phases.append(z)
    return phases if return_phases else z
