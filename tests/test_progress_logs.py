"""Training output stays small when stdout is a file (SLURM, CI, nohup), and per-step on a terminal."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest
from conftest import ROOT

from refiner.lit.progress import progress_bar


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_refresh_rate_follows_the_stream(monkeypatch):
    monkeypatch.setattr(sys, "stdout", _Terminal())
    assert progress_bar(refresh_rate=1, non_tty_refresh_rate=50).refresh_rate == 1
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    assert progress_bar(refresh_rate=1, non_tty_refresh_rate=50).refresh_rate == 50
    with pytest.raises(ValueError, match="non_tty_refresh_rate must be a positive int"):
        progress_bar(non_tty_refresh_rate=0)


def _train_to_file(tmp_path, demo, name: str, *extra: str) -> str:
    log = tmp_path / f"{name}.log"
    cmd = [sys.executable, "train.py", "experiment=demo_vq_f4", "trainer=cpu", "logger=none",
           "trainer.max_steps=40", "trainer.val_check_interval=40", "trainer.limit_val_batches=1",
           "+trainer.enable_model_summary=false", f"paths.demo_dir={demo}", "data.crop_size=32",
           "first_stage.f4.params.ddconfig.resolution=32", "data.batch_size=2", f"hydra.run.dir={tmp_path / name}",
           *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    with open(log, "w") as out:  # stdout is a file, as under nohup / SLURM
        res = subprocess.run(cmd, cwd=ROOT, stdout=out, stderr=subprocess.PIPE, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return log.read_bytes().decode()  # bytes: text mode would turn the carriage returns into newlines


@pytest.mark.slow
def test_log_file_gets_few_redraws(tmp_path):
    from refiner.data.demo import build_demo_images

    demo = tmp_path / "demo"
    build_demo_images(demo, crop_size=32, crops_per_photo=20, photos=["astronaut", "coffee", "chelsea"],
                      val_photos=("chelsea",), progress=False)
    quiet = _train_to_file(tmp_path, demo, "quiet", "callbacks.progress_bar.non_tty_refresh_rate=20")
    chatty = _train_to_file(tmp_path, demo, "chatty", "callbacks.progress_bar.non_tty_refresh_rate=1")
    assert "| 40/40" in quiet  # one epoch of >= 40 steps, and the bar did reach the last step
    # 40 steps at refresh 20, plus Lightning's start/epoch-end/validation redraws: 15 measured
    assert quiet.count("\r") <= 20, quiet
    assert chatty.count("\r") >= 60  # one redraw per step or more: what the default bar writes into a file
    assert len(quiet) * 3 < len(chatty)
