"""refiner.formats.fingerprint: the documented recipe, layout independence, and where it is recorded."""

import hashlib
import json

import torch
from helpers_compvis import make_first_stage_checkpoint, make_window_checkpoint
from safetensors import safe_open

from refiner.formats.exports import export_safetensors
from refiner.formats.first_stage import first_stage_file_fingerprint
from refiner.formats.fingerprint import first_stage_fingerprint
from refiner.formats.loading import load_init_weights, load_window_weights
from refiner.models.unet import tiny_unet_params
from refiner.models.vq import VQModel


def test_fingerprint_follows_the_documented_recipe():
    state = {"b.weight": torch.tensor([[1.5, -2.0]], dtype=torch.float64), "a.count": torch.tensor([3], dtype=torch.int64)}
    h = hashlib.sha256(b"refiner-first-stage-fingerprint/1\n")
    h.update(b"a.count int64 [1]\n" + (3).to_bytes(8, "little"))
    h.update(b"b.weight float32 [1, 2]\n" + torch.tensor([1.5, -2.0]).numpy().tobytes())
    assert first_stage_fingerprint(state) == h.hexdigest()[:16]


def test_fingerprint_ignores_layout_and_training_keys_but_not_weights(tmp_path):
    made = make_first_stage_checkpoint(tmp_path)  # taming layout: Lightning state_dict with loss.* keys
    model = VQModel(**made["params"])
    model.load_state_dict(made["state"])
    bare = tmp_path / "bare.pt"
    torch.save(made["state"], bare)
    fp = first_stage_file_fingerprint(made["path"])
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert fp == first_stage_fingerprint(model) == first_stage_file_fingerprint(bare) == first_stage_fingerprint(made["state"])
    changed = dict(made["state"])
    changed["decoder.conv_out.bias"] = changed["decoder.conv_out.bias"] + 1e-3
    assert first_stage_fingerprint(changed) != fp


def test_fingerprint_travels_through_checkpoint_export_and_init_from(tmp_path):
    made = make_window_checkpoint(tmp_path, tiny_unet_params())
    ckpt = torch.load(made["path"], weights_only=True)
    ckpt["hyper_parameters"]["first_stage_fingerprint"] = "0123456789abcdef"
    torch.save(ckpt, made["path"])
    assert load_window_weights(made["path"]).first_stage_fingerprint == "0123456789abcdef"
    out = export_safetensors(made["path"], tmp_path / "w.safetensors")
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata()["first_stage_fingerprint"] == "0123456789abcdef"
    assert load_window_weights(out).first_stage_fingerprint == "0123456789abcdef"
    assert load_init_weights(out)[1]["first_stage_fingerprint"] == "0123456789abcdef"
    old = make_window_checkpoint(tmp_path, tiny_unet_params(), name="old.ckpt")  # no fingerprint: None
    assert load_window_weights(old["path"]).first_stage_fingerprint is None
    old_export = export_safetensors(old["path"], tmp_path / "old.safetensors")
    assert load_window_weights(old_export).first_stage_fingerprint is None
    assert json.loads(json.dumps(load_init_weights(old["path"])[1]["first_stage_fingerprint"])) is None
