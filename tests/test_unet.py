"""UNetModel: CompVis state_dict layout (hand-listed), attention packing, embedding, init, checkpointing."""

import math

import pytest
import torch

from refiner.models.unet import (
    AttentionBlock,
    UNetModel,
    qkv_attention,
    timestep_embedding,
    tiny_unet_params,
)

# A 2-level CompVis config: ds=1 -> level 0 (32 ch), ds=2 -> level 1 (64 ch, attention).
TWO_LEVEL = dict(
    image_size=8, in_channels=3, out_channels=3, model_channels=32, attention_resolutions=[2],
    num_res_blocks=1, channel_mult=[1, 2], num_head_channels=16,
)


def _res(prefix, skip_conv):
    names = ["in_layers.0", "in_layers.2", "emb_layers.1", "out_layers.0", "out_layers.3"]
    if skip_conv:
        names.append("skip_connection")
    return {f"{prefix}.{n}.{wb}" for n in names for wb in ("weight", "bias")}


def _attn(prefix):
    return {f"{prefix}.{n}.{wb}" for n in ("norm", "qkv", "proj_out") for wb in ("weight", "bias")}


def _conv(prefix):
    return {f"{prefix}.weight", f"{prefix}.bias"}


def expected_two_level_keys():
    """Written out by hand from the CompVis construction loop for TWO_LEVEL."""
    keys = set()
    keys |= _conv("time_embed.0") | _conv("time_embed.2")
    keys |= _conv("input_blocks.0.0")                      # stem conv 3 -> 32
    keys |= _res("input_blocks.1.0", skip_conv=False)      # level 0 ResBlock 32 -> 32
    keys |= _conv("input_blocks.2.0.op")                   # Downsample conv
    keys |= _res("input_blocks.3.0", skip_conv=True)       # level 1 ResBlock 32 -> 64
    keys |= _attn("input_blocks.3.1")                      # attention at ds=2
    keys |= _res("middle_block.0", False) | _attn("middle_block.1") | _res("middle_block.2", False)
    keys |= _res("output_blocks.0.0", True) | _attn("output_blocks.0.1")   # 64+64 -> 64
    keys |= _res("output_blocks.1.0", True) | _attn("output_blocks.1.1")   # 64+32 -> 64
    keys |= _conv("output_blocks.1.2.conv")                                # Upsample conv
    keys |= _res("output_blocks.2.0", True)                                # 64+32 -> 32
    keys |= _res("output_blocks.3.0", True)                                # 32+32 -> 32
    keys |= _conv("out.0") | _conv("out.2")
    return keys


