"""Issue 12 item 4: LoRA per window through peft. Only adapters train (base bit-identical), EMA of adapters only,
adapter-only checkpoints with a checked base reference, exact resume, merged loading into a Chain, exports
(merged safetensors, peft folder), size. Merges are checked against a hand-computed W + (alpha/r) B A."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from conftest import compose_config
from test_window_module import RandomLatents
from torch.utils.data import DataLoader

from refiner.apps.train import ConfigError, run
from refiner.diffusion import ScheduleConfig
from refiner.errors import SettingError
from refiner.formats.safe_load import CheckpointError
from refiner.formats.loading import load_window_checkpoint, load_window_weights
from refiner.formats.lora import load_adapter_state, load_base_state
from refiner.lit.ema import TrainableEMA
from refiner.lit.window_module import WindowRefiner
from refiner.models.lora import (
    LoraSettings,
    base_state,
    inject_lora,
    is_adapter_key,
)
from refiner.models.unet import UNetModel

LORA = ["model.lora.rank=4", "model.lora.alpha=8"]


@pytest.fixture(scope="module")
def base_window(shape_window) -> dict:
    """The shared shape window (conftest), the base of the adapters here."""
    return shape_window


@pytest.fixture(scope="module")
def lora_window(world, base_window, tmp_path_factory) -> dict:
    """A LoRA detail window t in [0, 250) on top of the shape window."""
    return world.train_refiner("demo_refiner_751_1000", tmp_path_factory.mktemp("lora"), *LORA,
                               f"init_from={base_window['last_ckpt']}", "model.base_lr=1e-2")


def demo_unet_params() -> dict:
    """The demo size: conf/model/refiner_tiny.yaml's UNet."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(compose_config("train", [], Path("/tmp/unused")).model.unet, resolve=True)


def lora_merge_reference(base: dict, adapters: dict, scale: float) -> dict:
    """W + scale * B A by hand, for 1x1 Conv1d/Linear and kxk Conv2d layers (A: r x in x k x k, B: out x r x 1 x 1)."""
    merged = dict(base)
    for key in adapters:
        if ".lora_A." not in key:
            continue
        layer = key.split(".lora_A.")[0]
        a, b = adapters[key].double(), adapters[key.replace(".lora_A.", ".lora_B.")].double()
        w = base[layer + ".weight"].double()
        if w.ndim == 2:
            delta = b @ a
        else:  # conv: delta[o, i, ...] = sum_r B[o, r] A[r, i, ...]
            delta = torch.einsum("or,ri...->oi...", b.reshape(b.shape[0], b.shape[1]), a)
        merged[layer + ".weight"] = (w + scale * delta).float()
    return merged


# -- the module: only adapters train, EMA of adapters only -----------------------------------------------------
class Record(pl.Callback):
    def __init__(self):
        self.adapters = []

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.adapters.append({k: v.detach().clone() for k, v in pl_module.named_parameters() if v.requires_grad})


def lora_module(unet_params: dict, rank=4, **kw) -> WindowRefiner:
    return WindowRefiner(unet=unet_params, window=dict(t_min=0, t_max=250, num_timesteps=1000),
                         schedule=ScheduleConfig().to_dict(), base_lr=1e-2,
                         lora=dict(rank=rank, alpha=8.0, targets=["qkv", "proj_out", "in_layers.2", "out_layers.3"]),
                         **kw)


