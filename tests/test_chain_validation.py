"""Issue 12 item 6: whole-chain validation. Training the detail window with ``val.chain=[shape window]`` logs the
deployed chain's SWD and artifact rate to the CSV log and writes a chain grid; the logged SWD is recomputed here
from the saved checkpoints (Chain.from_paths of both windows, the same latents and noise, the f4, metrics.swd)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import hydra
import pytest
from omegaconf import OmegaConf
import torch
from conftest import compose_config
from pipeline import World

from refiner.apps.train import ConfigError, run
from refiner.errors import SettingError


def detail_overrides(world: World, shape: dict, *extra: str) -> list[str]:
    return world.refiner_overrides("demo_refiner_751_1000", f"init_from={shape['last_ckpt']}", "logger=csv",
                                   f"val.chain=[{shape['last_ckpt']}]", "val.checker=true", "val.samples=3",
                                   "val.t_start=399", "val.steps=6", *extra)


def read_metrics(output_dir: Path) -> list[dict]:
    (path,) = Path(output_dir).glob("csv/version_*/metrics.csv")
    with open(path) as f:
        return list(csv.DictReader(f))


def test_chain_validation_logs_swd_and_artifact_rate_and_writes_a_grid(world, shape_window, tmp_path):
    from refiner.data.checker import artifact_rate
    from refiner.data.images import to_uint8
    from refiner.formats.first_stage import first_stage_from_mapping
    from refiner.inference.chain import Chain
    from refiner.lit.window_module import step_seed
    from refiner.metrics import swd

    cfg = compose_config("train", detail_overrides(world, shape_window), tmp_path / "run")
    result = run(cfg)
    rows = [r for r in read_metrics(tmp_path / "run") if r.get("val_chain/swd_x1e3")]
    assert [int(r["step"]) for r in rows] == [1, 3]  # validations at global steps 2 and 4 (logged at step - 1)
    for r in rows:
        for key in ("swd_x1e3", "artifact_rate", "input_swd_x1e3", "input_artifact_rate"):
            assert math.isfinite(float(r[f"val_chain/{key}"])), key
        assert 0 <= float(r["val_chain/artifact_rate"]) <= 1
    assert sorted(p.name for p in (tmp_path / "run" / "val_grids").glob("chain_step_*.png")) == [
        "chain_step_0000002.png", "chain_step_0000004.png"]

    # recompute the last validation from the files: the detail window's EMA weights at step 4 are its last.ckpt
    chain = Chain.from_paths([shape_window["last_ckpt"], result["last_ckpt"]])
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.setup("fit")
    batch = next(iter(datamodule.val_dataloader()))
    z = batch["z_degraded"][:3].float() * chain.scale_factor
    noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(step_seed(0, 0)))
    latent = chain.refine(z, 399, 6, noise=noise).latent / chain.scale_factor
    f4 = first_stage_from_mapping(OmegaConf.to_container(cfg.model.first_stage, resolve=True), "f4")
    with torch.no_grad():
        images = f4.decode(latent).clamp(-1, 1)
    clean = batch["clean"][:3].float()
    expected_swd = swd((images.double() + 1) / 2, (clean.double() + 1) / 2)["mean"]
    assert float(rows[-1]["val_chain/swd_x1e3"]) == pytest.approx(expected_swd, rel=1e-4)
    assert float(rows[-1]["val_chain/artifact_rate"]) == artifact_rate([to_uint8(x) for x in images])
    degraded = batch["degraded"][:3].float()
    assert float(rows[-1]["val_chain/input_swd_x1e3"]) == pytest.approx(
        swd((degraded.double() + 1) / 2, (clean.double() + 1) / 2)["mean"], rel=1e-6)


def test_chain_validation_settings_are_checked_before_training(world, shape_window, tmp_path):
    from refiner.inference.chain import ChainError

    with pytest.raises(ConfigError, match="val.chain entry .*not found"):
        run(compose_config("train", detail_overrides(world, shape_window, f"val.chain=[{tmp_path}/nope.ckpt]"),
                           tmp_path / "a"))
    # the chain must cover the grid from t_start: 600 lies above the shape window [250, 500)
    with pytest.raises(ChainError, match="t_start=600"):
        run(compose_config("train", detail_overrides(world, shape_window, "val.t_start=600"), tmp_path / "b"))
    with pytest.raises(SettingError, match="val.input must be one of"):
        run(compose_config("train", detail_overrides(world, shape_window, "val.input=noisy"), tmp_path / "c"))
    # the window being trained overlaps the listed one
    overlapping = world.refiner_overrides("demo_refiner_500_750", f"val.chain=[{shape_window['last_ckpt']}]")
    with pytest.raises(ChainError, match="overlap"):
        run(compose_config("train", overlapping, tmp_path / "d"))


def test_ranks_with_different_validation_lists_are_refused():
    """Under DDP the ranks' checksums of the clean images they took must agree (see chain_validation's docstring);
    a fake 2-rank strategy whose peer took other images."""
    from types import SimpleNamespace

    from refiner.lit.chain_validation import _gather

    class PeerDiffers:
        def all_gather(self, x):
            return torch.stack([x, x + 1])

        def broadcast(self, obj, src=0):
            return obj

    trainer = SimpleNamespace(world_size=2, global_rank=0, is_global_zero=True, strategy=PeerDiffers())
    outputs = [(torch.tensor([0]), torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 4))]
    with pytest.raises(SettingError, match="ranks validate on different lists"):
        _gather(trainer, outputs, seen=2, checksum=12.5)
