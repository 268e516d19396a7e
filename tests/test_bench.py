"""The composition benchmark's parts: methods and settings, scores, sources, outputs and the refusal of bad
input before any compute. (The end-to-end run on trained models is in tests/test_bench_e2e.py.)"""

from __future__ import annotations

import json

import numpy as np
import pytest

from refiner.bench.methods import BenchError, methods_from_settings, score, unsharp
from refiner.bench.report import efficiency, first_step_at_or_below, markdown, read_logged
from refiner.bench.run import check_output_dir, grid_setting
from refiner.bench.settings import BenchSettings, EfficiencySettings
from refiner.bench.sources import clean_heads, injected_defects
from refiner.data.synthetic import DEFECTS
from refiner.errors import SettingError
from refiner.sampling import steps_for
from refiner.settings import from_config


def _settings(**blocks) -> BenchSettings:
    """Settings as refiner.apps.bench builds them, from a small plain config (``blocks`` replace its keys)."""
    plain = {"seeds": {"report": {"images": 3, "generator": 200000, "references": 5}}, "output_dir": "out",
             "generator": {"experts": ["full.ckpt"]}, "first_stage": {},
             "methods": {"chain": {"experts": ["a.ckpt", "b.ckpt"], "t_starts": [99]}}, **blocks}
    return from_config(BenchSettings, plain)


def _methods(spec: dict):
    return methods_from_settings(_settings(methods=spec).methods)


def test_steps_for_gives_equal_density_and_stays_in_range():
    assert [steps_for(t, 20) for t in (99, 199, 499, 999)] == [5, 10, 25, 50]
    assert steps_for(1, 20) == 1 and steps_for(5, 1) == 6  # never more points than timesteps in [0, t]


def test_methods_read_both_kinds_and_bad_specs_are_refused_naming_the_method():
    ms = _methods({"chain": {"experts": ["a.ckpt", "b.ckpt"], "t_starts": [99, 499]},
                   "alone": {"experts": ["a.ckpt"], "t_starts": [299], "allow_outside_window": True, "label": "A"},
                   "usm": {"unsharp": {"radius": 2.0, "amounts": [50, 100]}}})
    assert [(m.name, m.kind, m.settings) for m in ms] == [("chain", "diffusion", (99, 499)),
                                                          ("alone", "diffusion", (299,)), ("usm", "unsharp", (50, 100))]
    assert ms[1].allow_outside_window and not ms[0].allow_outside_window and ms[2].radius == 2.0
    assert [m.label for m in ms] == ["chain", "A", "usm"] and ms[0].experts == ("a.ckpt", "b.ckpt")
    for bad, words in [({}, "methods is empty"),
                       ({"c": {"experts": "a.ckpt", "t_starts": [9]}}, "methods.c: experts must be a non-empty list"),
                       ({"c": {"t_starts": [9]}}, "methods.c: experts must be a non-empty list"),  # no experts
                       ({"c": {"experts": ["a"], "t_starts": [1000]}}, "methods.c: t_starts must be in [1, 999]"),
                       ({"c": {"experts": ["a"], "t_starts": [9.5]}}, "methods.c: t_starts must be an integer"),
                       ({"c": {"experts": ["a"], "t_starts": []}}, "methods.c: t_starts must be a non-empty list"),
                       ({"c": {"experts": ["a"], "t_starts": [9], "t_start": 3}},
                        "unknown setting methods.c.t_start; did you mean methods.c.t_starts?"),
                       ({"c": {"experts": ["a"], "t_starts": [9], "allow_outside_window": "yes"}},
                        "methods.c: allow_outside_window must be true or false"),
                       ({"u": {"unsharp": {"amounts": [0]}}}, "methods.u: unsharp.amounts must be in [1"),
                       ({"u": {"unsharp": {"amounts": [5], "radius": 0}}}, "methods.u: unsharp.radius must be > 0"),
                       ({"u": {"unsharp": {"amounts": [5]}, "experts": ["a"]}},
                        "methods.u: an unsharp method takes no")]:
        with pytest.raises(SettingError, match=words.replace("[", r"\[").replace("?", r"\?")):
            _methods(bad)


