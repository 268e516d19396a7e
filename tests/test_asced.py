"""ASCED at its own operating point (issue 23, item 1; refiner.bench.asced): the image-level scores against hand
counts and the Mann-Whitney AUC, the threshold rule, the random-mask control, the score-trap groups, the identity
of TTC's detection with the plain run's, and bad settings refused with one line and exit 2 before any model loads."""

from __future__ import annotations

from itertools import product
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import compose_config

from refiner.apps import bench as apps_bench
from refiner.bench import asced
from refiner.bench import run as bench_run
from refiner.bench.artifacts import generate_with_ttc
from refiner.diffusion import ScheduleConfig, Window
from refiner.inference.chain import Chain
from refiner.models.unet import UNetModel, tiny_unet_params
from refiner.models.vq import VQModel, tiny_ddconfig
from refiner.settings import from_config

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------ statistics
def test_auroc_is_the_mann_whitney_share_of_correctly_ordered_pairs():
    rng = np.random.default_rng(0)
    scores, positive = rng.normal(size=40).round(1), rng.random(40) < 0.3   # rounded: ties count one half
    pos, neg = scores[positive], scores[~positive]
    pairs = [(p > q) + 0.5 * (p == q) for p, q in product(pos, neg)]
    assert asced.auroc(scores, positive) == pytest.approx(np.mean(pairs), abs=1e-6)
    assert np.isnan(asced.auroc(scores, np.ones(40, bool)))


def test_best_threshold_maximises_balanced_accuracy_and_the_scores_match_a_hand_count():
    severity = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    broken = np.array([0, 0, 1, 0, 1, 1, 0, 1], bool)
    # severity > 0.2 flags 6: tp 4, fp 2 -> TPR 1, TNR 0.5; > 0.4 flags 4: tp 3, fp 1 -> 0.75 + 0.75: both 1.5;
    # ties go to the smallest threshold
    assert asced.best_threshold(severity, broken) == pytest.approx(0.2)
    d = asced.image_detection(severity, broken, 0.4, resamples=200)
    assert d["accuracy"]["mean"] == pytest.approx(6 / 8) and d["precision"]["mean"] == pytest.approx(3 / 4)
    assert d["recall"]["mean"] == pytest.approx(3 / 4) and d["balanced_accuracy"]["mean"] == pytest.approx(0.75)
    assert d["majority_accuracy"] == 0.5 and d["broken"] == 4 and d["n"] == 8
    for k in ("accuracy", "auc", "balanced_accuracy"):
        assert d[k]["low"] <= d[k]["mean"] <= d[k]["high"]
    separable = asced.image_detection(severity, severity > 0.45, 0.45, resamples=200)
    assert separable["auc"]["mean"] == 1.0 and separable["auc"]["low"] == 1.0


def test_random_masks_keep_each_images_area_and_move_it():
    masks = torch.zeros(3, 8, 8, dtype=torch.bool)
    masks[0, :2] = True
    masks[2] = True
    rnd = asced.random_masks(masks, seed=5)
    assert rnd.flatten(1).sum(1).tolist() == [16, 0, 64]
    assert not torch.equal(rnd[0], masks[0])
    assert torch.equal(asced.random_masks(masks, seed=5), rnd)


def test_the_score_trap_groups_pixels_by_the_checkers_violations():
    n, side = 3, 4
    changes = torch.ones(2, n, side, side)
    changes[:, 0, :2, :2] = 5.0        # image 0 is broken there, and changes more there
    violation = torch.zeros(n, 16, 16, dtype=torch.bool)
    violation[0, :8, :8] = True        # 2 x 2 latent pixels at factor 4
    violation[1, 0, 0] = True          # image 1 is well formed: its mask is ignored
    w = asced.Watched([], np.array([True, False, False]), violation, {}, [750, 501], changes)
    trap = asced.score_trap(w, factor=4)
    groups = trap["groups"]
    assert [groups[g]["pixels"] for g in asced.GROUPS] == [4, 12, 32]
    assert groups[asced.GROUPS[0]]["quantiles"]["median"] == 5.0
    assert groups[asced.GROUPS[2]]["median_per_step"] == [1, 1]
    assert trap["auc_violation_vs_well_formed"] == 1.0 and trap["auc_violation_vs_rest_of_broken"] == 1.0


