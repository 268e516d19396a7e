"""Build tiny checkpoints in the exact CompVis / taming / refiner-window layouts, for tests.

* :func:`make_compvis_ldm_checkpoint`: LatentDiffusion ``model.ckpt`` + ``config.yaml`` (LitEma names,
  schedule buffers computed like ``DDPM.register_schedule``, leftover ``ddim_*`` buffers, optional
  ``cond_stage_model.*``).
* :func:`make_first_stage_checkpoint`: vq-f4 style Lightning checkpoint with ``loss.*`` training keys.
* :func:`make_window_checkpoint`: a refiner window ``.ckpt`` as Lightning + EMAWeightAveraging write it.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from refiner.diffusion import make_betas
from refiner.models.unet import UNetModel
from refiner.models.vq import VQModel, tiny_ddconfig


class ArbitraryObject:
    """A custom class: pickling an instance makes a checkpoint that ``weights_only`` refuses."""

    def __init__(self, value=1):
        self.value = value


def randomized(module: torch.nn.Module, seed: int, std: float = 0.05) -> dict[str, torch.Tensor]:
    """Random values for every state tensor (zero-init layers too), so loads are distinguishable."""
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(v.shape, generator=g) * std).to(v.dtype) for k, v in module.state_dict().items()}


def compvis_schedule_buffers(linear_start=0.0015, linear_end=0.0195, timesteps=1000) -> dict[str, torch.Tensor]:
    """``DDPM.register_schedule`` (v_posterior=0): computed in float64, stored as float32 buffers."""
    betas = make_betas("linear", timesteps, linear_start, linear_end)
    alphas = 1 - betas
    ac = torch.cumprod(alphas, 0)
    ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    post_var = betas * (1 - ac_prev) / (1 - ac)
    bufs = dict(
        betas=betas, alphas_cumprod=ac, alphas_cumprod_prev=ac_prev, sqrt_alphas_cumprod=ac.sqrt(),
        sqrt_one_minus_alphas_cumprod=(1 - ac).sqrt(), log_one_minus_alphas_cumprod=(1 - ac).log(),
        sqrt_recip_alphas_cumprod=(1 / ac).sqrt(), sqrt_recipm1_alphas_cumprod=(1 / ac - 1).sqrt(),
        posterior_variance=post_var, posterior_log_variance_clipped=post_var.clamp(min=1e-20).log(),
        posterior_mean_coef1=betas * ac_prev.sqrt() / (1 - ac),
        posterior_mean_coef2=(1 - ac_prev) * alphas.sqrt() / (1 - ac),
    )
    return {k: v.float() for k, v in bufs.items()}


def ldm_config(unet_params: dict, ddconfig: dict, n_embed: int, embed_dim: int, linear_start=0.0015,
               linear_end=0.0195, timesteps=1000) -> dict:
    """A CompVis LDM-VQ config.yaml (as in configs/latent-diffusion/ffhq-ldm-vq-4.yaml), tiny sizes."""
    return {"model": {
        "base_learning_rate": 2.0e-06,
        "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
        "params": {
            "linear_start": linear_start, "linear_end": linear_end, "num_timesteps_cond": 1, "log_every_t": 200,
            "timesteps": timesteps, "first_stage_key": "image", "image_size": unet_params["image_size"],
            "channels": unet_params["in_channels"], "monitor": "val/loss_simple_ema",
            "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet_params},
            "first_stage_config": {"target": "ldm.models.autoencoder.VQModelInterface", "params": {
                "embed_dim": embed_dim, "n_embed": n_embed, "ddconfig": ddconfig,
                "lossconfig": {"target": "torch.nn.Identity"}}},
            "cond_stage_config": "__is_unconditional__",
        }},
        "data": {"target": "main.DataModuleFromConfig", "params": {"batch_size": 42}},
    }


def make_compvis_ldm_checkpoint(
    tmp_path: Path,
    unet_params: dict,
    ddconfig: dict | None = None,
    n_embed: int = 16,
    embed_dim: int = 3,
    with_ema: bool = True,
    with_cond_stage: bool = True,
    global_step: int = 7,
    name: str = "model.ckpt",
) -> dict:
    """Write ``model.ckpt`` and ``config.yaml``; return paths and the tensors written (raw, ema, first stage)."""
    ddconfig = ddconfig or tiny_ddconfig(4)
    unet = UNetModel(**unet_params)
    raw = randomized(unet, seed=1)
    ema = {k: v + 1.0 for k, v in raw.items()}  # distinguishable from raw
    vq = randomized(VQModel(ddconfig, n_embed, embed_dim), seed=2)
    sd = {f"model.diffusion_model.{k}": v for k, v in raw.items()}
    if with_ema:
        for k, v in ema.items():  # LitEma: name relative to ``model`` with the dots removed
            sd["model_ema." + f"diffusion_model.{k}".replace(".", "")] = v
        sd["model_ema.decay"] = torch.tensor(0.9999)
        sd["model_ema.num_updates"] = torch.tensor(global_step, dtype=torch.int32)
    sd.update({f"first_stage_model.{k}": v for k, v in vq.items()})
    if with_cond_stage:
        sd["cond_stage_model.embedding.weight"] = torch.randn(4, 8)
    sd.update(compvis_schedule_buffers())
    sd.update(ddim_sigmas=torch.zeros(50), ddim_alphas=torch.rand(50), ddim_alphas_prev=torch.rand(50),
              ddim_sqrt_one_minus_alphas=torch.rand(50))
    ckpt = {"epoch": 3, "global_step": global_step, "pytorch-lightning_version": "1.4.2", "state_dict": sd,
            "optimizer_states": [], "lr_schedulers": []}
    tmp_path = Path(tmp_path)
    ckpt_path = tmp_path / name
    torch.save(ckpt, ckpt_path)
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(ldm_config(unet_params, ddconfig, n_embed, embed_dim)))
    return dict(ckpt_path=ckpt_path, config_path=config_path, raw=raw, ema=ema, first_stage=vq,
                ddconfig=ddconfig, n_embed=n_embed, embed_dim=embed_dim)


def first_stage_loss_keys() -> dict[str, torch.Tensor]:
    """Training-only keys of a vq-f4 checkpoint: NLayerDiscriminator, LPIPS, logvar."""
    return {
        "loss.logvar": torch.zeros(()),
        "loss.discriminator.main.0.weight": torch.randn(8, 3, 4, 4),
        "loss.discriminator.main.0.bias": torch.randn(8),
        "loss.discriminator.main.2.weight": torch.randn(16, 8, 4, 4),
        "loss.perceptual_loss.net.slice1.0.weight": torch.randn(4, 3, 3, 3),
        "loss.perceptual_loss.lin0.model.1.weight": torch.randn(1, 4, 1, 1),
    }


def make_first_stage_checkpoint(tmp_path: Path, ddconfig: dict | None = None, n_embed: int = 16,
                                embed_dim: int = 3, lightning: bool = True, name: str = "vq.ckpt") -> dict:
    ddconfig = ddconfig or tiny_ddconfig(4)
    vq = randomized(VQModel(ddconfig, n_embed, embed_dim), seed=3)
    sd = {**vq, **first_stage_loss_keys()}
    path = Path(tmp_path) / name
    torch.save({"epoch": 1, "global_step": 100, "state_dict": sd} if lightning else sd, path)
    return dict(path=path, state=vq, params=dict(ddconfig=ddconfig, n_embed=n_embed, embed_dim=embed_dim))


def make_window_checkpoint(tmp_path: Path, unet_params: dict, window=(250, 500), with_ema: bool = True,
                           parameterization: str = "eps", global_step: int = 11, name: str = "window.ckpt") -> dict:
    """A window ``.ckpt`` as our Lightning module + EMAWeightAveraging save it (EMA in ``state_dict``)."""
    unet = UNetModel(**unet_params)
    raw = randomized(unet, seed=4)
    ema = {k: v - 1.0 for k, v in raw.items()}
    hp = {
        "unet": dict(unet_params),
        "window": {"t_min": window[0], "t_max": window[1], "num_timesteps": 1000},
        "schedule": {"kind": "linear", "num_timesteps": 1000, "linear_start": 0.0015, "linear_end": 0.0195,
                     "cosine_s": 0.008},
        "parameterization": parameterization, "conditioning": None, "scale_factor": 1.0, "base_lr": 1e-4,
    }
    ckpt = {"epoch": 0, "global_step": global_step, "pytorch-lightning_version": "2.6.6", "hyper_parameters": hp,
            "state_dict": {f"unet.{k}": v for k, v in (ema if with_ema else raw).items()},
            "loops": {}, "callbacks": {}, "optimizer_states": [], "lr_schedulers": []}
    if with_ema:
        ckpt["current_model_state"] = {f"unet.{k}": v for k, v in raw.items()}
        ckpt["averaging_state"] = {"n_averaged": torch.tensor(global_step)}
    path = Path(tmp_path) / name
    torch.save(ckpt, path)
    return dict(path=path, raw=raw, ema=ema, hyper_parameters=hp)
