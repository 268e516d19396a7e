"""The diffusers bridge recipe of docs/reference/diffusers.md runs as written, on tiny demo-shaped windows.

The bash block's commands run in a folder laid out like the repo after `make demo` (train.py, conf/ and
outputs/heads/refiner_*/checkpoints/last.ckpt); the training command gets the tiny-world overrides appended
(tiny UNet, 4 steps, the test's shards). The python block then runs unchanged in the same folder.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pytest
from conftest import ROOT, TINY_TRAINER
from pipeline import TINY_UNET, build_world


def _blocks(lang: str) -> list[str]:
    text = (ROOT / "docs" / "reference" / "diffusers.md").read_text()
    section = text[text.index("## Recipe"):]
    section = section[:section.index("\n## ", 5)] if "\n## " in section[5:] else section
    return re.findall(rf"```{lang}\n(.*?)```", section, flags=re.S)


def _commands(block: str) -> list[list[str]]:
    joined = re.sub(r"\\\n\s*", " ", block)
    return [shlex.split(line) for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


@pytest.mark.slow
def test_readme_diffusers_recipe_runs(tmp_path):
    pytest.importorskip("diffusers")  # a guard only: the test extra installs it
    (bash,), (python,) = _blocks("bash"), _blocks("python")
    world = build_world(tmp_path / "world")
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("train.py", "conf"):
        (repo / name).symlink_to(ROOT / name)
    shape = world.train_refiner("demo_refiner_500_750", repo / "outputs/heads/refiner_500_750")
    world.train_refiner("demo_refiner_751_1000", repo / "outputs/heads/refiner_751_1000",
                        f"init_from={shape['last_ckpt']}")

    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    tiny = [*TINY_TRAINER, *[p for p in world.paths() if not p.startswith("first_stage.f4.ckpt_path")], *TINY_UNET,
            f"hydra.run.dir={repo / 'outputs/finetune'}"]
    commands = _commands(bash)
    assert len(commands) == 2 and commands[0][:4] == ["python", "-m", "refiner", "export"]
    assert commands[1][:3] == ["python", "train.py", "experiment=demo_refiner_751_1000"]
    for cmd in commands:
        cmd = [sys.executable, *cmd[1:], *(tiny if cmd[1] == "train.py" else [])]
        res = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, env=env, timeout=300)
        assert res.returncode == 0, f"{cmd}\n{res.stderr[-3000:]}"
    exported = repo / "outputs/heads/diffusers"
    assert (exported / "unet_2" / "config.json").is_file() and (exported / "README.md").is_file()
    assert (repo / "outputs/finetune/checkpoints/last.ckpt").is_file()
    card = (exported / "README.md").read_text()  # model card of real training runs
    assert "train_shards=" in card and "(from config_resolved.yaml)" in card and "best val/loss = " in card
    assert "| steps | 4 |" in card

    code = python + ("\nassert refined.shape == refined_by_diffusers.shape == (2, 3, 64, 64)"
                     "\nassert torch.isfinite(refined).all()"
                     "\nassert (refined - refined_by_diffusers).abs().max() < 1e-5  # the two recipes agree\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
