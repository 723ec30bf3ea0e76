"""The Triton linear attention against a float64 reference: on the GPU at real shapes, on the CPU under
Triton's interpreter at small ones (see conftest.py). Outputs the kernels write are poisoned with NaN first,
so an element left unwritten fails the comparison. Inputs are seeded per test (several seeds where it counts).
Also the contracts of its torch.library custom ops: opcheck, and torch.compile(fullgraph=True) on top.
"""
from __future__ import annotations

import pytest
import torch

from kernels.linear_attention import EPS, linear_attention, linear_attention_packed, resolve_backend
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
    _assert_matches(out, grads, ref, do, dtype)


def _assert_matches(out, grads, ref, do, dtype):
    """out, dq, dk, dv against the float64 reference's."""
    if out.shape[1] == 1:
        # One token: out = v whatever q and k are, so dq and dk are exactly 0 and what the kernels write there
        # is the rounding of two cancelling terms of size ~|dO| (tf32 dots for float16 inputs: seen 1e-3 |dO|).
        scale = do.double().norm().item()
        errs = [_rel(out, ref[0]), grads[0].double().norm().item() / scale,
                grads[1].double().norm().item() / scale, _rel(grads[2], ref[3])]
        assert max(errs[0], errs[3]) <= TOL[dtype] and max(errs[1:3]) <= 1e-2, f"out, |dq|, |dk|, dv: {errs}"
        return
    errs = [_rel(x, r) for x, r in zip([out, *grads], ref)]
    assert max(errs) <= TOL[dtype], f"relative errors out/dq/dk/dv {errs}"


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_packed_op_matches_float64_reference(shape, dtype):
    """linear_attention_packed (the DiT's call): the output, and the gradient as one tensor of qkv's shape."""
    x = _packed_inputs(*shape, dtype).requires_grad_()
    do = torch.randn(shape, device=DEVICE, dtype=dtype)
    out = linear_attention_packed(x, backend="triton")
    (dx,) = torch.autograd.grad(out, x, do)
    assert out.shape == shape and out.is_contiguous() and out.dtype == dtype
    assert dx.shape == x.shape and dx.is_contiguous() and dx.dtype == dtype
    _assert_matches(out, dx.unbind(2), _reference(*x.unbind(2), do), do, dtype)


@pytest.mark.parametrize("shape", [(2, 0, 3, 16), (0, 5, 3, 16)], ids=["no-tokens", "no-batch"])
def test_empty_inputs(shape):
    """Nothing to launch: an empty output and empty gradients, with and without autograd."""
    x = _packed_inputs(*shape, torch.float32).requires_grad_()
    for fn in (lambda: linear_attention_packed(x, backend="triton"),
               lambda: linear_attention(*x.unbind(2), backend="triton")):
        with torch.no_grad():
            assert fn().shape == shape
        out = fn()
        assert out.shape == shape
        (dx,) = torch.autograd.grad(out, x, torch.ones_like(out))
        assert dx.shape == x.shape


@pytest.mark.parametrize("packed", [True, False], ids=["packed-qkv", "separate-qkv"])
def test_inputs_without_unit_stride_along_head_dim(packed):
    """The ops may be handed any layout (by torch.compile, or callers): stride along D != 1 is made unit."""
    B, N, H, D = pick((2, 37, 2, 16), (2, 300, 4, 32))
    dtype = HALF_DTYPES[0]
    x = torch.randn(B, N, 3, D, H, device=DEVICE, dtype=dtype).transpose(-1, -2).requires_grad_()
    assert x.stride(-1) == H
    do = torch.randn(B, N, H, D, device=DEVICE, dtype=dtype)
    if packed:
        out = linear_attention_packed(x, backend="triton")
        grads = torch.autograd.grad(out, x, do)[0].unbind(2)
    else:
        q, k, v = x.unbind(2)
        out = linear_attention(q, k, v, backend="triton")
        grads = torch.autograd.grad(out, (q, k, v), do)
    _assert_matches(out, grads, _reference(*x.unbind(2), do), do, dtype)


