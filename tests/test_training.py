"""Training through the real config and entry points: finetune chain, exact resume, presets, bad input."""

from __future__ import annotations

from pathlib import Path

import hydra
import pytest
import torch
from conftest import CONF, TINY_TRAINER, compose_config
from pipeline import World

from refiner.apps.train import ConfigError, apply_init_from, read_init_from, resolve_scale_factor, run
from refiner.formats.safe_load import CheckpointError
from refiner.formats.loading import load_window_checkpoint


def test_shape_window_checkpoint_records_window_schedule_and_ema(shape_window):
    ckpt = torch.load(shape_window["last_ckpt"], weights_only=True)
    assert ckpt["global_step"] == 4
    assert ckpt["hyper_parameters"]["window"] == {"t_min": 250, "t_max": 500, "num_timesteps": 1000}
    assert ckpt["hyper_parameters"]["schedule"]["kind"] == "linear"
    assert "current_model_state" in ckpt and "averaging_state" in ckpt  # EMA + raw weights
    assert (Path(shape_window["output_dir"]) / "config_resolved.yaml").is_file()
    assert list((Path(shape_window["output_dir"]) / "val_grids").glob("*.png"))


def test_detail_window_finetunes_from_the_shape_window(world, shape_window, tmp_path):
    overrides = world.refiner_overrides("demo_refiner_751_1000", f"init_from={shape_window['last_ckpt']}")
    cfg = compose_config("train", overrides, tmp_path / "r751")
    state, info = read_init_from(cfg)
    resolve_scale_factor(cfg, info)
    model = hydra.utils.instantiate(cfg.model)
    apply_init_from(model, cfg, state, info)
    source = load_window_checkpoint(shape_window["last_ckpt"], use_ema=True)
    assert info is not None and source.has_ema
    for key, value in source.unet_state.items():
        assert torch.equal(model.unet.state_dict()[key], value), key  # EMA weights were copied

    result = run(compose_config("train", overrides, tmp_path / "r751"))
    ckpt = torch.load(result["last_ckpt"], weights_only=True)
    assert ckpt["hyper_parameters"]["window"]["t_max"] == 250  # the new window
    shape_hp = torch.load(shape_window["last_ckpt"], weights_only=True)["hyper_parameters"]
    assert ckpt["hyper_parameters"]["scale_factor"] == shape_hp["scale_factor"]  # inherited, so they chain
    assert ckpt["global_step"] == 4  # step count starts fresh (weights only, new optimizer)
    assert ckpt["optimizer_states"][0]["state"][0]["step"].item() == 4


def test_auto_scale_factor_is_one_over_the_latent_std(world, shape_window):
    from refiner.data.latents import expand_shards, read_all_samples

    samples = read_all_samples(expand_shards(world.shards_dir / "demo/train"), keys=("z_clean",))
    std = torch.cat([s["z_clean"].double().flatten() for s in samples]).std().item()
    hp = torch.load(shape_window["last_ckpt"], weights_only=True)["hyper_parameters"]
    assert hp["scale_factor"] == pytest.approx(1 / std, rel=1e-6)


def _train_state(path):
    ckpt = torch.load(path, weights_only=True)
    return ckpt


def _assert_same_training_state(a, b):
    assert a["global_step"] == b["global_step"]
    for section in ("state_dict", "current_model_state", "averaging_state"):
        assert a[section].keys() == b[section].keys()
        for k in a[section]:
            assert torch.equal(a[section][k], b[section][k]), f"{section}.{k}"
    opt_a, opt_b = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    for i in opt_a:
        for k in opt_a[i]:
            assert torch.equal(opt_a[i][k], opt_b[i][k]), f"optimizer state {i}.{k}"
    assert a["lr_schedulers"] == b["lr_schedulers"]


