"""Refine artifact images with a chain of window experts: what ``python sample.py`` runs.

Pipeline per image (SDEdit-style img2img in VQ-f4 latent space):

1. ``load_image`` (any mode -> RGB uint8), pad bottom/right to a multiple of ``f4.factor`` times the
   UNets' downsampling (the latent must also fit the UNet), ``z = f4.encode(x) * scale_factor``.
2. :func:`refiner.sampling.refine`: ``q_sample`` to ``t_start``, DDIM(eta) over one grid, switching
   window experts by t. A stage whose checkpoint says ``conditioning: concat`` sees
   ``unet(x_t, t, concat=z)`` with ``z`` the (scaled) latent of the image being refined.
3. ``f4.decode(z_ref / scale_factor)``, crop back to the input size, write a PNG atomically.

``mode=evaluate`` first degrades each clean input through the VQ-f8 round trip (saved as uint8, as
a real artifact image would be), refines that, and writes ``metrics.json``
(:func:`refiner.metrics.evaluate_pairs`).

Everything that can be checked without images is checked first (stage files, shared schedule and
scale factor, channel counts, window coverage of the timestep grid, first-stage files, output
names), so a bad chain fails before any image is read. Unreadable or oversized images are reported
(file + reason) in ``summary.json`` and on stderr; the others are still processed.

Noise: image ``i`` (its index in the sorted input list) gets its ``q_sample`` noise from
``seed + i``, so with ``eta=0`` its result does not depend on ``batch_size`` or on the other inputs.
With ``eta > 0`` the per-step noise comes from one generator per batch (seeded with
``seed + index of the batch's first image``) and so depends on how images were batched.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch import Tensor

from refiner.checkpoints import WindowWeights, first_stage_from_config, load_window_weights
from refiner.data.images import (
    ImageError, crop_to, load_image, scan_images, pad_to_multiple, save_png_atomic, to_tensor, to_uint8,
)
from refiner.formats.fingerprint import (
    check_fingerprints_agree, check_first_stage_match, first_stage_fingerprint, weights_fingerprint,
)
from refiner.errors import SettingError
from refiner.io import atomic_write_text, file_id
from refiner.run_outputs import (
    GRID_RECORD, RESERVED_NAMES, WRITTEN_BY, YAML_MARKER, ExistingOutputs, check_existing, output_record, png_text,
    sha256_file,
)
from refiner.settings import check_device, check_writable_dir, require_choice, require_int, require_number
from refiner.sampling import SPACINGS, RefineResult, Stage, check_eta, refine, timestep_grid
from refiner.visualize import save_grid

log = logging.getLogger(__name__)

MODES = ("sample", "evaluate")
GRID_MODES = ("none", "per_image", "combined", "both")
MIN_EVAL_SIDE = 11  # SSIM's Gaussian window (torchmetrics, kernel 11)
PAD_MODES = ("reflect", "replicate", "constant")


class SampleError(SettingError):
    """A setting, checkpoint chain or output location that cannot work; raised before any image is processed."""


# ----------------------------------------------------------------------------------------------- stages
@dataclass
class LoadedStage:
    """One window checkpoint, loaded and ready to become a :class:`~refiner.sampling.Stage`."""

    weights: WindowWeights
    unet: torch.nn.Module
    precision: str = "fp32"

    @property
    def downsample(self) -> int:
        """The UNet's spatial downsampling: latents must be divisible by it."""
        return 2 ** (self.unet.num_levels - 1)

    @property
    def name(self) -> str:
        return Path(self.weights.source).name

    def stage(self, z_cond: Tensor | None) -> Stage:
        """A Stage whose model is ``unet(x, t)`` or, for ``conditioning == "concat"``, ``unet(x, t, concat=z_cond)``."""
        unet = self.unet
        if self.weights.conditioning == "concat":
            if z_cond is None:
                raise ValueError(f"{self.weights.source} needs the degraded latent (conditioning='concat')")
            model = lambda x, t: unet(x, t, concat=z_cond)  # noqa: E731
        else:
            model = lambda x, t: unet(x, t)  # noqa: E731
        if self.precision == "bf16":  # autocast only the UNet; the sampler's update stays in fp32
            model = _bf16_autocast(model, next(unet.parameters()).device.type)
        return Stage(model=model, window=self.weights.window, parameterization=self.weights.parameterization,
                     name=self.name)


