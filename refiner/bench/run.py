"""The composition benchmark, end to end: :func:`run` on :class:`~refiner.bench.settings.BenchSettings`
(``python -m refiner.bench [overrides]`` builds them from ``conf/bench.yaml``: :mod:`refiner.apps.bench`).

1. The settings were checked when they were made; load every checkpoint and first stage, and plan every
   (method, t_start) grid before any compute: a missing checkpoint, a first stage the windows were not trained
   with, or a t_start no window covers is one ``error:`` line and exit 2.
2. Build the three artifact sources (:mod:`refiner.bench.sources`) from the split's seeds.
3. Run every method over its sweep on every source, through the same inference pipeline as ``refine.py``.
4. Score (:func:`refiner.bench.methods.score`) and write ``results.json``, ``results.md``,
   ``comparison_grid.png``, ``tradeoff.png`` and, when the training runs logged it, ``efficiency.png``
   (:mod:`refiner.bench.report`).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from refiner.bench import report
from refiner.bench.methods import (
    BenchError,
    Method,
    methods_from_settings,
    score,
    unsharp,
)
from refiner.bench.settings import BenchSettings, SplitSeeds
from refiner.bench.sources import (
    ArtifactSet,
    clean_heads,
    f8_degraded,
    generator_samples,
    injected_defects,
)
from refiner.formats.first_stage import first_stage_from_mapping
from refiner.inference.chain import Chain
from refiner.inference.pipeline import Pipeline, vq_round_trip
from refiner.sampling import steps_for
from refiner.settings import to_plain

log = logging.getLogger(__name__)

WRITTEN_BY = "refiner bench"
OUTPUT_FILES = ("results.json", "results.md", "comparison_grid.png", "tradeoff.png", "efficiency.png")


def check_output_dir(out: Path, overwrite: bool, files: Sequence[str] = OUTPUT_FILES, record: str = "results.json",
                     written_by: str = WRITTEN_BY, writer: str = "the benchmark") -> None:
    """A benchmark command replaces only its own earlier outputs: ``files`` in ``out`` may be replaced when their
    ``record`` (a JSON file among them) names ``written_by`` as the writer, or with ``overwrite``. The benchmark and
    its side commands (:mod:`refiner.bench.artifacts`, :mod:`refiner.bench.upscale`) each pass their own."""
    if out.exists() and not out.is_dir():
        raise BenchError(f"output_dir {out} exists and is not a folder")
    existing = [out / name for name in files if (out / name).exists()]
    if not existing or overwrite:
        return
    try:
        ours = json.loads((out / record).read_text()).get("written_by") == written_by
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise BenchError(f"output_dir {out} holds {', '.join(p.name for p in existing)} that {writer} did not "
                         f"write; choose another output_dir or set overwrite=true")


def first_stage_checkpoint(settings: BenchSettings, name: str) -> str:
    """The checkpoint of ``first_stage.<name>``, which must exist."""
    ckpt = (settings.first_stage.get(name) or {}).get("ckpt_path")
    if not ckpt or not Path(ckpt).exists():
        raise BenchError(f"first_stage.{name}.ckpt_path {ckpt} not found")
    return str(ckpt)


def load_first_stage(settings: BenchSettings, name: str) -> nn.Module:
    """The first stage ``name`` (``f4``, ``f8``) of ``settings.first_stage``, a plain ``{ckpt_path, params}`` block,
    loaded in eval mode. (The one place that reads those blocks.)"""
    first_stage_checkpoint(settings, name)
    return first_stage_from_mapping(settings.first_stage[name], name, trust_checkpoint=settings.trust_checkpoint,
                                    device=settings.device)


def chain_method(settings: BenchSettings, t_starts) -> Method:
    """``methods.chain`` at ``t_starts``: what ``bench-artifacts`` and ``bench-upscale`` refine through."""
    chain = settings.methods.get("chain")
    if chain is None or chain.unsharp is not None:
        raise BenchError(f"bench-artifacts and bench-upscale refine through methods.chain, a diffusion method; "
                         f"the methods are {sorted(settings.methods)}")
    return Method("chain", "diffusion", tuple(t_starts), chain.experts)


class Models:
    """Every model the benchmark needs, loaded and checked up front; one pipeline per distinct chain."""

    def __init__(self, settings: BenchSettings, methods: list[Method], sources: list[str]):

        trust, device, mismatch = settings.trust_checkpoint, settings.device, settings.allow_first_stage_mismatch
        self.device = device
        self.generator_experts = settings.generator.experts if "generator" in sources else None
        paths = {tuple(m.experts) for m in methods if m.kind == "diffusion"}
        if self.generator_experts:
            paths.add(self.generator_experts)
        for chain_paths in paths:
            for p in chain_paths:
                if not Path(p).is_file():
                    raise BenchError(f"checkpoint {p} not found (make demo trains it; or point the benchmark's "
                                     f"methods/generator experts at your own)")
        for name in ("f4", "f8") if "f8" in sources else ("f4",):
            first_stage_checkpoint(settings, name)
        self.f4 = load_first_stage(settings, "f4")
        self.f8 = load_first_stage(settings, "f8") if "f8" in sources else None
        self.pipelines = {}
        for chain_paths in sorted(paths):
            chain = Chain.from_paths(list(chain_paths), use_ema=settings.use_ema, trust_checkpoint=trust,
                                     device=device, allow_first_stage_mismatch=mismatch)
            chain.check_first_stage(self.f4, first_stage_checkpoint(settings, "f4"), allow_mismatch=mismatch)
            self.pipelines[chain_paths] = Pipeline(self.f4, chain, self.f8, device=device)
        for m in methods:
            if m.kind == "diffusion":
                chain = self.pipelines[m.experts].chain
                for t in m.settings:
                    chain.plan(t, steps_for(t, settings.t_per_step), allow_outside_window=m.allow_outside_window)
        if self.generator_experts:
            gen = self.pipelines[self.generator_experts].chain
            windows = [s.weights.window for s in gen.experts]
            T = gen.alphas_cumprod.shape[0]
            if len(windows) != 1 or windows[0].t_min != 0 or windows[0].t_max != T:
                raise BenchError(f"generator.experts must be one full-range model (window [0, {T})), got windows "
                                 f"{[str(w) for w in windows]}")
            if gen.experts[0].weights.conditioning is not None:
                raise BenchError("generator.experts: the generator must be unconditional (conditioning=null)")
            if settings.generator.steps > T:
                raise BenchError(f"generator.steps must be in [1, {T}], got {settings.generator.steps}")


def build_sources(settings: BenchSettings, seeds: SplitSeeds, sources: list[str], models: Models,
                  generator_callback_for=None) -> dict[str, ArtifactSet]:
    """The artifact sets of ``sources`` from the split's ``seeds``; ``generator_callback_for`` is passed to
    :func:`~refiner.bench.sources.generator_samples` (``callback_for``)."""
    n, size = settings.n, settings.size
    built: dict[str, ArtifactSet] = {}
    for name in sources:
        t0 = time.perf_counter()
        if name == "defects":
            built[name] = injected_defects(n, seeds.images, size)
        elif name == "f8":
            built[name] = f8_degraded(n, seeds.images, lambda imgs: vq_round_trip(models.f8, imgs, device=models.device),
                                      size, settings.batch_size)
        else:
            pipe = models.pipelines[models.generator_experts]
            chain, f4 = pipe.chain, models.f4
            model = chain.experts[0].expert(None).model
            latent = (f4.embed_dim, size // f4.factor, size // f4.factor)
            built[name] = generator_samples(
                model, chain.alphas_cumprod, lambda z: f4.decode(z / chain.scale_factor).clamp(-1, 1), latent, n,
                seeds.generator, settings.generator.steps, chain.experts[0].weights.parameterization,
                settings.batch_size,
                callback_for=generator_callback_for)
        log.info("source %s: %d images in %.1f s", name, n, time.perf_counter() - t0)
    return built


def refine_all(pipe, images: list[np.ndarray], t_start: int, settings: BenchSettings, *, starts=None,
               allow_outside_window: bool = False, steps: int | None = None) -> list[np.ndarray]:
    """``pipe.refine_images`` over ``images`` in batches of ``settings.batch_size`` at ``steps`` DDIM steps (default
    ``steps_for(t_start)``); image ``i`` keeps its index (noise ``settings.seed + i``) and, with ``starts``
    ((N, H, W)), its own per-pixel starts."""
    out: list[np.ndarray] = []
    steps = steps_for(t_start, settings.t_per_step) if steps is None else steps
    for k in range(0, len(images), settings.batch_size):
        idx = list(range(k, min(len(images), k + settings.batch_size)))
        refined, _ = pipe.refine_images([images[i] for i in idx], t_start, steps,
                                        seed=settings.seed, indices=idx, allow_outside_window=allow_outside_window,
                                        starts=None if starts is None else starts[idx])
        out += refined
    return out


def apply_method(method: Method, setting: int, images: list[np.ndarray], settings: BenchSettings, models: Models
                 ) -> list[np.ndarray]:
    if method.kind == "unsharp":
        return unsharp(images, setting, method.radius)
    return refine_all(models.pipelines[method.experts], images, setting, settings,
                      allow_outside_window=method.allow_outside_window)


def grid_setting(method: Method, recommended_t_start: int) -> int:
    """The sweep point shown in the comparison grid: the recommended t_start (or the nearest one swept);
    for the unsharp mask, its middle amount."""
    if method.kind == "unsharp":
        return method.settings[len(method.settings) // 2]
    return min(method.settings, key=lambda t: (abs(t - recommended_t_start), t))


@torch.no_grad()
def run(settings: BenchSettings) -> dict:
    """The benchmark of ``settings``: writes its outputs into ``settings.output_dir`` and returns ``results.json``'s
    content."""
    s = settings
    seeds, sources = s.split_seeds, list(s.sources)
    out_dir = Path(s.output_dir)
    check_output_dir(out_dir, s.overwrite)
    methods = methods_from_settings(s.methods)
    models = Models(s, methods, sources)  # everything loaded and checked: compute starts here
    references = clean_heads(s.n, seeds.references, s.size)
    swd_kwargs = s.swd.kwargs()
    sets = build_sources(s, seeds, sources, models)

    results = {"written_by": WRITTEN_BY, "split": s.split, "seeds": to_plain(seeds), "n": s.n, "size": s.size,
               "t_per_step": s.t_per_step, "recommended_t_start": s.recommended_t_start,
               "generator_steps": s.generator.steps, "refine_seed": s.seed, "sources": {}}
    grid_images: dict[str, dict[str, list[np.ndarray]]] = {}
    for name, artifact_set in sets.items():
        inputs = artifact_set.inputs
        entry = {"input": score(inputs, inputs, references, artifact_set.clean, swd_kwargs), "methods": {}}
        if artifact_set.clean is not None:
            entry["clean"] = score(artifact_set.clean, inputs, references, artifact_set.clean, swd_kwargs)
        shown = {"input": inputs[:s.grid_images]}
        if artifact_set.clean is not None:
            shown["clean"] = artifact_set.clean[:s.grid_images]
        for method in methods:
            rows, shown_setting = [], grid_setting(method, s.recommended_t_start)
            for setting in method.settings:
                t0 = time.perf_counter()
                outputs = apply_method(method, setting, inputs, s, models)
                seconds = time.perf_counter() - t0
                row = {method.setting_name: setting, "seconds": round(seconds, 2),
                       **score(outputs, inputs, references, artifact_set.clean, swd_kwargs)}
                if method.kind == "diffusion":
                    row["steps"] = steps_for(setting, s.t_per_step)
                rows.append(row)
                log.info("%s / %s / %s: artifact rate %.3f, rmse to input %.4f (%.1f s)", name, method.name, setting,
                         row["artifact_rate"], row["rmse_to_input"], seconds)
                if setting == shown_setting:
                    unit = "" if method.kind == "diffusion" else "%"
                    shown[f"{method.label} ({setting}{unit})"] = outputs[:s.grid_images]
            entry["methods"][method.name] = {"kind": method.kind, "label": method.label, "experts": list(method.experts),
                                             "allow_outside_window": method.allow_outside_window,
                                             "grid_setting": shown_setting, "sweep": rows}
        results["sources"][name] = entry
        grid_images[name] = shown
    results["efficiency"] = report.efficiency(s.efficiency)
    report.write_all(out_dir, results, grid_images)
    return results