def randomize(model, std=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def test_state_dict_keys_match_hand_listed_compvis_layout():
    sd = UNetModel(**TWO_LEVEL).state_dict()
    expected = expected_two_level_keys()
    assert set(sd) == expected, (sorted(set(sd) - expected), sorted(expected - set(sd)))
    # a few shapes worked out by hand (time_embed_dim = 4 * 32 = 128)
    assert sd["time_embed.0.weight"].shape == (128, 32)
    assert sd["input_blocks.0.0.weight"].shape == (32, 3, 3, 3)
    assert sd["input_blocks.2.0.op.weight"].shape == (32, 32, 3, 3)
    assert sd["input_blocks.3.0.skip_connection.weight"].shape == (64, 32, 1, 1)
    assert sd["input_blocks.3.1.qkv.weight"].shape == (192, 64, 1)
    assert sd["input_blocks.3.1.proj_out.weight"].shape == (64, 64, 1)
    assert sd["output_blocks.1.0.in_layers.2.weight"].shape == (64, 96, 3, 3)
    assert sd["output_blocks.3.0.in_layers.0.weight"].shape == (64,)
    assert sd["middle_block.0.emb_layers.1.weight"].shape == (64, 128)
    assert sd["out.2.weight"].shape == (3, 32, 3, 3)


def test_resblock_updown_and_scale_shift_change_layout_like_compvis():
    sd = UNetModel(**{**TWO_LEVEL, "resblock_updown": True, "use_scale_shift_norm": True}).state_dict()
    # the downsample becomes a down-ResBlock (32 -> 32, no skip conv), the upsample an up-ResBlock
    assert _res("input_blocks.2.0", skip_conv=False) <= set(sd)
    assert "input_blocks.2.0.op.weight" not in sd
    assert _res("output_blocks.1.2", skip_conv=False) <= set(sd)
    assert "output_blocks.1.2.conv.weight" not in sd
    assert sd["middle_block.0.emb_layers.1.weight"].shape == (128, 128)  # scale and shift


def test_head_counts_resolved_like_compvis():
    m = UNetModel(**{**TWO_LEVEL, "num_head_channels": 16})
    assert m.middle_block[1].num_heads == 4  # 64 / 16
    m = UNetModel(**{**TWO_LEVEL, "num_head_channels": -1, "num_heads": 2, "num_heads_upsample": 4})
    assert m.input_blocks[3][1].num_heads == 2 and m.output_blocks[0][1].num_heads == 4  # legacy honours upsample
    m = UNetModel(**{**TWO_LEVEL, "num_head_channels": -1, "num_heads": 2, "num_heads_upsample": 4, "legacy": False})
    assert m.output_blocks[0][1].num_heads == 2  # CompVis non-legacy passes dim_head = ch // num_heads


def test_output_shape_and_tiny_params():
    m = randomize(UNetModel(**tiny_unet_params()))
    x = torch.randn(2, 3, 16, 16)
    assert m(x, torch.tensor([3, 900])).shape == (2, 3, 16, 16)
    assert m(x, 5).shape == (2, 3, 16, 16)  # scalar timestep broadcast
    assert m(torch.randn(1, 3, 8, 12), 5).shape == (1, 3, 8, 12)


def test_zero_init_output_is_zero():
    m = UNetModel(**tiny_unet_params())
    out = m(torch.randn(2, 3, 16, 16), torch.tensor([10, 500]))
    assert torch.count_nonzero(out) == 0
    with torch.no_grad():
        m.out[2].weight.normal_()
    assert torch.count_nonzero(m(torch.randn(2, 3, 16, 16), 10)) > 0


def test_concat_conditioning_changes_output_and_checks_channels():
    m = randomize(UNetModel(**tiny_unet_params(in_channels=6, out_channels=3)))
    x = torch.randn(2, 3, 16, 16)
    c1, c2 = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)
    o1, o2 = m(x, 10, concat=c1), m(x, 10, concat=c2)
    assert o1.shape == (2, 3, 16, 16)
    assert not torch.allclose(o1, o2)
    torch.testing.assert_close(o1, m(torch.cat([x, c1], 1), 10))  # concat goes after x
    with pytest.raises(ValueError, match="channels do not add up"):
        m(x, 10, concat=torch.randn(2, 2, 16, 16))
    with pytest.raises(ValueError, match="forget the concat"):
        m(x, 10)
    with pytest.raises(ValueError, match="spatial size"):
        m(x, 10, concat=torch.randn(2, 3, 8, 8))


def _compvis_legacy_reference(qkv, heads):
    """QKVAttentionLegacy written out per head: heads packed as [q k v] blocks, scale sqrt(sqrt(ch)) on q and k."""
    b, width, t = qkv.shape
    ch = width // (3 * heads)
    outs = []
    for n in range(b):
        per_head = []
        for h in range(heads):
            block = qkv[n, h * 3 * ch:(h + 1) * 3 * ch]
            q, k, v = block[:ch], block[ch:2 * ch], block[2 * ch:]
            s = 1 / math.sqrt(math.sqrt(ch))
            w = torch.softmax((q * s).T @ (k * s), dim=-1)  # (t, s)
            per_head.append(v @ w.T)  # (ch, t)
        outs.append(torch.cat(per_head))
    return torch.stack(outs)


