"""One refine run over a set of image files: check everything, refine, write the outputs and the reports.

Per image (SDEdit-style img2img in VQ-f4 latent space), :class:`refiner.inference.pipeline.Pipeline`:
``load_image`` (any mode -> RGB uint8), pad, ``z = f4.encode(x) * scale_factor``,
:meth:`refiner.inference.chain.Chain.refine` (``q_sample`` to ``t_start``, DDIM(eta) over one grid, window
experts switched by t; a ``conditioning: concat`` expert sees the scaled latent of the image being refined),
``f4.decode(z_ref / scale_factor)``, crop; the PNG is written atomically with its record
(:mod:`refiner.inference.outputs`). The per-image work is :class:`refiner.inference.batch_refine.RefineJob`.

``mode=evaluate`` first degrades each clean input through the VQ-f8 round trip (saved as uint8, as a real artifact
image would be), refines that, and writes ``metrics.json`` (:func:`refiner.inference.evaluate.evaluate`).

Large images are tiled automatically above ``tiling.auto_above_pixels``; ``upscale=2|4`` (experimental) refines
DemoFusion-style into a larger image. Under ``torchrun`` the sorted inputs are sharded by rank and the ranks'
summaries merged (:mod:`refiner.inference.distributed`).

Everything that can be checked without images is checked first (settings, experts, shared schedule and scale factor,
channel counts, window coverage of the timestep grid, first-stage files, output names), so a bad chain fails before
any image is read. Unreadable images, and images above a ``max_pixels`` you set, are reported (file + reason) in
``summary.json`` and on stderr; the others are still processed. Image ``i`` of the sorted inputs gets every random
number from a generator seeded ``seed + i``.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch
from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

from refiner.data.grids import save_combined_grid
from refiner.data.images import scan_images
from refiner.errors import RefineError
from refiner.experts import StepPlan
from refiner.formats.first_stage import first_stage_from_mapping
from refiner.inference.artifact_batch import artifact_run, grid_column, output_column
from refiner.inference.artifact_options import ArtifactOptions, check_whole_images, steps_for_start
from refiner.inference.batch_refine import Collected, RefineJob
from refiner.inference.chain import Chain
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
from refiner.inference.pipeline import Pipeline
from refiner.inference.settings import RefineSettings
from refiner.io import atomic_write_text
from refiner.progress import progress
from refiner.settings import check_device, check_writable_dir

log = logging.getLogger(__name__)


def check_environment(s: RefineSettings) -> None:
    """What the settings name on this machine, before any file is loaded: the device, the output folder, and the
    FID/KID weights of evaluate mode."""
    check_device(s.device)
    check_writable_dir(s.output_dir, "output_dir")
    if s.inception_weights:
        if not Path(s.inception_weights).is_file():
            raise RefineError(f"inception_weights file not found: {s.inception_weights}")
        if not _TORCH_FIDELITY_AVAILABLE:  # fid_kid would only fail after every image was processed
            raise RefineError("inception_weights is set but FID/KID need the torch-fidelity package (see "
                              "refiner.metrics.fid_kid); unset inception_weights to evaluate without FID/KID")


def build_pipeline(s: RefineSettings, device: torch.device, starts: tuple[int, int]
                   ) -> tuple[Pipeline, StepPlan, str]:
    """Checkpoints, the step plan and the tile sizes: everything that can fail without looking at an image.
    ``starts`` are the lowest and highest t_start a batch may run from (the same unless t_start=auto); both grids
    are validated. Returns the pipeline, the plan (from the highest) and the f4 fingerprint."""
    chain = Chain.from_paths(list(s.experts), use_ema=s.use_ema, trust_checkpoint=s.trust_checkpoint, device=device,
                             precision=s.precision, allow_first_stage_mismatch=s.allow_first_stage_mismatch)
    low, top = starts
    sampler = dict(spacing=s.spacing, eta=s.eta, allow_outside_window=s.allow_outside_window)
    plan = chain.plan(top, s.steps, **sampler)
    if low != top:
        chain.plan(low, steps_for_start(s.steps, low, top), **sampler)
    f4_spec = s.first_stage.f4 or {}
    f4 = first_stage_from_mapping(f4_spec, "f4", s.trust_checkpoint, device)
    f4_fingerprint = chain.check_first_stage(f4, f"first_stage.f4.ckpt_path={f4_spec.get('ckpt_path')}",
                                             s.allow_first_stage_mismatch)
    f8 = first_stage_from_mapping(s.first_stage.f8, "f8", s.trust_checkpoint, device) if s.mode == "evaluate" else None
    pipeline = Pipeline(f4, chain, f8, pad_mode=s.pad_mode, device=device, tiling=s.tiling, upscale=s.upscale)
    return pipeline, plan, f4_fingerprint


def grid_columns(s: RefineSettings, pipeline: Pipeline, plan: StepPlan, opts: ArtifactOptions) -> list[str]:
    if pipeline.upscale > 1:
        return [f"input (bicubic x{pipeline.upscale})", f"refined (x{pipeline.upscale}, progressive)"]
    experts = pipeline.chain.experts
    return (["clean", "degraded"] if s.mode == "evaluate" else ["input"]) + grid_column(opts) + [  # run order
        f"after expert {j + 1} ({experts[k].name}, window {experts[k].weights.window})"
        for j, k in enumerate(plan.segments)] + output_column(opts, s.color_fix)


def _summary(s: RefineSettings, got: Collected, ignored: list, digest: str, columns: list[str], plan: StepPlan,
             pipeline: Pipeline, f4_fingerprint: str) -> dict[str, Any]:
    return {
        "written_by": WRITTEN_BY,
        "mode": s.mode,
        "processed": sorted(got.processed, key=lambda r: r["input"]),
        "skipped": sorted(got.skipped, key=lambda r: r["input"]),
        "failed": sorted(got.failed, key=lambda r: r["input"]),
        "ignored": ignored,  # entries of the input folders/globs that are not images PIL can open
        "outputs": sorted(r["output"] for r in got.processed + got.skipped),
        "settings_digest": digest,
        "grid_columns": columns,
        "timesteps": plan.timesteps,
        "expert_of_step": plan.expert_of_step,
        "experts": [{"path": e.weights.source, "window": str(e.weights.window), "conditioning": e.weights.conditioning,
                     "ema": e.weights.has_ema, "first_stage_fingerprint": e.weights.first_stage_fingerprint}
                    for e in pipeline.chain.experts],
        "first_stage_fingerprint": f4_fingerprint,
        "padded_to_multiple_of": pipeline.multiple,
        "tiling": pipeline.tiling.as_dict(),
        "upscale": pipeline.upscale,
    }


def _write_reports(s: RefineSettings, ranks: Ranks, output_dir: Path, summary: dict, got: Collected) -> dict:
    """summary.json, the combined grid and (evaluate) metrics.json. Across ranks: every rank writes its partial
    summary, and after a barrier rank 0 merges them with every rank's grid rows; all ranks return the merge."""
    rows = got.grid_rows
    if ranks.distributed:
        write_partial_summary(ranks, output_dir, summary)
        ranks.barrier()
        gathered = ranks.gather(got.grid_rows)
        if ranks.is_main:
            summary = merge_summaries(read_partial_summaries(output_dir, ranks.world_size))
            rows = sorted((r for part in gathered for r in part), key=lambda r: r[0])[:s.grid_max_images]
    if ranks.is_main:
        if s.grid in ("combined", "both") and rows:
            name = "comparison_grid.png" if s.mode == "evaluate" else "grid.png"
            summary["grid"] = str(save_combined_grid(output_dir / name, [r for _, r in rows],
                                                     text=png_text(GRID_RECORD)))
        if s.mode == "evaluate" and got.eval_images:
            summary["metrics"] = str(_write_metrics(s, output_dir, got))
        atomic_write_text(output_dir / "summary.json", json.dumps(summary, indent=2))
        for k in range(ranks.world_size if ranks.distributed else 0):
            (output_dir / partial_summary_name(k, ranks.world_size)).unlink()
    return ranks.broadcast(summary)


