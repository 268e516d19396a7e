"""What ``refine.py`` may write into ``output_dir``, and how a re-run into the same folder resumes.

1. Per-image outputs are ``<input stem>.png`` and never take a reserved name (:data:`RESERVED_NAMES`): an
   input ``grid.jpg`` is written as ``grid-2.png``, so the run's reports can never overwrite a refined image.
   With ``detect`` on, each output ``<name>.png`` gets its artifact mask ``<name>.mask.png`` beside it
   (:func:`mask_path`); no output name ends in ``.mask.png`` (an input ``a.mask.png`` is written as
   ``a.mask-2.png``), so masks and outputs never collide. Masks carry a record of kind ``mask``.
2. Every file refine.py writes says so: a refined PNG carries a PNG text chunk ``refiner`` holding its
   record (input file sha256, noise seed, settings digest, sha256 of its pixels); grids carry a chunk of kind
   ``grid``; ``summary.json`` / ``metrics.json`` a top-level ``"written_by"``; ``config_resolved.yaml`` a
   first comment line.
3. A file that exists where this run would write and that refiner did not write (no record) is never
   replaced unless ``overwrite=true``; neither is a refined PNG whose record shows another input or other
   settings. The run stops before refining anything and names them.
4. A refined PNG whose record matches this run (same input bytes, settings and noise seed) and whose pixels
   still hash to the recorded value is finished: ``mode=refine`` skips it and reports it under
   ``"skipped"``; ``mode=evaluate`` refines it again (the metrics need every image) and replaces it.
5. Reports and grids that refiner wrote describe the folder's latest run and are replaced.

:func:`plan_outputs` names the outputs, :func:`report_paths` the run-level files, :func:`settings_digest` is the
digest recorded in every output, and :func:`check_outputs` applies rules 3 and 4 before any image is refined.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from glob import escape as glob_escape
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Mapping, Sequence

import numpy as np
from PIL import Image

from refiner.errors import RefineError
from refiner.formats.fingerprint import first_stage_fingerprint, weights_fingerprint
from refiner.inference.distributed import partial_summary_name
from refiner.inference.safe_writes import InputFiles
from refiner.inference.settings import RefineSettings
from refiner.io import file_id

if TYPE_CHECKING:
    from torch import nn

    from refiner.inference.chain import Chain

log = logging.getLogger(__name__)

RECORD_KEY = "refiner"
OUTPUT_FORMAT = "refiner-sample-output/1"
WRITTEN_BY = "refiner sample.py"
YAML_MARKER = f"# written by {WRITTEN_BY}"
GRID_RECORD = {"format": OUTPUT_FORMAT, "kind": "grid"}
MASK_RECORD = {"format": OUTPUT_FORMAT, "kind": "mask"}
MASK_SUFFIX = ".mask.png"
RESERVED_NAMES = ("grid.png", "comparison_grid.png", "summary.json", "metrics.json", "config_resolved.yaml", "grids")
_MATCH_KEYS = ("format", "input_sha256", "settings", "noise_seed")
_DIFFERENCE = {
    "input_sha256": "refined by refiner from another input, or the input changed since",
    "settings": "refined by refiner with other settings, weights or first stage",
    "noise_seed": "refined by refiner with another noise seed: seed, or the image's position in the sorted input "
                  "list, changed",
}


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pixels_sha256(img: np.ndarray) -> str:
    """sha256 of an ``(H, W, 3) uint8`` image's shape and bytes."""
    return hashlib.sha256(f"{list(img.shape)}\n".encode() + np.ascontiguousarray(img).tobytes()).hexdigest()


def output_record(input_sha256: str, noise_seed: int, settings: str, image: np.ndarray) -> dict:
    """The record stored in a refined PNG (see the module docstring)."""
    return {"format": OUTPUT_FORMAT, "kind": "output", "input_sha256": input_sha256, "noise_seed": int(noise_seed),
            "settings": settings, "pixels_sha256": pixels_sha256(image)}


