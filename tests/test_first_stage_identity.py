"""Issue 21 item 3: identity covers architecture, and a checkpoint's numbers are checked when a window is loaded.

GroupNorm weights do not depend on the group count, so an f4 whose diffusers ``config.json`` says
``norm_num_groups: 8`` has the same weights fingerprint as the 32-group f4 the windows were trained on, and decodes
wrongly. Windows record their f4's architecture (``hyper_parameters.first_stage.params``, and the ``.safetensors``
export's metadata); it is compared with the loaded first stage whatever file that came from. On the code before
this change all of the refusals below were accepted, and a NaN ``scale_factor`` only failed later as "denoiser
diverged".
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from helpers_compvis import make_first_stage_checkpoint, make_window_checkpoint
from refiner.formats.diffusers import DiffusersFormatError
from refiner.formats.diffusers.config import vq_config, vq_to_diffusers
from refiner.formats.diffusers.folders import write_model
from refiner.formats.exports import export_diffusers, export_safetensors
from refiner.formats.fingerprint import FirstStageMismatch, first_stage_fingerprint
from refiner.formats.first_stage import FirstStageSpec, first_stage_from_mapping
from refiner.formats.loading import load_window_weights
from refiner.formats.safe_load import CheckpointError
from refiner.formats.window_files import WindowSetError, check_window_set
from refiner.inference.chain import Chain
from refiner.models.unet import tiny_unet_params


def _window(tmp: Path, name: str, vq: dict | None = None, window=(250, 500), **hp) -> Path:
    """A window .ckpt that records ``vq`` as its first stage (checkpoint, params, fingerprint), plus ``hp``."""
    made = make_window_checkpoint(tmp, tiny_unet_params(), window=window, name=name)
    ckpt = torch.load(made["path"], weights_only=True)
    if vq is not None:
        ckpt["hyper_parameters"].update(first_stage={"ckpt_path": str(vq["path"]), "params": vq["params"]},
                                        first_stage_fingerprint=first_stage_fingerprint(vq["state"]))
    ckpt["hyper_parameters"].update(hp)
    torch.save(ckpt, made["path"])
    return made["path"]


def _vqvae_folder(folder: Path, vq: dict, norm_groups: int | None) -> Path:
    """The weights of ``vq`` as a diffusers VQModel folder whose config.json says ``norm_num_groups``."""
    params = vq["params"] if norm_groups is None else {
        **vq["params"], "ddconfig": {**vq["params"]["ddconfig"], "norm_groups": norm_groups}}
    write_model(folder, vq_config(params, 1.0), vq_to_diffusers(vq["state"], params))
    return folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A window trained on a 32-group tiny f4, and that f4's weights as diffusers folders with 32 and 8 groups."""
    tmp = tmp_path_factory.mktemp("identity")
    vq = make_first_stage_checkpoint(tmp, n_embed=16, embed_dim=3)
    return dict(tmp=tmp, vq=vq, window=_window(tmp, "shape.ckpt", vq),
                groups32=_vqvae_folder(tmp / "vqvae32", vq, None), groups8=_vqvae_folder(tmp / "vqvae8", vq, 8))


def test_a_first_stage_with_other_norm_groups_is_refused_though_its_weights_match(trained):
    chain = Chain.from_paths([trained["window"]])
    f4 = first_stage_from_mapping({"ckpt_path": str(trained["groups8"]), "params": None})
    assert first_stage_fingerprint(f4) == chain.first_stage_fingerprint  # the fingerprint alone cannot see it
    with pytest.raises(FirstStageMismatch, match=r"shape\.ckpt was trained with another first-stage architecture "
                                                 r"than .*vqvae8 \(ddconfig\.norm_groups: 32 vs 8;"):
        chain.check_first_stage(f4, str(trained["groups8"]))
    with pytest.warns(UserWarning, match="norm_groups: 32 vs 8"):
        chain.check_first_stage(f4, str(trained["groups8"]), allow_mismatch=True)
    eight = {**trained["vq"]["params"], "ddconfig": {**trained["vq"]["params"]["ddconfig"], "norm_groups": 8}}
    f4 = first_stage_from_mapping({"ckpt_path": str(trained["vq"]["path"]), "params": eight})  # .ckpt + its config
    with pytest.raises(FirstStageMismatch, match=r"norm_groups: 32 vs 8"):
        chain.check_first_stage(f4, str(trained["vq"]["path"]))
    for good in (trained["groups32"], trained["vq"]["path"]):  # the right network, as a folder or the .ckpt
        f4 = first_stage_from_mapping({"ckpt_path": str(good), "params": trained["vq"]["params"]})
        assert chain.check_first_stage(f4, str(good)) == chain.first_stage_fingerprint


