"""LoRA adapters on the CompVis-layout UNet (:class:`refiner.models.unet.UNetModel`), through peft.

LoRA (Hu et al. 2021) keeps a layer's weight ``W`` frozen and learns ``W + (alpha / rank) * B A`` with
``A: rank x in`` and ``B: out x rank`` (``B`` starts at zero, so training starts from the base exactly).
peft implements the layers (``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d``: for a conv, ``A`` is a conv with the
layer's kernel and ``rank`` outputs and ``B`` a 1x1 conv), their injection and their merge; this module only
chooses the layers, validates the settings and maps state-dict keys.

Default targets (``model.lora.targets``), matched as module-name suffixes (peft's ``target_modules`` list):

* ``qkv`` and ``proj_out``: every AttentionBlock's input and output projections (1x1 ``Conv1d``);
* ``in_layers.2`` and ``out_layers.3``: the two 3x3 convs of every ResBlock.

Left out by default: the stem and ``out`` convs, up/downsampling convs, 1x1 skip convs, the timestep MLP and
the ResBlocks' ``emb_layers.1`` (add them to ``targets`` if wanted), and every norm and bias.

After :func:`inject_lora` the UNet's keys change where a layer was wrapped: ``<layer>.weight`` becomes
``<layer>.base_layer.weight`` and the adapters are ``<layer>.lora_A.default.weight`` and
``<layer>.lora_B.default.weight``. :func:`plain_key` and :func:`base_state` translate from the wrapped layout to the
plain (CompVis) one; only adapter parameters have ``requires_grad``. Loading plain weights into a wrapped UNet, with
mismatch reports, and merging adapters onto a base are :mod:`refiner.formats.lora`'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from refiner.errors import SettingError
from refiner.settings import require_int, require_number

DEFAULT_TARGETS = ("qkv", "proj_out", "in_layers.2", "out_layers.3")
ADAPTER_MARK = ".lora_"
BASE_MARK = ".base_layer."
ADAPTER_NAME = "default"


@dataclass(frozen=True)
class LoraSettings:
    """``model.lora``: ``rank`` (0 = off), ``alpha`` (scale ``alpha / rank``; None = ``rank``, i.e. scale 1),
    ``targets`` (module-name suffixes) and ``dropout`` (on the adapter's input)."""

    rank: int
    alpha: float
    targets: tuple[str, ...] = DEFAULT_TARGETS
    dropout: float = 0.0

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> "LoraSettings | None":
        """Validated settings from a ``model.lora`` mapping, or None when LoRA is off (no mapping, rank 0)."""
        if cfg is None:
            return None
        if not isinstance(cfg, Mapping):
            raise SettingError(f"model.lora must be a mapping {{rank, alpha, targets, dropout}}, got {cfg!r}")
        unknown = sorted(set(cfg) - {"rank", "alpha", "targets", "dropout"})
        if unknown:
            raise SettingError(f"model.lora: unknown keys {unknown}; expected rank, alpha, targets, dropout")
        rank = require_int("model.lora.rank", cfg.get("rank", 0), minimum=0)
        if rank == 0:
            return None
        alpha = cfg.get("alpha")
        alpha = float(rank) if alpha is None else require_number("model.lora.alpha", alpha)
        if alpha <= 0:
            raise SettingError(f"model.lora.alpha must be > 0 (or null for alpha = rank), got {alpha}")
        targets = cfg.get("targets") or DEFAULT_TARGETS
        if isinstance(targets, str) or not all(isinstance(t, str) and t for t in targets):
            raise SettingError(f"model.lora.targets must be a list of module-name suffixes, got {targets!r}")
        dropout = require_number("model.lora.dropout", cfg.get("dropout", 0.0) or 0.0, minimum=0.0, maximum=0.999)
        return cls(rank=rank, alpha=alpha, targets=tuple(targets), dropout=dropout)

    def to_dict(self) -> dict:
        return dict(rank=self.rank, alpha=self.alpha, targets=list(self.targets), dropout=self.dropout)

    def peft_config(self, base: str | None = None):
        """The equivalent ``peft.LoraConfig`` (``base``: its ``base_model_name_or_path``)."""
        from peft import LoraConfig

        return LoraConfig(r=self.rank, lora_alpha=self.alpha, target_modules=list(self.targets),
                          lora_dropout=self.dropout, bias="none", base_model_name_or_path=base)


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def inject_lora(unet: nn.Module, settings: LoraSettings) -> nn.Module:
    """Wrap the target layers of ``unet`` in peft LoRA layers, in place, and freeze everything else.

    Every target must name at least one ``Linear``/``Conv1d``/``Conv2d`` of the UNet, else
    :class:`~refiner.errors.SettingError` lists the layers that exist."""
    from peft import inject_adapter_in_model

    layers = [n for n, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]
    for target in settings.targets:
        if not any(_matches(n, target) for n in layers):
            suffixes = sorted({".".join(n.split(".")[-2:]) if n.split(".")[-1].isdigit() else n.split(".")[-1]
                               for n in layers})
            raise SettingError(f"model.lora.targets: {target!r} matches no Linear/Conv layer of the UNet; "
                               f"layer names end in {suffixes}")
    inject_adapter_in_model(settings.peft_config(), unet, adapter_name=ADAPTER_NAME)
    for name, p in unet.named_parameters():  # peft marks only adapters trainable; make it a checked fact
        p.requires_grad_(is_adapter_key(name))
    return unet


def is_adapter_key(key: str) -> bool:
    """True for the LoRA parameters (``...lora_A.default.weight``, ``...lora_B.default.weight``)."""
    return ADAPTER_MARK in key


def adapter_state(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: v for k, v in state.items() if is_adapter_key(k)}


def plain_key(key: str) -> str:
    """A wrapped key in the plain layout: ``a.qkv.base_layer.weight`` -> ``a.qkv.weight``."""
    return key.replace(BASE_MARK, ".")


def base_state(unet: nn.Module) -> dict[str, Tensor]:
    """The UNet's non-adapter weights in the plain (CompVis) layout (after a merge: the merged weights)."""
    return {plain_key(k): v for k, v in unet.state_dict().items() if not is_adapter_key(k)}


def merge_lora(unet: nn.Module) -> dict[str, Tensor]:
    """Merge the adapters into their base layers (peft's ``LoraLayer.merge``) and return the merged weights in
    the plain layout; ``unet`` is left merged."""
    from peft.tuners.lora import LoraLayer

    with torch.no_grad():
        for module in unet.modules():
            if isinstance(module, LoraLayer):
                module.merge(safe_merge=True)
    return base_state(unet)
