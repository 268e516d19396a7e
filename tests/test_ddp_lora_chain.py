"""Issue 12 items 4 and 6 under DDP (2 processes, gloo on CPU): a LoRA detail window trained with whole-chain
validation. Training changes only the adapters, identically on both ranks, and the adapter checkpoint loads
(merged onto its base, and as a chain expert). Whole-chain validation splits the samples between the ranks and its
logged metrics cover all of them: they are recomputed here from the saved checkpoints over every validation
sample, and differ from what rank 0's share alone would score."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import hydra
from omegaconf import OmegaConf
import pytest
import torch
from conftest import ROOT, TINY_TRAINER, compose_config
from pipeline import TINY_UNET
from test_chain_validation import read_metrics

pytestmark = pytest.mark.slow


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "tests"), WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    env.pop("LOCAL_RANK", None)
    return env


def _chain_outputs(cfg, experts: list, n: int):
    """The chain's outputs for the first ``n`` validation samples, as one process computes them (whole batches,
    the batch's noise from (val.seed=0, batch index)), and the clean images."""
    from refiner.formats.first_stage import first_stage_from_mapping
    from refiner.inference.chain import Chain
    from refiner.lit.window_module import step_seed

    chain = Chain.from_paths(experts)
    f4 = first_stage_from_mapping(OmegaConf.to_container(cfg.model.first_stage, resolve=True), "f4")
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.setup("fit")
    images, clean = [], []
    for b, batch in enumerate(datamodule.val_dataloader()):
        k = min(n - sum(len(c) for c in clean), len(batch["clean"]))
        if k <= 0:
            break
        z = batch["z_degraded"][:k].float() * chain.scale_factor
        noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(step_seed(0, b)))
        with torch.no_grad():
            images.append(f4.decode(chain.refine(z, 399, 6, noise=noise).latent / chain.scale_factor).clamp(-1, 1))
        clean.append(batch["clean"][:k].float())
    return torch.cat(images), torch.cat(clean)


def test_lora_window_with_chain_validation_under_two_process_ddp(world, shape_window, tmp_path):
    from refiner.formats.loading import load_window_checkpoint, load_window_weights
    from refiner.lit.chain_validation import chain_metrics
    from refiner.models.lora import is_adapter_key

    shape, out = shape_window["last_ckpt"], tmp_path / "ddp"
    extra = [f"init_from={shape}", "model.lora.rank=4", "model.lora.alpha=8", "model.base_lr=1e-2", "logger=csv",
             f"val.chain=[{shape}]", "val.checker=true", "val.samples=7", "val.t_start=399", "val.steps=6",
             # the tiny world validates on one image: validate on two batches of the training shards (7 = 4 + 3)
             f"data.val_shards={world.shards_dir / 'demo' / 'train'}", "trainer.limit_val_batches=2"]
    tiny = [o for o in TINY_TRAINER if not o.startswith("trainer=")]
    overrides = ["experiment=demo_refiner_751_1000", *tiny, *world.paths(), *TINY_UNET, *extra]
    cmd = [sys.executable, "train.py", "trainer=ddp_cpu", *overrides, f"hydra.run.dir={out}",
           "+callbacks.probe._target_=probe_callback.RecordChainAndChanges"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    probes = [json.loads((out / f"probe_chain_rank{r}.json").read_text()) for r in (0, 1)]
    assert [p["world_size"] for p in probes] == [2, 2]

    # LoRA: only adapter weights changed, the same on both ranks; the checkpoint holds only them and loads
    assert probes[0]["changed"] and all(is_adapter_key(k) for k in probes[0]["changed"])
    assert any(".lora_B." in k for k in probes[0]["changed"])  # B starts at zero: it moved
    assert probes[0]["changed"] == probes[1]["changed"]
    assert probes[0]["changed_sha256"] == probes[1]["changed_sha256"], "ranks' adapters diverged"
    last = out / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["global_step"] == 4
    for section in ("state_dict", "current_model_state"):
        assert ckpt[section] and all(is_adapter_key(k) for k in ckpt[section]), section
    assert ckpt["hyper_parameters"]["lora_base"]["path"] == str(Path(shape).resolve())
    base, merged = load_window_checkpoint(shape).unet_state, load_window_weights(last).unet_state
    assert set(merged) == set(base) and merged.keys() == base.keys()
    moved = [k for k in base if not torch.equal(merged[k], base[k])]
    assert moved and all(k.endswith(".weight") for k in moved)  # merged adapters moved some base weights only

    # whole-chain validation: sample i refined on rank i % 2, and the logged metrics cover every sample
    cfg = compose_config("train", [*overrides, "trainer=cpu"], tmp_path / "unused")
    images, clean = _chain_outputs(cfg, [shape, str(last)], 7)
    n = len(images)
    assert n == 7
    assert probes[0]["refined_indices"] == list(range(0, n, 2))
    assert probes[1]["refined_indices"] == list(range(1, n, 2))
    row = [r for r in read_metrics(out) if r.get("val_chain/swd_x1e3")][-1]
    want = chain_metrics(images, clean, checker=True)
    assert float(row["val_chain/swd_x1e3"]) == pytest.approx(want["swd_x1e3"], rel=1e-3)
    assert float(row["val_chain/artifact_rate"]) == pytest.approx(want["artifact_rate"])
    share = chain_metrics(images[0::2], clean[0::2], checker=True)  # what rank 0's share alone scores
    assert float(row["val_chain/swd_x1e3"]) != pytest.approx(share["swd_x1e3"], rel=1e-2)
    assert len(list((out / "val_grids").glob("chain_step_*.png"))) == 2  # written by rank 0 only, per validation
