"""Lightning CheckpointIO that writes atomically and loads safely; a ModelCheckpoint whose last.ckpt is the newest.

Lightning's ``TorchCheckpointIO`` writes through an fsspec transaction without fsync and loads
with whatever ``weights_only`` the caller passed. Here a checkpoint is fsynced, then renamed into
place (a SIGKILL mid-write leaves the previous ``last.ckpt`` intact), and loading goes through
``refiner.formats.safe_load.safe_torch_load``: pickled code is refused unless ``trust_checkpoint=True``.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import ModelCheckpoint

from refiner.formats.safe_load import safe_torch_load
from refiner.io import atomic_save


class AtomicCheckpointIO(TorchCheckpointIO):
    def __init__(self, trust_checkpoint: bool = False):
        super().__init__()
        self.trust_checkpoint = trust_checkpoint

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO does not take storage_options")
        atomic_save(path, lambda tmp: torch.save(checkpoint, tmp))

    def load_checkpoint(
        self, path, map_location: Optional[Callable] = lambda storage, loc: storage, weights_only: Optional[bool] = None
    ) -> dict[str, Any]:

        return safe_torch_load(path, trust_checkpoint=self.trust_checkpoint, map_location=map_location)


class LastAndBestCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` is written at every validation, improved or not.

    Lightning 2.6 writes ``last`` only in a step where a top-k checkpoint was also written ("Only save last
    checkpoint if a checkpoint was actually saved in this step"): once ``val/loss`` stops improving,
    ``last.ckpt`` stays at the best step and a resume silently goes back in time. Here ``last`` always follows
    the newest validation. The state key is ``ModelCheckpoint``'s, so earlier checkpoints restore its state.
    """

    @property
    def state_key(self) -> str:
        return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)

    def on_validation_end(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)
        if (self.save_last and not self._should_skip_saving_checkpoint(trainer)
                and not self._should_save_on_train_epoch_end(trainer)):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
