"""LoRA window checkpoints on disk: adapters plus a reference to their base, and their merge onto that base.

A window trained with ``model.lora.rank > 0`` saves a Lightning ``.ckpt`` whose ``state_dict`` (EMA) and
``current_model_state`` (raw) hold only the adapter weights (``unet.<layer>.lora_{A,B}.default.weight``), and whose
``hyper_parameters`` hold ``lora`` (:class:`refiner.models.lora.LoraSettings`) and ``lora_base``:

* ``path``: the base it was trained on (absolute), anything ``init_from`` reads (our window ``.ckpt`` or
  ``.safetensors``, a CompVis LDM ``.ckpt``, a diffusers folder, or another LoRA window);
* ``use_ema``: whether the base's EMA weights were taken (``init_from_ema``);
* ``fingerprint``: :func:`refiner.formats.fingerprint.weights_fingerprint` of those base UNet weights.

This module works on weights already in memory: :func:`check_base` refuses base weights that no longer match the
fingerprint, :func:`merged_unet_state` returns plain UNet weights (base + adapters, merged by peft), and
:func:`load_base_state` / :func:`load_adapter_state` load plain weights into a LoRA-wrapped UNet with readable
mismatch reports. Reading the base from disk (which may itself be a LoRA window) is
:func:`refiner.formats.loading.load_base`; the peft adapter folder is
:func:`refiner.formats.exports.export_peft_adapter`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from torch import Tensor, nn

from refiner.formats.fingerprint import weights_fingerprint
from refiner.formats.kinds import mismatch_report
from refiner.formats.safe_load import CheckpointError
from refiner.models.lora import LoraSettings, inject_lora, is_adapter_key, merge_lora, plain_key
from refiner.models.unet import UNetModel

LORA_KEY = "lora"
BASE_KEY = "lora_base"


def lora_settings(hp: Mapping[str, Any] | None) -> LoraSettings | None:
    """The :class:`~refiner.models.lora.LoraSettings` recorded in ``hyper_parameters``, or None (a full window)."""
    return LoraSettings.from_config((hp or {}).get(LORA_KEY))


def base_reference(path: str | os.PathLike, state: Mapping[str, Tensor], use_ema: bool) -> dict:
    """What an adapter checkpoint records about its base (plain containers, for ``weights_only`` loading)."""
    return dict(path=str(Path(path).resolve()), use_ema=bool(use_ema), fingerprint=weights_fingerprint(state))


def base_path(reference: Any, source: str) -> Path:
    """The existing base file or folder of a ``lora_base`` reference; a broken reference or a missing base raises
    :class:`~refiner.formats.safe_load.CheckpointError` naming the adapter checkpoint ``source``."""
    if not isinstance(reference, Mapping) or not {"path", "fingerprint"} <= set(reference):
        raise CheckpointError(f"{source} holds LoRA adapters but no usable reference to their base "
                              f"(hyper_parameters['{BASE_KEY}'] = {reference!r})")
    path = Path(reference["path"])
    if not path.exists():
        raise CheckpointError(f"{source}: the base of its LoRA adapters, {path}, is not found; the adapters only "
                              "work on the weights they were trained on")
    return path


def check_base(state: Mapping[str, Tensor], reference: Mapping, source: str) -> None:
    """Refuse base weights whose fingerprint is not the one the adapters of ``source`` were trained on."""
    found = weights_fingerprint(state)
    if found != reference["fingerprint"]:
        raise CheckpointError(f"{source}: the base of its LoRA adapters, {reference['path']}, has changed (weights "
                              f"fingerprint {found}, the adapters were trained on {reference['fingerprint']}); "
                              "refusing to apply them to other weights")


def merged_unet_state(base: Mapping[str, Tensor], adapters: Mapping[str, Tensor], unet_params: Mapping,
                      settings: LoraSettings, source: str) -> dict[str, Tensor]:
    """Plain UNet weights = ``base`` with ``adapters`` (keys as in the injected UNet) merged in (peft's merge)."""
    unet = inject_lora(UNetModel(**dict(unet_params)), settings)
    load_base_state(unet, base, source)
    load_adapter_state(unet, adapters, source)
    return merge_lora(unet)


def load_base_state(unet: nn.Module, state: Mapping[str, Tensor], source: str) -> None:
    """Load plain-layout base weights into an injected UNet, strictly over the base keys (the adapters are left
    as they are); a mismatch raises :class:`~refiner.formats.safe_load.CheckpointError` naming ``source``."""
    wrapped = {plain_key(k): k for k in unet.state_dict() if not is_adapter_key(k)}
    expected = {k: unet.state_dict()[w].shape for k, w in wrapped.items()}
    report = mismatch_report(expected, state)
    if report:
        raise CheckpointError(f"{source} does not fit the base UNet of these adapters: {report}")
    missing, unexpected = unet.load_state_dict({wrapped[k]: v for k, v in state.items()}, strict=False)
    assert not unexpected and all(is_adapter_key(k) for k in missing), (missing, unexpected)


def load_adapter_state(unet: nn.Module, adapters: Mapping[str, Tensor], source: str) -> None:
    """Load adapter weights into an injected UNet, strictly over the adapter keys."""
    expected = {k: v.shape for k, v in unet.state_dict().items() if is_adapter_key(k)}
    report = mismatch_report(expected, adapters)
    if report:
        raise CheckpointError(f"{source}: its LoRA adapters do not fit this UNet and model.lora settings: {report}")
    unet.load_state_dict(dict(adapters), strict=False)
