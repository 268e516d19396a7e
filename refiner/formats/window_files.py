"""Our window experts on disk: the Lightning ``.ckpt`` a training run writes and the ``.safetensors`` export.

* :func:`load_window_weights`: either file -> :class:`WindowWeights` (UNet weights plus window, schedule,
  parameterization, conditioning, scale factor and first-stage fingerprint). A LoRA window's ``.ckpt`` comes back
  with its adapters merged into its base (:mod:`refiner.formats.lora`).
* :func:`export_safetensors`: ``.ckpt`` -> one ``.safetensors`` file with that metadata, written atomically and
  never onto its input.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
import zipfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from torch import Tensor

from refiner.diffusion import PARAMETERIZATIONS, ScheduleConfig, Window
from refiner.formats.fingerprint import FINGERPRINT_KEY
from refiner.formats.kinds import (
    check_unet_state,
    describe_checkpoint,
    int_or_none,
    kind_text,
    load_strict,
    strip_prefix,
)
from refiner.formats.lora import lora_settings, merge_adapters
from refiner.formats.safe_load import CheckpointError, is_safetensors, safe_torch_load
from refiner.io import atomic_save, check_output_path

log = logging.getLogger(__name__)

WINDOW_UNET_PREFIX = "unet."
EXPORT_FORMAT = "refiner-window"


@dataclass
class WindowWeights:
    """A trained window expert: UNet weights and everything needed to rebuild and place it."""

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
    # refiner.formats.fingerprint of the VQ-f4 the window was trained with; None for older checkpoints
    first_stage_fingerprint: str | None = None

    def build_unet(self):
        """``UNetModel(**unet_params)`` with these weights loaded strictly, in eval mode."""
        from refiner.models.unet import UNetModel

        model = UNetModel(**self.unet_params)
        load_strict(model, self.unet_state, self.source)
        return model.eval()


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


def window_from_checkpoint(obj: Any, source: str, use_ema: bool, trust_checkpoint: bool = False) -> WindowWeights:
    """A window expert from a loaded Lightning checkpoint. A LoRA window (``hyper_parameters['lora']``) holds only
    adapters: its base is loaded (``trust_checkpoint`` applies to it) and the merged weights are returned
    (:mod:`refiner.formats.lora`)."""
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
    unet_params = dict(hp["unet"])
    if lora_settings(hp) is not None:
        unet_state = merge_adapters(unet_state, hp, source, trust_checkpoint)
    check_unet_state(unet_state, unet_params, source)
    return WindowWeights(
        unet_state=unet_state, unet_params=unet_params,
        window=_dataclass_from(Window, hp["window"], "window", source),
        schedule=_dataclass_from(ScheduleConfig, hp["schedule"], "schedule", source),
        parameterization=hp["parameterization"], global_step=int_or_none(obj.get("global_step")),
        source=source, has_ema=has_ema and use_ema, conditioning=hp.get("conditioning"),
        scale_factor=float(hp.get("scale_factor", 1.0)), first_stage_fingerprint=_fingerprint_or_none(
            hp.get(FINGERPRINT_KEY), source),
    )


def _fingerprint_or_none(value: Any, source: str) -> str | None:
    if value in (None, ""):
        return None
    if not isinstance(value, str):
        raise CheckpointError(f"{source}: {FINGERPRINT_KEY} must be a string, got {type(value).__name__}")
    return value


def load_window_checkpoint(path: str | os.PathLike, use_ema: bool = True,
                           trust_checkpoint: bool = False) -> WindowWeights:
    """A window expert from our Lightning ``.ckpt``: EMA weights (``state_dict``) by default, raw ones
    (``current_model_state``) with ``use_ema=False``."""
    return window_from_checkpoint(safe_torch_load(path, trust_checkpoint), str(path), use_ema, trust_checkpoint)


def export_safetensors(ckpt_path: str | os.PathLike, out_path: str | os.PathLike, use_ema: bool = True,
                       trust_checkpoint: bool = False, force: bool = False) -> Path:
    """Write a window expert's UNet weights (EMA by default) to one ``.safetensors`` file, atomically, and its
    model card beside it (:func:`refiner.formats.model_card.export_card_path`: ``w.safetensors`` ->
    ``w.README.md``; window, schedule, parameterization, first-stage fingerprint, training data, steps, validation).

    Neither output may be ``ckpt_path`` (compared by inode: any spelling, symlink or hard link), and neither may
    exist unless ``force`` (:func:`refiner.io.check_output_path`); all of this is checked before reading.

    Metadata (all strings): format, window, schedule, unet_params (JSON), parameterization,
    conditioning, scale_factor, global_step, ema, first_stage_fingerprint ("" when unknown), and the card's
    validation_metrics (JSON) and data_description (:func:`refiner.formats.model_card.export_metadata`).
    """
    from safetensors.torch import save_file

    from refiner.formats.model_card import (
        card_entry,
        checkpoint_extra,
        export_card_path,
        export_metadata,
        write_model_card,
    )

    out_path = check_output_path(out_path, inputs=[ckpt_path], force=force, what="export output")
    card_path = check_output_path(export_card_path(out_path), inputs=[ckpt_path], force=force, what="model card")
    obj = safe_torch_load(ckpt_path, trust_checkpoint)
    ww = window_from_checkpoint(obj, str(ckpt_path), use_ema, trust_checkpoint)
    entry = card_entry(ckpt_path, ww, checkpoint_extra(obj), name=out_path.name)
    tensors = {k: v.detach().contiguous().clone() for k, v in ww.unet_state.items()}
    metadata = {
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
        **export_metadata(entry),
    }
    atomic_save(out_path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    usage = "\n".join(["```python", "from refiner.formats.window_files import load_window_weights", "",
                       f"unet = load_window_weights({out_path.name!r}).build_unet()  # t in {ww.window}", "```", "",
                       f"As a expert of a chain: `python refine.py experts=[...,{out_path.name}]`."])
    write_model_card(card_path, [entry], title=f"refiner window expert {ww.window}", usage=usage,
                     library_name="refiner")
    log.info("exported %s (%s weights, window %s) to %s, model card %s", ckpt_path, "EMA" if ww.has_ema else "raw",
             ww.window, out_path, card_path)
    return out_path


def load_export(path: Path) -> WindowWeights:
    from safetensors import SafetensorError, safe_open

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
                              f"expected {EXPORT_FORMAT!r} (written by refiner.formats.window_files.export_safetensors)")
    try:
        unet_params = json.loads(meta["unet_params"])
        ww = WindowWeights(
            unet_state=tensors, unet_params=unet_params,
            window=Window(**json.loads(meta["window"])), schedule=ScheduleConfig(**json.loads(meta["schedule"])),
            parameterization=meta["parameterization"],
            global_step=int(meta["global_step"]) if meta.get("global_step") else None,
            source=str(path), has_ema=meta.get("ema") == "true",
            conditioning=json.loads(meta.get("conditioning", "null")), scale_factor=float(meta.get("scale_factor", 1)),
            first_stage_fingerprint=_fingerprint_or_none(meta.get(FINGERPRINT_KEY), str(path)),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: broken refiner-window metadata ({type(err).__name__}: {err})") from err
    check_unet_state(tensors, unet_params, str(path))
    return ww


def load_window_weights(path: str | os.PathLike, use_ema: bool = True, trust_checkpoint: bool = False) -> WindowWeights:
    """A window expert from an exported ``.safetensors`` file or our Lightning ``.ckpt``.

    ``use_ema`` only applies to ``.ckpt`` files (an export holds the weights it was written with).
    """
    path = Path(path)
    if is_safetensors(path):
        return load_export(path)
    return load_window_checkpoint(path, use_ema=use_ema, trust_checkpoint=trust_checkpoint)