def png_text(record: Mapping) -> dict[str, str]:
    """PNG text chunks holding ``record``."""
    return {RECORD_KEY: json.dumps(record, sort_keys=True)}


def read_png_record(path: Path) -> dict | None:
    try:
        with Image.open(path) as img:
            text = getattr(img, "text", {}) or {}
        record = json.loads(text[RECORD_KEY]) if RECORD_KEY in text else None
    except (OSError, ValueError, SyntaxError):
        return None
    return record if isinstance(record, dict) and record.get("format") == OUTPUT_FORMAT else None


def written_by_refiner(path: Path) -> bool:
    """True if ``path`` is a file that refine.py wrote (it carries refiner's record or marker)."""
    if not path.is_file():
        return False
    if path.suffix == ".png":
        return read_png_record(path) is not None
    try:
        if path.suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            return isinstance(data, dict) and data.get("written_by") == WRITTEN_BY
        if path.suffix == ".yaml":
            with open(path, encoding="utf-8") as f:
                return f.readline().rstrip("\n") == YAML_MARKER
    except (OSError, ValueError):
        return False
    return False


def pixels_match_record(path: Path, record: Mapping) -> bool:
    """The PNG at ``path`` decodes to the pixels its record was written with."""
    try:
        with Image.open(path) as img:
            pixels = np.asarray(img.convert("RGB"))
    except (OSError, ValueError, SyntaxError):
        return False
    return pixels_sha256(pixels) == record.get("pixels_sha256")


@dataclass
class ExistingOutputs:
    """Result of :func:`check_existing`: finished outputs by input index, outputs of this very run whose
    pixels no longer verify (to refine again), and files that must not be replaced (``"path (reason)"``)."""

    finished: dict[int, Path] = field(default_factory=dict)
    damaged: dict[int, Path] = field(default_factory=dict)
    conflicts: list[str] = field(default_factory=list)


def check_existing(outputs: Sequence[Path], inputs: Sequence[Path], noise_seeds: Sequence[int], settings: str,
                   reports: Sequence[Path], indices: Iterable[int] | None = None) -> ExistingOutputs:
    """Classify what already exists where this run will write: per-image ``outputs`` (of ``inputs``, with their
    noise seeds; only those at ``indices`` when given, e.g. one rank's shard) and the run's ``reports``
    (summary, config, metrics, grids)."""
    found = ExistingOutputs()
    for i in range(len(outputs)) if indices is None else indices:
        out = outputs[i]
        if not (out.exists() or out.is_symlink()):
            continue
        record = read_png_record(out) if out.is_file() else None
        if record is None:
            found.conflicts.append(f"{out} (not written by refiner)")
            continue
        expected = {"format": OUTPUT_FORMAT, "input_sha256": sha256_file(inputs[i]), "noise_seed": noise_seeds[i],
                    "settings": settings}
        differs = [k for k in _MATCH_KEYS if record.get(k) != expected[k]]
        if differs:
            found.conflicts.append(f"{out} ({_DIFFERENCE.get(differs[0], 'written by another refiner version')})")
        elif pixels_match_record(out, record):
            found.finished[i] = out
        else:
            found.damaged[i] = out
    for path in reports:
        if path.parent.exists() and not path.parent.is_dir():
            found.conflicts.append(f"{path.parent} (a file where the grids folder goes)")
        elif (path.exists() or path.is_symlink()) and not written_by_refiner(path):
            found.conflicts.append(f"{path} (not written by refiner)")
    return found


