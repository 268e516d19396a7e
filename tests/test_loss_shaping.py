"""Issue 12 item 5: Min-SNR loss weighting, the window's timestep distribution, per-t-bucket losses and the
validation windows ``val/loss_in_*``. References are computed here independently (numpy closed forms, the
normal CDF, hand-written copies of the pre-weighting loss)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset

from refiner.diffusion import ScheduleConfig, Window, loss_weight, q_sample
from refiner.errors import SettingError
from refiner.lit.window_module import WindowRefiner, step_seed
from refiner.models.unet import tiny_unet_params

AB = ScheduleConfig().alphas_cumprod()  # CompVis linear 0.0015 -> 0.0195, T=1000


def numpy_snr() -> np.ndarray:
    betas = np.linspace(np.sqrt(0.0015), np.sqrt(0.0195), 1000, dtype=np.float64) ** 2
    ab = np.cumprod(1.0 - betas)
    return ab / (1.0 - ab)


# -- Min-SNR weights ------------------------------------------------------------------------------------------
def test_min_snr_weights_at_hand_computed_timesteps():
    """At t=0, ab = 1 - beta_0 = 0.9985 exactly, so SNR = 0.9985/0.0015 and SNR+1 = 1/0.0015 (gamma=5 clips);
    at t=249 and t=499 SNR < 5 (SNR falls below 5 at t=95), so w_eps = 1, w_x0 = SNR, w_v = SNR/(SNR+1) = ab."""
    snr = numpy_snr()
    t = torch.tensor([0, 249, 499])
    w = {p: loss_weight("min_snr", t, AB, p, gamma=5.0).numpy() for p in ("eps", "x0", "v")}
    assert snr[0] == pytest.approx(0.9985 / 0.0015, rel=1e-12)
    assert snr[249] == pytest.approx(1.04296060453, rel=1e-9) and snr[499] == pytest.approx(0.131022755167, rel=1e-9)
    np.testing.assert_allclose(w["eps"], [5 * 0.0015 / 0.9985, 1.0, 1.0], rtol=1e-12)
    np.testing.assert_allclose(w["x0"], [5.0, snr[249], snr[499]], rtol=1e-12)
    np.testing.assert_allclose(w["v"], [5 * 0.0015, snr[249] / (snr[249] + 1), snr[499] / (snr[499] + 1)],
                               rtol=1e-12)
    np.testing.assert_allclose(w["v"][1:], np.cumprod(1 - np.linspace(np.sqrt(0.0015), np.sqrt(0.0195), 1000) ** 2)
                               [[249, 499]], rtol=1e-12)


@pytest.mark.parametrize("gamma", [1.0, 5.0, 20.0])
def test_min_snr_weights_over_the_whole_schedule(gamma):
    snr = numpy_snr()
    t = torch.arange(1000)
    clipped = np.minimum(snr, gamma)
    np.testing.assert_allclose(loss_weight("min_snr", t, AB, "eps", gamma).numpy(), clipped / snr, rtol=1e-12)
    np.testing.assert_allclose(loss_weight("min_snr", t, AB, "x0", gamma).numpy(), clipped, rtol=1e-12)
    np.testing.assert_allclose(loss_weight("min_snr", t, AB, "v", gamma).numpy(), clipped / (snr + 1), rtol=1e-12)
    assert torch.equal(loss_weight("none", t, AB, "v", gamma), torch.ones(1000, dtype=torch.float64))


def test_loss_weight_settings_are_checked():
    with pytest.raises(SettingError, match="model.loss_weighting must be one of .* got 'snr'"):
        loss_weight("snr", torch.tensor([3]), AB, "eps")
    with pytest.raises(SettingError, match="min_snr_gamma must be > 0, got 0"):
        loss_weight("min_snr", torch.tensor([3]), AB, "eps", gamma=0)
    with pytest.raises(ValueError, match="unknown parameterization"):
        loss_weight("min_snr", torch.tensor([3]), AB, "score")


# -- the window's timestep distribution -----------------------------------------------------------------------
PIECES = [[250, 400, 1.0], [400, 500, 3.0]]
DISTRIBUTIONS = {
    "uniform": {},
    "logit_normal": {"logit_mean": 0.5, "logit_std": 1.0},
    "logit_normal_saturating": {"distribution": "logit_normal", "logit_std": 40.0},
    "piecewise": {"piecewise": PIECES},
}


def window_with(name, t_min=250, t_max=500):
    kw = dict(DISTRIBUTIONS[name])
    kw.setdefault("distribution", name)
    if "piecewise" in kw:
        kw["piecewise"] = [[t_min, (t_min + t_max) // 2, 1.0], [(t_min + t_max) // 2, t_max, 3.0]]
    return Window(t_min, t_max, 1000, **kw)


@pytest.mark.parametrize("name", DISTRIBUTIONS)
@pytest.mark.parametrize("bounds", [(250, 500), (0, 250), (990, 1000), (0, 2)])
def test_every_distribution_draws_strictly_inside_the_window(name, bounds):
    w = window_with(name, *bounds)
    draws = w.sample(100_000, generator=torch.Generator().manual_seed(0))
    assert draws.dtype == torch.int64 and draws.shape == (100_000,)
    assert int(draws.min()) >= bounds[0] and int(draws.max()) < bounds[1]
    assert bool(w.contains(draws).all())


def test_saturating_logit_normal_reaches_both_ends_but_never_t_max():
    """logit_std=40: sigmoid rounds to exactly 0.0 or 1.0 in float64 for about half the draws; u=1.0 must map to
    t_max - 1, not t_max."""
    draws = window_with("logit_normal_saturating").sample(20_000, generator=torch.Generator().manual_seed(1))
    assert int(draws.max()) == 499 and int(draws.min()) == 250
    assert (draws == 499).float().mean() > 0.4 and (draws == 250).float().mean() > 0.4


def test_uniform_is_bit_identical_to_the_old_randint_draw():
    for seed in range(3):
        new = Window(250, 500).sample(1000, generator=torch.Generator().manual_seed(seed))
        old = torch.randint(250, 500, (1000,), generator=torch.Generator().manual_seed(seed))
        assert torch.equal(new, old)


def normal_cdf(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2))) if math.isfinite(x) else float(x > 0)


def logit(u: float) -> float:
    return -math.inf if u <= 0 else math.inf if u >= 1 else math.log(u / (1 - u))


@pytest.mark.parametrize("m,s", [(0.0, 1.0), (0.5, 1.0), (-1.0, 0.6)])
def test_logit_normal_matches_the_discretised_density(m, s):
    """P(t in [t_min + a, t_min + b)) = Phi((logit(b/W) - m)/s) - Phi((logit(a/W) - m)/s); 10 bins of 25."""
    n, width = 200_000, 250
    w = Window(250, 500, distribution="logit_normal", logit_mean=m, logit_std=s)
    counts = torch.bincount((w.sample(n, generator=torch.Generator().manual_seed(2)) - 250) // 25, minlength=10)
    for k in range(10):
        p = normal_cdf((logit((k + 1) * 25 / width) - m) / s) - normal_cdf((logit(k * 25 / width) - m) / s)
        tol = 5 * math.sqrt(p * (1 - p) / n) + 1e-5
        assert abs(counts[k].item() / n - p) < tol, (k, counts[k].item() / n, p)


def test_piecewise_weights_are_per_timestep_densities():
    """weights 1 on [250, 400) and 3 on [400, 500): shares 150/450 and 300/450, uniform inside each sub-range."""
    n = 300_000
    draws = Window(250, 500, distribution="piecewise", piecewise=PIECES).sample(
        n, generator=torch.Generator().manual_seed(3))
    low = draws < 400
    share = low.float().mean().item()
    assert abs(share - 1 / 3) < 5 * math.sqrt((1 / 3) * (2 / 3) / n)
    for part, (lo, hi) in ((draws[low], (250, 400)), (draws[~low], (400, 500))):
        counts = torch.bincount(part - lo, minlength=hi - lo).double()
        assert len(counts) == hi - lo
        dof = hi - lo - 1
        chi2 = ((counts - counts.mean()) ** 2 / counts.mean()).sum().item()
        assert chi2 < dof + 5 * math.sqrt(2 * dof)


def test_piecewise_zero_weight_ranges_are_never_drawn_and_order_does_not_matter():
    w = Window(0, 250, distribution="piecewise", piecewise=[[100, 250, 2], [0, 100, 0]])
    assert w.piecewise == ((0, 100, 0.0), (100, 250, 2.0))
    draws = w.sample(50_000, generator=torch.Generator().manual_seed(4))
    assert int(draws.min()) >= 100 and int(draws.max()) == 249


@pytest.mark.parametrize("kw,match", [
    ({"distribution": "cosine"}, r"window.distribution must be one of .*got 'cosine'"),
    ({"distribution": "logit_normal", "logit_std": 0.0}, r"window.logit_std must be > 0, got 0.0"),
    ({"distribution": "logit_normal", "logit_mean": float("nan")}, r"window.logit_mean must be a finite number"),
    ({"distribution": "piecewise"}, r"needs window.piecewise=\[\[lo, hi, weight\], ...\] tiling \[250, 500\)"),
    ({"distribution": "piecewise", "piecewise": [[250, 400, 1.0], [410, 500, 1.0]]},
     r"\[410, 500\) leaves a gap before t=400"),
    ({"distribution": "piecewise", "piecewise": [[250, 400, 1.0], [390, 500, 1.0]]}, r"\[390, 500\) overlaps t=400"),
    ({"distribution": "piecewise", "piecewise": [[260, 500, 1.0]]}, r"\[260, 500\) leaves a gap before t=250"),
    ({"distribution": "piecewise", "piecewise": [[250, 450, 1.0]]}, r"ends at 450, not at t_max=500"),
    ({"distribution": "piecewise", "piecewise": [[250, 400, 1.0], [400, 500, -2.0]]},
     r"entry \[400, 500, -2.0\]: weight must be >= 0"),
    ({"distribution": "piecewise", "piecewise": [[250, 400, 0], [400, 500, 0.0]]}, r"weights are all zero"),
    ({"distribution": "piecewise", "piecewise": [[250, 500]]}, r"entries are \[lo, hi, weight\], got \[250, 500\]"),
    ({"distribution": "piecewise", "piecewise": [[250.0, 500, 1.0]]}, r"lo and hi must be integers"),
    ({"piecewise": PIECES}, r"window.piecewise=.* is set but window.distribution='uniform'"),
])
def test_bad_distribution_settings_are_one_line_setting_errors(kw, match):
    with pytest.raises(SettingError, match=match) as err:
        Window(250, 500, 1000, **kw)
    assert isinstance(err.value, ValueError) and "\n" not in str(err.value)


def test_to_dict_round_trips_and_a_uniform_window_serialises_as_before():
    assert Window(250, 500).to_dict() == {"t_min": 250, "t_max": 500, "num_timesteps": 1000}
    assert Window(**{"t_min": 250, "t_max": 500, "num_timesteps": 1000}).distribution == "uniform"
    for name in DISTRIBUTIONS:
        w = window_with(name)
        assert Window(**w.to_dict()) == w and hash(Window(**w.to_dict())) == hash(w)
    d = Window(250, 500, distribution="piecewise", piecewise=PIECES).to_dict()
    assert d == {"t_min": 250, "t_max": 500, "num_timesteps": 1000, "distribution": "piecewise",
                 "piecewise": [[250, 400, 1.0], [400, 500, 3.0]]}
    assert str(window_with("piecewise")) == "[250, 500)"  # sampling-side identity unchanged


# -- the Lightning module --------------------------------------------------------------------------------------
class Latents(IterableDataset):
    def __init__(self, n_batches=3, batch=8, seed=0):
        self.n_batches, self.batch, self.seed = n_batches, batch, seed

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed)
        for _ in range(self.n_batches):
            z = torch.randn(self.batch, 3, 8, 8, generator=g)
            yield {"z_clean": z, "z_degraded": z + 0.1}


def make_module(t_min=250, t_max=500, window_kw=None, **kw):
    torch.manual_seed(0)
    unet = tiny_unet_params(image_size=8, model_channels=32, num_head_channels=16, channel_mult=[1, 2])
    module = WindowRefiner(unet=unet, window=dict(t_min=t_min, t_max=t_max, num_timesteps=1000, **(window_kw or {})),
                           schedule=ScheduleConfig().to_dict(), **{"base_lr": 1e-3, **kw})
    # CompVis zero-initialises the output conv; an untrained net would predict 0 whatever x_t and t are
    torch.nn.init.normal_(module.unet.out[2].weight, std=0.1)
    return module


def trainer_for(tmp_path, **kw):
    return pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=tmp_path, enable_checkpointing=False, **kw)


def validate(module, tmp_path, data=None):
    (metrics,) = trainer_for(tmp_path).validate(module, DataLoader(data or Latents(), batch_size=None), verbose=False)
    return metrics


def old_loss(module, batch, generator):
    """The training loss as written before loss weighting existed (uniform t, F.mse_loss over the batch)."""
    z0 = batch["z_clean"].float() * module.hparams.scale_factor
    t = torch.randint(module.window.t_min, module.window.t_max, (z0.shape[0],), generator=generator)
    noise = torch.randn(z0.shape, generator=generator)
    x_t = q_sample(z0, t, module.alphas_cumprod, noise)
    return F.mse_loss(module.unet(x_t, t).float(), noise.float())


def test_loss_weighting_none_reproduces_the_old_loss_bit_exactly():
    module = make_module(loss_weighting="none")
    batch = next(iter(Latents()))
    for seed in range(3):
        new = module.diffusion_loss(batch, torch.Generator().manual_seed(seed))
        assert torch.equal(new.loss, old_loss(module, batch, torch.Generator().manual_seed(seed)))
        new.loss.backward()  # and it is the differentiable objective


@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
def test_min_snr_loss_is_the_weighted_mean_of_per_sample_mse(parameterization):
    module = make_module(0, 250, loss_weighting="min_snr", min_snr_gamma=5.0, parameterization=parameterization)
    batch = next(iter(Latents()))
    terms = module.diffusion_loss(batch, torch.Generator().manual_seed(7))
    snr = numpy_snr()[terms.t.numpy()]
    w = {"eps": np.minimum(snr, 5) / snr, "x0": np.minimum(snr, 5), "v": np.minimum(snr, 5) / (snr + 1)}[parameterization]
    expected = float(np.mean(w * terms.mse.double().numpy()))
    assert terms.loss.item() == pytest.approx(expected, rel=1e-5)
    plain = make_module(0, 250, parameterization=parameterization).diffusion_loss(
        batch, torch.Generator().manual_seed(7))
    torch.testing.assert_close(plain.mse, terms.mse)  # same weights, t and noise: only the weighting differs
    assert plain.loss.item() == pytest.approx(terms.mse.mean().item(), rel=1e-5)
    assert terms.loss.requires_grad and not terms.mse.requires_grad


def test_training_with_min_snr_and_piecewise_draws_logs_buckets(tmp_path):
    module = make_module(250, 500, window_kw=dict(distribution="piecewise", piecewise=PIECES),
                         loss_weighting="min_snr", loss_buckets=2)
    seen = []
    module.unet.register_forward_pre_hook(lambda m, args: seen.append(args[1].detach().clone()))
    trainer = trainer_for(tmp_path, max_steps=5, limit_val_batches=0)
    trainer.fit(module, train_dataloaders=DataLoader(Latents(n_batches=100, batch=32), batch_size=None))
    t = torch.cat(seen)
    assert int(t.min()) >= 250 and int(t.max()) < 500 and (t >= 400).float().mean() > 0.5
    logged = trainer.logged_metrics
    assert {"train/loss", "train/loss_unweighted", "train/loss_t250_375", "train/loss_t375_500"} <= set(logged)
    assert not any(k.startswith("train/loss_t") and k not in ("train/loss_t250_375", "train/loss_t375_500")
                   for k in logged)


@pytest.mark.parametrize("n_batches,size", [(4, 16), (3, 1)])
def test_validation_logs_unweighted_mse_per_t_bucket(tmp_path, n_batches, size):
    """Recomputed here by hand: t and noise from the fixed validation generator, per-sample MSE, 4 buckets.
    With batches of 1, three buckets are empty in every batch (and at least one in all: nan, no sample fell in it)."""
    module = make_module(250, 500, seed=5)
    data = Latents(n_batches=n_batches, batch=size)
    metrics = validate(module, tmp_path, data)
    edges = [250, 312, 375, 437, 500]
    sums, counts = np.zeros(4), np.zeros(4)
    with torch.no_grad():
        for i, batch in enumerate(data):
            g = torch.Generator().manual_seed(step_seed(5, 2**32 - 1, i))
            t = torch.randint(250, 500, (size,), generator=g)
            noise = torch.randn(batch["z_clean"].shape, generator=g)
            z0 = batch["z_clean"] * module.hparams.scale_factor
            mse = (module.unet(q_sample(z0, t, module.alphas_cumprod, noise), t) - noise).pow(2).mean((1, 2, 3))
            for k in range(4):
                inside = (t >= edges[k]) & (t < edges[k + 1])
                sums[k] += mse[inside].sum().item()
                counts[k] += inside.sum().item()
    assert counts.min() > 0 if size == 16 else counts.min() == 0
    for k in range(4):
        logged = metrics[f"val/loss_t{edges[k]}_{edges[k + 1]}"]
        assert math.isnan(logged) if counts[k] == 0 else logged == pytest.approx(sums[k] / counts[k], rel=1e-5)
    assert metrics["val/loss"] == pytest.approx(sums.sum() / counts.sum(), rel=1e-5)


def test_val_window_equals_val_loss_for_the_same_uniform_unweighted_window(tmp_path):
    module = make_module(250, 500, val_windows=[[250, 500], [0, 1000]])
    metrics = validate(module, tmp_path)
    assert metrics["val/loss_in_250_500"] == metrics["val/loss"]
    assert "val/loss_in_0_1000" in metrics and metrics["val/loss_in_0_1000"] != metrics["val/loss"]


def test_full_range_and_window_models_see_the_same_in_window_validation(tmp_path):
    """Same weights, same seed: a full-range model and a [250, 500) model log the same val/loss_in_250_500,
    although their own val/loss (different t ranges) differ."""
    window = make_module(250, 500, val_windows=[[250, 500]])
    full = make_module(0, 1000, val_windows=[[250, 500]])
    full.unet.load_state_dict(window.unet.state_dict())
    a, b = validate(window, tmp_path), validate(full, tmp_path)
    assert a["val/loss_in_250_500"] == b["val/loss_in_250_500"]
    assert a["val/loss"] != b["val/loss"]


def test_val_window_loss_is_eps_mse_for_x0_models(tmp_path):
    module = make_module(250, 500, parameterization="x0", val_windows=[[0, 250]], seed=2)
    data = Latents(n_batches=1, batch=8)
    metrics = validate(module, tmp_path, data)
    batch = next(iter(data))
    g = torch.Generator().manual_seed(step_seed(2, 2**32 - 1, 0))
    t = torch.randint(0, 250, (8,), generator=g)
    noise = torch.randn(batch["z_clean"].shape, generator=g)
    z0 = batch["z_clean"] * module.hparams.scale_factor
    ab = module.alphas_cumprod[t].float().reshape(-1, 1, 1, 1)
    x_t = ab.sqrt() * z0 + (1 - ab).sqrt() * noise
    with torch.no_grad():
        eps = (x_t - ab.sqrt() * module.unet(x_t, t)) / (1 - ab).sqrt()
    assert metrics["val/loss_in_0_250"] == pytest.approx(((eps - noise) ** 2).mean().item(), rel=1e-5)


@pytest.mark.parametrize("kw,match", [
    (dict(loss_weighting="snr"), "model.loss_weighting must be one of"),
    (dict(min_snr_gamma=-1.0), "model.min_snr_gamma must be > 0, got -1.0"),
    (dict(loss_buckets=-1), "model.loss_buckets must be in"),
    (dict(val_windows=[[500, 250]]), r"model.val_windows entry \[500, 250\]: invalid timestep window"),
    (dict(val_windows=[[250]]), r"model.val_windows entries are \[t_min, t_max\], got \[250\]"),
])
def test_bad_module_settings_are_refused(kw, match):
    with pytest.raises(SettingError, match=match):
        make_module(**kw)


def test_checkpoints_keep_the_distribution_and_old_ones_load_as_uniform(tmp_path):
    from helpers_compvis import make_window_checkpoint
    from pytorch_lightning.callbacks import ModelCheckpoint

    from refiner.formats.loading import load_window_checkpoint

    module = make_module(250, 500, window_kw=dict(distribution="piecewise", piecewise=PIECES),
                         loss_weighting="min_snr", val_windows=[[250, 500]])
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path, max_steps=2, limit_val_batches=0, callbacks=[saver])
    trainer.fit(module, train_dataloaders=DataLoader(Latents(n_batches=10), batch_size=None))
    path = tmp_path / "ckpt" / "last.ckpt"
    assert torch.load(path, weights_only=True)["hyper_parameters"]["window"] == module.window.to_dict()
    assert load_window_checkpoint(path, use_ema=False).window == module.window
    again = WindowRefiner.load_from_checkpoint(path, weights_only=True)
    assert again.window == module.window and again.hparams.loss_weighting == "min_snr"
    assert [str(w) for w in again.val_windows] == ["[250, 500)"]

    old = make_window_checkpoint(tmp_path, tiny_unet_params())["path"]  # hyper_parameters of earlier versions
    assert load_window_checkpoint(old).window.distribution == "uniform"
    legacy = WindowRefiner.load_from_checkpoint(old, weights_only=True)
    assert legacy.window == Window(250, 500) and legacy.hparams.loss_weighting == "none"
    assert legacy.buckets == [(250, 312), (312, 375), (375, 437), (437, 500)] and legacy.val_windows == []


# -- configs -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["refiner_tiny", "ldm_vq4_ffhq"])
def test_config_defaults(model, tmp_path):
    from conftest import compose_config

    cfg = compose_config("train", [f"model={model}"], tmp_path)
    assert (cfg.model.loss_weighting, cfg.model.min_snr_gamma, cfg.model.loss_buckets, cfg.model.val_windows) == \
        ("none", 5.0, 4, None)
    w = cfg.model.window
    assert (w.distribution, w.logit_mean, w.logit_std, w.piecewise) == ("uniform", 0.0, 1.0, None)


def test_config_overrides_reach_the_window_and_bad_ones_fail_validation(tmp_path):
    from conftest import compose_config
    from omegaconf import OmegaConf

    from refiner.apps.train import ConfigError
    from refiner.apps.train import validate as validate_config

    cfg = compose_config("train", ["window=late_500_750", "window.distribution=piecewise",
                                   "window.piecewise=[[250,400,1.0],[400,500,3.0]]", "model.loss_weighting=min_snr",
                                   "model.val_windows=[[250,500],[0,1000]]", "model.first_stage=null"], tmp_path)
    w = Window(**OmegaConf.to_container(cfg.model.window, resolve=True))
    assert w.piecewise == ((250, 400, 1.0), (400, 500, 3.0))
    validate_config(cfg)
    bad = compose_config("train", ["window=late_500_750", "window.distribution=piecewise",
                                   "window.piecewise=[[250,400,1.0],[400,450,3.0]]"], tmp_path)
    with pytest.raises(ConfigError, match="ends at 450, not at t_max=500"):
        validate_config(bad)
