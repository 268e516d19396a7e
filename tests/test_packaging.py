"""`pip install .` gives working console commands whose Hydra configs ship inside the package."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile

import pytest
from conftest import ROOT

COMMANDS = ("refiner", "refiner-train", "refiner-sample", "refiner-build-shards", "refiner-export", "refiner-checkpoint",
            "refiner-bench")


def _run(cmd, cwd, env=None, timeout=180):
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert res.returncode == 0, f"{cmd}: {res.stderr[-2000:]}"
    return res.stdout


@pytest.mark.slow
def test_wheel_installs_console_commands_that_find_their_configs(tmp_path):
    src = tmp_path / "src"  # build from a copy: building in the checkout would leave build/ behind
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    shutil.copytree(ROOT / "refiner", src / "refiner", symlinks=True, ignore=ignore)
    shutil.copytree(ROOT / "conf", src / "conf", ignore=ignore)
    pip = [sys.executable, "-m", "pip"]
    _run([*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)], tmp_path)
    (wheel,) = (tmp_path / "dist").glob("window_refiner-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert all(f"{c} = " in entry_points for c in COMMANDS)
    assert "refiner/conf/train.yaml" in names and "refiner/conf/experiment/demo_refiner_500_750.yaml" in names

    site = tmp_path / "site"
    _run([*pip, "install", "-q", "--no-deps", "--target", str(site), str(wheel)], tmp_path)
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    elsewhere = tmp_path / "elsewhere"  # no conf/ here: the configs must come from the installed package
    elsewhere.mkdir()
    where = _run([sys.executable, "-c", "import refiner; print(refiner.__file__)"], elsewhere, env)
    assert where.strip().startswith(str(site))
    refiner = str(site / "bin" / "refiner")
    out = _run([refiner, "train", "--cfg", "job", "experiment=demo_refiner_500_750"], elsewhere, env)
    assert "t_min: 250" in out and "t_max: 500" in out
    out = _run([refiner, "refine", "--cfg", "job", "t_start=299"], elsewhere, env)
    assert "t_start: 299" in out
    out = _run([refiner, "build-shards", "--cfg", "job"], elsewhere, env)
    assert "splits:" in out
    assert "diffusers" in _run([refiner, "export", "--help"], elsewhere, env)
    assert "refine" in _run([refiner, "--help"], elsewhere, env)
    # an old script still works and names the new command in one line
    res = subprocess.run([str(site / "bin" / "refiner-sample"), "--cfg", "job", "t_start=299"], cwd=elsewhere,
                         capture_output=True, text=True, timeout=180, env=env)
    assert res.returncode == 0 and "t_start: 299" in res.stdout
    assert res.stderr.splitlines()[0] == "deprecated: refiner-sample is now `refiner refine`"
