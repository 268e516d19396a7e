"""What kind of checkpoint an object is (ours, CompVis LDM, first stage, bare UNet), strict state-dict loading
with readable mismatch reports, and small state-dict helpers shared by the format modules."""

from __future__ import annotations

from collections import Counter
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from refiner.formats.safe_load import CheckpointError
from refiner.models.unet import UNetModel

LDM_UNET_PREFIX = "model.diffusion_model."


def mismatch_report(expected: Mapping[str, torch.Size], state_dict: Mapping[str, Tensor]) -> str | None:
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k])}"
        for k in expected
        if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k])
    ]
    if not (missing or unexpected or shapes):
        return None
    parts = [f"{len(missing)} missing keys (first 5: {missing[:5]})", f"{len(unexpected)} unexpected keys "
             f"(first 5: {unexpected[:5]})"]
    if shapes:
        parts.append(f"{len(shapes)} shape mismatches (first 5: {'; '.join(shapes[:5])})")
    return ", ".join(parts)


def load_strict(module: nn.Module, state_dict: Mapping[str, Tensor], source: str) -> None:
    """``module.load_state_dict(state_dict, strict=True)``; a mismatch raises :class:`CheckpointError`
    naming ``source``, the architecture, missing/unexpected key counts (first 5 each) and shape mismatches."""
    expected = {k: v.shape for k, v in module.state_dict().items()}
    report = mismatch_report(expected, state_dict)
    if report:
        raise CheckpointError(f"{source} does not fit {type(module).__name__}: {report}")
    module.load_state_dict(state_dict, strict=True)


def check_unet_state(state_dict: Mapping[str, Tensor], unet_params: dict, source: str) -> None:
    """Check keys and shapes against ``UNetModel(**unet_params)`` built on the meta device (no memory)."""
    try:
        with torch.device("meta"):
            model = UNetModel(**unet_params)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{source}: its UNet parameters do not build a refiner UNetModel: {err}") from err
    report = mismatch_report({k: v.shape for k, v in model.state_dict().items()}, state_dict)
    if report:
        raise CheckpointError(f"{source} does not fit UNetModel(**{unet_params}): {report}")


def state_dict_of(obj: Any) -> dict | None:
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        return dict(obj["state_dict"])
    if isinstance(obj, Mapping) and obj and all(isinstance(v, Tensor) for v in obj.values()):
        return dict(obj)
    return None


def describe_checkpoint(obj: Any) -> str:
    """One of ``window``, ``compvis_ldm``, ``first_stage``, ``unet_state_dict``, ``unknown``."""
    hp = obj.get("hyper_parameters") if isinstance(obj, Mapping) else None
    if isinstance(hp, Mapping) and "window" in hp and "unet" in hp:
        return "window"
    sd = state_dict_of(obj)
    if sd is None:
        return "unknown"
    if any(k.startswith(LDM_UNET_PREFIX) for k in sd):
        return "compvis_ldm"
    if any(k.startswith(("encoder.", "decoder.", "quantize.")) for k in sd):
        return "first_stage"
    if "time_embed.0.weight" in sd:
        return "unet_state_dict"
    return "unknown"


_KIND_TEXT = {
    "window": "a refiner window checkpoint",
    "compvis_ldm": "a CompVis latent-diffusion checkpoint",
    "first_stage": "a first-stage (VQ) checkpoint (encoder./decoder./quantize. keys)",
    "unet_state_dict": "a bare UNet state dict",
    "unknown": "not a recognised checkpoint",
}


def kind_text(obj: Any) -> str:
    kind = describe_checkpoint(obj)
    if kind != "unknown":
        return _KIND_TEXT[kind]
    sd = state_dict_of(obj)
    if sd:
        names = sorted({k.split(".")[0] for k in sd})
    elif isinstance(obj, Mapping):
        names = sorted(map(str, obj))
    else:
        names = [type(obj).__name__]
    return f"{_KIND_TEXT['unknown']} (top-level names: {names[:6]})"


def strip_prefix(sd: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def prefix_summary(keys, depth: int = 2) -> str:
    counts = Counter(".".join(k.split(".")[:depth]) for k in keys)
    return ", ".join(f"{p}.* ({n})" for p, n in sorted(counts.items()))


def int_or_none(v) -> int | None:
    return None if v is None else int(v)