def _bf16_autocast(model, device_type: str):
    def autocast_model(x: Tensor, t: Tensor) -> Tensor:
        with torch.autocast(device_type, dtype=torch.bfloat16):
            return model(x, t).float()

    return autocast_model


def load_stages(paths: Sequence[str], use_ema: bool = True, trust_checkpoint: bool = False,
                device: str | torch.device = "cpu", precision: str = "fp32") -> list[LoadedStage]:
    """Load each window checkpoint (``.ckpt`` or exported ``.safetensors``) and build its UNet."""
    if precision not in ("fp32", "bf16"):
        raise SampleError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    if isinstance(paths, (str, Path)) or not paths:
        raise SampleError(f"stages must be a non-empty list of window checkpoint paths, got {paths!r}")
    loaded = []
    for path in paths:
        weights = load_window_weights(path, use_ema=use_ema, trust_checkpoint=trust_checkpoint)
        if weights.conditioning not in (None, "concat"):
            raise SampleError(f"{path}: conditioning={weights.conditioning!r}; only null or 'concat' are supported")
        loaded.append(LoadedStage(weights, weights.build_unet().to(device), precision))
    return loaded


def check_compatible(stages: Sequence[LoadedStage], latent_channels: int | None = None,
                     allow_first_stage_mismatch: bool = False) -> tuple[Tensor, float]:
    """Stages must share one noise schedule (same ``alphas_cumprod``), one ``scale_factor`` and one first stage
    (their recorded fingerprints; :class:`~refiner.formats.fingerprint.FirstStageMismatch` unless
    ``allow_first_stage_mismatch``); with ``latent_channels`` (the f4 ``embed_dim``) their UNet channels must
    fit it. Returns the shared ``(alphas_cumprod, scale_factor)``."""
    check_fingerprints_agree([(s.weights.source, s.weights.first_stage_fingerprint) for s in stages],
                             allow_first_stage_mismatch)
    first = stages[0].weights
    ac = first.schedule.alphas_cumprod()
    for s in stages[1:]:
        w = s.weights
        other = w.schedule.alphas_cumprod()
        if other.shape != ac.shape or not torch.allclose(other, ac, rtol=0, atol=1e-9):
            raise SampleError(f"stages do not share a noise schedule: {first.source} has {first.schedule} but "
                              f"{w.source} has {w.schedule}; chain only experts trained on the same schedule")
        if not math.isclose(w.scale_factor, first.scale_factor, rel_tol=1e-6):
            raise SampleError(f"stages do not share scale_factor: {first.source} has {first.scale_factor} but "
                              f"{w.source} has {w.scale_factor}")
    if latent_channels is not None:
        for s in stages:
            p, cond = s.weights.unet_params, s.weights.conditioning
            want_in = latent_channels * (2 if cond == "concat" else 1)
            if p["in_channels"] != want_in or p["out_channels"] != latent_channels:
                raise SampleError(
                    f"{s.weights.source}: UNet in/out channels {p['in_channels']}/{p['out_channels']} do not fit the "
                    f"first stage's {latent_channels}-channel latent (conditioning={cond!r} needs "
                    f"in_channels={want_in}, out_channels={latent_channels}); wrong first_stage.f4 for these windows?")
    return ac, float(first.scale_factor)


