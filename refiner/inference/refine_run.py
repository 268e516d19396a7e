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
any image is read. Before the first write, every file the run would write (outputs, masks, ``grids/``, grid,
reports) is checked against the inputs (:func:`refiner.inference.safe_writes.check_no_input_written`): one that would
land on an input is refused (exit 2) whatever ``overwrite`` says. Unreadable images, images above a ``max_pixels``
you set, and images the models fail on are reported (file + reason) in ``summary.json`` and on stderr; the others
are still processed. Images smaller than the models can take are padded further
(:mod:`refiner.inference.min_size`). ``summary.json`` is written whatever failed, with the files that could not be
written under ``"unwritten"``; a full disk stops the run with one line naming the file and the bytes written
(:class:`~refiner.inference.safe_writes.DiskFull`, exit 1). Image ``i`` of the sorted inputs gets every random
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

from refiner.data.grids import combined_grid
from refiner.data.images import encode_png
from refiner.data.images import scan_images
from refiner.errors import InputsFailed, RefineError
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
    write_targets,
)
from refiner.inference.pipeline import Pipeline
from refiner.inference.safe_writes import (
    DiskFull,
    InputFiles,
    OutputWriteError,
    check_no_input_written,
    write_file,
)
from refiner.inference.settings import RefineSettings
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
        "unwritten": list(got.unwritten),  # run-level files that could not be written: {"file", "reason"}
        "tiling": pipeline.tiling.as_dict(),
        "upscale": pipeline.upscale,
    }


def _disk_full(err: BaseException | None) -> OutputWriteError | None:
    return err if isinstance(err, OutputWriteError) and err.disk_full else None


def _write_report(path: Path, data: bytes, unwritten: list[dict], inputs: InputFiles) -> Exception | None:
    """One run-level file; a failure is listed in ``unwritten`` (and returned) instead of ending the run before the
    summary is written."""
    try:
        write_file(path, data, inputs)
    except (OSError, ValueError) as err:
        unwritten.append({"file": str(path), "reason": str(err)})
        return err
    return None


def _write_reports(s: RefineSettings, ranks: Ranks, output_dir: Path, summary: dict, got: Collected,
                   inputs: InputFiles) -> tuple[dict, OutputWriteError | None]:
    """summary.json, the combined grid and (evaluate) metrics.json. Across ranks: every rank writes its partial
    summary, and after a barrier rank 0 merges them with every rank's grid rows; all ranks return the merge.
    A grid or metrics file that cannot be written is listed under ``"unwritten"`` and the summary is still written;
    a summary that cannot be written raises :class:`~refiner.inference.safe_writes.OutputWriteError`. Returns the
    summary and the disk-full error that stopped the run, if any."""
    rows, stopped = got.grid_rows, got.stopped
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
            grid = encode_png(combined_grid([r for _, r in rows]), png_text(GRID_RECORD))
            err = _write_report(output_dir / name, grid, summary["unwritten"], inputs)
            summary.update({} if err else {"grid": str(output_dir / name)})
            stopped = stopped or _disk_full(err)
        if s.mode == "evaluate" and got.eval_images:
            err = _write_report(output_dir / "metrics.json", _metrics_json(s, got), summary["unwritten"], inputs)
            summary.update({} if err else {"metrics": str(output_dir / "metrics.json")})
            stopped = stopped or _disk_full(err)
        write_file(output_dir / "summary.json", json.dumps(summary, indent=2).encode(), inputs)
        for k in range(ranks.world_size if ranks.distributed else 0):
            (output_dir / partial_summary_name(k, ranks.world_size)).unlink()
    return ranks.broadcast(summary), stopped


def _metrics_json(s: RefineSettings, got: Collected) -> bytes:
    ev = sorted(got.eval_images, key=lambda x: x[0])
    metrics = evaluate([e[2] for e in ev], [e[3] for e in ev], [e[4] for e in ev],
                       swd_kwargs=dict(s.swd) if s.swd else None, inception_weights=s.inception_weights)
    metrics["images"] = [e[1] for e in ev]
    metrics["written_by"] = WRITTEN_BY
    print(format_metrics_table(metrics))
    return json.dumps(metrics, indent=2).encode()