def _compvis_new_order_reference(qkv, heads):
    """QKVAttention: q, k, v are the three thirds; each third is split into heads."""
    b, width, t = qkv.shape
    ch = width // (3 * heads)
    q_all, k_all, v_all = qkv[:, :heads * ch], qkv[:, heads * ch:2 * heads * ch], qkv[:, 2 * heads * ch:]
    outs = []
    for n in range(b):
        per_head = []
        for h in range(heads):
            sl = slice(h * ch, (h + 1) * ch)
            q, k, v = q_all[n, sl], k_all[n, sl], v_all[n, sl]
            w = torch.softmax(q.T @ k / math.sqrt(ch), dim=-1)
            per_head.append(v @ w.T)
        outs.append(torch.cat(per_head))
    return torch.stack(outs)


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_attention_matches_compvis_head_splitting_both_orders(backend):
    torch.manual_seed(0)
    heads, ch, t = 3, 4, 5
    qkv = torch.randn(2, 3 * heads * ch, t)
    legacy = qkv_attention(qkv, heads, legacy_order=True, backend=backend)
    new = qkv_attention(qkv, heads, legacy_order=False, backend=backend)
    torch.testing.assert_close(legacy, _compvis_legacy_reference(qkv, heads), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(new, _compvis_new_order_reference(qkv, heads), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(legacy, new)  # the two packings really differ


def test_attention_block_uses_order_flag_and_backends_agree():
    torch.manual_seed(0)
    x = torch.randn(2, 64, 4, 4)
    for new_order in (False, True):
        blk = randomize(AttentionBlock(64, num_head_channels=16, use_new_attention_order=new_order))
        out = blk(x)
        ref_fn = _compvis_new_order_reference if new_order else _compvis_legacy_reference
        xf = x.reshape(2, 64, 16)
        ref = xf + blk.proj_out(ref_fn(blk.qkv(blk.norm(xf)), 4))
        torch.testing.assert_close(out, ref.reshape(x.shape), atol=1e-5, rtol=1e-5)
    m = randomize(UNetModel(**tiny_unet_params()))
    x = torch.randn(2, 3, 16, 16)
    out_sdpa = m(x, torch.tensor([1, 700]))
    m.set_attention_backend("math")
    torch.testing.assert_close(m(x, torch.tensor([1, 700])), out_sdpa, atol=1e-5, rtol=1e-5)


def test_timestep_embedding_closed_form():
    # dim 4: half = 2, w = [1, 10000^(-1/2) = 0.01]; layout [cos(t w0), cos(t w1), sin(t w0), sin(t w1)]
    t = torch.tensor([0, 1, 10])
    emb = timestep_embedding(t, 4)
    expected = torch.tensor([
        [1.0, 1.0, 0.0, 0.0],
        [math.cos(1), math.cos(0.01), math.sin(1), math.sin(0.01)],
        [math.cos(10), math.cos(0.1), math.sin(10), math.sin(0.1)],
    ])
    torch.testing.assert_close(emb, expected, atol=1e-6, rtol=1e-6)
    odd = timestep_embedding(torch.tensor([2.5]), 5)  # odd dim: zero pad column
    assert odd.shape == (1, 5) and odd[0, 4] == 0
    torch.testing.assert_close(odd[0, 0], torch.tensor(math.cos(2.5)))


def test_use_checkpoint_gives_identical_gradients():
    params = tiny_unet_params()
    ref = randomize(UNetModel(**params))
    ckp = UNetModel(**{**params, "use_checkpoint": True})
    ckp.load_state_dict(ref.state_dict())
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([4, 400])
    grads = []
    for m in (ref, ckp):
        m.zero_grad()
        m(x, t).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5, msg=name)
    assert any(g.abs().sum() > 0 for g in grads[0].values())


def test_bad_configs_raise_clear_errors():
    with pytest.raises(TypeError, match="bogus_option"):
        UNetModel(**tiny_unet_params(), bogus_option=1)
    with pytest.raises(ValueError, match="spatial_transformer"):
        UNetModel(**tiny_unet_params(), use_spatial_transformer=True, context_dim=16)
    with pytest.raises(ValueError, match="dims=2"):
        UNetModel(**tiny_unet_params(), dims=3)
    with pytest.raises(ValueError, match="num_classes"):
        UNetModel(**tiny_unet_params(), num_classes=10)
    with pytest.raises(ValueError, match="n_embed"):
        UNetModel(**tiny_unet_params(), n_embed=16)
    with pytest.raises(ValueError, match="num_heads or num_head_channels"):
        UNetModel(**tiny_unet_params(num_head_channels=-1))
    with pytest.raises(ValueError, match="attention_backend"):
        UNetModel(**tiny_unet_params(), attention_backend="flash")
    with pytest.warns(UserWarning, match="use_fp16"):
        UNetModel(**tiny_unet_params(), use_fp16=True)


def test_norm_groups_sets_every_groupnorm_and_only_other_values_are_recorded():
    """A half-width UNet (16 channels) needs fewer than CompVis's 32 groups; the value reaches every GroupNorm, the
    default leaves ``config`` exactly CompVis's (no extra key), and channels that the groups do not divide refuse."""
    from refiner.models.unet import UNetModel, tiny_unet_params

    half = UNetModel(**tiny_unet_params(model_channels=16, norm_groups=16, num_head_channels=8))
    groups = {m.num_groups for m in half.modules() if isinstance(m, torch.nn.GroupNorm)}
    assert groups == {16} and half.config["norm_groups"] == 16
    assert "norm_groups" not in UNetModel(**tiny_unet_params()).config
    with pytest.raises(ValueError, match=r"GroupNorm\(32\) needs channels divisible by 32, got 16"):
        UNetModel(**tiny_unet_params(model_channels=16, num_head_channels=8))