def test_training_changes_only_adapters_and_ema_tracks_only_them(tmp_path):
    from helpers_compvis import randomized
    from pytorch_lightning.callbacks import ModelCheckpoint

    params = dict(image_size=8, in_channels=3, out_channels=3, model_channels=32, channel_mult=[1, 2],
                  num_res_blocks=1, attention_resolutions=[2], num_head_channels=16)
    base = randomized(UNetModel(**params), seed=3)
    module = lora_module(params)
    module.load_base_weights(base, "base")
    adapters0 = {k: v.clone() for k, v in module.named_parameters() if v.requires_grad}
    assert adapters0 and all(".lora_" in k for k in adapters0)
    record, decay = Record(), 0.9
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=5)
    trainer = pl.Trainer(max_steps=5, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path, limit_val_batches=0,
                         callbacks=[TrainableEMA(decay=decay), record, saver])
    trainer.fit(module, train_dataloaders=DataLoader(RandomLatents(shape=(3, 8, 8)), batch_size=None))

    for key, value in base_state(module.unet).items():  # every base parameter bit-identical
        assert torch.equal(value, base[key]), key
    assert all(not torch.equal(module.unet.state_dict()[k[len("unet."):]], v) for k, v in adapters0.items()
               if ".lora_B." in k)  # B starts at zero and moved
    opt_params = [p for g in trainer.optimizers[0].param_groups for p in g["params"]]
    assert len(opt_params) == len(adapters0)

    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert set(ckpt["state_dict"]) == set(ckpt["current_model_state"]) == set(adapters0)
    # EMA by hand: the first update copies, then ema = d * ema + (1 - d) * p (torch's get_ema_avg_fn)
    ema = dict(record.adapters[0])
    for step in record.adapters[1:]:
        ema = {k: decay * ema[k] + (1 - decay) * step[k] for k in ema}
    for k in ema:
        torch.testing.assert_close(ckpt["state_dict"][k], ema[k], rtol=1e-6, atol=1e-7)
        assert torch.equal(ckpt["current_model_state"][k], record.adapters[-1][k])
    assert int(ckpt["averaging_state"]["n_averaged"]) == 5


def test_lora_settings_and_targets_are_checked():
    with pytest.raises(SettingError, match="model.lora.rank must be"):
        LoraSettings.from_config({"rank": -1})
    with pytest.raises(SettingError, match="unknown keys \\['ranks'\\]"):
        LoraSettings.from_config({"ranks": 4})
    assert LoraSettings.from_config({"rank": 0}) is None and LoraSettings.from_config(None) is None
    assert LoraSettings.from_config({"rank": 4}).alpha == 4.0
    with pytest.raises(SettingError, match="'attn1' matches no Linear/Conv layer"):
        inject_lora(UNetModel(**demo_unet_params()), LoraSettings(rank=2, alpha=2.0, targets=("attn1",)))


def test_merge_matches_the_hand_computed_update_and_the_unmerged_forward():
    from helpers_compvis import randomized

    from refiner.formats.lora import merged_unet_state

    params = demo_unet_params()
    settings = LoraSettings(rank=4, alpha=8.0)
    base = randomized(UNetModel(**params), seed=1)
    injected = inject_lora(UNetModel(**params), settings)
    adapters = {k: v for k, v in randomized(injected, seed=2).items() if is_adapter_key(k)}
    merged = merged_unet_state(base, adapters, params, settings, "test")
    reference = lora_merge_reference(base, adapters, scale=8.0 / 4)
    assert merged.keys() == reference.keys()
    for k in reference:
        torch.testing.assert_close(merged[k], reference[k], rtol=1e-5, atol=1e-6)
    load_base_state(injected, base, "base")
    load_adapter_state(injected, adapters, "adapters")
    plain = UNetModel(**params)
    plain.load_state_dict(merged)
    x, t = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 400])
    with torch.no_grad():
        torch.testing.assert_close(plain(x, t), injected.eval()(x, t), rtol=1e-4, atol=1e-5)


# -- through the real config: checkpoints, loading, resume ------------------------------------------------------
def test_lora_checkpoint_holds_adapters_and_a_base_reference(lora_window, base_window):
    from refiner.formats.fingerprint import weights_fingerprint

    ckpt = torch.load(lora_window["last_ckpt"], weights_only=True)
    hp = ckpt["hyper_parameters"]
    assert hp["lora"] == {"rank": 4, "alpha": 8.0, "targets": ["qkv", "proj_out", "in_layers.2", "out_layers.3"],
                          "dropout": 0.0}
    base = load_window_checkpoint(base_window["last_ckpt"], use_ema=True)
    assert hp["lora_base"] == {"path": str(Path(base_window["last_ckpt"]).resolve()), "use_ema": True,
                               "fingerprint": weights_fingerprint(base.unet_state)}
    for section in ("state_dict", "current_model_state"):
        assert ckpt[section] and all(".lora_" in k for k in ckpt[section]), section
    # loading merges: base + (alpha / rank) B A with the EMA adapters, by hand
    merged = load_window_weights(lora_window["last_ckpt"])
    adapters = {k[len("unet."):]: v for k, v in ckpt["state_dict"].items()}
    reference = lora_merge_reference(base.unet_state, adapters, scale=8.0 / 4)
    changed = 0
    for k, v in reference.items():
        torch.testing.assert_close(merged.unet_state[k], v, rtol=1e-5, atol=1e-6)
        changed += not torch.equal(v, base.unet_state[k])
    assert changed > 0
    assert (merged.window.t_min, merged.window.t_max) == (0, 250)


