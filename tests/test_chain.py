"""refiner.inference.chain / pipeline: planning without models, bit-exact images, the training grid through Chain."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from refiner.data.images import to_tensor, to_uint8
from refiner.diffusion import ScheduleConfig, Window, q_sample
from refiner.errors import RefineError
from refiner.experts import Expert, refine
from refiner.formats.window_files import WindowWeights
from refiner.inference.chain import Chain, ChainError, LoadedExpert
from refiner.inference.pipeline import Pipeline
from refiner.models.unet import UNetModel, tiny_unet_params
from refiner.models.vq import VQModel, tiny_ddconfig
from refiner.sampling import ddim_step, sample_ddim, timestep_grid

SCHEDULE = ScheduleConfig("linear", 1000, 0.0015, 0.0195)
AB = SCHEDULE.alphas_cumprod()


pytestmark = pytest.mark.usefixtures("one_thread")


class MustNotRun(torch.nn.Module):
    """A stand-in UNet that fails the test if the chain calls it."""

    num_levels = 3

    def forward(self, *args, **kwargs):
        raise AssertionError("a model was run")


def _weights(window: tuple[int, int], params: dict | None = None, name: str = "w", **kw) -> WindowWeights:
    return WindowWeights(unet_state={}, unet_params=params or tiny_unet_params(), window=Window(*window, 1000),
                         schedule=SCHEDULE, parameterization="eps", global_step=None, source=f"{name}.ckpt",
                         has_ema=False, **kw)


def _unplannable_chain(*windows) -> Chain:
    """A chain built directly (no overlap check at construction) whose UNets raise if called."""
    return Chain([LoadedExpert(_weights(w, name=f"s{k}"), MustNotRun()) for k, w in enumerate(windows)], AB, 1.0)


@pytest.mark.parametrize("windows, kwargs, message", [
    (((200, 500), (0, 250)), dict(t_start=499, steps=10), "overlapping expert windows"),
    (((300, 500), (0, 250)), dict(t_start=499, steps=50), r"in the gap \[250, 300\)"),
    (((250, 500), (0, 250)), dict(t_start=700, steps=8), "above the top window"),
    (((0, 500),), dict(t_start=299, steps=4, eta=1.05), "eta=1.05 is too large"),
    (((0, 500),), dict(t_start=299, steps=400), "steps must be in"),
])
def test_plan_rejects_what_refine_rejects_without_running_a_model(windows, kwargs, message):
    chain = _unplannable_chain(*windows)
    t_start, steps = kwargs.pop("t_start"), kwargs.pop("steps")
    with pytest.raises(ChainError, match=message):
        chain.plan(t_start, steps, **kwargs)
    with pytest.raises(ChainError, match=message):  # refine applies the same checks, also before any model call
        chain.refine(torch.zeros(1, 3, 8, 8), t_start, steps, noise=torch.zeros(1, 3, 8, 8), **kwargs)
    experts = [Expert(lambda x, t: torch.zeros_like(x), Window(*w, 1000)) for w in windows]
    with pytest.raises(ValueError, match=message):  # and the sampler itself refuses it with the same words
        refine(experts, torch.zeros(1, 3, 8, 8), t_start, steps, AB, noise=torch.zeros(1, 3, 8, 8), **kwargs)
    assert issubclass(ChainError, RefineError)


def test_plan_assigns_stages_without_running_a_model():
    chain = _unplannable_chain((250, 500), (0, 250))
    plan = chain.plan(499, 4)
    assert plan.timesteps == [499, 333, 167, 1]
    assert plan.expert_of_step == [0, 0, 1, 1] and plan.segments == [0, 1]


def test_from_experts_checks_overlap_schedule_and_scale():
    with pytest.raises(ChainError, match="overlapping expert windows"):
        Chain.from_experts([LoadedExpert(_weights((200, 500)), None), LoadedExpert(_weights((0, 250)), None)])
    other = _weights((0, 250))
    other.schedule = ScheduleConfig("linear", 1000, 0.0015, 0.012)
    with pytest.raises(ChainError, match="share a noise schedule"):
        Chain.from_experts([LoadedExpert(_weights((250, 500)), None), LoadedExpert(other, None)])
    with pytest.raises(ChainError, match="share scale_factor"):
        Chain.from_experts([LoadedExpert(_weights((250, 500)), None),
                           LoadedExpert(_weights((0, 250), scale_factor=0.5), None)])
    chain = Chain.from_experts([LoadedExpert(_weights((250, 500), first_stage_fingerprint="abc"), None),
                               LoadedExpert(_weights((0, 250)), None)])
    assert chain.first_stage_fingerprint == "abc" and torch.equal(chain.alphas_cumprod, AB)


def _unet(seed: int, **params) -> UNetModel:
    torch.manual_seed(seed)
    unet = UNetModel(**tiny_unet_params(**params)).eval()
    with torch.no_grad():
        unet.out[2].weight.normal_(0, 0.05)  # the zero-init output conv would predict eps = 0
    return unet


def _loaded(unet: UNetModel, window, **kw) -> LoadedExpert:
    return LoadedExpert(_weights(window, **kw), unet)


def test_pipeline_refine_images_is_bit_identical_to_the_hand_written_pipeline():
    torch.manual_seed(3)
    f4 = VQModel(tiny_ddconfig(4), 64, 3).eval()
    hi, lo = _unet(1), _unet(2)
    chain = Chain.from_experts([_loaded(hi, (250, 500), scale_factor=0.7), _loaded(lo, (0, 250), scale_factor=0.7)])
    pipeline = Pipeline(f4, chain)
    assert pipeline.multiple == 4 * 4
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (13, 21, 3), dtype=np.uint8) for _ in range(2)]
    got, experts = pipeline.refine_images(images, 499, 3, seed=7, indices=[4, 9], with_stages=True)

    with torch.no_grad():  # pad -> encode -> scale -> q_sample + DDIM per window -> unscale -> decode -> crop
        x = torch.stack([to_tensor(i) for i in images])
        x = torch.nn.functional.pad(x, (0, 32 - 21, 0, 16 - 13), mode="reflect")
        z = f4.encode(x) * 0.7
        noise = torch.stack([torch.randn(z.shape[1:], generator=torch.Generator().manual_seed(7 + i)) for i in (4, 9)])
        grid = timestep_grid(499, 3)
        assert grid == [499, 250, 1]
        out, x0s = q_sample(z, torch.full((2,), 499), AB, noise), []
        for i, t in enumerate(grid):
            unet = hi if t >= 250 else lo
            t_prev = grid[i + 1] if i + 1 < len(grid) else -1
            out, x0 = ddim_step(out, t, t_prev, unet(out, torch.full((2,), t)), AB)
            if i in (1, 2):  # the last step of each expert
                x0s.append(x0)
        want = [to_uint8(img) for img in f4.decode(out / 0.7)[..., :13, :21]]
    for g, w in zip(got, want):
        assert np.array_equal(g, w)
    assert len(experts) == 2 and all(len(s) == 2 for s in experts)
    for k, x0 in enumerate(x0s):
        decoded = f4.decode(x0 / 0.7)[..., :13, :21].clamp(-1, 1)
        for j in range(2):
            assert torch.equal(experts[j][k], decoded[j])
    # without experts: the same refined images, no expert pictures
    again, none = pipeline.refine_images(images, 499, 3, seed=7, indices=[4, 9])
    assert all(np.array_equal(a, g) for a, g in zip(again, got)) and none == [[], []]


def test_pipeline_degrade_and_refusals():
    torch.manual_seed(0)
    f4, f8 = VQModel(tiny_ddconfig(4), 64, 3).eval(), VQModel(tiny_ddconfig(8), 64, 4).eval()
    chain = Chain.from_experts([_loaded(_unet(1), (0, 500))])
    img = np.random.default_rng(1).integers(0, 256, (12, 20, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="needs the VQ-f8"):
        Pipeline(f4, chain).degrade([img])
    out = Pipeline(f4, chain, f8).degrade([img])[0]
    assert out.shape == img.shape and out.dtype == np.uint8 and not np.array_equal(out, img)
    with pytest.raises(ValueError, match="share one size"):
        Pipeline(f4, chain).refine_images([img, img[:8]], 499, 2)
    with pytest.raises(ChainError, match="in/out channels"):  # f8's 4-channel latent does not fit these UNets
        chain.check_first_stage(f8, "f8")


@pytest.mark.parametrize("conditioning", [None, "concat"])
def test_training_grid_goes_through_chain_and_matches_the_old_loop(conditioning):
    """WindowRefiner's validation grid (Chain.from_module(...).preview) equals the loop it replaced: noise
    (seed 0) to the window's top, DDIM through the window only, x0 of the last step, unscaled."""
    from refiner.lit.window_module import WindowRefiner

    params = tiny_unet_params(in_channels=6 if conditioning else 3)
    module = WindowRefiner(unet=params, window=dict(t_min=250, t_max=500, num_timesteps=1000),
                           schedule=SCHEDULE.to_dict(), conditioning=conditioning, scale_factor=0.8).eval()
    with torch.no_grad():
        module.unet.out[2].weight.normal_(0, 0.05)
    z_deg = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    got = Chain.from_module(module).preview(z_deg, steps=5)

    with torch.no_grad():
        z = z_deg * 0.8
        concat = z if conditioning else None
        grid = timestep_grid(499, 5, t_end=250)
        noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(0))
        x_t = q_sample(z, torch.full((2,), grid[0]), module.alphas_cumprod, noise)
        last = []
        sample_ddim(lambda x, t: module.unet(x, t, concat=concat), x_t, grid, module.alphas_cumprod,
                    callback=lambda i, t, x, out, x0: last.append(x0) if i == len(grid) - 1 else None)
    assert torch.equal(got, last[-1] / 0.8)


