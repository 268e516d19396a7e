"""The benchmark command end to end on tiny models (32 px, a few training steps): every source, method and
sweep point is reported and every output file written; bad settings, missing checkpoints and a foreign
first stage are refused before any compute. Quality is not asserted here (see test_bench_e2e.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, TINY_TRAINER, compose_config
from pipeline import CROP, World, build_world

from refiner.apps.bench import bench_settings
from refiner.errors import SettingError


def _settings(world: World, runs: dict[str, Path], out: Path, *extra: str):
    """The benchmark's settings over the tiny models, as ``refiner bench`` builds them, with ``extra`` overrides."""
    return bench_settings(compose_config("bench", _overrides(world, runs, f"output_dir={out}", *extra), out))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[World, dict[str, Path]]:
    world = build_world(tmp_path_factory.mktemp("world"))
    root = world.root
    shape = world.train_refiner("demo_refiner_500_750", root / "shape")
    runs = {
        "shape": Path(shape["last_ckpt"]),
        "detail": Path(world.train_refiner("demo_refiner_751_1000", root / "detail",
                                           f"init_from={shape['last_ckpt']}")["last_ckpt"]),
        "full": Path(world.train_refiner("demo_full_range", root / "full")["last_ckpt"]),
        "paired": Path(world.train_refiner("demo_paired_baseline", root / "paired")["last_ckpt"]),
    }
    return world, runs


def _overrides(world: World, runs: dict[str, Path], *extra: str) -> list[str]:
    return [*world.paths(), "n=5", f"size={CROP}", "grid_images=2", "split=tune",
            f"generator.experts=[{runs['full']}]", "generator.steps=3", "t_per_step=100", "recommended_t_start=299",
            f"methods.chain.experts=[{runs['shape']},{runs['detail']}]", "methods.chain.t_starts=[99,299]",
            f"methods.shape_window.experts=[{runs['shape']}]", "methods.shape_window.t_starts=[199]",
            f"methods.detail_window.experts=[{runs['detail']}]", "methods.detail_window.t_starts=[199]",
            f"methods.full_range.experts=[{runs['full']}]", "methods.full_range.t_starts=[299,699]",
            f"methods.paired.experts=[{runs['paired']}]", "methods.paired.t_starts=[999]",
            "methods.unsharp.unsharp.amounts=[100]", *extra]


def test_bench_reports_every_source_method_and_setting(trained, tmp_path):
    from refiner.bench.run import run

    world, runs = trained
    out = tmp_path / "bench"
    results = run(_settings(world, runs, out))
    assert set(results["sources"]) == {"generator", "f8", "defects"}
    sweeps = {"chain": [99, 299], "shape_window": [199], "detail_window": [199], "full_range": [299, 699],
              "paired": [999], "unsharp": [100]}
    for source, entry in results["sources"].items():
        assert set(entry["methods"]) == set(sweeps)
        for name, want in sweeps.items():
            rows = entry["methods"][name]["sweep"]
            key = "amount_percent" if name == "unsharp" else "t_start"
            assert [r[key] for r in rows] == want
            for r in rows:
                assert 0 <= r["artifact_rate"] <= 1 and r["rmse_to_input"] >= 0 and r["swd_x1e3"] >= 0
                assert ("psnr_to_clean" in r) == (source != "generator")
        assert ("clean" in entry) == (source != "generator")
    # the defect source is broken by construction, the chain's steps follow t_per_step
    assert results["sources"]["defects"]["input"]["artifact_rate"] == 1.0
    assert [r["steps"] for r in results["sources"]["f8"]["methods"]["chain"]["sweep"]] == [1, 3]
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["written_by"] == "refiner bench" and on_disk["split"] == "tune"
    text = (out / "results.md").read_text()
    assert "| chain (t_start 299) |" in text and "## injected defects" in text
    from PIL import Image

    for name in ("comparison_grid.png", "tradeoff.png"):
        with Image.open(out / name) as img:
            assert img.size[0] > 200 and img.size[1] > 100
    assert not (out / "efficiency.png").exists()  # the tiny runs logged no in-window losses
    assert results["efficiency"]["available"] is False

    # deterministic: a second run into the same folder replaces its own outputs with the same numbers
    again = run(_settings(world, runs, out))
    assert again["sources"]["generator"]["methods"]["chain"]["sweep"][1]["artifact_rate"] == \
        results["sources"]["generator"]["methods"]["chain"]["sweep"][1]["artifact_rate"]
    assert again["sources"]["f8"]["methods"]["chain"]["sweep"][1]["rmse_to_input"] == \
        results["sources"]["f8"]["methods"]["chain"]["sweep"][1]["rmse_to_input"]


