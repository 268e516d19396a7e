"""LightningDataModule over latent shards (see ``refiner.data.shards``).

Two training modes:

* ``"deterministic"`` (default): all training latents are loaded into memory (precomputed f4
  latents are small: 3 x 16 x 16 floats for a 64 px crop) and the batch for global micro-step
  ``s`` on rank ``r`` of ``W`` is a pure function of ``(seed, r, s)``:

      p = (s * W + r) * B + j             global sample position, j = 0..B-1
      e = p // N                          epoch of that position (N samples)
      index = randperm_{seed, e}[p % N]   a fresh permutation per epoch

  Within an epoch the ranks therefore see disjoint samples, and resuming at step ``s`` yields
  exactly the stream that an uninterrupted run would have seen (bit-exact resume). The start step
  is ``trainer.global_step * accumulate_grad_batches`` (Lightning restores ``global_step`` from
  ``ckpt_path`` before it builds the dataloaders) unless ``start_step`` is given.
  The dataloader is infinite: stop training with ``max_steps`` and validate every N steps
  (``val_check_interval=N, check_val_every_n_epoch=None``).

* ``"stream"``: webdataset with resampled shards, ``with_epoch``, node/worker splitting and a
  shuffle buffer, for data too large for memory. Not bit-exact resumable (shard draws and the
  shuffle buffer are seeded from the process), and every (rank, worker) needs its own shard.

Validation is the same finite list on every rank (first ``val_max_samples`` samples in shard
order, with ``clean``/``degraded`` images for the image grid). Each rank computes identical
metrics, so Lightning's cross-rank mean equals the single-process value; the duplicated compute
is small for a validation set of this size and avoids uneven per-rank batches.
"""

from __future__ import annotations

import logging
import math
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from refiner.batching import batches_by
from refiner.data.latents import (
    SkipCounter,
    check_enough_shards,
    collate_samples,
    expand_shards,
    latent_dataset,
    read_all_samples,
)
from refiner.data.shards import IMAGE_KEYS, LATENT_KEYS, load_manifest
from refiner.errors import InputsFailed
from refiner.settings import require_int

log = logging.getLogger(__name__)

MODES = ("deterministic", "stream")


class NoReadableSamples(InputsFailed, ValueError):
    """Every sample of a shard set failed to decode (entry points exit 1)."""


def epoch_permutation(seed: int, epoch: int, n: int) -> Tensor:
    """``torch.randperm(n)`` from a generator seeded by (seed, epoch), mixed with numpy's SeedSequence
    so that neighbouring (seed, epoch) pairs give unrelated permutations."""
    mixed = int(np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0])
    gen = torch.Generator().manual_seed(mixed)
    return torch.randperm(n, generator=gen)


class DeterministicBatches(IterableDataset):
    """Infinite stream of whole batches; ``batch(step)`` is a pure function of (seed, rank, step).

    With ``k`` DataLoader workers, worker ``w`` yields steps ``start + w, start + w + k, ...``;
    the DataLoader takes one batch from each worker in turn, so the order is ``start, start+1, ...``.
    Use with ``DataLoader(batch_size=None)``.
    """

    def __init__(
        self, tensors: dict[str, Tensor], batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
        start_step: int = 0,
    ):
        sizes = {len(t) for t in tensors.values()}
        if len(sizes) != 1 or 0 in sizes:
            raise ValueError(f"tensors must be non-empty with equal lengths, got {[tuple(t.shape) for t in tensors.values()]}")
        if not 0 <= rank < world_size or batch_size < 1 or start_step < 0:
            raise ValueError(f"bad rank={rank} world_size={world_size} batch_size={batch_size} start_step={start_step}")
        self.tensors = tensors
        self.n = sizes.pop()
        self.batch_size, self.seed, self.rank, self.world_size, self.start_step = (
            batch_size, seed, rank, world_size, start_step,
        )
        self._perms: dict[int, Tensor] = {}

    def _perm(self, epoch: int) -> Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = epoch_permutation(self.seed, epoch, self.n)
        return self._perms[epoch]

    def indices(self, step: int) -> Tensor:
        first = (step * self.world_size + self.rank) * self.batch_size
        p = torch.arange(first, first + self.batch_size)
        epochs = p // self.n
        return torch.stack([self._perm(int(e))[int(q)] for e, q in zip(epochs, p % self.n)])

    def batch(self, step: int) -> dict[str, Tensor]:
        idx = self.indices(step)
        out = {k: t[idx] for k, t in self.tensors.items()}
        out["index"] = idx
        return out

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        step = self.start_step + worker
        while True:
            yield self.batch(step)
            step += num_workers


