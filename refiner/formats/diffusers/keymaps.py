"""CompVis/taming state-dict names <-> diffusers names, and the tensor conversions between the two layouts.

A layout is a list of :class:`Pair`: one module in both layouts and how its tensors map (:func:`unet_pairs` for our
``UNetModel`` params, :func:`vq_pairs` for a taming ``ddconfig``); :func:`convert` moves a whole state dict across
and refuses any tensor left without a counterpart. Sources: see :mod:`refiner.formats.diffusers`.

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

from dataclasses import dataclass
from typing import Callable, Mapping

import torch
from torch import Tensor

from refiner.formats.diffusers import DiffusersFormatError


@dataclass(frozen=True)
class Pair:
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


def attention_heads(params: Mapping, channels: int, upsample: bool) -> int:
    """Heads of a CompVis attention block at ``channels`` (``UNetModel``'s own resolution rule)."""
    if params.get("num_head_channels", -1) != -1:
        return channels // params["num_head_channels"]
    heads = params.get("num_heads", -1)
    if upsample and params.get("num_heads_upsample", -1) != -1:
        heads = params["num_heads_upsample"]
    return heads


def unet_pairs(params: Mapping) -> list[Pair]:
    mult, n = [int(m) for m in params["channel_mult"]], int(params["num_res_blocks"])
    attn_ds = {int(r) for r in params["attention_resolutions"]}
    mc, levels = int(params["model_channels"]), len(mult)
    legacy = not params.get("use_new_attention_order", False)

    def attn(ours, theirs, ch, up=False):
        return Pair(ours, theirs, "attn", attention_heads(params, ch, up), legacy)

    pairs = [Pair("time_embed.0", "time_embedding.linear_1", "same"),
             Pair("time_embed.2", "time_embedding.linear_2", "same"),
             Pair("input_blocks.0.0", "conv_in", "same")]
    idx = 1
    for level, m in enumerate(mult):
        for j in range(n):
            pairs.append(Pair(f"input_blocks.{idx}.0", f"down_blocks.{level}.resnets.{j}", "res"))
            if 2**level in attn_ds:
                pairs.append(attn(f"input_blocks.{idx}.1", f"down_blocks.{level}.attentions.{j}", mc * m))
            idx += 1
        if level < levels - 1:
            pairs.append(Pair(f"input_blocks.{idx}.0.op", f"down_blocks.{level}.downsamplers.0.conv", "same"))
            idx += 1
    pairs += [Pair("middle_block.0", "mid_block.resnets.0", "res"),
              attn("middle_block.1", "mid_block.attentions.0", mc * mult[-1]),
              Pair("middle_block.2", "mid_block.resnets.1", "res")]
    idx = 0
    for i, level in enumerate(reversed(range(levels))):
        has_attn = 2**level in attn_ds
        for j in range(n + 1):
            pairs.append(Pair(f"output_blocks.{idx}.0", f"up_blocks.{i}.resnets.{j}", "res"))
            if has_attn:
                pairs.append(attn(f"output_blocks.{idx}.1", f"up_blocks.{i}.attentions.{j}", mc * mult[level], True))
            if level > 0 and j == n:
                pairs.append(Pair(f"output_blocks.{idx}.{2 if has_attn else 1}.conv",
                                   f"up_blocks.{i}.upsamplers.0.conv", "same"))
            idx += 1
    pairs += [Pair("out.0", "conv_norm_out", "same"), Pair("out.2", "conv_out", "same")]
    return pairs


def vq_pairs(ddconfig: Mapping) -> list[Pair]:
    levels, n = len(ddconfig["ch_mult"]), int(ddconfig["num_res_blocks"])
    pairs = [Pair("encoder.conv_in", "encoder.conv_in", "same")]
    for level in range(levels):
        for j in range(n):
            pairs.append(Pair(f"encoder.down.{level}.block.{j}", f"encoder.down_blocks.{level}.resnets.{j}", "vqres"))
        if level < levels - 1:
            pairs.append(Pair(f"encoder.down.{level}.downsample.conv",
                               f"encoder.down_blocks.{level}.downsamplers.0.conv", "same"))
    for part in ("encoder", "decoder"):
        pairs += [Pair(f"{part}.mid.block_1", f"{part}.mid_block.resnets.0", "vqres"),
                  Pair(f"{part}.mid.attn_1", f"{part}.mid_block.attentions.0", "vqattn"),
                  Pair(f"{part}.mid.block_2", f"{part}.mid_block.resnets.1", "vqres")]
    pairs.append(Pair("decoder.conv_in", "decoder.conv_in", "same"))
    for k, level in enumerate(reversed(range(levels))):
        for j in range(n + 1):
            pairs.append(Pair(f"decoder.up.{level}.block.{j}", f"decoder.up_blocks.{k}.resnets.{j}", "vqres"))
        if level > 0:
            pairs.append(Pair(f"decoder.up.{level}.upsample.conv", f"decoder.up_blocks.{k}.upsamplers.0.conv", "same"))
    for part in ("encoder", "decoder"):
        pairs += [Pair(f"{part}.norm_out", f"{part}.conv_norm_out", "same"),
                  Pair(f"{part}.conv_out", f"{part}.conv_out", "same")]
    pairs += [Pair("quant_conv", "quant_conv", "same"), Pair("post_quant_conv", "post_quant_conv", "same"),
              Pair("quantize.embedding", "quantize.embedding", "same")]
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


def _renamed_leaves(pair: Pair, take: Callable[[str], Tensor | None], to_diffusers: bool) -> dict[str, Tensor]:
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


def _to_diffusers(pair: Pair, take: Callable[[str], Tensor | None]) -> dict:
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


def _from_diffusers(pair: Pair, take: Callable[[str], Tensor | None]) -> dict:
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


def convert(state: Mapping[str, Tensor], pairs: list[Pair], to_diffusers: bool, source: str) -> dict[str, Tensor]:
    """``state`` in the other layout (diffusers when ``to_diffusers``, else ours), module by module along ``pairs``;
    a tensor no pair takes raises :class:`DiffusersFormatError` naming ``source``."""
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
