"""Training seeds as a dimension of the benchmark (issue 22): the two-level bootstrap against independent references,
the aggregation against hand values, and the study command's refusals and resume plan."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT

from refiner.apps.hydra_app import check_composes
from refiner.apps.seeds import MANIFEST, SeedStudySettings, Study
from refiner.bench import seeds as study
from refiner.bench.intervals import Estimate, two_level_bootstrap
from refiner.errors import SettingError


# ---------------------------------------------------------------------------------------------- intervals
def test_one_seed_many_images_gives_the_wald_interval():
    rng = np.random.default_rng(1)
    broken = (rng.random((1, 4000)) < 0.3).astype(float)
    p = broken.mean()
    half = 1.96 * np.sqrt(p * (1 - p) / broken.size)
    e = two_level_bootstrap(broken, resamples=4000)
    assert e.mean == pytest.approx(p)
    assert e.low == pytest.approx(p - half, abs=0.003) and e.high == pytest.approx(p + half, abs=0.003)
    assert e.seed_sd == 0.0


def test_seed_level_resampling_by_hand():
    """Two seeds, each constant over its images: a draw's mean is 1 (seed 0 twice, probability 1/4), 0.5 or 0
    (seed 1 twice, 1/4), whatever images are drawn; the 95% percentile interval is therefore [0, 1]."""
    e = two_level_bootstrap(np.array([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]), resamples=4000)
    assert (e.mean, e.low, e.high) == (0.5, 0.0, 1.0)
    assert e.per_seed == (1.0, 0.0) and e.seed_sd == pytest.approx(np.sqrt(0.5))


def test_a_paired_difference_of_equal_methods_is_exactly_zero_and_pairing_narrows_it():
    rng = np.random.default_rng(2)
    a = (rng.random((5, 128)) < 0.5).astype(float)
    same = two_level_bootstrap(a, a.copy())
    assert (same.mean, same.low, same.high) == (0.0, 0.0, 0.0) and same.verdict() == "level"
    b = a.copy()
    b[:, :13] = 1.0 - b[:, :13]  # B differs from A on 10% of the images only
    paired = two_level_bootstrap(a, b)
    assert paired.mean == pytest.approx((a - b).mean())
    # unpaired, the difference of two independent rates would have about sqrt(2) times one rate's interval; paired,
    # only the 10% of images where they differ count (sd sqrt(0.1) against 0.5: about 0.63 times one rate's)
    one = two_level_bootstrap(a)
    assert paired.high - paired.low < 0.8 * (one.high - one.low)


def test_verdicts_and_shape_errors():
    assert Estimate(-0.1, -0.2, -0.01, ()).verdict() == "ahead"
    assert Estimate(0.1, 0.01, 0.2, ()).verdict() == "behind"
    assert Estimate(0.0, -0.1, 0.1, ()).verdict() == "level"
    with pytest.raises(ValueError, match="one shape"):
        two_level_bootstrap(np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(ValueError, match="non-empty"):
        two_level_bootstrap(np.zeros((0, 3)))


# ---------------------------------------------------------------------------------------------- aggregation
def _results(chain_failed, full_failed, n=4, split="holdout"):
    point = lambda failed: {"t_start": 499, "failed": failed}  # noqa: E731
    return {"split": split, "seeds": {"images": 11}, "n": n, "size": 64, "sources": {"generator": {
        "input": {"failed": list(range(n))},
        "methods": {"chain": {"sweep": [point(chain_failed)]}, "full_range": {"sweep": [point(full_failed)]}}}}}


def test_outcomes_and_aggregate_by_hand():
    results = [_results([0], [0, 1]), _results([0, 1], [0, 1, 2])]
    m = study.outcomes(results, 499)["generator"]
    assert m["input"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 1]]
    assert m["chain"].tolist() == [[1, 0, 0, 0], [1, 1, 0, 0]]
    full = study.aggregate({"generator": m})
    agg = full["generator"]
    assert agg["rates"]["chain"].mean == pytest.approx(3 / 8) and agg["rates"]["chain"].per_seed == (0.25, 0.5)
    assert agg["rates"]["full_range"].mean == pytest.approx(5 / 8)
    diff = agg["differences"]["chain - full_range"]
    assert diff.mean == pytest.approx(-2 / 8) and diff.high <= 0  # the chain never breaks an image full range fixes
    text = study.markdown(full, [0, 1], {"split": "holdout", "n": 4, "t_start": 499})
    assert "| chain (shape + detail expert) | 37.5% [" in text and "| chain - full range | -25.0 [" in text
    assert study.rates_png(full)[:4] == b"\x89PNG"


def test_seeds_whose_benchmarks_differ_are_refused():
    with pytest.raises(ValueError, match="differ in split"):
        study.outcomes([_results([0], [0]), _results([0], [0], split="report")], 499)


# ---------------------------------------------------------------------------------------------- the command
@pytest.mark.parametrize("kwargs, message", [
    ({"seeds": ()}, "seeds is empty"),
    ({"seeds": (0, 1, 1)}, "lists 1 more than once"),
    ({"seeds": (-1,)}, "seeds"),
    ({"width": 48}, "width=48 does not divide into the UNet's 32 GroupNorm groups"),
    ({"split": "train"}, "split"),
])
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(SettingError, match=message):
        SeedStudySettings(**kwargs)


def test_the_cli_refuses_a_duplicated_seed_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "refiner", "bench-seeds", "seeds=[0,0]", f"output_dir={tmp_path}/s",
                           f"hydra.run.dir={tmp_path}/h"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: seeds lists 0 more than once: each training seed once"], proc.stderr


def test_a_folder_of_something_else_or_of_this_study_needs_resume(tmp_path):
    s = SeedStudySettings(output_dir=str(tmp_path / "study"), vq_f4="f4.ckpt", vq_f8="f8.ckpt")
    (tmp_path / "study").mkdir()
    (tmp_path / "study" / "notes.txt").write_text("mine")
    with pytest.raises(SettingError, match="not empty and holds no study.json"):
        Study(s).check_folder()
    (tmp_path / "study" / "notes.txt").unlink()
    (tmp_path / "study" / MANIFEST).write_text(json.dumps(Study(s).record))
    with pytest.raises(SettingError, match="pass resume=true"):
        Study(s).check_folder()
    Study(SeedStudySettings(**{**s.__dict__, "resume": True})).check_folder()  # the same study, resumed
    other = SeedStudySettings(**{**s.__dict__, "resume": True, "n": 64})
    with pytest.raises(SettingError, match="holds another study .*n differ"):
        Study(other).check_folder()
    later = SeedStudySettings(**{**s.__dict__, "resume": True, "seeds": (5,)})  # default generator: seed 5's
    with pytest.raises(SettingError, match="holds another study .*generator differ"):
        Study(later).check_folder()
    generator = str(Study(s).seed_dir(0) / "full_range" / "checkpoints" / "last.ckpt")
    Study(SeedStudySettings(**{**later.__dict__, "generator": generator})).check_folder()


def _first_stages(tmp_path) -> dict:
    for name in ("f4.ckpt", "f8.ckpt"):
        (tmp_path / name).write_bytes(b"")  # only their existence is checked before the steps run
    return {"vq_f4": str(tmp_path / "f4.ckpt"), "vq_f8": str(tmp_path / "f8.ckpt")}


def test_the_plan_skips_finished_runs_and_resumes_unfinished_ones(tmp_path):
    s = SeedStudySettings(seeds=(3,), output_dir=str(tmp_path / "study"), **_first_stages(tmp_path))
    runs = Study(s).seed_dir(3)
    for run, step in (("refiner_500_750", 1000), ("full_range", 700)):  # the demo's budgets: 1000, 600, 1600
        (runs / run / "checkpoints").mkdir(parents=True)
        torch.save({"global_step": step}, runs / run / "checkpoints" / "last.ckpt")
    plan = {run: (args, state) for run, args, state in Study(s).plan()[3]}
    assert plan["refiner_500_750"][1] == "done"
    assert plan["refiner_751_1000"][1] == "start" and not any(a.startswith("ckpt_path=")
                                                              for a in plan["refiner_751_1000"][0])
    # an interrupted finetune (the detail window starts from the shape window) resumes from its own checkpoint
    # alone: train refuses ckpt_path together with init_from
    (runs / "refiner_751_1000" / "checkpoints").mkdir(parents=True)
    torch.save({"global_step": 300}, runs / "refiner_751_1000" / "checkpoints" / "last.ckpt")
    args, state = {run: (args, state) for run, args, state in Study(s).plan()[3]}["refiner_751_1000"]
    assert state == "resume" and args[-2:] == [f"ckpt_path={runs}/refiner_751_1000/checkpoints/last.ckpt",
                                               "init_from=null"]
    cfg = check_composes("train", args)
    assert cfg.init_from is None and cfg.ckpt_path.endswith("refiner_751_1000/checkpoints/last.ckpt")
    assert plan["full_range"] == ([*plan["full_range"][0][:-1], f"ckpt_path={runs}/full_range/checkpoints/last.ckpt"],
                                  "resume")
    assert "seed=3" in plan["full_range"][0] and f"paths.demo_outputs={runs}" in plan["full_range"][0]


def test_missing_first_stages_or_generator_are_refused_before_any_step(tmp_path):
    s = SeedStudySettings(output_dir=str(tmp_path / "study"), vq_f4=str(tmp_path / "no.ckpt"), vq_f8="x")
    with pytest.raises(SettingError, match="vq_f4=.*no.ckpt: no such file"):
        Study(s).plan()
    s = SeedStudySettings(output_dir=str(tmp_path / "study"), generator=str(tmp_path / "gen.ckpt"),
                          **_first_stages(tmp_path))
    with pytest.raises(SettingError, match="generator=.*gen.ckpt: no such file"):
        Study(s).plan()


def test_a_study_trains_in_two_lanes_benchmarks_aggregates_and_a_rerun_redoes_nothing(tmp_path, monkeypatch):
    """Study.run with the job runner replaced by one that writes what each command would: a training writes its
    last.ckpt at its budget, a benchmark its results.json. The real commands are tested in their own files."""
    budgets = {"demo_refiner_500_750": 1000, "demo_refiner_751_1000": 600, "demo_full_range": 1600}
    calls = []

    def fake_lanes(self, lanes, threads=None):
        calls.append(([[job.name for job in lane] for lane in lanes], threads))
        for lane in lanes:
            for job in lane:
                args = dict(a.split("=", 1) for a in job.argv[1:] if "=" in a)
                if job.argv[0] == "train":
                    seed_dir = Path(args["paths.demo_outputs"])
                    run = {"demo_refiner_500_750": "refiner_500_750", "demo_refiner_751_1000": "refiner_751_1000",
                           "demo_full_range": "full_range"}[args["experiment"]]
                    (seed_dir / run / "checkpoints").mkdir(parents=True)
                    torch.save({"global_step": budgets[args["experiment"]]}, seed_dir / run / "checkpoints/last.ckpt")
                else:
                    seed = int(Path(args["output_dir"]).parent.name.split("_")[1])
                    Path(args["output_dir"]).mkdir(parents=True)
                    chain = [0] if seed == 0 else [0, 1]  # seed 0's chain breaks 1 of 4 images, seed 1's 2
                    Path(args["output_dir"], "results.json").write_text(json.dumps(
                        _results(chain, [0, 1, 2], split=args["split"]) | {"n": int(args["n"])}))
        return {}

    monkeypatch.setattr("refiner.apps.lanes.Runner.run_lanes", fake_lanes)
    s = SeedStudySettings(seeds=(0, 1), output_dir=str(tmp_path / "study"), n=4, **_first_stages(tmp_path))
    agg = Study(s, say=lambda _: None).run()
    assert calls == [
        ([["seed_0_refiner_500_750", "seed_0_refiner_751_1000"], ["seed_0_full_range"]], 1),
        ([["seed_0_bench"]], None),
        ([["seed_1_refiner_500_750", "seed_1_refiner_751_1000"], ["seed_1_full_range"]], 1),
        ([["seed_1_bench"]], None)]
    assert agg["generator"]["rates"]["chain"].per_seed == (0.25, 0.5)
    written = json.loads((tmp_path / "study" / "seeds.json").read_text())
    assert written["sources"]["generator"]["differences"]["chain - full_range"]["mean"] == pytest.approx(-3 / 8)
    assert (tmp_path / "study" / "seeds.md").is_file() and (tmp_path / "study" / "seeds.png").is_file()
    calls.clear()
    with pytest.raises(SettingError, match="resume=true"):
        Study(s).run()
    Study(SeedStudySettings(**{**s.__dict__, "resume": True}), say=lambda _: None).run()
    assert calls == []  # every training at its budget, every benchmark newer than its checkpoints


def test_the_command_exits_0_after_a_study(tmp_path, monkeypatch):
    from conftest import compose_config

    from refiner.apps import seeds as app

    monkeypatch.setattr(app.Study, "run", lambda self: {"generator": {}})  # what a finished study returns
    cfg = compose_config("seeds", [f"output_dir={tmp_path / 'study'}"], tmp_path)
    with pytest.raises(SystemExit) as exit_:
        app.task(cfg)
    assert exit_.value.code == 0


def test_an_interrupted_study_exits_130_naming_the_command_that_resumes_it(tmp_path, monkeypatch, capsys):
    from conftest import compose_config

    from refiner.apps import seeds as app

    def interrupted(self):
        raise KeyboardInterrupt  # what SIGTERM or Ctrl-C becomes while a training runs

    monkeypatch.setattr(app.Study, "run", interrupted)
    monkeypatch.setattr("sys.argv", ["refiner", "seeds=[0,1]", "resume=false", f"output_dir={tmp_path}/my study"])
    cfg = compose_config("seeds", [f"output_dir={tmp_path / 'study'}"], tmp_path)
    with pytest.raises(SystemExit) as exit_:
        app.task(cfg)
    assert exit_.value.code == 130
    assert capsys.readouterr().err.strip() == (f"interrupted: resume with: refiner bench-seeds 'seeds=[0,1]' "
                                               f"'output_dir={tmp_path}/my study' resume=true (finished runs are kept)")


def test_an_interrupted_finetune_prints_a_resume_command_without_its_init_from(monkeypatch, tmp_path):
    """train refuses ckpt_path with init_from; the detail window's experiment sets init_from itself, so the printed
    command must unset it."""
    from refiner.apps.train import resume_command

    monkeypatch.setattr(sys, "argv", ["refiner train", "experiment=demo_refiner_751_1000", "init_from=/a/shape.ckpt"])
    ckpt = tmp_path / "last.ckpt"
    assert resume_command(ckpt, finetune=True) == (f"refiner train experiment=demo_refiner_751_1000 "
                                                   f"ckpt_path={ckpt} init_from=null")
    assert resume_command(ckpt).endswith(f"experiment=demo_refiner_751_1000 ckpt_path={ckpt}")
