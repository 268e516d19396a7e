"""Large images: tiled VQ, MultiDiffusion latent tiles and DemoFusion-style progressive upscaling.

References are independent of the code under test: a purely local fake first stage (tiling must be
exact), the analytic Gaussian denoiser (pointwise, so tiling must not change it), per-tile DDIM
steps averaged by hand (MultiDiffusion's fusion of steps), and a direct per-view DemoFusion loop.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gaussian import GaussianDenoiser

from refiner.data.images import PaddedImages, crop_to, to_uint8
from refiner.diffusion import ScheduleConfig, Window, q_sample
from refiner.experts import Expert, refine
from refiner.inference.pipeline import decode_to_uint8
from refiner.inference.progressive import (
    DilatedSampling,
    blur_factor,
    cosine_factor,
    gaussian_blur,
    global_weight,
    latent_stats,
    phase_scales,
    progressive_refine,
    skip_weight,
)
from refiner.inference.tiling import (
    MultiDiffusion,
    grid_views,
    ramp_weights,
    seam_ratio,
    tile_borders,
    tile_experts,
    tile_starts,
    tiled_decode,
    tiled_decode_rows,
    tiled_encode,
    view_weight,
)
from refiner.models.unet import UNetModel, tiny_unet_params
from refiner.models.vq import VQModel, tiny_ddconfig
from refiner.sampling import ddim_step, sample_ddim, timestep_grid

AC = ScheduleConfig().alphas_cumprod()


class ConvDenoiser:
    """Gaussian posterior output plus a fixed 3x3 convolution of x_t: each output pixel depends on its
    neighbours (zero padding), so tiling changes it, unlike the pointwise Gaussian denoiser."""

    def __init__(self, seed: int = 0, parameterization: str = "eps"):
        g = torch.Generator().manual_seed(seed)
        self.kernel = torch.randn(3, 3, 3, 3, generator=g, dtype=torch.float64) * 0.2
        self.gauss = GaussianDenoiser(0.3, 0.8, AC, parameterization)
        self.batch_sizes: list[int] = []

    def __call__(self, x, t):
        self.batch_sizes.append(x.shape[0])
        scale = (t.to(x.dtype) / 1000 + 0.5).view(-1, 1, 1, 1)
        return self.gauss(x, t) + scale * F.conv2d(x, self.kernel.to(x), padding=1)


class LocalFirstStage:
    """A first stage with no context at all: encode = f x f mean pool + 1x1 mix, decode = nearest
    upsampling + 1x1 mix. Tiled and whole results must agree to rounding for any tiling."""

    def __init__(self, factor: int):
        self.factor = factor
        g = torch.Generator().manual_seed(factor)
        self.mix_in = torch.randn(3, 3, generator=g)
        self.mix_out = torch.randn(3, 3, generator=g)

    def encode(self, x):
        return torch.einsum("oc,bchw->bohw", self.mix_in, F.avg_pool2d(x, self.factor))

    def decode(self, z):
        return torch.einsum("oc,bchw->bohw", self.mix_out, F.interpolate(z, scale_factor=self.factor))


def tiny_vq(factor: int) -> VQModel:
    torch.manual_seed(factor)
    return VQModel(tiny_ddconfig(factor, ch=32, resolution=32), n_embed=64, embed_dim={4: 3, 8: 4}[factor]).eval()


def smooth_image(height: int, width: int) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    return 0.8 * torch.stack([torch.sin(3 * xx + yy), torch.cos(2 * yy - xx), torch.sin(6 * xx * yy)])[None]


# ------------------------------------------------------------------------------------- placement
def test_tile_starts_match_demofusion_count_and_cover_the_side():
    assert tile_starts(10, 4, 3) == [0, 3, 6]
    assert tile_starts(11, 4, 3) == [0, 3, 6, 7]
    assert tile_starts(4, 8, 4) == [0] and tile_starts(8, 8, 4) == [0]
    assert tile_borders(160, 64, 32) == [32, 64, 96, 128] and tile_borders(50, 64, 32) == []
    for size in range(9, 60, 7):
        for tile, stride in ((8, 4), (8, 8), (8, 5), (16, 9)):
            starts = tile_starts(size, tile, stride)
            demofusion_count = int((size - tile) / stride - 1e-6) + 2 if size > tile else 1  # get_views
            assert len(starts) == demofusion_count
            assert starts[0] == 0 and starts[-1] + min(tile, size) == size
            assert all(0 < b - a <= stride for a, b in zip(starts, starts[1:]))


@pytest.mark.parametrize("weighting", ["linear", "cosine"])
def test_feather_ramps_of_two_neighbours_sum_to_one(weighting):
    tile, overlap = 12, 5
    left = ramp_weights(tile, overlap, weighting, rise=False, fall=True)
    right = ramp_weights(tile, overlap, weighting, rise=True, fall=False)
    assert torch.allclose(left[-overlap:] + right[:overlap], torch.ones(overlap, dtype=torch.float64))
    assert (left > 0).all() and (right > 0).all() and left[0] == 1 and right[-1] == 1
    if weighting == "linear":  # hand values: u = (i + 1/2) / 5
        assert torch.allclose(right[:overlap], torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9], dtype=torch.float64))
    else:
        assert math.isclose(float(right[0]), 0.5 * (1 - math.cos(math.pi * 0.1)), rel_tol=1e-12)


# ------------------------------------------------------------------------------------- tiled VQ
@pytest.mark.parametrize("factor", [4, 8])
def test_tiled_vq_is_exact_when_the_image_fits_one_tile(factor):
    vq = tiny_vq(factor)
    x = torch.rand(2, 3, 32, 48) * 2 - 1
    with torch.no_grad():
        z = vq.encode(x)
        assert torch.equal(tiled_encode(vq, x, tile=48, overlap=16), z)
        assert torch.equal(tiled_decode(vq, z, tile=48, overlap=16), vq.decode(z))


@pytest.mark.parametrize("factor", [4, 8])
@pytest.mark.parametrize("weighting", ["uniform", "linear", "cosine"])
def test_tiling_a_local_first_stage_changes_nothing(factor, weighting):
    """Placement, weights and normalisation are exact: with no receptive field, tiles = whole."""
    expert = LocalFirstStage(factor)
    x = torch.randn(2, 3, 13 * factor, 21 * factor)
    z = expert.encode(x)
    tile, overlap = 6 * factor, 2 * factor
    assert torch.allclose(tiled_encode(expert, x, tile, overlap, weighting), z, atol=1e-6)
    assert torch.allclose(tiled_decode(expert, z, tile, overlap, weighting), expert.decode(z), atol=1e-6)


def test_tiled_vq_differs_from_whole_by_a_bounded_amount_and_overlap_helps():
    """A real (randomly initialised) tiny f4: GroupNorm statistics, mid-block attention and zero
    padding at tile edges make tiles differ from the whole image. Feathered overlap must reduce the
    difference of a hard cut. Measured here (mean |tiled - whole| / mean |whole|, random weights,
    so pessimistic): encode 0.66 (hard cut 0.71), decode 0.48 (hard cut 0.65); bounded with headroom."""
    vq = tiny_vq(4)
    x = smooth_image(96, 96)
    with torch.no_grad():
        z = vq.encode(x)
        img = vq.decode(z)

        def rel(a, b):
            return float((a - b).abs().mean() / b.abs().mean())

        enc_cut, dec_cut = rel(tiled_encode(vq, x, 64, 0, "uniform"), z), rel(tiled_decode(vq, z, 64, 0, "uniform"), img)
        enc, dec = rel(tiled_encode(vq, x, 64, 32), z), rel(tiled_decode(vq, z, 64, 32), img)
    assert 0 < enc < enc_cut and 0 < dec < dec_cut, (enc, enc_cut, dec, dec_cut)
    assert enc < 0.8 and dec < 0.8, (enc, dec)


def test_tiled_decode_has_no_gradient_spike_on_tile_borders():
    """Smooth input, real tiny VQ-f4 (random weights), 64 px tiles overlapping by 32: the borders of
    every tile are no busier than their surroundings (measured 0.6-0.9 over seeds 4-6, a whole
    decode 0.9-1.0). The same check on the whole decode with a step of a quarter of the measured
    tiled-vs-whole difference added at those borders sees the seam (measured 2.9)."""
    vq = tiny_vq(4)
    size, tile, overlap = 160, 64, 32
    with torch.no_grad():
        z = vq.encode(smooth_image(size, size))
        whole = vq.decode(z)
        tiled = tiled_decode(vq, z, tile, overlap, "cosine")
    borders = tile_borders(size, tile, tile - overlap)
    assert seam_ratio(tiled, borders, vq.factor) < 1.2
    step = float((tiled - whole).abs().mean()) / 4
    seamed = whole.clone()
    for k, b in enumerate(borders):
        seamed[..., :, b:] += step * (-1) ** k
        seamed[..., b:, :] += step * (-1) ** k
    assert seam_ratio(seamed, borders, vq.factor) > 1.5
    with pytest.raises(ValueError, match="must lie in"):
        seam_ratio(tiled, [2, 64], vq.factor)


def full_canvas_blend(fn, x, tile, stride, ramp, num, den, weighting):
    """The blend written out with one image-sized canvas: sum_i w_i fn(tile_i) / sum_i w_i, tiles in row-major
    order (the reference for the streamed rows)."""
    height, width = x.shape[-2:]
    out_h, out_w = height * num // den, width * num // den
    value = weight = None
    for view in grid_views(height, width, tile, stride):
        out_view = view.scaled(num, den)
        out = fn(x[..., view.rows, view.cols])
        w = view_weight(out_view, out_h, out_w, ramp, weighting)
        if value is None:
            value = out.new_zeros(x.shape[0], out.shape[1], out_h, out_w)
            weight = torch.zeros(out_h, out_w, dtype=out.dtype)
        value[..., out_view.rows, out_view.cols] += out * w.to(out)
        weight[out_view.rows, out_view.cols] += w.to(weight)
    return value / weight


def test_tiled_decode_streams_rows_that_equal_the_full_canvas_blend():
    """tiled_decode_rows yields each band of rows as soon as its row of tiles is done (before any tile of the next
    row is decoded), the bands tile the image top to bottom, and they are bit-identical to a blend on one
    image-sized canvas; tiled_decode, tiled_encode (also from uint8 PaddedImages) and decode_to_uint8 agree."""
    vq = tiny_vq(4)
    tile, overlap = 48, 16  # latent tiles of 12 stepping by 8 over a 26 x 22 latent: rows at 0, 8, 14; 3 columns
    with torch.no_grad():
        z = vq.encode(smooth_image(104, 88))
        decoded_tops = []
        plain_decode = vq.decode
        vq.decode = lambda t: (decoded_tops.append(None), plain_decode(t))[1]
        seen = []
        for top, rows in tiled_decode_rows(vq, z, tile, overlap):
            seen.append((top, rows.clone(), len(decoded_tops)))
        vq.decode = plain_decode
        reference = full_canvas_blend(vq.decode, z, tile // 4, (tile - overlap) // 4, overlap, 4, 1, "cosine")
        assert tile_starts(26, 12, 8) == [0, 8, 14] and len(tile_starts(22, 12, 8)) == 3
        assert [calls for _, _, calls in seen] == [3, 6, 9]  # each band right after its row of 3 tiles
        assert [top for top, _, _ in seen] == [0, 32, 56]  # a band ends where the next row of tiles starts
        assert all(r.shape[-2] <= tile for _, r, _ in seen)
        assert torch.equal(torch.cat([r for _, r, _ in seen], dim=-2), reference)
        assert torch.equal(tiled_decode(vq, z, tile, overlap), reference)
        x = (torch.rand(2, 3, 104, 88, generator=torch.Generator().manual_seed(3)) * 255).round().to(torch.uint8)
        images = [img.permute(1, 2, 0).numpy() for img in x]
        padded = PaddedImages(images, 8)
        enc_reference = full_canvas_blend(vq.encode, padded.full(), tile, tile - overlap, overlap // 4, 1, 4, "cosine")
        assert torch.equal(tiled_encode(vq, padded, tile, overlap), enc_reference)
        assert torch.equal(tiled_encode(vq, padded.full(), tile, overlap), enc_reference)
        z2 = vq.encode(padded.full())
        streamed = decode_to_uint8(vq, z2, (101, 83), (tile, overlap))
        whole_canvas = tiled_decode(vq, z2, tile, overlap)
        for b in range(2):
            assert np.array_equal(streamed[b], to_uint8(crop_to(whole_canvas[b], (101, 83))))


def test_tiled_vq_rejects_bad_tiles():
    vq = LocalFirstStage(4)
    x = torch.zeros(1, 3, 32, 32)
    with pytest.raises(ValueError, match="smaller than the tile"):
        tiled_encode(vq, x, tile=16, overlap=16)
    with pytest.raises(ValueError, match="multiple of the first-stage factor 4"):
        tiled_decode(vq, torch.zeros(1, 3, 8, 8), tile=18, overlap=4)
    with pytest.raises(ValueError, match="overlap=6"):
        tiled_encode(vq, x, tile=16, overlap=6)
    with pytest.raises(ValueError, match="H, W multiples"):
        tiled_encode(vq, torch.zeros(1, 3, 30, 32), tile=16, overlap=4)


# -------------------------------------------------------------------------------- MultiDiffusion
def test_one_tile_covering_everything_is_exactly_the_model():
    model = ConvDenoiser()
    x = torch.randn(2, 3, 12, 16, dtype=torch.float64)
    t = torch.full((2,), 400)
    assert torch.equal(MultiDiffusion(model, tile=16)(x, t), model(x, t))
    assert torch.equal(MultiDiffusion(model, tile=32, stride=4, jitter=True, weighting="cosine")(x, t), model(x, t))


def test_tiling_a_pointwise_model_changes_nothing():
    """The Gaussian denoiser has no spatial context, so any fusion of its tiles is itself."""
    model = GaussianDenoiser(0.3, 0.8, AC)
    x = torch.randn(2, 3, 23, 30, dtype=torch.float64)
    t = torch.full((2,), 321)
    for weighting in ("uniform", "cosine"):
        wrapped = MultiDiffusion(model, tile=8, stride=5, jitter=True, weighting=weighting, view_batch_size=7)
        assert torch.allclose(wrapped(x, t), model(x, t), rtol=0, atol=1e-12)


def test_context_is_cropped_with_the_latent():
    """A concat-conditioned window sees its own crop of the conditioning: with a pointwise model of
    (x_t, context) any tiling must give the untiled output; a misaligned crop would not."""
    gauss = GaussianDenoiser(0.3, 0.8, AC)

    def model(x, t, context):
        return gauss(x, t) + 0.5 * context[:, :3] - context[:, 3:]

    x = torch.randn(2, 3, 23, 30, dtype=torch.float64)
    context = torch.randn(2, 6, 23, 30, dtype=torch.float64)
    t = torch.full((2,), 321)
    wrapped = MultiDiffusion(model, tile=8, stride=5, jitter=True, view_batch_size=7, context=context)
    assert torch.allclose(wrapped(x, t), model(x, t, context), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="context of shape"):
        MultiDiffusion(model, tile=8, context=context[:, :, :20])(x, t)


def per_tile_ddim_reference(model, wrapped: MultiDiffusion, x, timesteps, parameterization, eta, generator):
    """MultiDiffusion as the paper states it: step every tile, then average the tiles' x_{t-1}."""
    batch, _, height, width = x.shape
    for i, t in enumerate(timesteps):
        t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype) if eta > 0 else None
        plan = wrapped.plan(height, width, t)
        pad = plan.pad
        xp, noisep = F.pad(x, (pad,) * 4), (F.pad(noise, (pad,) * 4) if noise is not None else None)
        value, weight = torch.zeros_like(xp), torch.zeros_like(xp[:1, :1])
        for view, w in zip(plan.views, wrapped.weights(plan, height, width)):
            x_v = xp[..., view.rows, view.cols]
            out = model(x_v, torch.full((batch,), t))
            n_v = noisep[..., view.rows, view.cols] if noisep is not None else None
            step, _ = ddim_step(x_v, t, t_prev, out, AC, parameterization, eta, n_v)
            value[..., view.rows, view.cols] += w * step
            weight[..., view.rows, view.cols] += w
        x = (value / weight)[..., pad:pad + height, pad:pad + width]
    return x


