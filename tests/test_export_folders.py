"""Issue 21 item 2: ``--force`` replaces only what we made.

An existing output folder may be replaced (with ``--force``) only if it is a previous export of the same kind: its
manifest and nothing foreign (:func:`refiner.io.write_export_folder`). A symlinked output is resolved (the export it
points to is replaced, the link kept). Nothing of a failed or refused attempt is left behind, and the old export is
never half-replaced. On the code before this change, ``--force`` deleted a folder holding ``notes.txt`` and
``sub/data.bin`` (exit 0), and ``--force`` onto a symlink crashed ("Cannot call rmtree on a symbolic link") leaving a
``.NAME.*.old`` folder.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers_compvis import make_first_stage_checkpoint, make_window_checkpoint
from refiner.io import ExportLayout, OutputPathError, write_export_folder
from refiner.models.unet import tiny_unet_params

LAYOUT = ExportLayout("manifest.json", (r"manifest\.json", "data", r"data/w\.bin"))


def _writer(version: int, fail: bool = False):
    def write(folder: Path) -> None:
        (folder / "manifest.json").write_text(json.dumps({"version": version}))
        (folder / "data").mkdir()
        (folder / "data" / "w.bin").write_bytes(bytes([version]) * 8)
        if fail:
            raise RuntimeError("disk on fire")
    return write


def _version(folder: Path) -> int:
    return json.loads((folder / "manifest.json").read_text())["version"]


def _hidden(*folders: Path) -> list[str]:
    """Temp or old folders left beside an output (``.NAME.*.tmp`` / ``.NAME.*.old``)."""
    return sorted(p.name for f in folders for p in f.iterdir() if p.name.startswith("."))


def _foreign_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "notes.txt").write_text("my notes")
    (path / "sub").mkdir()
    (path / "sub" / "data.bin").write_bytes(b"\x01" * 64)
    return path


def test_force_replaces_a_previous_export_and_nothing_else(tmp_path):
    out = tmp_path / "out"
    write_export_folder(out, LAYOUT, _writer(1))
    with pytest.raises(OutputPathError, match="already exists; pass --force"):
        write_export_folder(out, LAYOUT, _writer(2))
    write_export_folder(out, LAYOUT, _writer(2), force=True)
    assert _version(out) == 2 and _hidden(tmp_path) == []
    (out / "data" / "notes.txt").write_text("added by a user")
    with pytest.raises(OutputPathError, match=r"holds data/notes\.txt, which a refiner export does not write"):
        write_export_folder(out, LAYOUT, _writer(3), force=True)
    assert _version(out) == 2 and (out / "data" / "notes.txt").read_text() == "added by a user"
    assert _hidden(tmp_path) == []


def test_force_refuses_a_folder_that_is_not_an_export(tmp_path):
    out = _foreign_folder(tmp_path / "out")
    with pytest.raises(OutputPathError, match=r"has no manifest\.json; it holds notes\.txt"):
        write_export_folder(out, LAYOUT, _writer(1), force=True)
    assert (out / "notes.txt").read_text() == "my notes" and (out / "sub" / "data.bin").read_bytes() == b"\x01" * 64
    empty = tmp_path / "empty"
    empty.mkdir()
    write_export_folder(empty, LAYOUT, _writer(1), force=True)  # nothing in it to lose
    assert _version(empty) == 1 and _hidden(tmp_path) == []


def test_force_onto_a_symlink_replaces_the_export_it_points_to_and_keeps_the_link(tmp_path):
    real = tmp_path / "exports" / "v1"
    write_export_folder(real, LAYOUT, _writer(1))
    link = tmp_path / "current"
    link.symlink_to(real, target_is_directory=True)
    write_export_folder(link, LAYOUT, _writer(2), force=True)
    assert link.is_symlink() and link.resolve() == real.resolve() and _version(real) == 2
    assert _hidden(tmp_path, tmp_path / "exports") == []
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "missing", target_is_directory=True)
    with pytest.raises(OutputPathError, match="points to nothing"):
        write_export_folder(dangling, LAYOUT, _writer(1), force=True)
    foreign = _foreign_folder(tmp_path / "theirs")
    (tmp_path / "to_theirs").symlink_to(foreign, target_is_directory=True)
    with pytest.raises(OutputPathError, match=r"a symlink to .*theirs\) is not a refiner export"):
        write_export_folder(tmp_path / "to_theirs", LAYOUT, _writer(1), force=True)
    assert dangling.is_symlink() and (foreign / "notes.txt").is_file() and _hidden(tmp_path) == []


def test_a_failed_write_keeps_the_previous_export_and_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    write_export_folder(out, LAYOUT, _writer(1))
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_export_folder(out, LAYOUT, _writer(2, fail=True), force=True)
    assert _version(out) == 1 and _hidden(tmp_path) == []


def test_outputs_around_inputs_are_refused(tmp_path):
    out = tmp_path / "out"
    write_export_folder(out, LAYOUT, _writer(1))
    (out / "data" / "w.bin").write_bytes(b"an input now")
    with pytest.raises(OutputPathError, match="contains the input"):
        write_export_folder(out, LAYOUT, _writer(2), inputs=[out / "data" / "w.bin"], force=True)
    with pytest.raises(OutputPathError, match="lies inside the input"):
        write_export_folder(out / "data" / "new", LAYOUT, _writer(2), inputs=[out / "data"])
    assert (out / "data" / "w.bin").read_bytes() == b"an input now" and not (out / "data" / "new").exists()


# ------------------------------------------------------------------------ the cases of the issue, through the CLI
@pytest.fixture(scope="module")
def window(tmp_path_factory) -> Path:
    """A window .ckpt that records its first stage (a tiny VQ-f4), so that it exports to diffusers as it is."""
    tmp = tmp_path_factory.mktemp("window")
    vq = make_first_stage_checkpoint(tmp, n_embed=16, embed_dim=3)
    made = make_window_checkpoint(tmp, tiny_unet_params(), name="shape.ckpt")
    ckpt = torch.load(made["path"], weights_only=True)
    ckpt["hyper_parameters"]["first_stage"] = {"ckpt_path": str(vq["path"]), "params": vq["params"]}
    torch.save(ckpt, made["path"])
    return made["path"]


def _export(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "refiner", "export", "diffusers", *map(str, args)],
                          capture_output=True, text=True, timeout=180)


def test_cli_force_onto_a_folder_that_is_not_an_export_refuses_with_one_line(window, tmp_path):
    out = _foreign_folder(tmp_path / "OUT")
    res = _export(window, out, "--force")
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "notes.txt" in lines[0], res.stderr
    assert (out / "notes.txt").read_text() == "my notes" and (out / "sub" / "data.bin").read_bytes() == b"\x01" * 64
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "sub"] and _hidden(tmp_path) == []


def test_cli_force_onto_a_symlink_to_an_earlier_export_replaces_it_and_keeps_the_link(window, tmp_path):
    from refiner.formats.diffusers.folders import load_diffusers_unet

    real = tmp_path / "exports" / "v1"
    assert _export(window, real).returncode == 0
    link = tmp_path / "current"
    link.symlink_to(real, target_is_directory=True)
    res = _export(window, link, "--force", "--raw")
    assert res.returncode == 0, res.stderr
    assert link.is_symlink() and link.resolve() == real.resolve()
    state, _ = load_diffusers_unet(real)
    raw = torch.load(window, weights_only=True)["current_model_state"]
    assert torch.equal(state["out.2.weight"], raw["unet.out.2.weight"])  # the raw weights replaced the EMA ones
    assert _hidden(tmp_path, tmp_path / "exports") == []
