"""Images in, refined images out: a :class:`~refiner.inference.chain.Chain` between a VQ-f4 encoder and decoder.

:meth:`Pipeline.refine_images` does, for a batch of same-size uint8 images: pad bottom/right (``pad_mode``) to
:attr:`Pipeline.multiple`, ``z = f4.encode(x) * scale_factor``, :meth:`Chain.refine`, ``f4.decode(z / scale_factor)``,
crop back. :meth:`Pipeline.degrade` is the VQ-f8 round trip that makes evaluation inputs.

Noise: image ``i`` (its index in the caller's input list, ``indices``) gets its ``q_sample`` noise from
``seed + i``, so with ``eta=0`` its result does not depend on how images were batched. With ``eta > 0`` the
per-step noise comes from one generator per batch, seeded with ``seed + indices[0]``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from refiner.data.images import crop_to, pad_to_multiple, to_tensor, to_uint8
from refiner.inference.chain import Chain

PAD_MODES = ("reflect", "replicate", "constant")


def padded_batch(images: Sequence[np.ndarray], multiple: int, pad_mode: str = "reflect",
                 device: str | torch.device = "cpu") -> Tensor:
    """Same-size uint8 images -> one (B, 3, H', W') batch in [-1, 1], padded bottom/right to ``multiple``."""
    if not images:
        raise ValueError("no images given")
    if any(img.shape != images[0].shape for img in images):
        raise ValueError(f"images of one batch must share one size, got {sorted({img.shape for img in images})}")
    x = torch.stack([to_tensor(img) for img in images]).to(device)
    return pad_to_multiple(x, multiple, mode=pad_mode)[0]


@torch.no_grad()
def vq_round_trip(vq: nn.Module, images: Sequence[np.ndarray], pad_mode: str = "reflect",
                  device: str | torch.device = "cpu") -> list[np.ndarray]:
    """Same-size uint8 images through ``vq`` (pad to its factor, encode, quantize, decode, crop back), as uint8:
    the VQ-f8 degradation."""
    h, w = images[0].shape[:2]
    y = vq.round_trip(padded_batch(images, vq.factor, pad_mode, device))
    return [to_uint8(crop_to(img, (h, w))) for img in y]


class Pipeline:
    """pad -> encode (f4) -> scale -> :meth:`Chain.refine` -> unscale -> decode (f4) -> crop; ``f8`` degrades."""

    def __init__(self, f4: nn.Module, chain: Chain, f8: nn.Module | None = None, *, pad_mode: str = "reflect",
                 device: str | torch.device = "cpu"):
        if pad_mode not in PAD_MODES:
            raise ValueError(f"pad_mode must be one of {PAD_MODES}, got {pad_mode!r}")
        self.f4, self.chain, self.f8 = f4, chain, f8
        self.pad_mode = pad_mode
        self.device = torch.device(device)

    @property
    def multiple(self) -> int:
        """Image sides are padded to this: the f4 factor times the chain's UNet downsampling."""
        return int(self.f4.factor) * self.chain.multiple

    def _pad(self, images: Sequence[np.ndarray], multiple: int) -> Tensor:
        return padded_batch(images, multiple, self.pad_mode, self.device)

    def degrade(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """VQ-f8 round trip (:func:`vq_round_trip`), stored as uint8 like a saved artifact image."""
        if self.f8 is None:
            raise ValueError("degrade needs the VQ-f8 first stage (Pipeline(..., f8=...))")
        return vq_round_trip(self.f8, images, self.pad_mode, self.device)

    @torch.no_grad()
    def refine_images(self, images: Sequence[np.ndarray], t_start: int, steps: int, *, seed: int = 0,
                      indices: Sequence[int] | None = None, eta: float = 0.0, spacing: str = "uniform",
                      allow_outside_window: bool = False, with_stages: bool = False
                      ) -> tuple[list[np.ndarray], list[list[Tensor]]]:
        """Refine same-size uint8 ``(H, W, 3)`` images. ``indices`` (default ``0..n-1``) are the images' positions
        in the caller's whole input list; image ``i``'s noise is seeded with ``seed + i``. Returns the refined
        uint8 images and, per image, the decoded x0 prediction after each stage in run order (cropped, in
        [-1, 1], on CPU) when ``with_stages``, else empty lists. Raises ``FloatingPointError`` if the refined
        latent is not finite."""
        indices = list(range(len(images))) if indices is None else [int(i) for i in indices]
        if len(indices) != len(images):
            raise ValueError(f"{len(images)} images but {len(indices)} indices")
        h, w = images[0].shape[:2]
        scale = self.chain.scale_factor
        z = self.f4.encode(self._pad(images, self.multiple)) * scale
        noise = torch.stack([torch.randn(z.shape[1:], generator=torch.Generator().manual_seed(seed + i))
                             for i in indices]).to(z)
        generator = torch.Generator(device=z.device).manual_seed(seed + indices[0])
        result = self.chain.refine(z, t_start, steps, eta=eta, spacing=spacing,
                                   allow_outside_window=allow_outside_window, noise=noise, generator=generator,
                                   return_stage_outputs=with_stages)
        if not torch.isfinite(result.latent).all():
            raise FloatingPointError("the refined latent has NaN/inf values (the denoiser diverged)")
        refined = crop_to(self.f4.decode(result.latent / scale), (h, w))
        stage_images: list[list[Tensor]] = [[] for _ in images]
        for x0 in result.stage_x0:
            decoded = crop_to(self.f4.decode(x0 / scale), (h, w)).clamp(-1, 1).cpu()
            for j, img in enumerate(decoded):
                stage_images[j].append(img)
        return [to_uint8(img) for img in refined], stage_images
