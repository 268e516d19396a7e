"""The composition benchmark's three sources of artifact images, all from the cartoon-head family.

* ``generator``: real generator artifacts. A full-range diffusion model of this framework (the same UNet
  and step budget as the window chain) sampled from pure noise, x_T ~ N(0, I) at t = T-1, with few DDIM
  steps, then decoded by the f4. Nothing clean is known for these.
* ``f8``: clean heads through the VQ-f8 round trip (the degradation the blog trained its paired model on).
* ``defects``: clean heads with one injected composition error each
  (:func:`refiner.data.synthetic.inject_defect`, round robin over ``DEFECTS``), with the true defect mask.

Every source is a pure function of its seed: image ``i`` of seed ``s`` is head ``(s, i)`` of the family
(and the generator's noise for image ``i`` comes from seed ``s + i``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from refiner.data.images import to_uint8
from refiner.data.synthetic import DEFECTS, head_for, inject_defect, render
from refiner.sampling import sample_ddim, timestep_grid

SOURCES = ("generator", "f8", "defects")


@dataclass
class ArtifactSet:
    """Images to refine (uint8, H x W x 3) and, when known, their clean counterparts and defect masks."""

    name: str
    inputs: list[np.ndarray]
    clean: list[np.ndarray] | None = None
    masks: list[np.ndarray] | None = None
    labels: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.inputs)


def clean_heads(n: int, seed: int, size: int = 64) -> list[np.ndarray]:
    """Renders of heads ``(seed, 0..n-1)``: the clean references of a split."""
    return [render(head_for(seed, i), size) for i in range(n)]


def injected_defects(n: int, seed: int, size: int = 64) -> ArtifactSet:
    """Head ``(seed, i)`` with defect ``DEFECTS[i % len(DEFECTS)]``; ``clean`` is the head without it."""
    inputs, clean, masks, labels = [], [], [], []
    for i in range(n):
        head, kind = head_for(seed, i), DEFECTS[i % len(DEFECTS)]
        image, mask, _ = inject_defect(head, kind, np.random.default_rng([seed, i, 1]), size)
        inputs.append(image)
        clean.append(render(head, size))
        masks.append(mask)
        labels.append(kind)
    return ArtifactSet("defects", inputs, clean, masks, labels)


def f8_degraded(n: int, seed: int, degrade: Callable[[Sequence[np.ndarray]], list[np.ndarray]], size: int = 64,
                batch_size: int = 64) -> ArtifactSet:
    """Heads ``(seed, i)`` through ``degrade`` (the VQ-f8 round trip, uint8 in and out)."""
    clean = clean_heads(n, seed, size)
    inputs = [img for k in range(0, n, batch_size) for img in degrade(clean[k:k + batch_size])]
    return ArtifactSet("f8", inputs, clean, None, ["f8 round trip"] * n)


@torch.no_grad()
def generator_samples(model: Callable, alphas_cumprod: torch.Tensor, decode: Callable[[torch.Tensor], torch.Tensor],
                      latent_shape: tuple[int, int, int], n: int, seed: int, steps: int,
                      parameterization: str = "eps", batch_size: int = 64,
                      callback_for: Callable[[list[int], list[int]], Callable | None] | None = None) -> ArtifactSet:
    """``n`` samples of a full-range model: DDIM (eta 0) over ``timestep_grid(T-1, steps)`` from pure
    noise; noise of image ``i`` from ``torch.Generator().manual_seed(seed + i)``. ``decode`` maps scaled
    latents (B, C, h, w) to images in [-1, 1]. ``callback_for(indices, grid)``, if given, makes each batch's
    sampler step callback (e.g. an artifact detector with TTC, :mod:`refiner.bench.artifacts`)."""

    T = alphas_cumprod.shape[0]
    grid = timestep_grid(T - 1, steps, 0, "uniform", T)
    images: list[np.ndarray] = []
    for k in range(0, n, batch_size):
        idx = range(k, min(n, k + batch_size))
        x = torch.stack([torch.randn(latent_shape, generator=torch.Generator().manual_seed(seed + i)) for i in idx])
        callback = callback_for(list(idx), grid) if callback_for is not None else None
        z = sample_ddim(model, x, grid, alphas_cumprod, parameterization=parameterization, callback=callback)
        images += [to_uint8(img) for img in decode(z)]
    return ArtifactSet("generator", images, None, None, [f"{steps} DDIM steps"] * n)
