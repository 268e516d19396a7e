"""Test-only Lightning callbacks, importable by subprocess runs through PYTHONPATH=tests."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytorch_lightning as pl
import torch


class SleepEachStep(pl.Callback):
    """Slows training down so a test can SIGKILL it mid-run (numerics are untouched)."""

    def __init__(self, seconds: float = 0.1):
        self.seconds = seconds

    def on_train_batch_end(self, *args, **kwargs):
        time.sleep(self.seconds)


class RecordRank(pl.Callback):
    """Writes, per rank, the sample indices it trained on and a hash of its final raw weights."""

    def __init__(self):
        self.indices: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.indices.extend(int(i) for i in batch["index"])

    def on_train_end(self, trainer, pl_module):
        digest = hashlib.sha256()
        for name, p in sorted(pl_module.state_dict().items()):
            digest.update(name.encode())
            digest.update(p.detach().cpu().contiguous().numpy().tobytes())
        out = Path(trainer.default_root_dir) / f"probe_rank{trainer.global_rank}.json"
        out.write_text(json.dumps({"rank": trainer.global_rank, "world_size": trainer.world_size,
                                   "indices": self.indices, "weights_sha256": digest.hexdigest(),
                                   "global_step": trainer.global_step}))


class RecordChainAndChanges(pl.Callback):
    """Writes, per rank, the validation samples whole-chain validation refined at the last validation, the
    parameters training changed (compared with their values at the start of training) and a hash of them."""

    def on_train_start(self, trainer, pl_module):
        self.before = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    def on_train_end(self, trainer, pl_module):
        from refiner.lit.chain_validation import ChainValidation

        chain = next(c for c in trainer.callbacks if isinstance(c, ChainValidation))
        after = pl_module.state_dict()
        changed = sorted(k for k, v in after.items() if not torch.equal(v, self.before[k]))
        digest = hashlib.sha256()
        for name in changed:
            digest.update(name.encode())
            digest.update(after[name].detach().cpu().contiguous().numpy().tobytes())
        out = Path(trainer.default_root_dir) / f"probe_chain_rank{trainer.global_rank}.json"
        out.write_text(json.dumps({"rank": trainer.global_rank, "world_size": trainer.world_size,
                                   "refined_indices": chain.refined_indices, "changed": changed,
                                   "changed_sha256": digest.hexdigest()}))


class MarkSteps(pl.Callback):
    """Writes the global step after every training batch to ``<default_root_dir>/steps.txt`` (a marker a test polls
    before signalling the run) and then sleeps, so that a signal lands during training."""

    def __init__(self, seconds: float = 0.2):
        self.seconds = seconds

    def on_train_batch_end(self, trainer, *args, **kwargs):
        with open(Path(trainer.default_root_dir) / "steps.txt", "a") as f:
            f.write(f"{trainer.global_step}\n")
        time.sleep(self.seconds)
