"""The smallest padded image a first stage and its window experts can take, measured from their group norms.

Images are padded to a multiple ``M`` of the f4 factor times the UNets' downsampling
(:attr:`refiner.inference.pipeline.Pipeline.multiple`), so the deepest UNet level sees one latent cell per ``M x M``
block. ``GroupNorm`` normalises each group over its channels and cells and refuses a group of a single value
(``torch.nn.functional.group_norm``: "Expected more than 1 value per channel"). A model whose deepest norm has one
channel per group (the test suite's 32-px models: 32 channels, 32 groups, one downsampling, ``M = 8``) therefore
cannot take an image padded to a single block (anything up to 8 x 8 px), while one with two channels per group there
can (the demo's models refine a 1 x 1 image). Whether an image fits must not depend on such a detail, so
:class:`~refiner.inference.pipeline.Pipeline` pads such images further, to the minimum number of blocks this module
measures.

How: one probe through the f4 encoder, every window expert's UNet and the f4 decoder, on a ``2M x 2M`` zero image
(4 blocks, which every norm takes: its deepest cells are ``2 x 2``), with a forward pre-hook on every ``GroupNorm``
recording its channels per group ``c`` and the cells ``n`` it sees. At ``b`` blocks that norm sees ``n * b / 4``
cells (every downsampling divides ``M``), so it takes the image when ``c * n * b / 4 >= 2``: the minimum is
``max(1, max ceil(8 / (c n)))`` blocks. Measured, not derived from the configs, because the norm layout differs
between the UNet, taming's autoencoder and its ``norm_groups`` variants; the probe runs only when an image padded
to fewer than 4 blocks shows up.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
from torch import Tensor, nn

PROBE_BLOCKS = 4  # the probe is 2M x 2M


@torch.no_grad()
def minimum_blocks(f4: nn.Module, experts: Iterable, multiple: int, scale_factor: float,
                   device: torch.device) -> int:
    """How many ``multiple x multiple`` blocks a padded image needs for every group norm of ``f4`` (encode and
    decode) and the ``experts``' UNets (:class:`~refiner.inference.chain.LoadedExpert`) to see more than one value
    per group (module docstring). At least 1."""
    seen: list[tuple[int, int]] = []  # (channels per group, cells) of every GroupNorm call

    def record(module: nn.GroupNorm, args: tuple[Tensor, ...]) -> None:
        x = args[0]
        seen.append((module.num_channels // module.num_groups, math.prod(x.shape[2:])))

    norms = [m for net in (f4, *(e.unet for e in experts)) for m in net.modules() if isinstance(m, nn.GroupNorm)]
    handles = [m.register_forward_pre_hook(record) for m in norms]
    try:
        side = 2 * multiple
        z = f4.encode(torch.zeros(1, 3, side, side, device=device)) * scale_factor
        t = torch.zeros(1, dtype=torch.long, device=device)
        for expert in experts:
            model: Callable = expert.expert(z).model
            model(z, t)
        f4.decode(z / scale_factor)
    finally:
        for h in handles:
            h.remove()
    return max([1] + [math.ceil(2 * PROBE_BLOCKS / (c * n)) for c, n in seen])


def padded_blocks(blocks: tuple[int, int], needed: int) -> tuple[int, int]:
    """``(rows, cols)`` of blocks grown to at least ``needed`` in all: the longer side (the width on a tie) grows,
    so the image's shape changes least."""
    rows, cols = blocks
    if rows * cols >= needed:
        return rows, cols
    if cols >= rows:
        return rows, -(-needed // rows)
    return -(-needed // cols), cols
