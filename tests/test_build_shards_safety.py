"""Issue 9, classes 7-9 for build_shards: all splits checked first, each split installed atomically, every
PIL format accepted and every passed-over file reported, warnings that name their file."""

import errno
import json
import logging
import os
import signal
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_config
from PIL import Image

from refiner.cli import run_cli
from refiner.data import shards as shards_mod
from refiner.data.shards import NoReadableImages, ShardBuildError, build_shards, load_manifest
from refiner.models.vq import VQModel, tiny_ddconfig


@pytest.fixture(scope="module")
def vqs():
    torch.manual_seed(0)
    return (VQModel(tiny_ddconfig(4, resolution=32), n_embed=64, embed_dim=3).eval(),
            VQModel(tiny_ddconfig(8, resolution=32), n_embed=64, embed_dim=4).eval())


def _images(d: Path, n=3, fmt="png") -> Path:
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(str(d)))
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(d / f"im{i}.{fmt}")
    return d


def _tree(d: Path) -> dict:
    return {str(p.relative_to(d)): p.read_bytes() if p.is_file() else None for p in sorted(d.rglob("*"))}


def test_every_split_is_checked_before_any_is_written(tmp_path):
    from refiner.apps.build_shards import run

    train, val = _images(tmp_path / "train"), _images(tmp_path / "val")
    taken = tmp_path / "shards" / "val"
    taken.mkdir(parents=True)
    (taken / "shard-000000.tar").write_bytes(b"old")
    cfg = compose_config("build_shards", [
        f"splits.train.images={train}", f"splits.train.out={tmp_path / 'shards' / 'train'}",
        f"splits.val.images={val}", f"splits.val.out={taken}",
        "first_stage.f4.ckpt_path=/nonexistent/f4.ckpt"], tmp_path / "run")  # never loaded: refused first
    with pytest.raises(FileExistsError, match=r"splits\.val\.out.*1 shards.*overwrite=true"):
        run(cfg)
    assert not (tmp_path / "shards" / "train").exists()
    cfg.splits.val.out = str(tmp_path / "shards" / "train")
    with pytest.raises(ShardBuildError, match="same folder"):
        run(cfg)


def test_failed_build_leaves_no_folder_and_a_crash_keeps_the_old_set(tmp_path, vqs, monkeypatch):
    f4, f8 = vqs
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"")
    with pytest.raises(NoReadableImages):
        build_shards(bad, tmp_path / "new" / "deep" / "out", f4, f8, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]  # no out, no parents, no temp folder

    images = _images(tmp_path / "images", n=4)
    out = tmp_path / "out"
    build_shards(images, out, f4, f8, maxcount_per_shard=2, progress=False)
    before = _tree(out)
    calls = {"n": 0}
    real = shards_mod._encode_batch

    def dies_on_second_batch(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed mid-build")
        return real(*a, **k)

    monkeypatch.setattr(shards_mod, "_encode_batch", dies_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        build_shards(images, out, f4, f8, maxcount_per_shard=1, batch_size=2, overwrite=True, progress=False)
    assert _tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "images", "out"]


def test_a_folder_holding_only_a_manifest_or_other_files_is_not_replaced_silently(tmp_path, vqs, caplog):
    f4, f8 = vqs
    images = _images(tmp_path / "images")
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text("{}")
    with pytest.raises(FileExistsError, match="only manifest.json, no shards"):
        build_shards(images, out, f4, f8, progress=False)
    with caplog.at_level(logging.WARNING):
        report = build_shards(images, out, f4, f8, overwrite=True, progress=False)
    assert "replacing" in caplog.text and "only manifest.json" in caplog.text
    assert load_manifest(out) == json.loads(json.dumps(report)) and report["num_samples"] == 3
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "notes.md").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(ShardBuildError, match=r"holds files that are not shards \(notes\.md\)"):
            build_shards(images, mixed, f4, f8, overwrite=overwrite, progress=False)
    assert _tree(mixed) == {"notes.md": b"mine"}


def test_every_pil_format_is_sharded_and_other_files_are_reported(tmp_path, vqs, caplog):
    f4, f8 = vqs
    d = _images(tmp_path / "images", n=1)
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(d / "anim.gif")
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(d / "pic.tga")
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(d / "noext", format="PNG")
    Image.fromarray(rng.integers(0, 256, (1, 1, 3), dtype=np.uint8)).save(d / "dot.png")
    (d / "notes.txt").write_text("not an image")
    (d / "sub").mkdir()
    with caplog.at_level(logging.WARNING):
        report = build_shards(d, tmp_path / "out", f4, f8, progress=False)
    assert report["num_samples"] == 4  # im0.png, anim.gif, pic.tga, noext
    assert [Path(s["file"]).name for s in report["skipped"]] == ["dot.png"]
    assert str(d / "dot.png") in report["skipped"][0]["reason"] and str(d / "dot.png") in caplog.text
    ignored = {Path(i["file"]).name: i["reason"] for i in report["ignored"]}
    assert set(ignored) == {"notes.txt", "sub"} and "not an image" in ignored["notes.txt"]
    assert load_manifest(tmp_path / "out")["ignored"] == report["ignored"]


