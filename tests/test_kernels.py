"""The Triton linear attention against a float64 reference (GPU), and the backend dispatch (CPU).

Inputs are fresh random draws on every run (no fixed seed); outputs the kernels write are poisoned
with NaN first, so an element left unwritten fails the comparison.
"""
from __future__ import annotations

import pytest
import torch

from kernels.linear_attention import EPS, linear_attention, linear_attention_reference, resolve_backend

_needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="needs a CUDA GPU: the Triton kernels run only there")


def gpu(test):
    return pytest.mark.gpu(_needs_cuda(test))


TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 2e-3}
# (B, N, H, D): odd token counts, several head dims, a long sequence (many chunks meeting through
# atomics) and a large B*H (one chunk per (b, h), plain stores).
SHAPES = [(2, 256, 3, 32), (3, 257, 5, 32), (1, 1001, 2, 64), (2, 333, 4, 16), (1, 65536, 2, 32),
          (16, 300, 36, 32), (2, 4099, 3, 64)]


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(x).all(), "non-finite values (unwritten or overflowed)"
    return ((x.double() - ref).norm() / ref.norm()).item()


def _packed_inputs(B, N, H, D, dtype, zero_rows=False):
    """(B, N, 3, H, D) as the DiT's QKV projection lays it out; optionally with relu-dead rows."""
    x = torch.randn(B, N, 3, H, D, device="cuda", dtype=dtype)
    if zero_rows:
        x[:, ::7, 0] = -x[:, ::7, 0].abs()  # whole q rows <= 0: those outputs are exactly 0
        x[0, :, 1, 0] = -x[0, :, 1, 0].abs()  # every k of head (0, 0) <= 0: KV = 0, ksum = 0
    return x


def _reference(q, k, v, do):
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    out = linear_attention_reference(q, k, v, EPS)
    return (out.detach(), *torch.autograd.grad(out, (q, k, v), do.double()))


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernels_match_float64_reference(shape, dtype):
    from kernels.triton_linear_attention import _backward, _forward  # imports triton

    q, k, v = _packed_inputs(*shape, dtype).unbind(2)
    do = torch.randn(shape, device="cuda", dtype=dtype)
    ref = _reference(q, k, v, do)
    out = torch.full(shape, float("nan"), device="cuda", dtype=dtype)
    _, stats = _forward(q, k, v, EPS, out=out)
    grads = [torch.full(shape, float("nan"), device="cuda", dtype=dtype) for _ in range(3)]
    _backward(q, k, v, stats, do, EPS, *grads)
    errs = [_rel(x, r) for x, r in zip([out, *grads], ref)]
    assert max(errs) <= TOL[dtype], f"relative errors out/dq/dk/dv {errs}"


