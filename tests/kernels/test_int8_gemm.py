"""The W8A8 kernels of kernels.int8_gemm: the per-token quantisation pass and the int8 GEMM with its fused
scale + bias epilogue against float64 references, on the GPU at Sana-0.6B's shapes and on the CPU under
Triton's interpreter at small ones (see conftest.py); the fp8 GEMM (cuBLASLt) on the GPU.

Since the int8 products are accumulated exactly in int32, the GEMM's only error is the float32 epilogue and
the rounding to the output dtype: the bounds below are those roundings, not loose tolerances.
"""
from __future__ import annotations

import pytest
import torch

from kernels import int8_gemm as g
from tests.kernels.modes import DEVICE, INTERPRET, ON_GPU, gpu_only, pick

# (M, N, K). Real: QKV, Mix-FFN down (K = 2880 is no multiple of 128), cross-attention KV over 32 x 300 text
# tokens, a few-token GEMM (small tile config), Mix-FFN up. Small: ragged edges everywhere, a K that no
# K-tile divides (masked K loop), one row.
GEMM_SHAPES = pick(small=[(37, 48, 96), (130, 300, 200), (1, 16, 32), (64, 256, 128), (257, 40, 64)],
                   real=[(32768, 3456, 1152), (32768, 1152, 2880), (9600, 2304, 1152), (17, 1152, 1152),
                         (4096, 5760, 1152), (1000, 1000, 1000)])
ROW_SHAPES = pick(small=[(5, 7), (33, 96), (3, 2880), (130, 1152)],
                  real=[(32768, 1152), (32768, 2880), (9600, 2304), (7, 5760), (1, 1)])
# Half an ulp of the output dtype, relative. Triton 3.7's interpreter casts float32 to bf16 by truncation
# (the GPU rounds to nearest), which is a whole ulp.
OUT_TOL = {torch.bfloat16: 2.0**-7 if INTERPRET else 2.0**-8, torch.float32: 2e-6}


def _int8(shape, device=DEVICE):
    return torch.randint(-127, 128, shape, dtype=torch.int8, device=device)