def test_resume_continues_step_optimizer_ema_and_data_exactly(world, tmp_path):
    common = ["trainer.val_check_interval=2", "model.warmup_steps=6"]
    full = world.train_refiner("demo_refiner_500_750", tmp_path / "full", "trainer.max_steps=8", *common)
    half = world.train_refiner("demo_refiner_500_750", tmp_path / "half", "trainer.max_steps=4", *common)
    assert torch.load(half["last_ckpt"], weights_only=True)["global_step"] == 4
    resumed = world.train_refiner("demo_refiner_500_750", tmp_path / "half", "trainer.max_steps=8", *common,
                                  f"ckpt_path={half['last_ckpt']}")
    assert resumed["global_step"] == 8
    _assert_same_training_state(_train_state(full["last_ckpt"]), _train_state(resumed["last_ckpt"]))


def test_validating_more_often_leaves_the_training_unchanged(world, tmp_path):
    """``refiner bench-seeds val_every=50`` only adds validations (its study record leaves it out): the weights,
    optimizer and EMA after 6 steps are the same whether validation ran every 2 steps or once."""
    common = ["trainer.max_steps=6", "model.warmup_steps=3"]
    often = world.train_refiner("demo_refiner_500_750", tmp_path / "often", "trainer.val_check_interval=2", *common)
    once = world.train_refiner("demo_refiner_500_750", tmp_path / "once", "trainer.val_check_interval=6", *common)
    _assert_same_training_state(_train_state(often["last_ckpt"]), _train_state(once["last_ckpt"]))


def test_a_run_resumed_in_a_moved_folder_keeps_writing_last_ckpt(world, tmp_path):
    """Lightning restores ModelCheckpoint's record of its own last.ckpt only when the folder is unchanged; in a moved
    (or copied) run folder it used to write the resumed run to last-v1.ckpt and leave last.ckpt at the old step, so
    whatever read last.ckpt (init_from of the detail expert, the benchmark) got the unfinished model."""
    import shutil

    half = world.train_refiner("demo_refiner_500_750", tmp_path / "a", "trainer.max_steps=2",
                               "trainer.val_check_interval=2")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    moved = tmp_path / "b" / "checkpoints" / "last.ckpt"
    resumed = world.train_refiner("demo_refiner_500_750", tmp_path / "b", "trainer.max_steps=4",
                                  "trainer.val_check_interval=2", f"ckpt_path={moved}")
    assert resumed["global_step"] == 4
    assert sorted(p.name for p in moved.parent.glob("last*")) == ["last.ckpt"]
    assert torch.load(moved, weights_only=True)["global_step"] == 4
    assert torch.load(half["last_ckpt"], weights_only=True)["global_step"] == 2


def test_resume_keeps_the_scale_factor_the_run_inherited(world, shape_window, tmp_path):
    """A finetune inherits scale_factor from init_from; a resume (no init_from) must not recompute it from the
    shards (here they would give another value)."""
    source = torch.load(shape_window["last_ckpt"], weights_only=True)
    source["hyper_parameters"]["scale_factor"] = 0.5
    base = tmp_path / "base.ckpt"
    torch.save(source, base)
    half = world.train_refiner("demo_refiner_751_1000", tmp_path / "run", f"init_from={base}", "trainer.max_steps=2")
    assert torch.load(half["last_ckpt"], weights_only=True)["hyper_parameters"]["scale_factor"] == 0.5
    resumed = world.train_refiner("demo_refiner_751_1000", tmp_path / "run", "init_from=null", "trainer.max_steps=4",
                                  f"ckpt_path={half['last_ckpt']}")
    assert torch.load(resumed["last_ckpt"], weights_only=True)["hyper_parameters"]["scale_factor"] == 0.5


def experiment_names() -> list[str]:
    return sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