def plan_outputs(inputs: Sequence[Path], output_dir: Path) -> list[Path]:
    """``output_dir/<stem>.png`` per input; equal stems (other folders or extensions) and the run's reserved
    names (:data:`RESERVED_NAMES`, e.g. ``grid.png``) get ``-2``, ``-3``...
    Raises :class:`RefineError` if an output would be one of the inputs (compared by inode: links count)."""
    taken: set[str] = {name.casefold() for name in RESERVED_NAMES}
    outputs = []
    input_ids = {file_id(p): p for p in inputs}  # the same file by any spelling or link...
    input_ids.pop(None, None)
    input_paths = {p.resolve(): p for p in inputs}  # ...or, for paths that do not exist, the same path
    for path in inputs:
        stem, n = path.stem, 1
        name = f"{stem}.png"
        while name.casefold() in taken or name.casefold().endswith(MASK_SUFFIX):
            n += 1
            name = f"{stem}-{n}.png"
        taken.add(name.casefold())
        out = output_dir / name
        clash = input_ids.get(file_id(out)) or input_paths.get(out.resolve())
        if clash is not None:
            raise RefineError(f"output {out} would overwrite the input image {clash}; "
                              "choose an output_dir that is not the input folder")
        outputs.append(out)
    return outputs


def mask_path(output: Path) -> Path:
    """Where the artifact mask of ``output`` (``<name>.png``) goes: ``<name>.mask.png`` beside it."""
    return output.with_name(output.stem + MASK_SUFFIX)


def writes_masks(settings: RefineSettings) -> bool:
    return settings.detect != "none"


def report_paths(settings: RefineSettings, output_dir: Path, outputs: Sequence[Path], world_size: int = 1
                 ) -> list[Path]:
    """The run-level files this run writes: config, summary (and, across ``world_size`` > 1 processes, the ranks'
    partial summaries), metrics (evaluate) and grids, as the settings ask."""
    cfg = settings
    evaluate_mode = cfg.mode == "evaluate"
    names = ["config_resolved.yaml", "summary.json"] + (["metrics.json"] if evaluate_mode else [])
    if world_size > 1:
        names += [partial_summary_name(k, world_size) for k in range(world_size)]
    if cfg.grid in ("combined", "both"):
        names.append("comparison_grid.png" if evaluate_mode else "grid.png")
    paths = [output_dir / name for name in names]
    if cfg.grid in ("per_image", "both"):
        paths += [output_dir / "grids" / out.name for out in outputs]
    if writes_masks(settings):
        paths += [mask_path(out) for out in outputs]
    return paths


def write_targets(settings: RefineSettings, output_dir: Path, outputs: Sequence[Path], world_size: int = 1
                  ) -> list[tuple[Path, str]]:
    """Every file this run may write, each with what it is: the refined images, their masks, the per-image grids,
    the combined grid and the reports (:func:`report_paths`), for
    :func:`refiner.inference.safe_writes.check_no_input_written`."""
    targets = [(out, "the refined image") for out in outputs]
    for path in report_paths(settings, output_dir, outputs, world_size):
        if path.name.endswith(MASK_SUFFIX):
            what = "the artifact mask"
        elif path.parent.name == "grids" and path.parent.parent == output_dir:
            what = "the per-image grid"
        elif path.name in ("grid.png", "comparison_grid.png"):
            what = "the combined grid"
        else:
            what = "the report"
        targets.append((path, what))
    return targets


