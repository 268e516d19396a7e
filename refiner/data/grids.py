"""Image grids: rows of images side by side, written as PNG (validation grids, refine.py's comparisons)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from einops import rearrange

from refiner.data.images import encode_png
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
    path = Path(path)
    atomic_write_bytes(path, encode_png(make_grid(rows), text))
    return path


def _pad_white(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return torch.nn.functional.pad(img, (0, size[1] - img.shape[-1], 0, size[0] - img.shape[-2]), value=1.0)


def combined_grid(rows: Sequence[Sequence[torch.Tensor]]) -> np.ndarray:
    """One row per image (its columns side by side); smaller images are padded white to the largest."""
    size = (max(c.shape[-2] for r in rows for c in r), max(c.shape[-1] for r in rows for c in r))
    return make_grid([torch.stack([_pad_white(c, size) for c in r]) for r in rows])


def save_combined_grid(path: str | os.PathLike, rows: Sequence[Sequence[torch.Tensor]],
                       text: Mapping[str, str] | None = None) -> Path:
    """:func:`combined_grid` written atomically as a PNG, with optional ``text`` chunks."""
    path = Path(path)
    atomic_write_bytes(path, encode_png(combined_grid(rows), text))
    return path
