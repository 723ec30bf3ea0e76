"""Our Linear DiT against diffusers' independent SanaTransformer2DModel, and the attention it uses."""
from __future__ import annotations

import pytest
import torch
from diffusers import SanaTransformer2DModel

from kernels import linear_attention_reference
from sana_core.dit import (
    DIT_CONFIGS,
    DiTConfig,
    LinearDiT,
    embed_patches,
    load_diffusers_state_dict,
    to_diffusers_state_dict,
)
from sana_core.errors import SanaError

CFG = DiTConfig(hidden_size=64, depth=2, num_heads=2, cross_heads=4, caption_channels=48)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _random_diffusers_model(cfg: DiTConfig) -> SanaTransformer2DModel:
    ref = SanaTransformer2DModel(**cfg.to_diffusers_config()).eval()
    with torch.no_grad():  # default init zeroes some layers; random weights exercise every path
        for p in ref.parameters():
            p.normal_(0, 0.2)
    return ref


def _inputs(B, H, W, L=9):
    y_mask = torch.ones(B, L, dtype=torch.bool)
    for b in range(1, B):
        y_mask[b, torch.randint(1, L, ()).item():] = False  # padded captions of different lengths
    return torch.randn(B, 32, H, W), torch.rand(B), torch.randn(B, L, CFG.caption_channels), y_mask


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("hw", [(4, 4), (3, 6)])
def test_matches_diffusers_sana(hw, seed):
    ref = _random_diffusers_model(CFG)
    ours = LinearDiT(CFG).eval()
    load_diffusers_state_dict(ours, ref.state_dict())
    x, t, y, y_mask = _inputs(3, *hw)
    with torch.no_grad():
        a = ours(x, t, y, y_mask)
        b = ref(x, encoder_hidden_states=y, timestep=t * 1000, encoder_attention_mask=y_mask.long()).sample
        assert a.shape == x.shape
        print(f"latent {hw}: |ours - diffusers| / |diffusers| = {_rel(a, b):.2e}")
        assert _rel(a, b) <= 1e-5
        # The comparison is sensitive: inverting one caption's padding mask changes that sample's output by
        # >= 4.3e-3 (the least over seeds 0-59), 400x the agreement asserted above. (Flipping a single mask
        # entry moved it by as little as 8e-5 at some seeds: too close to the tolerance to prove anything.)
        flipped = y_mask.clone()
        flipped[-1] = ~flipped[-1]
        assert _rel(ours(x, t, y, flipped)[-1], a[-1]) > 1e-3


def test_trailing_caption_padding_changes_nothing():
    """Padding keys get weight 0 in the cross-attention (bias -10000: exp underflows to 0), so cutting the
    positions after a batch's longest caption (what the trainer does, sana_core.text_encoder.trim_padding) gives
    the same output and gradients up to rounding; and the padding's content does not matter."""
    torch.manual_seed(0)
    model = LinearDiT(CFG)
    x, t, y, y_mask = _inputs(3, 4, 4, L=24)
    y_mask[:, 10:] = False
    y_mask[0, :10] = True  # the longest caption: 10 tokens
    outs = []
    for keep, pad in ((24, 0.0), (10, 0.0), (16, 0.0), (24, 1e4)):
        yy = y.clone()
        yy[:, 10:] = pad  # huge values in the padding: still no weight
        leaf = yy[:, :keep].clone().requires_grad_()
        model.zero_grad()
        out = model(x, t, leaf, y_mask[:, :keep])
        out.square().mean().backward()
        outs.append((out.detach(), [p.grad.clone() for p in model.parameters()], leaf.grad[:, :10]))
    (o0, g0, d0), *rest = outs
    for o, g, d in rest:
        assert _rel(o, o0) <= 1e-6 and _rel(d, d0) <= 1e-6
        assert max(_rel(a, b) for a, b in zip(g, g0) if b.norm() > 0) <= 1e-5


def test_export_round_trip_into_diffusers():
    ours = LinearDiT(CFG).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.2)
    ref = SanaTransformer2DModel(**CFG.to_diffusers_config()).eval()
    ref.load_state_dict(to_diffusers_state_dict(ours), strict=True)
    x, t, y, y_mask = _inputs(2, 5, 3)
    with torch.no_grad():
        b = ref(x, encoder_hidden_states=y, timestep=t * 1000, encoder_attention_mask=y_mask.long()).sample
        err = _rel(ours(x, t, y, y_mask), b)
        print(f"export into diffusers, latent (5, 3): relative error {err:.2e}")
        assert err <= 1e-5
    assert DiTConfig.from_diffusers_config(dict(ref.config)) == CFG


def test_bad_state_dict_names_the_keys():
    sd = to_diffusers_state_dict(LinearDiT(CFG))
    sd.pop("transformer_blocks.1.ff.conv_point.weight")
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(SanaError, match="transformer_blocks.1.ff.conv_point.weight.*extra.weight"):
        load_diffusers_state_dict(LinearDiT(CFG), sd)
    with pytest.raises(SanaError, match="expects"):
        LinearDiT(CFG)(torch.randn(1, 16, 4, 4), torch.rand(1), torch.randn(1, 3, 48),
                       torch.ones(1, 3, dtype=torch.bool))


