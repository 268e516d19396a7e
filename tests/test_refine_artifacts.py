"""refine.py's artifact options (issue #11 item 5): detect, correct, mask, t_start=auto, composite=paste_back, through
the real entry point on the tiny checkpoints of test_sample.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT
from PIL import Image
from test_refine import STEPS, _compose, _overrides, _rgb, _vq_checkpoint, _window_checkpoint

from refiner.apps.refine import run
from refiner.artifacts.composite import changed_region, feather, paste_back, paste_weights
from refiner.artifacts.correct import AutoStart, TrajectoryCorrection, starts_from_strength
from refiner.artifacts.detect import PixelChangeConfig, dilate
from refiner.cli import run_cli
from refiner.data.images import load_image, to_tensor
from refiner.errors import RefineError, SettingError
from refiner.formats.first_stage import build_first_stage
from refiner.inference import artifact_batch, batch_refine
from refiner.inference.chain import Chain
from refiner.inference.pipeline import Pipeline, Tiling
from refiner.inference.probe import probe_detect
from refiner.models.vq import tiny_ddconfig
from refiner.sampling import timestep_grid

SIDE = 32


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    return dict(f4=_vq_checkpoint(d, 4, n_embed=512, embed_dim=3, name="vq_f4.ckpt"),
                f8=_vq_checkpoint(d, 8, n_embed=256, embed_dim=4, name="vq_f8.ckpt"),
                hi=_window_checkpoint(d, (250, 500), "hi.ckpt"), lo=_window_checkpoint(d, (0, 250), "lo.ckpt"))


@pytest.fixture
def inputs(tmp_path) -> Path:
    """Flat grey with a white square (the residual detector flags it) and noise (higher severity), 32x32."""
    d = tmp_path / "in"
    d.mkdir()
    flat = np.full((SIDE, SIDE, 3), 128, np.uint8)
    flat[10:18, 10:18] = 255
    Image.fromarray(flat).save(d / "a.png")
    Image.fromarray(_rgb(SIDE, SIDE, 1)).save(d / "b.png")
    return d


def _pipeline(models) -> Pipeline:
    f4 = build_first_stage(models["f4"], dict(ddconfig=tiny_ddconfig(4), n_embed=512, embed_dim=3)).eval()
    return Pipeline(f4, Chain.from_paths([str(models["hi"]), str(models["lo"])]), tiling=Tiling(mode="never"))


def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(int)


def test_detect_writes_masks_severities_and_the_grid_column(models, inputs, tmp_path):
    out = tmp_path / "out"
    summary = run(_compose(models, inputs, out, "detect=residual"))
    pipe = _pipeline(models)
    images = [load_image(inputs / n) for n in ("a.png", "b.png")]
    # by hand: a probe from 499 to the top window's edge 250 with the grid's 2 points there, mad_scale 6
    det = probe_detect(pipe, images, "residual", 499, 2, seed=0, indices=[0, 1],
                       pixel_cfg=PixelChangeConfig(mad_scale=6.0))
    records = {Path(r["input"]).name: r for r in summary["processed"]}
    for j, name in enumerate(("a.png", "b.png")):
        mask = Image.open(out / name.replace(".png", ".mask.png"))
        assert mask.mode == "L" and mask.size == (SIDE, SIDE)
        pixels = np.asarray(mask)
        assert set(np.unique(pixels)) <= {0, 255}
        assert np.array_equal(pixels == 255, det.pixel[j].numpy())
        assert records[name]["mask"] == str(out / name.replace(".png", ".mask.png"))
        assert records[name]["severity"] == pytest.approx(float(det.severity[j]), rel=1e-5)
    assert det.pixel.any(), "the test needs a non-empty mask to check the overlay"
    assert summary["grid_columns"][1] == "detected (residual)" and summary["artifacts"]["detect"] == "residual"
    grid = _png(out / "grid.png")
    assert grid.shape == (2 * (SIDE + 4), 4 * (SIDE + 4), 3)  # input | detected | after expert 1 | after expert 2
    j = 0 if det.pixel[0].any() else 1
    cell = grid[j * (SIDE + 4) + 2:j * (SIDE + 4) + 2 + SIDE, SIDE + 6:2 * SIDE + 6]
    src = images[j].astype(int)
    m = det.pixel[j].numpy()
    assert np.abs(cell[~m] - src[~m]).max() <= 1  # unflagged: the input
    tinted = (to_tensor(images[j]) * 0.5 + torch.tensor([1.0, -1, -1])[:, None, None] * 0.5 + 1) * 127.5
    assert np.abs(cell[m] - tinted.permute(1, 2, 0).round().numpy()[m]).max() <= 1  # flagged: tinted red
    # a re-run resumes (the masks are ours); a mask file refiner did not write is never replaced
    assert len(run(_compose(models, inputs, out, "detect=residual"))["skipped"]) == 2
    (out / "a.mask.png").write_bytes(b"mine")
    with pytest.raises(RefineError, match=r"1 file\(s\).*a\.mask\.png \(not written by refiner\)"):
        run(_compose(models, inputs, out, "detect=residual"))


def _image_and_mask(tmp_path: Path, mask: np.ndarray) -> Path:
    """in/a.png (random, the mask's size) and mask.png beside in/; returns in/."""
    d = tmp_path / "in"
    d.mkdir()
    Image.fromarray(_rgb(*mask.shape, 4)).save(d / "a.png")
    Image.fromarray(mask, "L").save(tmp_path / "mask.png")
    return d


def test_strength_map_with_a_user_mask_changes_only_the_masked_region(models, tmp_path):
    side = 64
    mask = np.zeros((side, side), np.uint8)
    mask[:, 48:] = 255  # the right quarter flagged
    d = _image_and_mask(tmp_path, mask)
    Image.fromarray(np.zeros_like(mask), "L").save(tmp_path / "none.png")
    out = tmp_path / "out"
    summary = run(_compose(models, d, out, "correct=strength_map", f"mask={tmp_path / 'mask.png'}",
                           "strength.t_low=0", "grid=combined"))
    assert summary["grid_columns"][1] == f"detected (mask {tmp_path / 'mask.png'})"
    # references: nothing flagged (every pixel pinned to the input, start 0) and the plain refinement from 499
    run(_compose(models, d, tmp_path / "kept", "correct=strength_map", f"mask={tmp_path / 'none.png'}",
                 "strength.t_low=0", "grid=none"))
    run(_compose(models, d, tmp_path / "plain", "grid=none"))
    got, kept, plain = (_png(p / "a.png") for p in (out, tmp_path / "kept", tmp_path / "plain"))
    far, flagged = np.s_[:, :16], np.s_[:, 52:]
    diff = lambda a, b, region: np.abs(a[region] - b[region]).mean()  # noqa: E731
    # far from the flagged region the latents are the pinned input's exactly; the decoder's GroupNorm statistics
    # are global, so the pixels only stay much closer to it than the plain run's (measured 19 vs 35 of 255)
    assert diff(got, kept, far) < 0.6 * diff(plain, kept, far)
    assert diff(got, kept, flagged) > 2 * diff(got, kept, far)  # the flagged region is refined (measured 48)
    # by hand: the library's pinning with starts_from_strength(mask/255, 0, 499)
    starts = starts_from_strength(torch.from_numpy(mask / 255.0).float(), 0, 499)[None]
    refined, _ = _pipeline(models).refine_images([load_image(d / "a.png")], 499, STEPS, starts=starts)
    assert np.abs(got - refined[0].astype(int)).max() <= 1


def test_paste_back_with_a_user_mask_keeps_the_input_outside_it_bit_for_bit(models, tmp_path):
    side = 64
    mask = np.zeros((side, side), np.uint8)
    mask[8:24, 40:56] = 255
    mask[30:34, 10:14] = 128                     # a soft part: half refined, half input
    d = _image_and_mask(tmp_path, mask)
    out = tmp_path / "out"
    summary = run(_compose(models, d, out, "composite=paste_back", f"mask={tmp_path / 'mask.png'}",
                           "paste_back.feather_px=3", "grid=combined"))
    run(_compose(models, d, tmp_path / "plain", "grid=none"))
    src, got, plain = load_image(d / "a.png").astype(int), _png(out / "a.png"), _png(tmp_path / "plain" / "a.png")
    w = feather(torch.from_numpy(mask / 255.0)[None], 3)[0].numpy()
    assert np.array_equal(got[w == 0], src[w == 0])          # untouched: the input itself, not its f4 round trip
    assert np.array_equal(got[w == 1], plain[w == 1])        # inside: the plain refinement (a mask alone changes
    assert (w == 0).mean() > 0.8 and (w == 1).sum() == 256   # nothing about the refinement)
    # by hand: the library's paste-back of the plain refinement
    want = paste_back([plain.astype(np.uint8)], [src.astype(np.uint8)], torch.from_numpy(w)[None])[0]
    assert np.array_equal(got, want)
    record = summary["processed"][0]
    assert record["refined_fraction"] == pytest.approx(w.mean()) and record["whole_image"] is False
    assert summary["grid_columns"][-1] == "output (pasted back, feather 3 px)"
    assert summary["artifacts"]["composite"] == "paste_back"
    grid = _png(out / "grid.png")
    assert grid.shape == (side + 4, 5 * (side + 4), 3)  # input | detected | after expert 1 | after expert 2 | output
    assert np.array_equal(grid[2:2 + side, 4 * (side + 4) + 2:4 * (side + 4) + 2 + side], got)
    # another feather is another output: the re-run refuses to replace it without overwrite
    with pytest.raises(RefineError, match="other settings"):
        run(_compose(models, d, out, "composite=paste_back", f"mask={tmp_path / 'mask.png'}",
                     "paste_back.feather_px=1"))


def test_output_residual_pastes_back_what_the_refinement_changed_without_a_probe(models, inputs, tmp_path,
                                                                                 monkeypatch):
    monkeypatch.setattr(artifact_batch, "probe_detect", lambda *a, **k: pytest.fail("detect=output_residual probed"))
    out = tmp_path / "out"
    summary = run(_compose(models, inputs, out, "detect=output_residual", "composite=paste_back",
                           "paste_back.feather_px=2", "mask_dilate_px=1", "grid=none"))
    run(_compose(models, inputs, tmp_path / "plain", "grid=none"))
    names = ("a.png", "b.png")
    src = [load_image(inputs / n) for n in names]
    plain = [_png(tmp_path / "plain" / n).astype(np.uint8) for n in names]
    # by hand: every blurred change above the default level 48 of [input, plain refinement], any size, grown by 1,
    # feathered by 2, pasted
    det = changed_region(src, plain, factor=4, cfg=PixelChangeConfig(level=48, max_area=float("inf")))
    assert det.pixel.any() and not det.pixel.all()
    want = paste_back(plain, src, paste_weights(dilate(det.pixel, 1).float(), 2))
    records = {Path(r["input"]).name: r for r in summary["processed"]}
    for j, name in enumerate(names):
        assert np.array_equal(_png(out / name), want[j])
        assert np.array_equal(np.asarray(Image.open(out / name.replace(".png", ".mask.png"))) == 255,
                              det.pixel[j].numpy())
        assert records[name]["severity"] == pytest.approx(float(det.severity[j]), rel=1e-5)
    assert summary["artifacts"]["output_residual_level"] == 48
    # null: the residual's relative rule (median + 6 * 1.4826 * MAD, the code's area limits) instead
    relative = run(_compose(models, inputs, tmp_path / "relative", "detect=output_residual", "composite=paste_back",
                            "output_residual_level=null", "paste_back.feather_px=1", "mask_dilate_px=0", "grid=none"))
    leveled = det.pixel
    det = changed_region(src, plain, factor=4, cfg=PixelChangeConfig(mad_scale=6.0))
    assert det.pixel.any() and not torch.equal(det.pixel, leveled)
    want = paste_back(plain, src, paste_weights(det.pixel.float(), 1))
    assert all(np.array_equal(_png(tmp_path / "relative" / n), want[j]) for j, n in enumerate(names))
    assert relative["artifacts"]["output_residual_level"] is None
    # whole_above below every severity: each image keeps its whole refinement
    whole = run(_compose(models, inputs, tmp_path / "whole", "detect=output_residual", "composite=paste_back",
                         "paste_back.whole_above=0", "grid=none"))
    assert all(r["whole_image"] for r in whole["processed"])
    assert all(np.array_equal(_png(tmp_path / "whole" / n), plain[j]) for j, n in enumerate(names))


def _calibration(path: Path, models, knots, experts=("hi", "lo")) -> Path:
    AutoStart(knots, chain={"experts": [str(models[s]) for s in experts]}, source={"detector": "residual"}).save(path)
    return path


def test_t_start_auto_gives_each_image_its_own_start(models, inputs, tmp_path):
    det = probe_detect(_pipeline(models), [load_image(inputs / n) for n in ("a.png", "b.png")], "residual", 399, 2,
                       indices=[0, 1], pixel_cfg=PixelChangeConfig(mad_scale=6.0))
    sev = sorted(float(s) for s in det.severity)
    assert sev[0] < sev[1]
    calib = _calibration(tmp_path / "auto.json", models, [(sev[0], 199.0), (sev[1], 399.0)])
    out = tmp_path / "out"
    summary = run(_compose(models, inputs, out, "detect=residual", "t_start=auto", f"auto_calibration={calib}",
                           "batch_size=1", "grid=none"))
    starts = {Path(r["input"]).name: r["t_start"] for r in summary["processed"]}
    low = "a.png" if det.severity[0] < det.severity[1] else "b.png"
    high = "b.png" if low == "a.png" else "a.png"
    assert starts == {low: 199, high: 399}
    # one image per batch: the same as plain runs from each start, the lower with proportionally fewer steps
    for name, extra in ((low, ["t_start=199", "steps=2"]), (high, ["t_start=399", f"steps={STEPS}"])):
        run(_compose(models, inputs, tmp_path / name, "grid=none", *extra))
        assert np.abs(_png(out / name) - _png(tmp_path / name / name)).max() <= 1
    # a calibration made for other experts is refused, unless allowed
    other = _calibration(tmp_path / "other.json", models, [(sev[0], 199.0), (sev[1], 399.0)], experts=("hi",))
    with pytest.raises(RefineError, match="calibrated for experts"):
        run(_compose(models, inputs, tmp_path / "o1", "detect=residual", "t_start=auto", f"auto_calibration={other}"))
    assert not summary["failed"] and run(_compose(
        models, inputs, tmp_path / "o2", "detect=residual", "t_start=auto", f"auto_calibration={other}",
        "allow_calibration_mismatch=true", "grid=none"))["processed"]


def _bad_masks(tmp_path: Path) -> dict[str, tuple[str, str]]:
    """name -> (mask=..., expected one-line error)."""
    bad = tmp_path / "masks"
    bad.mkdir()
    Image.fromarray(np.zeros((SIDE, SIDE, 3), np.uint8)).save(bad / "rgb.png")
    Image.fromarray(np.zeros((SIDE, 16), np.uint8), "L").save(bad / "small.png")
    (bad / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    folder = tmp_path / "folder"
    folder.mkdir()
    Image.fromarray(np.zeros((SIDE, SIDE), np.uint8), "L").save(folder / "a.png")  # b.png is missing
    return {
        "missing": (str(tmp_path / "nope.png"), f"error: mask={tmp_path / 'nope.png'}: no such file or folder"),
        "rgb": (str(bad / "rgb.png"), f"error: mask {bad / 'rgb.png'} is mode RGB; masks must be greyscale (mode L "
                                      "or 1)"),
        "size": (str(bad / "small.png"), f"error: mask {bad / 'small.png'} is 16x32 but input "),
        "unreadable": (str(bad / "broken.png"), f"error: mask {bad / 'broken.png'} cannot be read: "),
        "folder": (str(folder), f"error: mask={folder}: no mask b.png for input "),
    }


def test_each_bad_mask_is_one_error_line_before_any_compute(models, inputs, tmp_path, monkeypatch, capsys):
    def no_compute(*a, **k):
        raise AssertionError("an image was loaded before the masks were checked")

    monkeypatch.setattr(batch_refine, "load_image", no_compute)
    for name, (spec, message) in _bad_masks(tmp_path).items():
        cfg = _compose(models, inputs, tmp_path / f"out_{name}", f"mask={spec}", "correct=strength_map")
        assert run_cli(lambda: run(cfg)) == 2, name
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(message), (name, err)
        assert not (tmp_path / f"out_{name}").exists()


@pytest.mark.parametrize("extra, message", [
    (["correct=ttc"], "correct=ttc needs a mask source"),
    (["t_start=auto"], "t_start=auto picks each image's start from its detected severity"),
    (["detect=residual", "upscale=2"], "upscale=2 is not supported"),
    (["detect=residual", "mode=evaluate"], "not supported with mode=evaluate"),
    (["detect=asced", "tiling.mode=always"], "need whole images"),
    (["detect=asced", "tiling.auto_above_pixels=100"], r"a\.png \(32x32\) would be refined on tiles"),
    (["detect=bogus"], "detect must be one of"),
    (["detect=residual", "correct=strength_map", "strength.t_low=600"], "must not exceed t_start=499"),
    (["detect=residual", "t_start=auto", "auto_calibration=/nonexistent.json"], "auto_calibration: t_start=auto "
                                                                                  "needs a calibration file"),
    (["composite=paste_back"], "composite=paste_back needs a region"),
    (["detect=residual", "composite=overlay"], "composite must be one of"),
    (["detect=residual", "composite=paste_back", "paste_back.feather_px=-1"], "paste_back.feather_px"),
    (["detect=residual", "composite=paste_back", "paste_back.whole_above=-0.5"], "paste_back.whole_above"),
    (["mask=x.png", "composite=paste_back", "paste_back.whole_above=0.1"], "whole_above compares each image's "
                                                                          "detected severity"),
    (["detect=output_residual", "correct=strength_map"], "too late to correct it"),
    (["detect=output_residual", "t_start=auto"], "measures it only after refinement"),
    (["detect=output_residual", "composite=paste_back", "upscale=2"], "upscale=2 is not supported"),
    (["detect=output_residual", "output_residual_level=255"], r"output_residual_level must be in \[0.0, 254.0\]"),
])
def test_impossible_combinations_fail_before_any_compute(models, inputs, tmp_path, monkeypatch, extra, message):
    monkeypatch.setattr(batch_refine, "load_image", lambda *a, **k: pytest.fail("an image was loaded"))
    with pytest.raises(SettingError, match=message):
        run(_compose(models, inputs, tmp_path / "out", *extra))
    assert not (tmp_path / "out").exists()


def test_ttc_with_a_user_mask_runs_through_the_cli_and_matches_the_library(models, inputs, tmp_path):
    """correct=ttc with a user mask through the CLI: exit 0; outside the mask the result stays near the plain run,
    inside it differs (TTC re-noised it at t_correct)."""
    mask = np.zeros((SIDE, SIDE), np.uint8)
    mask[:, SIDE // 2:] = 255
    Image.fromarray(mask, "L").save(tmp_path / "mask.png")
    out = tmp_path / "out"
    cmd = [sys.executable, "refine.py", *_overrides(models, inputs, out, "correct=ttc", f"mask={tmp_path / 'mask.png'}",
                                                    "ttc.t_correct=400", "grid=none"),
           f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    run(_compose(models, inputs, tmp_path / "plain", "grid=none"))
    got, plain = _png(out / "a.png"), _png(tmp_path / "plain" / "a.png")
    left, right = np.s_[:, :SIDE // 2 - 4], np.s_[:, SIDE // 2 + 4:]
    # the decoder's GroupNorm is global, so the left half moves a little too (measured 3.1 vs 1.6 of 255)
    assert np.abs(got[right] - plain[right]).mean() > 1.5 * np.abs(got[left] - plain[left]).mean()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["artifacts"]["correct"] == "ttc" and not (out / "a.mask.png").exists()
    # by hand: the library's TTC on the batch of both images, fired after the step at 499 (the grid's next point
    # is 333 <= 400), its noise from seed 0 + index 0
    pipe = _pipeline(models)
    grid = timestep_grid(499, STEPS)
    latent = pipe.latent_map(torch.from_numpy(np.stack([mask, mask]) / 255.0).float())
    ttc = TrajectoryCorrection(grid, pipe.chain.alphas_cumprod, lambda: latent, 400,
                               generator=torch.Generator().manual_seed(0))
    refined, _ = pipe.refine_images([load_image(inputs / n) for n in ("a.png", "b.png")], 499, STEPS, callback=ttc)
    assert ttc.corrected_at == 333 and np.abs(got - refined[0].astype(int)).max() <= 1


def test_cli_correct_without_a_mask_source_exits_2(models, inputs, tmp_path):
    cmd = [sys.executable, "refine.py", *_overrides(models, inputs, tmp_path / "out", "correct=strength_map"),
           f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: correct=strength_map needs a mask source: set detect=asced|asced_code|residual or "
                      "mask=<png or folder>"] and "Traceback" not in proc.stderr


def test_pipeline_callback_sees_the_padded_batch_and_runs_before_the_pinning(models):
    """Pipeline.refine_images(callback=): called once per grid step on the padded, scaled latents of the whole
    batch; the pinning of ``starts`` acts after it; refused with tiles."""
    pipe = _pipeline(models)
    images = [_rgb(20, 24, 7), _rgb(20, 24, 8)]  # padded to 32 x 32: latents 8 x 8
    seen = []
    pipe.refine_images(images, 499, STEPS, callback=lambda i, t, x, out, x0: seen.append((t, tuple(x.shape))))
    assert seen == [(t, (2, 3, 8, 8)) for t in timestep_grid(499, STEPS)]
    starts = torch.zeros(2, 20, 24, dtype=torch.long)  # every pixel pinned to the input: the callback is undone
    kept, _ = pipe.refine_images(images, 499, STEPS, starts=starts)
    shifted, _ = pipe.refine_images(images, 499, STEPS, starts=starts, callback=lambda i, t, x, out, x0: x + 5)
    assert all(np.array_equal(a, b) for a, b in zip(kept, shifted))
    moved, _ = pipe.refine_images(images, 499, STEPS, callback=lambda i, t, x, out, x0: x + 5)
    assert np.abs(moved[0].astype(int) - kept[0].astype(int)).mean() > 5
    tiled = Pipeline(pipe.f4, pipe.chain, tiling=Tiling(mode="always", f4_tile=32, f4_overlap=16, latent_tile=8,
                                                         latent_stride=4))
    with pytest.raises(SettingError, match="need whole images"):
        tiled.refine_images(images, 499, STEPS, callback=lambda *a: None)


def test_outputs_never_take_a_mask_name(tmp_path):
    from refiner.inference.outputs import mask_path, plan_outputs

    outs = plan_outputs([tmp_path / "in" / "a.mask.png", tmp_path / "in" / "a.png"], tmp_path / "out")
    assert [o.name for o in outs] == ["a.mask-2.png", "a.png"]
    assert [mask_path(o).name for o in outs] == ["a.mask-2.mask.png", "a.mask.png"]


def test_color_fix_restores_the_inputs_low_band_then_pastes_back(models, inputs, tmp_path):
    """color_fix runs on the decoded outputs (the library's wavelet rule, by hand), before the paste-back; it changes
    the settings digest, adds the output column, and is refused with upscale."""
    from refiner.artifacts.color_fix import wavelet_color_fix

    names = ("a.png", "b.png")
    src = [load_image(inputs / n) for n in names]
    run(_compose(models, inputs, tmp_path / "plain", "grid=none"))
    plain = [_png(tmp_path / "plain" / n).astype(np.uint8) for n in names]
    out = tmp_path / "fixed"
    summary = run(_compose(models, inputs, out, "color_fix.method=wavelet", "color_fix.levels=2",
                           "color_fix.max_shift=6", "grid=combined"))
    want = wavelet_color_fix(plain, src, levels=2, max_shift=6)
    assert all(np.array_equal(_png(out / n), want[j]) for j, n in enumerate(names))
    assert any(not np.array_equal(w, p) for w, p in zip(want, plain))  # the fix did something here
    assert summary["grid_columns"][-1] == "output (colour fix (wavelet, 2 levels, shift <= 6))"
    assert summary["color_fix"] == {"method": "wavelet", "levels": 2, "max_shift": 6.0}
    plain_summary = json.loads((tmp_path / "plain" / "summary.json").read_text())
    assert summary["settings_digest"] != plain_summary["settings_digest"] and "color_fix" not in plain_summary
    # with a paste-back: the colour-fixed refinement inside the user's mask, the input outside
    mask = np.zeros((SIDE, SIDE), np.uint8)
    mask[4:20, 4:20] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    both = run(_compose(models, inputs, tmp_path / "both", "color_fix.method=wavelet", "color_fix.levels=2",
                        "color_fix.max_shift=6", "composite=paste_back", f"mask={tmp_path / 'mask.png'}",
                        "paste_back.feather_px=0", "grid=none"))
    weights = torch.from_numpy(mask / 255.0)[None].expand(2, SIDE, SIDE)
    pasted = paste_back(want, src, weights)
    assert all(np.array_equal(_png(tmp_path / "both" / n), pasted[j]) for j, n in enumerate(names))
    assert both["grid_columns"][-1] == "output (colour fix (wavelet, 2 levels, shift <= 6); pasted back, feather 0 px)"
    with pytest.raises(RefineError, match="color_fix restores the input's colours at the input's size"):
        run(_compose(models, inputs, tmp_path / "up", "color_fix.method=adain", "upscale=2"))
    with pytest.raises(SettingError, match="color_fix.method must be one of"):
        run(_compose(models, inputs, tmp_path / "bad", "color_fix.method=histogram"))


def test_color_fix_on_tiled_odd_sized_images_is_the_library_on_the_tiled_output(models, tmp_path):
    """Tiled images (tiling.mode=always) and a side that is not a multiple of the factor: the colour fix acts on the
    cropped uint8 output, as the library does on the plain tiled run's output (and nothing else changes)."""
    from test_refine import SMALL_TILES

    from refiner.artifacts.color_fix import adain_color_fix

    d = tmp_path / "in"
    d.mkdir()
    Image.fromarray(_rgb(37, 53, 5)).save(d / "odd.png")
    extra = ["tiling.mode=always", "grid=none", *SMALL_TILES]
    run(_compose(models, d, tmp_path / "plain", *extra))
    summary = run(_compose(models, d, tmp_path / "fixed", *extra, "color_fix.method=adain"))
    assert not summary["failed"] and summary["color_fix"] == {"method": "adain"}
    plain = _png(tmp_path / "plain" / "odd.png").astype(np.uint8)
    want = adain_color_fix([plain], [load_image(d / "odd.png")])[0]
    assert np.array_equal(_png(tmp_path / "fixed" / "odd.png"), want) and not np.array_equal(want, plain)
