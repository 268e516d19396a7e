"""The per-image work of ``refine.py``: read, batch by size, refine through a
:class:`~refiner.inference.pipeline.Pipeline`, write each PNG atomically with its record, keep grid rows.

:class:`RefineJob` runs over the input indices it is given (all of them, or one rank's shard,
:mod:`refiner.inference.distributed`) and returns what happened to each (:class:`Collected`); the run-level
reports are the caller's. Images are visited in order of their header size so that equal sizes batch together
(:func:`refiner.batching.batches_by`); a failure of one image (unreadable, too large for ``max_pixels``, out of
memory, NaN, any error the models raise on it, a failed write) is recorded with its reason and the others go on.
A full disk (:class:`~refiner.inference.safe_writes.OutputWriteError` with ``disk_full``) stops the job instead:
every later write would fail too. The image whose write failed is recorded with the bytes written, every image not
reached as "not refined", and :attr:`Collected.stopped` says why; the caller writes the summary and reports it.
Every file is written through :func:`refiner.inference.safe_writes.write_file`, which refuses an input.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from refiner.batching import batches_by
from refiner.data.grids import make_grid
from refiner.data.images import (
    ImageError,
    encode_png,
    image_size,
    load_image,
    to_tensor,
)
from refiner.inference.artifact_batch import ArtifactRun
from refiner.inference.evaluate import MIN_EVAL_SIDE
from refiner.inference.outputs import (
    GRID_RECORD,
    ExistingOutputs,
    mask_path,
    output_record,
    png_text,
    sha256_file,
)
from refiner.inference.pipeline import Pipeline
from refiner.inference.safe_writes import InputFiles, OutputWriteError, write_file
from refiner.inference.settings import RefineSettings

log = logging.getLogger(__name__)


def is_out_of_memory(err: BaseException) -> bool:
    return isinstance(err, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(err, RuntimeError) and "can't allocate memory" in str(err))


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


@dataclass
class Collected:
    """What a :class:`RefineJob` did: summary records, grid rows (the ``grid_max_images`` lowest input indices
    processed) and, in evaluate mode, the images for the metrics."""

    processed: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)
    grid_rows: list[tuple[int, list[Tensor]]] = field(default_factory=list)
    eval_images: list[tuple[int, str, np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)
    unwritten: list[dict] = field(default_factory=list)  # run-level files (grids) that failed: {"file", "reason"}
    stopped: OutputWriteError | None = None  # the disk filled up: the job stopped at this write

    def wants_row(self, indices: Sequence[int], limit: int) -> bool:
        """Could a row of one of ``indices`` enter the kept rows?"""
        if len(self.grid_rows) < limit:
            return True
        return limit > 0 and min(indices) < max(i for i, _ in self.grid_rows)

    def keep_row(self, index: int, row: list[Tensor], limit: int) -> None:
        self.grid_rows = sorted(self.grid_rows + [(index, row)], key=lambda r: r[0])[:limit]


@dataclass
class RefineJob:
    """Refine (or, ``mode=evaluate``, degrade then refine) the inputs at the given indices; see the module
    docstring. ``existing`` says which outputs are finished (skipped in sample mode) or damaged (redone).
    ``artifacts`` (detect/correct/mask/t_start=auto, :mod:`refiner.inference.artifact_batch`) probes each batch
    first, sets its starts and TTC callback, and writes each image's mask before its output. ``settings.color_fix``
    (:class:`~refiner.artifacts.color_fix.ColorFix`) runs on each batch's decoded outputs, before the paste-back."""

    settings: RefineSettings
    pipeline: Pipeline
    paths: Sequence[Path]
    outputs: Sequence[Path]
    digest: str
    existing: ExistingOutputs
    output_dir: Path
    progress: Callable[[int], object] = lambda n: None
    artifacts: ArtifactRun | None = None
    inputs: InputFiles | None = None  # refused as write targets (default: ``paths``)

    def __post_init__(self):
        if self.inputs is None:
            self.inputs = InputFiles.of(self.paths)

    @property
    def evaluate_mode(self) -> bool:
        return self.settings.mode == "evaluate"

    def run(self, indices: Sequence[int], stopped: OutputWriteError | None = None) -> Collected:
        """Refine the images at ``indices``; ``stopped`` (the disk filled up before the job began) refines none and
        reports each as not refined."""
        got = Collected(stopped=stopped)
        sizes = {i: image_size(self.paths[i]) for i in indices}
        order = sorted(indices, key=lambda i: (sizes[i] is None, sizes[i] or (0, 0), i))
        loaded = (it for it in (self._load(i, sizes[i], got) for i in order if got.stopped is None)
                  if it is not None)
        for batch in batches_by(loaded, self.settings.batch_size, key=lambda it: it.size):
            self._refine_batch(batch, got)
            if got.stopped is not None:
                break
        if got.stopped is not None:
            done = {r["input"] for r in got.processed + got.skipped + got.failed}
            for i in order:
                if str(self.paths[i]) not in done:
                    self._fail(got, self.paths[i], f"not refined: the run stopped when the disk filled up "
                                                   f"({got.stopped.filename})", logging.DEBUG)  # the run's one line says it
        return got

    def _fail(self, got: Collected, path: Path, reason: str, level: int = logging.WARNING) -> None:
        got.failed.append({"input": str(path), "reason": reason})
        log.log(level, "skipping %s: %s", path, reason)
        self.progress(1)

    def _load(self, i: int, size: tuple[int, int] | None, got: Collected) -> Item | None:
        path, cfg = self.paths[i], self.settings
        if i in self.existing.finished and not self.evaluate_mode:
            got.skipped.append({"input": str(path), "output": str(self.outputs[i]),
                                "reason": "already refined from this input with these settings (pixels verified)"})
            self.progress(1)
            return None
        if i in self.existing.damaged:
            log.warning("%s: its pixels do not match its record (damaged?); refining %s again", self.outputs[i], path)
        if size is not None and cfg.max_pixels is not None and size[0] * size[1] > cfg.max_pixels:
            self._fail(got, path, f"{size[1]}x{size[0]} = {size[0] * size[1]} pixels exceeds max_pixels="
                                  f"{cfg.max_pixels} (a limit you set; null = no limit, large images are tiled)")
            return None
        try:
            image = load_image(path)
            input_sha256 = sha256_file(path)
        except (ImageError, OSError) as err:
            self._fail(got, path, str(err) if isinstance(err, ImageError) else f"cannot read image {path}: {err}")
            return None
        if self.evaluate_mode and min(image.shape[:2]) < MIN_EVAL_SIDE:
            self._fail(got, path, f"{image.shape[1]}x{image.shape[0]} is too small to evaluate (SSIM needs at least "
                                  f"{MIN_EVAL_SIDE}x{MIN_EVAL_SIDE})")
            return None
        return Item(i, path, self.outputs[i], image, input_sha256)

    def _refine_batch(self, batch: list[Item], got: Collected) -> None:
        cfg, pipeline = self.settings, self.pipeline
        grid_per_image = cfg.grid in ("per_image", "both")
        grid_combined = cfg.grid in ("combined", "both")
        want_rows = grid_per_image or (grid_combined and got.wants_row([it.index for it in batch],
                                                                       cfg.grid_max_images))
        try:
            inputs = pipeline.degrade([it.image for it in batch]) if self.evaluate_mode else [it.image for it in batch]
            art = self.artifacts.prepare(inputs, [it.index for it in batch]) if self.artifacts else None
            refined, expert_images = pipeline.refine_images(
                inputs, art.t_start if art else cfg.t_start, art.steps if art else cfg.steps, seed=cfg.seed,
                indices=[it.index for it in batch], eta=cfg.eta, spacing=cfg.spacing,
                allow_outside_window=cfg.allow_outside_window, with_stages=want_rows,
                **(art.refine_kwargs() if art else {}))
            if self.settings.color_fix.active:
                refined = self.settings.color_fix(refined, inputs)
            if art:
                refined = self.artifacts.finish(art, inputs, refined)
        except Exception as err:  # noqa: BLE001 - whatever the models raise on these images fails them, not the run
            hint = " (try batch_size=1, tiling.mode=always or smaller tiles)" if is_out_of_memory(err) else ""
            size = f"{batch[0].size[1]}x{batch[0].size[0]}"
            for it in batch:
                self._fail(got, it.path, f"{type(err).__name__} while refining this {size} image: {err}{hint}")
            if not isinstance(err, (FloatingPointError, MemoryError, RuntimeError, ValueError)):
                log.exception("unexpected error refining %s", [str(it.path) for it in batch])
            return
        for j, (it, src, out, expert_imgs) in enumerate(zip(batch, inputs, refined, expert_images)):
            try:
                mask = art.mask_png(j) if art else None
                if mask is not None:
                    write_file(mask_path(it.output), mask, self.inputs)
                record = output_record(it.input_sha256, cfg.seed + it.index, self.digest, out)
                write_file(it.output, encode_png(out, png_text(record)), self.inputs)
            except (OSError, ValueError) as err:
                self._fail(got, it.path, str(err) if isinstance(err, OutputWriteError) else
                           f"cannot write {it.output}: {err}")
                if isinstance(err, OutputWriteError) and err.disk_full:
                    got.stopped = err
                    return
                continue
            record = {"input": str(it.path), "output": str(it.output), "size": [int(it.size[1]), int(it.size[0])],
                      **(art.record(j, it.output) if art else {})}
            if want_rows:
                row = self._grid_row(it, src, out, expert_imgs, art.overlay(j, src) if art else [],
                                     self.settings.color_fix.active or (art is not None and art.weights is not None))
                if grid_per_image:
                    grid_path = self.output_dir / "grids" / it.output.name
                    try:
                        write_file(grid_path, encode_png(make_grid([torch.stack(row)]), png_text(GRID_RECORD)),
                                   self.inputs)
                        record["grid"] = str(grid_path)
                    except (OSError, ValueError) as err:
                        got.unwritten.append({"file": str(grid_path), "reason": str(err)})
                        if isinstance(err, OutputWriteError) and err.disk_full:
                            got.stopped = err
                if grid_combined and got.wants_row([it.index], cfg.grid_max_images):
                    got.keep_row(it.index, row, cfg.grid_max_images)
            if self.evaluate_mode:
                got.eval_images.append((it.index, str(it.path), it.image, src, out))
            got.processed.append(record)
            self.progress(1)
            if got.stopped is not None:
                return

    def _grid_row(self, it: Item, src: np.ndarray, out: np.ndarray, expert_imgs: list[Tensor],
                  detected: list[Tensor] = (), output_differs: bool = False) -> list[Tensor]:
        """clean | degraded (evaluate) or input, then (artifact options) the detected mask over the input, then
        each expert's x0, then (``output_differs``: color_fix, composite=paste_back) the output; with ``upscale`` > 1: the input
        upscaled bicubically | the refined output."""
        if self.pipeline.upscale > 1:
            up = F.interpolate(to_tensor(src)[None], scale_factor=self.pipeline.upscale, mode="bicubic")
            return [up[0].clamp(-1, 1), to_tensor(out)]
        return ([to_tensor(it.image), to_tensor(src)] if self.evaluate_mode else [to_tensor(src)]) + list(detected) + \
            expert_imgs + ([to_tensor(out)] if output_differs else [])
