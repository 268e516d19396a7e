"""diffusers configs <-> our params: ``UNet2DModel`` <-> ``UNetModel`` params, ``VQModel`` <-> our VQ params
(ddconfig, n_embed, embed_dim), ``DDIMScheduler`` <-> :class:`~refiner.diffusion.ScheduleConfig`, and the whole
state-dict conversions that check a layout is convertible before mapping its keys (:mod:`.keymaps`).

Each ``*_config`` function refuses, naming the reason, a model diffusers cannot build; each inverse refuses a
diffusers config that is not a CompVis/taming layout. Defaults for keys a released config.json may omit are
diffusers 0.42.1's ``__init__`` defaults. Sources: see :mod:`refiner.formats.diffusers`.
"""

from __future__ import annotations

import math
from typing import Mapping

from torch import Tensor

from refiner.diffusion import ScheduleConfig
from refiner.formats.diffusers import DIFFUSERS_VERSION, DiffusersFormatError
from refiner.formats.diffusers.keymaps import Pair, convert, unet_pairs, vq_pairs
from refiner.models.unet import GROUPS
from refiner.models.vq import TAMING_NORM_GROUPS

UNET_EPS = 1e-5  # CompVis GroupNorm32 uses torch's default eps
SCHEDULES_TO_DIFFUSERS = {"linear": "scaled_linear", "linear_beta": "linear", "cosine": "squaredcos_cap_v2"}
SCHEDULES_FROM_DIFFUSERS = {v: k for k, v in SCHEDULES_TO_DIFFUSERS.items()}
PREDICTION_TYPES = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}