@pytest.fixture(scope="session")
def compvis_files(tmp_path_factory) -> dict:
    """Small checkpoints in the exact CompVis layouts (LDM + vq-f4 + vq-f8) for the ffhq presets."""
    from helpers_compvis import make_compvis_ldm_checkpoint, make_first_stage_checkpoint

    from refiner.models.vq import tiny_ddconfig

    root = tmp_path_factory.mktemp("compvis")
    unet = dict(image_size=8, in_channels=3, out_channels=3, model_channels=32, attention_resolutions=[2],
                num_res_blocks=1, channel_mult=[1, 2], num_head_channels=16)
    ldm = make_compvis_ldm_checkpoint(root, unet)
    f4 = make_first_stage_checkpoint(root, tiny_ddconfig(4, resolution=32), n_embed=16, embed_dim=3, name="f4.ckpt")
    f8 = make_first_stage_checkpoint(root, tiny_ddconfig(8, resolution=32), n_embed=16, embed_dim=4, name="f8.ckpt")
    return dict(ldm=ldm, f4=f4, f8=f8, unet=unet)


def _ffhq_overrides(world: World, files: dict) -> list[str]:
    f4, f8, unet = files["f4"], files["f8"], files["unet"]
    out = [f"paths.compvis_ldm={files['ldm']['ckpt_path']}", f"paths.vq_f4={f4['path']}", f"paths.vq_f8={f8['path']}",
           f"paths.shards_dir={world.shards_dir}", "data.train_shards=" + str(world.shards_dir / "demo/train"),
           "data.val_shards=" + str(world.shards_dir / "demo/val"), "data.num_workers=0", "data.batch_size=2",
           "data.mode=deterministic", "trainer=cpu",
           # the world's shards were encoded by the demo f4, not by these CompVis-layout files (nor is the LDM's
           # first_stage_model): a real run would be refused, this one only checks the preset's plumbing
           "allow_first_stage_mismatch=true"]
    for name, spec in (("f4", f4), ("f8", f8)):
        for k, v in spec["params"]["ddconfig"].items():
            out.append(f"first_stage.{name}.params.ddconfig.{k}={v}".replace(" ", ""))
        out.append(f"first_stage.{name}.params.n_embed={spec['params']['n_embed']}")
    for k, v in unet.items():
        out.append(f"model.unet.{k}={v}".replace(" ", ""))
    return out


@pytest.mark.parametrize("experiment", experiment_names())
def test_every_experiment_preset_runs_fast_dev_run(experiment, world, compvis_files, tmp_path):
    paths = [p for p in world.paths() if not (experiment.startswith("ffhq") and p.startswith("first_stage"))]
    overrides = [f"experiment={experiment}", *TINY_TRAINER, *paths, "+trainer.fast_dev_run=true"]
    if experiment.startswith(("demo_refiner", "demo_paired")):
        overrides += [o for o in world.refiner_overrides(experiment) if o.startswith(("model.", "data."))]
        if experiment == "demo_paired_baseline":
            overrides.append("model.unet.in_channels=6")
    if experiment == "demo_refiner_751_1000":
        overrides.append("init_from=null")  # the chained init is covered by the finetune test
    if experiment.startswith("demo_vq"):
        overrides += ["data.crop_size=32", "data.batch_size=2"]
    if experiment.startswith("ffhq"):
        overrides += _ffhq_overrides(world, compvis_files)
    cfg = compose_config("train", overrides, tmp_path / "run")
    result = run(cfg)
    assert result["global_step"] == 1


def test_ffhq_preset_carries_compvis_hyperparameters(tmp_path):
    cfg = compose_config("train", ["experiment=ffhq_500_750"], tmp_path)
    unet = cfg.model.unet
    assert (unet.model_channels, list(unet.channel_mult), list(unet.attention_resolutions),
            unet.num_head_channels) == (224, [1, 2, 3, 4], [8, 4, 2], 32)
    assert (cfg.model.schedule.linear_start, cfg.model.schedule.linear_end) == (0.0015, 0.0195)
    assert cfg.model.base_lr == 2e-6 and cfg.model.scale_lr is True
    assert cfg.trainer.precision == "bf16-mixed"
    assert (cfg.window.t_min, cfg.window.t_max) == (250, 500)
    if not torch.cuda.is_available():  # else the missing GPU is refused first
        cfg = compose_config("train", ["experiment=ffhq_500_750", "trainer.accelerator=cpu", "trainer.devices=1"],
                             tmp_path)
    with pytest.raises(ConfigError, match="paths.compvis_ldm"):
        run(cfg)


