"""The diffusers bridge: our CompVis-layout UNet / taming VQ / DDIM against diffusers' own classes.

diffusers is the independent reference here: its UNet2DModel, VQModel, DDIMScheduler and LDMPipeline
run on the exported folders and must reproduce our numbers; folders written by diffusers' own
``save_pretrained`` must load into our models.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")  # a guard only: `make test` installs diffusers (the test extra)

from helpers_compvis import make_first_stage_checkpoint, make_window_checkpoint, randomized  # noqa: E402

from refiner.diffusion import ScheduleConfig, Window  # noqa: E402
from refiner.experts import Expert, refine  # noqa: E402
from refiner.formats.first_stage import build_first_stage  # noqa: E402
from refiner.formats.diffusers import DiffusersFormatError  # noqa: E402
from refiner.formats.diffusers.config import (  # noqa: E402
    unet2d_config,
    unet_from_diffusers,
    unet_params_from_unet2d_config,
    unet_to_diffusers,
    vq_config,
    vq_params_from_config,
    vq_to_diffusers,
)
from refiner.formats.diffusers.folders import load_diffusers_unet, load_diffusers_vq  # noqa: E402
from refiner.formats.exports import export_diffusers  # noqa: E402
from refiner.formats.loading import load_init_weights  # noqa: E402
from refiner.formats.safe_load import CheckpointError  # noqa: E402
from refiner.inference.diffusers_pipeline import WindowChainPipeline  # noqa: E402
from refiner.io import OutputPathError  # noqa: E402
from refiner.models.unet import UNetModel, tiny_unet_params  # noqa: E402
from refiner.models.vq import VQModel, tiny_ddconfig  # noqa: E402
from refiner.sampling import timestep_grid  # noqa: E402

TOL = 1e-5
# the ldm_vq4_ffhq preset's layout (mult [1,2,3,4], attention at ds 8/4/2, 2 res blocks, 32-wide heads)
# at a tiny width: 2, 3 and 4 heads at the three attention levels
FFHQ_LAYOUT_TINY = dict(image_size=16, in_channels=3, out_channels=3, model_channels=32, channel_mult=[1, 2, 3, 4],
                        num_res_blocks=2, attention_resolutions=[8, 4, 2], num_head_channels=32)
VQ_PARAMS = dict(ddconfig=tiny_ddconfig(4), n_embed=16, embed_dim=3)


def _diffusers_unet(params: dict, state: dict):
    cfg = unet2d_config(params)
    model = diffusers.UNet2DModel(**{k: v for k, v in cfg.items() if not k.startswith("_")})
    model.load_state_dict(unet_to_diffusers(state, params), strict=True)
    return model.eval()


def _our_unet(params: dict, seed: int = 0):
    model = UNetModel(**params)
    state = randomized(model, seed)  # every tensor random, zero-initialised layers too
    model.load_state_dict(state)
    return model.eval(), state


def _attention_heads(model: UNetModel) -> set[int]:
    from refiner.models.unet import AttentionBlock

    return {m.num_heads for m in model.modules() if isinstance(m, AttentionBlock)}


@pytest.mark.parametrize("params", [
    tiny_unet_params(),
    tiny_unet_params(use_scale_shift_norm=True, num_res_blocks=2),
    tiny_unet_params(use_new_attention_order=True),
    FFHQ_LAYOUT_TINY,
    tiny_unet_params(model_channels=16, norm_groups=16, num_head_channels=8, use_scale_shift_norm=True),
], ids=["tiny", "tiny-scale-shift", "tiny-new-qkv-order", "ldm_vq4_ffhq-layout", "half-width-16-groups"])
def test_unet_matches_exported_unet2dmodel(params):
    ours, state = _our_unet(params)
    assert unet2d_config(params)["norm_num_groups"] == params.get("norm_groups", 32)
    assert max(_attention_heads(ours)) > 1  # the per-head qkv split is exercised
    theirs = _diffusers_unet(params, state)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 711])
    with torch.no_grad():
        a, b = ours(x, t), theirs(x, t).sample
    assert a.abs().max() > 0.05  # a non-trivial output
    assert (a - b).abs().max() < TOL


def test_attention_split_order_matters():
    """Splitting the legacy qkv with the wrong packing must break parity (the test above can fail)."""
    params = tiny_unet_params()
    ours, state = _our_unet(params)
    theirs = _diffusers_unet({**params, "use_new_attention_order": True}, state)  # wrong packing
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([500])
    with torch.no_grad():
        assert (ours(x, t) - theirs(x, t).sample).abs().max() > 10 * TOL


@pytest.mark.parametrize("norm_groups", [None, 8])
def test_vq_matches_exported_vqmodel(norm_groups):
    params = VQ_PARAMS if norm_groups is None else {**VQ_PARAMS, "ddconfig": {**VQ_PARAMS["ddconfig"],
                                                                             "norm_groups": norm_groups}}
    vq = VQModel(**params)
    state = randomized(vq, 1, std=0.1)
    vq.load_state_dict(state)
    vq.eval()
    cfg = vq_config(params, scaling_factor=0.7)
    assert cfg["norm_num_groups"] == (norm_groups or 32)
    assert vq_params_from_config(cfg) == params  # and back: the groups survive the round trip
    theirs = diffusers.VQModel(**{k: v for k, v in cfg.items() if not k.startswith("_")})
    theirs.load_state_dict(vq_to_diffusers(state, params), strict=True)
    theirs.eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        h, h_d = vq.encode(x), theirs.encode(x).latents  # pre-quantization latents
        assert (h - h_d).abs().max() < TOL
        y, y_d = vq.decode(h), theirs.decode(h).sample  # both quantize, then decode
        assert (y - y_d).abs().max() < TOL
        assert (vq.decode(h, force_not_quantize=True) - y).abs().max() > 1e-3  # quantization did something
    assert theirs.config.scaling_factor == 0.7


@pytest.mark.parametrize("layout", [FFHQ_LAYOUT_TINY, tiny_unet_params(model_channels=16, norm_groups=16)],
                         ids=["ldm_vq4_ffhq-layout", "half-width-16-groups"])
def test_unet_round_trip_is_bit_identical_and_params_survive(layout):
    ours, state = _our_unet(layout)
    back, params = unet_from_diffusers(unet_to_diffusers(state, layout), unet2d_config(layout))
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
    rebuilt = UNetModel(**params).config
    rebuilt["attention_resolutions"] = sorted(rebuilt["attention_resolutions"])
    want = dict(ours.config, attention_resolutions=sorted(ours.config["attention_resolutions"]))
    assert rebuilt == want


@pytest.mark.parametrize("bad, match", [
    (dict(channel_mult=[2, 2, 2]), r"channel_mult\[0\]=2"),
    (dict(resblock_updown=True), "resblock_updown"),
    (dict(num_head_channels=-1, num_heads=2, channel_mult=[1, 2, 4], attention_resolutions=[2, 4]),
     "attention head widths differ"),
    (dict(conv_resample=False), "conv_resample"),
])
def test_unexportable_unets_are_refused_with_the_reason(bad, match):
    with pytest.raises(DiffusersFormatError, match=match):
        unet2d_config(tiny_unet_params(**bad))


# ------------------------------------------------------------------------------------ folders
def _window(tmp: Path, name: str, window=(250, 500), params=None, first_stage=None, seed=0, **hp) -> Path:
    """A window .ckpt (helpers_compvis layout) whose hyper_parameters also record a first stage and extras;
    its EMA weights are small random values (a sampler over them stays finite)."""
    params = params or tiny_unet_params()
    made = make_window_checkpoint(tmp, params, window=window, name=name)
    ckpt = torch.load(made["path"], weights_only=True)
    ema = randomized(UNetModel(**params), 100 + seed, std=0.02)
    ckpt["state_dict"] = {f"unet.{k}": v for k, v in ema.items()}
    ckpt["hyper_parameters"].update(first_stage=first_stage, **hp)
    ckpt["hyper_parameters"]["window"]["t_max"] = window[1]
    torch.save(ckpt, made["path"])
    return made["path"]


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """Two windows (shape [250,500), detail [0,250)) with a tiny VQ-f4 recorded as their first stage."""
    tmp = tmp_path_factory.mktemp("chain")
    vq = make_first_stage_checkpoint(tmp, n_embed=16, embed_dim=3)
    fs = {"ckpt_path": str(vq["path"]), "params": vq["params"]}
    callbacks = {"ModelCheckpoint{'monitor': 'val/loss'}": {"monitor": "val/loss", "best_model_score": 0.125}}
    shape = _window(tmp, "shape.ckpt", (250, 500), first_stage=fs, scale_factor=0.8)
    detail = _window(tmp, "detail.ckpt", (0, 250), first_stage=fs, scale_factor=0.8, seed=1,
                     first_stage_fingerprint="sha256:abc123")
    ck = torch.load(detail, weights_only=True)
    ck["callbacks"] = callbacks
    torch.save(ck, detail)
    out = export_diffusers([detail, shape], tmp / "exported")
    return dict(tmp=tmp, shape=shape, detail=detail, vq=vq, out=out)


def test_chain_folder_layout_and_window_bounds(chain):
    out = chain["out"]
    doc = json.loads((out / "refiner_chain.json").read_text())
    assert [(e["subfolder"], e["t_min"], e["t_max"]) for e in doc["experts"]] == [("unet", 250, 500),
                                                                                  ("unet_2", 0, 250)]
    assert doc["experts"][0]["boundary_ratio"] == 0.25 and doc["scale_factor"] == 0.8
    assert not (out / "model_index.json").exists()  # a partial-range chain is not an LDMPipeline
    sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert sched["beta_schedule"] == "scaled_linear" and sched["clip_sample"] is False
    assert sched["set_alpha_to_one"] is False and sched["steps_offset"] == 1
    assert json.loads((out / "vqvae" / "config.json").read_text())["scaling_factor"] == 0.8
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".exported")]  # no temp folder left


def test_model_card(chain):
    card = (chain["out"] / "README.md").read_text()
    for text in ("t in [250, 500)", "t in [0, 250)", "linear in sqrt(beta)", "beta 0.0015 -> 0.0195",
                 "| parameterization | eps |", "sha256:abc123", "| first-stage fingerprint | unknown |",
                 "| steps | 11 |", "best val/loss = 0.125", "| validation | not recorded |", "| scale factor | 0.8 |"):
        assert text in card, text


def test_export_import_round_trip_bit_identical(chain):
    from refiner.formats.loading import load_window_checkpoint

    for path, sub in ((chain["shape"], "unet"), (chain["detail"], "unet_2")):
        want = load_window_checkpoint(path).unet_state
        state, info = load_init_weights(chain["out"] / sub)
        assert set(state) == set(want) and all(torch.equal(state[k], want[k]) for k in want)
        assert info["kind"] == "diffusers" and info["scale_factor"] == 0.8 and info["parameterization"] == "eps"
    state, info = load_init_weights(chain["out"])  # the pipeline folder means its unet/
    assert info["window"] == "[250, 500)"
    vq = load_diffusers_vq(chain["out"] / "vqvae", expected_params=chain["vq"]["params"])
    assert all(torch.equal(vq.state_dict()[k], v) for k, v in chain["vq"]["state"].items())
    # through the config path the trainer and sampler use
    vq2 = build_first_stage(chain["out"] / "vqvae", chain["vq"]["params"])
    assert torch.equal(vq2.quantize.embedding.weight, chain["vq"]["state"]["quantize.embedding.weight"])


def _our_stages(chain):
    from refiner.formats.loading import load_window_checkpoint

    experts = []
    for p in (chain["shape"], chain["detail"]):
        ww = load_window_checkpoint(p)
        unet = ww.build_unet()
        experts.append(Expert(lambda x, t, u=unet: u(x, t), ww.window, ww.parameterization))
    return experts, ww.schedule.alphas_cumprod()


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_diffusers_ddim_loop_reproduces_refine(chain, eta):
    out = chain["out"]
    scheduler = diffusers.DDIMScheduler.from_pretrained(out, subfolder="scheduler")
    unets = [diffusers.UNet2DModel.from_pretrained(out, subfolder=s).eval() for s in ("unet", "unet_2")]
    experts, ac = _our_stages(chain)
    assert (scheduler.alphas_cumprod.double() - ac).abs().max() < 1e-6  # float32 vs our float64
    t_start, steps = 481, 25
    scheduler.set_timesteps(50)
    grid = [int(t) for t in scheduler.timesteps if t <= t_start]
    assert grid == timestep_grid(t_start, steps) == list(range(481, 0, -20))

    z = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    ours = refine(experts, z, t_start, steps, ac, eta=eta, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)  # same draws as refine: q_sample noise, then one per step
    x = scheduler.add_noise(z, torch.randn(z.shape, generator=g), torch.tensor([t_start]))
    for t in grid:
        unet = unets[0] if t >= 250 else unets[1]
        with torch.no_grad():
            eps = unet(x, t).sample
        noise = torch.randn(z.shape, generator=g) if eta else None
        x = scheduler.step(eps, t, x, eta=eta, variance_noise=noise).prev_sample
    err = (x - ours).abs().max().item()
    assert err < 1e-4 * max(1.0, ours.abs().max().item()), err
    if eta == 0:
        pipe = WindowChainPipeline.from_pretrained(out)
        noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(0))
        assert torch.allclose(pipe.refine_latents(z, t_start, 50, noise=noise), x, atol=1e-6)


def test_full_range_window_is_a_standard_ldm_pipeline(tmp_path):
    vq = make_first_stage_checkpoint(tmp_path, n_embed=16, embed_dim=3)
    fs = {"ckpt_path": str(vq["path"]), "params": vq["params"]}
    path = _window(tmp_path, "full.ckpt", (0, 1000), first_stage=fs, scale_factor=0.5)
    out = export_diffusers([path], tmp_path / "ldm")
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "LDMPipeline"
    pipe = diffusers.LDMPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=1, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    # the same two DDIM steps ([501, 1]) with our sampler and VQ, decoding latents / scale_factor
    from refiner.formats.loading import load_window_checkpoint
    from refiner.sampling import sample_ddim

    ww = load_window_checkpoint(path)
    unet = ww.build_unet()
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    z = sample_ddim(lambda x, t: unet(x, t), x, [501, 1], ww.schedule.alphas_cumprod())
    our_vq = build_first_stage(vq["path"], vq["params"]).eval()
    with torch.no_grad():
        ref = ((our_vq.decode(z / 0.5) / 2 + 0.5).clamp(0, 1)).permute(0, 2, 3, 1).numpy()
    assert images.shape == (1, 64, 64, 3)
    assert abs(images - ref).max() < 1e-4


def test_released_diffusers_folders_load(tmp_path):
    """Folders written by diffusers' own save_pretrained, configured like CompVis/ldm-celebahq-256 (no
    attn_norm_num_groups, default time shift), load into our UNet / VQ and give the same outputs."""
    cfg = dict(sample_size=16, in_channels=3, out_channels=3, block_out_channels=[32, 64, 96, 128],
               layers_per_block=2, attention_head_dim=32,
               down_block_types=["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
               up_block_types=["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"])
    unet = diffusers.UNet2DModel(**cfg)
    unet.load_state_dict(randomized(unet, 5))
    unet.save_pretrained(tmp_path / "pipe" / "unet")
    vq_cfg = vq_config(VQ_PARAMS, 1.0)
    vq = diffusers.VQModel(**{k: v for k, v in vq_cfg.items() if not k.startswith("_")})
    vq.load_state_dict(randomized(vq, 6, std=0.1))
    vq.save_pretrained(tmp_path / "pipe" / "vqvae")

    state, info = load_init_weights(tmp_path / "pipe")
    assert info["unet_params"]["attention_resolutions"] == [2, 4, 8]
    ours = UNetModel(**info["unet_params"])
    ours.load_state_dict(state)
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([42])
    with torch.no_grad():
        assert (ours.eval()(x, t) - unet.eval()(x, t).sample).abs().max() < TOL
    our_vq = build_first_stage(tmp_path / "pipe" / "vqvae", VQ_PARAMS).eval()
    img = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert (our_vq.encode(img) - vq.eval().encode(img).latents).abs().max() < TOL


def test_unsupported_diffusers_configs_are_named():
    with pytest.raises(DiffusersFormatError, match="up_block_types .* do not mirror"):
        unet_params_from_unet2d_config(dict(sample_size=8, block_out_channels=[32, 64], layers_per_block=1,
                                            down_block_types=["DownBlock2D", "AttnDownBlock2D"],
                                            up_block_types=["AttnUpBlock2D", "AttnUpBlock2D"]))
    with pytest.raises(DiffusersFormatError, match="mid-block attention has no GroupNorm"):
        unet_params_from_unet2d_config(dict(sample_size=8, block_out_channels=[32, 64], layers_per_block=1,
                                            down_block_types=["DownBlock2D", "DownBlock2D"],
                                            up_block_types=["UpBlock2D", "UpBlock2D"],
                                            resnet_time_scale_shift="scale_shift"))


def test_export_refusals(chain, tmp_path):
    with pytest.raises(OutputPathError, match="already exists; pass --force"):  # an output problem, not a format one
        export_diffusers([chain["shape"]], chain["out"])
    with pytest.raises(DiffusersFormatError, match="overlapping expert windows"):
        export_diffusers([chain["shape"], chain["shape"]], tmp_path / "x")
    inside = tmp_path / "host"
    inside.mkdir()
    copy = inside / "shape.ckpt"
    copy.write_bytes(Path(chain["shape"]).read_bytes())
    with pytest.raises(OutputPathError, match="contains the input"):
        export_diffusers([copy], inside, force=True)
    assert copy.is_file()
    fs = {"ckpt_path": str(chain["vq"]["path"]), "params": chain["vq"]["params"]}
    concat = _window(tmp_path, "concat.ckpt", (0, 1000), params=tiny_unet_params(in_channels=6),
                     first_stage=fs, conditioning="concat")
    with pytest.raises(DiffusersFormatError, match="concat-conditioned window"):
        export_diffusers([concat], tmp_path / "c")
    bare = _window(tmp_path, "bare.ckpt", (250, 500))
    with pytest.raises(DiffusersFormatError, match="no first stage"):
        export_diffusers([bare], tmp_path / "b")
    assert not (tmp_path / "b").exists() and not (tmp_path / "x").exists()


def test_cli_force_replaces_a_previous_export_atomically(chain, tmp_path):
    """--force replaces a previous export (issue 21: and only that; tests/test_export_folders.py has the rest)."""
    out = tmp_path / "cli_out"
    cmd = [sys.executable, "-m", "refiner", "export", "diffusers", str(chain["shape"]), str(out)]
    assert subprocess.run(cmd, capture_output=True, text=True, timeout=120).returncode == 0
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "already exists; pass --force" in res.stderr
    res = subprocess.run(cmd + ["--force", "--raw"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert (out / "unet" / "config.json").is_file()
    state, _ = load_diffusers_unet(out)
    raw = torch.load(chain["shape"], weights_only=True)["current_model_state"]
    assert torch.equal(state["out.2.weight"], raw["unet.out.2.weight"])
    (out / "stale.txt").write_text("old")  # something the export did not write: no longer an export of ours alone
    res = subprocess.run(cmd + ["--force"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "stale.txt" in res.stderr and (out / "stale.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cli_out"]


def test_finetune_config_takes_diffusers_folder(chain, compose_train):
    """init_from=<folder> and first_stage.f4.ckpt_path=<folder>/vqvae pass validation and load strictly."""
    from hydra.utils import instantiate

    from refiner.apps.train import apply_init_from, read_init_from, validate

    out = chain["out"]
    cfg = compose_train(f"init_from={out}", f"first_stage.f4.ckpt_path={out}/vqvae",
                        "first_stage.f4.params.n_embed=16", "first_stage.f4.params.ddconfig.ch=32",
                        "model.scale_factor=0.8", "model.unet.num_head_channels=16",
                        "model.unet.use_scale_shift_norm=false")
    validate(cfg)
    state, info = read_init_from(cfg)
    model = instantiate(cfg.model)
    apply_init_from(model, cfg, state, info)
    assert torch.equal(model.unet.out[2].weight, state["out.2.weight"])
    assert model.load_decoder().quantize.embedding.weight.shape == (16, 3)


def test_schedules_map_to_diffusers_betas():
    """Each of our schedules against the DDIMScheduler built from the exported config."""
    from refiner.formats.diffusers.config import schedule_from_scheduler_config, scheduler_config

    for sched in (ScheduleConfig(), ScheduleConfig("linear_beta", 1000, 1e-4, 2e-2), ScheduleConfig("cosine")):
        cfg = scheduler_config(sched, "v")
        ddim = diffusers.DDIMScheduler(**{k: v for k, v in cfg.items() if not k.startswith("_")})
        assert (ddim.betas.double() - sched.betas()).abs().max() < 1e-6, sched.kind
        back, pred = schedule_from_scheduler_config(cfg)
        assert pred == "v" and back.kind == sched.kind and back.num_timesteps == 1000
    with pytest.raises(CheckpointError, match="beta_schedule"):
        schedule_from_scheduler_config({"beta_schedule": "sigmoid"})
    assert Window(0, 1000).contains(999)
