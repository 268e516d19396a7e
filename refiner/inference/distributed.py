"""Bulk refinement across processes: ``torchrun --nproc_per_node=N refine.py inputs=... output_dir=...``.

**Engine: torchrun + ``torch.distributed`` (gloo).** torchrun starts the N processes and gives each ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` (and, across nodes, ``--nnodes``/``--rdzv_endpoint``); a failed rank makes it
stop the others. The process group is only used for small Python objects (conflict messages, grid rows, the
merged summary) and barriers, so it is always gloo, which runs on CPU and alongside CUDA; images never travel
between ranks. Lightning's ``Trainer.predict`` was the other candidate, but its ``DistributedSampler`` pads the
dataset to a multiple of the world size by repeating images (so some would be refined twice, against the
exactly-once rule), and refine.py's per-image work (resume records, atomic PNGs, failures reported per file)
does not fit a ``predict_step``.

* **Sharding** (:meth:`Ranks.shard`): image ``i`` of the sorted input list goes to rank ``i % world_size``, so
  every image is refined exactly once and keeps its noise seed ``seed + i``: results equal a one-process run's
  for any eta and batch size (every draw of image ``i``, eta > 0 step noise included, comes from its own generator).
* **Resume** works per rank: each rank checks and skips its own finished outputs (:mod:`refiner.inference.outputs`);
  a conflict found by any rank stops every rank before any compute (:meth:`Ranks.agree`).
* **Summary**: each rank writes ``summary.rank-<r>-of-<n>.json`` atomically; after a barrier rank 0 merges them
  into ``summary.json`` (:func:`merge_summaries`), draws the combined grid from every rank's rows, and removes
  the partial files. ``mode=evaluate`` is one-process only (its metrics need every image in one place).

Without torchrun (no ``WORLD_SIZE`` or ``WORLD_SIZE=1``) nothing here starts a process group.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TypeVar

from refiner.errors import RefineError, SettingError
from refiner.io import atomic_write_text

T = TypeVar("T")

# A rank that finishes its shard early waits at the barrier for the slowest one: hours for large shards.
BARRIER_TIMEOUT = datetime.timedelta(hours=48)


def partial_summary_name(rank: int, world_size: int) -> str:
    return f"summary.rank-{rank}-of-{world_size}.json"


@dataclass(frozen=True)
class Ranks:
    """This process's place in a torchrun job (``rank`` 0 of 1 when run alone)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls, env: dict | None = None) -> "Ranks":
        """From torchrun's ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; :class:`SettingError` if they are not
        consistent."""
        env = os.environ if env is None else env
        try:
            ranks = cls(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))
        except ValueError as err:
            raise SettingError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers (set by torchrun): {err}") from err
        if ranks.world_size < 1 or not 0 <= ranks.rank < ranks.world_size:
            raise SettingError(f"RANK={ranks.rank} is not in [0, WORLD_SIZE={ranks.world_size})")
        return ranks

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, device: str) -> str:
        """``cuda`` becomes ``cuda:<LOCAL_RANK>`` in a multi-process job (one GPU per process)."""
        return f"cuda:{self.local_rank}" if self.distributed and device == "cuda" else device

    def shard(self, count: int) -> list[int]:
        """The indices of ``range(count)`` this rank refines: ``i % world_size == rank``."""
        return list(range(self.rank, count, self.world_size))

    @contextlib.contextmanager
    def group(self) -> Iterator["Ranks"]:
        """The gloo process group for the job's duration (nothing when run alone)."""
        if not self.distributed:
            yield self
            return
        import torch.distributed as dist

        dist.init_process_group("gloo", rank=self.rank, world_size=self.world_size, timeout=BARRIER_TIMEOUT)
        try:
            yield self
        finally:
            dist.destroy_process_group()

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def all_gather(self, obj: T) -> list[T]:
        """Every rank's ``obj``, in rank order."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def gather(self, obj: T) -> list[T] | None:
        """Every rank's ``obj`` on rank 0 (in rank order), None elsewhere."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out: list[Any] | None = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def agree(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on every rank; if it raised a :class:`SettingError` on any rank, raise it on all of them (so
        no rank starts work another rank refused, and none waits forever at a barrier)."""
        result, message = None, None
        try:
            result = fn()
        except SettingError as err:
            if not self.distributed:
                raise
            message = str(err)
        messages = [m for m in self.all_gather(message) if m]
        if messages:
            raise RefineError(messages[0])
        return result

    def check_same(self, name: str, value: Any, hint: str = "") -> None:
        """Every rank must have the same ``value`` of setting ``name``."""
        values = self.all_gather(value)
        if any(v != values[0] for v in values):
            raise RefineError(f"{name} differs between ranks ({values}); {hint}".rstrip("; "))


def merge_summaries(parts: Sequence[dict]) -> dict:
    """One summary from the ranks' partial summaries (rank order): the per-image lists are concatenated and
    sorted by input, ``ranks`` lists what each rank did; everything else is rank 0's (the same on every rank)."""
    merged = dict(parts[0])
    for key, sort_key in (("processed", "input"), ("skipped", "input"), ("failed", "input")):
        merged[key] = sorted((r for p in parts for r in p[key]), key=lambda r: r[sort_key])
    merged["outputs"] = sorted(o for p in parts for o in p["outputs"])
    merged["unwritten"] = [r for p in parts for r in p.get("unwritten", [])]  # e.g. a rank's per-image grids
    merged["ranks"] = [{"rank": k, "processed": len(p["processed"]), "skipped": len(p["skipped"]),
                        "failed": len(p["failed"])} for k, p in enumerate(parts)]
    return merged


def write_partial_summary(ranks: Ranks, output_dir: Path, summary: dict) -> Path:
    path = output_dir / partial_summary_name(ranks.rank, ranks.world_size)
    atomic_write_text(path, json.dumps(summary, indent=2))
    return path


def read_partial_summaries(output_dir: Path, world_size: int) -> list[dict]:
    return [json.loads((output_dir / partial_summary_name(k, world_size)).read_text(encoding="utf-8"))
            for k in range(world_size)]