def test_bench_settings_check_each_value_once():
    s = _settings()
    assert (s.split, s.n, s.size, s.split_seeds.images) == ("report", 64, 64, 3)
    assert s.sources == ("generator", "f8", "defects")
    for blocks, words in [({"split": "test"}, "split must be one of ['report'], got 'test'"),
                          ({"n": -3}, "n must be a positive int, got -3"), ({"n": True}, "n must be a positive int"),
                          ({"size": 36}, "size must be a multiple of 8"), ({"size": 24}, "size must be a multiple"),
                          ({"sources": ["photos"]}, "sources must be a non-empty subset"),
                          ({"sources": []}, "sources must be a non-empty subset"),
                          ({"seed": -1}, "seed must be in [0"), ({"grid_images": -1}, "grid_images must be in [0"),
                          ({"generator": {"experts": ["a", "b"]}}, "generator.experts must name one full-range"),
                          ({"generator": {"experts": ["a"], "steps": 0}}, "generator.steps must be in [1"),
                          ({"seeds": {"report": {"images": -1, "generator": 0, "references": 0}}},
                           "seeds.report: images must be in [0"),
                          ({"seeds": {"report": {"images": 1, "generator": 0}}}, "seeds.report: .*references"),
                          ({"use_ema": "no"}, "use_ema must be true or false"),
                          ({"efficiency": {"window": "w", "full_range": "", "metric": "m"}},
                           "efficiency.full_range must be a non-empty string"),
                          ({"swd": {"normalize": "both"}}, "swd.normalize must be per_set or joint"),
                          ({"swd": {"patch_sze": 3}}, "unknown setting swd.patch_sze; did you mean swd.patch_size?"),
                          ({"upscale": {"t_starts": [0]}}, "upscale.t_starts must be in [1, 999]"),
                          ({"recommended_t_start": 1000}, "recommended_t_start must be in [1, 999]"),
                          ({"colour": 1}, "unknown setting colour")]:
        with pytest.raises(SettingError, match=words.replace("[", r"\[").replace("?", r"\?")):
            _settings(**blocks)
    # without the generator source, its experts are not needed; swd passes on only what is set
    assert _settings(sources=["f8"], generator={}).generator.experts == ()
    assert _settings(swd={"repeats": 2}).swd.kwargs() == {"repeats": 2} and _settings().swd.kwargs() == {}


def test_grid_setting_is_nearest_sweep_point():
    (m,) = _methods({"c": {"experts": ["a"], "t_starts": [99, 299, 699]}})
    assert grid_setting(m, 399) == 299 and grid_setting(m, 500) == 699 and grid_setting(m, 99) == 99
    (u,) = _methods({"u": {"unsharp": {"amounts": [50, 100, 200]}}})
    assert grid_setting(u, 399) == 100


def test_unsharp_sharpens_an_edge_and_leaves_flat_regions():
    img = np.full((32, 32, 3), 100, np.uint8)
    img[:, 16:] = 160
    out = unsharp([img], 200, radius=1.0)[0]
    assert out.dtype == np.uint8 and out.shape == img.shape
    assert (out[:, :8] == 100).all() and (out[:, 24:] == 160).all()  # flat: unchanged
    assert out[:, 15].max() < 100 and out[:, 16].min() > 160  # overshoot on both sides of the edge


def test_score_on_clean_heads_and_on_defects():
    clean = clean_heads(12, seed=9)
    refs = clean_heads(12, seed=10)
    s = score(clean, clean, refs, clean)
    assert s["artifact_rate"] == 0 and s["rmse_to_input"] == 0 and s["ssim_to_input"] == pytest.approx(1.0)
    assert s["psnr_to_clean"] == 100.0  # identical images: the cap, not inf
    d = injected_defects(10, seed=9)
    assert d.labels == [DEFECTS[i % len(DEFECTS)] for i in range(10)]
    s = score(d.inputs, d.clean, refs, d.clean)
    assert s["artifact_rate"] >= 0.9 and 0 < s["rmse_to_input"] < 0.2 and s["failed"]
    # RMSE by hand for one pair
    a, b = d.inputs[0].astype(float) / 255, d.clean[0].astype(float) / 255
    one = score([d.inputs[0]], [d.clean[0]], refs[:1])
    assert one["rmse_to_input"] == pytest.approx(np.sqrt(((a - b) ** 2).mean()), rel=1e-9)


def test_sources_are_pure_functions_of_the_seed():
    a, b, c = injected_defects(5, 3), injected_defects(5, 3), injected_defects(5, 4)
    assert all((x == y).all() for x, y in zip(a.inputs, b.inputs))
    assert not all((x == y).all() for x, y in zip(a.inputs, c.inputs))
    assert all(m.any() and m.shape == (64, 64) for m in a.masks)


def test_output_dir_refuses_files_the_bench_did_not_write(tmp_path):
    check_output_dir(tmp_path / "new", overwrite=False)
    (tmp_path / "results.md").write_text("my notes")
    with pytest.raises(BenchError, match="did not write"):
        check_output_dir(tmp_path, overwrite=False)
    check_output_dir(tmp_path, overwrite=True)
    (tmp_path / "results.json").write_text(json.dumps({"written_by": "refiner bench"}))
    check_output_dir(tmp_path, overwrite=False)  # an earlier benchmark run: replaced
    (tmp_path / "file").write_text("x")
    with pytest.raises(BenchError, match="not a folder"):
        check_output_dir(tmp_path / "file", overwrite=False)


