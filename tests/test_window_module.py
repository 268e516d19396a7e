"""The window-restricted Lightning module: t drawn only from the window, EMA, hparams, lr scaling."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, IterableDataset

from refiner.diffusion import ScheduleConfig
from refiner.lit.window_module import WindowRefiner
from refiner.models.unet import tiny_unet_params


class RandomLatents(IterableDataset):
    def __init__(self, n_batches=1000, batch=4, shape=(3, 8, 8)):
        self.n_batches, self.batch, self.shape = n_batches, batch, shape

    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        for _ in range(self.n_batches):
            z = torch.randn(self.batch, *self.shape, generator=g)
            yield {"z_clean": z, "z_degraded": z + 0.1}


def make_module(t_min=250, t_max=500, **kw):
    unet = tiny_unet_params(image_size=8, model_channels=32, num_head_channels=16, channel_mult=[1, 2])
    return WindowRefiner(unet=unet, window=dict(t_min=t_min, t_max=t_max, num_timesteps=1000),
                         schedule=ScheduleConfig().to_dict(), **{"base_lr": 1e-3, **kw})


def fit(module, steps, tmp_path, callbacks=(), data=None, **trainer_kw):
    trainer_kw = {"enable_checkpointing": False, **trainer_kw}
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path,
                         limit_val_batches=0, callbacks=list(callbacks), **trainer_kw)
    trainer.fit(module, train_dataloaders=DataLoader(data or RandomLatents(), batch_size=None))
    return trainer


def record_timesteps(module):
    seen = []
    module.unet.register_forward_pre_hook(lambda m, args: seen.append(args[1].detach().clone()))
    return seen


@pytest.mark.parametrize("window", [(250, 500), (0, 250), (990, 1000)])
def test_training_draws_only_timesteps_inside_the_window(tmp_path, window):
    module = make_module(*window)
    seen = record_timesteps(module)
    fit(module, 30, tmp_path)
    t = torch.cat(seen)
    assert len(t) == 30 * 4
    assert int(t.min()) >= window[0] and int(t.max()) < window[1]
    # uniform over the whole window, not a corner of it: both ends are reached
    width = window[1] - window[0]
    assert int(t.min()) < window[0] + width * 0.1 and int(t.max()) >= window[1] - 1 - width * 0.1


def test_step_noise_is_a_function_of_seed_rank_and_step(tmp_path):
    a, b = make_module(seed=3), make_module(seed=3)
    seen_a, seen_b = record_timesteps(a), record_timesteps(b)
    fit(a, 3, tmp_path)
    fit(b, 3, tmp_path)
    assert all(torch.equal(x, y) for x, y in zip(seen_a, seen_b))
    c = make_module(seed=4)
    seen_c = record_timesteps(c)
    fit(c, 3, tmp_path)
    assert not all(torch.equal(x, y) for x, y in zip(seen_a, seen_c))


class PatternLatents(IterableDataset):
    """Structured data (+-1 times a fixed pattern): the eps predictor can become nearly exact."""

    def __iter__(self):
        pattern = torch.linspace(-1, 1, 3 * 8 * 8).reshape(3, 8, 8)
        g = torch.Generator().manual_seed(0)
        while True:
            sign = torch.randint(0, 2, (4, 1, 1, 1), generator=g) * 2 - 1
            yield {"z_clean": sign * pattern, "z_degraded": pattern}


def test_training_reduces_the_window_loss(tmp_path):
    torch.manual_seed(0)
    module = make_module(0, 250)
    g = torch.Generator().manual_seed(1)
    batch = next(iter(PatternLatents()))
    before = module.diffusion_loss(batch, g)[0].item()
    fit(module, 60, tmp_path, data=PatternLatents())
    after = module.diffusion_loss(batch, torch.Generator().manual_seed(1))[0].item()
    assert after < 0.7 * before


def test_hyperparameters_are_plain_containers_and_hold_window_and_schedule():
    from omegaconf import OmegaConf

    module = WindowRefiner(
        unet=OmegaConf.create(tiny_unet_params()), window=OmegaConf.create(dict(t_min=0, t_max=250)),
        schedule=OmegaConf.create(ScheduleConfig().to_dict()))
    hp = dict(module.hparams)
    assert type(hp["unet"]) is dict and type(hp["window"]) is dict
    assert hp["window"]["t_max"] == 250 and hp["schedule"]["linear_end"] == 0.0195


def test_window_and_schedule_mismatch_is_refused():
    with pytest.raises(ValueError, match="inverted"):
        make_module(500, 250)
    with pytest.raises(ValueError, match="num_timesteps"):
        WindowRefiner(unet=tiny_unet_params(), window=dict(t_min=0, t_max=10, num_timesteps=10),
                      schedule=ScheduleConfig().to_dict())


def test_lr_is_scaled_by_world_size_batch_and_accumulation(tmp_path):
    module = make_module(base_lr=2e-6, scale_lr=True, batch_size=4)
    trainer = fit(module, 2, tmp_path, accumulate_grad_batches=3)
    assert trainer.optimizers[0].defaults["lr"] == pytest.approx(2e-6 * 1 * 4 * 3)


def test_ema_weights_go_to_state_dict_and_raw_to_current_model_state(tmp_path):
    from pytorch_lightning.callbacks import EMAWeightAveraging, ModelCheckpoint

    module = make_module()
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=10, save_last=True)
    fit(module, 10, tmp_path, callbacks=[EMAWeightAveraging(decay=0.9), saver], enable_checkpointing=True)
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    key = "unet.out.2.weight"
    assert key in ckpt["state_dict"] and key in ckpt["current_model_state"]
    assert not torch.equal(ckpt["state_dict"][key], ckpt["current_model_state"][key])
    assert ckpt["hyper_parameters"]["window"] == {"t_min": 250, "t_max": 500, "num_timesteps": 1000}