def check_first_stage(stages: Sequence[LoadedStage], f4: torch.nn.Module, f4_source: str,
                      allow_mismatch: bool = False) -> str:
    """Every stage must have been trained with the first stage ``f4`` (named ``f4_source`` in messages):
    compares the fingerprints (:mod:`refiner.formats.fingerprint`); a stage without one only warns. A mismatch
    raises :class:`~refiner.formats.fingerprint.FirstStageMismatch` (a warning with ``allow_mismatch``).
    Returns the f4's fingerprint."""
    fingerprint = first_stage_fingerprint(f4)
    for s in stages:
        check_first_stage_match(s.weights.first_stage_fingerprint, s.weights.source, fingerprint, f4_source,
                                allow_mismatch)
    return fingerprint


@dataclass
class StepPlan:
    """Which stage runs which grid step; ``segments`` lists stage indices in run order."""

    timesteps: list[int]
    stage_of_step: list[int]

    @property
    def segments(self) -> list[int]:
        return [k for i, k in enumerate(self.stage_of_step) if i == 0 or self.stage_of_step[i - 1] != k]


def plan_steps(stages: Sequence[LoadedStage], alphas_cumprod: Tensor, t_start: int, steps: int,
               spacing: str = "uniform", eta: float = 0.0, allow_outside_window: bool = False) -> StepPlan:
    """Run :func:`refine`'s own validation (overlap, coverage, gaps, t_start above the top window)
    without images: a dry run on a 1-element latent with zero-output models, so the checks are exactly
    the ones the real run applies. (``refiner.sampling`` has no public validate function.)"""
    try:
        check_eta(eta, timestep_grid(t_start, steps, 0, spacing, alphas_cumprod.shape[0]), alphas_cumprod)
    except (ValueError, TypeError) as err:
        raise SampleError(str(err)) from err
    dummy = [Stage(lambda x, t: torch.zeros_like(x), s.weights.window, s.weights.parameterization, s.name)
             for s in stages]
    z = torch.zeros(1, 1, 1, 1)
    try:
        result = refine(dummy, z, t_start, steps, alphas_cumprod, eta=eta, generator=torch.Generator().manual_seed(0),
                        spacing=spacing, allow_outside_window=allow_outside_window, return_stage_outputs=True,
                        noise=z)
    except (ValueError, TypeError) as err:
        raise SampleError(f"invalid stage chain for t_start={t_start}, steps={steps}: {err}") from err
    plan = StepPlan(result.timesteps, result.stage_of_step)
    for k, s in enumerate(stages):
        if k not in plan.stage_of_step:
            log.warning("stage %d (%s, window %s) gets no step of the grid %s..%s; it is loaded but unused",
                        k + 1, s.weights.source, s.weights.window, plan.timesteps[0], plan.timesteps[-1])
    return plan


# ------------------------------------------------------------------------------------------------ outputs
def plan_outputs(inputs: Sequence[Path], output_dir: Path) -> list[Path]:
    """``output_dir/<stem>.png`` per input; equal stems (other folders or extensions) and the run's reserved
    names (:data:`refiner.run_outputs.RESERVED_NAMES`, e.g. ``grid.png``) get ``-2``, ``-3``...
    Raises :class:`SampleError` if an output would be one of the inputs (compared by inode: links count)."""
    taken: set[str] = {name.casefold() for name in RESERVED_NAMES}
    outputs = []
    input_ids = {file_id(p): p for p in inputs}  # the same file by any spelling or link...
    input_ids.pop(None, None)
    input_paths = {p.resolve(): p for p in inputs}  # ...or, for paths that do not exist, the same path
    for path in inputs:
        stem, n = path.stem, 1
        name = f"{stem}.png"
        while name.casefold() in taken:
            n += 1
            name = f"{stem}-{n}.png"
        taken.add(name.casefold())
        out = output_dir / name
        clash = input_ids.get(file_id(out)) or input_paths.get(out.resolve())
        if clash is not None:
            raise SampleError(f"output {out} would overwrite the input image {clash}; "
                              "choose an output_dir that is not the input folder")
        outputs.append(out)
    return outputs