def test_bench_refuses_before_compute(trained, tmp_path, monkeypatch):
    from refiner.bench import run as bench_run
    from refiner.bench.run import run

    world, runs = trained
    monkeypatch.setattr(bench_run, "build_sources", lambda *a, **k: pytest.fail("compute started"))
    cases = [
        (["methods.chain.experts=[missing.ckpt]"], "missing.ckpt not found"),
        ([f"methods.chain.experts=[{runs['shape']},{runs['full']}]"], "overlap"),
        (["methods.chain.t_starts=[699]"], "699"),  # above the chain's top window
        (["split=test"], "split must be one of"),  # tune, report and holdout exist
        (["n=0"], "n must be a positive int"),
        (["size=36"], "multiple of 8"),
        (["sources=[photos]"], "sources must be"),
        ([f"generator.experts=[{runs['shape']}]"], "full-range"),
        # the f8 as the f4: its 4-channel latent does not fit the windows' 3 channels
        ([f"first_stage.f4.ckpt_path={world.f8_ckpt}", "first_stage.f4.params=${first_stage.f8.params}"], "channel"),
    ]
    for extra, words in cases:
        with pytest.raises(SettingError, match=words.replace("[", r"\[")):
            run(_settings(world, runs, tmp_path / "b", *extra))
    assert not (tmp_path / "b").exists()


def test_bench_refuses_a_first_stage_the_windows_were_not_trained_with(trained, tmp_path, monkeypatch):
    from refiner.apps.train import run as train
    from refiner.bench import run as bench_run
    from refiner.bench.run import run
    from refiner.formats.fingerprint import FirstStageMismatch

    world, runs = trained
    other = train(compose_config("train", [
        "experiment=demo_vq_f4", *TINY_TRAINER, f"paths.demo_dir={world.demo_dir}", f"data.crop_size={CROP}",
        f"first_stage.f4.params.ddconfig.resolution={CROP}", "data.batch_size=4", "seed=7"], tmp_path / "f4b"))
    monkeypatch.setattr(bench_run, "build_sources", lambda *a, **k: pytest.fail("compute started"))
    with pytest.raises(FirstStageMismatch):
        run(_settings(world, runs, tmp_path / "b", f"first_stage.f4.ckpt_path={other['last_ckpt']}"))


def test_bench_cli_exit_code_and_one_line_error(trained, tmp_path):
    world, runs = trained
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-m", "refiner.bench", *_overrides(world, runs, "n=-3"),
                          f"hydra.run.dir={tmp_path / 'h'}", f"output_dir={tmp_path / 'b'}"],
                         cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1] == "error: n must be a positive int, got -3"