def _reference(xq, xs, wq, ws, bias):
    ref = (xq.double() @ wq.double().T) * xs.double()[:, None] * ws.double()[None, :]
    return ref if bias is None else ref + bias.double()


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("shape", GEMM_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_int8_gemm_matches_float64(shape, with_bias, out_dtype):
    M, N, K = shape
    xq, wq = _int8((M, K)), _int8((N, K))
    xs = torch.rand(M, device=DEVICE) * 0.1 + 1e-3
    ws = torch.rand(N, device=DEVICE) * 0.1 + 1e-3
    bias = torch.randn(N, device=DEVICE).to(out_dtype) if with_bias else None
    ref = _reference(xq, xs, wq, ws, bias)
    for name in g.CONFIGS:  # every launch shape on every problem
        out = torch.full((M, N), float("nan"), device=DEVICE, dtype=out_dtype)
        g.int8_matmul(xq, xs, wq, ws, bias, out_dtype, config=g.CONFIGS[name], out=out)
        assert torch.isfinite(out).all(), f"{name}: elements left unwritten"
        # float32 epilogue: a few ulps of the float32 product, then the output rounding
        err = (out.double() - ref).abs()
        bound = (OUT_TOL[out_dtype] + 1e-6) * ref.abs() + 1e-6 * ref.abs().max()
        assert (err <= bound).all(), f"{name}: worst excess {(err - bound).max().item():.3g}"


def test_int8_gemm_default_config_and_checks():
    xq, wq = _int8((40, 64)), _int8((24, 64))
    xs, ws = torch.rand(40, device=DEVICE), torch.rand(24, device=DEVICE)
    out = g.int8_matmul(xq, xs, wq, ws, None, torch.float32)
    assert torch.allclose(out.double(), _reference(xq, xs, wq, ws, None), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="do not fit"):
        g.int8_matmul(xq, xs, _int8((24, 32)), ws)


def _fp8_carry(v: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Where rounding to e4m3 carries into the next binade (124.3 -> 128): Triton 3.7's interpreter drops
    that carry (it returns 64), a bug of its numpy fp8 cast that the GPU does not have."""
    return (ref.float().abs() > v.abs()) & (torch.frexp(ref.float())[0].abs() == 0.5)


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("shape", ROW_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_quantize_rows_matches_reference(shape, fmt):
    x = torch.randn(shape, device=DEVICE) * torch.logspace(-3, 2, shape[0], device=DEVICE)[:, None]
    x[0] = 0  # an all-zero row: zeros and a tiny scale, no NaN
    if ON_GPU:
        x = x.bfloat16()
    q, s = g.quantize_rows(x, fmt)
    qr, sr = g.quantize_rows_reference(x, fmt)
    assert q.dtype == qr.dtype and s.dtype == torch.float32 and q.shape == x.shape
    assert torch.allclose(s, sr, rtol=1e-6, atol=0)
    assert (q[0].float() == 0).all()
    v = x.float() / sr[:, None]  # the value before rounding
    same = q.float() == qr.float()
    if fmt == "fp8" and INTERPRET:
        same |= _fp8_carry(v, qr)
    # x * (qmax / amax) may differ by an ulp between the kernel and torch: a value within that of a rounding
    # boundary may round the other way, one step apart. Nothing else may differ.
    diff = ~same
    assert diff.float().mean().item() < 1e-3
    if diff.any():
        r = qr.float()[diff]
        # one step of the format at r: 1 for int8; for e4m3 2^(exponent - 3), 2^-9 among the subnormals
        step = 1.0 if fmt == "int8" else torch.exp2(torch.floor(torch.log2(r.abs().clamp_min(2.0**-6))) - 3)
        assert ((q.float()[diff] - r).abs() <= step).all()
    # and the dequantised rows are close to x: int8 within half a step, fp8 within 2^-4 relative (3 mantissa bits)
    deq = q.float() * s[:, None]
    if fmt == "int8":
        assert ((deq - x.float()).abs() <= s[:, None] * 0.5001)[same].all()
    else:
        ok = (deq - x.float()).abs() <= x.float().abs() * 2.0**-4 + s[:, None] * 2.0**-9 * 448
        assert (ok | (_fp8_carry(v, qr) if INTERPRET else torch.zeros_like(ok))).all()


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_w8a8_linear_against_float64(fmt):
    """The whole product from float inputs: per-token x per-channel quantisation error only."""
    if fmt == "fp8" and INTERPRET:
        pytest.skip("the fp8 GEMM is cuBLASLt's (torch._scaled_mm): no Triton kernel to interpret; "
                    "tests/test_quant.py runs it on the CPU")
    M, N, K = pick(small=(70, 96, 160), real=(8192, 3456, 1152))
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    x = torch.randn(3, M // 3 + 1, K, device=DEVICE, dtype=dtype)
    w = torch.randn(N, K, device=DEVICE) / K**0.5
    b = torch.randn(N, device=DEVICE, dtype=dtype)
    wq, ws = g.quantize_weight(w, fmt)
    y = g.w8a8_linear(x, wq, ws, b, fmt)
    assert y.shape == (*x.shape[:-1], N) and y.dtype == dtype
    ref = x.double() @ w.double().T + b.double()
    rel = ((y.double() - ref).norm() / ref.norm()).item()
    assert rel < {"int8": 0.012, "fp8": 0.05}[fmt], rel
    # the CPU/PyTorch path computes the same function (quantised operands equal up to boundary roundings)
    x2 = x.reshape(-1, K)
    xq, xs = g.quantize_rows_reference(x2, fmt)
    mm = g.int8_matmul_reference if fmt == "int8" else g.fp8_matmul
    y_ref_path = mm(xq, xs, wq, ws, b, dtype).reshape(y.shape)
    assert ((y.double() - y_ref_path.double()).norm() / ref.norm()).item() < 5e-3


@gpu_only
def test_fp8_gemm_matches_float64():
    M, N, K = 32768, 1152, 2880
    xq = (torch.randn(M, K, device="cuda") * 50).clamp(-448, 448).to(torch.float8_e4m3fn)
    wq = (torch.randn(N, K, device="cuda") * 50).clamp(-448, 448).to(torch.float8_e4m3fn)
    xs, ws = torch.rand(M, device="cuda") * 1e-3, torch.rand(N, device="cuda") * 1e-3
    bias = torch.randn(N, device="cuda", dtype=torch.bfloat16)
    out = g.fp8_matmul(xq, xs, wq, ws, bias, torch.bfloat16)
    ref = _reference(xq.float(), xs, wq.float(), ws, bias)
    assert ((out.double() - ref).norm() / ref.norm()).item() < 4e-3


@gpu_only
def test_launches_skip_the_jit_after_the_first_call():
    xq, wq = _int8((4096, 1152)), _int8((3456, 1152))
    xs, ws = torch.rand(4096, device="cuda"), torch.rand(3456, device="cuda")
    launcher = g._launcher(g._int8_gemm_kernel)
    g.int8_matmul(xq, xs, wq, ws)
    before = launcher.direct
    g.int8_matmul(xq, xs, wq, ws)
    assert launcher.direct == before + 1
