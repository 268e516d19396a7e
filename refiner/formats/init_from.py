"""``init_from`` for finetuning: UNet weights from any denoiser checkpoint refiner reads (our window ``.ckpt`` or
``.safetensors``, a CompVis LDM ``.ckpt``, a diffusers folder), dispatched by what the file is."""

from __future__ import annotations

import os
from pathlib import Path

from torch import Tensor

from refiner.formats.compvis import ldm_from_checkpoint
from refiner.formats.fingerprint import first_stage_fingerprint
from refiner.formats.kinds import describe_checkpoint, kind_text
from refiner.formats.safe_load import CheckpointError, is_safetensors, safe_torch_load
from refiner.formats.window_files import (
    WindowWeights,
    load_export,
    window_from_checkpoint,
)


def load_init_weights(path: str | os.PathLike, use_ema: bool = True,
                      trust_checkpoint: bool = False) -> tuple[dict[str, Tensor], dict]:
    """UNet weights to start finetuning from: our window ``.ckpt``, an exported ``.safetensors``, a
    CompVis LDM ``.ckpt`` (EMA by default) or a diffusers folder (pipeline or ``unet/``). Returns ``(unet_state_dict, info)``; ``info`` says where
    the weights came from (kind, used_ema, unet_params if known, window/global_step)."""
    source = str(path)
    p = Path(path)
    if p.is_dir():  # a diffusers pipeline folder or its unet/
        from refiner.formats.diffusers import load_diffusers_unet

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
                              "use it as the first stage (load_first_stage), not as init_from")
    raise CheckpointError(f"{source} is {kind_text(obj)}; init_from accepts a refiner window checkpoint, "
                          "an exported .safetensors or a CompVis LDM checkpoint")


def _window_info(kind: str, ww: WindowWeights) -> dict:
    return dict(kind=kind, source=ww.source, used_ema=ww.has_ema, unet_params=ww.unet_params,
                window=str(ww.window), global_step=ww.global_step, parameterization=ww.parameterization,
                scale_factor=ww.scale_factor, first_stage_fingerprint=ww.first_stage_fingerprint)