def print_report(summary: dict, output_dir: Path) -> None:
    if "metrics" in summary and "grid" in summary:
        print(f"comparison grid: {summary['grid']}")
    print(f"{len(summary['processed'])} refined, {len(summary['skipped'])} skipped (already done), "
          f"{len(summary['failed'])} failed; outputs in {output_dir} (summary: {output_dir / 'summary.json'})")
    for f in summary["failed"]:
        print(f"failed: {f['input']}: {f['reason']}", file=sys.stderr)
    for f in summary["ignored"]:
        print(f"ignored: {f['file']}: {f['reason']}", file=sys.stderr)
    for f in summary.get("unwritten", []):
        print(f"not written: {f['file']}: {f['reason']}", file=sys.stderr)


def run(s: RefineSettings, config_text: str | None = None) -> dict:
    """Refine (or evaluate) every input image (under torchrun: this rank's shard); returns the summary also
    written to ``summary.json`` (across ranks: the merged one, on every rank). ``config_text`` (the app's resolved
    config) is written as ``config_resolved.yaml``.

    Raises :class:`RefineError` / :class:`~refiner.formats.safe_load.CheckpointError` / ``FileNotFoundError`` for
    problems found before processing (bad chain, settings, no inputs). Per-image problems are collected in
    ``summary["failed"]`` instead, files that could not be written in ``summary["unwritten"]``. A full disk stops
    the run: the summary is still written (it lists the failed write and the images not reached), then
    :class:`~refiner.inference.safe_writes.DiskFull` is raised (exit 1, one line).
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
    inputs = InputFiles.of(paths)
    check_no_input_written(inputs, write_targets(s, output_dir, outputs, ranks.world_size), output_dir)
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
                                                     reports=ranks.is_main, world_size=ranks.world_size,
                                                     protected=inputs))
        output_dir.mkdir(parents=True, exist_ok=True)
        unwritten: list[dict] = []
        config_error = None
        if ranks.is_main and config_text is not None:
            config_error = _write_report(output_dir / "config_resolved.yaml",
                                         f"{YAML_MARKER}\n{config_text}".encode(), unwritten, inputs)
        log.info("rank %d/%d: %d of %d images, %d steps t=%d..%d, grid columns %s; sides padded to multiples of %d",
                 ranks.rank, ranks.world_size, len(mine), len(paths), len(plan.timesteps), plan.timesteps[0],
                 plan.timesteps[-1], columns, pipeline.multiple)
        # 2. Images (this rank's shard), 3. reports.
        bar = progress(total=len(mine), unit="img", desc=s.mode, enabled=s.progress and ranks.is_main)
        job = RefineJob(s, pipeline, paths, outputs, digest, existing, output_dir, bar.update,
                        artifact_run(opts, pipeline, s), inputs=inputs)
        got = job.run(mine, stopped=_disk_full(config_error))
        bar.close()
        got.unwritten[:0] = unwritten
        report = _summary(s, got, ignored, digest, columns, plan, pipeline, f4_fingerprint) | opts.summary() | (
            {"color_fix": s.color_fix.digest()} if s.color_fix.active else {})
        try:
            summary, stopped = _write_reports(s, ranks, output_dir, report, got, inputs)
        except OutputWriteError as err:
            raise _stop_error(err, report, output_dir, summary_written=False) from err
    if stopped is not None:
        raise _stop_error(stopped, summary, output_dir, summary_written=True)
    if ranks.is_main:
        print_report(summary, output_dir)
    return summary


def _stop_error(err: OutputWriteError, summary: dict, output_dir: Path, summary_written: bool) -> Exception:
    """The one line that ends a run whose writes failed: disk full (:class:`DiskFull`), or a summary that could not
    be written (exit 1 both: the settings were fine)."""
    counts = (f"{len(summary['processed'])} refined, {len(summary['skipped'])} skipped, {len(summary['failed'])} "
              "failed or not reached")
    where = (f"summary (lists what failed): {output_dir / 'summary.json'}" if summary_written else
             "the summary could not be written either")
    if err.disk_full:
        return DiskFull(f"disk full: {err.filename}: {err.strerror}; {counts}; {where}")
    return InputsFailed(f"cannot write {err.filename}: {err.strerror}; {counts}; {where}")
