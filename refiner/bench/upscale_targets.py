"""DemoFusion beyond the training size: ``refiner bench-upscale upscale.target_sizes=[128,256]`` (issue 23, item 2).

DemoFusion (Du et al., CVPR 2024) exists for pictures *larger than the model's training size*, where sampling the
whole picture at once, or with MultiDiffusion tiles alone (Bar-Tal et al. 2023), repeats objects and breaks the
global composition; its claim is one coherent picture at 4-16x the pixels. This study puts it there on our domain:
models trained at ``size`` px (the demo: 64 px heads, 16 x 16 f4 latents), pictures made at each of
``upscale.target_sizes`` (``size`` times a power of 2), with heads composed as in training (one head per picture,
scaled up: :func:`refiner.data.synthetic.render` draws a head at any side).

Regimes (``upscale.regimes``):

* ``noise``: generation at the target size from pure noise by the full-range model ``generator.experts``, at
  ``generator.steps`` DDIM steps (DemoFusion's own task);
* ``generator`` / ``defects``: the split's generator samples and injected-defect heads at ``size`` px, made into
  target-size pictures through the window chain ``methods.chain`` from each of ``upscale.t_starts``.

Methods (each regime; ``S`` is ``generator.steps`` for ``noise``, ``steps_for(t_start)`` otherwise):

* ``direct``: the whole target-size picture at once (sampled from noise / the bicubic upscale refined whole);
* ``tiles``: MultiDiffusion alone, tiles of the training latent size with stride half a tile and DemoFusion's
  jitter (:class:`~refiner.inference.tiling.MultiDiffusion`);
* ``progressive``: DemoFusion's x2 phases (:mod:`refiner.inference.progressive`) from the ``size`` px picture, with
  and without the dilated global path and the skip residual (:class:`~refiner.inference.progressive.DemoFusionPaths`).
  For ``noise`` the ``size`` px picture is a generator sample (``S`` steps) and every phase runs the generator from
  t = T-1 over ``S`` steps, as DemoFusion's phases run the full schedule; otherwise each phase runs the chain from
  ``t_start``;
* ``<size> px, then bicubic`` (``64 px`` for the demo): the ``size`` px result (the generator sample / the chain's
  refinement at ``size``) upscaled bicubically, no model at the target size;
* ``noise`` only, ``<size> px, bicubic, then chain``: the generator sample upscaled bicubically, then refined by the
  chain at the target size from each t_start. (For ``generator``/``defects`` this is ``direct`` itself: their
  inputs are ``size`` px pictures upscaled bicubically.)

**Equal UNet evaluations** (``upscale.equal_evals``): evaluations are counted at the training size, one per
``(size/f)^2`` latent pixels a UNet sees (a tile of the training latent is one; the whole ``2x`` picture is 4).
DemoFusion with both paths spends, per step of a phase at scale ``s``, one per local tile and ``s^2`` for the
dilated lattices (:func:`progressive_evals`). ``direct`` and ``tiles`` get as many steps as make their count equal
to that (rounded, within the grid's range); the ablations and the bicubic baselines keep ``S``. Every count is also
*measured* (forward hooks on the UNets, :class:`UNetEvals`) and reported.

Scores, per method: the composition verdict beyond the training size (:func:`refiner.data.checker.count_heads`:
exactly one head, plus :func:`~refiner.data.checker.check`: elliptical head, two eyes, mouth below), the share of
pictures with more than one head, :func:`refiner.bench.methods.score` (SWD to clean heads rendered at the target,
PSNR to the clean head for ``defects``), UNet evaluations per image (training-size units and raw calls), seconds.
Writes ``upscale_targets.json``, ``upscale_targets.md`` and a grid per target size ``upscale_targets_<side>.png``
(rows: regimes' first images; columns: methods).
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from refiner.bench.methods import BenchError, score
from refiner.bench.report import _json_ready, grid_png
from refiner.bench.run import Models, chain_method, check_output_dir, refine_all
from refiner.bench.settings import BenchSettings
from refiner.bench.sources import clean_heads, generator_samples, injected_defects
from refiner.data.checker import count_heads
from refiner.data.synthetic import head_for, render
from refiner.inference.pipeline import Pipeline, Tiling
from refiner.inference.progressive import DemoFusionPaths, global_weight, phase_scales
from refiner.inference.tiling import MultiDiffusion, tile_starts
from refiner.io import atomic_write_bytes, atomic_write_text
from refiner.sampling import steps_for, timestep_grid
from refiner.settings import to_plain

WRITTEN_BY = "refiner bench.upscale_targets"
RECORD = "upscale_targets.json"
ABLATIONS = (DemoFusionPaths(True, True), DemoFusionPaths(False, True), DemoFusionPaths(True, False),
             DemoFusionPaths(False, False))


def variants(up) -> list[DemoFusionPaths]:
    """The progressive methods of ``up`` (:class:`~refiner.bench.settings.UpscaleSettings`): the ablations (or both
    paths alone) at the first ``alpha1`` and ``sigma``, then both paths at every other pair of them."""
    a0, s0 = float(up.alpha1[0]), float(up.sigma[0])
    out = [replace(p, alpha1=a0, sigma=s0) for p in (ABLATIONS if up.ablations else ABLATIONS[:1])]
    out += [DemoFusionPaths(True, True, float(a), float(g)) for a in up.alpha1 for g in up.sigma
            if (float(a), float(g)) != (a0, s0)]
    return out


def output_files(target_sizes: Sequence[int]) -> tuple[str, ...]:
    return (RECORD, "upscale_targets.md", *(f"upscale_targets_{t}.png" for t in target_sizes))


# ------------------------------------------------------------------------------------------- checks and counts
def check_latent_multiple(size: int, target_sizes: Sequence[int], f4_factor: int, unet_multiple: int) -> None:
    """Beyond the training size the models' sizes must fit: every target side a multiple of the f4 factor times the
    UNets' downsampling (whole-picture latents), and so the training side (the tiles are training-size latents, and
    progressive phases start from a training-size picture). Raises :class:`BenchError` naming the size."""
    multiple = f4_factor * unet_multiple
    for name, side in [("size", size), *((f"upscale.target_sizes: {t} px", t) for t in target_sizes)]:
        if side % multiple:
            raise BenchError(f"{name if name != 'size' else f'size {size} px (the training size)'} is not a multiple "
                             f"of {multiple}, the f4 factor {f4_factor} times the UNets' downsampling {unet_multiple}")


def tiles_per_eval(side: int, tile: int, stride: int) -> int:
    """MultiDiffusion tiles of a square ``side`` latent (:func:`~refiner.inference.tiling.tile_starts`, both axes;
    jitter moves tiles, never adds one)."""
    return len(tile_starts(side, tile, stride)) ** 2


def progressive_evals(side0: int, upscale: int, t_start: int, steps: int, global_path: bool = True,
                      num_timesteps: int = 1000) -> int:
    """UNet evaluations (training-size tiles, side ``side0`` latent px, stride ``side0 // 2``) of DemoFusion's phases
    from a ``side0`` latent over ``timestep_grid(t_start, steps)``: per step of the phase at scale ``s``, the local
    tiles of the ``side0 * s`` latent and, with the global path, the ``s^2`` dilated lattices of side ``side0`` (one
    tile each) at every grid t where its weight c2(t) is not 0 (c2(0) = 0: a grid that reaches t = 0 skips it there,
    :class:`~refiner.inference.progressive.DemoFusionModel`)."""
    grid = timestep_grid(t_start, steps, 0, "uniform", num_timesteps)
    global_steps = sum(global_weight(t, num_timesteps) != 0.0 for t in grid) if global_path else 0
    return sum(steps * tiles_per_eval(side0 * s, side0, side0 // 2) + global_steps * s * s
               for s in phase_scales(upscale))


def equal_steps(budget: float, per_step: float, max_steps: int) -> int:
    """The step count whose evaluations come nearest ``budget``, within ``[1, max_steps]``."""
    return int(min(max_steps, max(1, round(budget / per_step))))


class UNetEvals:
    """Counts what the UNets ``modules`` see while the context is open (forward hooks): ``calls`` rows (one per
    picture or tile per step) and ``evals``, latent pixels over ``side0^2`` (training-size evaluations)."""

    def __init__(self, modules: Sequence[nn.Module], side0: int):
        self.modules, self.side0 = list(modules), side0
        self.calls, self.pixels, self._hooks = 0, 0, []

    def _hook(self, module, args, output):
        x = args[0]
        self.calls += int(x.shape[0])
        self.pixels += int(x.shape[0] * x.shape[-2] * x.shape[-1])

    def __enter__(self) -> "UNetEvals":
        self._hooks = [m.register_forward_hook(self._hook) for m in self.modules]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    @property
    def evals(self) -> float:
        return self.pixels / self.side0**2


# ---------------------------------------------------------------------------------------------------- study
def resize(images: Sequence[np.ndarray], side: int, resample=Image.BICUBIC) -> list[np.ndarray]:
    """PIL's resize to ``side x side`` (bicubic unless ``resample`` says otherwise)."""
    return [np.asarray(Image.fromarray(img).resize((side, side), resample)) for img in images]


def tiling_at(side0: int) -> Tiling:
    """Latent tiles of the training size ``side0``, stride half a tile, jittered; pixel tiles of the first stages
    left at their defaults (whole up to 256 px)."""
    return Tiling(mode="always", latent_tile=side0, latent_stride=side0 // 2, view_batch_size=16)


class Study:
    """One run of the study on ``settings`` with its loaded ``models`` (see the module docstring)."""

    def __init__(self, settings: BenchSettings, models: Models, chain_paths: tuple[str, ...]):
        s = self.s = settings
        self.models, self.f4 = models, models.f4
        self.chain = models.pipelines[chain_paths].chain
        self.gen = models.pipelines[models.generator_experts].chain if models.generator_experts else None
        self.factor = int(self.f4.factor)
        self.side0 = s.size // self.factor
        unets = [e.unet for c in (self.chain, self.gen) if c is not None for e in c.experts]
        self.unets = list({id(u): u for u in unets}.values())
        self.seeds = s.split_seeds
        self._base: list[np.ndarray] | None = None

    # -- pieces
    def pipeline(self, chain, upscale: int = 1, tiled: bool = False, paths: DemoFusionPaths | None = None) -> Pipeline:
        tiling = tiling_at(self.side0) if tiled or upscale > 1 else Tiling(mode="never")
        return Pipeline(self.f4, chain, upscale=upscale, device=self.models.device, tiling=tiling, demofusion=paths)

    def sample(self, side: int, steps: int, tiled: bool = False) -> list[np.ndarray]:
        """Generator samples at ``side`` px from pure noise (whole, or on MultiDiffusion tiles)."""
        chain, f4 = self.gen, self.f4
        model = chain.experts[0].expert(None).model
        if tiled:
            model = MultiDiffusion(model, self.side0, self.side0 // 2, jitter=True, seed=self.s.seed,
                                   view_batch_size=16)
        latent = (int(f4.embed_dim), side // self.factor, side // self.factor)
        return generator_samples(model, chain.alphas_cumprod, lambda z: f4.decode(z / chain.scale_factor).clamp(-1, 1),
                                 latent, self.s.n, self.seeds.generator, steps,
                                 chain.experts[0].weights.parameterization, self.s.batch_size).inputs

    def base(self) -> list[np.ndarray]:
        """The generator's samples at the training size (``generator.steps``): made once, counted where used."""
        if self._base is None:
            self._base = self.sample(self.s.size, self.s.generator.steps)
        return self._base

    def measure(self, label: str, make: Callable[[], list[np.ndarray]], planned: float | None, extra_evals: float,
                inputs, references, clean) -> tuple[dict, list[np.ndarray]]:
        """Run ``make`` counting its UNet evaluations (plus ``extra_evals`` per image spent on a shared input, e.g.
        the generator sample it starts from), and score its pictures."""
        t0 = time.perf_counter()
        with UNetEvals(self.unets, self.side0) as count:
            outputs = make()
        seconds = time.perf_counter() - t0
        n = len(outputs)
        heads = [count_heads(img, self.s.size) for img in outputs]
        scored = score(outputs, inputs, references, clean, self.s.swd.kwargs())
        broken = set(scored.pop("failed")) | {i for i, h in enumerate(heads) if h != 1}
        row = {"method": label, "artifact_rate": len(broken) / n,
               "more_than_one_head": sum(h > 1 for h in heads) / n, "no_head": sum(h == 0 for h in heads) / n,
               "check_artifact_rate": scored.pop("artifact_rate"),
               "unet_evals": round(count.evals / n + extra_evals, 2), "unet_calls": round(count.calls / n, 2),
               "planned_evals": planned, "seconds": round(seconds, 1), **scored}
        return row, outputs

    # -- regimes
    def regime(self, name: str, target: int, t_start: int | None) -> tuple[list[dict], dict]:
        """Every method of one regime at one target side (and t_start); returns the rows and the grid columns."""
        s, ratio = self.s, target // self.s.size
        side = target // self.factor
        references = clean_heads(s.n, self.seeds.references, target)
        rows, shown = [], {}
        if name == "noise":
            steps, T = s.generator.steps, self.gen.alphas_cumprod.shape[0]
            small, clean, extra, max_steps, chain_start = self.base(), None, float(s.generator.steps), T, T - 1
            inputs = resize(small, target)
        else:
            t = int(t_start)
            steps, max_steps, chain_start, extra = steps_for(t, s.t_per_step), t + 1, t, 0.0
            if name == "generator":  # a given input: the generator's evaluations are not the method's
                small, clean = self.base(), None
            else:
                small = injected_defects(s.n, self.seeds.images, s.size).inputs
                clean = [render(head_for(self.seeds.images, i), target) for i in range(s.n)]
            inputs = resize(small, target)
        budget = extra + progressive_evals(self.side0, ratio, chain_start, steps)
        direct_steps = equal_steps(budget, ratio**2, max_steps) if s.upscale.equal_evals else steps
        tile_steps = (equal_steps(budget, tiles_per_eval(side, self.side0, self.side0 // 2), max_steps)
                      if s.upscale.equal_evals else steps)
        shown["input"] = inputs[:s.grid_images]

        def add(column, label, make, planned, extra_evals):
            """One method: its row in the table (``label``) and its column in the grid (``column``; None: none)."""
            row, out = self.measure(label, make, planned, extra_evals, inputs, references, clean)
            rows.append(row)
            if column is not None:
                shown[column] = out[:s.grid_images]

        if name == "noise":
            add("direct", f"direct ({direct_steps} steps)", lambda: self.sample(target, direct_steps),
                direct_steps * ratio**2, 0.0)
            add("tiles", f"tiles ({tile_steps} steps)", lambda: self.sample(target, tile_steps, tiled=True),
                tile_steps * tiles_per_eval(side, self.side0, self.side0 // 2), 0.0)
        else:
            add(None, "input (bicubic)", lambda: inputs, 0, 0.0)
            add("direct", f"direct ({direct_steps} steps)",
                lambda: refine_all(self.pipeline(self.chain), inputs, t, s, steps=direct_steps),
                direct_steps * ratio**2, 0.0)
            add("tiles", f"tiles ({tile_steps} steps)",
                lambda: refine_all(self.pipeline(self.chain, tiled=True), inputs, t, s, steps=tile_steps),
                tile_steps * tiles_per_eval(side, self.side0, self.side0 // 2), 0.0)
        chain = self.gen if name == "noise" else self.chain
        for paths in variants(s.upscale):
            add(paths.short(), f"progressive: {paths.label()} ({steps} steps/phase)",
                lambda paths=paths: refine_all(self.pipeline(chain, ratio, paths=paths), small, chain_start, s,
                                               steps=steps),
                extra + progressive_evals(self.side0, ratio, chain_start, steps, paths.global_path), extra)
        if name == "noise":
            add(None, f"{s.size} px, then bicubic", lambda: inputs, extra, extra)
            for t in s.upscale.t_starts:
                t_steps = steps_for(t, s.t_per_step)
                add(f"{s.size} px, bicubic, chain {t}", f"{s.size} px, bicubic, then chain from {t} ({t_steps} steps)",
                    lambda t=t, t_steps=t_steps: refine_all(self.pipeline(self.chain), inputs, t, s, steps=t_steps),
                    extra + t_steps * ratio**2, extra)
        else:
            add(f"{s.size} px chain, bicubic", f"{s.size} px chain, then bicubic",
                lambda: resize(refine_all(self.pipeline(self.chain), small, t, s, steps=steps), target),
                extra + steps, extra)
        return rows, shown


def markdown(res: dict) -> str:
    lines = [f"# Beyond the training size ({res['size']} px models): split `{res['split']}`, n = {res['n']} per "
             f"regime", "", "Artifact rate: the checker fails, or the picture does not hold exactly one head. UNet "
             "evaluations per image counted at the training size (measured).", ""]
    for key, entry in res["results"].items():
        lines += [f"## {key}", "", "| method | artifact rate | > 1 head | no head | checker alone | SWD×1e3 | "
                  "PSNR to clean | UNet evals/image | UNet calls/image | s |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in entry:
            psnr = f"{r['psnr_to_clean']:.2f}" if "psnr_to_clean" in r else "-"
            lines.append(f"| {r['method']} | {100 * r['artifact_rate']:.1f}% | {100 * r['more_than_one_head']:.1f}% | "
                         f"{100 * r['no_head']:.1f}% | {100 * r['check_artifact_rate']:.1f}% | {r['swd_x1e3']:.1f} | "
                         f"{psnr} | {r['unet_evals']:g} | {r['unet_calls']:g} | {r['seconds']} |")
        lines.append("")
    return "\n".join(lines)


@torch.no_grad()
def run(settings: BenchSettings) -> dict:
    """The study of the module docstring on ``settings`` (``upscale.target_sizes`` non-empty); writes its outputs
    into ``settings.output_dir`` and returns ``upscale_targets.json``'s content."""
    s, up = settings, settings.upscale
    if not up.target_sizes:
        raise BenchError("upscale.target_sizes is empty: name the sides beyond the training size, e.g. [128,256]")
    out_dir = Path(s.output_dir)
    files = output_files(up.target_sizes)
    check_output_dir(out_dir, s.overwrite, files, RECORD, WRITTEN_BY, "this command")
    chain_spec = chain_method(s, up.t_starts)
    needs_generator = bool({"noise", "generator"} & set(up.regimes))
    if needs_generator and len(s.generator.experts) != 1:
        raise BenchError(f"generator.experts must name one full-range checkpoint, got {list(s.generator.experts)}")
    models = Models(s, [chain_spec], ["generator"] if needs_generator else [])  # loads and checks; no compute yet
    chain = models.pipelines[chain_spec.experts].chain
    unet_multiple = chain.multiple if models.generator_experts is None else max(
        chain.multiple, models.pipelines[models.generator_experts].chain.multiple)
    check_latent_multiple(s.size, up.target_sizes, int(models.f4.factor), unet_multiple)
    study = Study(s, models, chain_spec.experts)
    res = {"written_by": WRITTEN_BY, "split": s.split, "seeds": to_plain(s.split_seeds), "n": s.n, "size": s.size,
           "target_sizes": list(up.target_sizes), "t_starts": list(up.t_starts), "regimes": list(up.regimes),
           "equal_evals": up.equal_evals, "generator_steps": s.generator.steps, "t_per_step": s.t_per_step,
           "refine_seed": s.seed, "results": {}}
    grids = {}
    for target in up.target_sizes:
        shown_at = {}
        for name in up.regimes:
            for t in ([None] if name == "noise" else up.t_starts):
                key = f"{target} px, {name}" + ("" if t is None else f", t_start {t}")
                rows, shown = study.regime(name, target, t)
                res["results"][key] = rows
                shown_at[key] = shown
        grids[target] = shown_at
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / RECORD, json.dumps(_json_ready(res), indent=2) + "\n")
    atomic_write_text(out_dir / "upscale_targets.md", markdown(res))
    if s.grid_images:
        for target, shown_at in grids.items():
            atomic_write_bytes(out_dir / f"upscale_targets_{target}.png", grid_png(shown_at))
    return res