@pytest.mark.parametrize("weighting,jitter,parameterization,eta", [
    ("uniform", False, "eps", 0.0), ("uniform", True, "v", 0.0), ("cosine", True, "eps", 0.7), ("linear", False, "x0", 0.0),
])
def test_averaging_outputs_equals_averaging_each_tiles_ddim_step(weighting, jitter, parameterization, eta):
    model = ConvDenoiser(parameterization=parameterization)
    wrapped = MultiDiffusion(model, tile=8, stride=5, jitter=jitter, weighting=weighting, seed=3, view_batch_size=5)
    x = torch.randn(2, 3, 13, 19, dtype=torch.float64)
    grid = timestep_grid(600, 4)
    ours = sample_ddim(wrapped, x, grid, AC, parameterization, eta, generator=torch.Generator().manual_seed(1))
    ref = per_tile_ddim_reference(model, wrapped, x, grid, parameterization, eta, torch.Generator().manual_seed(1))
    assert torch.allclose(ours, ref, rtol=0, atol=1e-10)
    assert not torch.allclose(ours, sample_ddim(model, x, grid, AC, parameterization), atol=1e-3)  # tiling mattered


def test_view_batch_size_bounds_model_calls_without_changing_the_result():
    x = torch.randn(2, 3, 13, 19, dtype=torch.float64)
    t = torch.full((2,), 500)
    small, large = ConvDenoiser(), ConvDenoiser()
    a = MultiDiffusion(small, tile=8, stride=5, view_batch_size=3)(x, t)
    b = MultiDiffusion(large, tile=8, stride=5, view_batch_size=64)(x, t)
    assert torch.allclose(a, b, rtol=0, atol=1e-12)
    n_views = len(grid_views(13, 19, 8, 5))
    assert max(small.batch_sizes) == 3 and sum(small.batch_sizes) == 2 * n_views
    assert large.batch_sizes == [2 * n_views]


