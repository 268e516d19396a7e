"""Issue 21 item 6 (part): a checkpoint the user may not read is reported as one line ``permission denied: PATH``, not
as "truncated or corrupt (PermissionError...)", whatever loader reads it (a window ``.ckpt``, a ``.safetensors``
export, a first stage, a diffusers folder, a CompVis config).

``chmod 000`` does not stop root, so when the tests run as root (``os.access`` still says readable) the kernel's
answer is simulated: every Python-level open of that path (``os.open``, ``open``) raises the ``PermissionError`` a
user gets, and safetensors' own (Rust) open raises what it raises for an unreadable file here:
``FileNotFoundError("No such file or directory: PATH")`` (measured as user ``nobody`` on this machine).
"""

from __future__ import annotations

import builtins
import errno
import os
from pathlib import Path

import pytest
import safetensors

from helpers_compvis import make_compvis_ldm_checkpoint, make_first_stage_checkpoint, make_window_checkpoint
from refiner.apps.export import inspect_main
from refiner.formats.compvis import load_compvis_config
from refiner.formats.diffusers.config import vq_config, vq_to_diffusers
from refiner.formats.diffusers.folders import WEIGHTS_NAME, write_model
from refiner.formats.exports import export_safetensors
from refiner.formats.first_stage import build_first_stage
from refiner.formats.loading import load_window_weights
from refiner.formats.safe_load import CheckpointError
from refiner.models.unet import tiny_unet_params


@pytest.fixture
def unreadable(monkeypatch):
    """``unreadable(path)``: chmod 000, and, as root, the same refusal simulated for that path."""
    denied: set[str] = set()

    def is_denied(p) -> bool:
        return isinstance(p, (str, os.PathLike)) and os.path.realpath(os.fspath(p)) in denied

    def refuse(p):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(p))

    real_os_open, real_open, real_safe_open = os.open, builtins.open, safetensors.safe_open
    simulated = []

    def make(path: Path) -> Path:
        path.chmod(0)
        if os.access(path, os.R_OK) and not simulated:  # root: chmod stops nobody
            simulated.append(True)
            monkeypatch.setattr(os, "open", lambda p, *a, **k: refuse(p) if is_denied(p) else real_os_open(p, *a, **k))
            monkeypatch.setattr(builtins, "open", lambda p, *a, **k: refuse(p) if is_denied(p) else real_open(p, *a, **k))

            def safe_open(p, *a, **k):
                if is_denied(p):
                    raise FileNotFoundError(f"No such file or directory: {p}")
                return real_safe_open(p, *a, **k)

            monkeypatch.setattr(safetensors, "safe_open", safe_open)
        denied.add(os.path.realpath(path))
        return path

    yield make
    for p in denied:
        os.chmod(p, 0o644)


def _denied(path: Path) -> str:
    return rf"^permission denied: {path}$"


def test_a_window_checkpoint_or_export_one_may_not_read(unreadable, tmp_path, capsys):
    ckpt = make_window_checkpoint(tmp_path, tiny_unet_params(), name="w.ckpt")["path"]
    export = export_safetensors(ckpt, tmp_path / "w.safetensors")
    hidden = tmp_path / "w_safetensors.ckpt"  # a safetensors export under another name: read by content
    hidden.write_bytes(export.read_bytes())
    for path in (ckpt, export, hidden):
        unreadable(path)
        with pytest.raises(CheckpointError, match=_denied(path)):
            load_window_weights(path)
    assert inspect_main([str(ckpt)]) == 2
    assert capsys.readouterr().err == f"error: permission denied: {ckpt}\n"


def test_a_first_stage_one_may_not_read(unreadable, tmp_path):
    vq = make_first_stage_checkpoint(tmp_path, n_embed=16, embed_dim=3)
    folder = tmp_path / "vqvae"
    write_model(folder, vq_config(vq["params"], 1.0), vq_to_diffusers(vq["state"], vq["params"]))
    for path, load in ((vq["path"], lambda: build_first_stage(vq["path"], vq["params"])),
                       (folder / WEIGHTS_NAME, lambda: build_first_stage(folder)),
                       (folder / "config.json", lambda: build_first_stage(folder))):
        unreadable(path)
        with pytest.raises(CheckpointError, match=_denied(path)):
            load()


def test_a_compvis_config_one_may_not_read(unreadable, tmp_path):
    made = make_compvis_ldm_checkpoint(tmp_path, tiny_unet_params())
    config = unreadable(Path(made["config_path"]))
    with pytest.raises(CheckpointError, match=_denied(config)):
        load_compvis_config(config)
