"""CompVis and taming layouts: latent-diffusion ``model.ckpt`` (+ ``config.yaml``) and VQ first stages.

* :func:`load_compvis_ldm`: a CompVis latent-diffusion checkpoint -> UNet (EMA or raw), first stage, schedule buffers.
* :func:`read_first_stage_checkpoint`: CompVis vq-f4/vq-f8 or taming VQGAN weights (also ours, and the first stage
  inside an LDM checkpoint) from one file. Any first stage (a diffusers folder too) -> ``VQModel``:
  :mod:`refiner.formats.first_stage`.

CompVis LDM checkpoint layout (Lightning ``state_dict``): ``model.diffusion_model.*`` (UNet),
``model_ema.<name without dots>`` (LitEma copies of each parameter of ``model``) plus ``model_ema.decay``
and ``model_ema.num_updates``, ``first_stage_model.*``, ``cond_stage_model.*`` and top-level schedule buffers.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
import yaml
from torch import Tensor

from refiner.diffusion import ScheduleConfig
from refiner.formats.kinds import (
    LDM_UNET_PREFIX,
    check_unet_state,
    describe_checkpoint,
    int_or_none,
    kind_text,
    prefix_summary,
    state_dict_of,
    strip_prefix,
)
from refiner.formats.safe_load import CheckpointError, check_readable, safe_torch_load

log = logging.getLogger(__name__)

LDM_EMA_PREFIX = "model_ema."
LDM_FIRST_STAGE_PREFIX = "first_stage_model."
LDM_COND_STAGE_PREFIX = "cond_stage_model."
# CompVis DDPM.register_schedule buffers (ldm/models/diffusion/ddpm.py) and other known top-level extras.
LDM_SCHEDULE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar", "lvlb_weights",
)
LDM_OTHER_BUFFERS = ("scale_factor", "cond_ids")
# VQModel constructor arguments; the rest of a CompVis first_stage_config.params is training-only.
VQ_ARGS = ("ddconfig", "n_embed", "embed_dim", "beta", "remap", "sane_index_shape")
VQ_REQUIRED_ARGS = ("ddconfig", "n_embed", "embed_dim")
VQ_TRAINING_ONLY_ARGS = (
    "lossconfig", "ckpt_path", "ignore_keys", "image_key", "colorize_nlabels", "monitor", "batch_resize_range",
    "scheduler_config", "lr_g_factor", "use_ema",
)
# DDPM.__init__ defaults, used when a CompVis config omits them.
COMPVIS_SCHEDULE_DEFAULTS = dict(timesteps=1000, beta_schedule="linear", linear_start=1e-4, linear_end=2e-2,
                                 cosine_s=8e-3)


@dataclass
class LDMCheckpoint:
    """Pieces of a CompVis LDM checkpoint, ready for ``load_state_dict(strict=True)``."""

    source: str
    unet: dict[str, Tensor]
    first_stage: dict[str, Tensor]
    alphas_cumprod: Tensor  # as stored (float32 in CompVis files), widened to float64
    betas: Tensor | None
    global_step: int | None
    used_ema: bool
    unet_params: dict | None = None  # model.params.unet_config.params
    first_stage_params: dict | None = None  # ddconfig, n_embed, embed_dim (VQModel arguments)
    schedule: ScheduleConfig | None = None  # from config.yaml, or inferred from a linear ``betas``
    conditioning_key: str | None = None
    scale_factor: float | None = None
    config: dict | None = field(default=None, repr=False)


def ema_key(unet_key: str) -> str:
    """LitEma name of a UNet parameter: ``time_embed.0.weight`` -> ``model_ema.diffusion_modeltime_embed0weight``.

    LitEma registers each parameter of the wrapper ``model`` (whose child is ``diffusion_model``)
    under ``name.replace('.', '')``.
    """
    return LDM_EMA_PREFIX + ("diffusion_model." + unet_key).replace(".", "")


class _ConfigLoader(yaml.SafeLoader):
    """YAML as OmegaConf reads it for plain values: ``1e-4`` (no dot) is a float, as in YAML 1.2."""


_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?(?:[eE][-+]?[0-9]+)$|^[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?$"),
    list("-+0123456789."))


def load_compvis_config(config_path: str | os.PathLike) -> dict:
    """Read a CompVis ``config.yaml`` into plain containers. OmegaConf interpolations (``${...}``) are refused:
    CompVis's released configs have none, and the library reads no Hydra/OmegaConf config (docs/design.md)."""
    path = Path(config_path)
    check_readable(path)
    if not path.is_file():
        raise CheckpointError(f"config not found: {path}")
    try:
        cfg = yaml.load(path.read_text(), Loader=_ConfigLoader)
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not a readable YAML config ({str(err).splitlines()[0]})") from err
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict):
        raise CheckpointError(f"{path}: expected a CompVis config with a top-level 'model' block")
    interpolated = _first_interpolation(cfg)
    if interpolated is not None:
        raise CheckpointError(f"{path}: {interpolated} is an OmegaConf interpolation; write the value out")
    return cfg