def test_validation_warning_reports_only_its_own_skips(tmp_path, caplog):
    from test_shards import write_latent_shards

    from refiner.data.latents import SkipCounter, read_all_samples

    train = write_latent_shards(tmp_path / "train", 1, 3, corrupt_key="000001")
    val = write_latent_shards(tmp_path / "val", 1, 2)
    counter = SkipCounter()
    read_all_samples(train, counter=counter)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert len(read_all_samples(val, counter=counter)) == 2
    assert "skipped" not in caplog.text  # the training shard's error is not repeated
    bad_val = write_latent_shards(tmp_path / "val2", 1, 2, corrupt_key="000000")
    with caplog.at_level(logging.WARNING):
        read_all_samples(bad_val, counter=counter)
    summary = [r.getMessage() for r in caplog.records if r.getMessage().startswith("read ")]
    assert len(summary) == 1 and "skipped 1" in summary[0] and "val2" in summary[0] and "train" not in summary[0]


def test_a_killed_build_leaves_a_folder_the_next_build_removes(tmp_path, vqs, caplog):
    """Issue 21, item 5: SIGKILL mid-build leaves `.out.building-*` (its `finally` never runs); the next build of
    the same out removes it and says so, but not a folder of a live build or one without our marker."""
    f4, f8 = vqs
    images, out = _images(tmp_path / "images", n=4), tmp_path / "out"
    ready = tmp_path / "ready"
    pid = os.fork()
    if pid == 0:  # the child builds and stalls after its first shard, until it is killed
        try:
            real = shards_mod._encode_batch

            def stall_after_first(*a, **k):
                if ready.exists():
                    time.sleep(120)
                ready.touch()
                return real(*a, **k)

            shards_mod._encode_batch = stall_after_first
            build_shards(images, out, f4, f8, batch_size=1, maxcount_per_shard=1, progress=False)
        finally:
            os._exit(0)
    deadline = time.time() + 60
    while not ready.exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    killed = list(tmp_path.glob(".out.building-*"))
    assert len(killed) == 1 and list(killed[0].glob("shard-*.tar")), "the killed build left no partial folder"

    live, foreign = tmp_path / ".out.building-live", tmp_path / ".out.building-foreign"
    live.mkdir()
    (live / shards_mod.BUILD_MARKER).write_text(json.dumps(
        {"pid": os.getpid(), "host": socket.gethostname(), "out": str(out.absolute()), "started": 0}))
    foreign.mkdir()
    (foreign / "data").write_text("not ours")
    with caplog.at_level(logging.WARNING):
        build_shards(images, out, f4, f8, progress=False)
    assert not killed[0].exists()
    removed = [r.getMessage() for r in caplog.records if "removed" in r.getMessage()]
    assert len(removed) == 1 and str(killed[0]) in removed[0] and str(pid) in removed[0]
    assert live.is_dir() and foreign.is_dir() and load_manifest(out)["num_samples"] == 4


def test_disk_full_is_one_line_exit_1_and_leaves_nothing(tmp_path, vqs, monkeypatch, capsys):
    """Issue 21, item 4: ENOSPC while a shard is written: one line naming the file and how much was written,
    exit 1, no partial output and no temporary folder."""
    f4, f8 = vqs
    images, out = _images(tmp_path / "images", n=4), tmp_path / "out"
    real = shards_mod.wds.ShardWriter.write
    calls = {"n": 0}

    def fills_the_disk(self, sample):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, sample)

    monkeypatch.setattr(shards_mod.wds.ShardWriter, "write", fills_the_disk)
    assert run_cli(lambda: build_shards(images, out, f4, f8, maxcount_per_shard=1, progress=False)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: No space left on device writing "), err
    assert ".out.building-" in err[0] and "/shard-00000" in err[0] and "KiB of shards" in err[0] and str(out) in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]


def test_a_disk_already_full_is_one_line_exit_1_and_leaves_no_build_folder(tmp_path, vqs, monkeypatch, capsys):
    """The disk is full before the first shard: writing the build folder's marker fails. One line, exit 1, and no
    hidden ``.out.building-*`` folder left (found by scripts/reliability_cases.py on a full tmpfs)."""
    f4, f8 = vqs
    images, out = _images(tmp_path / "images", n=2), tmp_path / "out"
    real = Path.write_text

    def full(self, *args, **kwargs):
        if self.name == shards_mod.BUILD_MARKER:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full)
    assert run_cli(lambda: build_shards(images, out, f4, f8, progress=False)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: No space left on device in ") and str(out) in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]
