"""Image grids for validation logging and for sample.py's side-by-side comparisons."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from einops import rearrange

from refiner.io import atomic_write_bytes


def make_grid(rows: Sequence[torch.Tensor], pad: int = 2) -> np.ndarray:
    """Rows of (N, 3, H, W) images in [-1, 1], all of one size -> one uint8 (R*H, N*W, 3) array,
    each image framed by ``pad`` white pixels."""
    stacked = torch.stack([r.detach().float().cpu().clamp(-1, 1) for r in rows])  # (R, N, 3, H, W)
    if pad:
        stacked = torch.nn.functional.pad(stacked, (pad, pad, pad, pad), value=1.0)
    grid = rearrange(stacked, "r n c h w -> (r h) (n w) c")
    return ((grid + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()


def save_grid(path: str | os.PathLike, rows: Sequence[torch.Tensor], text: Mapping[str, str] | None = None) -> Path:
    """:func:`make_grid` written atomically as a PNG, with optional ``text`` chunks."""
    from refiner.data.images import encode_png

    path = Path(path)
    atomic_write_bytes(path, encode_png(make_grid(rows), text))
    return path


@torch.no_grad()
def refine_within_window(module, z_degraded: torch.Tensor, steps: int = 10) -> torch.Tensor:
    """Noise degraded latents to the top of ``module.window`` and DDIM-denoise through it only.

    Returns the x0 prediction at the window's lower edge, unscaled back to first-stage latents.
    """
    from refiner.diffusion import q_sample
    from refiner.sampling import sample_ddim, timestep_grid

    window, ac = module.window, module.alphas_cumprod
    scale = module.hparams.scale_factor
    z = z_degraded.to(module.device) * scale
    concat = z if module.hparams.conditioning else None
    grid = timestep_grid(window.t_max - 1, max(1, min(steps, window.width)), t_end=window.t_min,
                         num_timesteps=window.num_timesteps)
    noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(0)).to(z)
    x_t = q_sample(z, torch.full((z.shape[0],), grid[0], device=z.device), ac, noise)
    last_x0 = []
    sample_ddim(lambda x, t: module.unet(x, t, concat=concat), x_t, grid, ac,
                parameterization=module.hparams.parameterization,
                callback=lambda i, t, x, out, x0: last_x0.append(x0) if i == len(grid) - 1 else None)
    return last_x0[-1] / scale


def log_grid(module, rows: Sequence[torch.Tensor], name: str, captions: Sequence[str]) -> Path:
    """Save the grid PNG under the run's ``val_grids/`` and send it to wandb when that logger is on."""
    step = module.global_step
    out = Path(module.trainer.default_root_dir) / "val_grids" / f"step_{step:07d}.png"
    save_grid(out, rows)
    for logger in module.trainer.loggers:
        if type(logger).__name__ == "WandbLogger":
            logger.log_image(key=name, images=[str(out)], caption=[" | ".join(captions)], step=step)
    return out