def test_jitter_is_seeded_bounded_and_covers_every_pixel():
    height, width, tile, stride = 37, 50, 16, 8
    md = MultiDiffusion(lambda x, t: x, tile=tile, stride=stride, jitter=True, seed=5)
    J = md.jitter_range
    assert J == (tile - stride) // 4 == 2
    base = grid_views(height, width, tile, stride)
    plans = {t: md.plan(height, width, t) for t in range(0, 1000, 7)}
    assert md.plan(height, width, 301) == MultiDiffusion(md.model, tile, stride, jitter=True, seed=5).plan(height, width, 301)
    assert md.plan(height, width, 301) != MultiDiffusion(md.model, tile, stride, jitter=True, seed=6).plan(height, width, 301)
    assert len({tuple(p.views) for p in plans.values()}) > 100  # redrawn every step
    for plan in plans.values():
        assert plan.pad == J
        cover = torch.zeros(height + 2 * J, width + 2 * J)
        for v, b in zip(plan.views, base):
            dh, dw = v.top - J - b.top, v.left - J - b.left
            assert -J <= dh <= J and -J <= dw <= J
            assert (b.top > 0 or dh <= 0) and (b.top + b.height < height or dh >= 0)  # edges only move outward
            assert (b.left > 0 or dw <= 0) and (b.left + b.width < width or dw >= 0)
            cover[v.rows, v.cols] += 1
        assert (cover[J:J + height, J:J + width] > 0).all()


