"""Issue 12 item 7: the plain ``.safetensors`` export writes a model card beside its file, field by field right,
never over a file it did not create (unless forced), and its metadata keeps the card's metrics and data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers_compvis import make_window_checkpoint
from safetensors import safe_open

from refiner.apps.export import main as export_main
from refiner.formats.model_card import card_entry, export_card_path
from refiner.formats.exports import export_safetensors
from refiner.formats.loading import load_window_weights
from refiner.io import OutputPathError
from refiner.models.unet import tiny_unet_params

CALLBACKS = {"LastAndBestCheckpoint{'monitor': 'val/loss', 'mode': 'min'}": {"monitor": "val/loss",
                                                                            "best_model_score": 0.0375}}


@pytest.fixture
def run_ckpt(tmp_path) -> Path:
    """A detail window ``<run>/checkpoints/last.ckpt`` (v-prediction, step 600, best val/loss 0.0375, a
    fingerprint) beside its run's ``config_resolved.yaml``, as a training run leaves them."""
    ckpts = tmp_path / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    made = make_window_checkpoint(ckpts, tiny_unet_params(), window=(0, 250), parameterization="v", global_step=600,
                                  name="last.ckpt")
    ckpt = torch.load(made["path"], weights_only=True)
    ckpt["hyper_parameters"]["first_stage_fingerprint"] = "9163722438a5f758"
    ckpt["callbacks"] = CALLBACKS
    torch.save(ckpt, made["path"])
    (tmp_path / "run" / "config_resolved.yaml").write_text(
        "data:\n  train_shards: data/shards/heads/train\n  val_shards: data/shards/heads/val\n"
        "  mode: deterministic\n  batch_size: 16\nmodel:\n  base_lr: 1.0e-4\n")
    return made["path"]


def card_fields(card: str) -> dict[str, str]:
    """The card's ``| field | value |`` rows."""
    rows = [line.strip("|").split(" | ", 1) for line in card.splitlines() if line.startswith("| ")]
    return {k.strip(): v.strip() for k, v in rows if k.strip() != "field"}


def test_safetensors_export_writes_a_card_with_every_field(run_ckpt, tmp_path):
    out = export_safetensors(run_ckpt, tmp_path / "out" / "detail.safetensors")
    card_path = tmp_path / "out" / "detail.README.md"
    assert sorted(p.name for p in out.parent.iterdir()) == ["detail.README.md", "detail.safetensors"]  # no temps
    card = card_path.read_text()
    assert card.startswith("---\nlibrary_name: refiner\n") and "# refiner window expert [0, 250)" in card
    assert card_fields(card) == {
        "window": "t in [0, 250)",
        "schedule": "linear in sqrt(beta) (CompVis 'linear'), beta 0.0015 -> 0.0195, T=1000",
        "parameterization": "v",
        "scale factor": "1",
        "first-stage fingerprint": "9163722438a5f758",
        "training data": "train_shards=data/shards/heads/train, val_shards=data/shards/heads/val, "
                         "mode=deterministic, batch_size=16 (from config_resolved.yaml)",
        "steps": "600",
        "weights": "EMA",
        "validation": "best val/loss = 0.0375",
        "source": f"`{run_ckpt}`",
    }
    # the usage snippet names the file it sits beside
    assert "load_window_weights('detail.safetensors')" in card


def test_raw_export_and_unrecorded_fields_say_so(tmp_path):
    bare = make_window_checkpoint(tmp_path, tiny_unet_params(), global_step=7)["path"]
    out = export_safetensors(bare, tmp_path / "w.safetensors", use_ema=False)
    fields = card_fields(export_card_path(out).read_text())
    assert fields["weights"] == "raw" and fields["steps"] == "7" and fields["parameterization"] == "eps"
    assert fields["first-stage fingerprint"] == "unknown" and fields["training data"] == "not recorded"
    assert fields["validation"] == "not recorded" and fields["window"] == "t in [250, 500)"
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert meta["validation_metrics"] == "{}" and meta["data_description"] == ""


def test_metadata_keeps_the_cards_metrics_and_data_for_later_cards(run_ckpt, tmp_path):
    """A card written from the exported file alone (as the diffusers export of a .safetensors does) has the same
    validation metrics and training data as the checkpoint's own card."""
    out = export_safetensors(run_ckpt, tmp_path / "elsewhere" / "detail.safetensors")
    with safe_open(str(out), framework="pt") as f:
        meta = dict(f.metadata())
    assert json.loads(meta["validation_metrics"]) == {"best val/loss": 0.0375}
    again = card_entry(out, load_window_weights(out), meta)  # no config_resolved.yaml beside it
    assert again.validation == {"best val/loss": 0.0375}
    assert again.training_data.startswith("train_shards=data/shards/heads/train, ")
    assert again.first_stage_fingerprint == "9163722438a5f758" and again.global_step == 600


@pytest.mark.parametrize("name, card", [("w.safetensors", "w.README.md"), ("w", "w.README.md"),
                                        ("w.v2.safetensors", "w.v2.README.md"), ("w.bin", "w.bin.README.md")])
def test_card_path_beside_the_file(name, card, tmp_path):
    assert export_card_path(tmp_path / name) == tmp_path / card


def test_an_existing_card_is_replaced_only_if_it_is_ours(run_ckpt, tmp_path):
    mine = tmp_path / "detail.README.md"
    mine.write_text("a README the user wrote\n")
    out = tmp_path / "detail.safetensors"
    with pytest.raises(OutputPathError, match=r"model card .*detail.README.md already exists"):
        export_safetensors(run_ckpt, out)
    assert mine.read_text() == "a README the user wrote\n" and not out.exists()  # nothing written
    assert export_main(["safetensors", str(run_ckpt), str(out)]) == 2  # the CLI: a one-line error, exit 2
    assert mine.read_text() == "a README the user wrote\n" and not out.exists()
    assert export_main(["safetensors", str(run_ckpt), str(out), "--force"]) == 2  # --force: only a card of ours
    assert mine.read_text() == "a README the user wrote\n" and not out.exists()
    mine.unlink()
    assert export_main(["safetensors", str(run_ckpt), str(out)]) == 0
    assert export_main(["safetensors", str(run_ckpt), str(out), "--force"]) == 0  # our previous card is replaced
    assert card_fields(mine.read_text())["steps"] == "600"


def test_the_card_may_not_be_the_input_even_with_force(run_ckpt, tmp_path):
    named = run_ckpt.parent / "last.README.md"
    named.symlink_to(run_ckpt)  # the card path of last.safetensors is (a link to) the input
    before = run_ckpt.read_bytes()
    with pytest.raises(OutputPathError, match="is the input"):
        export_safetensors(run_ckpt, run_ckpt.parent / "last.safetensors", force=True)
    assert run_ckpt.read_bytes() == before


def test_export_cli_safetensors_writes_file_and_card(run_ckpt, tmp_path, capsys):
    out = tmp_path / "cli" / "shape.safetensors"
    assert export_main(["safetensors", str(run_ckpt), str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert card_fields((tmp_path / "cli" / "shape.README.md").read_text())["validation"] == "best val/loss = 0.0375"
    assert export_main(["safetensors", str(run_ckpt), str(out)]) == 2  # exists: refused without --force
