"""Reading latent shards for training: expand shard specs, stream them with webdataset (node and worker splitting)
or load small sets into memory, decode and collate samples. Undecodable samples are skipped and counted by a
:class:`SkipCounter` rather than stopping training. Building them is :mod:`refiner.data.shards`.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import braceexpand
import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch import Tensor

from refiner.data.images import (
    to_tensor,
)
from refiner.data.shards import IMAGE_KEYS, LATENT_KEYS, SHARD_GLOB

log = logging.getLogger(__name__)


def expand_shards(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Shard paths from a folder (its ``shard-*.tar``, else ``*.tar``), a brace pattern
    (``dir/shard-{000000..000003}.tar``), a glob, or a list of these. Every file must exist.

    Raises:
        FileNotFoundError: naming the missing folder/file and how to create the shards.
    """
    hint = "build the shards first (the data build step, refiner.data.shards.build_shards)"
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    urls: list[str] = []
    for item in specs:
        text = str(item)
        if Path(text).is_dir():
            found = sorted(glob.glob(os.path.join(text, SHARD_GLOB))) or sorted(glob.glob(os.path.join(text, "*.tar")))
            if not found:
                raise FileNotFoundError(f"shard folder {text} contains no .tar shards; {hint}")
            urls += found
        elif "{" in text:
            expanded = list(braceexpand.braceexpand(text))
            missing = [u for u in expanded if not Path(u).is_file()]
            if missing:
                raise FileNotFoundError(f"{len(missing)} shard(s) of {text} do not exist (first: {missing[0]}); {hint}")
            urls += expanded
        elif any(c in text for c in "*?["):
            found = sorted(glob.glob(text))
            if not found:
                raise FileNotFoundError(f"shard pattern {text} matched no files; {hint}")
            urls += found
        elif Path(text).is_file():
            urls.append(text)
        else:
            raise FileNotFoundError(f"shards {text} do not exist; {hint}")
    if not urls:
        raise FileNotFoundError(f"no shards found in {spec}; {hint}")
    return urls


def check_enough_shards(num_shards: int, world_size: int, num_workers: int) -> None:
    """Every (rank, worker) reader needs at least one shard, or it silently yields nothing."""
    readers = world_size * max(1, num_workers)
    if num_shards < readers:
        raise ValueError(
            f"only {num_shards} shard(s) for {world_size} rank(s) x {max(1, num_workers)} dataloader worker(s) = "
            f"{readers} readers; some would get no data. Rebuild with more shards (smaller maxcount_per_shard) "
            f"or use fewer workers (data.num_workers), or mode='deterministic'."
        )


class SkipCounter:
    """webdataset exception handler that skips the bad sample/shard, counts it and logs a warning.

    ``skipped`` is the count, ``reasons`` the first ``keep`` messages. With DataLoader workers each
    worker process has its own copy, so the main process's counter stays at 0; the warnings are
    still logged from the workers.
    """

    def __init__(self, keep: int = 100):
        self.skipped = 0
        self.reasons: list[str] = []
        self.keep = keep

    def __call__(self, exn: BaseException) -> bool:
        self.skipped += 1
        reason = f"{type(exn).__name__}: {exn}"
        if len(self.reasons) < self.keep:
            self.reasons.append(reason)
        log.warning("skipping unreadable shard sample (%d so far): %s", self.skipped, reason)
        return True  # continue with the next sample

    def __repr__(self) -> str:
        return f"SkipCounter(skipped={self.skipped})"


class CorruptShardSample(ValueError):
    """A shard sample is missing an entry or holds something undecodable."""