def _write_csv(run, rows):
    d = run / "csv" / "version_0"
    d.mkdir(parents=True)
    lines = ["step,train/loss,val/loss_in_250_500"] + [f"{s},0.5,{v}" if v is not None else f"{s},0.5," for s, v in rows]
    (d / "metrics.csv").write_text("\n".join(lines) + "\n")


def test_efficiency_reads_logged_losses_and_finds_crossings(tmp_path):
    _write_csv(tmp_path / "w", [(99, 0.30), (100, None), (199, 0.20), (299, 0.15)])
    _write_csv(tmp_path / "f", [(99, 0.40), (199, 0.32), (299, 0.25), (399, 0.19)])
    assert read_logged(tmp_path / "w", "val/loss_in_250_500") == ([99, 199, 299], [0.30, 0.20, 0.15])
    eff = efficiency(EfficiencySettings(str(tmp_path / "w"), str(tmp_path / "f"), "val/loss_in_250_500"))
    assert eff["available"]
    assert eff["window"]["steps_to_other_final"] == 299  # first window loss <= 0.19 (0.20 at 199 is not)
    assert eff["full_range"]["steps_to_other_final"] is None  # never reaches 0.15
    assert first_step_at_or_below([1, 2], [0.3, 0.1], 0.2) == 2
    missing = efficiency(EfficiencySettings(str(tmp_path / "w"), str(tmp_path / "none"), "val/loss_in_250_500"))
    assert not missing["available"] and "none" in missing["why"]
    assert efficiency(None) == {"available": False, "why": "no efficiency runs configured"}


def test_markdown_lists_every_method_and_source():
    row = {"t_start": 299, "artifact_rate": 0.25, "swd_x1e3": 50.0, "rmse_to_input": 0.05, "ssim_to_input": 0.9,
           "seconds": 1.0}
    inp = {"artifact_rate": 0.5, "swd_x1e3": 80.0, "rmse_to_input": 0.0, "ssim_to_input": 1.0}
    results = {"split": "tune", "seeds": {}, "n": 4, "t_per_step": 20, "generator_steps": 10,
               "recommended_t_start": 299, "sources": {
                   "generator": {"input": inp, "methods": {
                       "chain": {"kind": "diffusion", "label": "chain", "grid_setting": 299, "sweep": [row]},
                       "unsharp": {"kind": "unsharp", "label": "unsharp mask", "grid_setting": 100,
                                   "sweep": [{**row, "amount_percent": 100, "artifact_rate": 0.5}]}}}}}
    text = markdown(results)
    assert "| input (no refinement) | 50.0% |" in text
    assert "| chain (t_start 299) | 25.0% |" in text and "| unsharp mask (100%) | 50.0% |" in text
    assert "| chain | t=299 | 25.0% | 50.0 | 0.0500 | 0.900 | – | 1.0 |" in text


def test_dominated_is_pareto_dominance_over_the_fixed_points():
    from refiner.bench.artifacts import dominated

    row = lambda p, rate, rmse: {"point": p, "artifact_rate": rate, "rmse_to_input": rmse}  # noqa: E731
    rows = [row("fixed t_start 99", 0.5, 0.10), row("fixed t_start 499", 0.3, 0.15), row("x", 0.4, 0.10),
            row("y", 0.2, 0.12), row("tie", 0.5, 0.09), row("same", 0.5, 0.10), row("far", 0.1, 0.16)]
    d = dominated(rows)
    assert d["by_point"] == {"x": ["fixed t_start 99"], "y": ["fixed t_start 499"], "tie": ["fixed t_start 99"],
                             "same": [], "far": []}
    assert d["all"] == [] and d["covered"] is True
    d = dominated(rows + [row("z", 0.1, 0.09)])
    assert d["all"] == ["z"] and d["by_point"]["z"] == ["fixed t_start 99", "fixed t_start 499"]
    assert dominated(rows[:3])["covered"] is False


def test_families_group_labels_that_differ_only_in_numbers():
    from refiner.bench.artifacts import families

    rows = [{"point": p} for p in ("fixed t_start 99", "fixed t_start 499", "t_start=auto",
                                   "paste back (fixed t_start 499; output change > 32 mask, grow 2, feather 4)",
                                   "paste back (fixed t_start 499; output change > 64 mask, grow 2, feather 4)")]
    got = [(name, [r["point"] for r in members]) for name, members in families(rows)]
    assert got == [("fixed t_start ·", ["fixed t_start 99", "fixed t_start 499"]), ("t_start=auto", ["t_start=auto"]),
                   ("paste back (fixed t_start 499; output change > · mask, grow 2, feather 4)", [r["point"] for r in
                                                                                                  rows[3:]])]
