"""Validation image grids of a training run: written under the run folder and sent to wandb when it logs."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from refiner.data.grids import save_grid


def log_grid(module, rows: Sequence[torch.Tensor], name: str, captions: Sequence[str], stem: str = "step") -> Path:
    """Save the grid PNG as the run's ``val_grids/<stem>_<step>.png`` and send it to wandb when that logger is on."""
    step = module.global_step
    out = Path(module.trainer.default_root_dir) / "val_grids" / f"{stem}_{step:07d}.png"
    save_grid(out, rows)
    for logger in module.trainer.loggers:
        if type(logger).__name__ == "WandbLogger":
            logger.log_image(key=name, images=[str(out)], caption=[" | ".join(captions)], step=step)
    return out