def _decode_png(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return np.asarray(img.convert("RGB"))


def decode_sample(sample: dict, keys: Sequence[str] = LATENT_KEYS, images: bool = False) -> dict:
    """Raw webdataset sample -> ``{"__key__", <keys>: float32 (C,h,w), [clean, degraded: (3,H,W) in [-1,1]],
    [txt], [meta]}``. Hand-written instead of ``wds.decode`` so that only the needed entries are
    decoded and shapes/dtypes are validated (a bad entry raises ``CorruptShardSample`` naming shard and key)."""
    where = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
    out: dict[str, Any] = {"__key__": sample.get("__key__")}
    entry = "?"
    try:
        for k in keys:
            entry = f"{k}.pth"
            if f"{k}.pth" not in sample:
                raise CorruptShardSample(f"{where} has no {k}.pth entry")
            t = torch.load(io.BytesIO(sample[f"{k}.pth"]), map_location="cpu", weights_only=True)
            if not isinstance(t, Tensor) or t.ndim != 3 or not t.is_floating_point():
                raise CorruptShardSample(f"{where}: {k}.pth is not a float (C, h, w) tensor")
            out[k] = t.float()
        if images:
            for k in IMAGE_KEYS:
                entry = f"{k}.png"
                if f"{k}.png" not in sample:
                    raise CorruptShardSample(f"{where} has no {k}.png entry")
                out[k] = to_tensor(_decode_png(sample[f"{k}.png"]))
        entry = "txt/json"
        if "txt" in sample:
            out["txt"] = sample["txt"].decode("utf-8")
        if "json" in sample:
            out["meta"] = json.loads(sample["json"])
    except CorruptShardSample:
        raise
    except Exception as exn:  # torch/PIL/json decoding errors of a corrupt entry
        first_line = (str(exn).strip().splitlines() or [""])[0]
        raise CorruptShardSample(f"{where}: cannot decode {entry} ({type(exn).__name__}: {first_line})") from exn
    return out


def split_by_rank(src: Iterable, rank: int, world_size: int) -> Iterator:
    """Node splitter with an explicit rank (for tests / launchers without torch.distributed)."""
    yield from islice(src, rank, None, world_size)


def latent_dataset(
    urls: str | Sequence[str],
    shuffle_buffer: int = 1000,
    seed: int = 0,
    resampled: bool = False,
    epoch_length: int | None = None,
    keys: Sequence[str] = LATENT_KEYS,
    images: bool = False,
    counter: SkipCounter | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    shardshuffle: int | bool | None = None,
) -> wds.WebDataset:
    """A webdataset pipeline yielding decoded samples (see ``decode_sample``).

    Shards are split across ranks (``wds.split_by_node``: torch.distributed or RANK/WORLD_SIZE;
    or pass ``rank``/``world_size`` explicitly) and then across DataLoader workers. When
    ``resampled``, rank ``r`` resamples from its own slice ``urls[r::world_size]`` (so ranks never
    draw the same shard), and its workers thin out that rank's random shard draws. Check
    ``check_enough_shards`` first: a reader with no shard yields nothing. Undecodable samples and
    unreadable shards are skipped and counted by ``counter`` (a new ``SkipCounter`` if None,
    available as ``dataset.skip_counter``).

    Args:
        shuffle_buffer: sample shuffle buffer (0: no sample shuffling).
        seed: seed of the shard-order shuffle. The sample shuffle buffer is not seeded: stream
            mode is not reproducible (use the datamodule's deterministic mode for that).
        resampled: draw shards with replacement forever (webdataset ``resampled=True``); then
            ``epoch_length`` (samples per reader per epoch, via ``with_epoch``) should be set.
        shardshuffle: shard shuffle buffer; default ``min(100, len(urls))`` when ``shuffle_buffer``
            > 0, else ``False``. Ignored when resampled.
    """
    counter = counter if counter is not None else SkipCounter()
    url_list = list(braceexpand.braceexpand(urls)) if isinstance(urls, str) else [str(u) for u in urls]
    if shardshuffle is None:
        shardshuffle = min(100, len(url_list)) if shuffle_buffer > 0 else False
    if resampled:
        shardshuffle = False
    if rank is not None or world_size is not None:
        if rank is None or world_size is None or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
        nodesplitter = partial(split_by_rank, rank=rank, world_size=world_size)
    else:
        nodesplitter = wds.split_by_node
    if resampled:
        # Splitting a resampled (infinite, random) shard stream by node only thins out the random
        # draws; instead give each rank its own slice of the shard list to resample from.
        if rank is None:
            rank, world_size, _, _ = wds.utils.pytorch_worker_info()
        url_list = url_list[rank::world_size]
        if not url_list:
            raise ValueError(f"rank {rank} of {world_size} has no shard to resample from; see check_enough_shards")
        nodesplitter = None
    ds = wds.WebDataset(
        url_list,
        handler=counter,
        resampled=resampled,
        shardshuffle=shardshuffle,
        nodesplitter=nodesplitter,
        workersplitter=wds.split_by_worker,
        # shard counts are checked up front (check_enough_shards); an all-corrupt reader should be
        # skipped-and-reported, not crash with "No samples found"
        empty_check=False,
        seed=seed,
    )
    ds = ds.map(partial(decode_sample, keys=tuple(keys), images=images), handler=counter)
    if shuffle_buffer > 0:
        ds = ds.shuffle(shuffle_buffer)
    if epoch_length is not None:
        ds = ds.with_epoch(epoch_length)
    ds.skip_counter = counter
    return ds


def read_all_samples(
    urls: str | Sequence[str],
    keys: Sequence[str] = LATENT_KEYS,
    images: bool = False,
    max_samples: int | None = None,
    counter: SkipCounter | None = None,
) -> list[dict]:
    """Every sample of ``urls`` in shard order (no splitting, no shuffling): for validation and the
    deterministic in-memory training mode. Corrupt samples are skipped and counted in ``counter``;
    a summary warning names the samples this call skipped (a counter shared with earlier reads keeps
    counting, but their reasons are not repeated)."""
    counter = counter if counter is not None else SkipCounter()
    skipped_before, reasons_before = counter.skipped, len(counter.reasons)
    url_list = list(braceexpand.braceexpand(urls)) if isinstance(urls, str) else [str(u) for u in urls]
    ds = wds.WebDataset(
        url_list, handler=counter, shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False
    ).map(partial(decode_sample, keys=tuple(keys), images=images), handler=counter)
    samples = list(islice(ds, max_samples) if max_samples is not None else ds)
    skipped = counter.skipped - skipped_before  # a shared counter also holds earlier reads' skips: not ours
    if skipped:
        log.warning("read %d samples from %d shard(s) (%s), skipped %d: %s", len(samples), len(url_list),
                    url_list[0] if len(url_list) == 1 else f"{url_list[0]} ...", skipped,
                    counter.reasons[reasons_before:reasons_before + 3])
    return samples


def collate_samples(samples: Sequence[dict], keys: Sequence[str]) -> dict[str, Any]:
    """Stack ``keys`` of equally shaped samples into a batch dict (plus ``__key__`` as a list)."""
    batch: dict[str, Any] = {k: torch.stack([s[k] for s in samples]) for k in keys}
    batch["__key__"] = [s["__key__"] for s in samples]
    return batch