# ------------------------------------------------------------------------------------------------ generation
def _tiny_unet(seed: int) -> UNetModel:
    torch.manual_seed(seed)
    net = UNetModel(**tiny_unet_params()).eval()
    torch.nn.init.normal_(net.out[2].weight, std=0.05)  # CompVis zero-inits the last conv
    return net


@pytest.fixture(scope="module")
def tiny_models():
    torch.manual_seed(0)
    f4 = VQModel(tiny_ddconfig(4, resolution=32), 64, 3).eval()
    gen = Chain.from_unets([_tiny_unet(3)], [Window(0, 1000)], ScheduleConfig(), unet_params=tiny_unet_params())
    return SimpleNamespace(f4=f4, device="cpu", generator_experts=("gen",),
                           pipelines={("gen",): SimpleNamespace(chain=gen)})


def _settings(**asced_block):
    plain = {"seeds": {"tune": {"images": 2, "generator": 100000, "references": 4}}, "split": "tune",
             "output_dir": "out", "n": 3, "size": 32, "generator": {"experts": ["gen"], "steps": 6},
             "first_stage": {}, "methods": {"chain": {"experts": ["a", "b"], "t_starts": [299]}},
             "artifacts": {"ttc": {"t_correct": 480, "t_detect": 999}}, "asced": asced_block}
    return from_config(asced.BenchSettings, plain)


@pytest.mark.parametrize("method", ["asced", "asced_code"])
def test_ttc_with_the_plain_runs_detection_is_generation_with_ttc(tiny_models, method):
    """The corrected and the plain trajectories agree until T_c, so the detection watch() reads from a plain run is
    the one TTC uses: correcting with it reproduces generate_with_ttc bit for bit."""
    s = _settings()
    watched = asced.watch(tiny_models, s, s.split_seeds)
    det = watched.detections[method]
    assert det.latent.shape == (3, 8, 8) and watched.changes.shape == (2, 3, 8, 8)  # bank 999, 800, 600: 2 changes
    images, masks = generate_with_ttc(tiny_models, s, s.split_seeds, method)
    assert torch.equal(torch.from_numpy(np.stack(masks)), det.latent)
    again = asced.corrected(tiny_models, s, s.split_seeds, det.latent)
    assert all(np.array_equal(a, b) for a, b in zip(images, again))
    if det.latent.any():
        assert any(not np.array_equal(a, b) for a, b in zip(images, watched.images))


# ------------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("overrides, line", [
    (["asced.nfe=[0]"], "error: asced.nfe must be in [1"),
    (["asced.nfe=[25,2]"], "error: asced.nfe: 2 DDIM steps put 1 grid point(s) in the score bank (480, 999]"),
    (["asced.nfe=[25]", "artifacts.ttc.t_correct=980"], "error: asced.nfe: 25 DDIM steps put 1 grid point(s)"),
    (["asced.calibration_split=test"], "error: asced.calibration_split must be one of ['holdout', 'report', 'tune']"),
    (["artifacts.ttc.detectors=[]"], "error: artifacts.ttc.detectors is empty"),
])
def test_bad_settings_are_one_error_line_and_exit_2_before_any_model_loads(overrides, line, tmp_path, capsys,
                                                                           monkeypatch):
    monkeypatch.setattr(bench_run.Models, "__init__", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit) as exit_:
        apps_bench.asced_task(compose_config("bench", [f"output_dir={tmp_path / 'out'}", *overrides], tmp_path))
    assert exit_.value.code == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(line) and not out, err
    assert not (tmp_path / "out").exists()
