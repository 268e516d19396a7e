"""refine.py, one bad item never stops a run (issue 21 item 4): images below the models' minimum size are padded to
it and refined, an error on one batch fails only its images, and a full disk is one line (exit 1) with the summary
written and no partial file left."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_refine import _compose, _rgb, _window_checkpoint, models  # noqa: F401 (models: the module fixture)

from refiner.apps.refine import run, settings
from refiner.cli import run_cli
from refiner.inference.min_size import padded_blocks
from refiner.inference.pipeline import Pipeline
from refiner.inference.refine_run import build_pipeline
from refiner.models.unet import tiny_unet_params

pytestmark = pytest.mark.usefixtures("one_thread")

# The test suite's 32-px windows (tests/pipeline.py TINY_UNET): one downsampling, 32 channels and 32 groups, so the
# deepest level's first norm has one channel per group.
SMALL_UNET = tiny_unet_params(image_size=8, channel_mult=[1, 2], attention_resolutions=[2])


@pytest.fixture(scope="module")
def small_window(models):  # noqa: F811
    return _window_checkpoint(models["dir"], (0, 500), "small_0_500.ckpt", unet_params=SMALL_UNET)


def _folder(d: Path, sizes: dict[str, tuple[int, int]]) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for i, (name, (h, w)) in enumerate(sizes.items()):
        Image.fromarray(_rgb(h, w, i)).save(d / name)
    return d


def test_padded_blocks_grow_the_longer_side():
    assert padded_blocks((1, 1), 2) == (1, 2)
    assert padded_blocks((2, 1), 2) == (2, 1)
    assert padded_blocks((3, 1), 4) == (4, 1)
    assert padded_blocks((1, 1), 1) == (1, 1)


def test_images_below_the_models_minimum_are_padded_and_refined(models, small_window, tmp_path):  # noqa: F811
    """8x8 px and smaller padded to one 8x8 block: the small windows' GroupNorm got one value per group (a traceback,
    nothing refined, no summary). Now the pipeline measures the minimum (two blocks) and pads to it."""
    sizes = {"a1.png": (1, 1), "b4.png": (4, 4), "c8.png": (8, 8), "d6x40.png": (6, 40), "e16.png": (16, 16)}
    d = _folder(tmp_path / "in", sizes)
    cfg = _compose(models, d, tmp_path / "out", "steps=2", "grid=none", f"experts=[{small_window}]")
    summary = run(cfg)
    assert summary["failed"] == [] and len(summary["processed"]) == len(sizes)
    for name, (h, w) in sizes.items():
        assert Image.open(tmp_path / "out" / name).size == (w, h)
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["failed"] == []


def test_the_minimum_is_measured_from_the_norms(models, small_window, tmp_path):  # noqa: F811
    small = settings(_compose(models, "x.png", tmp_path, f"experts=[{small_window}]"))
    pipe, _, _ = build_pipeline(small, torch.device("cpu"), (499, 499))
    assert (pipe.multiple, pipe.min_blocks) == (8, 2)
    assert pipe.padded_size(8, 8) == (8, 16) and pipe.padded_size(9, 3) == (16, 8)
    assert pipe.padded_size(6, 40) == (8, 40)  # five blocks: every norm sees more than one value
    demo = settings(_compose(models, "x.png", tmp_path))  # the demo-shaped windows: two channels per group there
    pipe, _, _ = build_pipeline(demo, torch.device("cpu"), (499, 499))
    assert (pipe.multiple, pipe.min_blocks) == (16, 1) and pipe.padded_size(1, 1) == (16, 16)


def test_an_error_on_one_batch_fails_only_its_images(models, tmp_path, monkeypatch):  # noqa: F811
    d = _folder(tmp_path / "in", {"a.png": (16, 16), "b.png": (24, 24), "c.png": (16, 16)})
    real = Pipeline.refine_images

    def refine_images(self, images, *args, **kwargs):
        if images[0].shape[0] == 24:
            raise IndexError("the models cannot take this one")
        return real(self, images, *args, **kwargs)

    monkeypatch.setattr(Pipeline, "refine_images", refine_images)
    summary = run(_compose(models, d, tmp_path / "out", "steps=2"))
    assert [Path(r["input"]).name for r in summary["processed"]] == ["a.png", "c.png"]
    assert [Path(r["input"]).name for r in summary["failed"]] == ["b.png"]
    assert "IndexError" in summary["failed"][0]["reason"] and "24x24" in summary["failed"][0]["reason"]
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["failed"] == summary["failed"]


class FullDisk:
    """``os.write`` on a disk that fills up while ``victim`` is written: ``budget`` bytes of it fit, then
    ``OSError(ENOSPC)``. Writes to other files go through."""

    def __init__(self, victim: str, budget: int):
        self.victim, self.budget, self.real = victim, budget, os.write

    def __call__(self, fd: int, data) -> int:
        name = Path(os.readlink(f"/proc/self/fd/{fd}")).name
        if not name.startswith(f".{self.victim}."):
            return self.real(fd, data)
        if self.budget <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = self.real(fd, bytes(data[:self.budget]))
        self.budget -= n
        return n


@pytest.mark.parametrize("victim", ["config_resolved.yaml", "b.png", "grid.png", "summary.json"])
def test_disk_full_is_one_line_exit_1_with_the_summary_and_no_partial_file(models, tmp_path, monkeypatch, capsys,
                                                                            victim):  # noqa: F811
    d = _folder(tmp_path / "in", {"a.png": (16, 16), "b.png": (16, 16), "c.png": (16, 16)})
    out = tmp_path / "out"
    cfg = _compose(models, d, out, "steps=2", "batch_size=1")
    monkeypatch.setattr(os, "write", FullDisk(victim, budget=100))
    assert run_cli(lambda: 1 if run(cfg)["failed"] else 0) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: disk full: ") and str(out / victim) in err[0]
    assert "wrote 100 of " in err[0] and "bytes" in err[0]
    assert list(out.rglob(".*.tmp")) == [] and not (out / victim).exists()
    if victim == "summary.json":
        assert "the summary could not be written either" in err[0]
        assert sorted(p.name for p in out.glob("?.png")) == ["a.png", "b.png", "c.png"]
        return
    summary = json.loads((out / "summary.json").read_text())
    if victim == "b.png":
        assert [Path(r["input"]).name for r in summary["processed"]] == ["a.png"]
        failed = {Path(r["input"]).name: r["reason"] for r in summary["failed"]}
        assert "wrote 100 of" in failed["b.png"] and "not refined" in failed["c.png"]
    elif victim == "grid.png":
        assert len(summary["processed"]) == 3 and summary["unwritten"][0]["file"] == str(out / "grid.png")
    else:  # the first write: nothing is refined, every image is reported
        assert summary["processed"] == [] and len(summary["failed"]) == 3
        assert all("not refined" in r["reason"] for r in summary["failed"]) and not list(out.glob("?.png"))
