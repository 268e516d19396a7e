"""Run a chain exported by :func:`refiner.formats.exports.export_diffusers` with diffusers components only
(``UNet2DModel`` per expert, ``DDIMScheduler``, ``VQModel``): :class:`WindowChainPipeline`. Needs diffusers installed
(the export itself does not).

The folder's layout and its ``refiner_chain.json`` (each expert's subfolder and window) are the export's; this module
only reads them, so a pipeline built here runs what any diffusers user would run from the same folder.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from refiner.diffusion import Window
from refiner.formats.diffusers import DiffusersFormatError
from refiner.formats.diffusers.folders import CHAIN_FILE, CHAIN_FORMAT, read_json


class WindowChainPipeline:
    """Run an exported chain with diffusers components only (``UNet2DModel`` per expert, ``DDIMScheduler``,
    ``VQModel``): SDEdit-style refinement, switching experts at the window boundaries.

    The grid is the scheduler's own (``set_timesteps(num_inference_steps)``, "leading" with
    ``steps_offset=1``) cut to ``t <= t_start``; the latent is noised with ``add_noise`` to exactly the
    first timestep it denoises. With ``t_start`` on that grid (e.g. 481 for 50 steps) this reproduces
    ``refiner.experts.refine(experts, z, t_start, steps=len(grid))``.
    """

    def __init__(self, unets: Sequence, windows: Sequence[Window], scheduler, vqvae=None):
        if len(unets) != len(windows) or not unets:
            raise ValueError("one UNet per window, at least one")
        self.unets, self.windows, self.scheduler, self.vqvae = list(unets), list(windows), scheduler, vqvae

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, device: str | torch.device = "cpu") -> "WindowChainPipeline":
        from diffusers import DDIMScheduler, UNet2DModel, VQModel

        folder = Path(folder)
        doc = read_json(folder / CHAIN_FILE)
        if doc.get("format") != CHAIN_FORMAT:
            raise DiffusersFormatError(f"{folder / CHAIN_FILE}: format={doc.get('format')!r}, expected {CHAIN_FORMAT!r}")
        T = int(doc["num_train_timesteps"])
        unets = [UNet2DModel.from_pretrained(folder, subfolder=e["subfolder"]).to(device).eval() for e in doc["experts"]]
        windows = [Window(int(e["t_min"]), int(e["t_max"]), T) for e in doc["experts"]]
        scheduler = DDIMScheduler.from_pretrained(folder, subfolder=doc.get("scheduler", "scheduler"))
        vq = VQModel.from_pretrained(folder, subfolder=doc["vqvae"]).to(device).eval() if doc.get("vqvae") else None
        return cls(unets, windows, scheduler, vq)

    def timesteps(self, t_start: int, num_inference_steps: int) -> list[int]:
        self.scheduler.set_timesteps(num_inference_steps)
        grid = [int(t) for t in self.scheduler.timesteps if int(t) <= t_start]
        if not grid:
            raise ValueError(f"t_start={t_start} is below the scheduler's lowest timestep "
                             f"{int(self.scheduler.timesteps[-1])} for {num_inference_steps} steps")
        uncovered = [t for t in grid if not any(w.contains(t) for w in self.windows)]
        if uncovered:
            raise ValueError(f"timesteps {uncovered} lie in no expert's window {[str(w) for w in self.windows]}")
        return grid

    @torch.no_grad()
    def refine_latents(self, z: Tensor, t_start: int, num_inference_steps: int = 50, eta: float = 0.0,
                       noise: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        """Clean latents ``z`` (already times ``scaling_factor``) -> refined latents at the level of ``ab[0]``."""
        grid = self.timesteps(t_start, num_inference_steps)
        if noise is None:
            noise = torch.randn(z.shape, generator=generator, dtype=z.dtype).to(z.device)
        x = self.scheduler.add_noise(z, noise, torch.tensor([grid[0]]))
        for t in grid:
            unet = self.unets[next(k for k, w in enumerate(self.windows) if w.contains(t))]
            out = unet(x, torch.tensor(t, device=x.device)).sample
            x = self.scheduler.step(out, t, x, eta=eta, generator=generator).prev_sample
        return x

    @torch.no_grad()
    def __call__(self, images: Tensor, t_start: int, num_inference_steps: int = 50, eta: float = 0.0,
                 generator: torch.Generator | None = None) -> Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> refined images in about [-1, 1] (encode, refine, decode)."""
        if self.vqvae is None:
            raise ValueError("this pipeline has no vqvae; call refine_latents on latents instead")
        s = float(self.vqvae.config.scaling_factor)
        z = self.vqvae.encode(images).latents * s
        z = self.refine_latents(z, t_start, num_inference_steps, eta=eta, generator=generator)
        return self.vqvae.decode(z / s).sample
