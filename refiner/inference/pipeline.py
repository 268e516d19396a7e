"""Images in, refined images out: a :class:`~refiner.inference.chain.Chain` between a VQ-f4 encoder and decoder.

:meth:`Pipeline.refine_images` does, for a batch of same-size uint8 images: pad bottom/right (``pad_mode``) to
:attr:`Pipeline.multiple`, ``z = f4.encode(x) * scale_factor``, :meth:`Chain.refine`, ``f4.decode(z / scale_factor)``,
crop back. :meth:`Pipeline.degrade` is the VQ-f8 round trip that makes evaluation inputs. An image too small for the
models' group norms (one ``multiple`` block where they need two) is padded to their measured minimum
(:meth:`Pipeline.padded_size`, :mod:`refiner.inference.min_size`), so whether an image fits never fails it.

**Large images** (:class:`Tiling`): above ``auto_above_pixels`` (``mode="auto"``; ``"always"`` / ``"never"`` force
it) the first stages run on overlapping, feathered pixel tiles (:func:`~refiner.inference.tiling.tiled_encode`,
:func:`~refiner.inference.tiling.tiled_decode`) and every window expert on MultiDiffusion latent tiles
(:class:`~refiner.inference.tiling.MultiDiffusion`: Bar-Tal et al. 2023, eq. 5, the per-pixel average of the
overlapping tiles' outputs, with DemoFusion's per-step random jitter of the tile offsets). Each decision is taken
on the pixels the expert sees: encode and refine on the padded input, decode on the padded output. Tiled images
never exist as image-sized float buffers: the input stays uint8 (:class:`~refiner.data.images.PaddedImages`,
converted tile by tile) and the decode streams bands of rows into the uint8 output (:func:`decode_to_uint8`), with
pixels identical to converting whole buffers.

**Progressive upscaling** (``upscale`` 2 or 4): :meth:`Chain.refine_progressive`, DemoFusion (Du et al. 2024)
phases of x2: bicubic upsampling and re-noising ``zhat_t = q_sample(up(z), t, n)``, skip residual
``z_t <- (1 - c1) z_t + c1 zhat_t`` with ``c1 = (0.5 (1 + cos(pi (T - t) / T)))^alpha1``, the local
(MultiDiffusion) path mixed with the dilated global path by ``c2 = cos_factor^alpha2``, and renormalisation to
the first phase's latent mean and std (equations and defaults in :mod:`refiner.inference.progressive`). The
result is ``upscale`` times larger.

Noise: image ``i`` (its index in the caller's input list, ``indices``) has its own generator seeded with ``seed + i``
(:func:`image_generators`). Its first draw is the image's ``q_sample`` noise (:func:`image_noise`), and with
``eta > 0`` the same generator then draws the image's noise for every DDIM step (the sampler takes one generator per
batch row, :func:`refiner.sampling.randn_like`). So for any eta an image's result does not depend on how images
were batched: a batch equals refining its images one at a time, up to the batched convolutions' float rounding
(tested: decoded x0 within 1e-4, measured 5e-6, and outputs within one uint8 level). Tiled and progressive images
are refined one at a time (their tiles are batched instead, ``view_batch_size``), with every random draw (noise,
jitter offsets, eta noise, DemoFusion's phase noise) from ``seed + i`` as well.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from refiner.artifacts.correct import StrengthPinning
from refiner.artifacts.dynamics import chain_callbacks
from refiner.data.images import PaddedImages, crop_to, pad_to_multiple, to_uint8
from refiner.errors import SettingError
from refiner.inference.chain import Chain
from refiner.inference.min_size import PROBE_BLOCKS, minimum_blocks, padded_blocks
from refiner.inference.progressive import DemoFusionPaths
from refiner.inference.tiling import tiled_decode, tiled_decode_rows, tiled_encode
from refiner.sampling import Callback, randn_like
from refiner.settings import require_choice, require_int

PAD_MODES = ("reflect", "replicate", "constant")
TILING_MODES = ("auto", "always", "never")
UPSCALES = (1, 2, 4)
# Tiling switches on above this many (padded) pixels: 512 x 512. Measured on this 2-core CPU (1 thread, shared
# machine) with the demo models (conf/first_stage/demo.yaml f4, two conf/model/refiner_tiny.yaml windows, 10 DDIM
# steps), whole (tiling.mode=never) vs tiled (always; f4 256/32 px, latent 64/48), by
# `python benchmarks/bench_large_images.py --crossover --threads 1` (BENCHMARKS.md row 10c). Whole images at 256,
# 384, 512, 640, 768 px: 2.2, 5.7, 12.4, 25.9, 46.3 s, i.e. time per pixel 1.00, 1.18, 1.44, 1.93, 2.39 (the VQ's
# mid-block attention over all latent tokens), peak memory +69, +224, +389, +542, +733 MB. Tiled: +199 to +256 MB
# at every size; slower up to 512 px (18.6 s: 3x3 overlapping VQ tiles cost more than they save), faster from
# 640 px on (17.8 s vs 25.9 s).
AUTO_ABOVE_PIXELS = 512 * 512


@dataclass(frozen=True)
class Tiling:
    """When and how :class:`Pipeline` tiles (sizes in pixels of the expert they apply to).

    ``mode``: ``auto`` tiles a expert whose input has more than ``auto_above_pixels`` pixels, ``always`` / ``never``
    force it. ``f4_tile``/``f4_overlap`` and ``f8_tile``/``f8_overlap``: the first stages' pixel tiles (multiples
    of the factor, feathered over the overlap). ``latent_tile``/``latent_stride``: MultiDiffusion tiles in latent
    pixels (the tile a multiple of the UNets' downsampling; overlap ``tile - stride``), ``jitter`` DemoFusion's
    random offsets (up to ``(tile - stride) // 4`` per step), ``view_batch_size`` tiles per UNet call.
    """

    mode: str = "auto"
    auto_above_pixels: int = AUTO_ABOVE_PIXELS
    f4_tile: int = 256
    f4_overlap: int = 32
    f8_tile: int = 256
    f8_overlap: int = 64
    latent_tile: int = 64
    latent_stride: int = 48
    jitter: bool = True
    view_batch_size: int = 4

    def __post_init__(self):
        """Every value's type and range (the relations to the models are :meth:`check`'s)."""
        require_choice("tiling.mode", self.mode, TILING_MODES)
        require_int("tiling.auto_above_pixels", self.auto_above_pixels, minimum=0)
        require_int("tiling.view_batch_size", self.view_batch_size, minimum=1)
        if not isinstance(self.jitter, bool):
            raise SettingError(f"tiling.jitter must be true or false, got {self.jitter!r}")
        for name in ("f4", "f8"):
            tile = require_int(f"tiling.{name}_tile", getattr(self, f"{name}_tile"), minimum=1)
            overlap = require_int(f"tiling.{name}_overlap", getattr(self, f"{name}_overlap"), minimum=0)
            if overlap >= tile:
                raise SettingError(f"tiling.{name}_overlap={overlap} must be smaller than tiling.{name}_tile={tile}")
        tile = require_int("tiling.latent_tile", self.latent_tile, minimum=1)
        stride = require_int("tiling.latent_stride", self.latent_stride, minimum=1)
        if stride > tile:
            raise SettingError(f"tiling.latent_stride={stride} must not exceed tiling.latent_tile={tile} (the "
                               "overlap is tile - stride; a larger stride leaves gaps)")

    def check(self, f4_factor: int | None = None, f8_factor: int | None = None,
              latent_multiple: int | None = None) -> "Tiling":
        """The tile sizes against the first stages' factors and the UNets' downsampling (when given). Raises
        :class:`SettingError` naming the setting."""
        for name, factor in (("f4", f4_factor), ("f8", f8_factor)):
            tile, overlap = getattr(self, f"{name}_tile"), getattr(self, f"{name}_overlap")
            if factor is not None and (tile % factor or overlap % factor):
                raise SettingError(f"tiling.{name}_tile={tile} and tiling.{name}_overlap={overlap} must be multiples "
                                   f"of the {name} first stage's downsampling factor {factor}")
        if latent_multiple is not None and self.latent_tile % latent_multiple:
            raise SettingError(f"tiling.latent_tile={self.latent_tile} must be a multiple of the window UNets' "
                               f"downsampling {latent_multiple} (latent pixels)")
        return self

    def applies(self, pixels: int) -> bool:
        """Whether a expert whose input has ``pixels`` pixels runs tiled."""
        return self.mode == "always" or (self.mode == "auto" and pixels > self.auto_above_pixels)

    def latent_tiles(self, seed: int) -> dict:
        """Keyword arguments of :class:`~refiner.inference.tiling.MultiDiffusion` (jitter seeded by ``seed``)."""
        return dict(tile=self.latent_tile, stride=self.latent_stride, jitter=self.jitter, seed=seed,
                    view_batch_size=self.view_batch_size)

    def as_dict(self) -> dict:
        return asdict(self)


def image_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU ``torch.Generator`` per image, seeded with its seed (``seed + i`` for image ``i``): every random draw
    of a whole-image refinement, in the sampler's order (q_sample noise, then one draw per DDIM step if eta > 0)."""
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def image_noise(shape: Sequence[int], seeds: Sequence[int], generators: Sequence[torch.Generator] | None = None
                ) -> Tensor:
    """The ``q_sample`` noise of a batch: the first ``randn(shape)`` of each image's generator
    (:func:`image_generators`), stacked on CPU. Shared by refinement and the artifact probe, so a probe sees exactly
    the noise the refinement of the same image starts from. Pass ``generators`` (made from ``seeds``) to draw from
    them, so that their next draws continue the images' streams."""
    generators = image_generators(seeds) if generators is None else generators
    return randn_like(torch.empty(len(generators), *shape), generators)


def padded_batch(images: Sequence[np.ndarray], multiple: int, pad_mode: str = "reflect",
                 device: str | torch.device = "cpu") -> Tensor:
    """Same-size uint8 images -> one (B, 3, H', W') batch in [-1, 1], padded bottom/right to ``multiple``
    (:class:`~refiner.data.images.PaddedImages`, whole)."""
    return PaddedImages(images, multiple, pad_mode, device).full()


@torch.no_grad()
def decode_to_uint8(vq: nn.Module, z: Tensor, size: tuple[int, int],
                    tiles: tuple[int, int] | None = None) -> list[np.ndarray]:
    """``vq.decode(z)`` cropped to ``size = (H, W)`` as uint8 ``(H, W, 3)`` images (:func:`to_uint8`). With
    ``tiles = (tile, overlap)`` the decode runs on overlapping tiles
    (:func:`~refiner.inference.tiling.tiled_decode_rows`) and each finished band of rows goes into the uint8 output
    at once, so no image-sized float canvas is ever held; the pixels equal ``to_uint8`` of
    :func:`~refiner.inference.tiling.tiled_decode` exactly."""
    h, w = size
    if tiles is None:
        return [to_uint8(crop_to(img, size)) for img in vq.decode(z)]
    out = np.empty((z.shape[0], h, w, 3), dtype=np.uint8)
    for top, rows in tiled_decode_rows(vq, z, *tiles):
        keep = min(rows.shape[-2], h - top)  # rows below h are padding
        for b in range(out.shape[0]):
            if keep > 0:
                out[b, top:top + keep] = to_uint8(rows[b, :, :keep, :w])
    return list(out)


@torch.no_grad()
def vq_round_trip(vq: nn.Module, images: Sequence[np.ndarray], pad_mode: str = "reflect",
                  device: str | torch.device = "cpu", tiles: tuple[int, int] | None = None) -> list[np.ndarray]:
    """Same-size uint8 images through ``vq`` (pad to its factor, encode, quantize, decode, crop back), as uint8:
    the VQ-f8 degradation. ``tiles = (tile, overlap)`` runs it on overlapping pixel tiles
    (:func:`~refiner.inference.tiling.tiled_encode`, :func:`decode_to_uint8`), converting the input and the output
    tile by tile."""
    x = PaddedImages(images, vq.factor, pad_mode, device)
    z = vq.encode(x.full()) if tiles is None else tiled_encode(vq, x, *tiles)
    return decode_to_uint8(vq, z, x.size, tiles)


class Pipeline:
    """pad -> encode (f4) -> scale -> :meth:`Chain.refine` (or :meth:`Chain.refine_progressive` when ``upscale``
    > 1) -> unscale -> decode (f4) -> crop; ``f8`` degrades. ``tiling`` (default :class:`Tiling`, auto) decides
    per image size whether the first stages and the UNets run on tiles (see the module docstring); ``demofusion``
    (default: both paths) which of DemoFusion's paths the progressive phases use."""

    def __init__(self, f4: nn.Module, chain: Chain, f8: nn.Module | None = None, *, pad_mode: str = "reflect",
                 device: str | torch.device = "cpu", tiling: Tiling | None = None, upscale: int = 1,
                 demofusion: DemoFusionPaths | None = None):
        if pad_mode not in PAD_MODES:
            raise ValueError(f"pad_mode must be one of {PAD_MODES}, got {pad_mode!r}")
        if upscale not in UPSCALES or isinstance(upscale, bool):
            raise SettingError(f"upscale must be one of {UPSCALES}, got {upscale!r}")
        self.f4, self.chain, self.f8 = f4, chain, f8
        self.pad_mode = pad_mode
        self.device = torch.device(device)
        self.tiling = (tiling or Tiling()).check(int(f4.factor), int(f8.factor) if f8 is not None else None,
                                                 chain.multiple)
        self.upscale = upscale
        self.demofusion = demofusion or DemoFusionPaths()
        self._min_blocks: int | None = None

    @property
    def multiple(self) -> int:
        """Image sides are padded to this: the f4 factor times the chain's UNet downsampling."""
        return int(self.f4.factor) * self.chain.multiple

    @property
    def min_blocks(self) -> int:
        """How many ``multiple x multiple`` blocks a padded image needs so that every group norm of the f4 and the
        experts sees more than one value per group (:func:`refiner.inference.min_size.minimum_blocks`; measured
        once, on first use)."""
        if self._min_blocks is None:
            self._min_blocks = minimum_blocks(self.f4, self.chain.experts, self.multiple, self.chain.scale_factor,
                                              self.device)
        return self._min_blocks

    def padded_size(self, height: int, width: int) -> tuple[int, int]:
        """The size an image of ``height x width`` is refined at: rounded up to :attr:`multiple`, then grown to
        :attr:`min_blocks` blocks when it is smaller (:func:`refiner.inference.min_size.padded_blocks`)."""
        m = self.multiple
        blocks = (-(-height // m), -(-width // m))
        if blocks[0] * blocks[1] < PROBE_BLOCKS:  # larger images take every norm (the probe's own size is 4 blocks)
            blocks = padded_blocks(blocks, self.min_blocks)
        return blocks[0] * m, blocks[1] * m

    def pad(self, images: Sequence[np.ndarray]) -> PaddedImages:
        """Same-size images padded to :meth:`padded_size` (``pad_mode``), as :class:`PaddedImages`."""
        h, w = images[0].shape[:2]
        return PaddedImages(images, self.multiple, self.pad_mode, self.device, min_size=self.padded_size(h, w))

    def tiled(self, height: int, width: int) -> bool:
        """Whether an image of this (padded) size is encoded and refined on tiles."""
        return self.tiling.applies(height * width)

    def degrade(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """VQ-f8 round trip (:func:`vq_round_trip`), stored as uint8 like a saved artifact image; on tiles above
        the tiling threshold."""
        if self.f8 is None:
            raise ValueError("degrade needs the VQ-f8 first stage (Pipeline(..., f8=...))")
        f, (h, w) = int(self.f8.factor), images[0].shape[:2]
        tiles = (self.tiling.f8_tile, self.tiling.f8_overlap) if self.tiled(-(-h // f) * f, -(-w // f) * f) else None
        return vq_round_trip(self.f8, images, self.pad_mode, self.device, tiles)

    def encode(self, x: Tensor | PaddedImages) -> Tensor:
        """``f4.encode`` of padded images (a float batch or :class:`~refiner.data.images.PaddedImages`, which tiles
        convert one at a time), on tiles above the threshold."""
        if self.tiled(*x.shape[-2:]):
            return tiled_encode(self.f4, x, self.tiling.f4_tile, self.tiling.f4_overlap)
        return self.f4.encode(x if isinstance(x, Tensor) else x.full())

    def _f4_tiles(self, z: Tensor) -> tuple[int, int] | None:
        """The f4 decode's ``(tile, overlap)`` for latents ``z``, None when the decoded image is not tiled."""
        f = int(self.f4.factor)
        return (self.tiling.f4_tile, self.tiling.f4_overlap) if self.tiled(z.shape[-2] * f, z.shape[-1] * f) else None

    def decode(self, z: Tensor) -> Tensor:
        """``f4.decode`` of latents (quantized first), on tiles when the decoded image is above the threshold."""
        tiles = self._f4_tiles(z)
        return self.f4.decode(z) if tiles is None else tiled_decode(self.f4, z, *tiles)

    def decode_images(self, z: Tensor, size: tuple[int, int]) -> list[np.ndarray]:
        """:meth:`decode` cropped to ``size`` as uint8 images; on tiles, streamed band by band into the uint8
        output (:func:`decode_to_uint8`: the same pixels without an image-sized float canvas)."""
        return decode_to_uint8(self.f4, z, size, self._f4_tiles(z))

    @torch.no_grad()
    def refine_images(self, images: Sequence[np.ndarray], t_start: int, steps: int, *, seed: int = 0,
                      indices: Sequence[int] | None = None, eta: float = 0.0, spacing: str = "uniform",
                      allow_outside_window: bool = False, with_stages: bool = False, starts: Tensor | None = None,
                      callback: Callback | None = None) -> tuple[list[np.ndarray], list[list[Tensor]]]:
        """Refine same-size uint8 ``(H, W, 3)`` images. ``indices`` (default ``0..n-1``) are the images' positions
        in the caller's whole input list; image ``i``'s noise is seeded with ``seed + i``. Returns the refined
        uint8 images (``upscale`` times larger) and, per image, the decoded x0 prediction after each expert in run
        order (cropped, in [-1, 1], on CPU) when ``with_stages`` (not for ``upscale`` > 1: empty lists), else empty
        lists. Raises ``FloatingPointError`` if the refined latent is not finite.

        ``starts`` ((B, H, W) ints <= ``t_start``) gives every pixel its own start t (Differential Diffusion,
        :class:`~refiner.artifacts.correct.StrengthPinning`): a latent pixel takes the largest start of the pixels it
        covers and stays pinned to the re-noised input until the grid reaches it. Not with tiles or ``upscale``.

        ``callback`` is a sampler step callback (:data:`refiner.sampling.Callback`, e.g.
        :class:`~refiner.artifacts.correct.TrajectoryCorrection`) on the padded, scaled latents of the whole batch;
        it runs before the pinning of ``starts``. Not with tiles or ``upscale`` either."""
        indices = list(range(len(images))) if indices is None else [int(i) for i in indices]
        if len(indices) != len(images):
            raise ValueError(f"{len(images)} images but {len(indices)} indices")
        h, w = images[0].shape[:2]
        size = (h * self.upscale, w * self.upscale)
        shape = self.padded_size(h, w)
        sampler = dict(t_start=t_start, steps=steps, eta=eta, spacing=spacing, allow_outside_window=allow_outside_window)
        if (starts is not None or callback is not None) and (self.upscale > 1 or self.tiled(*shape)):
            raise SettingError("per-pixel starts and step callbacks (strength maps, t_start=auto, TTC) need whole "
                               "images: set upscale=1 and tiling.mode=never, or refine images below the tiling "
                               "threshold")
        if self.upscale == 1 and not self.tiled(*shape):
            parts = [self._refine_batch(self.pad(images).full(), indices, seed, sampler, with_stages, size, starts,
                                        callback)]
        else:  # one image at a time: memory is bounded by the tiles, and every draw comes from seed + i
            parts = [self._refine_one(self.pad([img]), seed + i, sampler, with_stages, size)
                     for img, i in zip(images, indices)]
        refined = [img for out, _ in parts for img in out]
        expert_images = [[crop_to(x0[b], size).clamp(-1, 1).cpu() for x0 in expert_x0]
                        for out, expert_x0 in parts for b in range(len(out))]
        return refined, expert_images

    def _finish(self, latent: Tensor, expert_x0: Sequence[Tensor],
                size: tuple[int, int]) -> tuple[list[np.ndarray], list[Tensor]]:
        """The refined uint8 images (cropped to ``size``) and the decoded expert x0s (padded, float)."""
        if not torch.isfinite(latent).all():
            raise FloatingPointError("the refined latent has NaN/inf values (the denoiser diverged)")
        scale = self.chain.scale_factor
        return self.decode_images(latent / scale, size), [self.decode(x0 / scale) for x0 in expert_x0]

    def _refine_batch(self, x: Tensor, indices: list[int], seed: int, sampler: dict, with_stages: bool,
                      size: tuple[int, int], starts: Tensor | None = None, callback: Callback | None = None):
        """Whole images, one batch: every draw of image ``i`` from its generator ``seed + i`` (q_sample noise, then
        the eta > 0 step noise); ``callback`` then the pinning of ``starts`` run after every step (see
        refine_images)."""
        z = self.f4.encode(x) * self.chain.scale_factor
        seeds = [seed + i for i in indices]
        generator = image_generators(seeds)
        noise = image_noise(z.shape[1:], seeds, generator).to(z)
        if starts is not None:

            callback = chain_callbacks([callback, self._pinning(z, noise, starts, sampler)])
        result = self.chain.refine(z, noise=noise, generator=generator, return_expert_outputs=with_stages,
                                   callback=callback, **sampler)
        return self._finish(result.latent, result.expert_x0, size)

    def _pinning(self, z: Tensor, noise: Tensor, starts: Tensor, sampler: dict):

        starts = torch.as_tensor(starts)
        if starts.ndim != 3 or starts.shape[0] != z.shape[0]:
            raise ValueError(f"starts must be (B, H, W) with B={z.shape[0]}, got {tuple(starts.shape)}")
        latent = self.latent_map(starts).round().long()
        if latent.shape[-2:] != z.shape[-2:]:
            raise ValueError(f"starts of size {tuple(starts.shape[-2:])} do not fit the images")
        plan = self.chain.plan(sampler["t_start"], sampler["steps"], spacing=sampler["spacing"], eta=sampler["eta"],
                               allow_outside_window=sampler["allow_outside_window"])
        return StrengthPinning(z, noise, latent.to(z.device), plan.timesteps, self.chain.alphas_cumprod)

    def latent_map(self, pixel_map: Tensor) -> Tensor:
        """A per-pixel map (B, H, W) of the unpadded images -> (B, h, w) float on the padded latent grid: padded
        like the images (replicating the edge) and max-pooled over each latent pixel's f4 block."""
        f = int(self.f4.factor)
        pixel_map = torch.as_tensor(pixel_map)[:, None].float()
        padded = pad_to_multiple(pixel_map, self.multiple, mode="replicate",
                                 min_size=self.padded_size(*pixel_map.shape[-2:]))[0]
        return torch.nn.functional.max_pool2d(padded, f, f)[:, 0]

    def _refine_one(self, x: PaddedImages, noise_seed: int, sampler: dict, with_stages: bool, size: tuple[int, int]):
        """One image on tiles (above the threshold) or progressively upscaled; every draw from ``noise_seed``."""
        z = self.encode(x) * self.chain.scale_factor
        if self.upscale > 1:
            generator = torch.Generator(device=z.device).manual_seed(noise_seed)
            tiles = self.tiling.latent_tiles(noise_seed)
            if not self.tiling.applies(x.shape[-2] * x.shape[-1] * self.upscale**2):
                side = max(z.shape[-2:]) * self.upscale  # one tile covering the largest phase: not tiled
                tiles.update(tile=side, stride=side, jitter=False)
            latent = self.chain.refine_progressive(z, upscale=self.upscale, generator=generator,
                                                   **{**sampler, **tiles, **self.demofusion.kwargs()})
            return self._finish(latent, [], size)
        generator = image_generators([noise_seed])  # as in _refine_batch: q_sample noise, then the step noise
        noise = image_noise(z.shape[1:], [noise_seed], generator).to(z)
        tiles = self.tiling.latent_tiles(noise_seed) if self.tiled(*x.shape[-2:]) else None
        result = self.chain.refine(z, noise=noise, generator=generator, return_expert_outputs=with_stages,
                                   tiles=tiles, **sampler)
        return self._finish(result.latent, result.expert_x0, size)
