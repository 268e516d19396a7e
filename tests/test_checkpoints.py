"""refiner.formats (safe loading, CompVis/taming layouts, window files, init_from) against checkpoints built in the exact CompVis / taming / refiner layouts."""

import json
import logging
import subprocess
import sys

import pytest
import torch
from helpers_compvis import (
    ArbitraryObject,
    make_compvis_ldm_checkpoint,
    make_first_stage_checkpoint,
    make_window_checkpoint,
)
from safetensors import safe_open

from refiner.diffusion import ScheduleConfig, Window
from refiner.formats.compvis import ema_key, load_compvis_ldm
from refiner.formats.exports import export_safetensors
from refiner.formats.first_stage import build_first_stage, load_first_stage
from refiner.formats.kinds import load_strict
from refiner.formats.safe_load import CheckpointError, safe_torch_load
from refiner.formats.loading import load_init_weights, load_window_checkpoint, load_window_weights
from refiner.models.unet import UNetModel, tiny_unet_params
from refiner.models.vq import VQModel


def assert_state_equal(actual: dict, expected: dict):
    assert set(actual) == set(expected)
    for k in expected:
        assert torch.equal(actual[k], expected[k]), k


@pytest.fixture(scope="module")
def ldm(tmp_path_factory):
    return make_compvis_ldm_checkpoint(tmp_path_factory.mktemp("ldm"), tiny_unet_params())


@pytest.fixture(scope="module")
def window(tmp_path_factory):
    return make_window_checkpoint(tmp_path_factory.mktemp("win"), tiny_unet_params())


def test_ema_key_is_litema_name():
    assert ema_key("time_embed.0.weight") == "model_ema.diffusion_modeltime_embed0weight"
    assert ema_key("input_blocks.1.0.in_layers.2.bias") == "model_ema.diffusion_modelinput_blocks10in_layers2bias"


def test_compvis_ldm_ema_selected_and_loads_strictly(ldm, caplog):
    with caplog.at_level(logging.INFO, logger="refiner.formats.compvis"):
        ck = load_compvis_ldm(ldm["ckpt_path"], config_path=ldm["config_path"])
    assert ck.used_ema and ck.global_step == 7
    assert_state_equal(ck.unet, ldm["ema"])
    assert ck.unet_params == tiny_unet_params()
    unet = UNetModel(**ck.unet_params)
    load_strict(unet, ck.unet, "ldm")
    assert torch.equal(unet.time_embed[0].weight, ldm["ema"]["time_embed.0.weight"])
    assert ck.first_stage_params == dict(ddconfig=ldm["ddconfig"], n_embed=16, embed_dim=3)
    vq = VQModel(**ck.first_stage_params)
    load_strict(vq, ck.first_stage, "ldm first stage")
    assert_state_equal(ck.first_stage, ldm["first_stage"])
    assert ck.schedule == ScheduleConfig("linear", 1000, 0.0015, 0.0195)
    torch.testing.assert_close(ck.alphas_cumprod, ScheduleConfig().alphas_cumprod(), atol=1e-6, rtol=0)
    assert "ignored 1 cond_stage_model.* keys" in caplog.text and "ignored 4 leftover ddim_*" in caplog.text
    assert "unrecognised" not in caplog.text  # every other key (schedule buffers, model_ema.*) is accounted for


def test_compvis_ldm_raw_weights_and_schedule_inferred_without_config(ldm):
    ck = load_compvis_ldm(ldm["ckpt_path"], use_ema=False)
    assert not ck.used_ema and ck.unet_params is None
    assert_state_equal(ck.unet, ldm["raw"])
    assert ck.schedule == ScheduleConfig("linear", 1000, float(torch.tensor(0.0015)), float(ck.betas[-1]))


def test_compvis_ldm_without_ema_warns_and_uses_raw(tmp_path):
    made = make_compvis_ldm_checkpoint(tmp_path, tiny_unet_params(), with_ema=False)
    with pytest.warns(UserWarning, match="no model_ema"):
        ck = load_compvis_ldm(made["ckpt_path"])
    assert not ck.used_ema
    assert_state_equal(ck.unet, made["raw"])


def test_compvis_config_that_does_not_fit_weights_errors(ldm, tmp_path):
    other = make_compvis_ldm_checkpoint(tmp_path, tiny_unet_params(model_channels=64))
    with pytest.raises(CheckpointError, match=r"does not fit UNetModel.*shape mismatches"):
        load_compvis_ldm(ldm["ckpt_path"], config_path=other["config_path"])


def test_non_ldm_checkpoints_are_named(window, tmp_path):
    vq = make_first_stage_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match=r"first-stage \(VQ\) checkpoint.*not a CompVis LDM"):
        load_compvis_ldm(vq["path"])
    with pytest.raises(CheckpointError, match="refiner window checkpoint, not a CompVis LDM"):
        load_compvis_ldm(window["path"])