def test_tiled_stages_refine_like_the_plain_chain_for_a_pointwise_model():
    experts = [Expert(GaussianDenoiser(0.3, 0.8, AC), Window(250, 500)), Expert(GaussianDenoiser(0.1, 1.2, AC), Window(0, 250))]
    z = torch.randn(1, 3, 20, 28, dtype=torch.float64)
    noise = torch.randn_like(z)
    plain = refine(experts, z, 499, 6, AC, noise=noise)
    tiled = refine(tile_experts(experts, tile=8, stride=6, jitter=True), z, 499, 6, AC, noise=noise)
    assert torch.allclose(tiled, plain, rtol=0, atol=1e-10)


def tiny_unet(seed: int) -> UNetModel:
    torch.manual_seed(seed)
    net = UNetModel(**tiny_unet_params()).eval()
    torch.nn.init.normal_(net.out[2].weight, std=0.05)  # CompVis zero-inits the last conv
    return net


class Recorder:
    def __init__(self, model):
        self.model, self.shapes = model, []

    def __call__(self, x, t):
        self.shapes.append(tuple(x.shape))
        return self.model(x, t)


def test_a_real_unet_chain_runs_on_jittered_tiles():
    """Two demo-shaped window UNets: every call sees tiles of the configured size (divisible by the
    UNet's downsampling) in batches of at most view_batch_size, and the result is finite."""
    nets = [Recorder(tiny_unet(1)), Recorder(tiny_unet(2))]
    experts = [Expert(nets[0], Window(250, 500)), Expert(nets[1], Window(0, 250))]
    z = torch.randn(1, 3, 40, 36)
    noise = torch.randn_like(z)
    tiled = refine(tile_experts(experts, tile=16, stride=12, jitter=True, view_batch_size=4), z, 499, 4, AC, noise=noise)
    assert tiled.shape == z.shape and torch.isfinite(tiled).all()
    shapes = nets[0].shapes + nets[1].shapes
    assert {s[1:] for s in shapes} == {(3, 16, 16)} and max(s[0] for s in shapes) == 4
    assert len(nets[0].shapes) == len(nets[1].shapes) == 2 * math.ceil(len(grid_views(40, 36, 16, 12)) / 4)
    plain = refine(experts, z, 499, 4, AC, noise=noise)
    assert 0 < float((tiled - plain).abs().mean()) < 0.1 * float(plain.abs().mean())  # close, not identical


