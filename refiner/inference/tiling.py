"""Images of any size: tiled VQ encode/decode with feathered blending, and MultiDiffusion latent tiles.

Both halves share one rule for placing tiles and one blending rule.

* **Tile placement** (DemoFusion ``get_views``, PRIS-CV/DemoFusion ``pipeline_demofusion_sdxl.py``):
  along a side of length ``n`` with tile ``k`` and stride ``s``, ``n <= k`` gives one tile spanning
  the side; otherwise ``ceil((n - k) / s) + 1`` tiles start at ``i*s``, the last one moved back to
  end exactly at ``n``. So every pixel is covered and neighbours overlap by at least ``k - s``.
  (MultiDiffusion's ``panorama.py`` uses ``floor((n - k)/s) + 1`` and can leave a strip uncovered
  at the far edge; DemoFusion's variant does not.)
* **Blending**: every tile output is multiplied by a weight map and the weighted outputs are
  divided by the summed weights, per pixel. ``"uniform"`` weights (all ones) are MultiDiffusion's
  and DemoFusion's ``value / count``. ``"linear"`` and ``"cosine"`` (raised cosine) feather a tile's
  inner sides over ``ramp`` pixels with ``w(u) = u`` or ``(1 - cos(pi u)) / 2`` at
  ``u = (i + 1/2) / ramp``; sides that lie on (or beyond) the image border are not feathered. Two
  neighbours that overlap by exactly ``ramp`` pixels then sum to one (a partition of unity), and no
  weight is ever zero, so the division is always defined.

**Tiled VQ** (:func:`tiled_encode`, :func:`tiled_decode`): works for any first stage with
``.factor`` (f4, f8), ``.encode`` and ``.decode``. Sizes are in image pixels. Memory is bounded by one
tile's activations. Tiles run one row at a time, and the blend holds only a band of about one tile's height
(:func:`_tiled_rows`): :func:`tiled_decode_rows` hands each finished band to the caller, which
:func:`refiner.inference.pipeline.decode_to_uint8` stores as uint8 at once, and :func:`tiled_encode` reads its
tiles from a :class:`~refiner.data.images.PaddedImages` (uint8, converted tile by tile), so neither needs an
image-sized float buffer (:func:`tiled_decode` still returns the whole float image). The
encoder/decoder are not local operators: 3x3 convolutions give a receptive field of dozens of
pixels, and GroupNorm statistics and the mid-block self-attention span the whole input, so a tile
sees different statistics than the whole image. Hence a tiled result differs from the whole one even
away from the seams; the feathered overlap hides the seams themselves (``seam_ratio`` about 1).
What that costs a user, measured against the clean image (``scripts/f4_round_trip.py CKPT --mosaic 512 1024``:
the trained demo f4, mosaics of 64 px procedural heads of seeds 7 and 9, refine.py's 256 px tiles overlapping by
32): tiled and whole round trips have the same PSNR to the clean mosaic within 0.05 dB (21.9-22.3 dB) and the
composition checker passes as many cells (tiled 92.2 / 96.9 / 96.1 / 95.3% against whole 92.2 / 95.3 / 95.3 /
95.3%); the two differ from each other at 32-36 dB PSNR. Normalising the tiles with the whole image's GroupNorm
statistics, the upper bound of a GroupNorm sync across tiles (the Tiled VAE of
pkuliyi2015/multidiffusion-upscaler-for-automatic1111 pools them over all tiles, which needs every tile's
activations at once or a second pass), brings tiled to 42-48 dB of whole (its pass counts become exactly
whole's), but it moves the PSNR to clean by at most 0.1 dB and passes no more cells than plain tiles: there is
nothing for a sync to recover on this f4's domain, so none is implemented. Both lose more to the mosaic itself
than to tiling: each head round-tripped alone reaches 22.4-22.7 dB and 98.4%. With *random* weights, or on
photos this f4 cannot represent (a bicubic photo: 11 dB whole), the tiled-vs-whole difference is far larger
(``benchmarks/bench_large_images.py`` row 10b, with ``--vq-ckpt`` for a trained f4); the tests bound it.

**MultiDiffusion** (:class:`MultiDiffusion`; Bar-Tal et al. 2023, "MultiDiffusion: Fusing Diffusion
Paths", arXiv 2302.08113, sec. 3): each step, the per-pixel least-squares fusion of the tiles'
denoising steps (their FTD objective; its closed form, eq. 5, is the weighted per-pixel average
of the overlapping tiles' steps). For a fixed ``x_t`` (and fixed noise), a DDIM/DDPM step is affine in the model output with
coefficients that do not depend on the tile, and the normalised weights sum to one at every pixel,
so *averaging the model outputs and then stepping* equals *stepping every tile and averaging the
results*. The wrapper therefore averages outputs: it is a plain ``model(x_t, t)``, so
:mod:`refiner.sampling` stays pure and staged :func:`~refiner.experts.refine` runs unchanged with
each Expert's model wrapped. (With ``eta > 0`` this equals averaging per-tile steps that share one
noise tensor.)
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace
from typing import Callable, Iterator, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from refiner.sampling import Model

Weighting = Literal["uniform", "linear", "cosine"]
WEIGHTINGS = ("uniform", "linear", "cosine")
PAD_MODES = ("constant", "reflect", "replicate")


# ------------------------------------------------------------------------------------ placement
def tile_starts(size: int, tile: int, stride: int) -> list[int]:
    """Start offsets of tiles of length ``tile`` every ``stride`` along a side of length ``size``.

    DemoFusion ``get_views``: one tile if ``size <= tile``, else ``ceil((size - tile)/stride) + 1``
    tiles at ``i*stride``, the last one shifted back so that it ends at ``size``.
    """
    if size < 1 or tile < 1 or stride < 1:
        raise ValueError(f"tile_starts needs size, tile and stride >= 1, got size={size}, tile={tile}, stride={stride}")
    if stride > tile:
        raise ValueError(f"stride {stride} larger than the tile {tile} would leave gaps between tiles")
    if size <= tile:
        return [0]
    count = -(-(size - tile) // stride) + 1
    return [min(i * stride, size - tile) for i in range(count)]


def ramp_weights(length: int, ramp: int, weighting: Weighting, rise: bool = True, fall: bool = True) -> Tensor:
    """1D blending weights (float64) of a tile side of ``length`` pixels.

    ``rise``/``fall``: feather the start/end of the side over ``ramp`` pixels (``False`` on an image
    border). ``"uniform"`` or ``ramp == 0`` give all ones. See the module docstring for the ramps.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; expected one of {WEIGHTINGS}")
    w = torch.ones(length, dtype=torch.float64)
    ramp = min(ramp, length)
    if weighting == "uniform" or ramp <= 0:
        return w
    u = (torch.arange(ramp, dtype=torch.float64) + 0.5) / ramp
    r = u if weighting == "linear" else 0.5 * (1 - torch.cos(math.pi * u))
    if rise:
        w[:ramp] *= r
    if fall:
        w[length - ramp:] *= r.flip(0)
    return w


