"""The benchmark's typed settings (refiner.bench.settings, refiner.bench.artifact_settings) as refiner.apps.bench builds
them from conf/bench.yaml: the presets convert, what the outputs record of them reads as the config did, each value
is checked once, and a bad setting is one ``error:`` line and exit 2 before any model loads (no trained model is
needed here)."""

from __future__ import annotations

import re

import pytest
from conftest import compose_config
from omegaconf import OmegaConf

from refiner.apps import bench as apps_bench
from refiner.artifacts.color_fix import ColorFix
from refiner.bench import run as bench_run
from refiner.bench.artifact_settings import ArtifactsSettings, PastePoint
from refiner.errors import SettingError
from refiner.settings import from_config, to_plain


def _compose(tmp_path, *overrides: str):
    return compose_config("bench", [f"output_dir={tmp_path / 'out'}", *overrides], tmp_path)


@pytest.mark.parametrize("preset", ["full", "demo"])
def test_the_presets_convert_and_the_records_read_as_the_config(preset, tmp_path):
    cfg = _compose(tmp_path, f"methods={preset}")
    settings = apps_bench.bench_settings(cfg)
    assert list(settings.methods) == list(cfg.methods)
    assert settings.methods["chain"].experts == (cfg.checkpoints.shape, cfg.checkpoints.detail)
    assert settings.generator.experts == (cfg.checkpoints.full_range,)
    assert settings.methods["unsharp"].unsharp.amounts == tuple(cfg.methods.unsharp.unsharp.amounts)
    # artifacts.json records the artifacts block, results.json the split's seeds: as the config wrote them
    assert to_plain(settings.artifacts) == OmegaConf.to_container(cfg.artifacts, resolve=True)
    assert to_plain(settings.split_seeds) == OmegaConf.to_container(cfg.seeds[cfg.split])
    assert to_plain(settings.efficiency) == OmegaConf.to_container(cfg.efficiency, resolve=True)
    assert settings.first_stage["f4"]["params"]["embed_dim"] == 3


def _literal(words: str) -> str:
    """``words`` as a regex that matches them literally, but for ``.*``."""
    return ".*".join(re.escape(part) for part in words.split(".*"))


def _artifacts(**blocks) -> ArtifactsSettings:
    return from_config(ArtifactsSettings, blocks, "artifacts.")


