"""The Triton linear attention against a float64 reference: on the GPU at real shapes, on the CPU under
Triton's interpreter at small ones (see conftest.py). Outputs the kernels write are poisoned with NaN first,
so an element left unwritten fails the comparison. Inputs are seeded per test (several seeds where it counts).
"""
from __future__ import annotations

import pytest
import torch

from kernels.linear_attention import EPS, linear_attention, resolve_backend
from kernels.linear_attention import linear_attention_reference as reference
from tests.kernels.modes import DEVICE, FLOAT_DTYPES, HALF_DTYPES, ON_GPU, gpu_only, pick

TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 2e-3}
# (B, N, H, D): odd token counts, N = 1, several head dims, and on the GPU a long sequence (many chunks meeting
# through atomics) and a large B*H (one chunk per (b, h), plain stores). On the CPU the SM count is 4, so
# N > 128 (one tile) already splits the reductions into chunks that meet through atomics.
SHAPES = pick(
    small=[(2, 77, 4, 32), (1, 1, 2, 16), (3, 33, 2, 64), (2, 301, 3, 16), (1, 130, 1, 32)],
    real=[(2, 256, 3, 32), (3, 257, 5, 32), (1, 1001, 2, 64), (2, 333, 4, 16), (1, 65536, 2, 32),
          (16, 300, 36, 32), (2, 4099, 3, 64), (1, 1, 2, 16)])


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(x).all(), "non-finite values (unwritten or overflowed)"
    return ((x.double() - ref).norm() / ref.norm()).item()


def _packed_inputs(B, N, H, D, dtype, zero_rows=False):
    """(B, N, 3, H, D) as the DiT's QKV projection lays it out; optionally with relu-dead rows."""
    x = torch.randn(B, N, 3, H, D, device=DEVICE, dtype=dtype)
    if zero_rows:
        x[:, ::7, 0] = -x[:, ::7, 0].abs()  # whole q rows <= 0: those outputs are exactly 0
        x[0, :, 1, 0] = -x[0, :, 1, 0].abs()  # every k of head (0, 0) <= 0: KV = 0, ksum = 0
    return x


def _reference(q, k, v, do):
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    out = reference(q, k, v, EPS)
    return (out.detach(), *torch.autograd.grad(out, (q, k, v), do.double()))


@pytest.mark.parametrize("seed", range(pick(5, 2)))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernels_match_float64_reference(shape, dtype, seed):
    from kernels.triton_linear_attention import _backward, _forward  # imports triton

    q, k, v = _packed_inputs(*shape, dtype).unbind(2)
    do = torch.randn(shape, device=DEVICE, dtype=dtype)
    ref = _reference(q, k, v, do)
    out = torch.full(shape, float("nan"), device=DEVICE, dtype=dtype)
    _, stats = _forward(q, k, v, EPS, out=out)
    grads = [torch.full(shape, float("nan"), device=DEVICE, dtype=dtype) for _ in range(3)]
    _backward(q, k, v, stats, do, EPS, *grads)
    if shape[1] == 1:
        # One token: out = v whatever q and k are, so dq and dk are exactly 0 and what the kernels write there
        # is the rounding of two cancelling terms of size ~|dO| (tf32 dots for float16 inputs: seen 1e-3 |dO|).
        scale = do.double().norm().item()
        errs = [_rel(out, ref[0]), grads[0].double().norm().item() / scale,
                grads[1].double().norm().item() / scale, _rel(grads[2], ref[3])]
        assert max(errs[0], errs[3]) <= TOL[dtype] and max(errs[1:3]) <= 1e-2, f"out, |dq|, |dk|, dv: {errs}"
        return
    errs = [_rel(x, r) for x, r in zip([out, *grads], ref)]
    assert max(errs) <= TOL[dtype], f"relative errors out/dq/dk/dv {errs}"


@pytest.mark.parametrize("packed", [True, False], ids=["packed-qkv", "separate-qkv"])
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_autograd_zero_rows_and_dispatch(dtype, packed):
    shape = pick((2, 151, 3, 32), (2, 515, 3, 32))
    x = _packed_inputs(*shape, dtype, zero_rows=True)
    if packed:
        x.requires_grad_()
        q, k, v = x.unbind(2)
    else:
        q, k, v = (t.detach().clone().requires_grad_() for t in x.unbind(2))
    assert resolve_backend(q, "triton" if not ON_GPU else None) == "triton"
    out = linear_attention(q, k, v, backend="triton")
    do = torch.randn(shape, device=DEVICE, dtype=dtype)
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


@pytest.mark.parametrize("dtype", [HALF_DTYPES[0], torch.float32], ids=str)
def test_gradients_through_projection_match_reference(dtype):
    """The DiT's pattern: Linear -> view (B, N, 3, H, D) -> unbind -> attention; weight gradients agree."""
    from kernels.triton_linear_attention import _packed_source

    B, N, H, D = pick((2, 45, 2, 32), (2, 300, 4, 32))
    proj = torch.nn.Linear(H * D, 3 * H * D, device=DEVICE, dtype=dtype)
    x = torch.randn(B, N, H * D, device=DEVICE, dtype=dtype)
    do = torch.randn(B, N, H, D, device=DEVICE, dtype=dtype)
    results = []
    for backend in ("triton", "torch"):
        q, k, v = proj(x).view(B, N, 3, H, D).unbind(2)
        assert _packed_source(q, k, v) is not None  # the gradient goes straight to the projection output
        out = linear_attention(q, k, v, backend=backend)
        results.append((out, *torch.autograd.grad(out, (proj.weight, proj.bias), do)))
    for ours, ref in zip(*results):
        assert _rel(ours, ref.double()) <= TOL[dtype]


def test_deterministic_mode_is_bit_reproducible():
    """Split reductions meet through float32 atomics (order varies run to run); deterministic mode must not."""
    # small B*H, long N: the default path splits N across many programs
    B, N, H, D = pick((1, 700, 2, 32), (1, 16384, 2, 32))
    x = _packed_inputs(B, N, H, D, HALF_DTYPES[0]).requires_grad_()
    do = torch.randn(B, N, H, D, device=DEVICE, dtype=HALF_DTYPES[0])
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
    assert _rel(runs[0][0], ref[0]) <= TOL[HALF_DTYPES[0]]


@gpu_only
def test_direct_launches_match_the_jit(monkeypatch):
    """Repeated calls launch the compiled kernels directly (kernels.launch.Launcher), not
    through Triton's JIT: same bits as the JIT path, and inputs at an address that is not a multiple of 16
    bytes (another specialization) get their own kernel."""
    from kernels import launch
    from kernels import triton_linear_attention as tla

    B, N, H, D = 2, 300, 3, 32
    n = B * N * 3 * H * D
    flat = torch.randn(n + 8, device=DEVICE, dtype=torch.bfloat16)
    do = torch.randn(B, N, H, D, device=DEVICE, dtype=torch.bfloat16)
    torch.use_deterministic_algorithms(True)  # plain stores: bit-comparable runs
    try:
        for offset in (0, 1, 0):  # 1 element = 2 bytes off 16-byte alignment
            q, k, v = flat[offset:offset + n].view(B, N, 3, H, D).unbind(2)
            runs = []
            for fast in (False, True, True):
                monkeypatch.setattr(launch, "FAST_LAUNCH", fast)
                direct = tla._dkv_launch.direct
                out, stats = tla._forward(q, k, v, EPS)
                grads = [torch.full((B, N, H, D), float("nan"), device=DEVICE, dtype=torch.bfloat16)
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