def test_multidiffusion_rejects_bad_settings():
    with pytest.raises(ValueError, match="stride=9 must not exceed tile=8"):
        MultiDiffusion(lambda x, t: x, tile=8, stride=9)
    with pytest.raises(ValueError, match="tile must be a positive int"):
        MultiDiffusion(lambda x, t: x, tile=0)
    with pytest.raises(ValueError, match="unknown weighting"):
        MultiDiffusion(lambda x, t: x, tile=8, weighting="gauss")
    with pytest.raises(TypeError, match="callable"):
        MultiDiffusion(None, tile=8)


# ---------------------------------------------------------------------------- progressive (DemoFusion)
def test_cosine_weights_match_hand_values():
    # cos_factor = 0.5 (1 + cos(pi (1000 - t) / 1000))
    assert cosine_factor(0) == pytest.approx(0.0, abs=1e-15)
    assert cosine_factor(500) == pytest.approx(0.5)
    assert cosine_factor(250) == pytest.approx(0.5 * (1 - math.sqrt(0.5)))  # cos(3 pi / 4)
    assert cosine_factor(999) == pytest.approx(0.5 * (1 + math.cos(math.pi / 1000)))
    assert skip_weight(500) == pytest.approx(0.125)  # alpha1 = 3
    assert skip_weight(250) == pytest.approx(0.1464466094 ** 3)
    assert global_weight(500) == pytest.approx(0.5) and global_weight(500, alpha2=2) == pytest.approx(0.25)
    assert blur_factor(500) == pytest.approx(0.505) and blur_factor(0) == pytest.approx(0.01)
    assert skip_weight(750, num_timesteps=1500) == pytest.approx(0.125)


