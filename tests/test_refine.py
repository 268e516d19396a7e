"""refine.py / refiner.apps.refine (Chain, Pipeline): tiny VQ and window checkpoints in the real layouts, tiny images."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, compose_config
from helpers_compvis import first_stage_loss_keys, make_window_checkpoint
from PIL import Image

from refiner.apps.refine import run
from refiner.data.images import crop_to, load_image, pad_to_multiple, to_tensor, to_uint8
from refiner.errors import RefineError, SettingError
from refiner.experts import Expert, refine
from refiner.formats.first_stage import build_first_stage
from refiner.formats.loading import load_window_weights
from refiner.inference import batch_refine, refine_run
from refiner.inference.chain import Chain
from refiner.inference.outputs import plan_outputs
from refiner.inference.pipeline import Pipeline, Tiling
from refiner.models.unet import UNetModel, tiny_unet_params
from refiner.models.vq import VQModel, tiny_ddconfig
from refiner.settings import from_config

STEPS = 4


pytestmark = pytest.mark.usefixtures("one_thread")


def _vq_checkpoint(d: Path, factor: int, n_embed: int, embed_dim: int, name: str) -> Path:
    """A taming/CompVis-layout first-stage checkpoint (encoder./decoder./quantize./quant_conv./
    post_quant_conv. plus loss.* training keys) with default init and a codebook drawn from encoder
    latents, so decoding depends on the input (helpers_compvis' std-0.05 weights give a near-constant,
    and very slow, autoencoder)."""
    torch.manual_seed(factor)
    vq = VQModel(tiny_ddconfig(factor), n_embed, embed_dim)
    with torch.no_grad():
        h = vq.encode(torch.rand(4, 3, 64, 64) * 2 - 1).permute(0, 2, 3, 1).reshape(-1, embed_dim)
        pick = torch.randint(0, len(h), (n_embed,))
        vq.quantize.embedding.weight.copy_(h[pick] + 0.01 * torch.randn(n_embed, embed_dim))
    path = d / name
    torch.save({"epoch": 1, "global_step": 100, "state_dict": {**vq.state_dict(), **first_stage_loss_keys()}}, path)
    return path


def _window_checkpoint(d: Path, window, name: str, unet_params: dict | None = None, **hp) -> Path:
    """helpers_compvis.make_window_checkpoint (our Lightning + EMA layout) with default-init UNet weights
    and a small random output conv (the default zero-init one would predict eps = 0)."""
    unet_params = unet_params or tiny_unet_params()
    made = make_window_checkpoint(d, unet_params, window=window, name=name)
    torch.manual_seed(window[0] + 7)
    unet = UNetModel(**unet_params)
    with torch.no_grad():
        unet.out[2].weight.normal_(0, 0.02)
    state = {f"unet.{k}": v for k, v in unet.state_dict().items()}
    ckpt = torch.load(made["path"], weights_only=True)
    ckpt["state_dict"], ckpt["current_model_state"] = state, dict(state)
    ckpt["hyper_parameters"].update(hp)
    torch.save(ckpt, made["path"])
    return made["path"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Demo-shaped first stages (conf/first_stage/demo.yaml params) and window experts."""
    d = tmp_path_factory.mktemp("models")
    return dict(
        f4=_vq_checkpoint(d, 4, n_embed=512, embed_dim=3, name="vq_f4.ckpt"),
        f8=_vq_checkpoint(d, 8, n_embed=256, embed_dim=4, name="vq_f8.ckpt"),
        hi=_window_checkpoint(d, (250, 500), "hi.ckpt"),
        lo=_window_checkpoint(d, (0, 250), "lo.ckpt"),
        gap_lo=_window_checkpoint(d, (0, 200), "gap_lo.ckpt"),
        dir=d,
    )


def _overrides(models, inputs, output_dir, *extra, experts=("hi", "lo")):
    return [
        f"inputs={inputs}",
        f"experts=[{','.join(str(models[s]) for s in experts)}]",
        f"first_stage.f4.ckpt_path={models['f4']}",
        f"first_stage.f8.ckpt_path={models['f8']}",
        f"output_dir={output_dir}",
        f"steps={STEPS}", "progress=false", *extra,
    ]


def _compose(models, inputs, output_dir, *extra, experts=("hi", "lo")):
    return compose_config("refine", _overrides(models, inputs, output_dir, *extra, experts=experts), output_dir)


