"""The quality benchmark's settings, ``conf/bench.yaml`` and ``conf/methods/*.yaml``, as frozen dataclasses:
:class:`BenchSettings` and its blocks (the ``artifacts`` block's are in :mod:`refiner.bench.artifact_settings`).

Each class's arguments are the config's keys, its docstring says what each does, and its ``__post_init__`` is the
one check of those values: a bad value is one :class:`~refiner.errors.SettingError` line (exit 2) before any model
loads. ``refiner.apps.bench`` builds the settings once from the composed config (:func:`refiner.settings.from_config`,
which refuses unknown keys, naming the nearest valid one); everything under ``refiner/bench`` takes them. What needs a
file or a model (checkpoints, windows, the calibration file) is checked by :class:`refiner.bench.run.Models` and the
commands, also before any compute. Values are kept as given (an int stays an int), so that the records of them
(:func:`refiner.settings.to_plain`) read as the config did.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from refiner.bench.artifact_settings import ArtifactsSettings, AscedSettings
from refiner.bench.checks import NUM_TIMESTEPS, BenchError, ints, names, strings
from refiner.bench.sources import SOURCES
from refiner.data.synthetic import MIN_SIZE
from refiner.settings import (
    optional,
    require_bool,
    require_int,
    require_number,
    to_plain,
)


@dataclass(frozen=True)
class SplitSeeds:
    """The seeds of one split (``seeds.<split>``); see ``conf/bench.yaml`` for which split is for what.

    Args:
        images: seed of the heads of the ``f8`` and ``defects`` sources (:mod:`refiner.data.synthetic`).
        generator: noise seed of the generator's image 0 (image ``i`` uses ``generator + i``).
        references: seed of the clean heads SWD compares with.
    """

    images: int
    generator: int
    references: int

    def __post_init__(self):
        for name in ("images", "generator", "references"):
            require_int(name, getattr(self, name), 0)


@dataclass(frozen=True)
class GeneratorSettings:
    """The ``generator`` source: images a full-range model generates from pure noise (``generator``).

    Args:
        experts: the full-range checkpoint, as a one-element list (a model covering every t, unconditional: checked
            when it is loaded). Read only when ``sources`` holds ``generator``.
        steps: DDIM steps from pure noise, >= 1 (and at most the model's T, checked when it is loaded).
    """

    experts: tuple[str, ...] = ()
    steps: int = 10

    def __post_init__(self):
        if not isinstance(self.experts, tuple) or any(not isinstance(e, str) for e in self.experts):
            raise BenchError(f"generator.experts must be a list of checkpoints, got {self.experts!r}")
        require_int("generator.steps", self.steps, 1)


@dataclass(frozen=True)
class UnsharpSpec:
    """PIL's unsharp mask, the benchmark's model-free "SR-like" baseline (``methods.<name>.unsharp``).

    Args:
        amounts: the sweep: amounts in percent, ints >= 1.
        radius: the Gaussian blur's radius in pixels, > 0.
    """

    amounts: tuple[int, ...] = ()
    radius: float = 1.0

    def __post_init__(self):
        ints("unsharp.amounts", self.amounts, 1)
        if require_number("unsharp.radius", self.radius) <= 0:
            raise BenchError(f"unsharp.radius must be > 0, got {self.radius}")


@dataclass(frozen=True)
class MethodSpec:
    """One compared method (``methods.<name>``, from ``conf/methods/*.yaml``): a diffusion method (``experts`` and
    ``t_starts``) or the unsharp mask (``unsharp``), not both.

    Args:
        experts: the window checkpoints refined through, as one chain (SDEdit).
        t_starts: the sweep: t_start values in [1, 999]; each is refined with ``steps_for(t_start, t_per_step)``
            DDIM steps, so two methods at one t_start spend the same UNet evaluations.
        allow_outside_window: let the nearest window take the steps no window covers (a window used alone).
        label: the method's name in tables and plots; None: its key.
        unsharp: the unsharp mask instead of a diffusion method.
    """

    experts: tuple[str, ...] = ()
    t_starts: tuple[int, ...] = ()
    allow_outside_window: bool = False
    label: str | None = None
    unsharp: UnsharpSpec | None = None

    def __post_init__(self):
        require_bool("allow_outside_window", self.allow_outside_window)
        if self.label is not None and not isinstance(self.label, str):
            raise BenchError(f"label must be a string, got {self.label!r}")
        if self.unsharp is not None:
            if self.experts or self.t_starts or self.allow_outside_window:
                raise BenchError("an unsharp method takes no experts, t_starts or allow_outside_window")
            return
        if not isinstance(self.experts, tuple) or not self.experts or any(not isinstance(e, str) for e in self.experts):
            raise BenchError(f"experts must be a non-empty list of window checkpoints, got {self.experts!r}")
        ints("t_starts", self.t_starts, 1, NUM_TIMESTEPS - 1)


@dataclass(frozen=True)
class EfficiencySettings:
    """The training runs whose logged in-window validation losses give ``efficiency.png`` (the blog's efficiency
    claim; :func:`refiner.bench.report.efficiency`). A run that did not log ``metric`` makes the section say so.

    Args:
        window: the window model's training run folder (its ``csv/version_*/metrics.csv``).
        full_range: the full-range model's training run folder.
        metric: the logged column, e.g. ``val/loss_in_250_500``.
    """

    window: str
    full_range: str
    metric: str

    def __post_init__(self):
        strings("efficiency", self, ("window", "full_range", "metric"))


@dataclass(frozen=True)
class SwdSettings:
    """Extra arguments of :func:`refiner.metrics.swd` (``swd``); each left unset takes that function's default.

    Args:
        patches_per_level: patches drawn per pyramid level (unset: the function's rule).
        patch_size: patch side in pixels.
        min_size: the pyramid's smallest level side.
        directions_per_repeat: random directions per repeat.
        repeats: repeats averaged.
        normalize: ``per_set`` or ``joint``.
    """

    patches_per_level: int | None = optional()
    patch_size: int | None = optional()
    min_size: int | None = optional()
    directions_per_repeat: int | None = optional()
    repeats: int | None = optional()
    normalize: str | None = optional()

    def __post_init__(self):
        for f in dataclasses.fields(self)[:-1]:  # the ints
            if getattr(self, f.name) is not None:
                require_int(f"swd.{f.name}", getattr(self, f.name), 1)
        if self.normalize not in (None, "per_set", "joint"):
            raise BenchError(f"swd.normalize must be per_set or joint, got {self.normalize!r}")

    def kwargs(self) -> dict:
        """The arguments that are set, for :func:`refiner.metrics.swd`."""
        return to_plain(self)


UPSCALE_REGIMES = ("noise", "generator", "defects")


@dataclass(frozen=True)
class UpscaleSettings:
    """``refiner bench-upscale`` (``upscale``): x2 from ``size / 2`` px through ``methods.chain``; or, with
    ``target_sizes``, beyond the training size (:mod:`refiner.bench.upscale_targets`).

    Args:
        t_starts: the t_starts the diffusion upscalers refine from, in [1, 999].
        target_sizes: empty: the x2 study from ``size / 2``. Else the sides, in px, to make pictures at from models
            trained at ``size`` px: each above ``size``, ``size`` times a power of 2 (DemoFusion's x2 phases) and a
            multiple of 8 (checked against the models' latent factor times UNet downsampling before any compute).
        regimes: which inputs (beyond the training size): ``noise`` (generation at the target size from pure noise,
            ``generator.experts`` at ``generator.steps``), ``generator`` and ``defects`` (the split's generator
            samples and injected-defect heads at ``size`` px, refined into the target size through
            ``methods.chain``).
        equal_evals: beyond the training size, give direct and tiled sampling as many DDIM steps as make their UNet
            evaluations (counted at the training size) equal to DemoFusion's with both paths; false: every method
            on the same grid.
        ablations: beyond the training size, also DemoFusion without its global path, its skip residual, or both.
        alpha1: beyond the training size, DemoFusion (both paths) with each of these skip-residual cosine scales
            (its ``cosine_scale_1``; 3 is its default, smaller keeps the upsampled layout longer); > 0.
        sigma: ... and each of these global-path blurs (its ``sigma``; 1.0 is its default); > 0. The ablations run
            at the first of each list.
    """

    t_starts: tuple[int, ...] = (299, 499)
    target_sizes: tuple[int, ...] = ()
    regimes: tuple[str, ...] = UPSCALE_REGIMES
    equal_evals: bool = True
    ablations: bool = True
    alpha1: tuple[float, ...] = (3.0,)
    sigma: tuple[float, ...] = (1.0,)

    def __post_init__(self):
        ints("upscale.t_starts", self.t_starts, 1, NUM_TIMESTEPS - 1)
        ints("upscale.target_sizes", self.target_sizes, 1, empty=True)
        names("upscale.regimes", self.regimes, UPSCALE_REGIMES)
        require_bool("upscale.equal_evals", self.equal_evals)
        require_bool("upscale.ablations", self.ablations)
        for key in ("alpha1", "sigma"):
            values = getattr(self, key)
            if not isinstance(values, tuple) or not values or any(
                    isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 for v in values):
                raise BenchError(f"upscale.{key} must be a non-empty list of numbers > 0, got {values!r}")

    def check_targets(self, size: int) -> None:
        """Each target size against the training size ``size`` (the settings' own checks; the models' latent
        factor is :func:`refiner.bench.upscale_targets.check_latent_multiple`'s)."""
        for target in self.target_sizes:
            if target <= size:
                raise BenchError(f"upscale.target_sizes: {target} px is not above the training size {size} px "
                                 f"(size); beyond the training size means larger")
            if target % 8:
                raise BenchError(f"upscale.target_sizes: {target} px is not a multiple of 8, as size must be "
                                 f"(the latent factor)")
            ratio = target // size
            if target % size or ratio & (ratio - 1):
                raise BenchError(f"upscale.target_sizes: {target} px is not {size} px (size) times a power of 2; "
                                 f"DemoFusion's phases double the side")


@dataclass(frozen=True, kw_only=True)
class BenchSettings:
    """The quality benchmark (``conf/bench.yaml``; ``python -m refiner.bench``, ``refiner bench``) and its side
    commands (``bench-artifacts``, ``bench-upscale``). The defaults are ``conf/bench.yaml``'s.

    Args:
        split: which seeds: a key of ``seeds`` (``tune``, ``report``, ``holdout``).
        seeds: the seeds of every split (:class:`SplitSeeds`).
        n: images per artifact source (and clean references), >= 1.
        size: image side in pixels: a multiple of 8, >= ``MIN_SIZE`` (32).
        sources: the artifact sources (of ``generator``, ``f8``, ``defects``: :mod:`refiner.bench.sources`).
        checkpoints: named checkpoints (name -> path) that ``methods``, ``generator`` and the commands' chain name in
            the config; the benchmark reads the experts lists, not this.
        generator: the ``generator`` source (:class:`GeneratorSettings`).
        t_per_step: DDIM density of every diffusion method: ``round((t_start + 1) / t_per_step)`` steps (equal
            compute), >= 1.
        recommended_t_start: the t_start the summary table and comparison grid show (or each method's nearest).
        efficiency: the training runs of ``efficiency.png`` (:class:`EfficiencySettings`); None: no such section.
        artifacts: ``bench-artifacts`` (:class:`ArtifactsSettings`).
        upscale: ``bench-upscale`` (:class:`UpscaleSettings`).
        asced: ``bench-asced`` (:class:`~refiner.bench.artifact_settings.AscedSettings`).
        grid_images: rows per source in ``comparison_grid.png``, >= 0.
        batch_size: images per batch, >= 1.
        seed: refinement noise: image ``i`` gets its q_sample noise from ``seed + i`` (as ``refine.py``), >= 0.
        swd: extra arguments of SWD (:class:`SwdSettings`).
        use_ema: refine with the checkpoints' EMA weights.
        trust_checkpoint: load checkpoints with full unpickling (only files you trust).
        allow_first_stage_mismatch: accept windows trained with another first stage than ``first_stage.f4``.
        device: torch device (``cpu``, ``cuda``, ``cuda:N``, ``mps``).
        output_dir: where the outputs go.
        overwrite: replace files in ``output_dir`` that this command did not write.
        methods: the compared methods, name -> :class:`MethodSpec` (``conf/methods/``); at least one.
        first_stage: the first stages, ``f4`` (the latent space) and ``f8`` (the ``f8`` source's degradation), each
            a plain ``{ckpt_path, params}`` block (:func:`refiner.bench.run.load_first_stage`).
    """

    split: str = "report"
    seeds: Mapping[str, SplitSeeds]
    n: int = 64
    size: int = 64
    sources: tuple[str, ...] = SOURCES
    checkpoints: Mapping[str, str | None] = dataclasses.field(default_factory=dict)
    generator: GeneratorSettings = GeneratorSettings()
    t_per_step: int = 20
    recommended_t_start: int = 499
    efficiency: EfficiencySettings | None = None
    artifacts: ArtifactsSettings = ArtifactsSettings()
    upscale: UpscaleSettings = UpscaleSettings()
    asced: AscedSettings = AscedSettings()
    grid_images: int = 4
    batch_size: int = 64
    seed: int = 0
    swd: SwdSettings = SwdSettings()
    use_ema: bool = True
    trust_checkpoint: bool = False
    allow_first_stage_mismatch: bool = False
    device: str = "cpu"
    output_dir: str
    overwrite: bool = False
    methods: Mapping[str, MethodSpec]
    first_stage: Mapping[str, Mapping[str, Any]]

    def __post_init__(self):
        if not isinstance(self.seeds, Mapping) or self.split not in self.seeds:
            raise BenchError(f"split must be one of {sorted(self.seeds) if isinstance(self.seeds, Mapping) else []}, "
                             f"got {self.split!r}")
        for key in ("n", "size", "t_per_step", "batch_size"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise BenchError(f"{key} must be a positive int, got {value!r}")
        require_int("grid_images", self.grid_images, 0)
        require_int("seed", self.seed, 0)
        if self.size < MIN_SIZE or self.size % 8:
            raise BenchError(f"size must be a multiple of 8 and >= {MIN_SIZE} px, got {self.size}")
        names("sources", self.sources, SOURCES)
        if "generator" in self.sources and len(self.generator.experts) != 1:
            raise BenchError(f"generator.experts must name one full-range checkpoint, got "
                             f"{list(self.generator.experts)}")
        require_int("recommended_t_start", self.recommended_t_start, 1, NUM_TIMESTEPS - 1)
        self.upscale.check_targets(self.size)
        for key in ("use_ema", "trust_checkpoint", "allow_first_stage_mismatch", "overwrite"):
            require_bool(key, getattr(self, key))
        strings("", self, ("device", "output_dir"))
        if not isinstance(self.methods, Mapping) or not self.methods:
            raise BenchError("methods is empty: name at least one method to benchmark")
        blocks = self.first_stage.values() if isinstance(self.first_stage, Mapping) else [None]
        if any(not isinstance(b, Mapping) for b in blocks):
            raise BenchError("first_stage must map f4 (and f8) to {ckpt_path, params} blocks")

    @property
    def split_seeds(self) -> SplitSeeds:
        return self.seeds[self.split]