def test_a_changed_or_missing_base_is_refused(world, base_window, tmp_path):
    import shutil

    base = tmp_path / "base.ckpt"
    shutil.copy(base_window["last_ckpt"], base)
    out = world.train_refiner("demo_refiner_751_1000", tmp_path / "run", *LORA, f"init_from={base}",
                              "trainer.max_steps=2")
    load_window_weights(out["last_ckpt"])  # fine while the base is unchanged
    obj = torch.load(base, weights_only=True)
    obj["state_dict"]["unet.out.2.bias"] += 1e-3
    torch.save(obj, base)
    with pytest.raises(CheckpointError, match=r"base of its LoRA adapters, .*base\.ckpt, has changed"):
        load_window_weights(out["last_ckpt"])
    base.unlink()
    with pytest.raises(CheckpointError, match=r"base\.ckpt, is not found"):
        load_window_weights(out["last_ckpt"])


def test_lora_resume_continues_exactly(world, base_window, tmp_path):
    from test_training import _assert_same_training_state

    common = [*LORA, f"init_from={base_window['last_ckpt']}", "trainer.val_check_interval=2", "model.warmup_steps=6"]
    full = world.train_refiner("demo_refiner_751_1000", tmp_path / "full", "trainer.max_steps=6", *common)
    half = world.train_refiner("demo_refiner_751_1000", tmp_path / "half", "trainer.max_steps=2", *common)
    resumed = world.train_refiner("demo_refiner_751_1000", tmp_path / "half", "trainer.max_steps=6",
                                  *[c for c in common if not c.startswith("init_from")], "init_from=null",
                                  f"ckpt_path={half['last_ckpt']}")
    assert resumed["global_step"] == 6
    a, b = torch.load(full["last_ckpt"], weights_only=True), torch.load(resumed["last_ckpt"], weights_only=True)
    _assert_same_training_state(a, b)
    assert a["hyper_parameters"]["lora_base"] == b["hyper_parameters"]["lora_base"]


def test_lora_without_a_base_is_refused(world, tmp_path):
    overrides = world.refiner_overrides("demo_refiner_500_750", *LORA)
    with pytest.raises(ConfigError, match="model.lora.rank=4 trains adapters on top of a base: give init_from"):
        run(compose_config("train", overrides, tmp_path / "run"))


def test_chain_with_a_lora_detail_stage_runs_the_unmerged_adapters(base_window, lora_window):
    """Chain.from_paths accepts the adapter checkpoint as a expert; its output equals a chain whose detail UNet is
    the peft-wrapped (unmerged) base + adapters."""
    from refiner.inference.chain import Chain

    chain = Chain.from_paths([base_window["last_ckpt"], lora_window["last_ckpt"]])
    ckpt = torch.load(lora_window["last_ckpt"], weights_only=True)
    base = load_window_checkpoint(base_window["last_ckpt"])
    wrapped = inject_lora(UNetModel(**base.unet_params), LoraSettings.from_config(ckpt["hyper_parameters"]["lora"]))
    load_base_state(wrapped, base.unet_state, "base")
    load_adapter_state(wrapped, {k[len("unet."):]: v for k, v in ckpt["state_dict"].items()}, "adapters")
    reference = Chain.from_unets([base.build_unet(), wrapped.eval()], [s.weights.window for s in chain.experts],
                                 base.schedule, unet_params=base.unet_params, scale_factor=chain.scale_factor)
    z = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(1))
    out = chain.refine(z, 399, 8, noise=noise).latent
    ref = reference.refine(z, 399, 8, noise=noise).latent
    assert [s.weights.window.t_max for s in chain.experts] == [500, 250]
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