def report_paths(cfg: DictConfig, output_dir: Path, outputs: Sequence[Path]) -> list[Path]:
    """The run-level files this run writes: config, summary, metrics (evaluate) and grids, as ``cfg`` asks."""
    evaluate_mode = cfg.mode == "evaluate"
    names = ["config_resolved.yaml", "summary.json"] + (["metrics.json"] if evaluate_mode else [])
    if cfg.grid in ("combined", "both"):
        names.append("comparison_grid.png" if evaluate_mode else "grid.png")
    paths = [output_dir / name for name in names]
    if cfg.grid in ("per_image", "both"):
        paths += [output_dir / "grids" / out.name for out in outputs]
    return paths


def settings_digest(cfg: DictConfig, stages: Sequence[LoadedStage], f4_fingerprint: str,
                    f8: torch.nn.Module | None) -> str:
    """16 hex chars that change with anything that changes a refined image: the stages' weights and placement,
    the first stages, and the sampler settings (noise seeds are recorded per image). Device and batch size are
    left out (results agree across them up to float noise; with eta > 0 they depend on batching)."""
    payload = {
        "mode": cfg.mode, "t_start": cfg.t_start, "steps": cfg.steps, "spacing": cfg.spacing, "eta": float(cfg.eta),
        "allow_outside_window": cfg.allow_outside_window, "precision": cfg.get("precision", "fp32"),
        "pad_mode": cfg.pad_mode, "f4": f4_fingerprint, "f8": first_stage_fingerprint(f8) if f8 is not None else None,
        "stages": [{"weights": weights_fingerprint(s.weights.unet_state), "window": str(s.weights.window),
                    "parameterization": s.weights.parameterization, "conditioning": s.weights.conditioning,
                    "scale_factor": s.weights.scale_factor} for s in stages],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def check_outputs(cfg: DictConfig, output_dir: Path, inputs: Sequence[Path], outputs: Sequence[Path],
                  settings: str) -> ExistingOutputs:
    """What already exists where this run writes (:func:`refiner.run_outputs.check_existing`). Files refiner did
    not write, or refined with other settings, raise :class:`SampleError` before any image is refined, unless
    ``overwrite=true``."""
    existing = check_existing(outputs, inputs, [cfg.seed + i for i in range(len(inputs))], settings,
                              report_paths(cfg, output_dir, outputs))
    if existing.conflicts and not cfg.get("overwrite", False):
        n = len(existing.conflicts)
        raise SampleError(f"output_dir {output_dir}: {n} file(s) this run would replace were not written by refiner "
                          f"with these settings: {'; '.join(existing.conflicts[:3])}{' ...' if n > 3 else ''}. "
                          "Pass overwrite=true to replace them, or choose another output_dir")
    if existing.conflicts:
        log.warning("overwrite=true: replacing %d file(s) refiner did not write with these settings (first: %s)",
                    len(existing.conflicts), existing.conflicts[0])
    return existing


def image_size(path: Path) -> tuple[int, int] | None:
    """``(H, W)`` from the file header (no decoding), or None if PIL cannot open it."""
    try:
        with Image.open(path) as img:
            w, h = img.size
        return h, w
    except Exception:  # reported properly by load_image later
        return None


# ----------------------------------------------------------------------------------------------- running
@dataclass
class Item:
    index: int
    path: Path
    output: Path
    image: np.ndarray  # (H, W, 3) uint8: the clean reference in evaluate mode, else the refiner input
    input_sha256: str = ""  # of the input file, for the output's record (refiner.run_outputs)

    @property
    def size(self) -> tuple[int, int]:
        return self.image.shape[0], self.image.shape[1]


@dataclass
class Refiner:
    """The loaded models and settings; :meth:`run_batch` refines same-size images."""

    stages: list[LoadedStage]
    f4: torch.nn.Module
    alphas_cumprod: Tensor
    scale_factor: float
    t_start: int
    steps: int
    eta: float = 0.0
    spacing: str = "uniform"
    allow_outside_window: bool = False
    seed: int = 0
    pad_mode: str = "reflect"
    device: str = "cpu"
    f8: torch.nn.Module | None = None

    @property
    def multiple(self) -> int:
        """Input sides are padded to this: f4 factor times the (lcm of the) UNets' downsampling."""
        return self.f4.factor * math.lcm(*(s.downsample for s in self.stages))

    def _pad(self, images: Sequence[np.ndarray], multiple: int) -> Tensor:
        x = torch.stack([to_tensor(img) for img in images]).to(self.device)
        return pad_to_multiple(x, multiple, mode=self.pad_mode)[0]

    @torch.no_grad()
    def degrade(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """VQ-f8 round trip (pad, encode, quantize, decode, crop), stored as uint8 like a saved artifact image."""
        h, w = images[0].shape[:2]
        y = self.f8.round_trip(self._pad(images, self.f8.factor))
        return [to_uint8(crop_to(img, (h, w))) for img in y]

    @torch.no_grad()
    def run_batch(self, images: Sequence[np.ndarray], indices: Sequence[int], with_stages: bool
                  ) -> tuple[list[np.ndarray], list[list[Tensor]]]:
        """Refine same-size uint8 images. Returns the refined uint8 images and, if ``with_stages``, per
        image the decoded x0 prediction after each stage (in run order, cropped, in [-1, 1])."""
        h, w = images[0].shape[:2]
        x = self._pad(images, self.multiple)
        z = self.f4.encode(x) * self.scale_factor
        noise = torch.stack([torch.randn(z.shape[1:], generator=torch.Generator().manual_seed(self.seed + i))
                             for i in indices]).to(z)
        generator = torch.Generator(device=z.device).manual_seed(self.seed + int(indices[0]))
        result: RefineResult = refine(
            [s.stage(z) for s in self.stages], z, self.t_start, self.steps, self.alphas_cumprod, eta=self.eta,
            generator=generator, spacing=self.spacing, allow_outside_window=self.allow_outside_window,
            return_stage_outputs=True, noise=noise)
        if not torch.isfinite(result.latent).all():
            raise FloatingPointError("the refined latent has NaN/inf values (the denoiser diverged)")
        refined = crop_to(self.f4.decode(result.latent / self.scale_factor), (h, w))
        stage_images: list[list[Tensor]] = [[] for _ in images]
        if with_stages:
            for x0 in result.stage_x0:
                decoded = crop_to(self.f4.decode(x0 / self.scale_factor), (h, w)).clamp(-1, 1).cpu()
                for j, img in enumerate(decoded):
                    stage_images[j].append(img)
        return [to_uint8(img) for img in refined], stage_images


def _batches(items: Iterator[Item], batch_size: int) -> Iterator[list[Item]]:
    batch: list[Item] = []
    for item in items:
        if batch and (item.size != batch[0].size or len(batch) == batch_size):
            yield batch
            batch = []
        batch.append(item)
    if batch:
        yield batch


def _is_out_of_memory(err: BaseException) -> bool:
    return isinstance(err, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(err, RuntimeError) and "can't allocate memory" in str(err))


def _pad_white(img: Tensor, size: tuple[int, int]) -> Tensor:
    return F.pad(img, (0, size[1] - img.shape[-1], 0, size[0] - img.shape[-2]), value=1.0)


def save_combined_grid(path: Path, rows: Sequence[Sequence[Tensor]]) -> Path:
    """One row per image (its columns side by side); smaller images are padded white to the largest."""
    size = (max(c.shape[-2] for r in rows for c in r), max(c.shape[-1] for r in rows for c in r))
    return save_grid(path, [torch.stack([_pad_white(c, size) for c in r]) for r in rows], text=png_text(GRID_RECORD))


def _center_crop(x: Tensor, size: tuple[int, int]) -> Tensor:
    h, w = x.shape[-2:]
    top, left = (h - size[0]) // 2, (w - size[1]) // 2
    return x[..., top:top + size[0], left:left + size[1]]


def _unit(img: np.ndarray) -> Tensor:
    """uint8 (H, W, 3) -> float64 (3, H, W) in [0, 1] (the metrics' range)."""
    return torch.from_numpy(np.array(img, copy=True)).permute(2, 0, 1).double() / 255.0


def _json_float(x: float) -> float | str:
    return x if math.isfinite(x) else ("inf" if x > 0 else "-inf" if x < 0 else "nan")


def evaluate(clean: Sequence[np.ndarray], degraded: Sequence[np.ndarray], refined: Sequence[np.ndarray],
             swd_kwargs: dict | None = None, inception_weights: str | None = None) -> dict:
    """Metrics of degraded-vs-clean and refined-vs-clean (:func:`refiner.metrics.evaluate_pairs`).

    Images of different sizes: SWD (and FID/KID) use all images center-cropped to the smallest common
    ``H x W``; PSNR/SSIM are always per image on the full image (their means are over images).
    """
    from refiner.metrics import evaluate_pairs, fid_kid, psnr, ssim

    crop = (min(c.shape[0] for c in clean), min(c.shape[1] for c in clean))
    stack = lambda imgs: torch.stack([_center_crop(_unit(i), crop) for i in imgs]).float()  # noqa: E731
    c, d, r = stack(clean), stack(degraded), stack(refined)
    result = evaluate_pairs(d, r, c, swd_kwargs=swd_kwargs)
    same_size = all(img.shape == clean[0].shape for img in clean)
    if not same_size:
        for key, images in (("degraded_vs_clean", degraded), ("refined_vs_clean", refined)):
            p = [float(psnr(_unit(a)[None], _unit(b)[None])[0]) for a, b in zip(images, clean)]
            s = [float(ssim(_unit(a)[None], _unit(b)[None])[0]) for a, b in zip(images, clean)]
            result[key].update(psnr=_json_float(sum(p) / len(p)), psnr_per_image=[_json_float(v) for v in p],
                               ssim=sum(s) / len(s), ssim_per_image=s)
    result["swd_crop_size"] = list(crop)
    result["all_same_size"] = same_size
    if inception_weights:
        result["degraded_vs_clean"].update(fid_kid(c, d, inception_weights))
        result["refined_vs_clean"].update(fid_kid(c, r, inception_weights))
    return result


def format_metrics_table(metrics: dict) -> str:
    d, r = metrics["degraded_vs_clean"], metrics["refined_vs_clean"]
    rows = [("PSNR (dB)", "psnr"), ("SSIM", "ssim"), ("SWD x1e3", "swd_x1e3"), ("FID", "fid"), ("KID", "kid_mean")]
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = [f"{'metric':<12}{'degraded':>12}{'refined':>12}"]
    lines += [f"{label:<12}{fmt(d[key]):>12}{fmt(r[key]):>12}" for label, key in rows if key in d]
    return "\n".join(lines)


def _check_settings(cfg: DictConfig) -> None:
    """Every setting's type and range, the device and the output folder, before any file is loaded. (The
    grid-dependent limits, t_start below the schedule's T, steps <= t_start + 1 and eta > 1, are checked by
    :func:`plan_steps` once the stages are known.)"""
    require_choice("mode", cfg.mode, MODES)
    require_choice("grid", cfg.grid, GRID_MODES)
    require_choice("spacing", cfg.spacing, SPACINGS)
    require_choice("pad_mode", cfg.pad_mode, PAD_MODES)
    require_choice("precision", cfg.get("precision", "fp32"), ("fp32", "bf16"))
    if cfg.inputs is None or cfg.inputs == "" or (not isinstance(cfg.inputs, str) and len(cfg.inputs) == 0):
        raise SampleError("inputs is not set: pass inputs=<folder|glob|[a.png,b.jpg]>")
    require_int("t_start", cfg.t_start, minimum=0)
    require_int("steps", cfg.steps, minimum=1)
    # eta in [0, 1] interpolates DDIM (0) and DDPM (1); eta > 1 only where the DDIM variance fits (plan_steps)
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

    Raises :class:`SampleError` / :class:`~refiner.checkpoints.CheckpointError` /
    ``FileNotFoundError`` for problems found before processing (bad chain, settings, no inputs).
    Per-image problems are collected in ``summary["failed"]`` instead.
    """
    from tqdm.auto import tqdm

    _check_settings(cfg)
    evaluate_mode = cfg.mode == "evaluate"
    device = torch.device(cfg.device)
    # 1. Checkpoints and the step plan: everything that can fail without looking at an image.
    allow_mismatch = bool(cfg.get("allow_first_stage_mismatch", False))
    stages = load_stages(list(cfg.stages), cfg.use_ema, cfg.trust_checkpoint, device, cfg.get("precision", "fp32"))
    ac, scale = check_compatible(stages, allow_first_stage_mismatch=allow_mismatch)
    plan = plan_steps(stages, ac, cfg.t_start, cfg.steps, cfg.spacing, cfg.eta, cfg.allow_outside_window)
    f4 = first_stage_from_config(cfg.first_stage.get("f4"), "f4", cfg.trust_checkpoint, device)
    check_compatible(stages, latent_channels=f4.embed_dim, allow_first_stage_mismatch=allow_mismatch)
    f4_fingerprint = check_first_stage(stages, f4, f"first_stage.f4.ckpt_path={cfg.first_stage.f4.ckpt_path}",
                                       allow_mismatch)
    f8 = first_stage_from_config(cfg.first_stage.get("f8"), "f8", cfg.trust_checkpoint, device) \
        if evaluate_mode else None
    refiner = Refiner(stages, f4, ac, scale, cfg.t_start, cfg.steps, cfg.eta, cfg.spacing, cfg.allow_outside_window,
                      cfg.seed, cfg.pad_mode, str(device), f8)
    inputs_spec = cfg.inputs if isinstance(cfg.inputs, str) else list(cfg.inputs)
    try:
        paths, ignored = scan_images(inputs_spec)
    except (FileNotFoundError, ValueError) as err:
        raise SampleError(f"inputs={inputs_spec!r}: {err}") from err
    output_dir = Path(cfg.output_dir)
    outputs = plan_outputs(paths, output_dir)
    settings = settings_digest(cfg, stages, f4_fingerprint, f8)
    existing = check_outputs(cfg, output_dir, paths, outputs, settings)
    output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output_dir / "config_resolved.yaml", f"{YAML_MARKER}\n{OmegaConf.to_yaml(cfg, resolve=True)}")
    columns = (["clean", "degraded"] if evaluate_mode else ["input"]) + [  # stages numbered in run order
        f"after stage {j + 1} ({stages[k].name}, window {stages[k].weights.window})"
        for j, k in enumerate(plan.segments)]
    log.info("%d images, %d steps t=%d..%d, stages in run order: %s; sides padded to multiples of %d",
             len(paths), len(plan.timesteps), plan.timesteps[0], plan.timesteps[-1], columns[-len(plan.segments):],
             refiner.multiple)

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

    for batch in _batches((it for it in map(load, order) if it is not None), cfg.batch_size):
        want_rows = grid_per_image or (grid_combined and len(got.grid_rows) < cfg.grid_max_images)
        try:
            inputs = refiner.degrade([it.image for it in batch]) if evaluate_mode else [it.image for it in batch]
            refined, stage_images = refiner.run_batch(inputs, [it.index for it in batch], with_stages=want_rows)
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
        "padded_to_multiple_of": refiner.multiple,
    }
    if grid_combined and got.grid_rows:
        name = "comparison_grid.png" if evaluate_mode else "grid.png"
        summary["grid"] = str(save_combined_grid(output_dir / name, [r for _, r in sorted(got.grid_rows,
                                                                                          key=lambda x: x[0])]))
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