# -- bad input fails before any compute, naming the problem -----------------------------------
def test_inverted_window_is_refused(compose_train):
    with pytest.raises(ConfigError, match="inverted"):
        run(compose_train("window.t_min=500", "window.t_max=250"))


def test_out_of_range_window_is_refused(compose_train):
    with pytest.raises(ConfigError, match="t_max=1200"):
        run(compose_train("window.t_min=0", "window.t_max=1200"))


@pytest.mark.parametrize("key", ["ckpt_path", "init_from"])
def test_missing_checkpoint_is_refused(compose_train, key, tmp_path):
    with pytest.raises(ConfigError, match=f"{key}.*not found"):
        run(compose_train(f"{key}={tmp_path}/nope.ckpt"))


def test_missing_shards_are_refused(world, tmp_path):
    overrides = world.refiner_overrides("demo_refiner_500_750", f"data.train_shards={tmp_path}/empty")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .tar shards"):
        run(compose_config("train", overrides, tmp_path / "run"))


def test_init_from_with_other_architecture_lists_mismatched_keys(world, shape_window, tmp_path):
    overrides = world.refiner_overrides("demo_refiner_751_1000", f"init_from={shape_window['last_ckpt']}",
                                        "model.unet.num_res_blocks=2")
    with pytest.raises(CheckpointError, match=r"(?s)missing.*unexpected|unexpected.*missing"):
        run(compose_config("train", overrides, tmp_path / "run"))


def test_first_stage_checkpoint_as_init_from_is_refused(world, tmp_path):
    overrides = world.refiner_overrides("demo_refiner_751_1000", f"init_from={world.f4_ckpt}")
    with pytest.raises(CheckpointError, match="first-stage"):
        run(compose_config("train", overrides, tmp_path / "run"))


def test_wandb_logs_offline_without_login(world, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "")
    overrides = [o for o in world.refiner_overrides("demo_refiner_500_750") if o != "logger=none"]
    result = run(compose_config("train", [*overrides, "logger=wandb", "trainer.max_steps=2"], tmp_path / "run"))
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert result["global_step"] == 2


def test_finetune_from_compvis_ldm_takes_its_ema_weights(world, compvis_files, tmp_path):
    overrides = ["experiment=ffhq_500_750", *TINY_TRAINER, *_ffhq_overrides(world, compvis_files)]
    cfg = compose_config("train", overrides, tmp_path / "run")
    state, info = read_init_from(cfg)
    resolve_scale_factor(cfg, info)
    model = hydra.utils.instantiate(cfg.model)
    apply_init_from(model, cfg, state, info)
    ema, raw = compvis_files["ldm"]["ema"], compvis_files["ldm"]["raw"]
    for key, value in model.unet.state_dict().items():
        assert torch.equal(value, ema[key]) and not torch.equal(value, raw[key]), key
    cfg.init_from_ema = False
    state, _ = read_init_from(cfg)
    assert all(torch.equal(state[k], raw[k]) for k in raw)