@gpu
@pytest.mark.parametrize("packed", [True, False], ids=["packed-qkv", "separate-qkv"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autograd_zero_rows_and_dispatch(dtype, packed):
    shape = (2, 515, 3, 32)
    x = _packed_inputs(*shape, dtype, zero_rows=True)
    if packed:
        x.requires_grad_()
        q, k, v = x.unbind(2)
    else:
        q, k, v = (t.detach().clone().requires_grad_() for t in x.unbind(2))
    assert resolve_backend(q) == "triton"
    out = linear_attention(q, k, v)
    do = torch.randn(shape, device="cuda", dtype=dtype)
    if packed:
        grads = torch.autograd.grad(out, x, do)[0].unbind(2)
    else:
        grads = torch.autograd.grad(out, (q, k, v), do)
    assert out.is_contiguous() and out.dtype == dtype
    ref = _reference(q, k, v, do)
    errs = [_rel(t, r) for t, r in zip([out, *grads], ref)]
    assert max(errs) <= TOL[dtype], f"relative errors out/dq/dk/dv {errs}"
    assert (out[:, ::7] == 0).all() and (out[0, :, 0] == 0).all()
    assert (grads[0][:, ::7] == 0).all()  # relu'(q) = 0 on the dead q rows


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gradients_through_projection_match_reference(dtype):
    """The DiT's pattern: Linear -> view (B, N, 3, H, D) -> unbind -> attention; weight gradients agree."""
    from kernels.triton_linear_attention import _packed_source

    B, N, H, D = 2, 300, 4, 32
    proj = torch.nn.Linear(H * D, 3 * H * D, device="cuda", dtype=dtype)
    x = torch.randn(B, N, H * D, device="cuda", dtype=dtype)
    do = torch.randn(B, N, H, D, device="cuda", dtype=dtype)
    results = []
    for backend in ("triton", "torch"):
        q, k, v = proj(x).view(B, N, 3, H, D).unbind(2)
        assert _packed_source(q, k, v) is not None  # the gradient goes straight to the projection output
        out = linear_attention(q, k, v, backend=backend)
        results.append((out, *torch.autograd.grad(out, (proj.weight, proj.bias), do)))
    for ours, ref in zip(*results):
        assert _rel(ours, ref.double()) <= TOL[dtype]


@gpu
def test_deterministic_mode_is_bit_reproducible():
    """Split reductions meet through float32 atomics (order varies run to run); deterministic mode must not."""
    B, N, H, D = 1, 16384, 2, 32  # small B*H, long N: the default path splits N across many programs
    x = _packed_inputs(B, N, H, D, torch.bfloat16).requires_grad_()
    do = torch.randn(B, N, H, D, device="cuda", dtype=torch.bfloat16)
    ref = _reference(*x.unbind(2), do)
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(3):
            out = linear_attention(*x.unbind(2), backend="triton")
            runs.append((out, torch.autograd.grad(out, x, do)[0]))
    finally:
        torch.use_deterministic_algorithms(False)
    for out, dx in runs[1:]:
        assert torch.equal(out, runs[0][0]) and torch.equal(dx, runs[0][1])
    assert _rel(runs[0][0], ref[0]) <= TOL[torch.bfloat16]


@gpu
def test_direct_launches_match_the_jit(monkeypatch):
    """Repeated calls launch the compiled kernels directly (kernels/triton_linear_attention._Launcher), not
    through Triton's JIT: same bits as the JIT path, and inputs at an address that is not a multiple of 16
    bytes (another specialization) get their own kernel."""
    from kernels import triton_linear_attention as tla

    B, N, H, D = 2, 300, 3, 32
    n = B * N * 3 * H * D
    flat = torch.randn(n + 8, device="cuda", dtype=torch.bfloat16)
    do = torch.randn(B, N, H, D, device="cuda", dtype=torch.bfloat16)
    torch.use_deterministic_algorithms(True)  # plain stores: bit-comparable runs
    try:
        for offset in (0, 1, 0):  # 1 element = 2 bytes off 16-byte alignment
            q, k, v = flat[offset:offset + n].view(B, N, 3, H, D).unbind(2)
            runs = []
            for fast in (False, True, True):
                monkeypatch.setattr(tla, "FAST_LAUNCH", fast)
                direct = tla._dkv_launch.direct
                out, stats = tla._forward(q, k, v, EPS)
                grads = [torch.full((B, N, H, D), float("nan"), device="cuda", dtype=torch.bfloat16)
                         for _ in range(3)]
                tla._backward(q, k, v, stats, do, EPS, *grads)
                runs.append((out, *grads))
                if not fast or len(runs) == 3:  # the third call's key was seen by the second at the latest
                    assert tla._dkv_launch.direct == direct + fast
            for run in runs[1:]:
                assert all(torch.equal(a, b) for a, b in zip(run, runs[0]))
            ref = _reference(q, k, v, do)
            errs = [_rel(t, r) for t, r in zip(runs[-1], ref)]
            assert max(errs) <= TOL[torch.bfloat16], f"offset {offset}: relative errors out/dq/dk/dv {errs}"
    finally:
        torch.use_deterministic_algorithms(False)


def test_dispatch_uses_torch_on_cpu(monkeypatch):
    monkeypatch.delenv("SANA_ATTENTION_BACKEND", raising=False)
    q, k, v = torch.randn(1, 9, 3, 2, 8).unbind(2)
    assert resolve_backend(q) == "torch"
    assert torch.equal(linear_attention(q, k, v), linear_attention_reference(q, k, v))


def test_forcing_triton_on_cpu_is_a_clear_error(monkeypatch):
    q, k, v = torch.randn(1, 9, 3, 2, 8).unbind(2)
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        linear_attention(q, k, v, backend="triton")
    monkeypatch.setenv("SANA_ATTENTION_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        linear_attention(q, k, v)