def test_gradient_checkpointing_gives_the_same_gradients():
    m = LinearDiT(CFG)
    x, t, y, y_mask = _inputs(2, 4, 4)
    grads = []
    for ckpt in (False, True):
        m.zero_grad()
        m.gradient_checkpointing = ckpt
        m(x, t, y, y_mask).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_linear_attention_gradcheck_float64():
    q, k, v = (torch.randn(2, 7, 3, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(linear_attention_reference, (q, k, v), eps=1e-6, atol=1e-5)


def test_linear_attention_matches_explicit_formula_and_zero_rows():
    q, k, v = torch.randn(2, 9, 3, 8), torch.randn(2, 9, 3, 8), torch.randn(2, 9, 3, 8)
    q[0, 2] = -1.0  # relu kills the whole query row: output must be finite (zero)
    out = linear_attention_reference(q, k, v)
    qr, kr = q.double().relu(), k.double().relu()
    for b in range(2):
        for h in range(3):
            scores = qr[b, :, h] @ kr[b, :, h].T  # (N, N) unnormalised linear-attention weights
            ref = (scores @ v[b, :, h].double()) / (scores.sum(1, keepdim=True) + 1e-15)
            assert torch.allclose(out[b, :, h].double(), ref, rtol=1e-4, atol=1e-5)
    assert torch.isfinite(out).all() and out[0, 2].abs().max() == 0


@pytest.mark.parametrize("name,expected", [("sana-0.6b", 592e6), ("sana-1.6b", 1.6e9)])
def test_parameter_counts_match_diffusers(name, expected):
    cfg = DIT_CONFIGS[name]
    with torch.device("meta"):
        ours = LinearDiT(cfg).num_params()
        theirs = sum(p.numel() for p in SanaTransformer2DModel(**cfg.to_diffusers_config()).parameters())
    print(f"{name}: ours {ours / 1e6:.1f} M, diffusers {theirs / 1e6:.1f} M")
    assert abs(ours - theirs) / theirs <= 0.02
    assert abs(ours - expected) / expected <= 0.05


# The transformer config.json layout of the released diffusers checkpoints (Sana_{600M,1600M}_1024px_diffusers)
_COMMON = {"attention_bias": False, "attention_head_dim": 32, "caption_channels": 2304, "dropout": 0.0,
           "in_channels": 32, "out_channels": 32, "mlp_ratio": 2.5, "norm_elementwise_affine": False,
           "norm_eps": 1e-06, "patch_size": 1, "sample_size": 32}
_OFFICIAL = {
    "sana-0.6b": {**_COMMON, "cross_attention_dim": 1152, "cross_attention_head_dim": 72, "num_attention_heads": 36,
                  "num_cross_attention_heads": 16, "num_layers": 28},
    "sana-1.6b": {**_COMMON, "cross_attention_dim": 2240, "cross_attention_head_dim": 112, "num_attention_heads": 70,
                  "num_cross_attention_heads": 20, "num_layers": 20},
}


@pytest.mark.parametrize("name", sorted(_OFFICIAL))
def test_official_diffusers_configs_map_to_presets(name):
    assert DiTConfig.from_diffusers_config(_OFFICIAL[name]) == DIT_CONFIGS[name]
    assert DIT_CONFIGS[name].head_dim == 32
    bad = {**_OFFICIAL[name], "cross_attention_head_dim": 64}
    with pytest.raises(SanaError, match="cross-attention heads"):
        DiTConfig.from_diffusers_config(bad)
    with pytest.raises(SanaError, match="qk_norm"):
        DiTConfig.from_diffusers_config({**_OFFICIAL[name], "qk_norm": "rms_norm_across_heads"})


@pytest.mark.parametrize("p", [1, 2])
def test_patch_embedding_as_a_gemm_equals_the_conv(p):
    """embed_patches (the patch conv as a GEMM on token layout) against nn.Conv2d in float64: tokens and the
    weight's, the bias's and the latents' gradients; a conv with a forward hook is called itself."""
    torch.manual_seed(p)
    conv = torch.nn.Conv2d(4, 8, p, stride=p).double()
    x = torch.randn(2, 4, 6, 10, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(2, 6 * 10 // p**2, 8, dtype=torch.float64)
    ref = conv(x).flatten(2).transpose(1, 2)
    ref_grads = torch.autograd.grad(ref, (x, conv.weight, conv.bias), dy)
    out = embed_patches(conv, x, p)
    grads = torch.autograd.grad(out, (x, conv.weight, conv.bias), dy)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)
    calls = []
    conv.register_forward_hook(lambda *a: calls.append(1))
    torch.testing.assert_close(embed_patches(conv, x, p), ref)
    assert calls == [1]
