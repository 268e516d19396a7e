"""VQGAN first stage with CompVis/taming's module names, so vq-f4 / vq-f8 / taming checkpoints load strictly.

Built from taming-transformers' ``Encoder``, ``Decoder`` and ``VectorQuantizer2`` (installed
``--no-deps``; ``taming.models.vqgan`` itself does not import against current Lightning, so the
thin wrapper lives here). ``encode`` returns the *pre-quantization* latent like LDM's
``VQModelInterface.encode``; ``decode`` quantizes first, then decodes.
"""

from __future__ import annotations

from typing import Mapping

from einops import rearrange
from taming.modules.diffusionmodules.model import AttnBlock, Decoder, Encoder
from taming.modules.vqvae.quantize import VectorQuantizer2
from torch import Tensor, nn
from torch.nn import functional as F

TAMING_NORM_GROUPS = 32  # taming's ``Normalize``: GroupNorm(num_groups=32), what an absent ``norm_groups`` means

DDCONFIG_KEYS = (
    "double_z", "z_channels", "resolution", "in_channels", "out_ch", "ch", "ch_mult",
    "num_res_blocks", "attn_resolutions", "dropout",
)


class SDPAAttnBlock(AttnBlock):
    """taming's ``AttnBlock`` with the same weights, computed by ``scaled_dot_product_attention``.

    taming materialises the (HW x HW) score matrix: about 32 GiB at the latent size of a 1024 px
    image. SDPA's fused CPU/GPU kernels work blockwise, so memory grows with HW instead.
    """

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x)
        # contiguous: with strided views SDPA falls back to its math kernel and builds the HW x HW matrix
        q, k, v = (rearrange(proj(h), "b c h w -> b 1 (h w) c").contiguous() for proj in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(c)) v, one head
        return x + self.proj_out(rearrange(out, "b 1 (h w) c -> b c h w", h=x.shape[2]))


def use_sdpa_attention(module: nn.Module) -> nn.Module:
    """Swap every taming ``AttnBlock`` inside ``module`` for :class:`SDPAAttnBlock` (same state dict)."""
    for m in module.modules():
        if type(m) is AttnBlock:
            m.__class__ = SDPAAttnBlock
    return module


def set_norm_groups(module: nn.Module, groups: int) -> nn.Module:
    """Give every ``GroupNorm`` inside ``module`` ``groups`` groups (same parameters and state dict)."""
    for m in module.modules():
        if isinstance(m, nn.GroupNorm):
            if groups < 1 or m.num_channels % groups:
                raise ValueError(f"norm_groups={groups} does not divide a GroupNorm of {m.num_channels} channels")
            m.num_groups = groups
    return module