class _ListDataset(Dataset):
    def __init__(self, items: list):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


def bucket_batches(samples: Sequence[dict], batch_size: int, keys: Sequence[str]) -> list[dict]:
    """Consecutive samples of equal shape grouped into batches of at most ``batch_size`` (validation
    images may differ in size, and only equal shapes can be stacked)."""
    return [collate_samples(run, keys) for run in batches_by(samples, batch_size, key=lambda s: s[keys[0]].shape)]


class LatentDataModule(pl.LightningDataModule):
    """Training/validation batches of precomputed f4 latents.

    Args:
        train_shards: shard folder, brace pattern (``dir/shard-{000000..000009}.tar``) or list.
        val_shards: same, or ``None`` for no validation.
        batch_size: per-rank micro-batch size ``B``.
        num_workers: DataLoader workers for training (validation is read in-process).
        mode: ``"deterministic"`` (in-memory, bit-exact resumable) or ``"stream"`` (webdataset).
        seed: data-order seed.
        shuffle_buffer: stream mode sample shuffle buffer.
        val_batch_size: defaults to ``batch_size``.
        val_max_samples: cap on validation samples (first in shard order); ``None`` = all.
        start_step: deterministic mode: first micro-step to yield; ``None`` = derive from the trainer.
        epoch_length: stream mode samples per rank per epoch; ``None`` = manifest samples / world size.
    Batches are dicts: ``z_clean``, ``z_degraded`` (B, C, h, w) float32, plus ``index`` (deterministic)
    or ``__key__`` (stream); validation batches add ``clean``/``degraded`` (B, 3, H, W) in [-1, 1].
    """

    def __init__(
        self,
        train_shards: str | Sequence[str],
        val_shards: str | Sequence[str] | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        mode: str = "deterministic",
        seed: int = 0,
        shuffle_buffer: int = 1000,
        val_batch_size: int | None = None,
        val_max_samples: int | None = None,
        start_step: int | None = None,
        epoch_length: int | None = None,
    ):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"data mode must be one of {MODES}, got {mode!r}")
        require_int("batch_size", batch_size, minimum=1)
        require_int("num_workers", num_workers, minimum=0)
        self.train_shards, self.val_shards = train_shards, val_shards
        self.batch_size, self.num_workers, self.mode, self.seed = batch_size, num_workers, mode, seed
        self.shuffle_buffer = shuffle_buffer
        self.val_batch_size = val_batch_size or batch_size
        self.val_max_samples = val_max_samples
        self.start_step = start_step
        self.epoch_length = epoch_length
        self.keys = LATENT_KEYS
        self.train_urls: list[str] | None = None
        self.val_urls: list[str] | None = None
        self.train_tensors: dict[str, Tensor] | None = None
        self.val_batches: list[dict] | None = None
        self.skip_counter = SkipCounter()

    # -------------------------------------------------------------------------------------- helpers

    def _dist(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 1, 0
        return int(getattr(trainer, "world_size", 1)), int(getattr(trainer, "global_rank", 0))

    def resume_step(self) -> int:
        """First micro-step for the training stream (see the module docstring)."""
        if self.start_step is not None:
            return int(self.start_step)
        trainer = self.trainer
        if trainer is None:
            return 0
        return int(trainer.global_step) * int(getattr(trainer, "accumulate_grad_batches", 1) or 1)

    def _load_train_tensors(self) -> dict[str, Tensor]:
        samples = read_all_samples(self.train_urls, keys=self.keys, counter=self.skip_counter)
        if not samples:
            raise NoReadableSamples(f"no readable training samples in {self.train_shards} "
                                    f"({self.skip_counter.skipped} skipped)")
        shapes = {tuple(s[self.keys[0]].shape) for s in samples}
        if len(shapes) > 1:
            raise ValueError(
                f"training latents in {self.train_shards} have different shapes {sorted(shapes)}; deterministic mode "
                "stacks them into batches, so rebuild the shards with a fixed size (build_shards(size=...))"
            )
        return {k: torch.stack([s[k] for s in samples]) for k in self.keys}

    # -------------------------------------------------------------------------------------- Lightning hooks

    def setup(self, stage: str | None = None) -> None:
        world_size, _ = self._dist()
        if stage in (None, "fit"):
            self.train_urls = expand_shards(self.train_shards)
            if self.mode == "stream":
                check_enough_shards(len(self.train_urls), world_size, self.num_workers)
            elif self.train_tensors is None:
                self.train_tensors = self._load_train_tensors()
                log.info("loaded %d training latents %s", len(self.train_tensors[self.keys[0]]),
                         tuple(self.train_tensors[self.keys[0]].shape[1:]))
        if self.val_shards is not None and stage in (None, "fit", "validate") and self.val_batches is None:
            self.val_urls = expand_shards(self.val_shards)
            samples = read_all_samples(
                self.val_urls, keys=self.keys, images=True, max_samples=self.val_max_samples, counter=self.skip_counter
            )
            if not samples:
                raise NoReadableSamples(f"no readable validation samples in {self.val_shards}")
            self.val_batches = bucket_batches(samples, self.val_batch_size, (*self.keys, *IMAGE_KEYS))

    def train_dataloader(self) -> DataLoader:
        if self.train_urls is None:
            self.setup("fit")
        world_size, rank = self._dist()
        if self.mode == "deterministic":
            dataset = DeterministicBatches(
                self.train_tensors, self.batch_size, seed=self.seed, rank=rank, world_size=world_size,
                start_step=self.resume_step(),
            )
        else:
            dataset = self._stream_dataset(rank, world_size)
        return DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                          persistent_workers=False, pin_memory=False)

    def _stream_dataset(self, rank: int, world_size: int):
        samples_per_rank = self.epoch_length
        if samples_per_rank is None:
            manifest = load_manifest(Path(self.train_urls[0]).parent)
            if manifest is None:
                raise ValueError("stream mode needs epoch_length (samples per rank per epoch) when the shards have no manifest.json")
            samples_per_rank = max(1, manifest["num_samples"] // world_size)
        batches_per_worker = max(1, math.ceil(samples_per_rank / (self.batch_size * max(1, self.num_workers))))
        ds = latent_dataset(
            self.train_urls, shuffle_buffer=self.shuffle_buffer, seed=self.seed, resampled=True, keys=self.keys,
            counter=self.skip_counter, rank=rank, world_size=world_size,
        )
        collate = partial(collate_samples, keys=self.keys)
        return ds.batched(self.batch_size, collation_fn=collate, partial=False).with_epoch(batches_per_worker)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_shards is None:
            return []
        if self.val_batches is None:
            self.setup("validate")
        return DataLoader(_ListDataset(self.val_batches), batch_size=None, shuffle=False, num_workers=0)

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "mode": self.mode, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Warn when resuming with a data order that differs from the checkpoint's."""
        mine = self.state_dict()
        changed = {k: (v, mine.get(k)) for k, v in state.items() if mine.get(k) != v}
        if changed:
            log.warning("data settings differ from the checkpoint (old, new): %s; the data stream will not match", changed)