# -- exports and size ----------------------------------------------------------------------------------------
def test_safetensors_export_merges_and_peft_folder_loads_in_peft(lora_window, base_window, tmp_path, capsys,
                                                                 monkeypatch):
    from peft import PeftModel

    from refiner.apps.export import inspect_main
    from refiner.apps.export import main as export_main

    merged = load_window_weights(lora_window["last_ckpt"])
    assert export_main(["safetensors", lora_window["last_ckpt"], str(tmp_path / "w.safetensors")]) == 0
    assert inspect_main([lora_window["last_ckpt"]]) == 0
    assert "LoRA adapters only (rank 4, alpha 8) on base " + str(Path(base_window["last_ckpt"]).resolve()) in \
        capsys.readouterr().out
    exported = load_window_weights(tmp_path / "w.safetensors")
    assert all(torch.equal(exported.unet_state[k], v) for k, v in merged.unet_state.items())

    out = tmp_path / "peft"
    assert export_main(["peft", lora_window["last_ckpt"], str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8.0 and config["peft_type"] == "LORA"
    assert config["base_model_name_or_path"] == str(Path(base_window["last_ckpt"]).resolve())
    peft_unet = PeftModel.from_pretrained(load_window_weights(base_window["last_ckpt"]).build_unet(), str(out)).eval()
    x, t = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([5, 200])
    with torch.no_grad():
        torch.testing.assert_close(peft_unet(x, t), merged.build_unet()(x, t), rtol=1e-4, atol=1e-5)
    card = (out / "README.md").read_text()
    assert "| adapters | LoRA rank 4 (alpha 8.0" in card and config["base_model_name_or_path"] in card
    monkeypatch.chdir(tmp_path)  # the card's usage snippet runs as written, beside the folder
    namespace: dict = {}
    exec(card.split("```python\n")[1].split("```")[0], namespace)
    with torch.no_grad():
        torch.testing.assert_close(namespace["unet"].eval()(x, t), merged.build_unet()(x, t), rtol=1e-4, atol=1e-5)
    assert export_main(["peft", lora_window["last_ckpt"], str(out)]) == 2  # exists: refused without --force
    assert export_main(["peft", base_window["last_ckpt"], str(tmp_path / "p2")]) == 2  # not a LoRA window
    assert not (tmp_path / "p2").exists()

    # the diffusers export merges too: its unet/ reads back as the merged weights
    from refiner.formats.diffusers.folders import load_diffusers_unet

    assert export_main(["diffusers", lora_window["last_ckpt"], str(tmp_path / "hf")]) == 0
    state, _ = load_diffusers_unet(tmp_path / "hf" / "unet")
    assert all(torch.equal(state[k], v) for k, v in merged.unet_state.items())


def test_adapter_checkpoint_is_over_10x_smaller_than_a_full_one_at_demo_size(tmp_path):
    from pytorch_lightning.callbacks import ModelCheckpoint

    params = demo_unet_params()
    sizes = {}
    for name, lora in (("full", None), ("lora", dict(rank=4))):
        module = WindowRefiner(unet=params, window=dict(t_min=0, t_max=250, num_timesteps=1000),
                               schedule=ScheduleConfig().to_dict(), lora=lora)
        saver = ModelCheckpoint(dirpath=tmp_path / name, save_last=True, every_n_train_steps=2)
        trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                             enable_model_summary=False, default_root_dir=tmp_path, limit_val_batches=0,
                             callbacks=[TrainableEMA(decay=0.9), saver])
        trainer.fit(module, train_dataloaders=DataLoader(RandomLatents(shape=(3, 16, 16)), batch_size=None))
        sizes[name] = (tmp_path / name / "last.ckpt").stat().st_size
    assert sizes["full"] >= 10 * sizes["lora"], sizes
