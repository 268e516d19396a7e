"""Our window experts on disk, read without following anything: the Lightning ``.ckpt`` a training run writes and the
``.safetensors`` export, and the checks a set of windows must pass to be used together.

* :class:`WindowWeights`: UNet weights plus window, schedule, parameterization, conditioning, scale factor and the
  first stage they were trained with (fingerprint and architecture). Its numbers are checked when it is made: a
  non-finite or out-of-range scale factor or schedule is refused there, not later as a diverged denoiser.
* :func:`stored_window`: a loaded ``.ckpt`` -> :class:`WindowWeights` with the UNet weights as stored (a LoRA window
  stores only adapters; :mod:`refiner.formats.loading` merges them onto their base).
* :func:`load_export` / :func:`window_metadata`: the ``.safetensors`` export, read and its metadata written.
* :func:`check_window_set`: one noise schedule, one scale factor, non-overlapping windows and one first stage; what
  :meth:`refiner.inference.chain.Chain.from_experts` and the diffusers export both require.
"""

from __future__ import annotations

import json
import math
import os
import warnings
import zipfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from refiner.diffusion import PARAMETERIZATIONS, ScheduleConfig, Window
from refiner.experts import Expert, check_experts
from refiner.formats.fingerprint import FINGERPRINT_KEY, check_architectures_agree, check_fingerprints_agree
from refiner.formats.kinds import (
    check_unet_state,
    describe_checkpoint,
    int_or_none,
    kind_text,
    load_strict,
    strip_prefix,
)
from refiner.formats.safe_load import CheckpointError, check_readable, is_safetensors
from refiner.models.unet import UNetModel
from refiner.settings import to_plain

WINDOW_UNET_PREFIX = "unet."
EXPORT_FORMAT = "refiner-window"
FIRST_STAGE_PARAMS_KEY = "first_stage_params"  # export metadata: the f4's {ddconfig, n_embed, embed_dim} as JSON
VQ_PARAM_KEYS = ("ddconfig", "n_embed", "embed_dim")


@dataclass
class WindowWeights:
    """A trained window expert: UNet weights and everything needed to rebuild and place it.

    ``first_stage_fingerprint`` (:mod:`refiner.formats.fingerprint`) and ``first_stage_params`` (``{ddconfig,
    n_embed, embed_dim}``) identify the VQ-f4 the window was trained with; None when the checkpoint does not record
    them. ``scale_factor`` and ``schedule`` are checked finite and in range on construction
    (:class:`~refiner.formats.safe_load.CheckpointError` naming ``source``)."""

    unet_state: dict[str, Tensor]
    unet_params: dict
    window: Window
    schedule: ScheduleConfig
    parameterization: str
    global_step: int | None
    source: str
    has_ema: bool
    conditioning: str | None = None
    scale_factor: float = 1.0
    first_stage_fingerprint: str | None = None
    first_stage_params: dict | None = None

    def __post_init__(self) -> None:
        check_scale_factor(self.scale_factor, self.source)
        check_schedule(self.schedule, self.source)

    def build_unet(self) -> UNetModel:
        """``UNetModel(**unet_params)`` with these weights loaded strictly, in eval mode."""
        model = UNetModel(**self.unet_params)
        load_strict(model, self.unet_state, self.source)
        return model.eval()


