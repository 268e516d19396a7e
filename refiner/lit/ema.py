"""EMA of what trains: Lightning's ``EMAWeightAveraging``, restricted to trainable parameters when some are frozen.

With every parameter trainable (a full finetune) :class:`TrainableEMA` *is* Lightning's callback: same updates,
same checkpoint layout (``state_dict`` = EMA weights, ``current_model_state`` = raw weights,
``averaging_state``), so earlier checkpoints resume unchanged.

When some parameters are frozen (LoRA: the whole base UNet), Lightning's callback would keep a full copy of the
model and average the frozen weights too (``d * w + (1 - d) * w`` is not always ``w`` in floating point, so the
"frozen" base would drift in the EMA copy). Here the average holds only the trainable parameters, in
``named_parameters`` order; checkpoints keep the same three entries, keyed by the parameter names, and the
module's own ``state_dict`` decides which names that are (the LoRA window saves only its adapters).
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import EMAWeightAveraging
from torch import nn
from torch.optim.swa_utils import AveragedModel


class _Params(nn.Module):
    """The given parameters (the same objects, not copies) as one module."""

    def __init__(self, params: list[nn.Parameter]):
        super().__init__()
        self.params = nn.ParameterList(params)


def trainable_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


class _TrainableAverage(AveragedModel):
    """An ``AveragedModel`` of the trainable parameters that Lightning's hooks may update with the whole module."""

    def update_parameters(self, model: nn.Module) -> None:
        if not isinstance(model, _Params):
            model = _Params([p for _, p in trainable_parameters(model)])
        super().update_parameters(model)


class TrainableEMA(EMAWeightAveraging):
    """``EMAWeightAveraging`` (same arguments) that averages only trainable parameters when some are frozen."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._names: list[str] | None = None  # None: every parameter trains, Lightning's behaviour

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        named = trainable_parameters(pl_module)
        if stage != "fit" or len(named) == len(list(pl_module.parameters())):
            self._names = None
            return super().setup(trainer, pl_module, stage)
        self._names = [n for n, _ in named]
        self._average_model = _TrainableAverage(_Params([p for _, p in named]), device=self._device or pl_module.device,
                                                use_buffers=self._use_buffers, **self._kwargs)

    def _pairs(self, pl_module: pl.LightningModule):
        assert self._average_model is not None
        live = trainable_parameters(pl_module)
        if [n for n, _ in live] != self._names:
            raise RuntimeError(f"the trainable parameters changed during the fit ({len(live)} now, "
                               f"{len(self._names or [])} at setup)")
        return zip(self._average_model.module.params, (p for _, p in live))

    def _swap_models(self, pl_module: pl.LightningModule) -> None:
        if self._names is None:
            return super()._swap_models(pl_module)
        for average, current in self._pairs(pl_module):
            tmp = average.data.clone()
            average.data.copy_(current.data)
            current.data.copy_(tmp)

    def _copy_average_to_current(self, pl_module: pl.LightningModule) -> None:
        if self._names is None:
            return super()._copy_average_to_current(pl_module)
        for average, current in self._pairs(pl_module):
            current.data.copy_(average.data)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        if self._names is None or self._average_model is None:
            return super().on_save_checkpoint(trainer, pl_module, checkpoint)
        if sorted(checkpoint["state_dict"]) != sorted(self._names):
            raise RuntimeError("TrainableEMA: the module's state_dict must hold exactly its trainable parameters "
                               f"when some are frozen; it holds {len(checkpoint['state_dict'])} entries for "
                               f"{len(self._names)} trainable parameters")
        checkpoint["current_model_state"] = checkpoint["state_dict"]
        checkpoint["state_dict"] = {n: p.detach().clone() for n, p in zip(self._names, self._average_model.module.params)}
        checkpoint["averaging_state"] = {k: v for k, v in self._average_model.state_dict().items()
                                         if not k.startswith("module.")}

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        if self._names is None or self._average_model is None:
            return super().on_load_checkpoint(trainer, pl_module, checkpoint)
        missing = [n for n in self._names if n not in checkpoint["state_dict"]]
        if missing:
            raise RuntimeError(f"the checkpoint's EMA weights lack {len(missing)} trainable parameters "
                               f"(first: {missing[:3]}); it was trained with other settings")
        state = {f"module.params.{i}": checkpoint["state_dict"][n] for i, n in enumerate(self._names)}
        # a checkpoint written without this callback: average and current weights both start from state_dict
        self._average_model.load_state_dict(state | checkpoint.get("averaging_state", {}), strict=False)
        pl_module.load_state_dict(checkpoint.get("current_model_state", checkpoint["state_dict"]))
