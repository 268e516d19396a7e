"""LoRA window checkpoints on disk: adapters plus a reference to their base, merged on load, or a peft folder.

A window trained with ``model.lora.rank > 0`` saves a Lightning ``.ckpt`` whose ``state_dict`` (EMA) and
``current_model_state`` (raw) hold only the adapter weights (``unet.<layer>.lora_{A,B}.default.weight``), and whose
``hyper_parameters`` hold ``lora`` (:class:`refiner.models.lora.LoraSettings`) and ``lora_base``:

* ``path``: the base it was trained on (absolute), anything ``init_from`` reads (our window ``.ckpt`` or
  ``.safetensors``, a CompVis LDM ``.ckpt``, a diffusers folder, or another LoRA window);
* ``use_ema``: whether the base's EMA weights were taken (``init_from_ema``);
* ``fingerprint``: :func:`refiner.formats.fingerprint.weights_fingerprint` of those base UNet weights.

:func:`load_base` re-reads the base and refuses it when its weights no longer match the fingerprint;
:func:`merge_adapters` returns plain UNet weights (base + adapters, merged by peft), which is what
:func:`refiner.formats.window_files.load_window_weights` hands to ``Chain.from_paths``, ``refine.py``, the
safetensors and diffusers exports. :func:`export_peft_adapter` writes a peft adapter folder.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

from torch import Tensor

from refiner.formats.fingerprint import weights_fingerprint
from refiner.formats.safe_load import CheckpointError

log = logging.getLogger(__name__)

LORA_KEY = "lora"
BASE_KEY = "lora_base"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def lora_settings(hp: Mapping[str, Any] | None):
    """The :class:`~refiner.models.lora.LoraSettings` recorded in ``hyper_parameters``, or None (a full window)."""
    from refiner.models.lora import LoraSettings

    return LoraSettings.from_config((hp or {}).get(LORA_KEY))


def base_reference(path: str | os.PathLike, state: Mapping[str, Tensor], use_ema: bool) -> dict:
    """What an adapter checkpoint records about its base (plain containers, for ``weights_only`` loading)."""
    return dict(path=str(Path(path).resolve()), use_ema=bool(use_ema), fingerprint=weights_fingerprint(state))


def load_base(reference: Any, source: str, trust_checkpoint: bool = False) -> dict[str, Tensor]:
    """The base UNet weights an adapter checkpoint ``source`` refers to, checked against its fingerprint."""
    from refiner.formats.init_from import load_init_weights

    if not isinstance(reference, Mapping) or not {"path", "fingerprint"} <= set(reference):
        raise CheckpointError(f"{source} holds LoRA adapters but no usable reference to their base "
                              f"(hyper_parameters['{BASE_KEY}'] = {reference!r})")
    path = Path(reference["path"])
    if not path.exists():
        raise CheckpointError(f"{source}: the base of its LoRA adapters, {path}, is not found; the adapters only "
                              "work on the weights they were trained on")
    state, _ = load_init_weights(path, use_ema=bool(reference.get("use_ema", True)), trust_checkpoint=trust_checkpoint)
    found = weights_fingerprint(state)
    if found != reference["fingerprint"]:
        raise CheckpointError(f"{source}: the base of its LoRA adapters, {path}, has changed (weights fingerprint "
                              f"{found}, the adapters were trained on {reference['fingerprint']}); refusing to apply "
                              "them to other weights")
    return state


def merge_adapters(adapters: Mapping[str, Tensor], hp: Mapping[str, Any], source: str,
                   trust_checkpoint: bool = False) -> dict[str, Tensor]:
    """Plain UNet weights: the base of ``hp[lora_base]`` with ``adapters`` (UNet-relative keys) merged in."""
    from refiner.models.lora import merged_unet_state

    base = load_base(hp.get(BASE_KEY), source, trust_checkpoint)
    return merged_unet_state(base, adapters, hp["unet"], lora_settings(hp), source)


def export_peft_adapter(ckpt_path: str | os.PathLike, out: str | os.PathLike, use_ema: bool = True,
                        trust_checkpoint: bool = False, force: bool = False) -> Path:
    """Write the adapters of a LoRA window checkpoint as a peft adapter folder: ``adapter_config.json`` (a
    ``LoraConfig`` whose ``base_model_name_or_path`` is the base's path), ``adapter_model.safetensors`` (keys
    ``base_model.model.<layer>.lora_{A,B}.weight``, as ``PeftModel.save_pretrained`` writes them) and a
    ``README.md`` model card. ``PeftModel.from_pretrained(UNetModel(...) with the base weights, out)`` loads it.

    Written beside ``out`` and renamed into place; an existing ``out`` is refused unless ``force``."""
    from safetensors.torch import save_file

    from refiner.formats.diffusers import _check_output, _fsync_tree, _replace_dir
    from refiner.formats.model_card import (
        card_entry,
        checkpoint_extra,
        write_model_card,
    )
    from refiner.formats.safe_load import safe_torch_load
    from refiner.formats.window_files import WINDOW_UNET_PREFIX, window_from_checkpoint
    from refiner.models.lora import ADAPTER_NAME, adapter_state

    out, ckpt_path = Path(out), Path(ckpt_path)
    _check_output(out, [ckpt_path], force)
    obj = safe_torch_load(ckpt_path, trust_checkpoint)
    hp = obj.get("hyper_parameters") if isinstance(obj, Mapping) else None
    settings = lora_settings(hp) if isinstance(hp, Mapping) else None
    if settings is None:
        raise CheckpointError(f"{ckpt_path} is not a LoRA window checkpoint (no hyper_parameters['{LORA_KEY}'] with "
                              "rank > 0); export a full window with refiner-checkpoint export or the diffusers export")
    weights = window_from_checkpoint(obj, str(ckpt_path), use_ema, trust_checkpoint)  # also checks the base
    states = obj.get("state_dict") if use_ema or "current_model_state" not in obj else obj["current_model_state"]
    tensors = {PEFT_PREFIX + k[len(WINDOW_UNET_PREFIX):].replace(f".{ADAPTER_NAME}.", "."): v.detach().contiguous()
               for k, v in adapter_state(states).items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        settings.peft_config(base=hp[BASE_KEY]["path"]).save_pretrained(str(tmp))  # writes adapter_config.json
        save_file(tensors, str(tmp / PEFT_WEIGHTS), metadata={"format": "pt"})
        extra = checkpoint_extra(obj)
        base = hp[BASE_KEY]
        usage = "\n".join([
            "```python", "from peft import PeftModel", "from refiner.formats.init_from import load_init_weights",
            "from refiner.models.unet import UNetModel", "",
            f"state, _ = load_init_weights({base['path']!r}, use_ema={bool(base.get('use_ema', True))})  # the base",
            f"base = UNetModel(**{dict(hp['unet'])!r})", "base.load_state_dict(state)",
            f'unet = PeftModel.from_pretrained(base, "{out.name}")', "```",
            "", f"Base weights fingerprint (refiner.formats.fingerprint.weights_fingerprint): "
                f"`{hp[BASE_KEY]['fingerprint']}`."])
        write_model_card(tmp / "README.md", [card_entry(ckpt_path, weights, extra)],
                         title=f"refiner LoRA adapters (rank {settings.rank}) for window {weights.window}", usage=usage)
        _fsync_tree(tmp)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote the peft adapter folder %s (%d tensors, rank %d)", out, len(tensors), settings.rank)
    return out

