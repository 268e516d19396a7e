"""Lightning CheckpointIO that writes atomically and loads with ``weights_only=True``.

Lightning's ``TorchCheckpointIO`` writes through an fsspec transaction without fsync and loads
with whatever ``weights_only`` the caller passed. Here a checkpoint is fsynced, then renamed into
place (a SIGKILL mid-write leaves the previous ``last.ckpt`` intact), and loading refuses pickled
code unless ``trust_checkpoint=True``.
"""

from __future__ import annotations

import os
import pickle
from typing import Any, Callable, Optional

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

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
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint not found: {path}")
        weights_only = not self.trust_checkpoint
        try:
            return torch.load(path, map_location=map_location, weights_only=weights_only)
        except pickle.UnpicklingError as err:
            raise ValueError(
                f"refusing to unpickle {path}: it holds objects other than tensors and plain containers. "
                f"If you trust this file, pass trust_checkpoint=true. ({str(err).splitlines()[0]})"
            ) from err
        except (RuntimeError, EOFError) as err:
            raise ValueError(f"checkpoint {path} is truncated or corrupt: {err}") from err