def test_a_window_that_records_no_architecture_is_run_with_a_warning(trained, tmp_path):
    """An older window (or export) records the f4's fingerprint but not its architecture: the architecture check is
    skipped, and it says so (it used to pass silently) naming the window; the fingerprint is still checked."""
    old = _window(tmp_path, "old.ckpt", first_stage_fingerprint=first_stage_fingerprint(trained["vq"]["state"]))
    chain = Chain.from_paths([old])
    f4 = first_stage_from_mapping({"ckpt_path": str(trained["groups8"]), "params": None})
    with pytest.warns(UserWarning, match=r"old\.ckpt records no first-stage architecture.*cannot check.*norm groups"):
        assert chain.check_first_stage(f4, str(trained["groups8"])) == chain.first_stage_fingerprint
    with pytest.warns(UserWarning, match=r"old\.ckpt records no first-stage architecture"):
        export_diffusers([old], tmp_path / "hf", first_stage=str(trained["groups32"]))


def test_the_architecture_travels_through_the_safetensors_export(trained, tmp_path):
    out = export_safetensors(trained["window"], tmp_path / "w.safetensors")
    assert load_window_weights(out).first_stage_params == trained["vq"]["params"]
    f4 = first_stage_from_mapping(FirstStageSpec(str(trained["groups8"])))
    with pytest.raises(FirstStageMismatch, match=r"w\.safetensors was trained with another first-stage architecture"):
        Chain.from_paths([out]).check_first_stage(f4, str(trained["groups8"]))


def test_the_diffusers_export_refuses_a_first_stage_of_another_architecture(trained, tmp_path):
    with pytest.raises(DiffusersFormatError, match="norm_groups: 32 vs 8"):
        export_diffusers([trained["window"]], tmp_path / "hf", first_stage=str(trained["groups8"]))
    assert list(tmp_path.iterdir()) == []
    out = export_diffusers([trained["window"]], tmp_path / "hf", first_stage=str(trained["groups32"]))
    assert (out / "vqvae" / "config.json").is_file()


def test_windows_of_one_chain_must_record_one_architecture(trained, tmp_path):
    other = make_first_stage_checkpoint(tmp_path, ddconfig={**trained["vq"]["params"]["ddconfig"], "norm_groups": 8},
                                        n_embed=16, embed_dim=3)
    detail = load_window_weights(_window(tmp_path, "detail.ckpt", other, window=(0, 250),
                                         first_stage_fingerprint=None))
    shape = load_window_weights(trained["window"])
    with pytest.raises(FirstStageMismatch, match="norm_groups: 8 vs 32"):
        check_window_set([shape, detail])
    with pytest.warns(UserWarning, match="norm_groups"):
        check_window_set([shape, detail], allow_first_stage_mismatch=True)


@pytest.mark.parametrize("value", [math.nan, math.inf, 0.0, -1.0])
def test_a_bad_scale_factor_is_refused_when_the_window_is_loaded(tmp_path, value):
    path = _window(tmp_path, "w.ckpt", scale_factor=value)
    with pytest.raises(CheckpointError, match=r"w\.ckpt: scale_factor=.* is not a finite number > 0"):
        load_window_weights(path)


def test_a_nan_scale_factor_in_an_export_is_one_line_and_exit_2(tmp_path):
    good = export_safetensors(_window(tmp_path, "w.ckpt"), tmp_path / "w.safetensors")
    with safe_open(str(good), framework="pt") as st:
        meta = dict(st.metadata())
    bad = tmp_path / "nan.safetensors"
    save_file(load_file(str(good)), str(bad), metadata={**meta, "scale_factor": "nan"})
    with pytest.raises(CheckpointError, match=r"nan\.safetensors: scale_factor=nan"):
        load_window_weights(bad)
    res = subprocess.run([sys.executable, "-m", "refiner", "inspect", str(bad)], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 2 and res.stderr.startswith("error: ") and len(res.stderr.strip().splitlines()) == 1
    assert "scale_factor=nan" in res.stderr


@pytest.mark.parametrize("schedule, match", [
    (dict(linear_end=math.nan), "non-finite"),
    (dict(linear_start=0.0), r"must lie in \(0, 1\)"),
    (dict(linear_end=1.5), r"must lie in \(0, 1\)"),
    (dict(num_timesteps=1), "num_timesteps >= 2"),
    (dict(kind="sigmoid"), "unknown beta schedule"),
])
def test_a_schedule_out_of_range_is_refused_when_the_window_is_loaded(tmp_path, schedule, match):
    path = _window(tmp_path, "w.ckpt")
    ckpt = torch.load(path, weights_only=True)
    ckpt["hyper_parameters"]["schedule"].update(schedule)
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match=match):
        load_window_weights(path)


def test_a_set_without_windows_is_refused():
    with pytest.raises(WindowSetError, match="at least one window expert"):
        check_window_set([])
