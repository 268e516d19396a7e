"""Issue 21 item 7: files and folders the project writes respect the umask (0644/0755 under umask 022, 0600/0700
under umask 077), written atomically as before.

Before this change every file came out 0600 (``tempfile.mkstemp`` in the atomic writer; safetensors' ``save_file``
also writes through its own 0600 temp file), so nobody else in a shared group could read results.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from helpers_compvis import make_first_stage_checkpoint, make_window_checkpoint
from refiner.data.images import save_png_atomic
from refiner.formats.exports import export_diffusers, export_safetensors
from refiner.io import ExportLayout, atomic_save, atomic_write_text, write_export_folder
from refiner.lit.checkpoint_io import AtomicCheckpointIO
from refiner.models.unet import tiny_unet_params

UMASKS = {0o022: (0o644, 0o755), 0o077: (0o600, 0o700)}


@pytest.fixture(params=sorted(UMASKS), ids=lambda u: f"umask{u:03o}")
def umask(request):
    """Run the test under this umask; yields the expected (file, folder) modes."""
    old = os.umask(request.param)
    try:
        yield UMASKS[request.param]
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def _modes(root: Path) -> dict[str, int]:
    """Mode of ``root`` and of everything under it, by relative path."""
    return {str(p.relative_to(root.parent)): _mode(p) for p in [root, *root.rglob("*")]}


def _expected(root: Path, file_mode: int, folder_mode: int) -> dict[str, int]:
    return {str(p.relative_to(root.parent)): folder_mode if p.is_dir() else file_mode for p in [root, *root.rglob("*")]}


def test_the_atomic_writer_respects_the_umask(umask, tmp_path):
    file_mode, folder_mode = umask
    atomic_write_text(tmp_path / "new" / "summary.json", "{}")
    atomic_save(tmp_path / "new" / "w.safetensors", lambda tmp: save_file({"a": torch.zeros(2)}, str(tmp)))
    atomic_save(tmp_path / "new" / "x.pt", lambda tmp: torch.save({"a": 1}, tmp))
    save_png_atomic(tmp_path / "new" / "a.png", np.zeros((4, 4, 3), np.uint8))
    assert _modes(tmp_path / "new") == _expected(tmp_path / "new", file_mode, folder_mode)
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["a.png", "summary.json", "w.safetensors", "x.pt"]


def test_an_export_folder_respects_the_umask(umask, tmp_path):
    file_mode, folder_mode = umask
    layout = ExportLayout("manifest.json", (r"manifest\.json", "data", r"data/w\.safetensors"))

    def write(folder: Path) -> None:
        (folder / "manifest.json").write_text("{}")
        (folder / "data").mkdir()
        save_file({"a": torch.zeros(2)}, str(folder / "data" / "w.safetensors"))

    for force in (False, True):  # a new folder, then one replacing the previous export
        write_export_folder(tmp_path / "out", layout, write, force=force)
        assert _modes(tmp_path / "out") == _expected(tmp_path / "out", file_mode, folder_mode)


def test_the_exports_and_a_checkpoint_respect_the_umask(umask, tmp_path):
    file_mode, folder_mode = umask
    src = tmp_path / "src"
    src.mkdir()
    vq = make_first_stage_checkpoint(src, n_embed=16, embed_dim=3)
    ckpt = make_window_checkpoint(src, tiny_unet_params(), name="shape.ckpt")["path"]
    out = tmp_path / "out"
    export_safetensors(ckpt, out / "w.safetensors")
    export_diffusers([ckpt], out / "hf", first_stage=str(vq["path"]), first_stage_params=vq["params"])
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.zeros(2)}}, str(out / "ckpt" / "last.ckpt"))
    assert {"w.safetensors", "w.README.md", "hf/unet/diffusion_pytorch_model.safetensors", "hf/README.md",
            "ckpt/last.ckpt"} <= {str(p.relative_to(out)) for p in out.rglob("*")}
    assert _modes(out) == _expected(out, file_mode, folder_mode)


def test_a_shard_folder_respects_the_umask(umask, tmp_path):
    """build_shards builds in a temporary folder and renames it into place: the folder keeps the mode it was made
    with (``tempfile.mkdtemp`` gave 0700)."""
    from PIL import Image

    from refiner.data.shards import build_shards
    from refiner.models.vq import VQModel, tiny_ddconfig

    file_mode, folder_mode = umask
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(images / f"im{i}.png")
    torch.manual_seed(0)
    f4 = VQModel(tiny_ddconfig(4, resolution=16), n_embed=16, embed_dim=3).eval()
    f8 = VQModel(tiny_ddconfig(8, resolution=16), n_embed=16, embed_dim=4).eval()
    out = tmp_path / "shards" / "train"
    for overwrite in (False, True):  # a new shard folder, then one replacing it
        build_shards(images, out, f4, f8, overwrite=overwrite, progress=False)
        assert _modes(out) == _expected(out, file_mode, folder_mode)
