"""VQ first stage: LDM encode/decode semantics, training module, checkpoints in the taming layout."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from refiner.formats.first_stage import load_first_stage
from refiner.formats.kinds import load_strict
from refiner.lit.first_stage import FirstStageModule
from refiner.models.vq import VQModel, tiny_ddconfig


@pytest.fixture(scope="module")
def vq():
    torch.manual_seed(0)
    return VQModel(tiny_ddconfig(4, resolution=32), n_embed=32, embed_dim=3).eval()


def test_encode_is_pre_quantization_and_decode_quantizes(vq):
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        h = vq.encode(x)
        assert h.shape == (2, 3, 8, 8) and vq.factor == 4
        codebook = vq.quantize.embedding.weight
        dist = torch.cdist(h.permute(0, 2, 3, 1).reshape(-1, 3), codebook).min(dim=1).values
        assert dist.max() > 1e-4  # encode does not snap to the codebook (LDM VQModelInterface.encode)
        quant, _ = vq.quantize_latent(h)
        torch.testing.assert_close(vq.decode(h), vq.decode(quant, force_not_quantize=True))
        assert not torch.allclose(vq.decode(h), vq.decode(h, force_not_quantize=True))


def test_sizes_not_divisible_by_the_factor_are_refused(vq):
    with pytest.raises(ValueError, match="not divisible by the first-stage factor 4"):
        vq.encode(torch.zeros(1, 3, 30, 32))


def test_unsupported_ddconfigs_are_refused():
    with pytest.raises(ValueError, match="attn_type"):
        VQModel({**tiny_ddconfig(4), "attn_type": "none"}, 16, 3)
    with pytest.raises(ValueError, match="double_z"):
        VQModel({**tiny_ddconfig(4), "double_z": True}, 16, 3)


def _images(n=4, size=32):
    g = torch.Generator().manual_seed(0)
    base = torch.linspace(-1, 1, size)
    imgs = torch.stack([torch.stack([base[None, :].expand(size, size) * s, base[:, None].expand(size, size) * s,
                                     torch.full((size, size), s)]) for s in torch.rand(n, generator=g) * 2 - 1])
    return [{"image": im} for im in imgs]


def _fit(module, steps, tmp_path):
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
                         default_root_dir=tmp_path)
    trainer.fit(module, train_dataloaders=DataLoader(_images(), batch_size=4))
    return trainer


def test_training_with_discriminator_writes_a_taming_layout_checkpoint(tmp_path):
    module = FirstStageModule(tiny_ddconfig(4, resolution=32), n_embed=32, embed_dim=3, disc_weight=0.1)
    trainer = _fit(module, 2, tmp_path)
    trainer.save_checkpoint(tmp_path / "vq.ckpt")
    sd = torch.load(tmp_path / "vq.ckpt", weights_only=True)["state_dict"]
    prefixes = {k.split(".")[0] for k in sd}
    assert prefixes == {"encoder", "decoder", "quantize", "quant_conv", "post_quant_conv", "loss"}
    assert any(k.startswith("loss.discriminator.") for k in sd)
    state = load_first_stage(tmp_path / "vq.ckpt")  # drops loss.*
    assert not any(k.startswith("loss.") for k in state)
    load_strict(VQModel(tiny_ddconfig(4, resolution=32), 32, 3), state, source="vq.ckpt")


def test_training_reduces_reconstruction_error(tmp_path):
    torch.manual_seed(0)
    module = FirstStageModule(tiny_ddconfig(4, resolution=32), n_embed=32, embed_dim=3, lr=1e-3)
    batch = torch.stack([s["image"] for s in _images()])
    with torch.no_grad():
        before = module.reconstruction_losses(batch)[1].item()
    _fit(module, 80, tmp_path)
    with torch.no_grad():
        after = module.reconstruction_losses(batch)[1].item()
    assert after < 0.6 * before


def test_sdpa_attention_block_matches_taming_attention():
    from taming.modules.diffusionmodules.model import AttnBlock

    from refiner.models.vq import SDPAAttnBlock, use_sdpa_attention

    torch.manual_seed(0)
    reference = AttnBlock(64)
    for p in reference.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(2, 64, 6, 5)
    expected = reference(x)
    swapped = use_sdpa_attention(torch.nn.Sequential(reference))[0]
    assert type(swapped) is SDPAAttnBlock
    torch.testing.assert_close(swapped(x), expected, rtol=1e-5, atol=1e-5)
    vq = VQModel(tiny_ddconfig(4, resolution=32), 16, 3)
    blocks = [m for m in vq.modules() if isinstance(m, AttnBlock)]
    assert blocks and all(type(m) is SDPAAttnBlock for m in blocks)  # mid-blocks always have attention


def test_attention_hands_sdpa_contiguous_tensors(monkeypatch):
    """Strided q/k/v make SDPA fall back to its math kernel, which builds the full (HW x HW) matrix."""
    from torch.nn import functional as F

    from refiner.models.unet import UNetModel, tiny_unet_params

    seen = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        seen.append(all(t.is_contiguous() for t in (q, k, v)))
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        VQModel(tiny_ddconfig(4, resolution=32), 16, 3).encode(torch.zeros(1, 3, 32, 32))
        UNetModel(**tiny_unet_params())(torch.zeros(1, 3, 16, 16), torch.tensor([5]))
    assert len(seen) >= 3 and all(seen)


def test_warmup_cosine_hand_values():
    from refiner.lit.first_stage import warmup_cosine

    assert [warmup_cosine(s, 4, 12) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert warmup_cosine(8, 4, 12) == pytest.approx(0.5)  # halfway through the decay: (1 + cos(pi/2)) / 2
    assert warmup_cosine(12, 4, 12) == pytest.approx(0.0) and warmup_cosine(30, 4, 12) == pytest.approx(0.0)
    assert warmup_cosine(0, 0, 10) == 1.0


def test_cosine_schedule_reaches_zero_and_restarts_stop(tmp_path, monkeypatch):
    module = FirstStageModule(tiny_ddconfig(4, resolution=32), n_embed=32, embed_dim=3, lr=1e-3,
                              lr_schedule="cosine", warmup_steps=2, restart_every=1, restart_until=3)
    restarts = []
    original = module.restart_dead_codes
    monkeypatch.setattr(module, "restart_dead_codes", lambda x: restarts.append(module.global_step) or original(x))
    trainer = _fit(module, 8, tmp_path)
    opt = trainer.optimizers[0]
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert restarts == [0, 1, 2]
    with pytest.raises(ValueError, match="lr_schedule"):
        FirstStageModule(tiny_ddconfig(4, resolution=32), n_embed=32, embed_dim=3, lr_schedule="linear")


def test_norm_groups_sets_every_groupnorm_and_keeps_the_state_dict():
    """``norm_groups`` regroups every GroupNorm of encoder and decoder (4 channels per group for ch 32 with 8,
    CompVis's f4 ratio), leaves the state dict as it is, and changes the function."""
    torch.manual_seed(0)
    plain_vq = VQModel(tiny_ddconfig(4, resolution=32), n_embed=16, embed_dim=3).eval()
    grouped = VQModel({**tiny_ddconfig(4, resolution=32), "norm_groups": 8}, n_embed=16, embed_dim=3).eval()
    norms = [m for m in grouped.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.num_groups == 8 for m in norms)
    assert all(m.num_groups == 32 for m in plain_vq.modules() if isinstance(m, torch.nn.GroupNorm))
    assert plain_vq.state_dict().keys() == grouped.state_dict().keys()
    grouped.load_state_dict(plain_vq.state_dict())
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert (plain_vq.encode(x) - grouped.encode(x)).abs().max() > 1e-3
    # one GroupNorm by hand: 8 groups of 4 channels, statistics over (channels of the group, H, W), eps 1e-6
    norm, h = norms[0], torch.randn(2, norms[0].num_channels, 5, 5)
    g = h.reshape(2, 8, -1)
    ref = ((g - g.mean(-1, keepdim=True)) / (g.var(-1, unbiased=False, keepdim=True) + 1e-6).sqrt()).reshape(h.shape)
    ref = ref * norm.weight[None, :, None, None] + norm.bias[None, :, None, None]
    torch.testing.assert_close(norm(h), ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="norm_groups=5 does not divide"):
        VQModel({**tiny_ddconfig(4, resolution=32), "norm_groups": 5}, 16, 3)


def test_a_first_stage_config_that_describes_another_network_is_refused(tmp_path):
    """Our first-stage checkpoints record their params; the norm groups do not show in the state dict, so a config
    with other groups would load strictly and decode garbage: it is refused, naming both values."""
    from refiner.formats.first_stage import build_first_stage
    from refiner.formats.safe_load import CheckpointError

    dd = {**tiny_ddconfig(4, resolution=32), "norm_groups": 8}
    module = FirstStageModule(dd, n_embed=16, embed_dim=3, restart_every=0)
    trainer = _fit(module, 1, tmp_path)
    path = tmp_path / "vq.ckpt"
    trainer.save_checkpoint(path)
    vq = build_first_stage(path, dict(ddconfig=dd, n_embed=16, embed_dim=3))
    assert all(m.num_groups == 8 for m in vq.modules() if isinstance(m, torch.nn.GroupNorm))
    with pytest.raises(CheckpointError, match=r"ddconfig.norm_groups: 8 vs 32"):
        build_first_stage(path, dict(ddconfig=tiny_ddconfig(4, resolution=32), n_embed=16, embed_dim=3))
    with pytest.raises(CheckpointError, match=r"n_embed: 16 vs 32"):
        build_first_stage(path, dict(ddconfig=dd, n_embed=32, embed_dim=3))