def _rgb(h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture
def mixed_inputs(tmp_path):
    """A corrupt PNG, an RGBA PNG, a grayscale JPEG and an odd-sized (37x53) RGB PNG."""
    d = tmp_path / "in"
    d.mkdir()
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    rgba = np.dstack([_rgb(32, 32, 1), np.full((32, 32), 128, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(d / "rgba.png")
    Image.fromarray(_rgb(24, 40, 2)[..., 0], "L").save(d / "gray.jpg")
    Image.fromarray(_rgb(53, 37, 3)).save(d / "odd.png")  # H=53, W=37
    return d


def _sizes(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: Image.open(p).size for p in folder.glob("*.png")}


def test_folder_with_bad_and_odd_images(models, mixed_inputs, tmp_path):
    out = tmp_path / "out"
    summary = run(_compose(models, mixed_inputs, out, "grid=per_image"))
    assert _sizes(out) == {"rgba.png": (32, 32), "gray.png": (40, 24), "odd.png": (37, 53)}
    assert [f["input"] for f in summary["failed"]] == [str(mixed_inputs / "corrupt.png")]
    assert "cannot read image" in summary["failed"][0]["reason"]
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["failed"] == summary["failed"] and len(on_disk["processed"]) == 3
    assert sorted(on_disk["outputs"]) == sorted(str(out / n) for n in ("rgba.png", "gray.png", "odd.png"))
    assert (out / "config_resolved.yaml").is_file()
    # per-image grid: 1 row, input | after expert 1 | after expert 2, each padded by 2 px
    grid = np.asarray(Image.open(out / "grids" / "odd.png"))
    assert grid.shape == (53 + 4, 3 * (37 + 4), 3)
    first = grid[2:55, 2:39]
    assert np.abs(first.astype(int) - load_image(mixed_inputs / "odd.png").astype(int)).max() <= 1


def _manual_refine(models, keys, image: np.ndarray, noise_seed: int, scale: float = 1.0, stages_out: list | None = None
                   ) -> np.ndarray:
    """The pipeline written out by hand: pad to 16 (f4 factor 4 x UNet downsampling 4), encode, scale,
    refine from t=499 with noise from ``noise_seed`` (concat experts get the scaled latent), unscale,
    decode, crop. ``stages_out`` receives each expert's decoded x0 (uint8) in run order."""
    f4 = build_first_stage(models["f4"], dict(ddconfig=tiny_ddconfig(4), n_embed=512, embed_dim=3)).eval()
    x, size = pad_to_multiple(to_tensor(image)[None], 16)
    with torch.no_grad():
        z = f4.encode(x) * scale
        experts = []
        for key in keys:
            ww = load_window_weights(models[key])
            unet, cond = ww.build_unet(), (z if ww.conditioning == "concat" else None)
            experts.append(Expert(lambda x, t, unet=unet, cond=cond: unet(x, t, concat=cond), ww.window,
                                ww.parameterization))
        noise = torch.randn(z.shape[1:], generator=torch.Generator().manual_seed(noise_seed))[None]
        res = refine(experts, z, 499, STEPS, ww.schedule.alphas_cumprod(), noise=noise, return_expert_outputs=True)
        if stages_out is not None:
            stages_out += [to_uint8(crop_to(f4.decode(x0 / scale), size)[0]) for x0 in res.expert_x0]
        return to_uint8(crop_to(f4.decode(res.latent / scale), size)[0])


def _max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def test_refined_output_matches_manual_pipeline(models, mixed_inputs, tmp_path):
    out = tmp_path / "out"
    run(_compose(models, mixed_inputs, out, "seed=5", "grid=none"))
    index = [p.name for p in sorted(mixed_inputs.iterdir())].index("odd.png")  # corrupt, gray, odd, rgba
    image = load_image(mixed_inputs / "odd.png")
    assert pad_to_multiple(to_tensor(image), 16)[0].shape[-2:] == (64, 48)
    got = np.asarray(Image.open(out / "odd.png"))
    assert _max_diff(got, _manual_refine(models, ("hi", "lo"), image, 5 + index)) <= 1
    assert np.abs(got.astype(int) - image.astype(int)).mean() > 1  # it did change the picture


def test_scale_factor_is_applied(models, tmp_path):
    """z = encode(x) * scale_factor before refining, decode(z_ref / scale_factor) after."""
    models = {**models, "hi": _window_checkpoint(tmp_path, (250, 500), "hi_s.ckpt", scale_factor=0.5),
              "lo": _window_checkpoint(tmp_path, (0, 250), "lo_s.ckpt", scale_factor=0.5)}
    d = tmp_path / "in"
    d.mkdir()
    Image.fromarray(_rgb(16, 16, 0)).save(d / "a.png")
    run(_compose(models, d, tmp_path / "out"))
    got = np.asarray(Image.open(tmp_path / "out" / "a.png"))
    assert _max_diff(got, _manual_refine(models, ("hi", "lo"), _rgb(16, 16, 0), 0, scale=0.5)) <= 1
    assert _max_diff(got, _manual_refine(models, ("hi", "lo"), _rgb(16, 16, 0), 0, scale=1.0)) > 1


def test_bf16_precision_is_close_to_fp32_but_not_identical(models, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    Image.fromarray(_rgb(16, 16, 3)).save(d / "a.png")
    run(_compose(models, d, tmp_path / "fp32", "grid=none"))
    run(_compose(models, d, tmp_path / "bf16", "grid=none", "precision=bf16"))
    a = np.asarray(Image.open(tmp_path / "fp32" / "a.png")).astype(int)
    b = np.asarray(Image.open(tmp_path / "bf16" / "a.png")).astype(int)
    assert np.abs(a - b).mean() < 8
    (fp32,), (bf16,) = (Chain.from_paths([str(models["hi"])], precision=p).experts for p in ("fp32", "bf16"))
    x, t = torch.randn(1, 3, 8, 8), torch.tensor([300])
    out32, out16 = fp32.expert(None).model(x, t), bf16.expert(None).model(x, t)
    assert out16.dtype == torch.float32 and not torch.equal(out32, out16)  # autocast really ran
    torch.testing.assert_close(out16, out32, rtol=0.05, atol=0.05)
    with pytest.raises(Exception, match="precision"):
        run(_compose(models, d, tmp_path / "x", "precision=fp16"))


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_batching_does_not_change_results(models, tmp_path, eta):
    """refine.py with batch_size 1 and 3 (any eta: the step noise is per image too): within one uint8 level."""
    d = tmp_path / "in"
    d.mkdir()
    for i in range(3):
        Image.fromarray(_rgb(16, 16, 10 + i)).save(d / f"im{i}.png")
    run(_compose(models, d, tmp_path / "b1", "batch_size=1", "grid=none", f"eta={eta}"))
    run(_compose(models, d, tmp_path / "b3", "batch_size=3", "grid=none", f"eta={eta}"))
    for i in range(3):
        a = np.asarray(Image.open(tmp_path / "b1" / f"im{i}.png")).astype(int)
        b = np.asarray(Image.open(tmp_path / "b3" / f"im{i}.png")).astype(int)
        assert np.abs(a - b).max() <= 1
    a0 = np.asarray(Image.open(tmp_path / "b1" / "im0.png")).astype(int)
    assert np.abs(a0 - np.asarray(Image.open(tmp_path / "b1" / "im1.png")).astype(int)).mean() > 1


@pytest.mark.parametrize("tiling", ["never", "always"])
def test_stochastic_refinement_of_a_batch_equals_one_image_at_a_time(models, tiling):
    """eta = 0.5: every draw of image i (q_sample noise, then each DDIM step's noise) comes from its own generator
    seed + i, so a batch of 3 equals the three images refined one at a time. Whole images: same noise, but the
    UNets' and the VQ's batched convolutions round differently from batch 1, so the decoded expert x0s agree to float
    tolerance (measured max 5.2e-6; bound 1e-4) and the uint8 outputs within one level (measured: identical).
    Tiled images run one at a time anyway: bit for bit. With one step-noise generator per batch (the old rule)
    images 1 and 2 got other noise and differed by far more."""
    f4 = build_first_stage(models["f4"], dict(ddconfig=tiny_ddconfig(4), n_embed=512, embed_dim=3)).eval()
    chain = Chain.from_paths([str(models["hi"]), str(models["lo"])])
    pipe = Pipeline(f4, chain, tiling=Tiling(mode=tiling, f4_tile=16, f4_overlap=8, latent_tile=4, latent_stride=2))
    images = [_rgb(20, 24, 30 + i) for i in range(3)]
    kw = dict(t_start=499, steps=STEPS, seed=7, eta=0.5, with_stages=True)
    batch, batch_stages = pipe.refine_images(images, indices=[4, 5, 6], **kw)
    for j in range(3):
        (alone,), (alone_stages,) = pipe.refine_images([images[j]], indices=[4 + j], **kw)
        assert len(alone_stages) == len(batch_stages[j]) == 2
        if tiling == "always":
            assert np.array_equal(batch[j], alone) and all(map(torch.equal, batch_stages[j], alone_stages)), j
        else:
            assert _max_diff(batch[j], alone) <= 1, j
            for a, b in zip(batch_stages[j], alone_stages):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    deterministic = pipe.refine_images(images, indices=[4, 5, 6], **{**kw, "eta": 0.0})[0]
    assert all(_max_diff(a, b) > 0 for a, b in zip(batch, deterministic))  # eta really adds noise


def test_output_dir_equal_to_input_folder_is_refused(models, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    Image.fromarray(_rgb(16, 16, 0)).save(d / "a.png")
    Image.fromarray(_rgb(16, 16, 1)).save(d / "b.jpg")
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    with pytest.raises(RefineError, match="would overwrite the input image"):
        run(_compose(models, d, d))
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before  # nothing written, nothing changed


def test_plan_outputs_deduplicates_stems(tmp_path):
    a, b = tmp_path / "x" / "im.png", tmp_path / "y" / "im.jpg"
    c = tmp_path / "x" / "im.JPG"
    outs = plan_outputs([a, b, c], tmp_path / "out")
    assert [o.name for o in outs] == ["im.png", "im-2.png", "im-3.png"]
    with pytest.raises(RefineError, match="would overwrite"):
        plan_outputs([a, b], tmp_path / "x")


@pytest.mark.parametrize("experts, extra, message", [
    (("hi", "gap_lo"), ["steps=50"], r"gap \[200, 250\)"),
    (("hi", "lo"), ["t_start=700"], "above the top window"),
])
def test_bad_chain_fails_before_any_image(models, tmp_path, monkeypatch, experts, extra, message):
    def no_images(*a, **k):
        raise AssertionError("an image was loaded before the chain was validated")

    monkeypatch.setattr(batch_refine, "load_image", no_images)
    monkeypatch.setattr(refine_run, "scan_images", no_images)
    cfg = _compose(models, tmp_path / "does_not_exist", tmp_path / "out", *extra,
                   "first_stage.f4.ckpt_path=/nonexistent/vq.ckpt", experts=experts)
    with pytest.raises(RefineError, match=message):
        run(cfg)
    assert not (tmp_path / "out").exists()


def test_stages_must_share_schedule_and_scale_factor(models, tmp_path):
    for field, value, message in (("schedule", {"linear_end": 0.012}, "share a noise schedule"),
                                  ("scale_factor", 0.5, "share scale_factor")):
        ckpt = torch.load(models["lo"], weights_only=True)
        hp = ckpt["hyper_parameters"]
        hp[field] = {**hp[field], **value} if isinstance(value, dict) else value
        path = tmp_path / f"lo_{field}.ckpt"
        torch.save(ckpt, path)
        with pytest.raises(RefineError, match=message):
            Chain.from_paths([str(models["hi"]), str(path)])


def test_concat_stage_gets_the_degraded_latent(models, tmp_path):
    """A conditioning='concat' UNet (in_channels 6) only runs if the latent is concatenated."""
    concat = _window_checkpoint(tmp_path, (250, 500), "c.ckpt", tiny_unet_params(in_channels=6), conditioning="concat")
    d = tmp_path / "in"
    d.mkdir()
    Image.fromarray(_rgb(16, 16, 0)).save(d / "a.png")
    models = {**models, "concat": concat}
    summary = run(_compose(models, d, tmp_path / "out", experts=("concat", "lo")))
    assert not summary["failed"]
    got = np.asarray(Image.open(tmp_path / "out" / "a.png"))
    assert _max_diff(got, _manual_refine(models, ("concat", "lo"), _rgb(16, 16, 0), 0)) <= 1
    # and a concat UNet whose channels do not fit the f4 latent is refused up front
    chain = Chain.from_paths([str(concat)])
    with pytest.raises(RefineError, match="in/out channels"):
        chain.check_latent_channels(4)
    f8 = build_first_stage(models["f8"], dict(ddconfig=tiny_ddconfig(8), n_embed=256, embed_dim=4))
    with pytest.raises(RefineError, match="in/out channels"):  # check_first_stage checks the channels first
        chain.check_first_stage(f8, "the f8")


def test_oversized_image_is_refused_others_processed(models, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    Image.fromarray(_rgb(16, 16, 0)).save(d / "small.png")
    Image.fromarray(_rgb(40, 40, 1)).save(d / "big.png")
    summary = run(_compose(models, d, tmp_path / "out", "max_pixels=1000"))
    assert [f["input"] for f in summary["failed"]] == [str(d / "big.png")]
    assert "max_pixels=1000" in summary["failed"][0]["reason"]
    assert _sizes(tmp_path / "out") == {"small.png": (16, 16), "grid.png": (1 * (16 + 4) * 3, 16 + 4)}


def test_evaluate_mode_writes_metrics_and_grid(models, tmp_path, capsys):
    d = tmp_path / "clean"
    d.mkdir()
    from skimage import data

    astro = np.asarray(Image.fromarray(data.astronaut()).resize((32, 32)))
    coffee = np.asarray(Image.fromarray(data.coffee()).resize((48, 32)))  # W 48, H 32: a different size
    Image.fromarray(astro).save(d / "astro.png")
    Image.fromarray(coffee).save(d / "coffee.png")
    out = tmp_path / "out"
    summary = run(_compose(models, d, out, "mode=evaluate"))
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("degraded_vs_clean", "refined_vs_clean"):
        assert {"psnr", "ssim", "swd_x1e3", "psnr_per_image", "ssim_per_image"} <= set(metrics[key])
        assert len(metrics[key]["psnr_per_image"]) == 2
    assert metrics["swd_crop_size"] == [32, 32] and metrics["all_same_size"] is False
    # per-image PSNR is computed on the full images: check one against a hand computation
    clean = load_image(d / "coffee.png").astype(np.float64) / 255
    refined = load_image(out / "coffee.png").astype(np.float64) / 255
    hand = 10 * np.log10(1.0 / np.mean((refined - clean) ** 2))
    assert metrics["refined_vs_clean"]["psnr_per_image"][1] == pytest.approx(hand, abs=1e-6)
    assert metrics["degraded_vs_clean"]["psnr"] != metrics["refined_vs_clean"]["psnr"]
    # comparison grid: one row per image, clean | degraded | after expert 1 | after expert 2, padded to 32x48
    grid = np.asarray(Image.open(summary["grid"]))
    assert grid.shape == (2 * (32 + 4), 4 * (48 + 4), 3)
    assert _max_diff(grid[2:34, 2:34], astro) <= 1
    # degraded = VQ-f8 round trip of the clean image (32x32 needs no padding for f8), stored as uint8;
    # the refined output is the refinement of that degraded image (seed 0 + index 0)
    f8 = build_first_stage(models["f8"], dict(ddconfig=tiny_ddconfig(8), n_embed=256, embed_dim=4)).eval()
    with torch.no_grad():
        degraded = to_uint8(f8.round_trip(to_tensor(astro)[None])[0])
    assert _max_diff(grid[2:34, 54:86], degraded) <= 1
    after = []
    refined = _manual_refine(models, ("hi", "lo"), degraded, 0, stages_out=after)
    assert len(after) == 2
    assert _max_diff(grid[2:34, 106:138], after[0]) <= 1 and _max_diff(grid[2:34, 158:190], after[1]) <= 1
    hand = 10 * np.log10(1.0 / np.mean((degraded / 255 - astro / 255) ** 2))
    assert metrics["degraded_vs_clean"]["psnr_per_image"][0] == pytest.approx(hand, abs=1e-3)
    assert _max_diff(np.asarray(Image.open(out / "astro.png")), refined) <= 1
    printed = capsys.readouterr().out
    assert "PSNR" in printed and "comparison grid:" in printed and summary["grid"] in printed


def test_cli_exit_code_and_stderr(models, mixed_inputs, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "refine.py", *_overrides(models, mixed_inputs, out), f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert f"failed: {mixed_inputs / 'corrupt.png'}" in proc.stderr
    assert {"rgba.png", "gray.png", "odd.png"} <= set(_sizes(out))
    assert json.loads((out / "summary.json").read_text())["failed"][0]["input"].endswith("corrupt.png")


def test_cli_bad_chain_exits_2_before_processing(models, mixed_inputs, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "refine.py", *_overrides(models, mixed_inputs, out, "steps=50", experts=("hi", "gap_lo")),
           f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: invalid expert chain" in proc.stderr and "gap [200, 250)" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()


# -- issue 9, class 2: the first stage a window was trained with is checked ---------------------------------
def _other_f4(models, tmp_path) -> Path:
    """The demo f4 checkpoint with slightly different decoder weights: same shapes, another autoencoder."""
    ckpt = torch.load(models["f4"], weights_only=True)
    ckpt["state_dict"]["decoder.conv_out.bias"] = ckpt["state_dict"]["decoder.conv_out.bias"] + 0.1
    path = tmp_path / "other_f4.ckpt"
    torch.save(ckpt, path)
    return path


def test_windows_run_with_another_first_stage_are_refused(models, tmp_path, monkeypatch):
    import warnings

    from refiner.formats.first_stage import first_stage_file_fingerprint
    from refiner.formats.fingerprint import FirstStageMismatch
    from refiner.formats.exports import export_safetensors

    fp = first_stage_file_fingerprint(models["f4"])
    other = _other_f4(models, tmp_path)
    other_fp = first_stage_file_fingerprint(other)
    assert other_fp != fp
    # windows that record their f4 as training does (fingerprint and architecture): nothing left unchecked
    recorded = dict(first_stage_fingerprint=fp, first_stage={"ckpt_path": str(models["f4"]), "params": dict(
        ddconfig=tiny_ddconfig(4), n_embed=512, embed_dim=3)})
    hi = _window_checkpoint(tmp_path, (250, 500), "hi_fp.ckpt", **recorded)
    lo = export_safetensors(_window_checkpoint(tmp_path, (0, 250), "lo_fp.ckpt", **recorded),
                            tmp_path / "lo_fp.safetensors")
    fp_models = {**models, "hi": hi, "lo": lo}
    d = tmp_path / "in"
    d.mkdir()
    Image.fromarray(_rgb(16, 16, 0)).save(d / "a.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the right first stage: no fingerprint or architecture warning at all
        summary = run(_compose(fp_models, d, tmp_path / "ok", "grid=none"))
    assert summary["first_stage_fingerprint"] == fp and not summary["failed"]

    def no_images(*a, **k):
        raise AssertionError("an image was loaded before the first stage was checked")

    with monkeypatch.context() as m:
        m.setattr(batch_refine, "load_image", no_images)
        with pytest.raises(FirstStageMismatch) as err:
            run(_compose(fp_models, d, tmp_path / "bad", f"first_stage.f4.ckpt_path={other}"))
    message = str(err.value)
    assert all(s in message for s in ("hi_fp.ckpt", fp, str(other), other_fp, "allow_first_stage_mismatch=true"))
    assert "\n" not in message and not (tmp_path / "bad").exists()
    with pytest.warns(UserWarning, match="first stage mismatch"):
        summary = run(_compose(fp_models, d, tmp_path / "allowed", f"first_stage.f4.ckpt_path={other}",
                               "allow_first_stage_mismatch=true", "grid=none"))
    assert not summary["failed"]
    # windows of one chain must agree with each other
    stray = _window_checkpoint(tmp_path, (0, 250), "lo_other.ckpt", first_stage_fingerprint=other_fp)
    with pytest.raises(FirstStageMismatch, match="one chain"):
        run(_compose({**fp_models, "lo": stray}, d, tmp_path / "chain"))
    # a window written before fingerprints existed only warns
    with pytest.warns(UserWarning, match="records no first-stage fingerprint"):
        run(_compose(models, d, tmp_path / "old", "grid=none"))


# -- issue 9, classes 3 and 4: output_dir is never clobbered; re-runs resume; reserved names ----------------
def test_unrelated_file_in_output_dir_is_never_replaced(models, tmp_path, monkeypatch):
    d = tmp_path / "dir"
    d.mkdir()
    Image.fromarray(_rgb(16, 16, 0)).save(d / "photo.jpg")
    Image.fromarray(_rgb(16, 16, 1)).save(d / "photo.png")  # not an input (the glob takes *.jpg only)
    (d / "summary.json").write_text('{"mine": true}')
    before = {p.name: p.read_bytes() for p in d.iterdir()}

    def no_images(*a, **k):
        raise AssertionError("an image was refined before the output folder was checked")

    with monkeypatch.context() as m:
        m.setattr(batch_refine, "load_image", no_images)
        with pytest.raises(RefineError, match=r"(?s)2 file\(s\).*photo\.png \(not written by refiner\).*summary\.json.*"
                                              r"overwrite=true"):
            run(_compose(models, f"'{d}/*.jpg'", d))
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before
    summary = run(_compose(models, f"'{d}/*.jpg'", d, "overwrite=true", "grid=none"))
    assert summary["outputs"] == [str(d / "photo.png")] and (d / "photo.png").read_bytes() != before["photo.png"]
    assert (d / "photo.jpg").read_bytes() == before["photo.jpg"]


def test_rerun_skips_finished_outputs_and_refuses_to_replace_other_settings(models, tmp_path):
    from refiner.data.images import save_png_atomic
    from refiner.inference.outputs import png_text, read_png_record

    d = tmp_path / "in"
    d.mkdir()
    for i in range(3):
        Image.fromarray(_rgb(16, 16, 20 + i)).save(d / f"im{i}.png")
    out = tmp_path / "out"
    first = run(_compose(models, d, out))
    assert len(first["processed"]) == 3 and not first["skipped"]
    record = read_png_record(out / "im1.png")
    assert record["noise_seed"] == 1 and len(record["settings"]) == 16
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("im*.png")}
    # damage one output's pixels while keeping its record: it is refined again, the others are skipped
    damaged = np.asarray(Image.open(out / "im2.png")).copy()
    damaged[0, 0] ^= 255
    save_png_atomic(out / "im2.png", damaged, text=png_text(read_png_record(out / "im2.png")))
    second = run(_compose(models, d, out))
    assert [Path(r["input"]).name for r in second["skipped"]] == ["im0.png", "im1.png"]
    assert [Path(r["input"]).name for r in second["processed"]] == ["im2.png"]
    assert sorted(second["outputs"]) == sorted(str(out / f"im{i}.png") for i in range(3))
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("im[01].png")} == {k: stamps[k] for k in ("im0.png", "im1.png")}
    assert json.loads((out / "summary.json").read_text())["skipped"] == second["skipped"]
    # other settings: nothing is replaced without overwrite=true
    before = {p.name: p.read_bytes() for p in out.glob("im*.png")}
    with pytest.raises(RefineError, match="other settings"):
        run(_compose(models, d, out, "steps=3"))
    assert {p.name: p.read_bytes() for p in out.glob("im*.png")} == before
    third = run(_compose(models, d, out, "steps=3", "overwrite=true"))
    assert len(third["processed"]) == 3 and {p.name: p.read_bytes() for p in out.glob("im*.png")} != before


def test_reserved_output_names_never_collide_with_refined_images(models, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    Image.fromarray(_rgb(16, 16, 0)).save(d / "grid.png")
    Image.fromarray(_rgb(24, 16, 1)).save(d / "Comparison_Grid.jpg")
    out = tmp_path / "out"
    summary = run(_compose(models, d, out, "grid=both"))
    assert sorted(summary["outputs"]) == [str(out / "Comparison_Grid-2.png"), str(out / "grid-2.png")]
    assert _max_diff(np.asarray(Image.open(out / "grid-2.png")), _manual_refine(models, ("hi", "lo"), _rgb(16, 16, 0), 1)) <= 1
    assert Image.open(out / "grid.png").size == (3 * (16 + 4), 2 * (24 + 4))  # the combined grid, two rows
    assert (out / "grids" / "grid-2.png").is_file()
    assert plan_outputs([d / "summary.png", d / "grids.png"], out) == [out / "summary.png", out / "grids.png"]


# -- issue 9, class 8: every format PIL opens is refined; everything else is reported -----------------------
def test_gif_and_other_pil_formats_are_refined_and_other_files_reported(models, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    Image.fromarray(_rgb(16, 16, 0)).save(d / "anim.gif")
    Image.fromarray(_rgb(16, 16, 1)).save(d / "pic.ppm")
    (d / "readme.txt").write_text("not an image")
    summary = run(_compose(models, d, tmp_path / "out", "grid=none"))
    assert sorted(Path(o).name for o in summary["outputs"]) == ["anim.png", "pic.png"]
    assert [(Path(i["file"]).name, "not an image" in i["reason"]) for i in summary["ignored"]] == [("readme.txt", True)]
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["ignored"] == summary["ignored"]


def test_an_output_that_is_a_link_to_an_input_is_refused(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(_rgb(8, 8, 0)).save(src / "b.png")
    Image.fromarray(_rgb(8, 8, 1)).save(src / "a.jpg")
    out = tmp_path / "out"
    out.mkdir()
    os.link(src / "b.png", out / "a.png")  # the output of a.jpg would be written through onto input b.png
    with pytest.raises(RefineError, match=r"out/a\.png would overwrite the input image .*src/b\.png"):
        plan_outputs([src / "a.jpg", src / "b.png"], out)
    (out / "a.png").unlink()
    (out / "a.png").symlink_to(src / "b.png")
    with pytest.raises(RefineError, match="would overwrite the input image"):
        plan_outputs([src / "a.jpg", src / "b.png"], out)


# -- issue 10: large images (tiling) and progressive upscaling in refine.py ----------------------------------
SMALL_TILES = ["tiling.f4_tile=32", "tiling.f4_overlap=16", "tiling.latent_tile=8", "tiling.latent_stride=4"]


def _one_image(tmp_path, h, w, seed=0, name="a.png") -> Path:
    d = tmp_path / "in"
    d.mkdir(exist_ok=True)
    Image.fromarray(_rgb(h, w, seed)).save(d / name)
    return d


def test_defaults_tile_automatically_and_set_no_pixel_limit(models, tmp_path):
    cfg = _compose(models, tmp_path, tmp_path / "out")
    assert cfg.max_pixels is None and cfg.upscale == 1 and cfg.tiling.mode == "auto"
    from refiner.inference.pipeline import AUTO_ABOVE_PIXELS, Tiling

    assert from_config(Tiling, dict(cfg.tiling)) == Tiling() and cfg.tiling.auto_above_pixels == AUTO_ABOVE_PIXELS


def test_tiling_with_tiles_covering_the_image_is_exactly_the_whole_pipeline(models, tmp_path):
    """One VQ tile and one (jittered) latent tile cover a 48x48 image: the tiled, one-image-at-a-time route must
    reproduce the whole-image route bit for bit (same noise per image; whole images one at a time, since a batch
    of two may round differently, see test_batching_does_not_change_results)."""
    d = _one_image(tmp_path, 48, 48, 1)
    Image.fromarray(_rgb(48, 48, 2)).save(d / "b.png")
    run(_compose(models, d, tmp_path / "whole", "tiling.mode=never", "grid=none", "batch_size=1"))
    run(_compose(models, d, tmp_path / "tiled", "tiling.mode=always", "tiling.f4_tile=64", "tiling.latent_tile=12",
                 "tiling.latent_stride=4", "tiling.jitter=true", "grid=none", "batch_size=2"))
    for name in ("a.png", "b.png"):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "whole" / name)),
                              np.asarray(Image.open(tmp_path / "tiled" / name)))


def test_auto_tiling_switches_on_above_the_threshold_and_matches_the_tiled_library_path(models, tmp_path):
    from refiner.inference.tiling import tiled_decode, tiled_encode

    d = _one_image(tmp_path, 32, 32, 3, "a_small.png")  # 1024 px: whole
    Image.fromarray(_rgb(64, 80, 4)).save(d / "b_big.png")  # 5120 px: tiled
    extra = ["tiling.auto_above_pixels=2048", "grid=none", "seed=3", *SMALL_TILES]
    summary = run(_compose(models, d, tmp_path / "auto", *extra))
    run(_compose(models, d, tmp_path / "never", *extra, "tiling.mode=never"))
    assert summary["tiling"]["auto_above_pixels"] == 2048 and not summary["failed"]
    small = [np.asarray(Image.open(tmp_path / k / "a_small.png")) for k in ("auto", "never")]
    big = [np.asarray(Image.open(tmp_path / k / "b_big.png")).astype(int) for k in ("auto", "never")]
    assert np.array_equal(*small)
    assert np.abs(big[0] - big[1]).mean() > 0.5  # tiled: really another computation...
    # ...namely the library's tiles, by hand: tiled encode, MultiDiffusion with jitter seeded by the noise seed
    # (seed 3 + index 1), tiled decode
    f4 = build_first_stage(models["f4"], dict(ddconfig=tiny_ddconfig(4), n_embed=512, embed_dim=3)).eval()
    chain = Chain.from_paths([str(models["hi"]), str(models["lo"])])
    x = to_tensor(load_image(d / "b_big.png"))[None]
    with torch.no_grad():
        z = tiled_encode(f4, x, 32, 16)
        noise = torch.randn(z.shape[1:], generator=torch.Generator().manual_seed(4))[None]
        z = chain.refine(z, 499, STEPS, noise=noise, tiles=dict(tile=8, stride=4, jitter=True, seed=4,
                                                                 view_batch_size=4)).latent
        hand = to_uint8(tiled_decode(f4, z, 32, 16)[0])
    assert _max_diff(big[0].astype(np.uint8), hand) <= 1


def test_upscale_refines_progressively_into_a_larger_image(models, tmp_path):
    d = _one_image(tmp_path, 32, 32, 5)
    out = tmp_path / "out"
    summary = run(_compose(models, d, out, "upscale=2", "tiling.mode=always", "tiling.f4_tile=64", "seed=2",
                           "tiling.latent_tile=8", "tiling.latent_stride=4"))
    assert _sizes(out)["a.png"] == (64, 64) and summary["upscale"] == 2
    assert summary["grid_columns"] == ["input (bicubic x2)", "refined (x2, progressive)"]
    assert Image.open(out / "grid.png").size == (2 * (64 + 4), 64 + 4)
    # by hand: whole encode (one 64 px VQ tile), DemoFusion phases on 8/4 latent tiles with jitter, every draw from
    # the noise seed 2 + 0, whole decode of the 64x64 result
    f4 = build_first_stage(models["f4"], dict(ddconfig=tiny_ddconfig(4), n_embed=512, embed_dim=3)).eval()
    chain = Chain.from_paths([str(models["hi"]), str(models["lo"])])
    with torch.no_grad():
        z = f4.encode(to_tensor(_rgb(32, 32, 5))[None])
        z = chain.refine_progressive(z, 499, STEPS, upscale=2, tile=8, stride=4, jitter=True, seed=2,
                                     view_batch_size=4, generator=torch.Generator().manual_seed(2))
        hand = to_uint8(f4.decode(z)[0])
    assert _max_diff(np.asarray(Image.open(out / "a.png")), hand) <= 1
    # default tiling (auto): a small image is refined in one tile, x4 in two phases
    run(_compose(models, d, tmp_path / "x4", "upscale=4", "grid=none"))
    assert _sizes(tmp_path / "x4") == {"a.png": (128, 128)}


def test_tiling_and_upscale_are_part_of_the_resume_record(models, tmp_path):
    d = _one_image(tmp_path, 16, 16, 6)
    out = tmp_path / "out"
    run(_compose(models, d, out, "grid=none"))
    assert run(_compose(models, d, out, "grid=none"))["skipped"]
    for changed in ("tiling.latent_tile=68", "tiling.jitter=false", "upscale=2"):
        with pytest.raises(RefineError, match="other settings"):
            run(_compose(models, d, out, "grid=none", changed))


@pytest.mark.parametrize("override, message", [
    ("tiling.f4_tile=254", r"tiling.f4_tile=254 and tiling.f4_overlap=32 must be multiples of the f4 first stage's "
                          r"downsampling factor 4"),
    ("tiling.f4_overlap=256", r"tiling.f4_overlap=256 must be smaller than tiling.f4_tile=256"),
    ("tiling.f8_overlap=300", r"tiling.f8_overlap=300 must be smaller than tiling.f8_tile=256"),
    ("tiling.latent_tile=50", r"tiling.latent_tile=50 must be a multiple of the window UNets' downsampling 4"),
    ("tiling.latent_stride=100", r"tiling.latent_stride=100 must not exceed tiling.latent_tile=64"),
    ("tiling.mode=sometimes", r"tiling.mode must be one of \('auto', 'always', 'never'\)"),
    ("+tiling.tile=64", r"unknown setting tiling.tile; did you mean tiling\.(f4|f8|latent)_tile\?"),
    ("upscale=3", r"upscale must be one of \(1, 2, 4\), got 3"),
])
def test_bad_tiling_settings_fail_before_any_image(models, tmp_path, monkeypatch, override, message):
    def no_images(*a, **k):
        raise AssertionError("an image was looked at before the tiling settings were checked")

    monkeypatch.setattr(batch_refine, "load_image", no_images)
    monkeypatch.setattr(refine_run, "scan_images", no_images)
    with pytest.raises(SettingError, match=message):
        run(_compose(models, tmp_path / "in", tmp_path / "out", override))
    assert not (tmp_path / "out").exists()


def test_cli_bad_tile_is_one_error_line_and_exit_2(models, tmp_path):
    d = _one_image(tmp_path, 16, 16, 7)
    cmd = [sys.executable, "refine.py", *_overrides(models, d, tmp_path / "out", "tiling.latent_tile=50"),
           f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: tiling.latent_tile=50 must be a multiple of the window UNets' downsampling 4 "
                      "(latent pixels)"] and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_evaluate_with_upscale_is_refused(models, tmp_path):
    with pytest.raises(RefineError, match="mode=evaluate .* upscale=2"):
        run(_compose(models, tmp_path / "in", tmp_path / "out", "mode=evaluate", "upscale=2"))


@pytest.mark.slow
def test_an_image_above_one_megapixel_is_refined_on_tiles(models, tmp_path):
    """The old 1 Mpx refusal is gone: 1040x1024 (1.06 Mpx) goes through auto tiling with default tile sizes."""
    d = _one_image(tmp_path, 1024, 1040, 8)
    summary = run(_compose(models, d, tmp_path / "out", "steps=2", "grid=none"))
    assert not summary["failed"] and _sizes(tmp_path / "out")["a.png"] == (1040, 1024)


def test_a_concat_window_runs_on_latent_tiles_with_its_conditioning_cropped(models, tmp_path):
    concat = _window_checkpoint(tmp_path, (250, 500), "c.ckpt", tiny_unet_params(in_channels=6), conditioning="concat")
    d = _one_image(tmp_path, 48, 48, 9)
    summary = run(_compose({**models, "concat": concat}, d, tmp_path / "out", "tiling.mode=always",
                           *SMALL_TILES, experts=("concat", "lo")))
    assert not summary["failed"] and _sizes(tmp_path / "out")["a.png"] == (48, 48)
