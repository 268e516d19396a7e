"""Denoiser UNet with the constructor and the ``state_dict`` layout of CompVis LDM's ``UNetModel``.

The module tree mirrors ``ldm.modules.diffusionmodules.openaimodel.UNetModel`` name for name, so a
CompVis checkpoint's ``model.diffusion_model.*`` weights load with ``strict=True``:

* ``time_embed.{0,2}``: MLP on the sinusoidal timestep embedding (width ``4 * model_channels``).
* ``input_blocks.N.M``: block 0 is the stem conv; then per level ``num_res_blocks`` x
  [ResBlock (+ AttentionBlock if the downsample factor ``ds`` is in ``attention_resolutions``)],
  and between levels a Downsample (``op``) or a down-ResBlock (``resblock_updown``).
* ``middle_block.{0,1,2}``: ResBlock, AttentionBlock, ResBlock.
* ``output_blocks.N.M``: per level (deepest first) ``num_res_blocks + 1`` x [ResBlock on the
  concatenated skip (+ attention)], the last one of each level but the top ending in an Upsample
  (``conv``) or an up-ResBlock.
* ``out.{0,2}``: GroupNorm, SiLU, zero-initialised conv.

ResBlock children: ``in_layers.{0,2}``, ``emb_layers.1``, ``out_layers.{0,3}``, ``skip_connection``.
AttentionBlock children: ``norm``, ``qkv`` (1x1 conv1d, 3C outputs), ``proj_out`` (zero-init conv1d).

Hand-written rather than imported because the ``ldm`` package is not installable (no release,
heavy and outdated imports); only the layout and numerics are reproduced. Unsupported CompVis
features (cross-attention ``SpatialTransformer``, class labels, codebook-id prediction, 1D/3D) are
refused with a clear error instead of silently building a different network.
"""

from __future__ import annotations

import math
import warnings
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

AttentionBackend = Literal["sdpa", "math"]
ATTENTION_BACKENDS = ("sdpa", "math")
GROUPS = 32  # CompVis ``normalization(channels)`` = GroupNorm32(32, channels)


def timestep_embedding(timesteps: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding, CompVis order ``[cos(t w_i), sin(t w_i)]`` with ``w_i = P^(-i/half)``.

    ``half = dim // 2``, ``i = 0..half-1``, ``P = max_period`` (Vaswani et al. 2017, sec. 3.5, with
    cos first as in guided-diffusion/LDM). Odd ``dim`` gets a trailing zero column.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 and cast back (CompVis ``GroupNorm32``)."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.float()).type(x.dtype)


