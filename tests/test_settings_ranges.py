"""Issue 9, class 5: numeric settings are range-checked by the sampling API and by refine.py."""

import math

import pytest
import torch

from refiner.diffusion import ScheduleConfig, Window
from refiner.errors import SettingError
from refiner.experts import Expert, refine
from refiner.sampling import ddim_step, max_ddim_eta, sample_ddim, timestep_grid

AB = ScheduleConfig("linear", 1000, 0.0015, 0.0195).alphas_cumprod()


def _zero(x, t):
    return torch.zeros_like(x)


@pytest.mark.parametrize("eta", [-1.0, -1e-9, math.nan, math.inf, True])
def test_negative_or_non_finite_eta_is_refused_everywhere(eta):
    x = torch.randn(1, 1, 2, 2)
    with pytest.raises(ValueError, match="eta must be a finite number >= 0"):
        ddim_step(x, 500, 400, x, AB, eta=eta, noise=torch.zeros_like(x))
    with pytest.raises(ValueError, match="eta must be"):
        sample_ddim(_zero, x, [500, 400], AB, eta=eta)
    with pytest.raises(ValueError, match="eta must be"):
        refine([Expert(_zero, Window(0, 1000))], x, 499, 5, AB, eta=eta, noise=torch.zeros_like(x))


def test_eta_above_one_only_where_the_ddim_variance_fits():
    """sigma^2 = eta^2 (1-a_prev)/(1-a) (1-a/a_prev) <= 1 - a_prev  <=>  eta <= sqrt((1-a)/(1-a/a_prev))."""
    a, a_prev = float(AB[500]), float(AB[400])
    bound = max_ddim_eta(a, a_prev)
    assert bound == pytest.approx(math.sqrt((1 - a) / (1 - a / a_prev))) and bound > 1
    x, out, noise = torch.randn(1, 1, 2, 2, dtype=torch.float64), torch.randn(1, 1, 2, 2, dtype=torch.float64), \
        torch.randn(1, 1, 2, 2, dtype=torch.float64)
    # at the bound the eps direction vanishes: x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev) noise
    x_prev, x0 = ddim_step(x, 500, 400, out, AB, eta=bound * (1 - 1e-12), noise=noise)
    torch.testing.assert_close(x_prev, math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * noise, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"too large for the DDIM step t=500 -> 400.*eta <= "):
        ddim_step(x, 500, 400, out, AB, eta=bound * 1.001, noise=noise)
    fine = timestep_grid(999, 1000)  # every step of the full grid allows eta up to 1.41
    assert min(max_ddim_eta(float(AB[t]), float(AB[max(p, 0)])) for t, p in zip(fine, fine[1:] + [-1])) > 1.2
    sample_ddim(_zero, torch.zeros(1, 1, 1, 1), fine, AB, eta=1.2, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="too large"):
        refine([Expert(_zero, Window(0, 1000))], torch.zeros(1, 1, 1, 1), 299, 4, AB, eta=1.05)


@pytest.mark.parametrize("override, message", [
    ("eta=-1", "eta must be in"), ("eta=nan", "eta must be a finite number"), ("steps=0", "steps must be in"),
    ("t_start=-5", "t_start must be in"), ("batch_size=0", "batch_size must be in"), ("seed=-1", "seed must be in"),
    ("grid_max_images=-1", "grid_max_images"), ("steps=2.5", "steps must be an integer"),
    ("spacing=linear", "spacing must be one of"), ("pad_mode=wrap", "pad_mode must be one of"),
    ("overwrite=maybe", "overwrite must be true or false"),
])
def test_sample_settings_out_of_range_fail_before_loading_anything(tmp_path, override, message):
    from conftest import compose_config

    from refiner.apps.refine import run

    cfg = compose_config("refine", [f"inputs={tmp_path}", "experts=[/nonexistent.ckpt]", override,
                                    f"output_dir={tmp_path / 'out'}"], tmp_path / "out")
    with pytest.raises(SettingError, match=message):
        run(cfg)
    assert not (tmp_path / "out").exists()


def test_eta_too_large_for_the_grid_is_a_setting_error():
    from refiner.errors import RefineError
    from refiner.formats.window_files import WindowWeights
    from refiner.inference.chain import Chain, LoadedExpert

    weights = WindowWeights({}, {}, Window(0, 500), ScheduleConfig("linear", 1000, 0.0015, 0.0195), "eps", None,
                            "w.ckpt", False)
    chain = Chain([LoadedExpert(weights, unet=None)], AB, 1.0)  # plan() needs only windows and parameterizations
    with pytest.raises(RefineError, match="eta=1.05 is too large"):
        chain.plan(299, 4, eta=1.05)
    assert chain.plan(299, 4, eta=1.0).timesteps == [299, 200, 101, 2]