def test_lora_on_a_compvis_ldm_keeps_its_weights_and_loads_merged(world, compvis_files, tmp_path):
    """LoRA on the ffhq preset's CompVis LDM: the checkpoint refers to the LDM file and loading merges onto its
    EMA UNet weights; the adapters' zero-initialised B after training moved off zero."""
    from refiner.formats.loading import load_window_weights

    overrides = ["experiment=ffhq_500_750", *TINY_TRAINER, *_ffhq_overrides(world, compvis_files),
                 "model.lora.rank=4", "model.scale_lr=false", "model.base_lr=1e-2", "model.warmup_steps=1"]
    result = run(compose_config("train", overrides, tmp_path / "run"))
    ckpt = torch.load(result["last_ckpt"], weights_only=True)
    assert ckpt["hyper_parameters"]["lora_base"]["path"] == str(Path(compvis_files["ldm"]["ckpt_path"]).resolve())
    assert all(".lora_" in k for k in ckpt["state_dict"])
    assert any(v.abs().sum() > 0 for k, v in ckpt["state_dict"].items() if ".lora_B." in k)
    merged = load_window_weights(result["last_ckpt"])
    ema = compvis_files["ldm"]["ema"]
    untouched = [k for k in ema if not k.endswith(("qkv.weight", "proj_out.weight", "in_layers.2.weight",
                                                    "out_layers.3.weight"))]
    assert untouched and all(torch.equal(merged.unet_state[k], ema[k]) for k in untouched)
    assert any(not torch.equal(merged.unet_state[k], ema[k]) for k in ema if k.endswith("qkv.weight"))


def test_trained_window_exports_to_safetensors_and_back(shape_window, tmp_path):
    from refiner.formats.exports import export_safetensors
    from refiner.formats.loading import load_window_weights

    out = tmp_path / "shape.safetensors"
    export_safetensors(shape_window["last_ckpt"], out)
    exported, original = load_window_weights(out), load_window_checkpoint(shape_window["last_ckpt"])
    assert (exported.window.t_min, exported.window.t_max) == (250, 500)
    assert exported.scale_factor == pytest.approx(original.scale_factor)
    assert exported.unet_params == original.unet_params
    for key, value in original.unet_state.items():
        assert torch.equal(exported.unet_state[key], value), key


# -- issue 9, class 2: the f4 identity is recorded by training and checked by init_from -------------------
def test_window_records_the_fingerprint_of_its_first_stage(world, shape_window):
    from refiner.data.shards import load_manifest
    from refiner.formats.first_stage import first_stage_file_fingerprint

    fp = first_stage_file_fingerprint(world.f4_ckpt)
    assert load_manifest(world.shards_dir / "demo/train")["first_stage_fingerprints"]["f4"] == fp
    ckpt = torch.load(shape_window["last_ckpt"], weights_only=True)
    assert ckpt["hyper_parameters"]["first_stage_fingerprint"] == fp


def test_init_from_or_first_stage_trained_with_another_f4_is_refused(world, shape_window, tmp_path):
    from refiner.formats.fingerprint import FirstStageMismatch

    ckpt = torch.load(shape_window["last_ckpt"], weights_only=True)
    ckpt["hyper_parameters"]["first_stage_fingerprint"] = "0123456789abcdef"
    foreign = tmp_path / "foreign.ckpt"
    torch.save(ckpt, foreign)
    overrides = world.refiner_overrides("demo_refiner_751_1000", f"init_from={foreign}")
    with pytest.raises(FirstStageMismatch, match=r"init_from=.*foreign\.ckpt.*0123456789abcdef"):
        run(compose_config("train", overrides, tmp_path / "run"))
    # an f4 for the grids that is not the one that encoded the shards
    vq = torch.load(world.f4_ckpt, weights_only=True)
    vq["state_dict"]["decoder.conv_out.bias"] = vq["state_dict"]["decoder.conv_out.bias"] + 0.1
    other = tmp_path / "other_f4.ckpt"
    torch.save(vq, other)
    overrides = world.refiner_overrides("demo_refiner_500_750", f"first_stage.f4.ckpt_path={other}")
    with pytest.raises(FirstStageMismatch, match=r"training shards.*other_f4\.ckpt"):
        run(compose_config("train", overrides, tmp_path / "run2"))
