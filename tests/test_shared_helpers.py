"""Helpers that used to exist in several copies: batching by size (refiner.batching) and non-finite floats in
JSON (refiner.io.json_float)."""

from __future__ import annotations

import json
import math

import pytest

from refiner.batching import batches_by
from refiner.io import json_float


def test_batches_by_groups_consecutive_equal_keys_up_to_batch_size():
    items = [(0, "a"), (1, "a"), (2, "a"), (3, "b"), (4, "a"), (5, "a")]
    got = [[i for i, _ in batch] for batch in batches_by(items, 2, key=lambda it: it[1])]
    assert got == [[0, 1], [2], [3], [4, 5]]
    assert list(batches_by([], 3, key=len)) == []
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        list(batches_by(items, 0, key=len))


def test_batches_by_reads_lazily():
    pulled = []

    def source():
        for i in range(5):
            pulled.append(i)
            yield i

    batches = batches_by(source(), 2, key=lambda i: 0)
    assert next(batches) == [0, 1] and pulled == [0, 1, 2]  # the third item was needed to close the batch


@pytest.mark.parametrize("value, want", [(1.5, 1.5), (math.inf, "inf"), (-math.inf, "-inf"), (math.nan, "nan")])
def test_json_float_names_non_finite_values(value, want):
    assert json_float(value) == want
    json.dumps(json_float(value), allow_nan=False)  # valid JSON either way


def test_metrics_write_infinite_psnr_as_json_text():
    """refiner.metrics goes through json_float (its own copy used to turn NaN into "-inf")."""
    import torch

    from refiner.metrics import compare

    a = torch.rand(1, 3, 16, 16)
    out = compare(a, a.clone())
    assert out["psnr"] == "inf" and out["psnr_per_image"] == ["inf"]