def settings_digest(settings: RefineSettings, chain: Chain, f4_fingerprint: str, f8: nn.Module | None,
                    artifacts: Mapping | None = None) -> str:
    """16 hex chars that change with anything that changes a refined image: the experts' weights and placement,
    the first stages, the sampler settings, the tiling settings and ``upscale`` (noise seeds are recorded per
    image), and ``artifacts`` (the detect/correct/mask/t_start=auto settings and the masks' and calibration's
    contents, :meth:`refiner.inference.artifact_options.ArtifactOptions.digest`; left out when empty, so runs
    without them keep their digest), and ``color_fix`` when it is on (likewise). Device, batch size and the number
    of processes are left out (results agree across them up to float noise, for any eta: every image draws its noise
    from its own generator). With eta > 0 the digest also names that step-noise rule (``"step_noise": "per_image"``):
    outputs of versions that drew one step noise per batch are not taken for finished ones; eta = 0 digests are
    unchanged.

    The payload's keys and values are a file format (every output records the digest, and a re-run resumes by it), so
    they keep their historic spelling: ``"stages"`` for the experts and ``"mode": "sample"`` for ``mode=refine``."""
    s = settings
    payload = {
        "tiling": s.tiling.as_dict(), "upscale": s.upscale, "mode": "sample" if s.mode == "refine" else s.mode,
        "t_start": s.t_start, "steps": s.steps, "spacing": s.spacing, "eta": float(s.eta),
        "allow_outside_window": s.allow_outside_window, "precision": s.precision,
        "pad_mode": s.pad_mode, "f4": f4_fingerprint, "f8": first_stage_fingerprint(f8) if f8 is not None else None,
        "stages": [{"weights": weights_fingerprint(e.weights.unet_state), "window": str(e.weights.window),
                    "parameterization": e.weights.parameterization, "conditioning": e.weights.conditioning,
                    "scale_factor": e.weights.scale_factor} for e in chain.experts],
    }
    if float(s.eta) > 0:
        payload["step_noise"] = "per_image"
    if artifacts:
        payload["artifacts"] = dict(artifacts)
    color = s.color_fix.digest()
    if color:
        payload["color_fix"] = color
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def check_outputs(settings: RefineSettings, output_dir: Path, inputs: Sequence[Path], outputs: Sequence[Path],
                  digest: str, indices: Sequence[int] | None = None, reports: bool = True,
                  world_size: int = 1, protected: InputFiles | None = None) -> ExistingOutputs:
    """What already exists where this run writes (:func:`check_existing`; the outputs at ``indices`` only when
    given, the run-level reports only when ``reports``). Files refiner did not write, or refined with other
    settings, raise :class:`RefineError` before any image is refined, unless ``overwrite=true``. Temporary files
    of an interrupted atomic write of these outputs are removed (:func:`remove_stale_temps`)."""
    existing = check_existing(outputs, inputs, [settings.seed + i for i in range(len(inputs))], digest,
                              report_paths(settings, output_dir, outputs, world_size) if reports else [], indices)
    if existing.conflicts and not settings.overwrite:
        n = len(existing.conflicts)
        raise RefineError(f"output_dir {output_dir}: {n} file(s) this run would replace were not written by refiner "
                          f"with these settings: {'; '.join(existing.conflicts[:3])}{' ...' if n > 3 else ''}. "
                          "Pass overwrite=true to replace them, or choose another output_dir")
    mine = [outputs[i] for i in (range(len(outputs)) if indices is None else indices)]
    remove_stale_temps(mine + ([mask_path(out) for out in mine] if writes_masks(settings) else []),
                       InputFiles.of(inputs) if protected is None else protected)
    if existing.conflicts:
        log.warning("overwrite=true: replacing %d file(s) refiner did not write with these settings (first: %s)",
                    len(existing.conflicts), existing.conflicts[0])
    return existing


def remove_stale_temps(outputs: Sequence[Path], inputs: InputFiles | None = None) -> list[Path]:
    """Delete the temporary files ``.<name>.<random>.tmp`` that :func:`refiner.io.atomic_path` leaves next to an
    output when a run is killed mid-write (only files of exactly that pattern, for these outputs, and never one of
    ``inputs``: an input may carry any name). Returns them."""
    removed = []
    for out in outputs:
        for tmp in out.parent.glob(f".{glob_escape(out.name)}.*.tmp") if out.parent.is_dir() else ():
            if tmp.is_file() and not tmp.is_symlink() and (inputs is None or inputs.landing_on(tmp) is None):
                tmp.unlink()
                removed.append(tmp)
    if removed:
        log.warning("removed %d temporary file(s) of an interrupted run (first: %s)", len(removed), removed[0])
    return removed