def test_gaussian_blur_matches_a_direct_2d_kernel():
    x = torch.randn(2, 3, 9, 11, dtype=torch.float64)
    k, sigma = 5, 0.7
    g = torch.tensor([math.exp(-((i - 2) ** 2) / (2 * sigma**2)) for i in range(k)], dtype=torch.float64)
    kernel = torch.outer(g, g) / g.sum() ** 2  # DemoFusion's gaussian_kernel
    ref = F.conv2d(x, kernel.expand(3, 1, k, k), padding=k // 2, groups=3)
    assert torch.allclose(gaussian_blur(x, k, sigma), ref, atol=1e-12)
    assert torch.equal(gaussian_blur(x, 1, sigma), x)


def test_dilated_sampling_reassembles_the_lattices():
    """An identity model returns what it was shown: the blurred latent, at the original positions."""
    x = torch.randn(2, 3, 12, 8, dtype=torch.float64)
    shown = []
    dilated = DilatedSampling(lambda v, t: shown.append(v) or v, scale=4, sigma=1.0)
    out = dilated(x, torch.full((2,), 500))
    assert shown[0].shape == (32, 3, 3, 2)  # 16 lattices x batch 2, each 1/4 the size
    assert torch.allclose(out, dilated.blurred(x, 500), atol=1e-12)
    mean, std = latent_stats(out)
    assert torch.allclose(mean, latent_stats(x)[0]) and torch.allclose(std, latent_stats(x)[1])
    with pytest.raises(ValueError, match="not divisible by the dilation 4"):
        dilated(torch.zeros(1, 3, 10, 8), torch.full((1,), 5))


def demofusion_reference(experts, z, t_start, steps, upscale, tile, generator):
    """DemoFusion's phase loop written out per view: skip residual, per-tile steps averaged (local),
    per-lattice steps on the unblurred lattice with the blurred one as model input (global)."""
    T = AC.shape[0]
    grid = timestep_grid(t_start, steps)
    anchor_mean, anchor_std = latent_stats(z)
    for s in phase_scales(upscale):
        z_up = F.interpolate(z, scale_factor=2, mode="bicubic")
        noise = torch.randn(z_up.shape, generator=generator, dtype=z_up.dtype)
        x = q_sample(z_up, torch.full((z.shape[0],), t_start), AC, noise)
        for i, t in enumerate(grid):
            model = next(st.model for st in experts if st.window.contains(t))
            t_prev = grid[i + 1] if i + 1 < len(grid) else -1
            tb = torch.full((x.shape[0],), t)
            c1, c2 = cosine_factor(t) ** 3, cosine_factor(t)
            x = (1 - c1) * x + c1 * q_sample(z_up, tb, AC, noise)
            local, count = torch.zeros_like(x), torch.zeros_like(x)
            for v in grid_views(x.shape[2], x.shape[3], tile, tile // 2):
                x_v = x[..., v.rows, v.cols]
                local[..., v.rows, v.cols] += ddim_step(x_v, t, t_prev, model(x_v, tb), AC)[0]
                count[..., v.rows, v.cols] += 1
            local = local / count
            sig = 0.99 * cosine_factor(t) + 0.01
            m, sd = latent_stats(x)
            blurred = gaussian_blur(x, 2 * s - 1, sig)
            blurred = (blurred - latent_stats(blurred)[0]) / latent_stats(blurred)[1] * sd + m
            glob = torch.zeros_like(x)
            for h in range(s):
                for w in range(s):
                    out = model(blurred[..., h::s, w::s], tb)
                    glob[..., h::s, w::s] = ddim_step(x[..., h::s, w::s], t, t_prev, out, AC)[0]
            x = (1 - c2) * local + c2 * glob
        z = (x - latent_stats(x)[0]) / latent_stats(x)[1] * anchor_std + anchor_mean
    return z


@pytest.mark.parametrize("upscale", [2, 4])
def test_progressive_refine_matches_a_direct_demofusion_loop(upscale):
    experts = [Expert(ConvDenoiser(seed=1), Window(250, 500)), Expert(ConvDenoiser(seed=2), Window(0, 250))]
    z = torch.randn(2, 3, 6, 8, dtype=torch.float64)
    ours = progressive_refine(experts, z, 499, 4, AC, upscale=upscale, tile=8, jitter=False,
                              generator=torch.Generator().manual_seed(0))
    ref = demofusion_reference(experts, z, 499, 4, upscale, tile=8, generator=torch.Generator().manual_seed(0))
    assert ours.shape == (2, 3, 6 * upscale, 8 * upscale)
    assert torch.allclose(ours, ref, rtol=0, atol=1e-9)


@pytest.mark.parametrize("upscale", [2, 4])
def test_progressive_shapes_and_renormalisation_to_the_first_phase(upscale):
    experts = [Expert(ConvDenoiser(seed=1), Window(250, 500)), Expert(ConvDenoiser(seed=2), Window(0, 250))]
    z = torch.randn(2, 3, 8, 6) * torch.tensor([0.5, 2.0]).view(2, 1, 1, 1) + torch.tensor([1.0, -0.3]).view(2, 1, 1, 1)
    phases = progressive_refine(experts, z, 499, 3, AC, upscale=upscale, tile=8, generator=torch.Generator().manual_seed(0),
                                return_phases=True)
    assert [p.shape for p in phases] == [(2, 3, 8 * s, 6 * s) for s in phase_scales(upscale)]
    mean, std = latent_stats(z)
    for p in phases:
        assert torch.isfinite(p).all()
        assert torch.allclose(latent_stats(p)[0], mean, atol=1e-5) and torch.allclose(latent_stats(p)[1], std, atol=1e-5)


def test_progressive_with_real_unets_upscales_a_latent():
    experts = [Expert(tiny_unet(1), Window(250, 500)), Expert(tiny_unet(2), Window(0, 250))]
    z = torch.randn(1, 3, 16, 16)
    out = progressive_refine(experts, z, 499, 3, AC, upscale=2, tile=16, view_batch_size=4,
                             generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()
    again = progressive_refine(experts, z, 499, 3, AC, upscale=2, tile=16, view_batch_size=4,
                               generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)  # seeded noise and jitter: deterministic


def test_progressive_rejects_bad_upscale_and_uncovered_grids():
    experts = [Expert(ConvDenoiser(), Window(0, 250))]
    z = torch.randn(1, 3, 4, 4)
    for bad in (1, 3, 6, 2.0):
        with pytest.raises(ValueError, match="power of 2"):
            progressive_refine(experts, z, 200, 2, AC, upscale=bad)
    with pytest.raises(ValueError, match="above the top window"):
        progressive_refine(experts, z, 400, 2, AC, upscale=2)
    assert phase_scales(8) == [2, 4, 8]
