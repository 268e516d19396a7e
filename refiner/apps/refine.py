"""Refine artifact images with window experts: ``refiner refine inputs=<folder|glob|list> [overrides]``
(``python refine.py`` at the repo root).

Per image (SDEdit-style img2img in VQ-f4 latent space), :class:`refiner.inference.pipeline.Pipeline`:
``load_image`` (any mode -> RGB uint8), pad, ``z = f4.encode(x) * scale_factor``,
:meth:`refiner.inference.chain.Chain.refine` (``q_sample`` to ``t_start``, DDIM(eta) over one grid, window
experts switched by t; a ``conditioning: concat`` expert sees the scaled latent of the image being refined),
``f4.decode(z_ref / scale_factor)``, crop; then this module writes the PNG atomically with its record
(:mod:`refiner.inference.outputs`).

``mode=evaluate`` first degrades each clean input through the VQ-f8 round trip (saved as uint8, as
a real artifact image would be), refines that, and writes ``metrics.json``
(:func:`refiner.inference.evaluate.evaluate`).

Large images are tiled automatically above ``tiling.auto_above_pixels`` (VQ tiles and MultiDiffusion latent
tiles, :class:`refiner.inference.pipeline.Tiling`); ``upscale=2|4`` refines DemoFusion-style into an image that
many times larger (:meth:`Chain.refine_progressive`). The per-image work is :class:`refiner.inference.batch_refine.RefineJob`.

Bulk: ``torchrun --nproc_per_node=N refine.py inputs=... output_dir=...`` shards the sorted inputs by rank and
merges the ranks' summaries (:mod:`refiner.inference.distributed`).

Everything that can be checked without images is checked first (settings and tile sizes, expert files, shared
schedule and scale factor, channel counts, window coverage of the timestep grid, first-stage files, output
names), so a bad chain fails before any image is read. Unreadable images, and images above a ``max_pixels``
you set, are reported (file + reason) in ``summary.json`` and on stderr; the others are still processed.

Noise: image ``i`` (its index in the sorted input list) gets its ``q_sample`` noise from
``seed + i`` (see :mod:`refiner.inference.pipeline`).

Artifacts (issue #11): ``detect=asced|asced_code|residual`` probes each batch first and writes ``<name>.mask.png``
beside each output; ``correct=ttc|strength_map`` fixes only the flagged (or ``mask=``) region; ``t_start=auto``
gives each image its own start from its severity; ``composite=paste_back`` keeps the input's own pixels outside the
region (``detect=output_residual``: the region the refinement changed, found after it without a probe)
(:mod:`refiner.inference.artifact_options`, :mod:`refiner.inference.artifact_batch`). ``color_fix.method=wavelet|adain``
gives each output the input's low band (colours, shading) after decoding, before any paste-back
(:mod:`refiner.artifacts.color_fix`).

Exit codes follow :mod:`refiner.cli`: 0 done, 1 some inputs failed, 2 a setting that cannot work (one
``error:`` line on stderr).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from refiner.apps import CONFIG_DIR
from refiner.artifacts.color_fix import ColorFix
from refiner.cli import run_cli
from refiner.data.grids import save_combined_grid
from refiner.data.images import scan_images
from refiner.errors import RefineError
from refiner.experts import StepPlan
from refiner.formats.compvis import first_stage_from_config
from refiner.inference.artifact_batch import artifact_run, grid_column, output_column
from refiner.inference.artifact_options import (
    ArtifactOptions,
    check_whole_images,
    steps_for_start,
)
from refiner.inference.batch_refine import Collected, RefineJob
from refiner.inference.chain import PRECISIONS, Chain
from refiner.inference.distributed import (
    Ranks,
    merge_summaries,
    partial_summary_name,
    read_partial_summaries,
    write_partial_summary,
)
from refiner.inference.evaluate import evaluate, format_metrics_table
from refiner.inference.outputs import (
    GRID_RECORD,
    WRITTEN_BY,
    YAML_MARKER,
    check_outputs,
    plan_outputs,
    png_text,
    settings_digest,
)
from refiner.inference.pipeline import PAD_MODES, UPSCALES, Pipeline, Tiling
from refiner.io import atomic_write_text
from refiner.sampling import SPACINGS
from refiner.settings import (
    check_device,
    check_writable_dir,
    require_choice,
    require_int,
    require_number,
)

log = logging.getLogger(__name__)

MODES = ("refine", "evaluate")
GRID_MODES = ("none", "per_image", "combined", "both")


def _check_settings(cfg: DictConfig) -> None:
    """Every setting's type and range, the device and the output folder, before any file is loaded. (The
    grid-dependent limits, t_start below the schedule's T, steps <= t_start + 1 and eta > 1, are checked by
    :meth:`Chain.plan` once the experts are known; tile sizes against the first-stage factors and the UNets'
    downsampling by :class:`Pipeline`, also before any image is read.)"""
    require_choice("mode", cfg.mode, MODES)
    require_choice("grid", cfg.grid, GRID_MODES)
    require_choice("spacing", cfg.spacing, SPACINGS)
    require_choice("pad_mode", cfg.pad_mode, PAD_MODES)
    require_choice("precision", cfg.get("precision", "fp32"), PRECISIONS)
    if cfg.inputs is None or cfg.inputs == "" or (not isinstance(cfg.inputs, str) and len(cfg.inputs) == 0):
        raise RefineError("inputs is not set: pass inputs=<folder|glob|[a.png,b.jpg]>")
    if cfg.t_start != "auto":  # auto: ArtifactOptions.from_settings
        require_int("t_start", cfg.t_start, minimum=0)
    require_int("steps", cfg.steps, minimum=1)
    # eta in [0, 1] interpolates DDIM (0) and DDPM (1); eta > 1 only where the DDIM variance fits (Chain.plan)
    require_number("eta", cfg.eta, minimum=0.0)
    require_int("seed", cfg.seed, minimum=0)
    require_int("batch_size", cfg.batch_size, minimum=1)
    require_int("grid_max_images", cfg.grid_max_images, minimum=0)
    if cfg.max_pixels is not None:
        require_int("max_pixels", cfg.max_pixels, minimum=1)
    require_choice("upscale", require_int("upscale", cfg.get("upscale", 1)), UPSCALES)
    if cfg.mode == "evaluate" and cfg.get("upscale", 1) != 1:
        raise RefineError(f"mode=evaluate compares refined with clean images of the same size; upscale="
                          f"{cfg.upscale} makes them larger (use upscale=1)")
    Tiling.from_settings(cfg.get("tiling")).check()
    if ColorFix.from_settings(cfg.get("color_fix")).active and cfg.get("upscale", 1) != 1:
        raise RefineError(f"color_fix restores the input's colours at the input's size; upscale={cfg.upscale} makes "
                          "the output larger (use color_fix.method=none or upscale=1)")
    for flag in ("allow_outside_window", "use_ema", "trust_checkpoint", "overwrite", "allow_first_stage_mismatch",
                 "allow_calibration_mismatch"):
        if not isinstance(cfg.get(flag, False), bool):
            raise RefineError(f"{flag} must be true or false, got {cfg.get(flag)!r}")
    check_device(cfg.device)
    if cfg.output_dir in (None, ""):
        raise RefineError("output_dir is not set")
    check_writable_dir(cfg.output_dir, "output_dir")
    if cfg.get("inception_weights"):
        from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

        if not Path(cfg.inception_weights).is_file():
            raise RefineError(f"inception_weights file not found: {cfg.inception_weights}")
        if not _TORCH_FIDELITY_AVAILABLE:  # fid_kid would only fail after every image was processed
            raise RefineError("inception_weights is set but FID/KID need the torch-fidelity package (see "
                              "refiner.metrics.fid_kid); unset inception_weights to evaluate without FID/KID")


def _build_pipeline(cfg: DictConfig, device: torch.device, starts: tuple[int, int]) -> tuple[Pipeline, StepPlan, str]:
    """Checkpoints, the step plan and the tile sizes: everything that can fail without looking at an image.
    ``starts`` are the lowest and highest t_start a batch may run from (the same unless t_start=auto); both grids
    are validated. Returns the pipeline, the plan (from the highest) and the f4 fingerprint."""
    allow_mismatch = bool(cfg.get("allow_first_stage_mismatch", False))
    chain = Chain.from_paths(list(cfg.experts), use_ema=cfg.use_ema, trust_checkpoint=cfg.trust_checkpoint,
                             device=device, precision=cfg.get("precision", "fp32"),
                             allow_first_stage_mismatch=allow_mismatch)
    low, top = starts
    sampler = dict(spacing=cfg.spacing, eta=cfg.eta, allow_outside_window=cfg.allow_outside_window)
    plan = chain.plan(top, cfg.steps, **sampler)
    if low != top:
        chain.plan(low, steps_for_start(cfg.steps, low, top), **sampler)
    f4 = first_stage_from_config(cfg.first_stage.get("f4"), "f4", cfg.trust_checkpoint, device)
    f4_fingerprint = chain.check_first_stage(f4, f"first_stage.f4.ckpt_path={cfg.first_stage.f4.ckpt_path}",
                                             allow_mismatch)
    f8 = first_stage_from_config(cfg.first_stage.get("f8"), "f8", cfg.trust_checkpoint, device) \
        if cfg.mode == "evaluate" else None
    pipeline = Pipeline(f4, chain, f8, pad_mode=cfg.pad_mode, device=device,
                        tiling=Tiling.from_settings(cfg.get("tiling")), upscale=cfg.get("upscale", 1))
    return pipeline, plan, f4_fingerprint


def _grid_columns(cfg: DictConfig, pipeline: Pipeline, plan: StepPlan, opts: ArtifactOptions, color: ColorFix
                  ) -> list[str]:
    if pipeline.upscale > 1:
        return [f"input (bicubic x{pipeline.upscale})", f"refined (x{pipeline.upscale}, progressive)"]
    experts = pipeline.chain.experts
    return (["clean", "degraded"] if cfg.mode == "evaluate" else ["input"]) + grid_column(opts) + [  # run order
        f"after expert {j + 1} ({experts[k].name}, window {experts[k].weights.window})"
        for j, k in enumerate(plan.segments)] + output_column(opts, color)


def _summary(cfg: DictConfig, got: Collected, ignored: list, settings: str, columns: list[str], plan: StepPlan,
             pipeline: Pipeline, f4_fingerprint: str) -> dict[str, Any]:
    return {
        "written_by": WRITTEN_BY,
        "mode": cfg.mode,
        "processed": sorted(got.processed, key=lambda r: r["input"]),
        "skipped": sorted(got.skipped, key=lambda r: r["input"]),
        "failed": sorted(got.failed, key=lambda r: r["input"]),
        "ignored": ignored,  # entries of the input folders/globs that are not images PIL can open
        "outputs": sorted(r["output"] for r in got.processed + got.skipped),
        "settings_digest": settings,
        "grid_columns": columns,
        "timesteps": plan.timesteps,
        "expert_of_step": plan.expert_of_step,
        "experts": [{"path": s.weights.source, "window": str(s.weights.window), "conditioning": s.weights.conditioning,
                    "ema": s.weights.has_ema, "first_stage_fingerprint": s.weights.first_stage_fingerprint}
                   for s in pipeline.chain.experts],
        "first_stage_fingerprint": f4_fingerprint,
        "padded_to_multiple_of": pipeline.multiple,
        "tiling": pipeline.tiling.as_dict(),
        "upscale": pipeline.upscale,
    }


def _write_reports(cfg: DictConfig, ranks: Ranks, output_dir: Path, summary: dict, got: Collected) -> dict:
    """summary.json, the combined grid and (evaluate) metrics.json. Across ranks: every rank writes its partial
    summary, and after a barrier rank 0 merges them with every rank's grid rows; all ranks return the merge."""
    rows = got.grid_rows
    if ranks.distributed:
        write_partial_summary(ranks, output_dir, summary)
        ranks.barrier()
        gathered = ranks.gather(got.grid_rows)
        if ranks.is_main:
            summary = merge_summaries(read_partial_summaries(output_dir, ranks.world_size))
            rows = sorted((r for part in gathered for r in part), key=lambda r: r[0])[:cfg.grid_max_images]
    if ranks.is_main:
        if cfg.grid in ("combined", "both") and rows:
            name = "comparison_grid.png" if cfg.mode == "evaluate" else "grid.png"
            summary["grid"] = str(save_combined_grid(output_dir / name, [r for _, r in rows],
                                                     text=png_text(GRID_RECORD)))
        if cfg.mode == "evaluate" and got.eval_images:
            summary["metrics"] = str(_write_metrics(cfg, output_dir, got))
        atomic_write_text(output_dir / "summary.json", json.dumps(summary, indent=2))
        for k in range(ranks.world_size if ranks.distributed else 0):
            (output_dir / partial_summary_name(k, ranks.world_size)).unlink()
    return ranks.broadcast(summary)