def test_artifacts_bench_calibrates_on_tune_and_applies_on_report(trained, tmp_path):
    from refiner.bench.artifacts import run as run_artifacts
    from refiner.bench.methods import BenchError

    world, runs = trained
    tune, report = tmp_path / "tune", tmp_path / "report"
    common = ["artifacts.t_starts=[99,499]", "artifacts.strength_t_low=[99]", "artifacts.probe_t_start=499",
              "artifacts.paste_back.points=[{onto:fixed,region:'output>40',grow:2,feather:4},{onto:'colour fix (wavelet, "
              "2 levels, shift <= 8) on fixed t_start 99',region:output,grow:2,feather:4,whole_above:0}]",
              "artifacts.paste_back.sweep.onto=[fixed,'t_start=auto','strength map (rest from 99)']",
              "artifacts.paste_back.sweep.regions=[output,probe]", "artifacts.paste_back.sweep.whole_above=[null,0]",
              "artifacts.color_fix=[{method:wavelet,levels:2,max_shift:8},{method:adain}]"]
    with pytest.raises(BenchError, match=r"onto='strength map \(rest from 0\)' must be one of"):  # before compute
        run_artifacts(_settings(world, runs, tune, *common[:3], "artifacts.paste_back.points=[{onto:'strength map "
                                "(rest from 0)',region:probe,grow:4,feather:4}]"))
    with pytest.raises(BenchError, match="region must be probe, output or output>L"):
        run_artifacts(_settings(world, runs, tune, *common[:3],
                                "artifacts.paste_back.points=[{onto:fixed,region:'output>x',grow:4,feather:4}]"))
    with pytest.raises(BenchError, match="artifacts.color_fix lists method: none"):
        run_artifacts(_settings(world, runs, tune, *common[:4], "artifacts.color_fix=[{method:none}]"))
    assert not tune.exists()
    res = run_artifacts(_settings(world, runs, tune, *common))
    assert set(res["detection"]) == {"generator", "defects"}
    for per in res["detection"].values():
        assert set(per) == {"asced", "asced_code", "residual"}
        assert all(0 <= s["flagged_fraction"] <= 1 for s in per.values())
    # TTC regenerates the generator source from the same noise: its plain rate is the benchmark's input rate
    assert set(res["generation"]) == {"asced", "asced_code"}
    assert 0 <= res["detection"]["defects"]["residual"]["clean_images_flagged"] <= 1
    assert "clean_images_flagged" not in res["detection"]["generator"]["residual"]
    calibration = json.loads((tune / "t_start_auto.json").read_text())
    assert calibration["chain"]["experts"] == [str(runs["shape"]), str(runs["detail"])]
    assert [k[1] for k in calibration["knots"]] == sorted(k[1] for k in calibration["knots"])
    rows = {r["point"]: r for r in res["adaptive"]["defects"]["rows"]}
    grown = "grow 4, feather 4"
    assert list(rows)[:4] == ["fixed t_start 99", "fixed t_start 499", "t_start=auto (residual severity) [in-sample]",
                              "strength map (residual; rest from 99)"]
    pasted = [p for p in rows if p.startswith("paste back")]
    onto_fix = ("paste back (colour fix (wavelet, 2 levels, shift <= 8) on fixed t_start 99; output mask, grow 2, "
                "feather 4, whole image above severity 0)")
    assert pasted == ["paste back (fixed t_start 499; output change > 40 mask, grow 2, feather 4)", onto_fix] + [
        f"paste back ({onto}; {r} mask, {grown}{w})" for onto in ("fixed t_start 499", "t_start=auto",
                                                                  "strength map (rest from 99)")
        for r in ("output", "probe") for w in ("", ", whole image above severity 0")]
    fixed = rows["fixed t_start 499"]
    one_pass = rows[f"paste back (fixed t_start 499; output mask, {grown})"]
    probed = rows[f"paste back (fixed t_start 499; probe mask, {grown})"]
    assert one_pass["unet_evals"] == fixed["unet_evals"] == 5                   # no probe: the fixed point's cost
    assert probed["unet_evals"] == rows["strength map (residual; rest from 99)"]["unet_evals"] > 5
    # a convex combination per pixel never moves farther from the input than the refinement (up to rounding) ...
    assert one_pass["rmse_to_input"] <= fixed["rmse_to_input"] + 1 / 255 and 0 <= one_pass["refined_fraction"] <= 1
    # ... and with every image switched to its whole refinement it is the fixed point, exactly
    whole = rows[f"paste back (fixed t_start 499; output mask, {grown}, whole image above severity 0)"]
    assert whole["whole_images"] == 5 and whole["refined_fraction"] == 1
    assert (whole["artifact_rate"], whole["rmse_to_input"]) == (fixed["artifact_rate"], fixed["rmse_to_input"])
    # the colour fixes: each fixed point's own outputs, fixed after decoding (no UNet call), one curve per setting
    fixes = [p for p in rows if p.startswith("colour fix")]
    assert fixes == [f"{label} on fixed t_start {t}" for label in ("colour fix (wavelet, 2 levels, shift <= 8)",
                                                                   "colour fix (adain)") for t in (99, 499)]
    assert all(rows[p]["unet_evals"] == rows[f"fixed t_start {p[-3:].strip()}"]["unet_evals"] for p in fixes)
    # a paste-back onto a colour fix that keeps every whole image is that colour fix, exactly
    colour_99 = rows["colour fix (wavelet, 2 levels, shift <= 8) on fixed t_start 99"]
    assert (rows[onto_fix]["artifact_rate"], rows[onto_fix]["rmse_to_input"], rows[onto_fix]["unet_evals"]) == (
        colour_99["artifact_rate"], colour_99["rmse_to_input"], colour_99["unet_evals"])
    from refiner.bench.artifacts import families
    curves = dict(families(res["adaptive"]["defects"]["rows"]))
    assert [r["point"] for r in curves["colour fix (adain) on fixed t_start ·"]] == fixes[2:]
    dominance = res["adaptive"]["defects"]["dominance"]
    assert set(dominance["by_point"]) == set(rows) - {"fixed t_start 99", "fixed t_start 499"}

    with pytest.raises(BenchError, match="run split=tune first"):
        run_artifacts(_settings(world, runs, report, "split=report", f"artifacts.calibration={tmp_path}/none.json",
                                *common))
    res = run_artifacts(_settings(world, runs, report, "split=report",
                                  f"artifacts.calibration={tune}/t_start_auto.json", *common))
    auto = next(r for r in res["adaptive"]["generator"]["rows"] if r["point"].startswith("t_start=auto"))
    assert auto["point"] == "t_start=auto (residual severity)"          # out of sample on report
    assert 99 <= auto["mean_t_start"] <= 499 and 0 <= auto["artifact_rate"] <= 1
    assert "## Refinement of `defects`" in (report / "artifacts.md").read_text()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "artifacts.md").write_text("mine")
    with pytest.raises(BenchError, match="did not write"):
        run_artifacts(_settings(world, runs, foreign, *common))
    assert (foreign / "artifacts.md").read_text() == "mine"