def normalization(channels: int, groups: int = GROUPS) -> GroupNorm32:
    if channels % groups:
        raise ValueError(f"GroupNorm({groups}) needs channels divisible by {groups}, got {channels}")
    return GroupNorm32(groups, channels)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero all parameters (used for the last conv of each residual branch and of ``out``)."""
    for p in module.parameters():
        p.detach().zero_()
    return module


def _maybe_checkpoint(fn, *args, enabled: bool):
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


class TimestepBlock(nn.Module):
    """A module whose ``forward`` takes ``(x, emb)``."""


class TimestepEmbedSequential(nn.Sequential):
    """Sequential that hands the timestep embedding to the children that take one."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class Upsample(nn.Module):
    """Nearest 2x upsampling, then a 3x3 ``conv`` if ``use_conv``."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        self.channels = channels
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """2x downsampling: strided 3x3 conv ``op`` if ``use_conv``, else 2x2 average pooling."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        out_channels = out_channels or channels
        if use_conv:
            self.op = nn.Conv2d(channels, out_channels, 3, stride=2, padding=1)
        else:
            if out_channels != channels:
                raise ValueError("pooling Downsample cannot change the channel count")
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class ResBlock(TimestepBlock):
    """Residual block conditioned on the timestep embedding (Ho et al. 2020; Dhariwal & Nichol 2021).

    ``h = in_layers(x); h = out_layers(h + emb_layers(emb))`` or, with ``use_scale_shift_norm``
    (FiLM, Dhariwal & Nichol sec. 3), ``h = out_rest(norm(h) * (1 + scale) + shift)``;
    returns ``skip_connection(x) + h``. ``up``/``down`` resample both paths between norm/act and conv.
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        use_scale_shift_norm: bool = False,
        use_checkpoint: bool = False,
        up: bool = False,
        down: bool = False,
        norm_groups: int = GROUPS,
    ):
        super().__init__()
        self.out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.use_checkpoint = use_checkpoint
        self.in_layers = nn.Sequential(
            normalization(channels, norm_groups), nn.SiLU(), nn.Conv2d(channels, self.out_channels, 3, padding=1)
        )
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels)
        )
        self.out_layers = nn.Sequential(
            normalization(self.out_channels, norm_groups),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(nn.Conv2d(self.out_channels, self.out_channels, 3, padding=1)),
        )
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        else:  # CompVis default use_conv=False: a 1x1 conv
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        return _maybe_checkpoint(self._forward, x, emb, enabled=self.use_checkpoint)

    def _forward(self, x: Tensor, emb: Tensor) -> Tensor:
        if self.updown:
            h = self.in_layers[:-1](x)
            h = self.in_layers[-1](self.h_upd(h))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)[..., None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


def qkv_attention(qkv: Tensor, num_heads: int, legacy_order: bool, backend: AttentionBackend = "sdpa") -> Tensor:
    """Multi-head self-attention on a packed ``(B, 3*H*C, T)`` tensor -> ``(B, H*C, T)``.

    Channel packing of ``qkv`` (it decides which weights of the ``qkv`` conv are q, k, v):
    * ``legacy_order=True`` (CompVis ``QKVAttentionLegacy``): heads first, ``[h0: q k v, h1: q k v, ...]``.
    * ``legacy_order=False`` (CompVis ``QKVAttention``, ``use_new_attention_order``): ``[q (all heads), k, v]``.
    ``softmax(q k^T / sqrt(C)) v`` per head (Vaswani et al. 2017, eq. 1), computed by
    ``F.scaled_dot_product_attention`` (``sdpa``) or written out (``math``, the reference path).
    """
    width = qkv.shape[1]
    if width % (3 * num_heads):
        raise ValueError(f"qkv width {width} is not divisible by 3 * num_heads = {3 * num_heads}")
    pattern = "b (h three c) t -> three b h t c" if legacy_order else "b (three h c) t -> three b h t c"
    # contiguous: with strided views SDPA falls back to its math kernel and builds the (T x T) matrix
    q, k, v = (t.contiguous() for t in rearrange(qkv, pattern, three=3, h=num_heads))
    if backend == "sdpa":
        out = F.scaled_dot_product_attention(q, k, v)
    elif backend == "math":
        weight = torch.softmax((q @ k.transpose(-1, -2)).float() / math.sqrt(q.shape[-1]), dim=-1).type(q.dtype)
        out = weight @ v
    else:
        raise ValueError(f"unknown attention_backend {backend!r}; expected one of {ATTENTION_BACKENDS}")
    return rearrange(out, "b h t c -> b (h c) t")


class AttentionBlock(nn.Module):
    """Spatial self-attention with a residual connection: ``x + proj_out(attn(qkv(norm(x))))``."""

    def __init__(
        self,
        channels: int,
        num_heads: int = 1,
        num_head_channels: int = -1,
        use_checkpoint: bool = False,
        use_new_attention_order: bool = False,
        attention_backend: AttentionBackend = "sdpa",
        norm_groups: int = GROUPS,
    ):
        super().__init__()
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            if channels % num_head_channels:
                raise ValueError(f"attention channels {channels} not divisible by num_head_channels {num_head_channels}")
            self.num_heads = channels // num_head_channels
        if self.num_heads < 1 or channels % self.num_heads:
            raise ValueError(f"attention channels {channels} cannot be split into {self.num_heads} heads")
        self.use_checkpoint = use_checkpoint
        self.legacy_order = not use_new_attention_order
        self.attention_backend = attention_backend
        self.norm = normalization(channels, norm_groups)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        return _maybe_checkpoint(self._forward, x, enabled=self.use_checkpoint)

    def _forward(self, x: Tensor) -> Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        h = qkv_attention(self.qkv(self.norm(x)), self.num_heads, self.legacy_order, self.attention_backend)
        return (x + self.proj_out(h)).reshape(b, c, *spatial)


class UNetModel(nn.Module):
    """CompVis LDM ``UNetModel`` (same arguments, same ``state_dict`` keys), 2D, unconditional or concat.

    Args (as in a CompVis ``unet_config.params``):
        image_size: latent size; stored only (the network is fully convolutional).
        in_channels: input channels *including* concatenated conditioning channels (CompVis convention).
        model_channels, out_channels, num_res_blocks, channel_mult, dropout: the usual.
        attention_resolutions: downsample factors (1, 2, 4, ...) at which attention blocks are added.
        conv_resample: learned up/downsampling convs (else nearest / average pooling).
        dims: must be 2. num_classes: must be None. n_embed: must be None.
        use_checkpoint: gradient checkpointing (``torch.utils.checkpoint``) of every ResBlock/attention.
        use_fp16: accepted for config compatibility and ignored: use autocast / ``.to(dtype)`` instead.
        num_heads, num_head_channels, num_heads_upsample: head counts, resolved exactly as CompVis does.
        use_scale_shift_norm, resblock_updown, use_new_attention_order, legacy: as in CompVis.
        use_spatial_transformer, transformer_depth, context_dim: cross-attention is not supported;
            ``use_spatial_transformer=True`` or a ``context_dim`` raises.
        attention_backend: ``"sdpa"`` (default) or ``"math"`` (explicit softmax, for tests/benchmarks).
        norm_groups: groups of every GroupNorm; CompVis fixes 32 (its ``normalization``), so only another value is
            stored in ``config``. A width below 32 needs fewer groups (the capacity study's half-width UNet).

    Unknown keyword arguments raise ``TypeError`` naming them (Python's own check).
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        dropout: float = 0.0,
        channel_mult: Sequence[int] = (1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        num_classes: int | None = None,
        use_checkpoint: bool = False,
        use_fp16: bool = False,
        num_heads: int = -1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        use_spatial_transformer: bool = False,
        transformer_depth: int = 1,
        context_dim: int | None = None,
        n_embed: int | None = None,
        legacy: bool = True,
        attention_backend: AttentionBackend = "sdpa",
        norm_groups: int = GROUPS,
    ):
        super().__init__()
        attention_resolutions = [int(r) for r in attention_resolutions]  # also unwraps OmegaConf lists
        channel_mult = [int(m) for m in channel_mult]
        self._check_supported(dims, num_classes, use_spatial_transformer, context_dim, n_embed, attention_backend)
        if num_heads == -1 and num_head_channels == -1:
            raise ValueError("UNetModel: set either num_heads or num_head_channels (both are -1)")
        if use_fp16:
            warnings.warn("UNetModel(use_fp16=True) is ignored: weights stay float32; use autocast for mixed precision")
        self.config = dict(
            image_size=image_size, in_channels=in_channels, model_channels=model_channels, out_channels=out_channels,
            num_res_blocks=num_res_blocks, attention_resolutions=list(attention_resolutions), dropout=dropout,
            channel_mult=list(channel_mult), conv_resample=conv_resample, dims=dims, num_classes=num_classes,
            use_checkpoint=use_checkpoint, use_fp16=use_fp16, num_heads=num_heads,
            num_head_channels=num_head_channels, num_heads_upsample=num_heads_upsample,
            use_scale_shift_norm=use_scale_shift_norm, resblock_updown=resblock_updown,
            use_new_attention_order=use_new_attention_order, use_spatial_transformer=use_spatial_transformer,
            transformer_depth=transformer_depth, context_dim=context_dim, n_embed=n_embed, legacy=legacy,
        )
        if norm_groups != GROUPS:  # an extra key, absent in CompVis configs (which always use 32)
            self.config["norm_groups"] = norm_groups
        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_levels = len(channel_mult)
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads

        def attention(ch: int, heads: int) -> AttentionBlock:
            # CompVis passes num_head_channels=dim_head; reproduce its head-count resolution exactly.
            if num_head_channels != -1:
                heads, dim_head = ch // num_head_channels, num_head_channels
            else:
                dim_head = -1 if legacy else ch // num_heads
            return AttentionBlock(
                ch, num_heads=heads, num_head_channels=dim_head, use_checkpoint=use_checkpoint,
                use_new_attention_order=use_new_attention_order, attention_backend=attention_backend,
                norm_groups=norm_groups,
            )

        def resblock(ch: int, out_ch: int | None = None, up: bool = False, down: bool = False) -> ResBlock:
            return ResBlock(
                ch, time_embed_dim, dropout, out_channels=out_ch, use_scale_shift_norm=use_scale_shift_norm,
                use_checkpoint=use_checkpoint, up=up, down=down, norm_groups=norm_groups,
            )

        time_embed_dim = 4 * model_channels
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim)
        )

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(in_channels, model_channels, 3, padding=1))]
        )
        skip_channels = [model_channels]
        ch, ds = model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [resblock(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(attention(ch, num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                down = resblock(ch, ch, down=True) if resblock_updown else Downsample(ch, conv_resample, ch)
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(resblock(ch), attention(ch, num_heads), resblock(ch))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [resblock(ch + skip_channels.pop(), model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(attention(ch, num_heads_upsample))
                if level and i == num_res_blocks:
                    layers.append(resblock(ch, ch, up=True) if resblock_updown else Upsample(ch, conv_resample, ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch, norm_groups), nn.SiLU(),
            zero_module(nn.Conv2d(model_channels, out_channels, 3, padding=1)),
        )

    @staticmethod
    def _check_supported(dims, num_classes, use_spatial_transformer, context_dim, n_embed, attention_backend):
        if dims != 2:
            raise ValueError(f"UNetModel: only dims=2 is supported, got dims={dims}")
        if num_classes is not None:
            raise ValueError(f"UNetModel: class conditioning is not supported (num_classes={num_classes}); use None")
        if use_spatial_transformer or context_dim is not None:
            raise ValueError(
                "UNetModel: cross-attention (use_spatial_transformer=True / context_dim) is not supported; "
                "refiner conditions by channel concatenation (forward(..., concat=...))"
            )
        if n_embed is not None:
            raise ValueError(f"UNetModel: codebook-id prediction (n_embed={n_embed}) is not supported; use None")
        if attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"unknown attention_backend {attention_backend!r}; expected one of {ATTENTION_BACKENDS}")

    def set_attention_backend(self, backend: AttentionBackend) -> None:
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"unknown attention_backend {backend!r}; expected one of {ATTENTION_BACKENDS}")
        for m in self.modules():
            if isinstance(m, AttentionBlock):
                m.attention_backend = backend

    def forward(self, x: Tensor, timesteps: Tensor | int | float, concat: Tensor | None = None) -> Tensor:
        """Predict from the noisy latent ``x`` (B, C, H, W) at ``timesteps`` ((B,) or scalar).

        ``concat``: conditioning concatenated after ``x`` on channels (LDM ``conditioning_key: concat``);
        ``x.shape[1] + concat.shape[1]`` must equal ``in_channels``.
        """
        if x.ndim != 4:
            raise ValueError(f"UNetModel expects x of shape (B, C, H, W), got {tuple(x.shape)}")
        if concat is not None:
            if concat.shape[0] != x.shape[0] or concat.shape[2:] != x.shape[2:]:
                raise ValueError(
                    f"concat conditioning shape {tuple(concat.shape)} does not match x {tuple(x.shape)} "
                    "in batch or spatial size"
                )
            if x.shape[1] + concat.shape[1] != self.in_channels:
                raise ValueError(
                    f"channels do not add up: x has {x.shape[1]} + concat {concat.shape[1]} = "
                    f"{x.shape[1] + concat.shape[1]}, but the UNet was built with in_channels={self.in_channels}"
                )
            x = torch.cat([x, concat.to(x.dtype)], dim=1)
        elif x.shape[1] != self.in_channels:
            raise ValueError(
                f"x has {x.shape[1]} channels but the UNet expects in_channels={self.in_channels}"
                + (" (did you forget the concat conditioning?)" if x.shape[1] < self.in_channels else "")
            )
        factor = 2 ** (self.num_levels - 1)
        if x.shape[-1] % factor or x.shape[-2] % factor:
            raise ValueError(f"spatial size {tuple(x.shape[-2:])} must be divisible by {factor} (2^(levels-1))")
        timesteps = torch.as_tensor(timesteps, device=x.device)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        if timesteps.shape != (x.shape[0],):
            raise ValueError(f"timesteps must be a scalar or of shape ({x.shape[0]},), got {tuple(timesteps.shape)}")

        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(x.dtype))
        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)


def tiny_unet_params(in_channels: int = 3, out_channels: int = 3, **overrides) -> dict:
    """A small CompVis-style ``unet_config.params`` dict for tests and demos (2 downsamplings)."""
    params = dict(
        image_size=16,
        in_channels=in_channels,
        out_channels=out_channels,
        model_channels=32,
        attention_resolutions=[4],
        num_res_blocks=1,
        channel_mult=[1, 2, 2],
        num_head_channels=16,
    )
    params.update(overrides)
    return params