def _first_interpolation(value: Any, where: str = "") -> str | None:
    if isinstance(value, str):
        return f"{where.lstrip('.')}={value!r}" if "${" in value else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    return next((found for k, v in items if (found := _first_interpolation(v, f"{where}.{k}")) is not None), None)


def vq_params(params: Mapping, source: str) -> dict:
    """The ``VQModel`` arguments of a CompVis ``first_stage_config.params`` (training-only entries such as
    ``lossconfig`` dropped); unknown entries or missing ddconfig/n_embed/embed_dim raise ``CheckpointError``."""
    unknown = sorted(set(params) - set(VQ_ARGS) - set(VQ_TRAINING_ONLY_ARGS))
    if unknown:
        raise CheckpointError(f"{source}: unknown first-stage parameters {unknown}; VQModel takes {list(VQ_ARGS)}")
    missing = [k for k in VQ_REQUIRED_ARGS if k not in params]
    if missing:
        raise CheckpointError(f"{source}: first-stage parameters lack {missing}")
    return {k: params[k] for k in VQ_ARGS if k in params}


def _schedule_from_ldm_params(params: Mapping, source: str) -> ScheduleConfig | None:
    p = {**COMPVIS_SCHEDULE_DEFAULTS, **{k: params[k] for k in COMPVIS_SCHEDULE_DEFAULTS if k in params}}
    if p["beta_schedule"] not in ("linear", "cosine"):
        warnings.warn(f"{source}: beta_schedule={p['beta_schedule']!r} has no refiner equivalent; schedule=None")
        return None
    return ScheduleConfig(kind=p["beta_schedule"], num_timesteps=int(p["timesteps"]),
                          linear_start=float(p["linear_start"]), linear_end=float(p["linear_end"]),
                          cosine_s=float(p["cosine_s"]))


def _infer_linear_schedule(betas: Tensor) -> ScheduleConfig | None:
    """The CompVis 'linear' schedule has betas[0] = linear_start and betas[-1] = linear_end exactly."""
    cand = ScheduleConfig("linear", len(betas), float(betas[0]), float(betas[-1]))
    return cand if torch.allclose(cand.betas(), betas.double(), rtol=1e-5, atol=1e-8) else None


def load_compvis_ldm(
    ckpt_path: str | os.PathLike,
    use_ema: bool = True,
    config_path: str | os.PathLike | None = None,
    trust_checkpoint: bool = False,
) -> LDMCheckpoint:
    """Split a CompVis LDM checkpoint into UNet (EMA by default), first stage and schedule.

    With ``config_path`` the UNet weights are checked (keys and shapes) against
    ``UNetModel(**unet_config.params)`` and the config's schedule against the stored ``alphas_cumprod``.
    """
    source = str(ckpt_path)
    obj = safe_torch_load(ckpt_path, trust_checkpoint)
    return ldm_from_checkpoint(obj, source, use_ema, config_path)


def ldm_from_checkpoint(obj: Any, source: str, use_ema: bool, config_path=None) -> LDMCheckpoint:
    if describe_checkpoint(obj) != "compvis_ldm":
        raise CheckpointError(f"{source} is {kind_text(obj)}, not a CompVis LDM checkpoint "
                              f"(no '{LDM_UNET_PREFIX}*' keys)")
    sd = state_dict_of(obj)
    raw = strip_prefix(sd, LDM_UNET_PREFIX)
    ema_names = {k: ema_key(k) for k in raw}
    present = [k for k, e in ema_names.items() if e in sd]
    used_ema = False
    unet = raw
    if use_ema:
        if not present:
            warnings.warn(f"{source}: use_ema=True but the checkpoint has no model_ema.* weights; using raw weights")
        elif len(present) != len(raw):
            missing = [ema_names[k] for k in raw if ema_names[k] not in sd]
            raise CheckpointError(f"{source}: EMA weights incomplete: {len(missing)} of {len(raw)} missing "
                                  f"(first 5: {missing[:5]}); pass use_ema=false to use the raw weights")
        else:
            unet, used_ema = {k: sd[e] for k, e in ema_names.items()}, True

    ema_known = set(ema_names.values()) | {LDM_EMA_PREFIX + "decay", LDM_EMA_PREFIX + "num_updates"}
    known = set(LDM_SCHEDULE_BUFFERS) | set(LDM_OTHER_BUFFERS) | ema_known
    used_prefixes = (LDM_UNET_PREFIX, LDM_FIRST_STAGE_PREFIX)
    leftovers = [k for k in sd if k not in known and not k.startswith(used_prefixes)]
    cond = [k for k in leftovers if k.startswith(LDM_COND_STAGE_PREFIX)]
    ddim = [k for k in leftovers if k.startswith("ddim_")]
    other = [k for k in leftovers if k not in cond and k not in ddim]
    if cond:
        log.info("%s: ignored %d cond_stage_model.* keys (refiner is unconditional or concat-conditioned)",
                 source, len(cond))
    if ddim:
        log.info("%s: ignored %d leftover ddim_* buffers", source, len(ddim))
    if other:
        log.warning("%s: ignored %d unrecognised keys (first 5: %s)", source, len(other), other[:5])

    if "alphas_cumprod" not in sd:
        raise CheckpointError(f"{source}: LDM checkpoint has no 'alphas_cumprod' schedule buffer")
    first_stage = {k: v for k, v in strip_prefix(sd, LDM_FIRST_STAGE_PREFIX).items() if not k.startswith("loss.")}
    betas = sd.get("betas")
    result = LDMCheckpoint(
        source=source, unet=unet, first_stage=first_stage, alphas_cumprod=sd["alphas_cumprod"].double(),
        betas=None if betas is None else betas.double(), global_step=int_or_none(obj.get("global_step")),
        used_ema=used_ema, scale_factor=float(sd["scale_factor"]) if "scale_factor" in sd else None,
    )
    if config_path is not None:
        _apply_ldm_config(result, load_compvis_config(config_path), str(config_path))
    elif betas is not None:
        result.schedule = _infer_linear_schedule(betas)
    return result


