"""Grouping a stream of items into batches of equal shape: only equally sized images or latents stack."""

from __future__ import annotations

from typing import Callable, Hashable, Iterable, Iterator, TypeVar

T = TypeVar("T")


def batches_by(items: Iterable[T], batch_size: int, key: Callable[[T], Hashable]) -> Iterator[list[T]]:
    """Consecutive ``items`` with equal ``key(item)`` (e.g. an image's shape) in batches of at most
    ``batch_size``, in input order; a new batch starts whenever the key changes. Lazy: an item is read only
    when the batch before it is complete."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    batch: list[T] = []
    batch_key: Hashable = None
    for item in items:
        k = key(item)
        if batch and (k != batch_key or len(batch) == batch_size):
            yield batch
            batch = []
        if not batch:
            batch_key = k
        batch.append(item)
    if batch:
        yield batch