@pytest.mark.parametrize("lightning", [True, False])
def test_first_stage_drops_training_keys_and_builds(tmp_path, caplog, lightning):
    made = make_first_stage_checkpoint(tmp_path, lightning=lightning)
    with caplog.at_level(logging.INFO, logger="refiner.formats.compvis"):
        sd = load_first_stage(made["path"])
    assert_state_equal(sd, made["state"])
    assert "dropped 6 training-only keys" in caplog.text
    for prefix in ("loss.discriminator", "loss.perceptual_loss", "loss.logvar"):
        assert prefix in caplog.text
    vq = build_first_stage(made["path"], {**made["params"], "lossconfig": {"target": "torch.nn.Identity"}})
    assert torch.equal(vq.quantize.embedding.weight, made["state"]["quantize.embedding.weight"])


def test_first_stage_from_ldm_checkpoint(ldm):
    assert_state_equal(load_first_stage(ldm["ckpt_path"]), ldm["first_stage"])


def test_pickled_object_refused_unless_trusted(tmp_path):
    for zip_format in (True, False):
        path = tmp_path / f"evil_{zip_format}.ckpt"
        obj = {"state_dict": {"w": torch.ones(2)}, "extra": ArbitraryObject(5)}
        torch.save(obj, path, _use_new_zipfile_serialization=zip_format)
        with pytest.raises(CheckpointError, match=rf"{path.name}.*trust_checkpoint=true") as err:
            safe_torch_load(path)
        assert "helpers_compvis.ArbitraryObject" in str(err.value)
        obj = safe_torch_load(path, trust_checkpoint=True)
        assert isinstance(obj["extra"], ArbitraryObject) and obj["extra"].value == 5


def test_lightning_callback_class_keys_load_without_trust(tmp_path):
    # PL 1.x (CompVis) keys callback states by the callback class; that must not need full unpickling
    from pytorch_lightning.callbacks import ModelCheckpoint

    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "callbacks": {ModelCheckpoint: {"best_model_score": 0.5}}}, path)
    obj = safe_torch_load(path)
    assert torch.equal(obj["state_dict"]["w"], torch.ones(2))
    assert list(obj["callbacks"].values()) == [{"best_model_score": 0.5}]
    assert list(obj["callbacks"])[0] is not ModelCheckpoint  # an inert stand-in, not the real class


