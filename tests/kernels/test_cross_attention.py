"""The fused cross-attention (kernels.cross_attention, kernels.triton_cross_attention) against a float64
reference, forward and backward: on the GPU at Sana's shapes, under Triton's interpreter at small ones (see
conftest.py). Padded captions with every sample's own mask, a caption of padding only (it must attend as if
unmasked, as SDPA with the additive bias does: never NaN), head dims that are not powers of two (72, 112:
masked tiles), a single key, key counts on and off the tile size, query counts on and off the query block,
one program an (image, head) or several, one key block or several, strided projection outputs. Also: opcheck,
torch.compile without graph breaks, eager calls equal to the dispatched op bit for bit, the fallback to the
reference for long captions, clear errors.
"""
from __future__ import annotations

import pytest
import torch

from kernels.cross_attention import MAX_KEYS, cross_attention, cross_attention_reference
from tests.kernels.modes import DEVICE, FLOAT_DTYPES, ON_GPU, pick

TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 5e-4}
# (B, N queries, L keys, heads, head dim)
SHAPES = pick(small=[(2, 37, 13, 2, 72), (1, 130, 70, 1, 112), (3, 16, 5, 2, 32), (2, 9, 1, 1, 8),
                     (2, 20, 64, 2, 16)],
              real=[(16, 1024, 128, 16, 72), (8, 1024, 128, 20, 112), (2, 4096, 64, 16, 72), (3, 15, 7, 16, 72),
                    (2, 527, 64, 2, 64), (2, 9, 1, 4, 8), (1, 300, 100, 1, 128)])


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(x).all(), "non-finite values (unwritten or overflowed)"
    return ((x.double() - ref).norm() / ref.norm()).item()


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_()