def test_chain_reaches_multidiffusion_and_progressive_refinement():
    from refiner.inference.progressive import progressive_refine
    from refiner.inference.tiling import tile_experts

    hi, lo = _unet(1), _unet(2)
    chain = Chain.from_experts([_loaded(hi, (250, 500)), _loaded(lo, (0, 250))])
    z, noise = torch.randn(1, 3, 16, 16), torch.randn(1, 3, 16, 16)
    experts = [Expert(lambda x, t: hi(x, t), Window(250, 500, 1000)), Expert(lambda x, t: lo(x, t), Window(0, 250, 1000))]
    tiles = dict(tile=8, stride=6, jitter=True, view_batch_size=4)
    want = refine(tile_experts(experts, **tiles), z, 499, 3, AB, noise=noise)
    assert torch.equal(chain.refine(z, 499, 3, noise=noise, tiles=tiles).latent, want)
    assert not torch.allclose(chain.refine(z, 499, 3, noise=noise).latent, want, atol=1e-4)  # tiling mattered
    z_small = z[..., :8, :8]
    got = chain.refine_progressive(z_small, 499, 2, upscale=2, tile=8, generator=torch.Generator().manual_seed(0))
    want = progressive_refine(experts, z_small, 499, 2, AB, upscale=2, tile=8, generator=torch.Generator().manual_seed(0))
    assert got.shape == (1, 3, 16, 16) and torch.equal(got, want)
    concat = Chain.from_experts([_loaded(_unet(3, in_channels=6), (0, 500), conditioning="concat")])
    with pytest.raises(ChainError, match="concat-conditioned"):
        concat.refine_progressive(z_small, 499, 2)