def check_scale_factor(value: Any, source: str) -> None:
    """Latents are multiplied by the scale factor before diffusion: it must be a finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise CheckpointError(f"{source}: scale_factor={value!r} is not a finite number > 0; the checkpoint's "
                              "metadata is damaged (latents would be scaled by it)")


def check_schedule(schedule: ScheduleConfig, source: str) -> None:
    """A schedule refinement can run on: a known kind, ``num_timesteps >= 2``, finite betas in (0, 1), and
    ``alphas_cumprod`` finite, in (0, 1] and strictly decreasing (more noise at every later t)."""
    s = schedule
    numbers = {"linear_start": s.linear_start, "linear_end": s.linear_end, "cosine_s": s.cosine_s}
    bad = {k: v for k, v in numbers.items()
           if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)}
    if bad or isinstance(s.num_timesteps, bool) or not isinstance(s.num_timesteps, int) or s.num_timesteps < 2:
        raise CheckpointError(f"{source}: schedule {s} has non-finite or non-numeric entries "
                              f"({bad or {'num_timesteps': s.num_timesteps}}); expected finite numbers and an integer "
                              "num_timesteps >= 2")
    if s.kind in ("linear", "linear_beta") and not (0 < s.linear_start < 1 and 0 < s.linear_end < 1):
        raise CheckpointError(f"{source}: schedule {s}: linear_start and linear_end must lie in (0, 1)")
    try:
        ab = s.alphas_cumprod()
    except ValueError as err:
        raise CheckpointError(f"{source}: schedule {s}: {err}") from err
    if not (torch.isfinite(ab).all() and (ab > 0).all() and (ab <= 1).all() and (ab[1:] < ab[:-1]).all()):
        raise CheckpointError(f"{source}: schedule {s} gives alphas_cumprod outside (0, 1] or not decreasing in t")


def _dataclass_from(cls, values: Any, what: str, source: str):
    if not isinstance(values, Mapping):
        raise CheckpointError(f"{source}: hyper_parameters['{what}'] must be a mapping, got {type(values).__name__}")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise CheckpointError(f"{source}: hyper_parameters['{what}'] has unknown fields {unknown}; expected {sorted(names)}")
    try:
        return cls(**dict(values))
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{source}: invalid hyper_parameters['{what}']: {err}") from err


def recorded_first_stage_params(hp: Mapping[str, Any]) -> dict | None:
    """The VQ params of the f4 a window was trained with, from its ``hyper_parameters['first_stage']``
    (``{ckpt_path, params}``; params may be wrapped as ``{target, params}``). None unless a checkpoint path and
    complete params (ddconfig, n_embed, embed_dim) are recorded: params without a checkpoint describe no trained
    f4."""
    block = hp.get("first_stage")
    if not isinstance(block, Mapping) or not block.get("ckpt_path"):
        return None
    params = block.get("params")
    if isinstance(params, Mapping) and "ddconfig" not in params and isinstance(params.get("params"), Mapping):
        params = params["params"]
    if not isinstance(params, Mapping) or not all(k in params for k in VQ_PARAM_KEYS):
        return None
    return to_plain({k: params[k] for k in VQ_PARAM_KEYS})


def stored_window(obj: Any, source: str, use_ema: bool) -> WindowWeights:
    """A window expert from a loaded Lightning checkpoint, its UNet weights as stored and not yet checked against
    the UNet: EMA (``state_dict``) by default, raw (``current_model_state``) with ``use_ema=False``. A LoRA window
    stores only its adapters; :func:`refiner.formats.loading.window_from_checkpoint` merges them onto their base and
    checks the result."""
    if describe_checkpoint(obj) != "window":
        raise CheckpointError(f"{source} is {kind_text(obj)}, not a refiner window checkpoint "
                              "(expected hyper_parameters with 'unet' and 'window')")
    hp = obj["hyper_parameters"]
    missing = [k for k in ("unet", "window", "schedule", "parameterization") if k not in hp]
    if missing:
        raise CheckpointError(f"{source}: hyper_parameters lack {missing}")
    if hp["parameterization"] not in PARAMETERIZATIONS:
        raise CheckpointError(f"{source}: parameterization {hp['parameterization']!r} not in {PARAMETERIZATIONS}")
    has_ema = isinstance(obj.get("current_model_state"), Mapping)
    if use_ema and not has_ema:
        warnings.warn(f"{source}: use_ema=True but the checkpoint holds no EMA weights "
                      "(no current_model_state); using the raw weights")
    states = obj["current_model_state"] if (has_ema and not use_ema) else obj.get("state_dict")
    unet_state = strip_prefix(states or {}, WINDOW_UNET_PREFIX)
    if not unet_state:
        raise CheckpointError(f"{source}: no '{WINDOW_UNET_PREFIX}*' weights in the checkpoint")
    return WindowWeights(
        unet_state=unet_state, unet_params=dict(hp["unet"]),
        window=_dataclass_from(Window, hp["window"], "window", source),
        schedule=_dataclass_from(ScheduleConfig, hp["schedule"], "schedule", source),
        parameterization=hp["parameterization"], global_step=int_or_none(obj.get("global_step")),
        source=source, has_ema=has_ema and use_ema, conditioning=hp.get("conditioning"),
        scale_factor=_number(hp.get("scale_factor", 1.0), "scale_factor", source),
        first_stage_fingerprint=_fingerprint_or_none(hp.get(FINGERPRINT_KEY), source),
        first_stage_params=recorded_first_stage_params(hp),
    )


def _number(value: Any, what: str, source: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise CheckpointError(f"{source}: {what}={value!r} is not a number") from None


def _fingerprint_or_none(value: Any, source: str) -> str | None:
    if value in (None, ""):
        return None
    if not isinstance(value, str):
        raise CheckpointError(f"{source}: {FINGERPRINT_KEY} must be a string, got {type(value).__name__}")
    return value


# ------------------------------------------------------------------------------------------ .safetensors export
def window_metadata(ww: WindowWeights) -> dict[str, str]:
    """The metadata (all strings) an exported ``.safetensors`` carries, read back by :func:`load_export`: format,
    format_version, window, schedule, unet_params (JSON), parameterization, conditioning, scale_factor,
    global_step, ema, first_stage_fingerprint ("" when unknown) and first_stage_params (JSON, "" when unknown)."""
    return {
        "format": EXPORT_FORMAT,
        "format_version": "1",
        "window": json.dumps(ww.window.to_dict()),
        "schedule": json.dumps(ww.schedule.to_dict()),
        "unet_params": json.dumps(ww.unet_params),
        "parameterization": ww.parameterization,
        "conditioning": json.dumps(ww.conditioning),
        "scale_factor": repr(ww.scale_factor),
        "global_step": "" if ww.global_step is None else str(ww.global_step),
        "ema": "true" if ww.has_ema else "false",
        FINGERPRINT_KEY: ww.first_stage_fingerprint or "",
        FIRST_STAGE_PARAMS_KEY: json.dumps(ww.first_stage_params) if ww.first_stage_params else "",
    }


def is_window_export(path: str | os.PathLike) -> bool:
    """True if ``path`` is a window export of ours (a safetensors file whose metadata says ``format:
    refiner-window``), read from its header only; what ``--force`` may replace."""
    from safetensors import SafetensorError, safe_open

    if not is_safetensors(Path(path), by_suffix=False):
        return False
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return (f.metadata() or {}).get("format") == EXPORT_FORMAT
    except (SafetensorError, OSError, ValueError):
        return False


def load_export(path: Path) -> WindowWeights:
    """A window expert from our ``.safetensors`` export (its weights and :func:`window_metadata`)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    check_readable(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        if zipfile.is_zipfile(path):
            raise CheckpointError(f"{path} is a torch (zip) checkpoint, not a safetensors file; rename it to .ckpt "
                                  "(refiner reads safetensors by content)") from err
        raise CheckpointError(f"{path} is truncated or corrupt (not a readable safetensors file: {err})") from err
    if meta.get("format") != EXPORT_FORMAT:
        raise CheckpointError(f"{path}: safetensors metadata format={meta.get('format')!r}, "
                              f"expected {EXPORT_FORMAT!r} (written by refiner export safetensors)")
    try:
        unet_params = json.loads(meta["unet_params"])
        fs_params = json.loads(meta[FIRST_STAGE_PARAMS_KEY]) if meta.get(FIRST_STAGE_PARAMS_KEY) else None
        ww = WindowWeights(
            unet_state=tensors, unet_params=unet_params,
            window=Window(**json.loads(meta["window"])), schedule=ScheduleConfig(**json.loads(meta["schedule"])),
            parameterization=meta["parameterization"],
            global_step=int(meta["global_step"]) if meta.get("global_step") else None,
            source=str(path), has_ema=meta.get("ema") == "true",
            conditioning=json.loads(meta.get("conditioning", "null")), scale_factor=float(meta.get("scale_factor", 1)),
            first_stage_fingerprint=_fingerprint_or_none(meta.get(FINGERPRINT_KEY), str(path)),
            first_stage_params=fs_params if isinstance(fs_params, dict) else None,
        )
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: broken refiner-window metadata ({type(err).__name__}: {err})") from err
    check_unet_state(tensors, unet_params, str(path))
    return ww


# ------------------------------------------------------------------------------------------ windows used together
class WindowSetError(CheckpointError):
    """Window experts that cannot be used together: another schedule, scale factor or overlapping windows."""


@dataclass(frozen=True)
class WindowSet:
    """What a set of window experts shares (:func:`check_window_set`)."""

    alphas_cumprod: Tensor
    scale_factor: float
    first_stage_fingerprint: str | None  # the common recorded f4 fingerprint, None when none is recorded
    first_stage_params: dict | None  # the common recorded f4 architecture, None when none is recorded


def _not_run(x: Tensor, t: Tensor) -> Tensor:
    raise AssertionError("check_window_set runs no model")


def check_window_set(weights: Sequence[WindowWeights], allow_first_stage_mismatch: bool = False) -> WindowSet:
    """Check that window experts can be used together and return what they share. Raises :class:`WindowSetError`
    when there are none, when they do not share one noise schedule (``alphas_cumprod``) and one ``scale_factor``,
    or when their windows overlap or sit on another T (:func:`refiner.experts.check_experts`); and
    :class:`~refiner.formats.fingerprint.FirstStageMismatch` when the first stages they recorded (fingerprint or
    architecture) differ (a warning with ``allow_first_stage_mismatch``)."""
    if not weights:
        raise WindowSetError("a chain needs at least one window expert")
    fingerprint = check_fingerprints_agree([(w.source, w.first_stage_fingerprint) for w in weights],
                                           allow_first_stage_mismatch)
    architecture = check_architectures_agree([(w.source, w.first_stage_params) for w in weights],
                                             allow_first_stage_mismatch)
    first = weights[0]
    ac = first.schedule.alphas_cumprod()
    for w in weights[1:]:
        other = w.schedule.alphas_cumprod()
        if other.shape != ac.shape or not torch.allclose(other, ac, rtol=0, atol=1e-9):
            raise WindowSetError(f"experts do not share a noise schedule: {first.source} has {first.schedule} but "
                                 f"{w.source} has {w.schedule}; chain only experts trained on the same schedule")
        if not math.isclose(w.scale_factor, first.scale_factor, rel_tol=1e-6):
            raise WindowSetError(f"experts do not share scale_factor: {first.source} has {first.scale_factor} but "
                                 f"{w.source} has {w.scale_factor}")
    try:
        check_experts([Expert(_not_run, w.window, w.parameterization, Path(w.source).name) for w in weights], ac)
    except (ValueError, TypeError) as err:
        raise WindowSetError(str(err)) from err
    return WindowSet(ac, float(first.scale_factor), fingerprint, architecture)
