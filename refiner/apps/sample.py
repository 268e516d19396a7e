"""Refine artifact images with window experts: ``refiner-sample inputs=<folder|glob|list> [overrides]``
(``python sample.py`` at the repo root).

Per image (SDEdit-style img2img in VQ-f4 latent space), :class:`refiner.inference.pipeline.Pipeline`:
``load_image`` (any mode -> RGB uint8), pad, ``z = f4.encode(x) * scale_factor``,
:meth:`refiner.inference.chain.Chain.refine` (``q_sample`` to ``t_start``, DDIM(eta) over one grid, window
experts switched by t; a ``conditioning: concat`` stage sees the scaled latent of the image being refined),
``f4.decode(z_ref / scale_factor)``, crop; then this module writes the PNG atomically with its record
(:mod:`refiner.inference.outputs`).

``mode=evaluate`` first degrades each clean input through the VQ-f8 round trip (saved as uint8, as
a real artifact image would be), refines that, and writes ``metrics.json``
(:func:`refiner.inference.evaluate.evaluate`).

Everything that can be checked without images is checked first (stage files, shared schedule and
scale factor, channel counts, window coverage of the timestep grid, first-stage files, output
names), so a bad chain fails before any image is read. Unreadable or oversized images are reported
(file + reason) in ``summary.json`` and on stderr; the others are still processed.

Noise: image ``i`` (its index in the sorted input list) gets its ``q_sample`` noise from
``seed + i`` (see :mod:`refiner.inference.pipeline`).

Exit codes follow :mod:`refiner.cli`: 0 done, 1 some inputs failed, 2 a setting that cannot work (one
``error:`` line on stderr).
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch import Tensor

from refiner.apps import CONFIG_DIR
from refiner.batching import batches_by
from refiner.data.images import ImageError, load_image, save_png_atomic, scan_images, to_tensor
from refiner.errors import SampleError
from refiner.formats.compvis import first_stage_from_config
from refiner.inference.chain import PRECISIONS, Chain
from refiner.inference.evaluate import MIN_EVAL_SIDE, evaluate, format_metrics_table
from refiner.inference.outputs import (
    GRID_RECORD, WRITTEN_BY, YAML_MARKER, check_outputs, output_record, plan_outputs, png_text, settings_digest,
    sha256_file,
)
from refiner.inference.pipeline import PAD_MODES, Pipeline
from refiner.io import atomic_write_text
from refiner.sampling import SPACINGS
from refiner.settings import check_device, check_writable_dir, require_choice, require_int, require_number
from refiner.visualize import save_combined_grid, save_grid

log = logging.getLogger(__name__)

MODES = ("sample", "evaluate")
GRID_MODES = ("none", "per_image", "combined", "both")


def image_size(path: Path) -> tuple[int, int] | None:
    """``(H, W)`` from the file header (no decoding), or None if PIL cannot open it."""
    try:
        with Image.open(path) as img:
            w, h = img.size
        return h, w
    except Exception:  # reported properly by load_image later
        return None


@dataclass
class Item:
    index: int
    path: Path
    output: Path
    image: np.ndarray  # (H, W, 3) uint8: the clean reference in evaluate mode, else the refiner input
    input_sha256: str = ""  # of the input file, for the output's record (refiner.inference.outputs)

    @property
    def size(self) -> tuple[int, int]:
        return self.image.shape[0], self.image.shape[1]


def _is_out_of_memory(err: BaseException) -> bool:
    return isinstance(err, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(err, RuntimeError) and "can't allocate memory" in str(err))


def _check_settings(cfg: DictConfig) -> None:
    """Every setting's type and range, the device and the output folder, before any file is loaded. (The
    grid-dependent limits, t_start below the schedule's T, steps <= t_start + 1 and eta > 1, are checked by
    :meth:`Chain.plan` once the stages are known.)"""
    require_choice("mode", cfg.mode, MODES)
    require_choice("grid", cfg.grid, GRID_MODES)
    require_choice("spacing", cfg.spacing, SPACINGS)
    require_choice("pad_mode", cfg.pad_mode, PAD_MODES)
    require_choice("precision", cfg.get("precision", "fp32"), PRECISIONS)
    if cfg.inputs is None or cfg.inputs == "" or (not isinstance(cfg.inputs, str) and len(cfg.inputs) == 0):
        raise SampleError("inputs is not set: pass inputs=<folder|glob|[a.png,b.jpg]>")
    require_int("t_start", cfg.t_start, minimum=0)
    require_int("steps", cfg.steps, minimum=1)
    # eta in [0, 1] interpolates DDIM (0) and DDPM (1); eta > 1 only where the DDIM variance fits (Chain.plan)
    require_number("eta", cfg.eta, minimum=0.0)
    require_int("seed", cfg.seed, minimum=0)
    require_int("batch_size", cfg.batch_size, minimum=1)
    require_int("grid_max_images", cfg.grid_max_images, minimum=0)
    if cfg.max_pixels is not None:
        require_int("max_pixels", cfg.max_pixels, minimum=1)
    for flag in ("allow_outside_window", "use_ema", "trust_checkpoint", "overwrite", "allow_first_stage_mismatch"):
        if not isinstance(cfg.get(flag, False), bool):
            raise SampleError(f"{flag} must be true or false, got {cfg.get(flag)!r}")
    check_device(cfg.device)
    if cfg.output_dir in (None, ""):
        raise SampleError("output_dir is not set")
    check_writable_dir(cfg.output_dir, "output_dir")
    if cfg.get("inception_weights"):
        from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

        if not Path(cfg.inception_weights).is_file():
            raise SampleError(f"inception_weights file not found: {cfg.inception_weights}")
        if not _TORCH_FIDELITY_AVAILABLE:  # fid_kid would only fail after every image was processed
            raise SampleError("inception_weights is set but FID/KID need the torch-fidelity package (see "
                              "refiner.metrics.fid_kid); unset inception_weights to evaluate without FID/KID")


@dataclass
class _Collected:
    processed: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)
    grid_rows: list[tuple[int, list[Tensor]]] = field(default_factory=list)
    eval_images: list[tuple[int, str, np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)


def run(cfg: DictConfig) -> dict:
    """Refine (or evaluate) every input image; returns the summary also written to ``summary.json``.

    Raises :class:`SampleError` / :class:`~refiner.formats.safe_load.CheckpointError` /
    ``FileNotFoundError`` for problems found before processing (bad chain, settings, no inputs).
    Per-image problems are collected in ``summary["failed"]`` instead.
    """
    from tqdm.auto import tqdm

    _check_settings(cfg)
    evaluate_mode = cfg.mode == "evaluate"
    device = torch.device(cfg.device)
    # 1. Checkpoints and the step plan: everything that can fail without looking at an image.
    allow_mismatch = bool(cfg.get("allow_first_stage_mismatch", False))
    chain = Chain.from_paths(list(cfg.stages), use_ema=cfg.use_ema, trust_checkpoint=cfg.trust_checkpoint,
                             device=device, precision=cfg.get("precision", "fp32"),
                             allow_first_stage_mismatch=allow_mismatch)
    plan = chain.plan(cfg.t_start, cfg.steps, spacing=cfg.spacing, eta=cfg.eta,
                      allow_outside_window=cfg.allow_outside_window)
    f4 = first_stage_from_config(cfg.first_stage.get("f4"), "f4", cfg.trust_checkpoint, device)
    f4_fingerprint = chain.check_first_stage(f4, f"first_stage.f4.ckpt_path={cfg.first_stage.f4.ckpt_path}",
                                             allow_mismatch)
    f8 = first_stage_from_config(cfg.first_stage.get("f8"), "f8", cfg.trust_checkpoint, device) \
        if evaluate_mode else None
    pipeline = Pipeline(f4, chain, f8, pad_mode=cfg.pad_mode, device=device)
    stages = chain.stages
    inputs_spec = cfg.inputs if isinstance(cfg.inputs, str) else list(cfg.inputs)
    try:
        paths, ignored = scan_images(inputs_spec)
    except (FileNotFoundError, ValueError) as err:
        raise SampleError(f"inputs={inputs_spec!r}: {err}") from err
    output_dir = Path(cfg.output_dir)
    outputs = plan_outputs(paths, output_dir)
    settings = settings_digest(cfg, chain, f4_fingerprint, f8)
    existing = check_outputs(cfg, output_dir, paths, outputs, settings)
    output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output_dir / "config_resolved.yaml", f"{YAML_MARKER}\n{OmegaConf.to_yaml(cfg, resolve=True)}")
    columns = (["clean", "degraded"] if evaluate_mode else ["input"]) + [  # stages numbered in run order
        f"after stage {j + 1} ({stages[k].name}, window {stages[k].weights.window})"
        for j, k in enumerate(plan.segments)]
    log.info("%d images, %d steps t=%d..%d, stages in run order: %s; sides padded to multiples of %d",
             len(paths), len(plan.timesteps), plan.timesteps[0], plan.timesteps[-1], columns[-len(plan.segments):],
             pipeline.multiple)

    # 2. Images: header sizes first (cheap), so same sizes batch together and oversized ones are refused.
    sizes = {i: image_size(p) for i, p in enumerate(paths)}
    order = sorted(range(len(paths)), key=lambda i: (sizes[i] is None, sizes[i] or (0, 0), i))
    got = _Collected()
    progress = tqdm(total=len(paths), unit="img", desc=cfg.mode, disable=not cfg.progress, file=sys.stderr)
    grid_per_image = cfg.grid in ("per_image", "both")
    grid_combined = cfg.grid in ("combined", "both")
    inputs_protect = [str(p) for p in paths]

    def fail(path: Path, reason: str) -> None:
        got.failed.append({"input": str(path), "reason": reason})
        log.warning("skipping %s: %s", path, reason)
        progress.update(1)

    def load(i: int) -> Item | None:
        path, size = paths[i], sizes[i]
        if i in existing.finished and not evaluate_mode:
            got.skipped.append({"input": str(path), "output": str(outputs[i]),
                                "reason": "already refined from this input with these settings (pixels verified)"})
            progress.update(1)
            return None
        if i in existing.damaged:
            log.warning("%s: its pixels do not match its record (damaged?); refining %s again", outputs[i], path)
        if size is not None and cfg.max_pixels is not None and size[0] * size[1] > cfg.max_pixels:
            fail(path, f"{size[1]}x{size[0]} = {size[0] * size[1]} pixels exceeds max_pixels={cfg.max_pixels} "
                       "(images are refined whole, not in tiles); downscale it or raise max_pixels if memory allows")
            return None
        try:
            image = load_image(path)
            input_sha256 = sha256_file(path)
        except (ImageError, OSError) as err:
            fail(path, str(err) if isinstance(err, ImageError) else f"cannot read image {path}: {err}")
            return None
        if evaluate_mode and min(image.shape[:2]) < MIN_EVAL_SIDE:
            fail(path, f"{image.shape[1]}x{image.shape[0]} is too small to evaluate (SSIM needs at least "
                       f"{MIN_EVAL_SIDE}x{MIN_EVAL_SIDE})")
            return None
        return Item(i, path, outputs[i], image, input_sha256)

    loaded = (it for it in map(load, order) if it is not None)
    for batch in batches_by(loaded, cfg.batch_size, key=lambda it: it.size):
        want_rows = grid_per_image or (grid_combined and len(got.grid_rows) < cfg.grid_max_images)
        try:
            inputs = pipeline.degrade([it.image for it in batch]) if evaluate_mode else [it.image for it in batch]
            refined, stage_images = pipeline.refine_images(
                inputs, cfg.t_start, cfg.steps, seed=cfg.seed, indices=[it.index for it in batch], eta=cfg.eta,
                spacing=cfg.spacing, allow_outside_window=cfg.allow_outside_window, with_stages=want_rows)
        except (FloatingPointError, RuntimeError, MemoryError) as err:
            if not (_is_out_of_memory(err) or isinstance(err, FloatingPointError)):
                raise
            for it in batch:
                fail(it.path, f"{type(err).__name__}: {err}" + (" (try batch_size=1 or a lower max_pixels)"
                                                               if _is_out_of_memory(err) else ""))
            continue
        for it, src, out, stage_imgs in zip(batch, inputs, refined, stage_images):
            try:
                record = output_record(it.input_sha256, cfg.seed + it.index, settings, out)
                save_png_atomic(it.output, out, protect=inputs_protect, text=png_text(record))
            except (OSError, ValueError) as err:
                fail(it.path, f"cannot write {it.output}: {err}")
                continue
            record = {"input": str(it.path), "output": str(it.output), "size": [int(it.size[1]), int(it.size[0])]}
            if want_rows:
                row = ([to_tensor(it.image), to_tensor(src)] if evaluate_mode else [to_tensor(src)]) + stage_imgs
                if grid_per_image:
                    grid_path = output_dir / "grids" / it.output.name
                    save_grid(grid_path, [torch.stack(row)], text=png_text(GRID_RECORD))
                    record["grid"] = str(grid_path)
                if grid_combined and len(got.grid_rows) < cfg.grid_max_images:
                    got.grid_rows.append((it.index, row))
            if evaluate_mode:
                got.eval_images.append((it.index, str(it.path), it.image, src, out))
            got.processed.append(record)
            progress.update(1)
    progress.close()

    # 3. Reports.
    summary: dict[str, Any] = {
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
        "stage_of_step": plan.stage_of_step,
        "stages": [{"path": s.weights.source, "window": str(s.weights.window), "conditioning": s.weights.conditioning,
                    "ema": s.weights.has_ema, "first_stage_fingerprint": s.weights.first_stage_fingerprint}
                   for s in stages],
        "first_stage_fingerprint": f4_fingerprint,
        "padded_to_multiple_of": pipeline.multiple,
    }
    if grid_combined and got.grid_rows:
        name = "comparison_grid.png" if evaluate_mode else "grid.png"
        rows = [r for _, r in sorted(got.grid_rows, key=lambda x: x[0])]
        summary["grid"] = str(save_combined_grid(output_dir / name, rows, text=png_text(GRID_RECORD)))
    if evaluate_mode and got.eval_images:
        ev = sorted(got.eval_images, key=lambda x: x[0])
        metrics = evaluate([e[2] for e in ev], [e[3] for e in ev], [e[4] for e in ev],
                           swd_kwargs=OmegaConf.to_container(cfg.swd, resolve=True) if cfg.get("swd") else None,
                           inception_weights=cfg.get("inception_weights"))
        metrics["images"] = [e[1] for e in ev]
        metrics["written_by"] = WRITTEN_BY
        metrics_path = output_dir / "metrics.json"
        atomic_write_text(metrics_path, json.dumps(metrics, indent=2))
        summary["metrics"] = str(metrics_path)
        print(format_metrics_table(metrics))
        if "grid" in summary:
            print(f"comparison grid: {summary['grid']}")
    atomic_write_text(output_dir / "summary.json", json.dumps(summary, indent=2))
    print(f"{len(got.processed)} refined, {len(got.skipped)} skipped (already done), {len(got.failed)} failed; "
          f"outputs in {output_dir} "
          f"(summary: {output_dir / 'summary.json'})")
    for f in summary["failed"]:
        print(f"failed: {f['input']}: {f['reason']}", file=sys.stderr)
    for f in ignored:
        print(f"ignored: {f['file']}: {f['reason']}", file=sys.stderr)
    return summary


def task(cfg: DictConfig) -> None:
    """The Hydra task: :func:`run` under :func:`refiner.cli.run_cli`'s exit-code contract."""
    from refiner.cli import run_cli

    raise SystemExit(run_cli(lambda: 1 if run(cfg)["failed"] else 0))


main = hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="sample")(task)

if __name__ == "__main__":
    main()