def _write_metrics(cfg: DictConfig, output_dir: Path, got: Collected) -> Path:
    ev = sorted(got.eval_images, key=lambda x: x[0])
    metrics = evaluate([e[2] for e in ev], [e[3] for e in ev], [e[4] for e in ev],
                       swd_kwargs=OmegaConf.to_container(cfg.swd, resolve=True) if cfg.get("swd") else None,
                       inception_weights=cfg.get("inception_weights"))
    metrics["images"] = [e[1] for e in ev]
    metrics["written_by"] = WRITTEN_BY
    atomic_write_text(output_dir / "metrics.json", json.dumps(metrics, indent=2))
    print(format_metrics_table(metrics))
    return output_dir / "metrics.json"


def _print_report(summary: dict, output_dir: Path) -> None:
    if "metrics" in summary and "grid" in summary:
        print(f"comparison grid: {summary['grid']}")
    print(f"{len(summary['processed'])} refined, {len(summary['skipped'])} skipped (already done), "
          f"{len(summary['failed'])} failed; outputs in {output_dir} (summary: {output_dir / 'summary.json'})")
    for f in summary["failed"]:
        print(f"failed: {f['input']}: {f['reason']}", file=sys.stderr)
    for f in summary["ignored"]:
        print(f"ignored: {f['file']}: {f['reason']}", file=sys.stderr)