def unet2d_config(params: Mapping) -> dict:
    """``UNet2DModel`` config equivalent to ``UNetModel(**params)``; raises for layouts diffusers cannot build."""
    p = dict(params)
    mult = [int(m) for m in p["channel_mult"]]
    problems = []
    if mult[0] != 1:
        problems.append(f"channel_mult[0]={mult[0]} (UNet2DModel's conv_in outputs block_out_channels[0])")
    for key, ok, why in (("conv_resample", True, "UNet2DModel always resamples with convs"),
                         ("resblock_updown", False, "DownBlock2D has no ResBlock downsampler"),
                         ("dims", 2, "2D only"), ("num_classes", None, "class conditioning"),
                         ("use_spatial_transformer", False, "cross-attention")):
        if p.get(key, ok) != ok:
            problems.append(f"{key}={p[key]} ({why})")
    pairs = unet_pairs(p)
    head_dims = {(int(p["model_channels"]) * _level_mult(pr, p)) // pr.heads for pr in pairs if pr.kind == "attn"}
    if len(head_dims) > 1:
        problems.append(f"attention head widths differ across levels {sorted(head_dims)} (UNet2DModel has one "
                        "attention_head_dim; use num_head_channels)")
    if problems:
        raise DiffusersFormatError("this UNet has no UNet2DModel equivalent: " + "; ".join(problems))
    attn_ds = {int(r) for r in p["attention_resolutions"]}
    levels = range(len(mult))
    groups = int(p.get("norm_groups", GROUPS))
    return {
        "_class_name": "UNet2DModel", "_diffusers_version": DIFFUSERS_VERSION,
        "sample_size": int(p["image_size"]), "in_channels": int(p["in_channels"]),
        "out_channels": int(p["out_channels"]), "center_input_sample": False,
        "time_embedding_type": "positional", "flip_sin_to_cos": True, "freq_shift": 0,
        "down_block_types": ["AttnDownBlock2D" if 2**lv in attn_ds else "DownBlock2D" for lv in levels],
        "mid_block_type": "UNetMidBlock2D",
        "up_block_types": ["AttnUpBlock2D" if 2**lv in attn_ds else "UpBlock2D" for lv in reversed(levels)],
        "block_out_channels": [int(p["model_channels"]) * m for m in mult],
        "layers_per_block": int(p["num_res_blocks"]), "mid_block_scale_factor": 1, "downsample_padding": 1,
        "downsample_type": "conv", "upsample_type": "conv", "dropout": float(p.get("dropout", 0.0)),
        "act_fn": "silu", "attention_head_dim": head_dims.pop(), "norm_num_groups": groups,
        "attn_norm_num_groups": groups, "norm_eps": UNET_EPS,
        "resnet_time_scale_shift": "scale_shift" if p.get("use_scale_shift_norm") else "default",
        "add_attention": True, "class_embed_type": None, "num_class_embeds": None,
    }


def _level_mult(pair: Pair, params: Mapping) -> int:
    """Channel multiplier of the level an attention pair sits at (from its diffusers name)."""
    mult = [int(m) for m in params["channel_mult"]]
    block, index = pair.theirs.split(".")[:2]
    if block == "mid_block":
        return mult[-1]
    level = int(index) if block == "down_blocks" else len(mult) - 1 - int(index)
    return mult[level]


# UNet2DModel.__init__ defaults (diffusers 0.42.1) for keys a released config.json may omit.
UNET2D_DEFAULTS = {
    "in_channels": 3, "out_channels": 3, "center_input_sample": False, "time_embedding_type": "positional",
    "time_embedding_dim": None, "freq_shift": 0, "flip_sin_to_cos": True,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [224, 448, 672, 896], "layers_per_block": 2, "mid_block_scale_factor": 1,
    "downsample_padding": 1, "downsample_type": "conv", "upsample_type": "conv", "dropout": 0.0, "act_fn": "silu",
    "attention_head_dim": 8, "norm_num_groups": 32, "attn_norm_num_groups": None, "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default", "add_attention": True, "class_embed_type": None, "num_class_embeds": None,
}


def unet_params_from_unet2d_config(config: Mapping, source: str = "UNet2DModel config") -> dict:
    """Our ``UNetModel`` params for a ``UNet2DModel`` config (inverse of :func:`unet2d_config`)."""
    c = {**UNET2D_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
    boc = [int(x) for x in c["block_out_channels"]]
    mc = boc[0]
    downs, ups = list(c["down_block_types"]), list(c["up_block_types"])
    scale_shift = c["resnet_time_scale_shift"] == "scale_shift"
    expected = dict(center_input_sample=False, time_embedding_type="positional", freq_shift=0, flip_sin_to_cos=True,
                    mid_block_type="UNetMidBlock2D", mid_block_scale_factor=1, downsample_padding=1,
                    downsample_type="conv", upsample_type="conv", act_fn="silu",
                    add_attention=True, class_embed_type=None, num_class_embeds=None)
    problems = [f"{k}={c[k]!r} (need {v!r})" for k, v in expected.items() if c[k] != v]
    if c["time_embedding_dim"] not in (None, 4 * mc):
        problems.append(f"time_embedding_dim={c['time_embedding_dim']} (need {4 * mc})")
    if not math.isclose(float(c["norm_eps"]), UNET_EPS):
        problems.append(f"norm_eps={c['norm_eps']} (CompVis GroupNorm uses {UNET_EPS})")
    if c["resnet_time_scale_shift"] not in ("default", "scale_shift"):
        problems.append(f"resnet_time_scale_shift={c['resnet_time_scale_shift']!r}")
    if scale_shift and c["attn_norm_num_groups"] is None:
        problems.append("scale_shift without attn_norm_num_groups: the mid-block attention has no GroupNorm")
    if c["attn_norm_num_groups"] not in (None, c["norm_num_groups"]):
        problems.append(f"attn_norm_num_groups={c['attn_norm_num_groups']} differs from norm_num_groups="
                        f"{c['norm_num_groups']} (one GroupNorm group count throughout)")
    if any(b % mc for b in boc):
        problems.append(f"block_out_channels {boc} are not multiples of the first")
    if len(downs) != len(boc) or len(ups) != len(boc):
        problems.append(f"{len(downs)} down / {len(ups)} up block types for {len(boc)} levels")
    attn_levels = [i for i, t in enumerate(downs) if t == "AttnDownBlock2D"]
    if any(t not in ("DownBlock2D", "AttnDownBlock2D") for t in downs):
        problems.append(f"down_block_types {downs} (need DownBlock2D / AttnDownBlock2D)")
    want_ups = ["AttnUpBlock2D" if i in attn_levels else "UpBlock2D" for i in reversed(range(len(downs)))]
    if ups != want_ups:
        problems.append(f"up_block_types {ups} do not mirror the down blocks (need {want_ups})")
    if problems:
        raise DiffusersFormatError(f"{source}: not a CompVis-layout UNet refiner can load: " + "; ".join(problems))
    params = dict(image_size=int(_sample_size(c.get("sample_size"), source)), in_channels=int(c["in_channels"]),
                  out_channels=int(c["out_channels"]), model_channels=mc, num_res_blocks=int(c["layers_per_block"]),
                  attention_resolutions=[2**i for i in attn_levels], dropout=float(c["dropout"]),
                  channel_mult=[b // mc for b in boc], use_scale_shift_norm=scale_shift, resblock_updown=False)
    if int(c["norm_num_groups"]) != GROUPS:  # other groups: ours takes the extra key (refiner.models.unet)
        params["norm_groups"] = int(c["norm_num_groups"])
    head_dim = c["attention_head_dim"]
    if head_dim is None:  # diffusers: one head per block, as wide as the block
        params["num_heads"] = 1
    else:
        params["num_head_channels"] = int(head_dim)
    return params


def _sample_size(value, source: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise DiffusersFormatError(f"{source}: non-square sample_size {value} has no CompVis image_size")
        value = value[0]
    if value is None:
        raise DiffusersFormatError(f"{source}: config has no sample_size")
    return int(value)


def unet_to_diffusers(state: Mapping[str, Tensor], params: Mapping, source: str = "UNet") -> dict[str, Tensor]:
    """Our ``UNetModel`` state dict -> ``UNet2DModel`` state dict (checks the layout is exportable)."""
    unet2d_config(params)
    return convert(state, unet_pairs(params), True, source)


def unet_from_diffusers(state: Mapping[str, Tensor], config: Mapping,
                        source: str = "UNet2DModel") -> tuple[dict[str, Tensor], dict]:
    """``UNet2DModel`` state dict + config -> (our ``UNetModel`` state dict, its params)."""
    params = unet_params_from_unet2d_config(config, source)
    return convert(state, unet_pairs(params), False, source), params


# -------------------------------------------------------------------------------------- VQ configs
def vq_config(vq_params: Mapping, scaling_factor: float) -> dict:
    """``VQModel`` config equivalent to our ``VQModel(**vq_params)`` (a taming VQGAN)."""
    dd = vq_params["ddconfig"]
    mult, ch = [int(m) for m in dd["ch_mult"]], int(dd["ch"])
    problems = []
    if mult[0] != 1:
        problems.append(f"ch_mult[0]={mult[0]} (diffusers' conv_in outputs block_out_channels[0])")
    res = [int(dd["resolution"]) // 2**i for i in range(len(mult))]
    if set(res) & {int(r) for r in dd.get("attn_resolutions") or []}:
        problems.append(f"attn_resolutions={list(dd['attn_resolutions'])} (attention outside the mid block is "
                        "not exported; the f4 first stages have none)")
    if dd.get("double_z"):
        problems.append("double_z=True")
    if problems:
        raise DiffusersFormatError("this first stage has no diffusers VQModel equivalent: " + "; ".join(problems))
    return {
        "_class_name": "VQModel", "_diffusers_version": DIFFUSERS_VERSION,
        "in_channels": int(dd["in_channels"]), "out_channels": int(dd["out_ch"]),
        "down_block_types": ["DownEncoderBlock2D"] * len(mult), "up_block_types": ["UpDecoderBlock2D"] * len(mult),
        "block_out_channels": [ch * m for m in mult], "layers_per_block": int(dd["num_res_blocks"]),
        "act_fn": "silu", "latent_channels": int(dd["z_channels"]), "sample_size": int(dd["resolution"]),
        "num_vq_embeddings": int(vq_params["n_embed"]), "norm_num_groups": int(dd.get("norm_groups", TAMING_NORM_GROUPS)),
        "vq_embed_dim": int(vq_params["embed_dim"]), "scaling_factor": float(scaling_factor), "norm_type": "group",
        "mid_block_add_attention": True, "lookup_from_codebook": False, "force_upcast": False,
    }


VQ_DEFAULTS = {"in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"],
               "up_block_types": ["UpDecoderBlock2D"], "block_out_channels": [64], "layers_per_block": 1,
               "act_fn": "silu", "latent_channels": 3, "sample_size": 32, "num_vq_embeddings": 256,
               "norm_num_groups": 32, "vq_embed_dim": None, "norm_type": "group", "mid_block_add_attention": True}


def vq_params_from_config(config: Mapping, source: str = "VQModel config") -> dict:
    """Our ``VQModel`` params (ddconfig, n_embed, embed_dim) for a diffusers ``VQModel`` config."""
    c = {**VQ_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
    boc = [int(x) for x in c["block_out_channels"]]
    expected = dict(act_fn="silu", norm_type="group", mid_block_add_attention=True,
                    down_block_types=["DownEncoderBlock2D"] * len(boc), up_block_types=["UpDecoderBlock2D"] * len(boc))
    problems = [f"{k}={c[k]!r} (need {v!r})" for k, v in expected.items() if _plain(c[k]) != v]
    if any(b % boc[0] for b in boc):
        problems.append(f"block_out_channels {boc} are not multiples of the first")
    if problems:
        raise DiffusersFormatError(f"{source}: not a taming-layout VQ first stage: " + "; ".join(problems))
    ddconfig = dict(double_z=False, z_channels=int(c["latent_channels"]), resolution=_sample_size(c["sample_size"], source),
                    in_channels=int(c["in_channels"]), out_ch=int(c["out_channels"]), ch=boc[0],
                    ch_mult=[b // boc[0] for b in boc], num_res_blocks=int(c["layers_per_block"]),
                    attn_resolutions=[], dropout=0.0)
    if int(c["norm_num_groups"]) != TAMING_NORM_GROUPS:  # other groups: ours takes the extra key (refiner.models.vq)
        ddconfig["norm_groups"] = int(c["norm_num_groups"])
    embed_dim = c["vq_embed_dim"] if c["vq_embed_dim"] is not None else c["latent_channels"]
    return dict(ddconfig=ddconfig, n_embed=int(c["num_vq_embeddings"]), embed_dim=int(embed_dim))


def _plain(v):
    return list(v) if isinstance(v, (list, tuple)) else v


def vq_to_diffusers(state: Mapping[str, Tensor], vq_params: Mapping, source: str = "VQ") -> dict[str, Tensor]:
    """Our ``VQModel`` state dict -> diffusers ``VQModel`` state dict (checks the layout is exportable)."""
    vq_config(vq_params, 1.0)
    return convert(state, vq_pairs(vq_params["ddconfig"]), True, source)


def vq_from_diffusers(state: Mapping[str, Tensor], config: Mapping,
                      source: str = "VQModel") -> tuple[dict[str, Tensor], dict]:
    """diffusers ``VQModel`` state dict + config -> (our ``VQModel`` state dict, its params)."""
    params = vq_params_from_config(config, source)
    return convert(state, vq_pairs(params["ddconfig"]), False, source), params


# -------------------------------------------------------------------------------------- scheduler
def scheduler_config(schedule: ScheduleConfig, parameterization: str) -> dict:
    """``DDIMScheduler`` config for our schedule: CompVis "linear" (linear in sqrt(beta)) is diffusers'
    ``scaled_linear``; CompVis DDIM conventions: ``set_alpha_to_one=False``, ``steps_offset=1``
    (the uniform grid ``range(0, T, T//S) + 1``), x0 not clipped."""
    if schedule.kind not in SCHEDULES_TO_DIFFUSERS:
        raise DiffusersFormatError(f"schedule kind {schedule.kind!r} has no DDIMScheduler beta_schedule")
    if schedule.kind == "cosine" and not math.isclose(schedule.cosine_s, 8e-3):
        raise DiffusersFormatError(f"cosine schedule with s={schedule.cosine_s}: diffusers' squaredcos_cap_v2 fixes s=0.008")
    return {
        "_class_name": "DDIMScheduler", "_diffusers_version": DIFFUSERS_VERSION,
        "num_train_timesteps": int(schedule.num_timesteps), "beta_start": float(schedule.linear_start),
        "beta_end": float(schedule.linear_end), "beta_schedule": SCHEDULES_TO_DIFFUSERS[schedule.kind],
        "trained_betas": None, "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
        "prediction_type": PREDICTION_TYPES[parameterization], "thresholding": False,
        "timestep_spacing": "leading", "rescale_betas_zero_snr": False,
    }


def schedule_from_scheduler_config(config: Mapping, source: str = "scheduler config") -> tuple[ScheduleConfig, str]:
    """(ScheduleConfig, parameterization) of a diffusers scheduler config (inverse of :func:`scheduler_config`)."""
    kind = SCHEDULES_FROM_DIFFUSERS.get(config.get("beta_schedule", "linear"))
    pred = {v: k for k, v in PREDICTION_TYPES.items()}.get(config.get("prediction_type", "epsilon"))
    if kind is None or pred is None or config.get("trained_betas") is not None:
        raise DiffusersFormatError(f"{source}: beta_schedule={config.get('beta_schedule')!r}, prediction_type="
                                   f"{config.get('prediction_type')!r}, trained_betas set={config.get('trained_betas') is not None}; "
                                   f"refiner reads beta_schedule in {sorted(SCHEDULES_FROM_DIFFUSERS)} and "
                                   f"prediction_type in {sorted(PREDICTION_TYPES.values())}")
    return ScheduleConfig(kind=kind, num_timesteps=int(config.get("num_train_timesteps", 1000)),
                          linear_start=float(config.get("beta_start", 1e-4)),
                          linear_end=float(config.get("beta_end", 0.02))), pred
