"""Real subprocess runs of train.py: 2-process DDP over gloo, and SIGKILL + resume bit-exactness."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY_TRAINER
from pipeline import TINY_UNET, World, build_world

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    return build_world(tmp_path_factory.mktemp("world"))


def _env() -> dict:
    # one thread per process: 2 DDP ranks x 2 threads on 2 cores spin-wait badly
    env = dict(os.environ, PYTHONPATH=str(ROOT / "tests"), WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    env.pop("LOCAL_RANK", None)
    return env


def _args(world: World, out: Path, *extra: str, trainer: str = "trainer=cpu") -> list[str]:
    tiny = [o for o in TINY_TRAINER if not o.startswith("trainer=")]
    return [sys.executable, "train.py", "experiment=demo_refiner_500_750", trainer, *tiny, *world.paths(),
            *TINY_UNET, f"hydra.run.dir={out}", *extra]


def _load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def test_ddp_two_cpu_processes_split_data_and_agree(world, tmp_path):
    out = tmp_path / "ddp"
    steps = 2  # 2 steps x 2 ranks x batch 4 = 16 of the 18 training samples, one epoch
    cmd = _args(world, out, f"trainer.max_steps={steps}", "trainer.val_check_interval=2",
                "+callbacks.probe._target_=probe_callback.RecordRank", trainer="trainer=ddp_cpu")
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    probes = [json.loads((out / f"probe_rank{r}.json").read_text()) for r in (0, 1)]
    assert [p["world_size"] for p in probes] == [2, 2]
    seen = [set(p["indices"]) for p in probes]
    assert len(probes[0]["indices"]) == len(seen[0]) == steps * 4  # no repeats within a rank
    assert not seen[0] & seen[1], "ranks trained on overlapping samples"
    assert len(seen[0] | seen[1]) == steps * 8
    assert probes[0]["weights_sha256"] == probes[1]["weights_sha256"], "ranks diverged"
    assert probes[0]["global_step"] == probes[1]["global_step"] == steps

    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["best-step0000002.ckpt", "last.ckpt"], ckpts  # written once, by rank 0
    assert _load(out / "checkpoints" / "last.ckpt")["global_step"] == steps
    assert len(list((out / "val_grids").glob("*.png"))) == 1  # images logged on rank 0 only


def _wait_for_checkpoint(path: Path, min_step: int, proc: subprocess.Popen, timeout: float = 300) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"training ended before it could be killed (rc={proc.returncode})")
        if path.is_file():
            step = _load(path)["global_step"]
            if step >= min_step:
                return step
        time.sleep(0.2)
    raise AssertionError("no checkpoint appeared in time")


def test_sigkill_then_resume_matches_uninterrupted_run_bit_for_bit(world, tmp_path):
    common = ["trainer.max_steps=16", "trainer.val_check_interval=4", "model.warmup_steps=10"]
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    subprocess.run(_args(world, full, *common), cwd=ROOT, env=_env(), check=True, capture_output=True, timeout=600)

    slow = ["+callbacks.sleep._target_=probe_callback.SleepEachStep", "+callbacks.sleep.seconds=0.5"]
    proc = subprocess.Popen(_args(world, crashed, *common, *slow), cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = crashed / "checkpoints" / "last.ckpt"
    try:
        step_at_kill = _wait_for_checkpoint(last, 8, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert 8 <= _load(last)["global_step"] < 16 and step_at_kill < 16  # last.ckpt intact after the kill

    resumed = subprocess.run(_args(world, crashed, *common, f"ckpt_path={last}"), cwd=ROOT, env=_env(),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    a, b = _load(full / "checkpoints" / "last.ckpt"), _load(last)
    assert a["global_step"] == b["global_step"] == 16
    for section in ("state_dict", "current_model_state", "averaging_state"):
        for k in a[section]:
            assert torch.equal(a[section][k], b[section][k]), f"{section}.{k} differs after resume"
    for i, state in a["optimizer_states"][0]["state"].items():
        for k, v in state.items():
            assert torch.equal(v, b["optimizer_states"][0]["state"][i][k]), f"optimizer {i}.{k}"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_or_sigint_saves_last_ckpt_and_resume_continues(world, tmp_path, signum):
    """Issue 21, item 5: a signalled run saves last.ckpt at its current step, exits 128 + signal with one line naming
    the checkpoint and the resume command, and resuming from it continues at the saved step."""
    out = tmp_path / "run"
    marker = ["+callbacks.mark._target_=probe_callback.MarkSteps", "+callbacks.mark.seconds=0.3"]
    proc = subprocess.Popen(_args(world, out, "trainer.max_steps=200", "trainer.val_check_interval=100", *marker),
                            cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    steps = out / "steps.txt"
    try:
        deadline = time.time() + 300
        while not (steps.is_file() and steps.read_text().strip()) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signum, err[-3000:]
    last = out / "checkpoints" / "last.ckpt"
    saved_step = _load(last)["global_step"]
    assert 1 <= saved_step < 200
    lines = [line for line in err.splitlines() if line.startswith("interrupted by")]
    assert len(lines) == 1 and str(last) in lines[0] and f"ckpt_path={last}" in lines[0], err[-2000:]

    resumed = subprocess.run(_args(world, out, f"trainer.max_steps={saved_step + 1}", f"ckpt_path={last}"),
                             cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _load(last)["global_step"] == saved_step + 1  # continued from the saved step, one more