@dataclass(frozen=True)
class View:
    """A tile ``[top, top+height) x [left, left+width)`` in the coordinates of the (padded) tensor."""

    top: int
    left: int
    height: int
    width: int

    @property
    def rows(self) -> slice:
        return slice(self.top, self.top + self.height)

    @property
    def cols(self) -> slice:
        return slice(self.left, self.left + self.width)

    def scaled(self, num: int, den: int) -> "View":
        return View(self.top * num // den, self.left * num // den, self.height * num // den, self.width * num // den)


def grid_views(height: int, width: int, tile: int, stride: int) -> list[View]:
    """Row-major tiles covering ``height x width`` (:func:`tile_starts` on both sides)."""
    th, tw = min(tile, height), min(tile, width)
    return [View(top, left, th, tw) for top in tile_starts(height, tile, stride)
            for left in tile_starts(width, tile, stride)]


def view_weight(view: View, height: int, width: int, ramp: int, weighting: Weighting, offset: int = 0) -> Tensor:
    """2D weight map (float64, ``view.height x view.width``) of ``view`` inside an image of
    ``height x width`` that sits at ``offset`` in the tensor's coordinates (padding). Sides on or
    beyond the image border are not feathered."""
    top, left = view.top - offset, view.left - offset
    wh = ramp_weights(view.height, ramp, weighting, rise=top > 0, fall=top + view.height < height)
    ww = ramp_weights(view.width, ramp, weighting, rise=left > 0, fall=left + view.width < width)
    return wh[:, None] * ww[None, :]


class _Canvas:
    """Accumulates weighted tile outputs and their weights; :meth:`result` divides per pixel. MultiDiffusion's
    latent-sized canvas (the tiled VQ blends in row bands instead, :func:`_tiled_rows`).

    The weight canvas is one channel in ``dtype`` (the input's), so beside the output itself the
    blending costs one latent-sized plane."""

    def __init__(self, batch: int, height: int, width: int, dtype: torch.dtype, device: torch.device):
        self.shape = (batch, height, width)
        self.value: Tensor | None = None
        self.weight = torch.zeros(height, width, dtype=dtype, device=device)

    def add(self, view: View, out: Tensor, weight: Tensor, rows: slice | int = slice(None)) -> None:
        if self.value is None:
            b, h, w = self.shape
            self.value = out.new_zeros(b, out.shape[-3], h, w)
        self.value[rows, :, view.rows, view.cols] += out * weight.to(out)

    def add_weight(self, view: View, weight: Tensor) -> None:
        self.weight[view.rows, view.cols] += weight.to(self.weight)

    def result(self, crop: tuple[slice, slice] = (slice(None), slice(None))) -> Tensor:
        weight = self.weight[crop]
        if not bool((weight > 0).all()):
            raise AssertionError("tiles left pixels uncovered")  # internal invariant of the placement
        # in place (no second image-sized copy); contiguous copies only a cropped (padded) latent
        return self.value[..., crop[0], crop[1]].div_(weight.to(self.value)).contiguous()


# ------------------------------------------------------------------------------------ tiled VQ
def _check_vq_tiles(factor: int, tile: int, overlap: int, what: str) -> None:
    for name, value in (("tile", tile), ("overlap", overlap)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{what}: {name} must be an int (pixels), got {value!r}")
    if tile < factor or tile % factor:
        raise ValueError(f"{what}: tile={tile} px must be a positive multiple of the first-stage factor {factor}")
    if overlap < 0 or overlap % factor:
        raise ValueError(f"{what}: overlap={overlap} px must be >= 0 and a multiple of the first-stage factor {factor}")
    if overlap >= tile:
        raise ValueError(f"{what}: overlap={overlap} px must be smaller than the tile ({tile} px)")


@torch.no_grad()
def _tiled_rows(fn: Callable[[Tensor], Tensor], read: Callable[[View], Tensor], batch: int, height: int, width: int,
                tile: int, stride: int, ramp: int, num: int, den: int, weighting: Weighting
                ) -> Iterator[tuple[int, Tensor]]:
    """Blend ``fn`` over overlapping tiles of an ``height x width`` input (``read(view)`` gives a tile), one row of
    tiles at a time. ``fn`` maps an ``h x w`` tile to ``h*num/den x w*num/den``; ``tile``/``stride`` are in input
    pixels, ``ramp`` in output pixels.

    Yields ``(top, rows)``: output rows ``[top, top + rows.shape[-2])`` (B, C, r, W_out), top to bottom, as soon as
    no later tile touches them, so only a band of about one tile's height is ever held (the blending's memory does
    not grow with the image's height). Each output pixel accumulates its tiles in the same (row-major) order and is
    divided by the same summed weight as with one image-sized canvas, so the rows are bit-identical to it."""
    out_h, out_w = height * num // den, width * num // den
    tops, lefts = tile_starts(height, tile, stride), tile_starts(width, tile, stride)
    th, tw = min(tile, height), min(tile, width)
    band_top, value, weight = 0, None, None  # value/weight hold output rows [band_top, band_top + value rows)
    for r, top in enumerate(tops):
        bottom = (top + th) * num // den
        for left in lefts:
            view = View(top, left, th, tw)
            out_view = view.scaled(num, den)
            out = fn(read(view))
            if out.shape[-2:] != (out_view.height, out_view.width):
                raise ValueError(f"tile {(view.height, view.width)} -> {tuple(out.shape[-2:])}: expected the output "
                                 f"to be {num}/{den} of the input size")
            if value is None:
                value = out.new_zeros(batch, out.shape[-3], bottom - band_top, out_w)
                weight = torch.zeros(bottom - band_top, out_w, dtype=out.dtype, device=out.device)
            elif value.shape[-2] < bottom - band_top:  # the band grows to this row's bottom
                grow = bottom - band_top - value.shape[-2]
                value = torch.cat([value, value.new_zeros(*value.shape[:-2], grow, out_w)], dim=-2)
                weight = torch.cat([weight, weight.new_zeros(grow, out_w)])
            w = view_weight(out_view, out_h, out_w, ramp, weighting)
            rows = slice(out_view.top - band_top, out_view.top - band_top + out_view.height)
            value[..., rows, out_view.cols] += out * w.to(out)
            weight[rows, out_view.cols] += w.to(weight)
        done = (tops[r + 1] * num // den if r + 1 < len(tops) else out_h) - band_top  # rows no later tile touches
        if not bool((weight[:done] > 0).all()):
            raise AssertionError("tiles left pixels uncovered")  # internal invariant of the placement
        yield band_top, value[..., :done, :].div_(weight[:done])
        band_top, value, weight = band_top + done, value[..., done:, :], weight[done:]


def _tile_reader(x) -> Callable[[View], Tensor]:
    if isinstance(x, Tensor):
        return lambda view: x[..., view.rows, view.cols]
    return lambda view: x.crop(view.rows, view.cols)  # e.g. refiner.data.images.PaddedImages


def _collect(rows: Iterator[tuple[int, Tensor]], height: int) -> Tensor:
    """The ``height`` output rows of :func:`_tiled_rows` as one tensor (one tile: that tile's output itself)."""
    out = None
    for top, block in rows:
        if top == 0 and block.shape[-2] == height:
            return block
        if out is None:
            out = block.new_empty(*block.shape[:-2], height, block.shape[-1])
        out[..., top:top + block.shape[-2], :] = block
    return out


def _check_images(vq, x, what: str) -> None:
    if len(x.shape) != 4 or x.shape[-1] % vq.factor or x.shape[-2] % vq.factor:
        raise ValueError(f"{what}: expected images (B, C, H, W) with H, W multiples of the first-stage factor "
                         f"{vq.factor}, got shape {tuple(x.shape)}; pad first (refiner.data.images.pad_to_multiple)")


@torch.no_grad()
def tiled_encode(vq, x, tile: int = 256, overlap: int = 64, weighting: Weighting = "cosine") -> Tensor:
    """``vq.encode`` over overlapping ``tile x tile`` pixel tiles of ``x`` (B, 3, H, W), blended in latent space.

    Returns the pre-quantization latent (B, C, H/f, W/f) like ``vq.encode``. Tiles step by
    ``tile - overlap`` pixels and are feathered over ``overlap / f`` latent pixels. An image that
    fits one tile is encoded whole (bit-identical to ``vq.encode``). ``H`` and ``W`` must be
    multiples of ``f``; ``tile`` and ``overlap`` too, with ``0 <= overlap < tile``. ``x`` is a tensor
    or a :class:`~refiner.data.images.PaddedImages` (uint8 pixels converted tile by tile: the same
    latent without an image-sized float batch).
    """
    f = vq.factor
    _check_vq_tiles(f, tile, overlap, "tiled_encode")
    _check_images(vq, x, "tiled_encode")
    height, width = x.shape[-2:]
    if height <= tile and width <= tile:  # one tile: encode whole, without the blending's division by one
        return vq.encode(_tile_reader(x)(View(0, 0, height, width)))
    return _collect(_tiled_rows(vq.encode, _tile_reader(x), x.shape[0], height, width, tile, tile - overlap,
                                overlap // f, 1, f, weighting), height // f)


def tiled_decode_rows(vq, z: Tensor, tile: int = 256, overlap: int = 64, weighting: Weighting = "cosine"
                      ) -> Iterator[tuple[int, Tensor]]:
    """:func:`tiled_decode` streamed: yields ``(top, rows)``, the decoded image rows ``[top, top + r)``
    (B, 3, r, W), top to bottom, as soon as no later tile touches them. The rows are bit-identical to the
    corresponding rows of :func:`tiled_decode`; only about one tile's height of float rows is held at a time,
    so a caller that stores each block as uint8 (:meth:`refiner.inference.pipeline.Pipeline.decode_images`)
    never holds the image-sized float canvas."""
    f = vq.factor
    _check_vq_tiles(f, tile, overlap, "tiled_decode")
    if z.ndim != 4:
        raise ValueError(f"tiled_decode: expected latents (B, C, h, w), got shape {tuple(z.shape)}")
    height, width = z.shape[-2:]
    if height * f <= tile and width * f <= tile:
        with torch.no_grad():
            return iter([(0, vq.decode(z))])
    return _tiled_rows(vq.decode, _tile_reader(z), z.shape[0], height, width, tile // f, (tile - overlap) // f,
                       overlap, f, 1, weighting)


@torch.no_grad()
def tiled_decode(vq, z: Tensor, tile: int = 256, overlap: int = 64, weighting: Weighting = "cosine") -> Tensor:
    """``vq.decode`` (which quantizes first) over overlapping latent tiles of ``z``, blended in pixel space.

    ``tile``/``overlap`` are in *image* pixels (multiples of ``f``): latent tiles are ``tile / f``
    wide and step by ``(tile - overlap) / f``; pixel tiles are feathered over ``overlap`` pixels.
    Quantization is per latent vector, so quantizing tile by tile equals quantizing the whole latent,
    without the (pixels x codebook) distance matrix of a large image. A latent that fits one tile is
    decoded whole (bit-identical to ``vq.decode``). :func:`tiled_decode_rows` streams the same rows.
    """
    return _collect(tiled_decode_rows(vq, z, tile, overlap, weighting), z.shape[-2] * vq.factor)


# ------------------------------------------------------------------------------ MultiDiffusion
@dataclass(frozen=True)
class TilePlan:
    """Where one MultiDiffusion evaluation puts its tiles: ``views`` in the coordinates of the input
    padded by ``pad`` pixels on every side (``pad > 0`` only with jitter)."""

    pad: int
    views: list[View]


class MultiDiffusion:
    """Wrap ``model(x_t, t) -> output`` (eps, x0 or v) to run on overlapping latent tiles and average.

    Args:
        model: the denoiser, called on batches of tiles with their rows' timesteps.
        tile: tile side in latent pixels (a side shorter than ``tile`` gets one tile spanning it).
            It must suit the model (e.g. a multiple of the UNet's downsampling).
        stride: step between tiles; ``tile - stride`` is the overlap. Default ``tile // 2``, as
            DemoFusion's 128/64 (MultiDiffusion's panorama uses 64/8).
        jitter: DemoFusion's random tile offsets, redrawn every evaluation: with
            ``J = (tile - stride) // 4`` the input is padded by ``J`` (``pad_mode``; DemoFusion pads
            with zeros) and every tile moves by a random integer in ``[-J, J]`` per axis; tiles on the
            first/last row or column only move outward (``[-J, 0]`` / ``[0, J]``), so the image stays
            covered. Offsets are drawn from ``random.Random(f"{seed}:{t}")``, ``t`` the first
            timestep of the batch: deterministic for a seed and different at every step.
        seed: jitter seed.
        view_batch_size: tiles per model call (DemoFusion's ``view_batch_size``, default 16). A call
            holds at most this many tile rows, whatever the input batch.
        weighting: ``"uniform"`` (MultiDiffusion/DemoFusion), or ``"linear"``/``"cosine"`` feathering
            over the overlap ``tile - stride`` (see the module docstring).
        pad_mode: how the jitter padding is filled (``F.pad`` mode).
        context: optional per-pixel conditioning (B, C', H, W) aligned with ``x_t``, e.g. the degraded
            latent of a ``conditioning: concat`` window. It is cropped (and padded) exactly like
            ``x_t`` and the model is called as ``model(x_tile, t, context_tile)``.

    The output at every pixel is ``sum_i w_i out_i / sum_i w_i`` over the tiles covering it
    (MultiDiffusion's closed-form fusion). One tile covering the input, no jitter and uniform
    weights give exactly ``model(x_t, t)``.
    """

    def __init__(self, model: Model, tile: int, stride: int | None = None, jitter: bool = False, seed: int = 0,
                 view_batch_size: int = 16, weighting: Weighting = "uniform", pad_mode: str = "constant",
                 context: Tensor | None = None):
        if not callable(model):
            raise TypeError(f"MultiDiffusion: model must be callable model(x_t, t), got {type(model).__name__}")
        stride = tile // 2 if stride is None else stride
        for name, value in (("tile", tile), ("stride", stride), ("view_batch_size", view_batch_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"MultiDiffusion: {name} must be a positive int, got {value!r}")
        if stride > tile:
            raise ValueError(f"MultiDiffusion: stride={stride} must not exceed tile={tile} (tiles would leave gaps); "
                             f"the overlap is tile - stride")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"MultiDiffusion: unknown weighting {weighting!r}; expected one of {WEIGHTINGS}")
        if pad_mode not in PAD_MODES:
            raise ValueError(f"MultiDiffusion: unknown pad_mode {pad_mode!r}; expected one of {PAD_MODES}")
        self.model, self.tile, self.stride, self.jitter, self.seed = model, tile, stride, jitter, seed
        self.view_batch_size, self.weighting, self.pad_mode = view_batch_size, weighting, pad_mode
        self.context = context

    @property
    def overlap(self) -> int:
        return self.tile - self.stride

    @property
    def jitter_range(self) -> int:
        """DemoFusion's ``(window_size - stride) // 4``; 0 without jitter."""
        return self.overlap // 4 if self.jitter else 0

    def plan(self, height: int, width: int, t: int = 0) -> TilePlan:
        """The tiles of one evaluation at timestep ``t`` for a ``height x width`` input."""
        pad = self.jitter_range
        views = grid_views(height, width, self.tile, self.stride)
        if not pad:
            return TilePlan(0, views)
        rng = random.Random(f"{self.seed}:{int(t)}")

        def shift(start: int, length: int, size: int) -> int:
            first, last = start == 0, start + length == size
            if first and last:
                return 0
            return rng.randint(-pad if not last else 0, pad if not first else 0)

        jittered = []
        for v in views:
            dh = shift(v.top, v.height, height)
            dw = shift(v.left, v.width, width)
            jittered.append(View(v.top + dh + pad, v.left + dw + pad, v.height, v.width))
        return TilePlan(pad, jittered)

    def weights(self, plan: TilePlan, height: int, width: int) -> list[Tensor]:
        """One float64 weight map per view of ``plan`` (see ``weighting``)."""
        return [view_weight(v, height, width, self.overlap, self.weighting, offset=plan.pad) for v in plan.views]

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        if x.ndim != 4:
            raise ValueError(f"MultiDiffusion expects latents (B, C, H, W), got shape {tuple(x.shape)}")
        batch, _, height, width = x.shape
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(batch) if t.ndim == 0 else t
        plan = self.plan(height, width, int(t[0]))
        pad = plan.pad
        xp = F.pad(x, (pad, pad, pad, pad), mode=self.pad_mode) if pad else x
        cp = None
        if self.context is not None:
            c = self.context
            if c.ndim != 4 or c.shape[0] != batch or c.shape[-2:] != x.shape[-2:]:
                raise ValueError(f"MultiDiffusion: context of shape {tuple(c.shape)} does not match x_t of shape "
                                 f"{tuple(x.shape)} (need the same batch and spatial size)")
            cp = F.pad(c, (pad, pad, pad, pad), mode=self.pad_mode) if pad else c
        weights = self.weights(plan, height, width)
        canvas = _Canvas(batch, height + 2 * pad, width + 2 * pad, x.dtype, x.device)
        for view, weight in zip(plan.views, weights):
            canvas.add_weight(view, weight)
        rows = [(k, b) for k in range(len(plan.views)) for b in range(batch)]
        for start in range(0, len(rows), self.view_batch_size):
            chunk = rows[start:start + self.view_batch_size]
            crops = torch.stack([xp[b, :, plan.views[k].rows, plan.views[k].cols] for k, b in chunk])
            t_rows = t[[b for _, b in chunk]]
            if cp is None:
                out = self.model(crops, t_rows)
            else:
                out = self.model(crops, t_rows, torch.stack([cp[b, :, plan.views[k].rows, plan.views[k].cols]
                                                             for k, b in chunk]))
            for (k, b), o in zip(chunk, out):
                canvas.add(plan.views[k], o, weights[k], rows=b)
        return canvas.result((slice(pad, pad + height), slice(pad, pad + width)))


def seam_ratio(img: Tensor, borders: Sequence[int], period: int) -> float:
    """Seam detector: mean ``|x[c] - x[c-1]|`` across the boundaries ``c`` in ``borders`` (columns,
    and the same for rows) divided by the mean across the boundaries ``period`` pixels to either side;
    the larger of the column and row ratios. About 1 without a seam, well above 1 with one.

    Compared locally and at the same phase modulo ``period`` (use the first-stage factor) because a
    decoded image is not homogeneous: decoders upsample, so the gradient has the factor's period, and
    zero padding makes the outer few dozen pixels busier than the inside. ``borders`` must lie at
    least ``period + 1`` pixels inside the image.
    """
    at = torch.tensor([int(b) - 1 for b in borders])
    size = min(img.shape[-2:])
    if not len(borders) or at.min() < period or at.max() + period >= size - 1:
        raise ValueError(f"seam_ratio: borders {list(borders)} must lie in [{period + 1}, {size - period - 1}]")
    ratios = []
    for diff in (img.diff(dim=-1).abs().mean(dim=(0, 1, 2)), img.diff(dim=-2).abs().mean(dim=(0, 1, 3))):
        ratios.append(float(diff[at].mean() / ((diff[at - period] + diff[at + period]) / 2).mean()))
    return max(ratios)


def tile_borders(size: int, tile: int, stride: int) -> list[int]:
    """Every start and end of a tile strictly inside ``[0, size]`` (where a seam could show)."""
    return sorted({b for s in tile_starts(size, tile, stride) for b in (s, s + min(tile, size)) if 0 < b < size})


def tile_experts(experts: Sequence, tile: int, **kwargs) -> list:
    """The same :class:`~refiner.experts.Expert` chain with every model wrapped in :class:`MultiDiffusion`
    (``kwargs`` as there; each expert gets the same settings)."""
    return [replace(s, model=MultiDiffusion(s.model, tile, **kwargs)) for s in experts]
