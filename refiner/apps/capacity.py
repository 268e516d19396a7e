"""``refiner bench-capacity``: the seeds study over a grid of UNet widths and step budgets (issue 22, item 2).

Every cell ``(width, budget)`` of ``widths x budgets`` (minus ``skip``) is one ``refiner bench-seeds`` study
(:class:`refiner.apps.seeds.Study`) in ``<output_dir>/width_<W>_budget_<B>/``: the demo's three runs per training
seed at that width, every run's steps times ``budget``, then the benchmark. Cells run cheapest first (parameters x
budget), so a study cut short has its small cells; re-running with ``resume=true`` continues where it stopped and
never retrains a finished run. A cell can instead be read from a finished ``bench-seeds`` study of the same settings
(``reuse``), e.g. the seeds study for the demo's own width at budget 1. ``capacity.md``, ``capacity.json`` and
``capacity.png`` (:mod:`refiner.bench.capacity`) are rewritten after every cell, from every seed finished so far.

Every cell refines the same images from one generator model (``generator``), so the cells differ only in the models
being compared.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from omegaconf import DictConfig

from refiner.apps.hydra_app import check_composes, hydra_command, resolved, settings_from
from refiner.apps.lanes import resume_command, run_interruptible
from refiner.apps.seeds import RECORD_DEFAULTS, SeedStudySettings, Study, check_study_folder
from refiner.bench import capacity, efficiency
from refiner.bench import seeds as study
from refiner.cli import run_cli
from refiner.errors import SettingError
from refiner.io import atomic_write_bytes, atomic_write_text
from refiner.models.unet import UNetModel

MANIFEST = "capacity_study.json"
WRITTEN_BY = "refiner bench-capacity"


def cell_name(width: int, budget: float) -> str:
    return f"{width}x{budget:g}"


@dataclass(frozen=True)
class CapacitySettings:
    """``conf/capacity.yaml``, checked. ``widths`` and ``budgets``: distinct, each width valid for
    :class:`SeedStudySettings` (a multiple or a divisor of 32), each budget in (0, 100]; ``skip`` names cells of the
    grid as ``WIDTHxBUDGET`` (``64x2.5``); ``reuse`` lists finished ``bench-seeds`` study folders, each standing for
    the cell its ``study.json`` names (checked when the study runs); ``generator`` is required (one model's samples
    for every cell). The other settings are those of ``refiner bench-seeds``."""

    widths: tuple[int, ...] = (16, 32, 64)
    budgets: tuple[float, ...] = (1.0, 2.5)
    skip: tuple[str, ...] = ()
    reuse: tuple[str, ...] = ()
    seeds: tuple[int, ...] = (0, 1, 2)
    output_dir: str = "outputs/heads/capacity_study"
    resume: bool = False
    data_dir: str = "data"
    demo: str = "heads"
    vq_f4: str = ""
    vq_f8: str = ""
    generator: str = ""
    split: str = "holdout"
    n: int = 128
    t_start: int = 499
    val_every: int | None = 50
    parallel: bool = True
    bootstrap_seed: int = 0

    def __post_init__(self) -> None:
        for name, values in (("widths", self.widths), ("budgets", self.budgets)):
            if not values:
                raise SettingError(f"{name} is empty: give at least one")
            if len(set(values)) != len(values):
                raise SettingError(f"{name} {list(values)} repeats a value: each once")
        if not self.generator:
            raise SettingError("generator is required: one full-range model whose samples every cell refines "
                               "(e.g. the seeds study's seed_0/full_range/checkpoints/last.ckpt)")
        names = {cell_name(w, b) for w in self.widths for b in self.budgets}
        unknown = [c for c in self.skip if c not in names]
        if unknown:
            raise SettingError(f"skip names {', '.join(unknown)}, not a cell of the grid ({', '.join(sorted(names))})")
        for w in self.widths:  # every width and budget through the seeds study's own checks, one line each
            for b in self.budgets:
                self.cell(w, b)

    def cell(self, width: int, budget: float) -> SeedStudySettings:
        """The ``bench-seeds`` settings of one cell: every setting the two share, then the cell's own."""
        shared = {f.name: getattr(self, f.name) for f in fields(SeedStudySettings) if hasattr(self, f.name)}
        return SeedStudySettings(**{**shared, "seeds": tuple(self.seeds), "resume": True, "width": width,
                                    "budget": budget,
                                    "output_dir": str(Path(self.output_dir) / f"width_{width}_budget_{budget:g}")})

    def record(self) -> dict:
        """What defines the grid (``capacity.json``): what every cell shares. Widths, budgets and seeds may grow."""
        keep = ("data_dir", "demo", "vq_f4", "vq_f8", "generator", "split", "n", "t_start", "bootstrap_seed")
        return {"written_by": WRITTEN_BY, **{k: v for k, v in asdict(self).items() if k in keep}}