def _write_metrics(s: RefineSettings, output_dir: Path, got: Collected) -> Path:
    ev = sorted(got.eval_images, key=lambda x: x[0])
    metrics = evaluate([e[2] for e in ev], [e[3] for e in ev], [e[4] for e in ev],
                       swd_kwargs=dict(s.swd) if s.swd else None, inception_weights=s.inception_weights)
    metrics["images"] = [e[1] for e in ev]
    metrics["written_by"] = WRITTEN_BY
    atomic_write_text(output_dir / "metrics.json", json.dumps(metrics, indent=2))
    print(format_metrics_table(metrics))
    return output_dir / "metrics.json"


def print_report(summary: dict, output_dir: Path) -> None:
    if "metrics" in summary and "grid" in summary:
        print(f"comparison grid: {summary['grid']}")
    print(f"{len(summary['processed'])} refined, {len(summary['skipped'])} skipped (already done), "
          f"{len(summary['failed'])} failed; outputs in {output_dir} (summary: {output_dir / 'summary.json'})")
    for f in summary["failed"]:
        print(f"failed: {f['input']}: {f['reason']}", file=sys.stderr)
    for f in summary["ignored"]:
        print(f"ignored: {f['file']}: {f['reason']}", file=sys.stderr)


def run(s: RefineSettings, config_text: str | None = None) -> dict:
    """Refine (or evaluate) every input image (under torchrun: this rank's shard); returns the summary also
    written to ``summary.json`` (across ranks: the merged one, on every rank). ``config_text`` (the app's resolved
    config) is written as ``config_resolved.yaml``.

    Raises :class:`RefineError` / :class:`~refiner.formats.safe_load.CheckpointError` / ``FileNotFoundError`` for
    problems found before processing (bad chain, settings, no inputs). Per-image problems are collected in
    ``summary["failed"]`` instead.
    """
    check_environment(s)
    for note in s.experimental():
        log.warning("experimental option %s", note)
    opts = ArtifactOptions.from_settings(s)
    ranks = Ranks.from_env()
    if ranks.distributed and s.mode == "evaluate":
        raise RefineError("mode=evaluate runs in one process (its metrics need every image together); run it "
                          "without torchrun")
    # 1. Everything that can fail without looking at an image.
    pipeline, plan, f4_fingerprint = build_pipeline(s, torch.device(ranks.device(s.device)),
                                                    opts.start_range(s.t_start))
    inputs_spec = s.inputs if isinstance(s.inputs, str) else list(s.inputs)
    try:
        paths, ignored = scan_images(inputs_spec)
    except (FileNotFoundError, ValueError) as err:
        raise RefineError(f"inputs={inputs_spec!r}: {err}") from err
    output_dir = Path(s.output_dir)
    outputs = plan_outputs(paths, output_dir)
    if opts.active:
        check_whole_images(paths, pipeline)
        opts.load_masks(paths)
    digest = settings_digest(s, pipeline.chain, f4_fingerprint, pipeline.f8, opts.digest())
    columns = grid_columns(s, pipeline, plan, opts)
    with ranks.group():
        ranks.check_same("output_dir", str(output_dir.resolve()), "pass output_dir=<folder> explicitly (the default "
                                                                  "is each process's own Hydra run dir)")
        mine = ranks.shard(len(paths))
        existing = ranks.agree(lambda: check_outputs(s, output_dir, paths, outputs, digest, indices=mine,
                                                     reports=ranks.is_main, world_size=ranks.world_size))
        output_dir.mkdir(parents=True, exist_ok=True)
        if ranks.is_main and config_text is not None:
            atomic_write_text(output_dir / "config_resolved.yaml", f"{YAML_MARKER}\n{config_text}")
        log.info("rank %d/%d: %d of %d images, %d steps t=%d..%d, grid columns %s; sides padded to multiples of %d",
                 ranks.rank, ranks.world_size, len(mine), len(paths), len(plan.timesteps), plan.timesteps[0],
                 plan.timesteps[-1], columns, pipeline.multiple)
        # 2. Images (this rank's shard), 3. reports.
        bar = progress(total=len(mine), unit="img", desc=s.mode, enabled=s.progress and ranks.is_main)
        got = RefineJob(s, pipeline, paths, outputs, digest, existing, output_dir, bar.update,
                        artifact_run(opts, pipeline, s)).run(mine)
        bar.close()
        report = _summary(s, got, ignored, digest, columns, plan, pipeline, f4_fingerprint) | opts.summary() | (
            {"color_fix": s.color_fix.digest()} if s.color_fix.active else {})
        summary = _write_reports(s, ranks, output_dir, report, got)
    if ranks.is_main:
        print_report(summary, output_dir)
    return summary
