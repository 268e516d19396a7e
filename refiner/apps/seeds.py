"""``refiner bench-seeds``: the demo's comparison repeated over training seeds, with intervals (issue 22, item 1).

Per training seed S (``conf/seeds.yaml``): train the shape window, the detail window finetuned from it and the
equal-compute full-range model into ``<output_dir>/seed_S/`` (``refiner train experiment=demo_... seed=S``, two lanes
side by side as ``make demo``), run ``refiner bench methods=seeds`` on them into ``seed_S/bench/``, and finally
aggregate every seed (:mod:`refiner.bench.seeds`) into ``seeds.md``, ``seeds.json`` and ``seeds.png``.

Every seed shares the demo's first stages and shards, and the generator source comes from one model for all seeds
(``generator``; default the first seed's full-range model), so the seeds differ only in the models being compared.

Resuming: a training run whose ``last.ckpt`` has reached its budget is done; one that has not is resumed from it
(``ckpt_path=``); a benchmark is done when its ``results.json`` has the study's split and n and is newer than the
seed's checkpoints. ``<output_dir>/study.json`` records the settings: a folder holding another study, or anything
else, is refused before any compute unless ``resume=true`` continues the same study.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from omegaconf import DictConfig

from refiner.apps.hydra_app import check_composes, hydra_command, settings_from
from refiner.apps.lanes import Job, JobFailed, Runner, resume_command, run_interruptible, tail
from refiner.bench import efficiency
from refiner.bench import seeds as study
from refiner.cli import run_cli
from refiner.errors import InputsFailed, SettingError
from refiner.formats.safe_load import safe_torch_load
from refiner.io import atomic_write_bytes, atomic_write_text
from refiner.models.unet import GROUPS
from refiner.settings import require_choice, require_int

RUNS = (("refiner_500_750", "demo_refiner_500_750"), ("refiner_751_1000", "demo_refiner_751_1000"),
        ("full_range", "demo_full_range"))
MANIFEST = "study.json"
WRITTEN_BY = "refiner bench-seeds"


@dataclass(frozen=True)
class SeedStudySettings:
    """``conf/seeds.yaml``, checked: ``seeds`` distinct integers >= 0 (at least one); ``width`` a positive multiple
    of the UNet's GroupNorm groups (32) or None; ``split`` one of the benchmark's; ``n`` >= 1; ``t_start`` in
    [0, 999]. Paths are not checked for existence here: the steps' own commands do that, one line each."""

    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    output_dir: str = "outputs/heads/seeds_study"
    resume: bool = False
    data_dir: str = "data"
    demo: str = "heads"
    vq_f4: str = ""
    vq_f8: str = ""
    generator: str | None = None
    width: int | None = None
    budget: float = 1.0
    val_every: int | None = None
    split: str = "holdout"
    n: int = 128
    t_start: int = 499
    parallel: bool = True
    bootstrap_seed: int = 0

    def __post_init__(self) -> None:
        if not self.seeds:
            raise SettingError("seeds is empty: give at least one training seed, e.g. seeds=[0,1,2,3,4]")
        for s in self.seeds:
            require_int("seeds[]", s, minimum=0, maximum=2**32 - 1)  # Lightning's seed_everything: numpy's 32-bit range
        repeated = sorted({s for s in self.seeds if self.seeds.count(s) > 1})
        if repeated:
            raise SettingError(f"seeds lists {', '.join(map(str, repeated))} more than once: each training seed once")
        if self.width is not None:
            require_int("width", self.width, minimum=1)
            if self.width % GROUPS and GROUPS % self.width:
                raise SettingError(f"width={self.width} does not divide into the UNet's {GROUPS} GroupNorm groups: "
                                   f"use a multiple of {GROUPS}, or a divisor of it (16, 8) for a narrower UNet")
        if not isinstance(self.budget, (int, float)) or isinstance(self.budget, bool) or not 0 < self.budget <= 100:
            raise SettingError(f"budget={self.budget!r}: a multiplier of every run's steps in (0, 100], e.g. 2.5")
        if self.val_every is not None:
            require_int("val_every", self.val_every, minimum=1)
        require_choice("split", self.split, ("tune", "report", "holdout"))
        require_int("n", self.n, minimum=1)
        require_int("t_start", self.t_start, minimum=0, maximum=999)
        require_int("bootstrap_seed", self.bootstrap_seed, minimum=0)

    def record(self) -> dict:
        """What defines the study (``study.json``): everything but how it is run (``val_every`` only adds
        validations: the training draws its t and noise from its own per-step generators, so the weights do not
        change; tested)."""
        d = asdict(self)
        for key in ("resume", "parallel", "seeds", "val_every"):
            d.pop(key)
        d["budget"] = float(d["budget"])
        return {"written_by": WRITTEN_BY, **d}

    def unet_overrides(self) -> list[str]:
        """``width`` as model overrides: below the UNet's 32 groups, one GroupNorm group per channel at the first
        level (``norm_groups = width``), as the demo's 32 channels have with 32 groups."""
        if self.width is None:
            return []
        groups = [f"++model.unet.norm_groups={self.width}"] if self.width < GROUPS else []
        return [f"model.unet.model_channels={self.width}", *groups]