@pytest.mark.parametrize("packed", [True, False], ids=["packed-qkv", "separate-qkv"])
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_autograd_zero_rows_and_dispatch(dtype, packed):
    shape = pick((2, 151, 3, 32), (2, 515, 3, 32))
    x = _packed_inputs(*shape, dtype, zero_rows=True)
    if packed:
        x.requires_grad_()
        q, k, v = x.unbind(2)
        out = linear_attention_packed(x, backend="triton")
    else:
        q, k, v = (t.detach().clone().requires_grad_() for t in x.unbind(2))
        out = linear_attention(q, k, v, backend="triton")
    assert resolve_backend(q, "triton" if not ON_GPU else None) == "triton"
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


def _autograd_nodes(t: torch.Tensor) -> set[str]:
    seen, todo = set(), [t.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and node not in seen:
            seen.add(node)
            todo.extend(f for f, _ in node.next_functions)
    return {node.name() for node in seen}


@pytest.mark.parametrize("dtype", [HALF_DTYPES[0], torch.float32], ids=str)
def test_gradients_through_projection_match_reference(dtype):
    """The DiT's pattern: Linear -> view (B, N, 3, H, D) -> packed attention; weight gradients agree, and the
    gradient reaches the projection output as one tensor (no unbind node stacking three gradients)."""
    B, N, H, D = pick((2, 45, 2, 32), (2, 300, 4, 32))
    proj = torch.nn.Linear(H * D, 3 * H * D, device=DEVICE, dtype=dtype)
    x = torch.randn(B, N, H * D, device=DEVICE, dtype=dtype)
    do = torch.randn(B, N, H, D, device=DEVICE, dtype=dtype)
    results = []
    for backend in ("triton", "torch"):
        out = linear_attention_packed(proj(x).view(B, N, 3, H, D), backend=backend)
        nodes = _autograd_nodes(out)
        # the reference unbinds (and shows that the check sees an unbind where there is one)
        assert any("Unbind" in n for n in nodes) == (backend == "torch"), nodes
        results.append((out, *torch.autograd.grad(out, (proj.weight, proj.bias), do)))
    for ours, ref in zip(*results):
        assert _rel(ours, ref.double()) <= TOL[dtype]


@pytest.mark.parametrize("requires_grad", [False, True], ids=["no-grad", "grad"])
def test_custom_ops_pass_opcheck(requires_grad):
    """Schema, fake implementations against the real kernels, autograd registration, AOT dispatch."""
    from kernels import triton_linear_attention  # noqa: F401 - registers the sana:: ops

    B, N, H, D = 2, 9, 2, 16
    x = _packed_inputs(B, N, H, D, torch.float32)
    qkv = x.clone().requires_grad_(requires_grad)
    q, k, v = (t.clone().requires_grad_(requires_grad) for t in x.unbind(2))
    torch.library.opcheck(torch.ops.sana.linear_attention_packed, (qkv, EPS))
    torch.library.opcheck(torch.ops.sana.linear_attention, (q, k, v, EPS))
    if not requires_grad:  # the backward ops have no autograd of their own (no double backward)
        stats = torch.ops.sana.linear_attention(q, k, v, EPS)[1]
        do = torch.randn(B, N, H, D, device=DEVICE)
        torch.library.opcheck(torch.ops.sana.linear_attention_backward, (q, k, v, stats, do, EPS))
        torch.library.opcheck(torch.ops.sana.linear_attention_packed_backward, (qkv, stats, do, EPS))


@pytest.mark.parametrize("packed", [True, False], ids=["packed-qkv", "separate-qkv"])
def test_fullgraph_compile_matches_eager(packed):
    """torch.compile traces the Triton attention as one op (no graph break) and runs the same kernels."""
    B, N, H, D = pick((2, 45, 2, 32), (2, 300, 4, 32))
    proj = torch.nn.Linear(H * D, 3 * H * D, device=DEVICE)
    x = torch.randn(B, N, H * D, device=DEVICE, requires_grad=True)
    do = torch.randn(B, N, H, D, device=DEVICE)

    def block(x):
        qkv = proj(x).view(B, N, 3, H, D)  # (B, N, 3, H, D)
        if packed:
            return linear_attention_packed(qkv, backend="triton")
        return linear_attention(*qkv.unbind(2), backend="triton")

    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (block, compiled):
        out = fn(x)
        results.append((out, *torch.autograd.grad(out, (x, proj.weight, proj.bias), do)))
    for got, want in zip(results[1], results[0]):
        assert _rel(got, want.double()) <= 1e-5
    with torch.no_grad():
        assert _rel(compiled(x), results[0][0].double()) <= 1e-5


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
            out = linear_attention_packed(x, backend="triton")
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
