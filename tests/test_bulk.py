"""Bulk refinement across processes (refiner.inference.distributed): sharding, merged summaries, resume after a kill.

The end-to-end tests launch ``torchrun --standalone --nproc_per_node=2 refine.py`` (gloo on CPU) with the tiny
models of test_sample and compare with a one-process run in this process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, compose_config
from PIL import Image
from test_refine import _overrides, _rgb, models  # noqa: F401  (module fixture)

from refiner.apps.refine import run
from refiner.errors import SettingError
from refiner.inference.distributed import Ranks, merge_summaries
from refiner.inference.outputs import pixels_match_record, read_png_record, remove_stale_temps

pytestmark = pytest.mark.usefixtures("one_thread")


def _images(tmp_path: Path, n: int) -> Path:
    d = tmp_path / "in"
    d.mkdir()
    for i in range(n):
        Image.fromarray(_rgb(16, 16, 40 + i)).save(d / f"im{i}.png")
    return d


def _torchrun(script: str, overrides: list[str], run_dir: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script, *overrides,
           f"hydra.run.dir={run_dir}"]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def _verified(out: Path) -> set[str]:
    """Names of the refined PNGs in ``out`` whose record verifies their pixels."""
    return {p.name for p in out.glob("im*.png") if pixels_match_record(p, read_png_record(p) or {})}


# ------------------------------------------------------------------------------------------ unit
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("count", [0, 1, 5, 8])
def test_shards_cover_every_index_exactly_once(world_size, count):
    shards = [Ranks(r, world_size).shard(count) for r in range(world_size)]
    assert sorted(i for s in shards for i in s) == list(range(count))
    assert all(i % world_size == r for r, s in enumerate(shards) for i in s)


def test_ranks_from_torchrun_environment():
    assert Ranks.from_env({}) == Ranks(0, 1, 0) and not Ranks.from_env({}).distributed
    ranks = Ranks.from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert ranks == Ranks(3, 4, 1) and ranks.distributed and not ranks.is_main
    assert ranks.device("cuda") == "cuda:1" and ranks.device("cpu") == "cpu"
    for env, message in (({"RANK": "2", "WORLD_SIZE": "2"}, r"RANK=2 is not in \[0, WORLD_SIZE=2\)"),
                         ({"RANK": "x"}, "must be integers")):
        with pytest.raises(SettingError, match=message):
            Ranks.from_env(env)


def test_merge_summaries_concatenates_and_sorts_the_ranks_records():
    base = {"written_by": "w", "ignored": [], "settings_digest": "d"}
    parts = [{**base, "processed": [{"input": "c"}, {"input": "a"}], "skipped": [], "failed": [{"input": "e"}],
              "outputs": ["c.png", "a.png"]},
             {**base, "processed": [{"input": "b"}], "skipped": [{"input": "d"}], "failed": [],
              "outputs": ["d.png", "b.png"]}]
    merged = merge_summaries(parts)
    assert [r["input"] for r in merged["processed"]] == ["a", "b", "c"]
    assert merged["skipped"] == [{"input": "d"}] and merged["failed"] == [{"input": "e"}]
    assert merged["outputs"] == ["a.png", "b.png", "c.png", "d.png"] and merged["settings_digest"] == "d"
    assert merged["ranks"] == [{"rank": 0, "processed": 2, "skipped": 0, "failed": 1},
                               {"rank": 1, "processed": 1, "skipped": 1, "failed": 0}]


def test_stale_temporary_files_of_a_killed_write_are_removed_and_nothing_else(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    stale = out / ".a.png.k2j3.tmp"
    keep = [out / ".b.png.k2j3.tmp", out / "a.png.tmp", out / ".a.png.tmpx", out / "a.png"]
    for p in [stale, *keep]:
        p.write_bytes(b"x")
    assert remove_stale_temps([out / "a.png", tmp_path / "missing" / "c.png"]) == [stale]
    assert not stale.exists() and all(p.exists() for p in keep)


# ------------------------------------------------------------------------------------------ torchrun
def test_two_ranks_refine_every_image_once_exactly_like_one_process(models, tmp_path):
    d = _images(tmp_path, 5)
    extra = ("batch_size=1", "seed=11")
    single = run(compose_config("refine", _overrides(models, d, tmp_path / "one", *extra), tmp_path / "one"))
    proc = _torchrun("refine.py", _overrides(models, d, tmp_path / "two", *extra), tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = tmp_path / "two"
    summary = json.loads((two / "summary.json").read_text())
    # exactly once: every input processed by exactly one rank (0, 2, 4 on rank 0; 1, 3 on rank 1)
    assert [r["input"] for r in summary["processed"]] == [str(d / f"im{i}.png") for i in range(5)]
    assert summary["ranks"] == [{"rank": 0, "processed": 3, "skipped": 0, "failed": 0},
                                {"rank": 1, "processed": 2, "skipped": 0, "failed": 0}]
    assert summary["outputs"] == [str(two / f"im{i}.png") for i in range(5)]
    assert summary["settings_digest"] == single["settings_digest"] and summary["written_by"] == single["written_by"]
    assert not list(two.glob("summary.rank-*")) and proc.stdout.count(" refined, ") == 1
    # identical to one process: same noise seed (seed + index) per image, same pixels, same merged grid
    for i in range(5):
        assert np.array_equal(_pixels(two / f"im{i}.png"), _pixels(tmp_path / "one" / f"im{i}.png"))
        assert read_png_record(two / f"im{i}.png")["noise_seed"] == 11 + i
    assert np.array_equal(_pixels(two / "grid.png"), _pixels(tmp_path / "one" / "grid.png"))


KILLER = """
import os, signal, sys

sys.path.insert(0, {root!r})
import refiner.io

real_replace = os.replace


def replace(src, dst):  # SIGKILL this rank just before its write of {name} becomes the real file
    if os.path.basename(str(dst)) == {name!r}:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst)


refiner.io.os.replace = replace
from refiner.apps.refine import main

main()
"""


@pytest.mark.slow
def test_a_killed_bulk_run_leaves_no_partial_png_and_the_rerun_does_only_the_missing_ones(models, tmp_path):
    d = _images(tmp_path, 6)
    out = tmp_path / "out"
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER.format(root=str(ROOT), name="im2.png"))  # rank 0's second image (0, 2, 4)
    overrides = _overrides(models, d, out, "batch_size=1")
    killed = _torchrun(str(killer), overrides, tmp_path / "run1")
    assert killed.returncode != 0
    assert not (out / "im2.png").exists() and list(out.glob(".im2.png.*.tmp"))  # killed mid-write
    assert "im0.png" in _verified(out)
    done = _verified(out)
    assert done == {p.name for p in out.glob("*.png")} - {"grid.png"}  # every PNG there is complete
    assert not (out / "summary.json").exists()

    proc = _torchrun("refine.py", overrides, tmp_path / "run2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    everything = {f"im{i}.png" for i in range(6)}
    assert {Path(r["input"]).name for r in summary["skipped"]} == done
    assert {Path(r["input"]).name for r in summary["processed"]} == everything - done
    assert _verified(out) == everything and not list(out.glob(".*.tmp"))
