"""Noise process: schedules vs closed forms, q_sample, parameterization conversions, windows."""

from __future__ import annotations

import math

import pytest
import torch

from refiner.diffusion import (
    ScheduleConfig,
    Window,
    eps_from_x0,
    make_betas,
    q_sample,
    to_x0_eps,
    training_target,
    v_from_x0_eps,
    x0_eps_from_v,
    x0_from_eps,
)


def test_compvis_linear_schedule_is_linear_in_sqrt_beta():
    betas = make_betas("linear", 1000, 0.0015, 0.0195)
    assert betas.dtype == torch.float64 and betas.shape == (1000,)
    for t in (0, 1, 500, 999):
        expected = (math.sqrt(0.0015) + t / 999 * (math.sqrt(0.0195) - math.sqrt(0.0015))) ** 2
        assert betas[t].item() == pytest.approx(expected, rel=1e-12)


def test_alphas_cumprod_is_the_running_product_by_hand():
    cfg = ScheduleConfig(kind="linear_beta", num_timesteps=4, linear_start=0.1, linear_end=0.4)
    ac = cfg.alphas_cumprod()
    assert ac.tolist() == pytest.approx([0.9, 0.9 * 0.8, 0.9 * 0.8 * 0.7, 0.9 * 0.8 * 0.7 * 0.6], rel=1e-12)


def test_cosine_schedule_matches_nichol_dhariwal_eq17():
    T, s = 1000, 0.008
    ac = ScheduleConfig(kind="cosine", num_timesteps=T, cosine_s=s).alphas_cumprod()

    def f(t):
        return math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2

    for t in (0, 10, 250, 500, 900):  # below the 0.999 beta clip
        assert ac[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    assert make_betas("cosine", T, cosine_s=s).max().item() <= 0.999


def test_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="unknown beta schedule"):
        make_betas("quadratic")


def test_q_sample_by_hand_and_its_moments():
    ac = torch.tensor([0.81, 0.36], dtype=torch.float64)
    x0, eps = torch.tensor([[2.0]]), torch.tensor([[1.0]])
    assert q_sample(x0, torch.tensor([1]), ac, eps).item() == pytest.approx(0.6 * 2 + 0.8 * 1)
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((200_000, 1), 3.0)
    xt = q_sample(x0, torch.tensor(0), ac, torch.randn(x0.shape, generator=g))
    assert xt.mean().item() == pytest.approx(0.9 * 3, abs=0.01)
    assert xt.var().item() == pytest.approx(1 - 0.81, abs=0.005)


@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
def test_every_parameterization_recovers_x0_and_eps(parameterization):
    ac = ScheduleConfig().alphas_cumprod()
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64), torch.randn(5, 3, 4, 4, generator=g,
                                                                                     dtype=torch.float64)
    t = torch.tensor([0, 10, 499, 750, 999])
    xt = q_sample(x0, t, ac, eps)
    target = training_target(parameterization, x0, eps, t, ac)
    x0_hat, eps_hat = to_x0_eps(target, xt, t, ac, parameterization)
    torch.testing.assert_close(x0_hat, x0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(eps_hat, eps, rtol=1e-6, atol=1e-6)


def test_v_by_hand():
    ac = torch.tensor([0.64], dtype=torch.float64)  # sqrt(ab)=0.8, sqrt(1-ab)=0.6
    x0, eps = torch.tensor([[1.0]], dtype=torch.float64), torch.tensor([[2.0]], dtype=torch.float64)
    v = v_from_x0_eps(x0, eps, torch.tensor([0]), ac)
    assert v.item() == pytest.approx(0.8 * 2 - 0.6 * 1)
    xt = q_sample(x0, torch.tensor([0]), ac, eps)  # 0.8 + 1.2 = 2.0
    assert x0_from_eps(xt, eps, torch.tensor([0]), ac).item() == pytest.approx(1.0)
    assert eps_from_x0(xt, x0, torch.tensor([0]), ac).item() == pytest.approx(2.0)
    x0_v, eps_v = x0_eps_from_v(xt, v, torch.tensor([0]), ac)
    assert (x0_v.item(), eps_v.item()) == pytest.approx((1.0, 2.0))


@pytest.mark.parametrize("t_min,t_max,T,match", [
    (500, 250, 1000, "inverted"), (250, 250, 1000, "inverted"), (-1, 250, 1000, "0 <= t_min"),
    (0, 1001, 1000, "t_max <= T"),
])
def test_bad_windows_are_refused(t_min, t_max, T, match):
    with pytest.raises(ValueError, match=match):
        Window(t_min, t_max, T)


def test_window_types_are_checked():
    with pytest.raises(TypeError):
        Window(0.5, 250)
    with pytest.raises(TypeError):
        Window(True, 250)


def test_window_contains_is_half_open_and_sample_is_uniform_inside():
    w = Window(250, 500)
    assert w.contains(250) and w.contains(499) and not w.contains(500) and not w.contains(249)
    t = torch.tensor([249, 250, 499, 500])
    assert w.contains(t).tolist() == [False, True, True, False]
    draws = w.sample(250_000, generator=torch.Generator().manual_seed(0))
    assert draws.min().item() == 250 and draws.max().item() == 499
    counts = torch.bincount(draws - 250, minlength=250).double()
    chi2 = ((counts - counts.mean()) ** 2 / counts.mean()).sum().item()
    assert chi2 < 250 + 5 * math.sqrt(2 * 250)  # chi-square, 249 dof: uniform over the whole window