class CapacityStudy:
    def __init__(self, s: CapacitySettings, say=print):
        self.s, self.say = s, say
        self.out = Path(s.output_dir)
        self.demo_width = int(check_composes("train", ["experiment=demo_refiner_500_750"]).model.unet.model_channels)
        self._size: dict[tuple[int, float], tuple[int, int]] = {}  # cell -> (UNet parameters, full-range steps)

    def cells(self) -> list[tuple[int, float]]:
        grid = [(w, b) for w in self.s.widths for b in self.s.budgets if cell_name(w, b) not in self.s.skip]
        return sorted(grid, key=lambda wb: (wb[0] ** 2 * wb[1], wb[0]))

    def check_folder(self) -> None:
        check_study_folder(self.out, MANIFEST, self.s.record(), self.s.resume, WRITTEN_BY)

    def reused(self) -> dict[tuple[int, float], Study]:
        """The finished ``bench-seeds`` studies of ``reuse`` by the cell their ``study.json`` names, each checked to
        have that cell's settings (an absent width is the demo's, an absent budget 1)."""
        out = {}
        for path in self.s.reuse:
            manifest = Path(path) / "study.json"
            if not manifest.is_file():
                raise SettingError(f"reuse: {path} holds no study.json (not a bench-seeds study)")
            held = {**RECORD_DEFAULTS, **json.loads(manifest.read_text())}
            cell = (int(held.get("width") or self.demo_width), float(held["budget"]))
            if cell not in self.cells():
                raise SettingError(f"reuse: {path} is the cell {cell_name(*cell)}, not one this study runs")
            want = Study(self.s.cell(*cell)).record
            held["width"] = cell[0]
            changed = sorted(k for k in want if k != "output_dir" and held.get(k) != want[k])
            if changed:
                raise SettingError(f"reuse: {path} (cell {cell_name(*cell)}): its {', '.join(changed)} differ from "
                                   "this study's")
            out[cell] = Study(replace(self.s.cell(*cell), output_dir=str(path)), say=self.say)
        return out

    def params(self, width: int) -> int:
        cfg = check_composes("train", ["experiment=demo_refiner_500_750",
                                       *SeedStudySettings(width=width).unet_overrides()])
        return sum(p.numel() for p in UNetModel(**resolved(cfg.model.unet)).parameters())

    def run(self) -> list[dict]:
        self.check_folder()
        cells = self.cells()
        reused = self.reused()
        studies = {(w, b): reused.get((w, b)) or Study(self.s.cell(w, b), say=self.say) for w, b in cells}
        for cell, st in studies.items():
            if cell not in reused:
                st.plan()  # every command line composed and every file checked before the first training
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.out / MANIFEST, json.dumps(self.s.record(), indent=1))
        for (w, b), st in studies.items():
            if (w, b) not in reused:
                self.say(f"cell width {w}, budget {b:g}x: {st.out}")
                st.run()
            self.write([self.summary(w2, b2, studies[w2, b2]) for w2, b2 in cells])
        return [self.summary(w, b, studies[w, b]) for w, b in cells]

    def summary(self, width: int, budget: float, st: Study) -> dict:
        finished = [s for s in self.s.seeds if st.bench_done(s)]
        results = study.read_results([st.seed_dir(s) / "bench" / "results.json" for s in finished])
        if (width, budget) not in self._size:  # composed once per cell, not at every rewrite of the tables
            cfg = check_composes("train", st.train_args(0, "demo_full_range",
                                                        check_composes("train", st.train_args(0, "demo_full_range"))))
            self._size[width, budget] = (self.params(width), int(cfg.trainer.max_steps))
        params, steps = self._size[width, budget]
        eff = efficiency.study_efficiency([st.seed_dir(s) for s in finished]) if finished else None
        return {"width": width, "budget": budget, "params": params, "steps": steps,
                "seeds": finished, "folder": str(st.out),
                "summary": capacity.cell_summary(results, self.s.t_start, self.s.bootstrap_seed) if results else None,
                "efficiency": None if eff is None else efficiency.to_json(eff, finished)}

    def write(self, cells: list[dict]) -> None:
        meta = {"split": self.s.split, "n": self.s.n, "t_start": self.s.t_start}
        text = capacity.markdown(cells, meta)
        atomic_write_text(self.out / "capacity.md", text)
        plain = [{**c, "summary": None if c["summary"] is None else study.to_json(c["summary"], c["seeds"], {})}
                 for c in cells]
        atomic_write_text(self.out / "capacity.json", json.dumps({**self.s.record(), **meta, "cells": plain},
                                                                 indent=1))
        atomic_write_bytes(self.out / "capacity.png", capacity.differences_png(cells))


def settings(cfg: DictConfig) -> CapacitySettings:
    return settings_from(CapacitySettings, cfg)


def task(cfg: DictConfig) -> None:
    def body() -> None:
        cells = CapacityStudy(settings(cfg)).run()
        print(capacity.markdown(cells, {"split": cfg.split, "n": cfg.n, "t_start": cfg.t_start}))

    hint = f"resume with: {resume_command('bench-capacity', sys.argv[1:])} (finished runs are kept)"
    raise SystemExit(run_interruptible(lambda: run_cli(body), hint))


main = hydra_command("capacity", task)
