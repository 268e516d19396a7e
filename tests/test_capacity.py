"""Issue 22, items 2 and 3: the capacity grid (widths x step budgets of the seeds study) and the efficiency ratios
over training seeds, against hand values; the grid's refusals, order, reuse and resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from test_seeds import _first_stages, _results

from refiner.apps.capacity import CapacitySettings, CapacityStudy
from refiner.apps.seeds import SeedStudySettings, Study
from refiner.bench import efficiency
from refiner.errors import SettingError

RUN_OF = {"demo_refiner_500_750": "refiner_500_750", "demo_refiner_751_1000": "refiner_751_1000",
          "demo_full_range": "full_range"}


# ------------------------------------------------------------------------------------------------ efficiency
def _log(run_dir: Path, metric: str, points: dict[int, float]) -> None:
    """A CSVLogger metrics.csv with ``metric`` at the given (logged) steps (one version folder per metric)."""
    path = run_dir / "csv" / f"version_{metric.split('_')[-2]}" / "metrics.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("step," + metric + "\n" + "".join(f"{s},{v}\n" for s, v in points.items()))


def test_steps_to_the_full_range_models_final_loss_by_hand(tmp_path):
    """Full range ends at 0.2 after 1600 steps; the shape window first gets there at its validation after 500
    steps (ratio 3.2); the detail window after 1000 + 200 steps (ratio 1600 / 1200)."""
    seed = tmp_path / "seed_0"
    _log(seed / "full_range", "val/loss_in_250_500", {399: 0.5, 799: 0.3, 1599: 0.2})
    _log(seed / "refiner_500_750", "val/loss_in_250_500", {249: 0.4, 499: 0.2, 999: 0.1})
    r = efficiency.reach(seed, "val/loss_in_250_500", "refiner_500_750")
    assert (r.target, r.full_steps, r.steps, r.interval, r.ratio) == (0.2, 1600, 500, 250, 3.2)
    assert r.final == 0.1 and r.loss_ratio == pytest.approx(0.5)
    _log(seed / "full_range", "val/loss_in_0_250", {1599: 0.05})
    _log(seed / "refiner_751_1000", "val/loss_in_0_250", {99: 0.2, 199: 0.05, 599: 0.01})
    # the shape run's last validation (after 1000 steps) is what the detail run's steps start from
    _log(seed / "refiner_500_750", "val/loss_in_0_250", {499: 0.3, 999: 0.2})
    d = efficiency.reach(seed, "val/loss_in_0_250", "refiner_751_1000", ("refiner_500_750",))
    assert d.steps == 1200 and d.ratio == pytest.approx(1600 / 1200)
    _log(seed / "refiner_500_750", "val/loss_in_250_500", {249: 0.4, 999: 0.25})  # never at 0.2
    assert efficiency.reach(seed, "val/loss_in_250_500", "refiner_500_750").steps is None
    assert efficiency.reach(tmp_path / "absent", "val/loss_in_250_500", "refiner_500_750") is None


def test_ratio_summary_is_a_geometric_mean_with_a_t_interval():
    reaches = [efficiency.Reach(0.1, 1600, s, 50, 0.1) for s in (400, 800, 1600)]
    s = efficiency.summary(reaches)
    logs = [math.log(4), math.log(2), 0.0]
    mean = sum(logs) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in logs) / 2)
    half = 4.302652729911275 * sd / math.sqrt(3)  # Student t, 2 degrees of freedom, 97.5%
    assert s.geometric_mean == pytest.approx(2.0) and (s.reached, s.seeds) == (3, 3)
    assert s.low == pytest.approx(math.exp(mean - half)) and s.high == pytest.approx(math.exp(mean + half))
    assert s.loss_ratio == pytest.approx((1.0, 1.0, 1.0))
    # a seed that never reached the target: the mean over the others stays, its interval goes (it would overstate)
    censored = efficiency.summary([*reaches, efficiency.Reach(0.1, 1600, None, 50, 0.4)])
    assert censored.geometric_mean == pytest.approx(2.0) and censored.low is None and (censored.reached,
                                                                                       censored.seeds) == (3, 4)
    assert censored.loss_ratio[0] == pytest.approx(4 ** 0.25)  # 1, 1, 1, 4: geometric mean
    one = efficiency.summary([reaches[0], None])
    assert one.geometric_mean == pytest.approx(4.0) and one.low is None and (one.reached, one.seeds) == (1, 1)


# ------------------------------------------------------------------------------------------------ settings
def _settings(tmp_path, **kw) -> CapacitySettings:
    gen = tmp_path / "gen.ckpt"
    gen.write_bytes(b"")
    return CapacitySettings(**{"output_dir": str(tmp_path / "cap"), "generator": str(gen), "n": 4,
                               **_first_stages(tmp_path), **kw})


@pytest.mark.parametrize("kwargs, message", [
    ({"widths": ()}, "widths is empty"),
    ({"budgets": (1.0, 1.0)}, r"budgets \[1.0, 1.0\] repeats a value"),
    ({"widths": (48,)}, "width=48 does not divide into the UNet's 32 GroupNorm groups"),
    ({"budgets": (0,)}, "budget=0"),
    ({"skip": ("16x3",)}, "skip names 16x3, not a cell of the grid"),
    ({"generator": ""}, "generator is required"),
])
def test_bad_grids_are_refused(tmp_path, kwargs, message):
    with pytest.raises(SettingError, match=message):
        _settings(tmp_path, **kwargs)


def test_a_cell_sets_width_groups_budget_and_validation_interval(tmp_path):
    s = _settings(tmp_path)
    plan = {run: args for run, args, _ in Study(s.cell(16, 2.5)).plan()[0]}
    assert "model.unet.model_channels=16" in plan["full_range"] and "++model.unet.norm_groups=16" in plan["full_range"]
    assert "trainer.max_steps=4000" in plan["full_range"] and "trainer.max_steps=2500" in plan["refiner_500_750"]
    assert "trainer.val_check_interval=50" in plan["refiner_751_1000"]
    wide = {run: args for run, args, _ in Study(s.cell(64, 1)).plan()[0]}["full_range"]
    assert not any("norm_groups" in a or "max_steps" in a for a in wide)  # 32 groups, the demo's budget


def test_cells_run_cheapest_first_and_skip_leaves_cells_out(tmp_path):
    c = CapacityStudy(_settings(tmp_path, skip=("64x2.5",)))
    assert c.cells() == [(16, 1.0), (16, 2.5), (32, 1.0), (32, 2.5), (64, 1.0)]
    p16, p32, p64 = c.params(16), c.params(32), c.params(64)
    assert 3.5 < p32 / p16 < 4.5 and 3.5 < p64 / p32 < 4.5  # about 4x per doubling of the width


def test_reuse_takes_a_study_of_the_same_settings_only(tmp_path):
    s = _settings(tmp_path)
    seeds_study = tmp_path / "seeds_study"
    seeds_study.mkdir()
    record = Study(SeedStudySettings(**{**s.cell(32, 1).__dict__, "width": None,
                                        "output_dir": str(seeds_study)})).record
    del record["budget"]  # written before budgets existed: budget 1
    (seeds_study / "study.json").write_text(json.dumps(record))
    c = CapacityStudy(_settings(tmp_path, reuse=(str(seeds_study),)))
    assert c.reused()[32, 1.0].out == seeds_study
    (seeds_study / "study.json").write_text(json.dumps({**record, "n": 128}))
    with pytest.raises(SettingError, match=r"reuse: .*seeds_study \(cell 32x1\): its n differ"):
        c.reused()
    (seeds_study / "study.json").write_text(json.dumps({**record, "width": 128}))
    with pytest.raises(SettingError, match="is the cell 128x1, not one this study runs"):
        c.reused()


def test_a_grid_runs_its_cells_reads_a_reused_one_and_a_rerun_redoes_nothing(tmp_path, monkeypatch):
    """CapacityStudy.run with the job runner replaced by one that writes what each command would (a training its
    last.ckpt at its budget and a CSV of in-window losses, a benchmark its results.json)."""
    calls = []

    def fake_lanes(self, lanes, threads=None):
        for lane in lanes:
            for job in lane:
                calls.append(job.name)
                args = dict(a.split("=", 1) for a in job.argv[1:] if "=" in a)
                if job.argv[0] == "train":
                    run = Path(args["paths.demo_outputs"]) / RUN_OF[args["experiment"]]
                    (run / "checkpoints").mkdir(parents=True)
                    steps = int(args.get("trainer.max_steps", {"demo_refiner_500_750": 1000, "demo_refiner_751_1000":
                                                               600, "demo_full_range": 1600}[args["experiment"]]))
                    torch.save({"global_step": steps}, run / "checkpoints" / "last.ckpt")
                    _log(run, "val/loss_in_250_500", {steps // 2 - 1: 0.2, steps - 1: 0.1})
                else:
                    out = Path(args["output_dir"])
                    out.mkdir(parents=True)
                    wide = "width_16" not in str(out)  # the narrow cell's chain breaks 3 images, the others' 1
                    (out / "results.json").write_text(json.dumps(_results([0] if wide else [0, 1, 2], [0, 1])))
        return {}

    monkeypatch.setattr("refiner.apps.lanes.Runner.run_lanes", fake_lanes)
    reused = tmp_path / "seeds_study"  # a finished seeds study for 32x1, one seed of two
    s = _settings(tmp_path, widths=(16, 32), budgets=(1,), seeds=(0, 1), reuse=(str(reused),))
    Study(SeedStudySettings(**{**s.cell(32, 1).__dict__, "output_dir": str(reused), "seeds": (0,),
                               "resume": False}), say=lambda _: None).run()
    calls.clear()
    cells = CapacityStudy(s, say=lambda _: None).run()
    assert calls == ["seed_0_refiner_500_750", "seed_0_refiner_751_1000", "seed_0_full_range", "seed_0_bench",
                     "seed_1_refiner_500_750", "seed_1_refiner_751_1000", "seed_1_full_range", "seed_1_bench"]
    narrow, demo = cells
    assert (narrow["width"], narrow["seeds"], demo["seeds"]) == (16, [0, 1], [0])
    assert narrow["summary"]["generator"]["differences"]["chain - full_range"].mean == pytest.approx(1 / 4)
    assert demo["summary"]["generator"]["differences"]["chain - full_range"].mean == pytest.approx(-1 / 4)
    assert narrow["params"] < demo["params"] and narrow["steps"] == 1600
    ratio = narrow["efficiency"]["shape window, t in [250, 500)"]["per_seed"]["0"]["ratio"]
    assert ratio == pytest.approx(1600 / 1000)  # both end at 0.1: the shape window after 1000 steps, full range 1600
    text = (tmp_path / "cap" / "capacity.md").read_text()
    assert "| 16 | 1x | 0.30 M | 1600 | 0, 1 | +25.0 [" in text and "| 32 | 1x | 1.19 M | 1600 | 0 | -25.0 [" in text
    assert (tmp_path / "cap" / "capacity.png").read_bytes()[:4] == b"\x89PNG"
    calls.clear()
    with pytest.raises(SettingError, match="pass resume=true"):
        CapacityStudy(s).run()
    CapacityStudy(CapacitySettings(**{**s.__dict__, "resume": True}), say=lambda _: None).run()
    assert calls == []
