"""refiner window experts <-> diffusers folders (``UNet2DModel``, ``VQModel``, ``DDIMScheduler``).

Export (:func:`export_diffusers`, CLI ``python -m refiner.export diffusers CHAIN... OUT``) writes::

    OUT/unet/, unet_2/, ...   one UNet2DModel per expert, highest-noise window first (like WanPipeline's
                              transformer / transformer_2): config.json + diffusion_pytorch_model.safetensors
    OUT/vqvae/                VQModel (the f4 first stage), scaling_factor = the windows' scale factor
    OUT/scheduler/            DDIMScheduler with the windows' schedule (scheduler_config.json)
    OUT/refiner_chain.json    each expert's subfolder and window [t_min, t_max), its boundary_ratio t_min/T
    OUT/model_index.json      only for one full-range window [0, T): a standard ``LDMPipeline`` folder
    OUT/README.md             model card (refiner.formats.model_card)

Import: :func:`load_diffusers_unet` (``init_from=<folder or its unet/>``) and :func:`load_diffusers_vq`
(``first_stage.f4.ckpt_path=<folder>/vqvae``), the inverse key maps. :class:`WindowChainPipeline` runs an
exported chain with diffusers components only. Export needs no diffusers install; the pipeline does.

Layouts were read from (facts only, the code is our own): diffusers v0.42.1
``scripts/convert_ldm_original_checkpoint_to_diffusers.py`` (CompVis UNet -> UNet2DModel names),
``models/unets/unet_2d.py`` and ``unet_2d_blocks.py`` (block order, ``attn_norm_num_groups``,
``Attention(heads=C // attention_head_dim)``), ``models/attention_processor.py`` (4D input ->
``(B, HW, C)``, linear q/k/v, ``to_out.0``), ``models/autoencoders/vq_model.py`` and ``vae.py`` (Encoder/
Decoder block order; the decoder's up blocks run lowest resolution first), ``schedulers/scheduling_ddim.py``
(``scaled_linear`` = linear in sqrt(beta), float32) and the LDMPipeline (divides latents by
``vqvae.config.scaling_factor`` before decoding).

Correspondence, CompVis/taming name -> diffusers name (``L`` levels, ``n`` = ``num_res_blocks``):

* ``time_embed.{0,2}`` -> ``time_embedding.linear_{1,2}``; ``input_blocks.0.0`` -> ``conv_in``;
  ``out.{0,2}`` -> ``conv_norm_out`` / ``conv_out``.
* ``input_blocks.{1 + l(n+1) + j}.{0,1}`` -> ``down_blocks.l.{resnets,attentions}.j``; the level's last
  input block ``.0.op`` -> ``down_blocks.l.downsamplers.0.conv``.
* ``middle_block.{0,1,2}`` -> ``mid_block.resnets.0``, ``mid_block.attentions.0``, ``mid_block.resnets.1``.
* ``output_blocks.{i(n+1) + j}`` (``i = 0`` deepest) -> ``up_blocks.i.resnets.j`` (+ ``attentions.j``); its
  trailing ``Upsample.conv`` -> ``up_blocks.i.upsamplers.0.conv``.
* ResBlock ``in_layers.{0,2}``, ``emb_layers.1``, ``out_layers.{0,3}``, ``skip_connection`` ->
  ``norm1``, ``conv1``, ``time_emb_proj``, ``norm2``, ``conv2``, ``conv_shortcut``.
* AttentionBlock ``norm`` -> ``group_norm``; the 1x1 conv ``qkv`` (3C x C) splits into linears
  ``to_q``/``to_k``/``to_v`` (C x C): legacy order packs rows per head ``[h0: q k v, h1: q k v, ...]``,
  the new order ``[q (all heads), k, v]``; ``proj_out`` -> ``to_out.0``.
* taming ``encoder.down.l.block.j`` -> ``encoder.down_blocks.l.resnets.j``; ``decoder.up.l`` ->
  ``decoder.up_blocks.(L-1-l)``; ``mid.block_1/attn_1/block_2`` -> ``mid_block.resnets.0/attentions.0/
  resnets.1``; ``nin_shortcut`` -> ``conv_shortcut``; AttnBlock ``q/k/v/proj_out`` (1x1 conv2d) ->
  ``to_q/to_k/to_v/to_out.0``; ``norm_out`` -> ``conv_norm_out``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

from refiner.diffusion import ScheduleConfig, Window
from refiner.formats.compvis import build_first_stage
from refiner.formats.safe_load import CheckpointError, safe_torch_load
from refiner.formats.window_files import WindowWeights, load_window_weights

log = logging.getLogger(__name__)

DIFFUSERS_VERSION = "0.42.1"  # the version these layouts were read from and tested against
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_NAME_BIN = "diffusion_pytorch_model.bin"
CHAIN_FILE = "refiner_chain.json"
CHAIN_FORMAT = "refiner-diffusers-chain"
GROUPS = 32
UNET_EPS = 1e-5  # CompVis GroupNorm32 uses torch's default eps
VQ_EPS = 1e-6  # taming Normalize(eps=1e-6); diffusers Encoder/Decoder resnets use 1e-6 too
SCHEDULES_TO_DIFFUSERS = {"linear": "scaled_linear", "linear_beta": "linear", "cosine": "squaredcos_cap_v2"}
SCHEDULES_FROM_DIFFUSERS = {v: k for k, v in SCHEDULES_TO_DIFFUSERS.items()}
PREDICTION_TYPES = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}


class DiffusersFormatError(CheckpointError):
    """A model that has no diffusers equivalent, or a diffusers folder refiner cannot read."""


# ------------------------------------------------------------------------------------------- key maps
@dataclass(frozen=True)
class _Pair:
    """One module in both layouts: ``ours`` (CompVis/taming prefix), ``theirs`` (diffusers prefix)."""

    ours: str
    theirs: str
    kind: str  # same | res | vqres | attn | vqattn
    heads: int = 1
    legacy_order: bool = True


RES_LEAVES = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
              "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
VQRES_LEAVES = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
ATTN_LEAVES = {"norm": "group_norm"}
VQATTN_LEAVES = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def _attention_heads(params: Mapping, channels: int, upsample: bool) -> int:
    """Heads of a CompVis attention block at ``channels`` (``UNetModel``'s own resolution rule)."""
    if params.get("num_head_channels", -1) != -1:
        return channels // params["num_head_channels"]
    heads = params.get("num_heads", -1)
    if upsample and params.get("num_heads_upsample", -1) != -1:
        heads = params["num_heads_upsample"]
    return heads


def _unet_pairs(params: Mapping) -> list[_Pair]:
    mult, n = [int(m) for m in params["channel_mult"]], int(params["num_res_blocks"])
    attn_ds = {int(r) for r in params["attention_resolutions"]}
    mc, levels = int(params["model_channels"]), len(mult)
    legacy = not params.get("use_new_attention_order", False)

    def attn(ours, theirs, ch, up=False):
        return _Pair(ours, theirs, "attn", _attention_heads(params, ch, up), legacy)

    pairs = [_Pair("time_embed.0", "time_embedding.linear_1", "same"),
             _Pair("time_embed.2", "time_embedding.linear_2", "same"),
             _Pair("input_blocks.0.0", "conv_in", "same")]
    idx = 1
    for level, m in enumerate(mult):
        for j in range(n):
            pairs.append(_Pair(f"input_blocks.{idx}.0", f"down_blocks.{level}.resnets.{j}", "res"))
            if 2**level in attn_ds:
                pairs.append(attn(f"input_blocks.{idx}.1", f"down_blocks.{level}.attentions.{j}", mc * m))
            idx += 1
        if level < levels - 1:
            pairs.append(_Pair(f"input_blocks.{idx}.0.op", f"down_blocks.{level}.downsamplers.0.conv", "same"))
            idx += 1
    pairs += [_Pair("middle_block.0", "mid_block.resnets.0", "res"),
              attn("middle_block.1", "mid_block.attentions.0", mc * mult[-1]),
              _Pair("middle_block.2", "mid_block.resnets.1", "res")]
    idx = 0
    for i, level in enumerate(reversed(range(levels))):
        has_attn = 2**level in attn_ds
        for j in range(n + 1):
            pairs.append(_Pair(f"output_blocks.{idx}.0", f"up_blocks.{i}.resnets.{j}", "res"))
            if has_attn:
                pairs.append(attn(f"output_blocks.{idx}.1", f"up_blocks.{i}.attentions.{j}", mc * mult[level], True))
            if level > 0 and j == n:
                pairs.append(_Pair(f"output_blocks.{idx}.{2 if has_attn else 1}.conv",
                                   f"up_blocks.{i}.upsamplers.0.conv", "same"))
            idx += 1
    pairs += [_Pair("out.0", "conv_norm_out", "same"), _Pair("out.2", "conv_out", "same")]
    return pairs


def _vq_pairs(ddconfig: Mapping) -> list[_Pair]:
    levels, n = len(ddconfig["ch_mult"]), int(ddconfig["num_res_blocks"])
    pairs = [_Pair("encoder.conv_in", "encoder.conv_in", "same")]
    for level in range(levels):
        for j in range(n):
            pairs.append(_Pair(f"encoder.down.{level}.block.{j}", f"encoder.down_blocks.{level}.resnets.{j}", "vqres"))
        if level < levels - 1:
            pairs.append(_Pair(f"encoder.down.{level}.downsample.conv",
                               f"encoder.down_blocks.{level}.downsamplers.0.conv", "same"))
    for part in ("encoder", "decoder"):
        pairs += [_Pair(f"{part}.mid.block_1", f"{part}.mid_block.resnets.0", "vqres"),
                  _Pair(f"{part}.mid.attn_1", f"{part}.mid_block.attentions.0", "vqattn"),
                  _Pair(f"{part}.mid.block_2", f"{part}.mid_block.resnets.1", "vqres")]
    pairs.append(_Pair("decoder.conv_in", "decoder.conv_in", "same"))
    for k, level in enumerate(reversed(range(levels))):
        for j in range(n + 1):
            pairs.append(_Pair(f"decoder.up.{level}.block.{j}", f"decoder.up_blocks.{k}.resnets.{j}", "vqres"))
        if level > 0:
            pairs.append(_Pair(f"decoder.up.{level}.upsample.conv", f"decoder.up_blocks.{k}.upsamplers.0.conv", "same"))
    for part in ("encoder", "decoder"):
        pairs += [_Pair(f"{part}.norm_out", f"{part}.conv_norm_out", "same"),
                  _Pair(f"{part}.conv_out", f"{part}.conv_out", "same")]
    pairs += [_Pair("quant_conv", "quant_conv", "same"), _Pair("post_quant_conv", "post_quant_conv", "same"),
              _Pair("quantize.embedding", "quantize.embedding", "same")]
    return pairs


def _squeeze_1x1(w: Tensor) -> Tensor:
    """A 1x1 conv weight (C_out, C_in, 1[, 1]) as the equivalent linear weight (C_out, C_in)."""
    return w.reshape(w.shape[0], w.shape[1]) if w.ndim > 2 else w


def _split_qkv(t: Tensor, heads: int, legacy_order: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Split a packed qkv weight (3C, C) or bias (3C,) into q, k, v, each with heads in order."""
    rest = t.shape[1:]
    c = t.shape[0] // 3
    if legacy_order:  # rows [h0: q k v, h1: q k v, ...]
        parts = t.reshape(heads, 3, c // heads, *rest).unbind(1)
    else:  # rows [q (all heads), k, v]
        parts = t.reshape(3, c, *rest).unbind(0)
    return tuple(p.reshape(c, *rest) for p in parts)  # type: ignore[return-value]


def _join_qkv(q: Tensor, k: Tensor, v: Tensor, heads: int, legacy_order: bool) -> Tensor:
    c, rest = q.shape[0], q.shape[1:]
    if legacy_order:
        return torch.stack([p.reshape(heads, c // heads, *rest) for p in (q, k, v)], 1).reshape(3 * c, *rest)
    return torch.cat([q, k, v], 0)


LEAVES = {"same": {"": ""}, "res": RES_LEAVES, "vqres": VQRES_LEAVES, "attn": ATTN_LEAVES, "vqattn": VQATTN_LEAVES}


def _renamed_leaves(pair: _Pair, take: Callable[[str], Tensor | None], to_diffusers: bool) -> dict[str, Tensor]:
    """The one-to-one leaves of a module under their other-layout names; taming's 1x1 conv2d attention
    weights (C, C, 1, 1) become linear weights (C, C) and back."""
    out: dict[str, Tensor] = {}
    for ours, theirs in LEAVES[pair.kind].items():
        src, dst = (ours, theirs) if to_diffusers else (theirs, ours)
        for p in ("weight", "bias"):
            t = take(_join(pair.ours if to_diffusers else pair.theirs, src, p))
            if t is None:
                continue
            if pair.kind == "vqattn" and p == "weight" and t.ndim != 1:  # GroupNorm weights stay 1D
                t = _squeeze_1x1(t) if to_diffusers else t[..., None, None]
            out[_join(pair.theirs if to_diffusers else pair.ours, dst, p)] = t
    return out


def _to_diffusers(pair: _Pair, take: Callable[[str], Tensor | None]) -> dict:
    """Tensors of one module in the diffusers layout (``take(key)`` pops a source tensor or gives None)."""
    out = _renamed_leaves(pair, take, True)
    if pair.kind == "attn":
        for p in ("weight", "bias"):
            qkv, proj = take(_join(pair.ours, "qkv", p)), take(_join(pair.ours, "proj_out", p))
            if qkv is None or proj is None:
                raise DiffusersFormatError(f"attention block {pair.ours} lacks qkv.{p} or proj_out.{p}")
            qkv = _squeeze_1x1(qkv) if p == "weight" else qkv
            for name, part in zip(("to_q", "to_k", "to_v"), _split_qkv(qkv, pair.heads, pair.legacy_order)):
                out[_join(pair.theirs, name, p)] = part
            out[_join(pair.theirs, "to_out.0", p)] = _squeeze_1x1(proj) if p == "weight" else proj
    return out


def _from_diffusers(pair: _Pair, take: Callable[[str], Tensor | None]) -> dict:
    """Inverse of :func:`_to_diffusers` for one module."""
    out = _renamed_leaves(pair, take, False)
    if pair.kind == "attn":
        for p in ("weight", "bias"):
            q, k, v = (take(_join(pair.theirs, name, p)) for name in ("to_q", "to_k", "to_v"))
            proj = take(_join(pair.theirs, "to_out.0", p))
            if q is None or k is None or v is None or proj is None:
                raise DiffusersFormatError(f"attention block {pair.theirs} lacks to_q/to_k/to_v/to_out.0 {p}")
            qkv = _join_qkv(q, k, v, pair.heads, pair.legacy_order)
            out[_join(pair.ours, "qkv", p)] = qkv[..., None] if p == "weight" else qkv
            out[_join(pair.ours, "proj_out", p)] = proj[..., None] if p == "weight" else proj
    return out


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _convert(state: Mapping[str, Tensor], pairs: list[_Pair], to_diffusers: bool, source: str) -> dict[str, Tensor]:
    remaining = dict(state)

    def take(key: str) -> Tensor | None:
        return remaining.pop(key, None)

    out: dict[str, Tensor] = {}
    for pair in pairs:
        out.update(_to_diffusers(pair, take) if to_diffusers else _from_diffusers(pair, take))
    if remaining:
        names = sorted(remaining)
        raise DiffusersFormatError(f"{source}: {len(names)} tensors have no counterpart in the "
                                   f"{'diffusers' if to_diffusers else 'CompVis'} layout (first 5: {names[:5]})")
    return {k: v.contiguous() for k, v in out.items()}


# ------------------------------------------------------------------------------------ UNet configs
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
    pairs = _unet_pairs(p)
    head_dims = {(int(p["model_channels"]) * _level_mult(pr, p)) // pr.heads for pr in pairs if pr.kind == "attn"}
    if len(head_dims) > 1:
        problems.append(f"attention head widths differ across levels {sorted(head_dims)} (UNet2DModel has one "
                        "attention_head_dim; use num_head_channels)")
    if problems:
        raise DiffusersFormatError("this UNet has no UNet2DModel equivalent: " + "; ".join(problems))
    attn_ds = {int(r) for r in p["attention_resolutions"]}
    levels = range(len(mult))
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
        "act_fn": "silu", "attention_head_dim": head_dims.pop(), "norm_num_groups": GROUPS,
        "attn_norm_num_groups": GROUPS, "norm_eps": UNET_EPS,
        "resnet_time_scale_shift": "scale_shift" if p.get("use_scale_shift_norm") else "default",
        "add_attention": True, "class_embed_type": None, "num_class_embeds": None,
    }


def _level_mult(pair: _Pair, params: Mapping) -> int:
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
                    downsample_type="conv", upsample_type="conv", act_fn="silu", norm_num_groups=GROUPS,
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
    return _convert(state, _unet_pairs(params), True, source)


def unet_from_diffusers(state: Mapping[str, Tensor], config: Mapping,
                        source: str = "UNet2DModel") -> tuple[dict[str, Tensor], dict]:
    """``UNet2DModel`` state dict + config -> (our ``UNetModel`` state dict, its params)."""
    params = unet_params_from_unet2d_config(config, source)
    return _convert(state, _unet_pairs(params), False, source), params


# -------------------------------------------------------------------------------------- VQ configs
def vq_config(vq_params: Mapping, scaling_factor: float) -> dict:
    """``VQModel`` config equivalent to our ``VQModel(**vq_params)`` (a taming VQGAN)."""
    from refiner.models.vq import TAMING_NORM_GROUPS

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
    from refiner.models.vq import TAMING_NORM_GROUPS

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
    vq_config(vq_params, 1.0)
    return _convert(state, _vq_pairs(vq_params["ddconfig"]), True, source)


def vq_from_diffusers(state: Mapping[str, Tensor], config: Mapping,
                      source: str = "VQModel") -> tuple[dict[str, Tensor], dict]:
    params = vq_params_from_config(config, source)
    return _convert(state, _vq_pairs(params["ddconfig"]), False, source), params


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


# ------------------------------------------------------------------------------------- folder IO
def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DiffusersFormatError(f"{path} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DiffusersFormatError(f"{path} is not valid JSON ({err})") from err


def _read_weights(folder: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    st, binf = folder / WEIGHTS_NAME, folder / WEIGHTS_NAME_BIN
    if st.is_file():
        try:
            return load_file(str(st))
        except (SafetensorError, OSError) as err:
            raise DiffusersFormatError(f"{st} is truncated or corrupt ({err})") from err
    if binf.is_file():
        return safe_torch_load(binf)
    present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    raise DiffusersFormatError(f"{folder}: no {WEIGHTS_NAME} or {WEIGHTS_NAME_BIN} (found {present[:8]})")


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def _write_model(folder: Path, config: dict, state: Mapping[str, Tensor]) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    _write_json(folder / "config.json", config)
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(folder / WEIGHTS_NAME),
              metadata={"format": "pt"})


def resolve_unet_folder(path: str | os.PathLike) -> Path:
    """The ``UNet2DModel`` folder for ``path``: a model folder itself, or the ``unet/`` of a pipeline folder."""
    path = Path(path)
    if not path.is_dir():
        raise DiffusersFormatError(f"{path} is not a folder")
    for folder in (path, path / "unet"):
        cfg = folder / "config.json"
        if cfg.is_file():
            name = _read_json(cfg).get("_class_name")
            if name not in (None, "UNet2DModel"):
                raise DiffusersFormatError(f"{cfg}: _class_name={name!r}; refiner reads UNet2DModel (an "
                                           "unconditional CompVis-layout UNet) only")
            return folder
    raise DiffusersFormatError(f"{path} is neither a diffusers UNet2DModel folder (config.json) nor a pipeline "
                               "folder with unet/config.json")


def load_diffusers_unet(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict]:
    """``init_from`` for a diffusers folder (pipeline or ``unet/``): (our UNet state dict, info).

    ``info`` has ``unet_params`` (converted from config.json) and, when the pipeline folder says so,
    ``schedule``/``parameterization`` (scheduler/), ``scale_factor`` (vqvae/ config, only if it states one),
    and ``window`` (refiner_chain.json, for folders exported by refiner).
    """
    folder = resolve_unet_folder(path)
    state, params = unet_from_diffusers(_read_weights(folder), _read_json(folder / "config.json"), str(folder))
    info: dict[str, Any] = dict(kind="diffusers", source=str(path), used_ema=None, unet_params=params,
                                global_step=None, scale_factor=None)
    root = folder.parent  # the pipeline folder, whether path named it or its unet/
    sched = root / "scheduler" / "scheduler_config.json"
    if sched.is_file():
        schedule, pred = schedule_from_scheduler_config(_read_json(sched), str(sched))
        info.update(schedule=str(schedule), parameterization=pred)
    vq_cfg = root / "vqvae" / "config.json"
    if vq_cfg.is_file() and "scaling_factor" in _read_json(vq_cfg):
        info["scale_factor"] = float(_read_json(vq_cfg)["scaling_factor"])
    chain = root / CHAIN_FILE
    if chain.is_file():
        for e in _read_json(chain).get("experts", []):
            if (root / e.get("subfolder", "")).resolve() == folder.resolve():
                info["window"] = f"[{e['t_min']}, {e['t_max']})"
    return state, info


def load_diffusers_vq(path: str | os.PathLike, expected_params: Mapping | None = None):
    """Our ``VQModel`` from a diffusers ``VQModel`` folder (e.g. ``<pipeline>/vqvae``), loaded strictly.

    The folder's config.json decides the architecture; if ``expected_params`` (the config's
    ``first_stage.*.params``) disagree, a warning names the differences.
    """
    from refiner.formats.kinds import load_strict
    from refiner.models.vq import VQModel, architecture_differences

    folder = Path(path)
    if (folder / "vqvae" / "config.json").is_file() and not (folder / "config.json").is_file():
        folder = folder / "vqvae"
    config = _read_json(folder / "config.json")
    if config.get("_class_name") not in (None, "VQModel"):
        raise DiffusersFormatError(f"{folder / 'config.json'}: _class_name={config.get('_class_name')!r}, expected VQModel")
    state, params = vq_from_diffusers(_read_weights(folder), config, str(folder))
    if expected_params:
        diffs = architecture_differences(expected_params, params)
        if diffs:
            log.warning("%s: its config.json differs from the configured first-stage params (%s); using the "
                        "folder's", folder, "; ".join(diffs))
    model = VQModel(**params)
    load_strict(model, state, str(folder))
    return model


# ------------------------------------------------------------------------------------------ export
@dataclass
class Expert:
    """One window to export: its weights and where they came from."""

    weights: WindowWeights
    path: Path
    subfolder: str = "unet"
    extra: dict = field(default_factory=dict)  # hyper_parameters / metadata (first stage, fingerprint, ...)


def read_source_metadata(path: Path, trust_checkpoint: bool = False) -> dict:
    """The hyper_parameters (plus ``callbacks``/``global_step``) of a window ``.ckpt``, or the metadata of an
    exported ``.safetensors``, as a plain dict (for the first stage and the model card)."""
    from refiner.formats.safe_load import is_safetensors

    if is_safetensors(path):
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as f:
            return dict(f.metadata() or {})
    from refiner.formats.model_card import checkpoint_extra

    return checkpoint_extra(safe_torch_load(path, trust_checkpoint))


def _check_chain(experts: Sequence[Expert]) -> None:
    from refiner.inference.chain import Chain, ChainError, LoadedExpert

    for e in experts:
        if e.weights.conditioning == "concat":
            raise DiffusersFormatError(
                f"{e.path}: concat-conditioned window (in_channels={e.weights.unet_params['in_channels']}); "
                "diffusers has no pipeline that feeds a degraded latent next to the noisy one, so it is not exported")
    try:  # schedule, scale factor, first stage and window overlap: the checks every chain gets
        Chain.from_experts([LoadedExpert(e.weights, None) for e in experts])  # type: ignore[arg-type]
    except ChainError as err:
        raise DiffusersFormatError(str(err)) from err
    params = {e.weights.parameterization for e in experts}
    if len(params) > 1:
        raise DiffusersFormatError(f"experts mix parameterizations {sorted(params)}; one DDIMScheduler has one "
                                   "prediction_type")


def _first_stage(experts: Sequence[Expert], ckpt: str | None, params: Mapping | None, trust_checkpoint: bool):
    recorded = next((e.extra.get("first_stage") for e in experts if isinstance(e.extra.get("first_stage"), Mapping)),
                    None) or {}
    ckpt = ckpt or recorded.get("ckpt_path")
    params = params or recorded.get("params")
    if not ckpt or not params:
        raise DiffusersFormatError("no first stage: the windows do not record first_stage.ckpt_path/params; pass "
                                   "--first-stage <vq-f4 checkpoint> (and --first-stage-params <yaml/json> if the "
                                   "windows record no params)")
    if not Path(ckpt).exists():
        raise DiffusersFormatError(f"first stage not found: {ckpt} (relative paths are relative to {os.getcwd()})")
    return build_first_stage(ckpt, params, trust_checkpoint=trust_checkpoint).eval(), Path(ckpt), dict(params)


def _check_output(out: Path, inputs: Sequence[Path], force: bool) -> None:
    if out.exists() and not force:
        raise DiffusersFormatError(f"{out} already exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise DiffusersFormatError(f"{out} exists and is not a folder; refusing to replace a file")
    out_r = out.resolve()
    for p in inputs:
        pr = p.resolve()
        if pr == out_r or out_r in pr.parents:
            raise DiffusersFormatError(f"output {out} contains the input {p}; choose another output folder")


def export_diffusers(chain: Sequence[str | os.PathLike], out: str | os.PathLike, *, first_stage: str | None = None,
                     first_stage_params: Mapping | None = None, use_ema: bool = True, trust_checkpoint: bool = False,
                     force: bool = False) -> Path:
    """Write the window experts ``chain`` (our ``.ckpt`` / ``.safetensors``) as a diffusers folder ``out``.

    Written to a temp folder beside ``out`` and renamed into place; an existing ``out`` is refused unless
    ``force`` (then replaced, never if it contains an input). See the module docstring for the layout.
    """
    from refiner.formats.model_card import card_entry, write_model_card

    if not chain:
        raise DiffusersFormatError("give at least one window checkpoint to export")
    out = Path(out)
    paths = [Path(p) for p in chain]
    _check_output(out, paths + ([Path(first_stage)] if first_stage else []), force)
    experts = [Expert(load_window_weights(p, use_ema=use_ema, trust_checkpoint=trust_checkpoint), p,
                      extra=read_source_metadata(p, trust_checkpoint)) for p in paths]
    _check_chain(experts)
    experts.sort(key=lambda e: -e.weights.window.t_max)  # highest noise first: unet, unet_2, ...
    for i, e in enumerate(experts):
        e.subfolder = "unet" if i == 0 else f"unet_{i + 1}"
    vq, vq_path, vq_params = _first_stage(experts, first_stage, first_stage_params, trust_checkpoint)
    _check_output(out, paths + [vq_path], force)
    first = experts[0].weights
    if vq.embed_dim != first.unet_params["out_channels"]:
        raise DiffusersFormatError(f"first stage {vq_path} has {vq.embed_dim} latent channels but the UNets "
                                   f"predict {first.unet_params['out_channels']}")
    T = first.schedule.num_timesteps
    components = {e.subfolder: (unet2d_config(e.weights.unet_params),
                                unet_to_diffusers(e.weights.unet_state, e.weights.unet_params, str(e.path)))
                  for e in experts}
    components["vqvae"] = (vq_config(vq_params, first.scale_factor),
                           vq_to_diffusers(vq.state_dict(), vq_params, str(vq_path)))
    full_range = len(experts) == 1 and first.window.t_min == 0 and first.window.t_max == T
    chain_doc = {
        "format": CHAIN_FORMAT, "format_version": 1, "num_train_timesteps": T, "scale_factor": first.scale_factor,
        "parameterization": first.parameterization, "vqvae": "vqvae", "scheduler": "scheduler",
        "experts": [dict(subfolder=e.subfolder, t_min=e.weights.window.t_min, t_max=e.weights.window.t_max,
                         boundary_ratio=e.weights.window.t_min / T, source=str(e.path),
                         global_step=e.weights.global_step, ema=e.weights.has_ema) for e in experts],
        "usage": "expert k denoises t with t_min <= t < t_max (t=0 clean); see refiner.formats.diffusers."
                 "WindowChainPipeline",
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        for name, (config, state) in components.items():
            _write_model(tmp / name, config, state)
        (tmp / "scheduler").mkdir()
        _write_json(tmp / "scheduler" / "scheduler_config.json", scheduler_config(first.schedule, first.parameterization))
        _write_json(tmp / CHAIN_FILE, chain_doc)
        if full_range:
            _write_json(tmp / "model_index.json", {
                "_class_name": "LDMPipeline", "_diffusers_version": DIFFUSERS_VERSION,
                "scheduler": ["diffusers", "DDIMScheduler"], "unet": ["diffusers", "UNet2DModel"],
                "vqvae": ["diffusers", "VQModel"]})
        write_model_card(tmp / "README.md", [card_entry(e.path, e.weights, e.extra, e.subfolder) for e in experts],
                         title=f"refiner window chain {' + '.join(str(e.weights.window) for e in experts)}",
                         usage=_usage_text(out, full_range), first_stage=str(vq_path))
        _fsync_tree(tmp)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %d expert(s) to %s%s", len(experts), out, " (LDMPipeline)" if full_range else "")
    return out


def _usage_text(out: Path, full_range: bool) -> str:
    lines = ["```python", "from refiner.formats.diffusers import WindowChainPipeline",
             f'pipe = WindowChainPipeline.from_pretrained("{out.name}")',
             "refined = pipe(images, t_start=481, num_inference_steps=50)  # images: (B, 3, H, W) in [-1, 1]", "```"]
    if full_range:
        lines += ["", "A full-range model is also a standard diffusers `LDMPipeline`:", "", "```python",
                  "from diffusers import LDMPipeline", f'images = LDMPipeline.from_pretrained("{out.name}")().images',
                  "```"]
    return "\n".join(lines)


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished folder ``tmp`` onto ``out`` (an existing ``out`` is moved aside first, then deleted)."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
        old.rmdir()
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old)


# ------------------------------------------------------------------------------------ the chain, run
class WindowChainPipeline:
    """Run an exported chain with diffusers components only (``UNet2DModel`` per expert, ``DDIMScheduler``,
    ``VQModel``): SDEdit-style refinement, switching experts at the window boundaries.

    The grid is the scheduler's own (``set_timesteps(num_inference_steps)``, "leading" with
    ``steps_offset=1``) cut to ``t <= t_start``; the latent is noised with ``add_noise`` to exactly the
    first timestep it denoises. With ``t_start`` on that grid (e.g. 481 for 50 steps) this reproduces
    ``refiner.experts.refine(experts, z, t_start, steps=len(grid))``.
    """

    def __init__(self, unets: Sequence, windows: Sequence[Window], scheduler, vqvae=None):
        if len(unets) != len(windows) or not unets:
            raise ValueError("one UNet per window, at least one")
        self.unets, self.windows, self.scheduler, self.vqvae = list(unets), list(windows), scheduler, vqvae

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, device: str | torch.device = "cpu") -> "WindowChainPipeline":
        from diffusers import DDIMScheduler, UNet2DModel, VQModel

        folder = Path(folder)
        doc = _read_json(folder / CHAIN_FILE)
        if doc.get("format") != CHAIN_FORMAT:
            raise DiffusersFormatError(f"{folder / CHAIN_FILE}: format={doc.get('format')!r}, expected {CHAIN_FORMAT!r}")
        T = int(doc["num_train_timesteps"])
        unets = [UNet2DModel.from_pretrained(folder, subfolder=e["subfolder"]).to(device).eval() for e in doc["experts"]]
        windows = [Window(int(e["t_min"]), int(e["t_max"]), T) for e in doc["experts"]]
        scheduler = DDIMScheduler.from_pretrained(folder, subfolder=doc.get("scheduler", "scheduler"))
        vq = VQModel.from_pretrained(folder, subfolder=doc["vqvae"]).to(device).eval() if doc.get("vqvae") else None
        return cls(unets, windows, scheduler, vq)

    def timesteps(self, t_start: int, num_inference_steps: int) -> list[int]:
        self.scheduler.set_timesteps(num_inference_steps)
        grid = [int(t) for t in self.scheduler.timesteps if int(t) <= t_start]
        if not grid:
            raise ValueError(f"t_start={t_start} is below the scheduler's lowest timestep "
                             f"{int(self.scheduler.timesteps[-1])} for {num_inference_steps} steps")
        uncovered = [t for t in grid if not any(w.contains(t) for w in self.windows)]
        if uncovered:
            raise ValueError(f"timesteps {uncovered} lie in no expert's window {[str(w) for w in self.windows]}")
        return grid

    @torch.no_grad()
    def refine_latents(self, z: Tensor, t_start: int, num_inference_steps: int = 50, eta: float = 0.0,
                       noise: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        """Clean latents ``z`` (already times ``scaling_factor``) -> refined latents at the level of ``ab[0]``."""
        grid = self.timesteps(t_start, num_inference_steps)
        if noise is None:
            noise = torch.randn(z.shape, generator=generator, dtype=z.dtype).to(z.device)
        x = self.scheduler.add_noise(z, noise, torch.tensor([grid[0]]))
        for t in grid:
            unet = self.unets[next(k for k, w in enumerate(self.windows) if w.contains(t))]
            out = unet(x, torch.tensor(t, device=x.device)).sample
            x = self.scheduler.step(out, t, x, eta=eta, generator=generator).prev_sample
        return x

    @torch.no_grad()
    def __call__(self, images: Tensor, t_start: int, num_inference_steps: int = 50, eta: float = 0.0,
                 generator: torch.Generator | None = None) -> Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> refined images in about [-1, 1] (encode, refine, decode)."""
        if self.vqvae is None:
            raise ValueError("this pipeline has no vqvae; call refine_latents on latents instead")
        s = float(self.vqvae.config.scaling_factor)
        z = self.vqvae.encode(images).latents * s
        z = self.refine_latents(z, t_start, num_inference_steps, eta=eta, generator=generator)
        return self.vqvae.decode(z / s).sample
