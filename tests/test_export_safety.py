"""Issue 9, class 1: export never destroys its input and never silently replaces a file."""

import os
import subprocess
import sys

import pytest
import torch
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
    export_safetensors(ckpt, out)
    with pytest.raises(OutputPathError, match="already exists.*--force"):
        export_safetensors(ckpt, out)
    export_safetensors(ckpt, out, force=True)  # a previous export of ours (and its card) may be replaced
    assert load_window_weights(out).window.t_min == 250
    with pytest.raises(OutputPathError, match="is a folder"):
        export_safetensors(ckpt, tmp_path)


# ------------------------------------------------------------ issue 21 item 2: --force replaces only what we made
def test_force_refuses_a_file_that_is_not_a_previous_export(ckpt, tmp_path):
    """``--force`` replaced any existing file (exit 0); now only a window export of ours and its model card."""
    out = tmp_path / "w.safetensors"
    out.write_bytes(b"someone else's file")
    with pytest.raises(OutputPathError, match=r"w\.safetensors exists and is not a refiner window export"):
        export_safetensors(ckpt, out, force=True)
    assert out.read_bytes() == b"someone else's file" and not (tmp_path / "w.README.md").exists()
    export_safetensors(ckpt, tmp_path / "v.safetensors")
    (tmp_path / "v.README.md").write_text("# my own notes on v\n")  # the card's name, but not our card
    with pytest.raises(OutputPathError, match=r"v\.README\.md exists and is not a refiner model card"):
        export_safetensors(ckpt, tmp_path / "v.safetensors", force=True)
    assert (tmp_path / "v.README.md").read_text() == "# my own notes on v\n"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_force_onto_a_symlink_replaces_the_export_it_points_to_and_keeps_the_link(ckpt, tmp_path):
    """``--force`` replaced the link itself by a new file (the export it named kept its old weights)."""
    real = tmp_path / "exports" / "v1.safetensors"
    export_safetensors(ckpt, real)
    link = tmp_path / "current.safetensors"
    link.symlink_to(real)
    export_safetensors(ckpt, link, use_ema=False, force=True)
    assert link.is_symlink() and link.resolve() == real.resolve()
    raw = torch.load(ckpt, weights_only=True)["current_model_state"]
    assert torch.equal(load_window_weights(real).unet_state["out.2.weight"], raw["unet.out.2.weight"])
    assert (tmp_path / "exports" / "v1.README.md").is_file() and not (tmp_path / "current.README.md").exists()
    dangling = tmp_path / "gone.safetensors"
    dangling.symlink_to(tmp_path / "missing.safetensors")
    with pytest.raises(OutputPathError, match="points to nothing"):
        export_safetensors(ckpt, dangling, force=True)
    assert dangling.is_symlink() and not (tmp_path / "missing.safetensors").exists()


def test_cli_force_onto_a_file_that_is_not_an_export_is_one_line(ckpt, tmp_path):
    out = tmp_path / "notes.safetensors"
    out.write_text("my notes")
    res = subprocess.run([sys.executable, "-m", "refiner", "export", "safetensors", str(ckpt), str(out), "--force"],
                         capture_output=True, text=True, timeout=120)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and str(out) in lines[0], res.stderr
    assert out.read_text() == "my notes"
