"""Issue 9, class 1: export never destroys its input and never silently replaces a file."""

import os
import subprocess
import sys

import pytest
from helpers_compvis import make_window_checkpoint

from refiner.formats.exports import export_safetensors
from refiner.formats.loading import load_window_weights
from refiner.io import OutputPathError
from refiner.models.unet import tiny_unet_params


@pytest.fixture
def ckpt(tmp_path):
    return make_window_checkpoint(tmp_path, tiny_unet_params(), name="last.ckpt")["path"]


def test_cli_export_onto_its_input_is_refused_and_the_input_survives(ckpt):
    before = ckpt.read_bytes()
    res = subprocess.run([sys.executable, "-m", "refiner", "export", "safetensors", str(ckpt), str(ckpt)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith("error: ") and "is the input" in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert ckpt.read_bytes() == before
    # --force never makes the input an acceptable output
    res = subprocess.run([sys.executable, "-m", "refiner", "export", "safetensors", str(ckpt), str(ckpt), "--force"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and ckpt.read_bytes() == before


@pytest.mark.parametrize("spelling", ["dotted", "symlink", "hardlink", "symlinked_dir"])
def test_export_onto_the_input_by_any_spelling_or_link_is_refused(ckpt, tmp_path, spelling):
    before = ckpt.read_bytes()
    if spelling == "dotted":
        out = tmp_path / "." / ".." / tmp_path.name / "last.ckpt"
    elif spelling == "symlink":
        out = tmp_path / "link.safetensors"
        out.symlink_to(ckpt)
    elif spelling == "hardlink":
        out = tmp_path / "hard.safetensors"
        os.link(ckpt, out)
    else:
        (tmp_path / "alias").symlink_to(tmp_path, target_is_directory=True)
        out = tmp_path / "alias" / "last.ckpt"
    for force in (False, True):
        with pytest.raises(OutputPathError, match="is the input"):
            export_safetensors(ckpt, out, force=force)
    assert ckpt.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp file left


def test_existing_output_needs_force(ckpt, tmp_path):
    out = tmp_path / "w.safetensors"
    out.write_bytes(b"someone else's file")
    with pytest.raises(OutputPathError, match="already exists.*--force"):
        export_safetensors(ckpt, out)
    assert out.read_bytes() == b"someone else's file"
    export_safetensors(ckpt, out, force=True)
    assert load_window_weights(out).window.t_min == 250
    with pytest.raises(OutputPathError, match="is a folder"):
        export_safetensors(ckpt, tmp_path)