def test_upscale_bench_compares_progressive_with_bicubic_then_refine(trained, tmp_path):
    from refiner.bench.upscale import run as run_upscale

    world, runs = trained
    out = tmp_path / "up"
    res = run_upscale(_settings(world, runs, out, "upscale.t_starts=[299]"))
    for name, rows in res["sources"].items():
        assert [r["method"] for r in rows] == ["bicubic", "bicubic + chain, t_start 299",
                                               "progressive + chain, t_start 299"]
        assert rows[0]["rmse_to_input"] == 0 and rows[0]["unet_evals"] == 0
        assert all(0 <= r["artifact_rate"] <= 1 and r["psnr_to_clean"] > 0 for r in rows)
    assert res["sources"]["injected defects"][0]["artifact_rate"] == 1.0  # bicubic keeps every defect
    assert "progressive + chain" in (out / "upscale.md").read_text()
    with pytest.raises(SettingError, match="multiple of 16"):
        run_upscale(_settings(world, runs, out.with_name("up2"), "size=40"))


def test_bench_asced_reports_each_nfe_and_refuses_a_generator_that_is_not_full_range(trained, tmp_path, monkeypatch):
    """refiner bench-asced (issue 23) on the tiny models: every detector's image- and pixel-level numbers, the score
    trap's three groups, TTC with each detector's mask and a random one at the plain run's UNet evaluations, and the
    chain on the finished samples at the evaluations it adds; a window as the generator is refused before compute."""
    from refiner.bench import asced

    world, runs = trained
    out = tmp_path / "asced"
    res = asced.run(_settings(world, runs, out, "asced.nfe=[5]", "asced.calibration_split=report"))
    (sec,) = res["by_nfe"]
    assert sec["nfe"] == 5 and sec["grid_below_t_correct"] == 2  # grid 999, 750, 501, 252, 3; T_c 480
    assert not sec["calibration_in_sample"]
    assert set(sec["detection"]) == {"asced", "asced_code"}
    for d in sec["detection"].values():
        assert d["image"]["n"] == 5 and 0 <= d["flagged_area"] <= 1
    assert sec["score_trap"]["bank_t"] == [750, 501]
    assert sum(g["pixels"] for g in sec["score_trap"]["groups"].values()) == 5 * (CROP // 4) ** 2
    rows = {r["method"]: r for r in sec["generation"]}
    assert rows["plain, 5 DDIM steps"]["minus_plain"]["mean"] == 0.0
    for m in ("asced", "asced_code"):
        assert rows[f"TTC at 480, {m}"]["unet_evals"] == 5
        assert rows[f"TTC at 480, random mask of {m}'s area"]["masked_latent"] == pytest.approx(
            rows[f"TTC at 480, {m}"]["masked_latent"])
    chain_rows = [r for r in sec["generation"] if r["method"].startswith("the chain")]
    assert [r["added_evals"] for r in chain_rows] == [2, 5]  # the grid below T_c; steps_for(480, 100)
    assert [r["unet_evals"] for r in chain_rows] == [7, 10]
    assert (out / "asced_score_trap.png").stat().st_size > 1000 and "## NFE 5" in (out / "asced.md").read_text()

    monkeypatch.setattr(asced, "watch", lambda *a, **k: pytest.fail("compute started"))
    with pytest.raises(SettingError, match="generator.experts must be one full-range model"):
        asced.run(_settings(world, runs, tmp_path / "b", f"generator.experts=[{runs['shape']}]"))
    assert not (tmp_path / "b").exists()


def test_bench_upscale_beyond_the_training_size_refuses_a_generator_that_is_not_full_range(trained, tmp_path,
                                                                                          monkeypatch):
    from refiner.bench import upscale_targets

    world, runs = trained
    monkeypatch.setattr(upscale_targets, "Study", lambda *a, **k: pytest.fail("compute started"))
    with pytest.raises(SettingError, match="generator.experts must be one full-range model"):
        upscale_targets.run(_settings(world, runs, tmp_path / "b", f"upscale.target_sizes=[{2 * CROP}]",
                                      "upscale.regimes=[noise]", f"generator.experts=[{runs['shape']}]"))
    assert not (tmp_path / "b").exists()