def run(cfg: DictConfig) -> dict:
    """Refine (or evaluate) every input image (under torchrun: this rank's shard); returns the summary also
    written to ``summary.json`` (across ranks: the merged one, on every rank).

    Raises :class:`RefineError` / :class:`~refiner.formats.safe_load.CheckpointError` /
    ``FileNotFoundError`` for problems found before processing (bad chain, settings, no inputs).
    Per-image problems are collected in ``summary["failed"]`` instead.
    """
    from tqdm.auto import tqdm

    _check_settings(cfg)
    opts = ArtifactOptions.from_settings(cfg)
    color = ColorFix.from_settings(cfg.get("color_fix"))
    ranks = Ranks.from_env()
    if ranks.distributed and cfg.mode == "evaluate":
        raise RefineError("mode=evaluate runs in one process (its metrics need every image together); run it "
                          "without torchrun")
    # 1. Everything that can fail without looking at an image.
    pipeline, plan, f4_fingerprint = _build_pipeline(cfg, torch.device(ranks.device(cfg.device)),
                                                     opts.start_range(cfg.t_start))
    inputs_spec = cfg.inputs if isinstance(cfg.inputs, str) else list(cfg.inputs)
    try:
        paths, ignored = scan_images(inputs_spec)
    except (FileNotFoundError, ValueError) as err:
        raise RefineError(f"inputs={inputs_spec!r}: {err}") from err
    output_dir = Path(cfg.output_dir)
    outputs = plan_outputs(paths, output_dir)
    if opts.active:
        check_whole_images(paths, pipeline)
        opts.load_masks(paths)
    settings = settings_digest(cfg, pipeline.chain, f4_fingerprint, pipeline.f8, opts.digest())
    columns = _grid_columns(cfg, pipeline, plan, opts, color)
    with ranks.group():
        ranks.check_same("output_dir", str(output_dir.resolve()), "pass output_dir=<folder> explicitly (the default "
                                                                  "is each process's own Hydra run dir)")
        mine = ranks.shard(len(paths))
        existing = ranks.agree(lambda: check_outputs(cfg, output_dir, paths, outputs, settings, indices=mine,
                                                     reports=ranks.is_main, world_size=ranks.world_size))
        output_dir.mkdir(parents=True, exist_ok=True)
        if ranks.is_main:
            atomic_write_text(output_dir / "config_resolved.yaml",
                              f"{YAML_MARKER}\n{OmegaConf.to_yaml(cfg, resolve=True)}")
        log.info("rank %d/%d: %d of %d images, %d steps t=%d..%d, grid columns %s; sides padded to multiples of %d",
                 ranks.rank, ranks.world_size, len(mine), len(paths), len(plan.timesteps), plan.timesteps[0],
                 plan.timesteps[-1], columns, pipeline.multiple)
        # 2. Images (this rank's shard), 3. reports.
        progress = tqdm(total=len(mine), unit="img", desc=cfg.mode, disable=not (cfg.progress and ranks.is_main),
                        file=sys.stderr)
        got = RefineJob(cfg, pipeline, paths, outputs, settings, existing, output_dir, progress.update,
                        artifact_run(opts, pipeline, cfg), color).run(mine)
        progress.close()
        report = _summary(cfg, got, ignored, settings, columns, plan, pipeline, f4_fingerprint) | opts.summary() | (
            {"color_fix": color.digest()} if color.active else {})
        summary = _write_reports(cfg, ranks, output_dir, report, got)
    if ranks.is_main:
        _print_report(summary, output_dir)
    return summary


def task(cfg: DictConfig) -> None:
    """The Hydra task: :func:`run` under :func:`refiner.cli.run_cli`'s exit-code contract."""

    raise SystemExit(run_cli(lambda: 1 if run(cfg)["failed"] else 0))


main = hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="refine")(task)

if __name__ == "__main__":
    main()
