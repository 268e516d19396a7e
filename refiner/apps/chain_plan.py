"""The settings, output layout and step command lines of ``refiner chain`` (:mod:`refiner.apps.chain`).

:class:`ChainSettings` holds the keys of ``conf/chain.yaml``; :class:`Layout` says where each result goes under
``out``; :class:`Plan` builds each step's command line (``python -m refiner train|build-shards|refine`` with overrides
that point it into ``out``) and says whether the step is done, to resume, or to start.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from refiner.apps.hydra_app import check_composes
from refiner.data.shards import MANIFEST
from refiner.errors import SettingError
from refiner.formats.safe_load import safe_torch_load
from refiner.settings import require_choice, require_int, require_number

TRAININGS = ("vq_f4", "vq_f8", "shape", "detail", "full_range")
STEPS = ("split", "vq_f4", "vq_f8", "shards", "shape", "detail", "full_range", "refine")
EXPERIMENTS = {"vq_f4": "demo_vq_f4", "vq_f8": "demo_vq_f8", "shape": "demo_refiner_500_750",
               "detail": "demo_refiner_751_1000", "full_range": "demo_full_range"}
TITLES = {"split": "hold out validation images", "vq_f4": "train the VQ-f4 autoencoder (the experts' latent space)",
          "vq_f8": "train the VQ-f8 autoencoder (its round trip makes the degraded images)",
          "shards": "build shards: clean + f8-degraded images and their f4 latents",
          "shape": "train the shape expert, t in [250, 500)",
          "detail": "train the detail expert, t in [0, 250), from the shape expert",
          "full_range": "train the equal-compute full-range model, t in [0, 1000)",
          "refine": "refine the held-out images through the chain"}
# keys each command gets from the chain itself, refused in args.* (prefixes end with a dot)
OWNED = {"train": ("experiment", "trainer.max_steps", "trainer.val_check_interval", "ckpt_path", "init_from",
                   "data.size", "hydra.", "paths.", "first_stage"),
         "build-shards": ("size", "splits", "overwrite", "hydra.", "paths.", "first_stage"),
         "refine": ("inputs", "experts", "output_dir", "preset", "overwrite", "hydra.", "paths.", "first_stage")}
RECORD = "chain.json"


# ------------------------------------------------------------------------------------------------ settings
@dataclass(frozen=True)
class ValSplit:
    """Held-out images: ``round(n * fraction)`` of the ``n`` usable ones, clamped to ``[min, max]``."""

    fraction: float = 0.05
    min: int = 4
    max: int = 64

    def __post_init__(self):
        require_number("val.fraction", self.fraction, 0.0, 0.5)
        require_int("val.min", self.min, 1)
        require_int("val.max", self.max, self.min)


@dataclass(frozen=True)
class PerTraining:
    """One integer per training: budgets (``max_steps``; ``full_range`` None = shape + detail) or validations."""

    vq_f4: int = 800
    vq_f8: int = 300
    shape: int = 1000
    detail: int = 600
    full_range: int | None = None


@dataclass(frozen=True)
class CommandArgs:
    """Extra overrides per command (``train``: every training; ``vq``: the VQs; ``windows``: the experts and the
    full-range model)."""

    train: tuple[str, ...] = ()
    vq: tuple[str, ...] = ()
    windows: tuple[str, ...] = ()
    shards: tuple[str, ...] = ()
    refine: tuple[str, ...] = ()

    def __post_init__(self):
        for group, command in (("train", "train"), ("vq", "train"), ("windows", "train"), ("shards", "build-shards"),
                               ("refine", "refine")):
            for arg in getattr(self, group):
                key = str(arg).lstrip("+~").partition("=")[0]
                if any(key == o.rstrip(".") or key.startswith(o if o.endswith(".") else o + ".")
                       for o in OWNED[command]):
                    raise SettingError(f"args.{group} may not set {key} (the chain sets it: see conf/chain.yaml)")


@dataclass(frozen=True)
class FirstStageFiles:
    f4: str | None = None
    f8: str | None = None


@dataclass(frozen=True)
class ChainSettings:
    """The keys of ``conf/chain.yaml``; each is documented there."""

    data_folder: str | None = None
    out: str | None = None
    size: int = 64
    val: ValSplit = field(default_factory=ValSplit)
    min_train: int = 16
    first_stage: str = "demo"  # the conf/first_stage/ option; demo: the VQs are trained here
    first_stage_files: FirstStageFiles = field(default_factory=FirstStageFiles)  # the option's checkpoints
    vq_paths: FirstStageFiles = field(default_factory=FirstStageFiles)  # paths.vq_f4 / paths.vq_f8, passed on
    max_steps: PerTraining = field(default_factory=PerTraining)
    validations: PerTraining = field(default_factory=lambda: PerTraining(2, 2, 4, 3, 8))
    scale: float = 1.0
    full_range: bool = False
    parallel: bool = True
    until: str | None = None
    preset: str = "fewest_artifacts"
    args: CommandArgs = field(default_factory=CommandArgs)

    def __post_init__(self):
        if not self.data_folder:
            raise SettingError("data=<image folder> is required: the folder of images to train on "
                               "(refiner chain data=path/to/images)")
        require_int("size", self.size, 32)
        if self.size % 16:
            raise SettingError(f"size must be a multiple of 16 (the expert UNet halves the size/4 latent twice), "
                               f"got {self.size}; try size={max(32, self.size // 16 * 16)}")
        require_int("min_train", self.min_train, 1)
        for group in ("max_steps", "validations"):
            for name in TRAININGS:
                value = getattr(getattr(self, group), name)
                if value is not None or group == "validations" or name != "full_range":
                    require_int(f"{group}.{name}", value, 1)
        require_number("scale", self.scale, 1e-9)
        for name in ("full_range", "parallel"):
            if not isinstance(getattr(self, name), bool):
                raise SettingError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.until is not None:
            require_choice("until", self.until, self.steps())
        if self.first_stage != "demo":
            for name in ("f4", "f8"):
                path = getattr(self.first_stage_files, name)
                if not path:
                    raise SettingError(f"first_stage={self.first_stage} needs paths.vq_{name}=<the released "
                                       f"vq-{name}/model.ckpt> (its first_stage.{name}.ckpt_path is empty)")
                if not Path(path).exists():
                    key = f"paths.vq_{name}" if path == getattr(self.vq_paths, name) else \
                        f"first_stage.{name}.ckpt_path"
                    raise SettingError(f"first_stage={self.first_stage}: {key}={path} not found (relative paths are "
                                       f"relative to {os.getcwd()})")

    def steps(self) -> tuple[str, ...]:
        """The steps this run has, in order."""
        return tuple(s for s in STEPS if (self.first_stage == "demo" or not s.startswith("vq_"))
                     and (self.full_range or s != "full_range"))

    def budget(self, name: str) -> int:
        """Optimizer steps of a training: its ``max_steps`` times ``scale`` (full range: shape + detail's)."""
        if name == "full_range" and self.max_steps.full_range is None:
            return self.budget("shape") + self.budget("detail")
        return max(1, round(getattr(self.max_steps, name) * self.scale))

    def interval(self, name: str) -> int:
        """Validation interval: the largest divisor of the budget at most budget / validations."""
        budget = self.budget(name)
        target = max(1, budget // getattr(self.validations, name))
        return max(d for d in range(1, target + 1) if budget % d == 0)

    def identity(self) -> dict:
        """What fixes an output folder's content: a re-run into it must agree (budgets may change)."""
        files = {k: str(Path(v).resolve()) for k, v in vars(self.first_stage_files).items() if v} \
            if self.first_stage != "demo" else None
        return {"data": str(Path(self.data_folder).resolve()), "size": self.size, "val": vars(self.val),
                "min_train": self.min_train, "first_stage": self.first_stage,
                "first_stage_files": files}


# ------------------------------------------------------------------------------------------------ layout
@dataclass(frozen=True)
class Layout:
    """Where everything goes under ``out`` (docs/reference/chain.md): ``images/{train,val}`` (the split, symlinks),
    ``images/val_resized`` (the held-out images at size x size), ``shards/{train,val}``, one run folder per training
    (``vq_f4``, ``vq_f8``, ``shape``, ``detail``, ``full_range``), ``refined``, ``refined_full_range``, ``logs``."""

    out: Path

    @property
    def images(self) -> Path:
        return self.out / "images"

    @property
    def held_out(self) -> Path:
        return self.out / "images" / "val_resized"

    @property
    def shards(self) -> Path:
        return self.out / "shards"

    @property
    def logs(self) -> Path:
        return self.out / "logs"

    def refined(self, full_range: bool = False) -> Path:
        return self.out / ("refined_full_range" if full_range else "refined")

    def run_dir(self, training: str) -> Path:
        return self.out / training

    def last(self, training: str) -> Path:
        return self.run_dir(training) / "checkpoints" / "last.ckpt"


def hydra_value(value: Any) -> str:
    """A path as a Hydra override value: as it is when Hydra reads it back as that string, else quoted."""
    text = str(value)
    if re.fullmatch(r"[A-Za-z0-9_./@:+-]+", text) and not re.fullmatch(r"[-+]?[\d_.]+([eE][-+]?\d+)?|true|false|null|"
                                                                 r"[-+]?(inf|nan)", text, re.IGNORECASE):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


# ------------------------------------------------------------------------------------------------ steps
class Plan:
    """Each step's command line and whether it is done: the overrides that point the commands into ``out``."""

    def __init__(self, s: ChainSettings, layout: Layout):
        self.s, self.layout = s, layout

    def first_stage(self, f8: bool = True) -> list[str]:
        """The first stage for a command: the VQs trained here (demo), or the option with the paths it reads."""
        names = ("f4", "f8") if f8 else ("f4",)
        if self.s.first_stage == "demo":
            return [f"first_stage.{n}.ckpt_path={hydra_value(self.layout.last('vq_' + n))}" for n in names]
        return [f"first_stage={self.s.first_stage}", *(f"paths.vq_{n}={hydra_value(getattr(self.s.vq_paths, n))}"
                                                       for n in names if getattr(self.s.vq_paths, n))]

    def common(self) -> list[str]:
        L = self.layout
        return [f"paths.demo_dir={hydra_value(L.images)}", f"paths.demo_shards={hydra_value(L.shards)}",
                f"paths.demo_outputs={hydra_value(L.out)}", *self.first_stage()]

    def train(self, name: str, resume: Path | None = None) -> list[str]:
        s, L, vq = self.s, self.layout, name.startswith("vq_")
        argv = ["train", f"experiment={EXPERIMENTS[name]}", f"hydra.run.dir={hydra_value(L.run_dir(name))}",
                f"trainer.max_steps={s.budget(name)}", f"trainer.val_check_interval={s.interval(name)}",
                *self.common()]
        if vq:  # the VQs learn the images as the shards hold them
            argv.append(f"data.size={s.size}")
        if name == "vq_f4":  # dead-code restarts in the first half of the budget, as demo_vq_f4's 400 of 800
            argv.append(f"model.restart_until={s.budget(name) // 2}")
        if not vq:
            argv.append(f"model.unet.image_size={s.size // 4}")
        argv += [*s.args.train, *(s.args.vq if vq else s.args.windows)]
        if resume is not None:
            return argv + [f"ckpt_path={hydra_value(resume)}"] + (["init_from=null"] if name == "detail" else [])
        return argv + ([f"init_from={hydra_value(L.last('shape'))}"] if name == "detail" else [])

    def shards(self, missing: tuple[str, ...] = ("train", "val")) -> list[str]:
        run_dir = hydra_value(self.layout.logs / "build_shards")
        return ["build-shards", f"size={self.s.size}", f"hydra.run.dir={run_dir}", *self.common(), *self.s.args.shards,
                *(f"~splits.{x}" for x in ("train", "val") if x not in missing)]

    def experts(self, full_range: bool = False) -> list[Path]:
        return [self.layout.last("full_range")] if full_range else [self.layout.last(n) for n in ("shape", "detail")]

    def refine_args(self, inputs: Any, output_dir: Any, full_range: bool = False) -> list[str]:
        """The refine command's arguments (what the chain runs on the held-out images, and prints for yours)."""
        experts = ",".join(hydra_value(p) for p in self.experts(full_range))
        return ["refine", f"inputs={inputs}", f"output_dir={output_dir}", f"preset={self.s.preset}",
                f"experts=[{experts}]", *self.first_stage(f8=False), *self.s.args.refine]

    def refine(self, full_range: bool = False, overwrite: bool = False) -> list[str]:
        out = self.layout.refined(full_range)
        return [*self.refine_args(hydra_value(self.layout.held_out), hydra_value(out), full_range),
                f"hydra.run.dir={hydra_value(out)}", *(["overwrite=true"] if overwrite else [])]

    # ---- state
    def training_state(self, name: str) -> tuple[str, int | None]:
        """``("done" | "resume" | "start", step of last.ckpt or None)``."""
        last = self.layout.last(name)
        if not last.is_file():
            return "start", None
        step = int(safe_torch_load(last).get("global_step") or 0)
        return ("done" if step >= self.s.budget(name) else "resume"), step

    def missing_shards(self) -> tuple[str, ...]:
        return tuple(x for x in ("train", "val") if not (self.layout.shards / x / MANIFEST).is_file())

    def refine_state(self, full_range: bool = False) -> str:
        """``done`` (summary.json newer than every expert), ``stale`` (older) or ``start``."""
        summary = self.layout.refined(full_range) / "summary.json"
        if not summary.is_file():
            return "start"
        newest = max(p.stat().st_mtime for p in self.experts(full_range))
        return "done" if summary.stat().st_mtime >= newest else "stale"

    def all_commands(self) -> list[list[str]]:
        """Every command line this run may use (composed before any step runs)."""
        steps = self.s.steps()
        lines = [self.train(n) for n in TRAININGS if n in steps] + [self.shards()]
        lines += [self.refine()] + ([self.refine(full_range=True)] if self.s.full_range else [])
        return lines


def check_commands(plan: Plan) -> None:
    """Compose every step's command line as its command will, so a bad ``args.*`` override is found now."""
    for argv in plan.all_commands():
        check_composes(argv[0].replace("-", "_"), argv[1:])