def test_missing_truncated_and_corrupt_files(ldm, tmp_path):
    with pytest.raises(CheckpointError, match="not found.*nope.ckpt"):
        safe_torch_load(tmp_path / "nope.ckpt")
    data = ldm["ckpt_path"].read_bytes()
    for n, name in ((len(data) // 2, "half.ckpt"), (len(data) - 100, "tail.ckpt"), (0, "empty.ckpt")):
        (tmp_path / name).write_bytes(data[:n])
        with pytest.raises(CheckpointError, match=f"{name} is truncated or corrupt"):
            load_compvis_ldm(tmp_path / name)
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint at all" * 10)
    with pytest.raises(CheckpointError, match="is truncated or corrupt"):
        safe_torch_load(tmp_path / "junk.ckpt")


def test_load_strict_reports_missing_unexpected_and_shapes():
    model = UNetModel(**tiny_unet_params())
    sd = dict(model.state_dict())
    del sd["out.2.weight"], sd["out.2.bias"]
    sd["extra.weight"] = torch.zeros(1)
    sd["time_embed.0.weight"] = torch.zeros(5, 5)
    with pytest.raises(CheckpointError) as err:
        load_strict(model, sd, source="my.ckpt")
    msg = str(err.value)
    assert "my.ckpt" in msg and "UNetModel" in msg
    assert "2 missing keys" in msg and "out.2.weight" in msg
    assert "1 unexpected keys" in msg and "extra.weight" in msg
    assert "time_embed.0.weight: checkpoint (5, 5) vs model (128, 32)" in msg


def test_window_checkpoint_ema_and_raw(window):
    ww = load_window_checkpoint(window["path"])
    assert ww.has_ema and ww.global_step == 11 and ww.parameterization == "eps"
    assert ww.window == Window(250, 500, 1000) and ww.schedule == ScheduleConfig()
    assert_state_equal(ww.unet_state, window["ema"])
    assert torch.equal(ww.build_unet().out[2].weight, window["ema"]["out.2.weight"])
    raw = load_window_checkpoint(window["path"], use_ema=False)
    assert not raw.has_ema
    assert_state_equal(raw.unet_state, window["raw"])


def test_window_checkpoint_without_ema_warns(tmp_path):
    made = make_window_checkpoint(tmp_path, tiny_unet_params(), with_ema=False)
    with pytest.warns(UserWarning, match="no EMA"):
        ww = load_window_checkpoint(made["path"])
    assert_state_equal(ww.unet_state, made["raw"])


def test_safetensors_export_round_trip(window, tmp_path):
    out = export_safetensors(window["path"], tmp_path / "sub" / "expert.safetensors")
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "refiner-window"
    assert json.loads(meta["window"]) == {"t_min": 250, "t_max": 500, "num_timesteps": 1000}
    assert json.loads(meta["unet_params"]) == tiny_unet_params()
    assert meta["parameterization"] == "eps" and meta["global_step"] == "11" and meta["ema"] == "true"
    assert all(isinstance(v, str) for v in meta.values())
    ww = load_window_weights(out)
    ref = load_window_checkpoint(window["path"])
    assert_state_equal(ww.unet_state, window["ema"])
    for name in ("unet_params", "window", "schedule", "parameterization", "global_step", "has_ema", "scale_factor"):
        assert getattr(ww, name) == getattr(ref, name), name
    assert sorted(p.name for p in out.parent.iterdir()) == ["expert.README.md", "expert.safetensors"]  # no temps
    # content sniffing: a safetensors file without the suffix still dispatches
    renamed = out.with_suffix(".bin")
    renamed.write_bytes(out.read_bytes())
    assert_state_equal(load_window_weights(renamed).unet_state, window["ema"])


def test_export_cli(window, tmp_path):
    out = tmp_path / "cli.safetensors"
    res = subprocess.run([sys.executable, "-m", "refiner", "export", "safetensors", str(window["path"]), str(out),
                          "--raw"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert_state_equal(load_window_weights(out).unet_state, window["raw"])


def test_init_weights_from_each_kind(ldm, window, tmp_path):
    state, info = load_init_weights(window["path"])
    assert info["kind"] == "window" and info["used_ema"]
    assert_state_equal(state, window["ema"])
    state, info = load_init_weights(ldm["ckpt_path"])
    assert info["kind"] == "compvis_ldm" and info["used_ema"]
    assert_state_equal(state, ldm["ema"])
    state, _ = load_init_weights(ldm["ckpt_path"], use_ema=False)
    assert_state_equal(state, ldm["raw"])
    out = export_safetensors(window["path"], tmp_path / "e.safetensors", use_ema=False)
    state, info = load_init_weights(out)
    assert info["kind"] == "safetensors"
    assert_state_equal(state, window["raw"])


def test_vq_checkpoint_refused_as_init_from(tmp_path):
    made = make_first_stage_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match=r"is a first-stage \(VQ\) checkpoint, not a denoiser"):
        load_init_weights(made["path"])


def test_unrecognised_checkpoint_named(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"state_dict": {"backbone.fc.weight": torch.ones(2)}}, path)
    with pytest.raises(CheckpointError, match=r"other\.pt is not a recognised checkpoint \(top-level names: \['backbone'\]\)"):
        load_init_weights(path)


# -- issue 9, class 9: messages say what a file is, not "truncated or corrupt" when it is not ------------------
def test_refused_or_misnamed_files_are_not_called_corrupt(window, tmp_path):
    import pickle

    plain = tmp_path / "plain.ckpt"
    plain.write_bytes(pickle.dumps({"w": [1.0, 2.0]}, protocol=4))
    old = tmp_path / "old.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}}, old, _use_new_zipfile_serialization=False, pickle_protocol=4)
    export = export_safetensors(window["path"], tmp_path / "w.safetensors")
    renamed = tmp_path / "export_named.ckpt"
    renamed.write_bytes(export.read_bytes())
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(plain.read_bytes()[:-5])
    cases = [(plain, "plain Python pickle"), (old, "old-format \\(non-zip\\) torch checkpoint that the safe loader "
                                                  "refuses.*trust_checkpoint=true"),
             (renamed, "is a safetensors file"), (cut, "truncated or corrupt")]
    for path, message in cases:
        with pytest.raises(CheckpointError, match=message) as err:
            safe_torch_load(path)
        assert ("corrupt" in str(err.value)) == (path == cut), str(err.value)
    assert safe_torch_load(old, trust_checkpoint=True)["state_dict"]["w"].sum() == 2
    assert load_window_weights(renamed).window.t_min == 250  # read by content wherever windows are expected
    with pytest.raises(CheckpointError, match="is a safetensors file"):
        export_safetensors(renamed, tmp_path / "again.safetensors")
    zipped = tmp_path / "zip.safetensors"
    zipped.write_bytes(window["path"].read_bytes())
    with pytest.raises(CheckpointError, match="torch \\(zip\\) checkpoint, not a safetensors file"):
        load_window_weights(zipped)
