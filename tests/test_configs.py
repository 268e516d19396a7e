"""Config composition: window presets' t ranges, trainer presets, the SLURM launcher preset."""

from __future__ import annotations

import pytest
from conftest import CONF, compose_config
from hydra import compose, initialize_config_dir

# blog's sampling-step names -> diffusion timestep windows [t_min, t_max)
WINDOWS = {"late_500_750": (250, 500), "late_751_1000": (0, 250), "late_500_1000": (0, 500), "full": (0, 1000)}


@pytest.mark.parametrize("name,expected", WINDOWS.items())
def test_window_presets_map_blog_steps_to_timesteps(name, expected, tmp_path):
    cfg = compose_config("train", [f"window={name}"], tmp_path)
    from omegaconf import OmegaConf

    from refiner.diffusion import Window

    # the window does not read the model (no interpolation cycle); the model reads the window and its schedule
    assert "num_timesteps" not in cfg.window and cfg.model.schedule.num_timesteps == 1000
    window = Window.from_config(OmegaConf.to_container(cfg.model.window, resolve=True), 1000)
    assert (window.t_min, window.t_max, window.num_timesteps) == (*expected, 1000)


@pytest.mark.parametrize("preset,accelerator,precision,backend", [
    ("cpu", "cpu", "32-true", None), ("gpu", "gpu", "bf16-mixed", None),
    ("ddp", "gpu", "bf16-mixed", "nccl"), ("ddp_cpu", "cpu", "32-true", "gloo"),
])
def test_trainer_presets(preset, accelerator, precision, backend, tmp_path):
    cfg = compose_config("train", [f"trainer={preset}", "trainer.num_nodes=4"], tmp_path)
    assert cfg.trainer.accelerator == accelerator and cfg.trainer.precision == precision
    assert cfg.trainer.num_nodes == 4
    if backend:
        assert cfg.trainer.strategy.process_group_backend == backend


def test_slurm_launcher_preset_composes(tmp_path):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=8",
                                          "trainer.num_nodes=2", "hydra.launcher.partition=gpu"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 8, 8)
    assert launcher.partition == "gpu"


@pytest.mark.parametrize("preset", ["full", "demo"])
def test_bench_method_presets_compose_and_parse(preset, tmp_path):
    from refiner.apps.bench import bench_settings
    from refiner.bench.methods import methods_from_settings

    cfg = compose_config("bench", [f"methods={preset}", f"output_dir={tmp_path}"], tmp_path)
    methods = {m.name: m for m in methods_from_settings(bench_settings(cfg).methods)}
    every = {"chain", "shape_window", "detail_window", "full_range", "paired", "unsharp"}
    assert set(methods) == (every if preset == "full" else {"chain", "full_range", "unsharp"})
    # every diffusion method is run at the recommended t_start, so the grid and the demo's table compare there
    for m in methods.values():
        if m.kind == "diffusion":
            assert cfg.recommended_t_start in m.settings, (m.name, m.settings)
    # the demo preset names the full preset's checkpoints and thins the sweeps
    full = compose_config("bench", ["methods=full"], tmp_path).methods
    for name, m in methods.items():
        assert m.experts == tuple(full[name].get("experts", ()))
        if preset == "demo":
            assert len(m.settings) == 1
    assert methods["chain"].experts == (cfg.checkpoints.shape, cfg.checkpoints.detail)


def test_sample_artifact_settings_compose_and_parse(tmp_path):
    """conf/refine.yaml's detect/correct/mask/t_start=auto settings: defaults off, every override composes and
    reaches ArtifactOptions (a calibration file is only read with t_start=auto)."""
    from refiner.apps.refine import settings
    from refiner.artifacts.correct import AutoStart
    from refiner.inference.artifact_options import ArtifactOptions

    defaults = compose_config("refine", [], tmp_path)
    opts = ArtifactOptions.from_settings(settings(compose_config("refine", ["inputs=x"], tmp_path)))
    assert (defaults.detect, defaults.correct, defaults.mask) == ("none", "none", None) and not opts.active
    assert defaults.auto_calibration.endswith("bench_tune/t_start_auto.json") and not defaults.allow_calibration_mismatch
    calib = tmp_path / "auto.json"
    AutoStart([(0.1, 199.0), (0.3, 399.0)], chain={"experts": list(defaults.experts)}).save(calib)
    cfg = compose_config("refine", ["inputs=x", "detect=residual", "correct=strength_map", f"mask={tmp_path}", "t_start=auto",
                                    f"auto_calibration={calib}", "strength.t_low=49", "mask_dilate_px=2",
                                    "ttc.t_correct=400", "ttc.gamma=0.1", "ttc.correction_eta=0.5",
                                    "allow_calibration_mismatch=false"], tmp_path)
    opts = ArtifactOptions.from_settings(settings(cfg))
    assert (opts.detect, opts.correct, opts.mask, opts.t_low, opts.dilate_px) == ("residual", "strength_map",
                                                                                   str(tmp_path), 49, 2)
    assert (opts.t_correct, opts.gamma, opts.correction_eta) == (400, 0.1, 0.5)
    assert opts.start_range(cfg.t_start) == (199, 399) and opts.auto([0.2]) == [299]
    ttc = ArtifactOptions.from_settings(settings(compose_config("refine", ["detect=asced_code", "correct=ttc",
                                                                         "inputs=x"], tmp_path)))
    assert ttc.active and ttc.start_range(499) == (499, 499)
    assert defaults.composite == "none" and opts.composite == "none" and "composite" not in opts.digest()
    pasted = ArtifactOptions.from_settings(settings(compose_config("refine", [
        "detect=output_residual", "composite=paste_back", "paste_back.feather_px=6", "paste_back.whole_above=0.12",
        "inputs=x"], tmp_path)))
    assert (pasted.detect, pasted.composite, pasted.feather_px, pasted.whole_above) == ("output_residual",
                                                                                      "paste_back", 6, 0.12)
    assert pasted.active and not pasted.probes and pasted.digest()["composite"] == ["paste_back", 6, 0.12]