# keys a study.json written before they existed lacks: their value then
RECORD_DEFAULTS = {"budget": 1.0}


def check_study_folder(out: Path, manifest_name: str, record: dict, resume: bool, written_by: str,
                       defaults: dict | None = None) -> None:
    """Refuse, before any compute, an ``out`` folder holding another study (its ``manifest_name`` differs from
    ``record``; keys it lacks take ``defaults``), this study without ``resume``, or anything else."""
    manifest = out / manifest_name
    if manifest.is_file():
        held = {**(defaults or {}), **json.loads(manifest.read_text())}
        if held != record:
            changed = sorted(k for k in set(held) | set(record) if held.get(k) != record.get(k))
            raise SettingError(f"output_dir {out} holds another study (its {', '.join(changed)} differ); "
                               "choose another output_dir")
        if not resume:
            raise SettingError(f"output_dir {out} holds this study already: pass resume=true to go on with it "
                               "(finished runs are kept), or choose another output_dir")
    elif out.exists() and any(out.iterdir()):
        raise SettingError(f"output_dir {out} is not empty and holds no {manifest_name}: it is not a study of "
                           f"{written_by}; choose another output_dir")


class Study:
    def __init__(self, s: SeedStudySettings, say=print):
        self.s, self.say = s, say
        self.out = Path(s.output_dir)
        self.runner = Runner(self.out / "logs", say=say)
        # the generator resolved: its default depends on the seed list, and every seed of a study must refine the
        # same generator samples (a later run with seeds=[5] resumes the study only with the same generator)
        self.record = {**s.record(), "generator": self.generator()}

    def seed_dir(self, seed: int) -> Path:
        return self.out / f"seed_{seed}"

    def generator(self) -> str:
        return self.s.generator or str(self.seed_dir(self.s.seeds[0]) / "full_range" / "checkpoints" / "last.ckpt")

    # ---- command lines
    def shared(self, seed: int) -> list[str]:
        return [f"paths.data_dir={self.s.data_dir}", f"paths.demo={self.s.demo}",
                f"paths.demo_outputs={self.seed_dir(seed)}", f"first_stage.f4.ckpt_path={self.s.vq_f4}",
                f"first_stage.f8.ckpt_path={self.s.vq_f8}"]

    def train_args(self, seed: int, experiment: str, cfg=None) -> list[str]:
        """The training command line; ``cfg``, the experiment composed without the budget, gives the steps
        ``budget`` multiplies (None: the plain command, for composing it)."""
        args = [f"experiment={experiment}", *self.shared(seed), f"seed={seed}", *self.s.unet_overrides()]
        if cfg is None:
            return args
        steps = max(1, round(int(cfg.trainer.max_steps) * self.s.budget))
        every = min(self.s.val_every or int(cfg.trainer.val_check_interval), steps)
        if steps != int(cfg.trainer.max_steps):
            args.append(f"trainer.max_steps={steps}")
        if every != int(cfg.trainer.val_check_interval):
            args.append(f"trainer.val_check_interval={every}")
        return args

    def bench_args(self, seed: int) -> list[str]:
        out = self.seed_dir(seed) / "bench"
        t = f"[{self.s.t_start}]"
        return ["methods=seeds", *self.shared(seed), f"generator.experts=[{self.generator()}]", f"split={self.s.split}",
                f"n={self.s.n}", f"output_dir={out}", f"hydra.run.dir={out}", "overwrite=true",
                *(f"methods.{m}.t_starts={t}" for m in ("chain", "full_range", "shape_window", "detail_window"))]

    # ---- state
    def training_state(self, seed: int, run: str, budget: int) -> tuple[str, Path]:
        last = self.seed_dir(seed) / run / "checkpoints" / "last.ckpt"
        if not last.is_file():
            return "start", last
        step = int(safe_torch_load(last).get("global_step") or 0)
        return ("done" if step >= budget else "resume"), last

    def bench_done(self, seed: int) -> bool:
        results = self.seed_dir(seed) / "bench" / "results.json"
        if not results.is_file():
            return False
        r = json.loads(results.read_text())
        ckpts = [self.seed_dir(seed) / run / "checkpoints" / "last.ckpt" for run, _ in RUNS]
        newest = max((c.stat().st_mtime for c in ckpts if c.exists()), default=0.0)
        return r.get("split") == self.s.split and r.get("n") == self.s.n and results.stat().st_mtime >= newest

    # ---- steps
    def check_folder(self) -> None:
        check_study_folder(self.out, MANIFEST, self.record, self.s.resume, WRITTEN_BY, RECORD_DEFAULTS)

    def plan(self) -> dict[int, list[tuple[str, list[str], str]]]:
        """Per seed, ``(run, argv, state)`` of its trainings; every command line composed first (one line each)."""
        for name, path in (("vq_f4", self.s.vq_f4), ("vq_f8", self.s.vq_f8), ("generator", self.s.generator)):
            if path is not None and not Path(path).is_file():  # the steps would find out only after training
                raise SettingError(f"{name}={path}: no such file" + (" (make demo trains the demo's first stages)"
                                                                     if name != "generator" else ""))
        plans = {}
        for seed in self.s.seeds:
            plans[seed] = []
            for run, experiment in RUNS:
                args = self.train_args(seed, experiment, check_composes("train", self.train_args(seed, experiment)))
                cfg = check_composes("train", args)
                state, last = self.training_state(seed, run, int(cfg.trainer.max_steps))
                if state == "resume":  # the checkpoint holds the weights: a finetune resumes without init_from
                    args = [*args, f"ckpt_path={last}", *(["init_from=null"] if cfg.get("init_from") else [])]
                plans[seed].append((run, args, state))
            check_composes("bench", self.bench_args(seed))
        return plans

    def run(self) -> dict:
        self.check_folder()
        plans = self.plan()
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.out / MANIFEST, json.dumps(self.record, indent=1))
        for seed, runs in plans.items():
            jobs = {run: Job(f"seed_{seed}_{run}", ["train", *args]) for run, args, state in runs if state != "done"}
            windows = [jobs[r] for r in ("refiner_500_750", "refiner_751_1000") if r in jobs]
            full = [jobs["full_range"]] if "full_range" in jobs else []
            lanes = [windows, full] if self.s.parallel else [windows + full]
            lanes = [lane for lane in lanes if lane]
            if lanes:
                self.say(f"seed {seed}: training {', '.join(j.name for lane in lanes for j in lane)}")
                self._run(lanes, threads=1 if len(lanes) > 1 else None)
            if not self.bench_done(seed):
                self.say(f"seed {seed}: benchmark ({self.s.split}, n = {self.s.n})")
                self._run([[Job(f"seed_{seed}_bench", ["bench", *self.bench_args(seed)])]])
        return self.aggregate()

    def _run(self, lanes, threads=None) -> None:
        try:
            self.runner.run_lanes(lanes, threads=threads)
        except JobFailed as err:
            raise InputsFailed(f"{err}; its last lines:\n{tail(err.log)}\nrerun with resume=true to go on") from None

    def aggregate(self) -> dict:
        results = study.read_results([self.seed_dir(s) / "bench" / "results.json" for s in self.s.seeds])
        meta = {"written_by": WRITTEN_BY, "split": self.s.split, "n": self.s.n, "t_start": self.s.t_start,
                "generator": self.generator(), "width": self.s.width, "budget": self.s.budget}
        agg = study.aggregate(study.outcomes(results, self.s.t_start), seed=self.s.bootstrap_seed)
        eff = efficiency.study_efficiency([self.seed_dir(s) for s in self.s.seeds])
        text = study.markdown(agg, self.s.seeds, meta) + "\n" + efficiency.markdown(eff, self.s.seeds)
        atomic_write_text(self.out / "seeds.md", text)
        atomic_write_text(self.out / "seeds.json", json.dumps(
            {**study.to_json(agg, self.s.seeds, meta), "efficiency": efficiency.to_json(eff, self.s.seeds)}, indent=1))
        atomic_write_bytes(self.out / "seeds.png", study.rates_png(agg))
        print(text)
        return agg


def settings(cfg: DictConfig) -> SeedStudySettings:
    return settings_from(SeedStudySettings, cfg)


def task(cfg: DictConfig) -> None:
    def body() -> None:
        Study(settings(cfg)).run()  # its return value is the aggregate, not an exit code

    hint = f"resume with: {resume_command('bench-seeds', sys.argv[1:])} (finished runs are kept)"
    raise SystemExit(run_interruptible(lambda: run_cli(body), hint))


main = hydra_command("seeds", task)