def _case(B, N, L, heads, d, dtype, seed=0):
    """q contiguous, kv a strided view (rows wider than 2C, like a slice of a larger projection), a random
    key mask per sample (not only trailing padding; sample 1 all padding), and its additive bias."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    C = heads * d
    q = _leaf(torch.randn(B, N, C, device=DEVICE, generator=g).to(dtype))
    wide = _leaf(torch.randn(B, L, 2 * C + 8, device=DEVICE, generator=g).to(dtype))
    kv = wide[:, :, 3:3 + 2 * C]
    mask = torch.rand(B, L, device=DEVICE, generator=g) < 0.7
    mask[:, 0] = True
    mask[0, max(1, L // 5):] = False
    if B > 1:
        mask[1] = False
    return q, kv, wide, (~mask).float() * -10000.0, mask


def _check_against_float64(q, kv, bias, heads, dtype, tol):
    out = cross_attention(q, kv, bias, heads, backend="triton")
    assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
    dy = torch.randn(out.shape, device=DEVICE, generator=torch.Generator(device=DEVICE).manual_seed(7)).to(dtype)
    dq, dkv = torch.autograd.grad(out, (q, kv), dy)
    ref_in = [_leaf(t.detach().double()) for t in (q, kv)]
    ref = cross_attention_reference(*ref_in, bias.double(), heads)
    ref_dq, ref_dkv = torch.autograd.grad(ref, ref_in, dy.double())
    errs = {"out": _rel(out, ref), "dkv": _rel(dkv, ref_dkv)}
    if kv.shape[1] > 1:
        errs["dq"] = _rel(dq, ref_dq)
    else:  # one key: the softmax is 1 whatever q is, so dq is zero up to rounding
        assert dq.abs().max() <= 10 * tol
    assert max(errs.values()) <= tol, errs
    assert dq.shape == q.shape and dkv.shape == kv.shape


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_float64(shape, dtype):
    B, N, L, heads, d = shape
    q, kv, _, bias, _ = _case(*shape, dtype)
    _check_against_float64(q, kv, bias, heads, dtype, TOL[dtype])


@pytest.mark.parametrize("programs", [1, 3, 1000])
def test_query_blocks_split_between_programs(programs, monkeypatch):
    """Query blocks of an (image, head) walked by one program, a few, and more programs than there are blocks
    (capped: every program has a block), in forward and the dq kernel; the dk/dv kernel with two key blocks (a
    program each, the second half empty past L): the same gradients."""
    from kernels import triton_cross_attention as tca

    for kind in tca.CONFIG:
        monkeypatch.setitem(tca.CONFIG, kind, dict(tca.CONFIG[kind], BLOCK_M=16, PROGRAMS_PER_SM=programs))
    monkeypatch.setitem(tca.CONFIG, "bwd_dkv_fp32", dict(tca.CONFIG["bwd_dkv_fp32"], BLOCK_K=16))
    q, kv, _, bias, _ = _case(2, 70, 24, 2, 24, torch.float32, seed=4)
    _check_against_float64(q, kv, bias, 2, torch.float32, TOL[torch.float32])


def test_any_additive_bias_matches_float64():
    """The bias is a general additive key bias: soft values, of which none counts as padding."""
    B, N, L, heads, d = 2, 19, 40, 2, 24
    q, kv, _, _, _ = _case(B, N, L, heads, d, torch.float32, seed=1)
    bias = torch.randn(B, L, device=DEVICE, generator=torch.Generator(device=DEVICE).manual_seed(2)) * 3
    out = cross_attention(q, kv, bias, heads, backend="triton")
    dy = torch.randn(out.shape, device=DEVICE, generator=torch.Generator(device=DEVICE).manual_seed(3))
    grads = torch.autograd.grad(out, (q, kv), dy)
    ref_in = [_leaf(t.detach().double()) for t in (q, kv)]
    ref = cross_attention_reference(*ref_in, bias.double(), heads)
    ref_grads = torch.autograd.grad(ref, ref_in, dy.double())
    assert max(_rel(out, ref), *(_rel(a, b) for a, b in zip(grads, ref_grads))) <= 1e-5


def test_padding_keys_get_no_gradient_and_padding_only_captions_stay_finite():
    q, kv, _, bias, mask = _case(3, 21, 11, 2, 24, torch.float32)
    out = cross_attention(q, kv, bias, 2, backend="triton")
    dy = torch.randn(out.shape, device=DEVICE, generator=torch.Generator(device=DEVICE).manual_seed(5))
    dq, dkv = torch.autograd.grad(out, (q, kv), dy)
    padded = ~mask
    padded[1] = False  # the padding-only caption's keys are all used
    assert padded.any() and (dkv[padded] == 0).all()
    # sample 1 is padding only: one bias on every key cancels in the softmax, so it attends as if unmasked (up to
    # the float32 digits that adding -10000 to its scores costs)
    unmasked = cross_attention_reference(q[1:2].detach(), kv[1:2].detach(), torch.zeros_like(bias[1:2]), 2)
    torch.testing.assert_close(out[1:2].detach(), unmasked, rtol=0, atol=2e-3)


def test_long_captions_take_the_reference():
    """Over MAX_KEYS keys the one-tile kernels do not apply: cross_attention gives the reference's result (SDPA),
    and a direct call of the kernels refuses in one line."""
    from kernels.triton_cross_attention import cross_attention_triton

    q, kv, _, bias, _ = _case(2, 5, MAX_KEYS + 3, 2, 8, torch.float32, seed=6)
    out = cross_attention(q, kv, bias, 2, backend="triton")
    assert out.grad_fn is not None and type(out.grad_fn).__name__ != "_EagerBackward"
    torch.testing.assert_close(out, cross_attention_reference(q, kv, bias, 2), rtol=0, atol=0)
    with pytest.raises(ValueError, match=f"up to {MAX_KEYS} keys"):
        cross_attention_triton(q, kv, bias, 2)


def test_backend_switch(monkeypatch):
    """The Triton kernels are the default for CUDA tensors ("auto"), SDPA for CPU tensors; the argument or
    SANA_CROSS_ATTENTION_BACKEND picks either, whatever the block backend."""
    from kernels.cross_attention import resolve_backend

    q = torch.zeros(1, device=DEVICE)
    monkeypatch.setenv("SANA_BLOCK_BACKEND", "torch")
    monkeypatch.delenv("SANA_CROSS_ATTENTION_BACKEND", raising=False)
    assert resolve_backend(q) == ("triton" if ON_GPU else "torch")
    assert resolve_backend(q, "triton") == "triton"
    assert resolve_backend(q, "torch") == "torch"
    monkeypatch.setenv("SANA_CROSS_ATTENTION_BACKEND", "torch")
    assert resolve_backend(q) == "torch"
    assert resolve_backend(q, "triton") == "triton"
    monkeypatch.setenv("SANA_CROSS_ATTENTION_BACKEND", "triton")
    assert resolve_backend(q) == "triton"
    monkeypatch.setenv("SANA_CROSS_ATTENTION_BACKEND", "auto")
    assert resolve_backend(q) == ("triton" if ON_GPU else "torch")
    monkeypatch.setenv("SANA_CROSS_ATTENTION_BACKEND", "fast")
    with pytest.raises(ValueError, match="cross-attention backend must be one of"):
        resolve_backend(q)


def test_custom_op_passes_opcheck():
    """Schema, fake implementation and autograd registration, as torch.compile needs them."""
    import kernels.triton_cross_attention  # noqa: F401 - registers the op

    q, kv, _, bias, _ = _case(2, 7, 5, 2, 24, torch.float32)
    torch.library.opcheck(torch.ops.sana.cross_attention, (q, kv, bias, 2))
    torch.library.opcheck(torch.ops.sana.cross_attention, (_leaf(q.detach()), _leaf(kv.detach().contiguous()),
                                                           bias, 2))


def test_compiles_without_graph_breaks():
    q, kv, wide, bias, _ = _case(2, 7, 5, 2, 24, torch.float32)
    w = torch.randn(48, 48, device=DEVICE, generator=torch.Generator(device=DEVICE).manual_seed(8))

    def f(q, kv):
        return cross_attention(q @ w, kv, bias, 2, backend="triton").square()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="inductor" if ON_GPU else "aot_eager")
    eager_out, comp_out = f(q, kv), compiled(q, kv)
    torch.testing.assert_close(comp_out, eager_out, rtol=1e-6, atol=1e-6)
    for a, b in zip(torch.autograd.grad(comp_out.sum(), (q, wide)), torch.autograd.grad(eager_out.sum(), (q, wide))):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_eager_calls_match_the_dispatched_op():
    """Eager calls skip the dispatcher (kernels.launch.KernelOp): bit for bit what the torch.library op gives."""
    from kernels import triton_cross_attention

    q, kv, _, bias, _ = _case(2, 9, 6, 2, 24, torch.float32)
    outs = []
    for fn in (triton_cross_attention._cross_attention_op, torch.ops.sana.cross_attention):
        out = fn(q, kv, bias, 2)
        dy = torch.ones_like(out).cumsum(-1) / out.shape[-1]
        outs.append((out.detach(), torch.autograd.grad(out, (q, kv), dy), type(out.grad_fn).__name__))
    (o1, g1, via1), (o2, g2, via2) = outs
    assert via1 == "_EagerBackward" and via2 != via1, (via1, via2)
    assert torch.equal(o1, o2)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


def test_bad_inputs_fail_with_one_clear_line():
    q, kv = torch.randn(2, 5, 16, device=DEVICE), torch.randn(2, 3, 32, device=DEVICE)
    with pytest.raises(ValueError, match=r"bias must be \(B, L\) = \(2, 3\)"):
        cross_attention(q, kv, torch.zeros(2, 4, device=DEVICE), 2, backend="triton")
    with pytest.raises(ValueError, match="16 channels do not split into 3 heads"):
        cross_attention(q, kv, torch.zeros(2, 3, device=DEVICE), 3, backend="triton")
    with pytest.raises(ValueError, match=r"kv \(B, L, 2C\)"):
        cross_attention(q, kv[..., :16], torch.zeros(2, 3, device=DEVICE), 2, backend="triton")
    with pytest.raises(ValueError, match="at least one key"):
        cross_attention(q, kv[:, :0], torch.zeros(2, 0, device=DEVICE), 2, backend="triton")