def _apply_ldm_config(result: LDMCheckpoint, cfg: dict, cfg_source: str) -> None:
    params = cfg["model"].get("params") or {}
    unet_cfg, fs_cfg = params.get("unet_config"), params.get("first_stage_config")
    if not isinstance(unet_cfg, dict) or "params" not in unet_cfg:
        raise CheckpointError(f"{cfg_source}: model.params.unet_config.params is missing")
    target = str(unet_cfg.get("target", ""))
    if target and not target.endswith("openaimodel.UNetModel"):
        raise CheckpointError(f"{cfg_source}: unet_config.target={target!r}; refiner loads openaimodel.UNetModel only")
    result.config = cfg
    result.unet_params = dict(unet_cfg["params"])
    check_unet_state(result.unet, result.unet_params, f"{result.source} (with {cfg_source})")
    if isinstance(fs_cfg, dict) and "params" in fs_cfg:
        result.first_stage_params = vq_params(fs_cfg["params"], cfg_source)
    result.conditioning_key = params.get("conditioning_key")
    if result.scale_factor is None and "scale_factor" in params:
        result.scale_factor = float(params["scale_factor"])
    result.schedule = _schedule_from_ldm_params(params, cfg_source)
    if result.schedule is not None:
        ab = result.schedule.alphas_cumprod()
        if ab.shape != result.alphas_cumprod.shape or not torch.allclose(ab, result.alphas_cumprod, atol=1e-6):
            warnings.warn(f"{cfg_source}: the config's schedule {result.schedule} does not match the "
                          f"alphas_cumprod stored in {result.source}; the stored buffer is authoritative")


def read_first_stage_checkpoint(ckpt_path: str | os.PathLike, trust_checkpoint: bool = False
                                ) -> tuple[dict[str, Tensor], dict | None]:
    """VQModel weights from a CompVis vq-f4/vq-f8 or taming VQGAN checkpoint file (Lightning or raw state dict), or
    the ``first_stage_model.*`` part of an LDM checkpoint, and the VQ params a first-stage training run of ours saved
    in ``hyper_parameters`` (None for any other checkpoint). Training-only ``loss.*`` keys (discriminator, LPIPS,
    logvar) are dropped and reported through ``logging``. Any first-stage file or folder:
    :func:`refiner.formats.first_stage.load_first_stage`."""
    source = str(ckpt_path)
    obj = safe_torch_load(ckpt_path, trust_checkpoint)
    kind = describe_checkpoint(obj)
    sd = state_dict_of(obj)
    if kind == "compvis_ldm":
        sd = strip_prefix(sd, LDM_FIRST_STAGE_PREFIX)
        if not sd:
            raise CheckpointError(f"{source}: LDM checkpoint has no first_stage_model.* weights")
    elif kind != "first_stage":
        raise CheckpointError(f"{source} is {kind_text(obj)}, not a first-stage (VQ) checkpoint")
    dropped = [k for k in sd if k.startswith("loss.")]
    if dropped:
        log.info("%s: dropped %d training-only keys: %s", source, len(dropped), prefix_summary(dropped))
    hp = obj.get("hyper_parameters") if isinstance(obj, Mapping) else None
    saved = ({k: hp[k] for k in VQ_REQUIRED_ARGS}
             if isinstance(hp, Mapping) and all(k in hp for k in VQ_REQUIRED_ARGS) else None)
    return {k: v for k, v in sd.items() if not k.startswith("loss.")}, saved