def test_paste_back_points_are_checked_and_a_point_given_twice_is_measured_once():
    a = _artifacts(t_starts=[99, 499], strength_t_low=[99], color_fix=[{"method": "adain"}],
                   paste_back={"points": [{"onto": "fixed", "region": "output>40", "grow": 2, "feather": 4},
                                          {"onto": "fixed", "region": "probe", "grow": 4, "feather": 4}],
                               "sweep": {"onto": ["fixed", "t_start=auto"], "regions": ["output>40", "probe"],
                                         "whole_above": [None, 0]}})
    points = a.paste_back.all_points()
    assert points[:2] == [PastePoint("fixed", "output>40", 2, 4), PastePoint("fixed", "probe", 4, 4)]
    assert len(points) == 2 + 2 * 2 * 2 - 1  # the sweep's (fixed, probe, grow 4, feather 4) is the second point
    assert PastePoint("fixed", "probe", 4, 4, 0) in points and PastePoint("fixed", "probe", 4, 4, 0.0).key() != \
        PastePoint("fixed", "probe", 4, 4, 0).key()  # as written, as before: 0 and 0.0 are two points
    assert [p.rule() for p in points[:2]] == [("output change > 40", 40.0), ("probe", None)]
    assert a.paste_bases() == ["fixed", "fixed t_start 99", "fixed t_start 499",
                               "colour fix (adain) on fixed t_start 99", "colour fix (adain) on fixed t_start 499",
                               "t_start=auto", "strength map (rest from 99)"]
    assert to_plain(points[0]) == {"onto": "fixed", "region": "output>40", "grow": 2, "feather": 4}  # no whole_above
    assert to_plain(PastePoint("fixed", "probe", 1, 1, 0))["whole_above"] == 0
    grown = _artifacts(strength_dilate_px=[2, 6], strength_t_low=[0])
    assert grown.strength_maps() == [(2, 0, "grown 2, rest from 0"), (6, 0, "grown 6, rest from 0")]
    for blocks, words in [
        ({"paste_back": {"points": [{"onto": "fixed", "regon": "probe", "grow": 2, "feather": 4}]}},
         "unknown setting artifacts.paste_back.points[0].regon; did you mean artifacts.paste_back.points[0].region?"),
        ({"paste_back": {"points": [{"onto": "fixed", "region": "output>x", "grow": 2, "feather": 4}]}},
         "artifacts.paste_back.points[0]: region must be probe, output or output>L"),
        ({"paste_back": {"points": [{"onto": "fixed", "region": "output>300", "grow": 2, "feather": 4}]}},
         "artifacts.paste_back.points[0]: a change level must be a number in [0, 255)"),
        ({"paste_back": {"points": [{"onto": "fixed", "region": "probe", "grow": -1, "feather": 4}]}},
         "artifacts.paste_back.points[0]: grow must be in [0"),
        ({"paste_back": {"points": [{"onto": "fixed", "region": "probe", "grow": 1}]}},
         "artifacts.paste_back.points[0]: .*feather"),
        ({"paste_back": {"points": [{"onto": "strength map (rest from 0)", "region": "probe", "grow": 1,
                                     "feather": 1}]}, "strength_t_low": [99]},
         "artifacts.paste_back onto='strength map (rest from 0)' must be one of"),
        ({"paste_back": {"sweep": {"onto": ["fixed"], "regions": ["probe"], "feather": [-2]}}},
         "artifacts.paste_back.sweep: feather must be in [0"),
        ({"paste_back": {"sweep": {"grow": 4}}}, "artifacts.paste_back.sweep.grow must be a list"),
        ({"color_fix": [{"method": "none"}]}, "artifacts.color_fix lists method: none"),
        ({"color_fix": [{"method": "wavelet", "levels": 0}]}, "artifacts.color_fix[0]: color_fix.levels must be in"),
        ({"detectors": ["asced"]}, "artifacts.detectors must include residual"),
        ({"sources": ["f8"]}, "artifacts.sources must be a non-empty subset of ['generator', 'defects']"),
        ({"strength_t_low": [600]}, "artifacts.strength_t_low must be in [0, 499]"),
        ({"strength_dilate_px": -1}, "artifacts.strength_dilate_px must be in [0"),
        ({"ttc": {"detectors": ["residual"]}}, "artifacts.ttc.detectors must be a subset"),
        ({"ttc": {"t_correct": 500, "t_detect": 400}}, "artifacts.ttc.t_detect must be in [501, 999]"),
        ({"ttc": {"correction_eta": 2}}, "artifacts.ttc.correction_eta must be in [0.0, 1.0]"),
    ]:
        with pytest.raises(SettingError, match=_literal(words)):
            _artifacts(**blocks)


def test_a_colour_fix_is_a_settings_field_and_keeps_its_value_as_given():
    (fix,) = _artifacts(color_fix=[{"method": "wavelet", "levels": 3, "max_shift": 8}]).color_fix
    assert fix == ColorFix("wavelet", 3, 8) and fix.max_shift == 8 and isinstance(fix.max_shift, int)
    assert fix.label() == "colour fix (wavelet, 3 levels, shift <= 8)"
    assert fix.digest() == {"method": "wavelet", "levels": 3, "max_shift": 8.0}  # refine's digests: as before


@pytest.mark.parametrize("task", ["task", "artifacts_task", "upscale_task"])
@pytest.mark.parametrize("overrides,line", [
    (["artifacts.paste_back.points=[{onto:fixed,regon:probe,grow:2,feather:4}]"],
     "error: unknown setting artifacts.paste_back.points[0].regon; "
     "did you mean artifacts.paste_back.points[0].region?"),
    (["n=-3"], "error: n must be a positive int, got -3"),
    (["split=test"], "error: split must be one of ['holdout', 'report', 'tune'], got 'test'"),
    (["+methods.extra={t_starts:[99]}"], "error: methods.extra: experts must be a non-empty list of window "
                                         "checkpoints, got ()"),
    (["methods.chain.experts=[]"], "error: methods.chain: experts must be a non-empty list of window checkpoints, "
                                   "got ()"),
    (["checkpoints.shape=${nowhere}"], None),  # an interpolation that does not resolve: one line too
])
def test_a_bad_setting_is_one_error_line_and_exit_2_before_any_model_loads(task, overrides, line, tmp_path, capsys,
                                                                             monkeypatch):
    monkeypatch.setattr(bench_run.Models, "__init__", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit) as exit_:
        getattr(apps_bench, task)(_compose(tmp_path, *overrides))
    assert exit_.value.code == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and not out, err
    if line is not None:
        assert lines[0] == line
    else:
        assert "nowhere" in lines[0]
    assert not (tmp_path / "out").exists()
