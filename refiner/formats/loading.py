"""Denoiser weights from every file refiner reads, LoRA windows merged onto their base: the one place where loading
recurses.

A LoRA window stores only adapters and a reference to its base (:mod:`refiner.formats.lora`); that base is anything
``init_from`` reads, another LoRA window included, so reading a window may read a base, which may read a window, and
so on. That recursion is :func:`window_from_checkpoint` -> :func:`load_base` -> :func:`load_init_weights` ->
:func:`window_from_checkpoint`, all here; the modules below it read one file each and follow nothing.

* :func:`load_window_weights`: a window expert (our ``.ckpt`` or ``.safetensors`` export) -> :class:`WindowWeights`,
  with plain (merged) UNet weights; what ``Chain.from_paths``, ``refine.py`` and every export use.
* :func:`load_init_weights`: ``init_from`` for finetuning: UNet weights from our window files, a CompVis LDM
  ``.ckpt`` or a diffusers folder, dispatched by what the file is.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from torch import Tensor

from refiner.formats.compvis import ldm_from_checkpoint
from refiner.formats.diffusers.folders import load_diffusers_unet
from refiner.formats.fingerprint import first_stage_fingerprint
from refiner.formats.kinds import check_unet_state, describe_checkpoint, kind_text
from refiner.formats.lora import BASE_KEY, base_path, check_base, lora_settings, merged_unet_state
from refiner.formats.safe_load import CheckpointError, is_safetensors, safe_torch_load
from refiner.formats.window_files import WindowWeights, load_export, stored_window


def window_from_checkpoint(obj: Any, source: str, use_ema: bool, trust_checkpoint: bool = False) -> WindowWeights:
    """A window expert from a loaded Lightning checkpoint (:func:`refiner.formats.window_files.stored_window`), its
    UNet weights checked against ``UNetModel(**unet_params)``. A LoRA window (``hyper_parameters['lora']``) holds only
    adapters: its base is loaded (``trust_checkpoint`` applies to it) and the merged weights are returned."""
    ww = stored_window(obj, source, use_ema)
    hp = obj["hyper_parameters"]
    settings = lora_settings(hp)
    if settings is not None:
        base = load_base(hp.get(BASE_KEY), source, trust_checkpoint)
        merged = merged_unet_state(base, ww.unet_state, ww.unet_params, settings, source)
        ww = dataclasses.replace(ww, unet_state=merged)
    check_unet_state(ww.unet_state, ww.unet_params, source)
    return ww


def load_window_checkpoint(path: str | os.PathLike, use_ema: bool = True,
                           trust_checkpoint: bool = False) -> WindowWeights:
    """A window expert from our Lightning ``.ckpt``: EMA weights (``state_dict``) by default, raw ones
    (``current_model_state``) with ``use_ema=False``."""
    return window_from_checkpoint(safe_torch_load(path, trust_checkpoint), str(path), use_ema, trust_checkpoint)


def load_window_weights(path: str | os.PathLike, use_ema: bool = True, trust_checkpoint: bool = False) -> WindowWeights:
    """A window expert from an exported ``.safetensors`` file or our Lightning ``.ckpt``.

    ``use_ema`` only applies to ``.ckpt`` files (an export holds the weights it was written with).
    """
    path = Path(path)
    if is_safetensors(path):
        return load_export(path)
    return load_window_checkpoint(path, use_ema=use_ema, trust_checkpoint=trust_checkpoint)


def load_base(reference: Any, source: str, trust_checkpoint: bool = False) -> dict[str, Tensor]:
    """The base UNet weights the adapter checkpoint ``source`` refers to (``hyper_parameters['lora_base']``), read
    with :func:`load_init_weights` and checked against the recorded fingerprint."""
    path = base_path(reference, source)
    state, _ = load_init_weights(path, use_ema=bool(reference.get("use_ema", True)), trust_checkpoint=trust_checkpoint)
    check_base(state, reference, source)
    return state


def load_init_weights(path: str | os.PathLike, use_ema: bool = True,
                      trust_checkpoint: bool = False) -> tuple[dict[str, Tensor], dict]:
    """UNet weights to start finetuning from: our window ``.ckpt`` (a LoRA window merged), an exported
    ``.safetensors``, a CompVis LDM ``.ckpt`` (EMA by default) or a diffusers folder (pipeline or ``unet/``).
    Returns ``(unet_state_dict, info)``; ``info`` says where the weights came from (kind, used_ema, unet_params if
    known, window/global_step, scale_factor, first_stage_fingerprint)."""
    source = str(path)
    p = Path(path)
    if p.is_dir():  # a diffusers pipeline folder or its unet/
        return load_diffusers_unet(p)
    if is_safetensors(p):
        ww = load_export(p)
        return ww.unet_state, _window_info("safetensors", ww)
    obj = safe_torch_load(p, trust_checkpoint)
    kind = describe_checkpoint(obj)
    if kind == "window":
        ww = window_from_checkpoint(obj, source, use_ema, trust_checkpoint)
        return ww.unet_state, _window_info("window", ww)
    if kind == "compvis_ldm":
        ldm = ldm_from_checkpoint(obj, source, use_ema)
        return ldm.unet, dict(kind="compvis_ldm", source=source, used_ema=ldm.used_ema, unet_params=None,
                              global_step=ldm.global_step, scale_factor=ldm.scale_factor,
                              first_stage_fingerprint=first_stage_fingerprint(ldm.first_stage)
                              if ldm.first_stage else None)
    if kind == "first_stage":
        raise CheckpointError(f"{source} is a first-stage (VQ) checkpoint, not a denoiser; "
                              "use it as the first stage (first_stage.f4.ckpt_path), not as init_from")
    raise CheckpointError(f"{source} is {kind_text(obj)}; init_from accepts a refiner window checkpoint, "
                          "an exported .safetensors or a CompVis LDM checkpoint")


def _window_info(kind: str, ww: WindowWeights) -> dict:
    return dict(kind=kind, source=ww.source, used_ema=ww.has_ema, unet_params=ww.unet_params,
                window=str(ww.window), global_step=ww.global_step, parameterization=ww.parameterization,
                scale_factor=ww.scale_factor, first_stage_fingerprint=ww.first_stage_fingerprint)

