"""The product's claim at reduced scale, deterministic on CPU (slow: a few minutes).

Through the real entry points, as ``make demo`` runs them but on smaller heads (SIZE px, fewer images): the
VQ-f4 (half the demo's steps) and a throw-away VQ-f8 (the shards need one), shards, then side by side on one
thread each the shape and detail windows and the equal-compute full-range generator, with the demo's own step budgets (half of them
fixes nothing: see the README). Then the benchmark: the generator's samples from pure noise, refined through
the chain from t_start 499, must have a clearly lower artifact rate (the rule-based checker).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

SIZE = 48          # image side: latents 12x12, about 0.56x the compute of the demo's 64 px per step (the demo f4
                   # config keeps only 71% of clean 48 px heads intact through its round trip, against 98% at 64 px,
                   # so only the refinement claim is asserted here)
TRAIN_IMAGES = 1000
F4_STEPS = 400     # the demo's 800 halved: generator samples 95% -> 53% broken through the chain (800 steps: 98% -> 66%)


def _env(threads: int) -> dict:
    return {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def _start(tmp: Path, name: str, *args: str, threads: int = 2) -> subprocess.Popen:
    """``python ARGS`` in ``tmp`` (so data/ and outputs/ are the test's own), output to ``tmp/NAME.log``."""
    with open(tmp / f"{name}.log", "w") as log:
        return subprocess.Popen([sys.executable, *args], cwd=tmp, env=_env(threads), stdout=log,
                                stderr=subprocess.STDOUT)


def _wait(tmp: Path, name: str, proc: subprocess.Popen) -> None:
    if proc.wait() != 0:
        pytest.fail(f"{name} failed:\n" + (tmp / f"{name}.log").read_text()[-3000:])


def _run(tmp: Path, name: str, *args: str, threads: int = 2) -> None:
    _wait(tmp, name, _start(tmp, name, *args, threads=threads))


@pytest.mark.slow
def test_chain_lowers_the_artifact_rate_of_generator_samples(tmp_path):
    from refiner.data.synthetic import write_folder

    train = str(ROOT / "train.py")
    write_folder(tmp_path / "data/heads/train", TRAIN_IMAGES, seed=0, size=SIZE)
    write_folder(tmp_path / "data/heads/val", 64, seed=1, size=SIZE)
    # half the demo's f4 steps (its cosine decay and restart cut scaled with them): the f4 was half of this test's time
    _run(tmp_path, "vq_f4", train, "experiment=demo_vq_f4", f"trainer.max_steps={F4_STEPS}",
         f"model.restart_until={F4_STEPS // 2}", f"trainer.val_check_interval={F4_STEPS // 2}")
    _run(tmp_path, "vq_f8", train, "experiment=demo_vq_f8", "trainer.max_steps=20", "trainer.val_check_interval=20")
    _run(tmp_path, "shards", str(ROOT / "build_shards.py"))
    out = tmp_path / "outputs/heads"

    windows = _start(tmp_path, "windows", "-c", (
        "import subprocess, sys\n"
        f"for e in ('demo_refiner_500_750', 'demo_refiner_751_1000'):\n"
        f"    subprocess.run([sys.executable, {train!r}, 'experiment=' + e], check=True)\n"),
        threads=1)
    full = _start(tmp_path, "full_range", train, "experiment=demo_full_range", threads=1)
    _wait(tmp_path, "windows", windows)
    _wait(tmp_path, "full_range", full)

    _run(tmp_path, "bench", "-m", "refiner.bench", "methods=demo", f"size={SIZE}", "sources=[generator]",
         "~methods.full_range", "~methods.unsharp",
         "output_dir=outputs/heads/bench", "hydra.run.dir=outputs/heads/bench")
    results = json.loads((out / "bench/results.json").read_text())
    entry = results["sources"]["generator"]
    before = entry["input"]["artifact_rate"]
    after = entry["methods"]["chain"]["sweep"][0]["artifact_rate"]
    print(f"generator samples: {before:.0%} -> {after:.0%} after the chain")  # 95% -> 53% with F4_STEPS 400
    assert before >= 0.5, f"the generator is too good for this test: {before:.0%} artifacts"
    assert after <= before - 0.2, f"the chain did not lower the artifact rate enough: {before:.0%} -> {after:.0%}"