class VQModel(nn.Module):
    """VQGAN autoencoder.

    Args:
        ddconfig: the ``ddconfig`` block of a CompVis/taming first-stage config (``ch``, ``ch_mult``,
            ``num_res_blocks``, ``attn_resolutions``, ``z_channels``, ``resolution``, ``in_channels``,
            ``out_ch``, ``dropout``, ``double_z=False``). ``attn_type`` other than ``vanilla`` is refused
            because taming cannot build it (vq-f4-noattn). An extra key ``norm_groups`` (ours, default 32 =
            taming's hard-coded ``Normalize``) sets the GroupNorm group count of encoder and decoder; it does
            not change the state dict. CompVis's f4 (ch 128) has 4 channels per group at its first level; a tiny
            ch 32 model with 32 groups has 1, i.e. instance norm, which erases each channel's mean over the
            image, and (as in StyleGAN2's "droplet" analysis, Karras et al. 2020, sec. 2) the decoder answers
            with local blobs that carry the colour. ``norm_groups: 8`` restores 4 channels per group (measured on
            the demo: a better round trip, but worse refiners trained in its latent space; docs/experiments/vq-f4-choice.md, "Choosing the
            demo's VQ-f4").
        n_embed: codebook size (vq-f4: 8192, vq-f8: 16384).
        embed_dim: codebook vector size = latent channels (vq-f4: 3, vq-f8: 4).
        beta: commitment weight of the codebook loss.
        remap, sane_index_shape: passed to ``VectorQuantizer2``.
        legacy: taming's default (True) weights the commitment term by 1 and the codebook term by
            ``beta`` (a known swap kept for compatibility); False applies ``beta`` to the commitment
            term as in the VQ-VAE paper. Does not change the state dict.
    """

    def __init__(
        self,
        ddconfig: dict,
        n_embed: int,
        embed_dim: int,
        beta: float = 0.25,
        remap: str | None = None,
        sane_index_shape: bool = False,
        legacy: bool = True,
    ):
        super().__init__()
        ddconfig = dict(ddconfig)
        attn_type = ddconfig.pop("attn_type", "vanilla")
        if attn_type != "vanilla":
            raise ValueError(
                f"ddconfig.attn_type={attn_type!r} is not supported: taming-transformers only builds "
                "'vanilla' attention (CompVis vq-f4-noattn cannot be loaded)"
            )
        norm_groups = int(ddconfig.pop("norm_groups", TAMING_NORM_GROUPS))
        if ddconfig.get("double_z", False):
            raise ValueError("ddconfig.double_z must be False for a VQ first stage (it is the KL-VAE setting)")
        self.ddconfig = ddconfig
        self.n_embed = n_embed
        self.embed_dim = embed_dim
        self.encoder = use_sdpa_attention(Encoder(**ddconfig))
        self.decoder = use_sdpa_attention(Decoder(**ddconfig))
        if norm_groups != TAMING_NORM_GROUPS:
            set_norm_groups(self.encoder, norm_groups)
            set_norm_groups(self.decoder, norm_groups)
            self.ddconfig["norm_groups"] = norm_groups
        self.quantize = VectorQuantizer2(n_embed, embed_dim, beta=beta, remap=remap, sane_index_shape=sane_index_shape,
                                         legacy=legacy)
        self.quant_conv = nn.Conv2d(ddconfig["z_channels"], embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)

    @property
    def config(self) -> dict:
        """The arguments that decide this network, ``{ddconfig, n_embed, embed_dim}`` (``ddconfig`` with
        ``norm_groups`` when it is not taming's 32): what :func:`architecture_differences` compares."""
        return dict(ddconfig=dict(self.ddconfig), n_embed=self.n_embed, embed_dim=self.embed_dim)

    @property
    def factor(self) -> int:
        """Spatial downsampling factor (f4: 4, f8: 8)."""
        return 2 ** (len(self.ddconfig["ch_mult"]) - 1)

    def encode(self, x: Tensor) -> Tensor:
        """Images in [-1, 1], (B, 3, H, W) -> pre-quantization latents (B, embed_dim, H/f, W/f)."""
        if x.shape[-1] % self.factor or x.shape[-2] % self.factor:
            raise ValueError(
                f"image size {tuple(x.shape[-2:])} is not divisible by the first-stage factor {self.factor}; "
                "pad or crop first (refiner.data.images.pad_to_multiple)"
            )
        return self.quant_conv(self.encoder(x))

    def quantize_latent(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """Snap latents to the codebook; returns (quantized, codebook loss)."""
        quant, emb_loss, _ = self.quantize(h)
        return quant, emb_loss

    def decode(self, h: Tensor, force_not_quantize: bool = False) -> Tensor:
        """Quantize (unless told not to), then decode to images in about [-1, 1]."""
        quant = h if force_not_quantize else self.quantize_latent(h)[0]
        return self.decoder(self.post_quant_conv(quant))

    def round_trip(self, x: Tensor) -> Tensor:
        """encode -> quantize -> decode: the VQ-f8 artifact degradation when this is an f8 model."""
        return self.decode(self.encode(x))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Training path: (reconstruction, codebook loss)."""
        quant, emb_loss = self.quantize_latent(self.encode(x))
        return self.decoder(self.post_quant_conv(quant)), emb_loss


def architecture_differences(saved: Mapping, configured: Mapping) -> list[str]:
    """How two VQ params (ddconfig, n_embed, embed_dim) describe different networks, as ``key: a vs b`` lines.

    Every ddconfig entry counts but ``resolution`` (taming uses it only to place attention, which
    ``attn_resolutions`` then shows) and ``dropout`` (training only); an absent ``norm_groups`` is taming's 32.
    Some of these (``norm_groups``) leave the state dict unchanged, so strict loading alone cannot catch them."""
    def arch(p: Mapping) -> dict:
        dd = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in dict(p.get("ddconfig") or {}).items()}
        dd.setdefault("norm_groups", TAMING_NORM_GROUPS)
        dd.setdefault("attn_resolutions", [])
        dd.setdefault("attn_type", "vanilla")
        dd.pop("resolution", None)
        dd.pop("dropout", None)
        return {**{f"ddconfig.{k}": v for k, v in dd.items()}, "n_embed": p.get("n_embed"), "embed_dim": p.get("embed_dim")}

    a, b = arch(saved), arch(configured)
    return [f"{k}: {a.get(k, 'unset')} vs {b.get(k, 'unset')}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def tiny_ddconfig(factor: int = 4, ch: int = 32, resolution: int = 64, attn: bool = False) -> dict:
    """A small ddconfig for demos and tests: f4 -> ch_mult [1,2,4], f8 -> [1,2,2,4] (as CompVis)."""
    ch_mult = {4: [1, 2, 4], 8: [1, 2, 2, 4]}.get(factor)
    if ch_mult is None:
        raise ValueError(f"tiny_ddconfig supports factor 4 or 8, got {factor}")
    return dict(
        double_z=False, z_channels={4: 3, 8: 4}[factor], resolution=resolution, in_channels=3, out_ch=3,
        ch=ch, ch_mult=ch_mult, num_res_blocks=1, attn_resolutions=[resolution // factor] if attn else [],
        dropout=0.0,
    )
