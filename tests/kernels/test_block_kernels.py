"""The Linear DiT block's fused kernels (kernels.adaln: modulate, gated residual, add + modulate;
kernels.mixffn: depthwise GLU) against a float64 reference, forward and backward: on the GPU at real shapes,
on the CPU under Triton's interpreter at small ones (see conftest.py). Also: the custom ops pass
torch.library.opcheck (schema, fake implementation, autograd registration) and compile without graph breaks.
"""
from __future__ import annotations

import pytest
import torch

from kernels.adaln import (
    add_modulate,
    add_modulate_reference,
    gated_residual,
    gated_residual_reference,
    modulate,
    modulate_reference,
    modulate_tee,
)
from kernels.block_backend import resolve_block_backend
from kernels.mixffn import depthwise_glu, depthwise_glu_reference
from tests.kernels.modes import DEVICE, ON_GPU, pick

# These kernels have no tl.dot, so bf16 runs correctly under the interpreter as well.
DTYPES = (torch.bfloat16, torch.float32)
TOL = {torch.bfloat16: 1e-2, torch.float32: 1e-5}
EPS = 1e-6

# (B, N, C) for the AdaLN ops: N = 1, odd token counts and channel counts that are not powers of two.
ADALN_SHAPES = pick(small=[(2, 15, 64), (3, 1, 44), (1, 527, 96), (2, 17 * 31, 24)],
                    real=[(16, 1024, 1152), (8, 1024, 2240), (2, 16384, 1152), (3, 1, 1152), (5, 527, 72)])
# (B, H, W, hid) for the depthwise GLU: odd latent sizes (3x5, 17x11, 17x31), a single token, Sana's real sizes;
# several column strips of 4 (the last one partial) and row bands. The interpreter's shapes are kept small: it
# runs a program's four columns as separate ops (17x31 took a minute a test there).
GLU_SHAPES = pick(small=[(2, 3, 5, 24), (1, 1, 1, 8), (1, 17, 11, 8), (3, 4, 4, 72), (2, 5, 13, 16)],
                  real=[(16, 32, 32, 2880), (8, 32, 32, 5600), (1, 128, 128, 2880), (3, 3, 5, 2880),
                        (2, 17, 31, 72), (2, 1, 1, 2880)])


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(x).all(), "non-finite values (unwritten or overflowed)"
    return ((x.double() - ref).norm() / ref.norm()).item()


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_()


def _check(fast_fn, ref_fn, inputs, dtype):
    """Run fast_fn on inputs and ref_fn on their float64 copies; compare the output and every input gradient."""
    out = fast_fn(*inputs)
    assert out.dtype == inputs[0].dtype
    dy = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, dy)
    ref_in = [_leaf(t.double()) for t in inputs]
    ref = ref_fn(*ref_in)
    ref_grads = torch.autograd.grad(ref, ref_in, dy.double())
    errs = [_rel(out, ref)] + [_rel(g, r) for g, r in zip(grads, ref_grads)]
    for g, t in zip(grads, inputs):
        assert g.shape == t.shape and g.dtype == t.dtype
    assert max(errs) <= TOL[dtype], f"relative errors out and grads {errs}"


def _table(B, C, rows=6):
    """A (B, 6, C) float32 modulation table with the spread of a trained one; chunks are strided views of it."""
    return _leaf(torch.randn(B, rows, C, device=DEVICE) * 0.5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ADALN_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_modulate_matches_float64(shape, dtype):
    B, N, C = shape
    x = _leaf(torch.randn(shape, device=DEVICE).mul(3).add(1).to(dtype))  # off-centre rows: mean matters
    table = _table(B, C)

    def fast(x, table):
        return modulate(x, table[:, 0:1], table[:, 1:2], EPS, backend="triton")

    def ref(x, table):
        return modulate_reference(x, table[:, 0:1], table[:, 1:2], EPS)

    _check(fast, ref, [x, table], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ADALN_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gated_residual_matches_float64(shape, dtype):
    B, N, C = shape
    x, branch = (_leaf(torch.randn(shape, device=DEVICE).to(dtype)) for _ in range(2))
    table = _table(B, C)

    def fast(x, table, branch):
        return gated_residual(x, table[:, 2:3], branch, backend="triton")

    def ref(x, table, branch):
        return gated_residual_reference(x, table[:, 2:3], branch)

    _check(fast, ref, [x, table, branch], dtype)


# the reference adds the bias in the gate's float32 (an output dtype of its own), so it runs float32 only here
@pytest.mark.parametrize("backend,dtype,gate_rows", [("triton", torch.bfloat16, "B"), ("triton", torch.float32, "B"),
                                                     ("triton", torch.float32, "1"), ("torch", torch.float32, "B")],
                         ids=str)
@pytest.mark.parametrize("shape", ADALN_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gated_residual_takes_the_branch_bias_gradient(shape, dtype, gate_rows, backend):
    """branch_bias: the branch GEMM's bias, added into branch with its gradient cut (kernels.linear.linear_bias_out);
    the gated residual gives it the column sums of gate * dy over (B, N) (on Triton a second partial row of the
    backward kernel), as the uncut bias would get them: dx, dgate, dbranch and dbias against float64 autograd of
    x + gate * (branch + bias), with one gate row per image or one broadcast over the batch."""
    B, N, C = shape
    torch.manual_seed(0)
    x, branch = (_leaf(torch.randn(shape, device=DEVICE).to(dtype)) for _ in range(2))
    table = _table(B if gate_rows == "B" else 1, C)
    bias = _leaf(torch.randn(C, device=DEVICE) + 2)  # float32, as the parameter; off zero, so that its sum shows

    def fast(x, table, branch, bias):
        return gated_residual(x, table[:, 2:3], branch + bias.detach().to(dtype), backend=backend, branch_bias=bias)

    def ref(x, table, branch, bias):
        return gated_residual_reference(x, table[:, 2:3], branch + bias)

    _check(fast, ref, [x, table, branch, bias], dtype)


def test_gated_residual_bias_gradient_is_the_kernels_row():
    """The Triton op's dbias is the kernel's second partial row, summed over the batch and the chunks: equal to
    sum_b gate_b * sum_n dy (float32 sums in another order), and without a bias the partial sums are dgate's alone,
    as before."""
    from kernels import triton_adaln

    B, N, C = 3, 37, 24
    torch.manual_seed(0)
    dy, branch = torch.randn(B, N, C, device=DEVICE), torch.randn(B, N, C, device=DEVICE)
    gate = torch.randn(B, 1, C, device=DEVICE)
    dbranch, part = triton_adaln._gated_residual_backward_op(dy, gate, branch, True)
    dbranch0, part0 = triton_adaln._gated_residual_backward_op(dy, gate, branch)
    assert part.dim() == 4 and part.shape[2] == 2 and part0.shape == part[:, :, 0].shape
    assert torch.equal(dbranch, dbranch0) and torch.equal(part[:, :, 0], part0)
    want = (gate.double() * dy.double().sum(1, keepdim=True)).sum((0, 1))
    assert _rel(part[:, :, 1].sum((0, 1)), want) < 1e-6
    assert _rel(part0.sum(1), (dy.double() * branch.double()).sum(1)) < 1e-6


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ADALN_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_add_modulate_matches_float64(shape, dtype):
    """Both outputs (the sum, which the residual stream carries on, and its modulation) with gradients flowing
    into each, so the kernel's added gradient of the sum is checked as well as modulate's."""
    B, N, C = shape
    x = _leaf(torch.randn(shape, device=DEVICE).mul(3).add(1).to(dtype))
    branch = _leaf(torch.randn(shape, device=DEVICE).to(dtype))
    table = _table(B, C)
    inputs = [x, branch, table]
    total, y = add_modulate(x, branch, table[:, 3:4], table[:, 4:5], EPS, backend="triton")
    assert total.dtype == y.dtype == dtype
    d_total, d_y = torch.randn_like(total), torch.randn_like(y)
    grads = torch.autograd.grad((total, y), inputs, (d_total, d_y))
    ref_in = [_leaf(t.double()) for t in inputs]
    ref_total, ref_y = add_modulate_reference(ref_in[0], ref_in[1], ref_in[2][:, 3:4], ref_in[2][:, 4:5], EPS)
    ref_grads = torch.autograd.grad((ref_total, ref_y), ref_in, (d_total.double(), d_y.double()))
    errs = [_rel(total, ref_total), _rel(y, ref_y)] + [_rel(g, r) for g, r in zip(grads, ref_grads)]
    assert all(g.dtype == t.dtype for g, t in zip(grads, inputs))
    assert max(errs) <= TOL[dtype], f"relative errors sum, out and grads {errs}"
    # only the sum differentiated: both inputs get its gradient as it is
    total, _ = add_modulate(x, branch, table[:, 3:4], table[:, 4:5], EPS, backend="triton")
    gx, gb = torch.autograd.grad(total, [x, branch], d_total)
    assert torch.equal(gx, d_total) and torch.equal(gb, d_total)


# the reference modulates in float32 (layer_norm's output times the table's rows), so it runs float32 only here
@pytest.mark.parametrize("backend,dtype,rows", [("triton", torch.bfloat16, "B"), ("triton", torch.float32, "B"),
                                                ("triton", torch.float32, "1"), ("torch", torch.float32, "B")],
                         ids=str)
@pytest.mark.parametrize("shape", ADALN_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_add_modulate_takes_the_branch_bias_gradient(shape, dtype, rows, backend):
    """branch_bias: the branch GEMM's bias (the cross-attention's output projection's), added into branch with its
    gradient cut (kernels.linear.linear_bias_out); add_modulate gives it the column sums over (B, N) of ds, the sum's
    gradient (its own plus modulate's; on Triton a third partial row of the backward kernel), as the uncut bias
    would get them: both outputs and the gradients of x, branch, shift, scale and the bias against float64 autograd
    of s = x + (branch + bias), modulate(s), with one row per image or one broadcast over the batch."""
    B, N, C = shape
    torch.manual_seed(0)
    x = _leaf(torch.randn(shape, device=DEVICE).mul(3).add(1).to(dtype))
    branch = _leaf(torch.randn(shape, device=DEVICE).to(dtype))
    table = _table(B if rows == "B" else 1, C)
    bias = _leaf(torch.randn(C, device=DEVICE) + 2)  # float32, as the parameter; off zero, so that its sum shows
    inputs = [x, branch, table, bias]
    total, y = add_modulate(x, branch + bias.detach().to(dtype), table[:, 3:4], table[:, 4:5], EPS, backend=backend,
                            branch_bias=bias)
    assert total.dtype == y.dtype == dtype
    d_total, d_y = torch.randn_like(total), torch.randn_like(y)
    grads = torch.autograd.grad((total, y), inputs, (d_total, d_y))
    ref_in = [_leaf(t.double()) for t in inputs]
    ref_total, ref_y = add_modulate_reference(ref_in[0], ref_in[1] + ref_in[3], ref_in[2][:, 3:4], ref_in[2][:, 4:5],
                                              EPS)
    ref_grads = torch.autograd.grad((ref_total, ref_y), ref_in, (d_total.double(), d_y.double()))
    errs = [_rel(total, ref_total), _rel(y, ref_y)] + [_rel(g, r) for g, r in zip(grads, ref_grads)]
    assert all(g.shape == t.shape and g.dtype == t.dtype for g, t in zip(grads, inputs))
    assert max(errs) <= TOL[dtype], f"relative errors sum, out and grads x, branch, table, bias {errs}"
    # only the sum differentiated: x and branch get its gradient as it is, the bias its column sums
    total, _ = add_modulate(x, branch + bias.detach().to(dtype), table[:, 3:4], table[:, 4:5], EPS, backend=backend,
                            branch_bias=bias)
    gx, gb, gbias = torch.autograd.grad(total, [x, branch, bias], d_total)
    assert torch.equal(gx, d_total) and torch.equal(gb, d_total) and gbias.dtype == bias.dtype
    assert _rel(gbias, d_total.double().sum((0, 1))) <= 1e-6


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("rows", ["B", "1"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ADALN_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gated_add_modulate_matches_float64(shape, dtype, rows, bias):
    """With a gate, s = x + gate * branch (a block's last gated residual and the next block's first modulate in one
    kernel; sana_core.dit.Residual): both outputs and the gradients of x, branch, the table (shift, scale and the
    gate, one row per image or one broadcast over the batch) and the branch bias, against float64 autograd of the
    unfused ops, with both outputs differentiated, only the sum (the final layer reads only y; this is the other
    way round) and only y."""
    B, N, C = shape
    torch.manual_seed(0)
    x = _leaf(torch.randn(shape, device=DEVICE).mul(3).add(1).to(dtype))
    branch = _leaf(torch.randn(shape, device=DEVICE).to(dtype))
    table = _table(B if rows == "B" else 1, C)
    out_bias = _leaf(torch.randn(C, device=DEVICE) + 2) if bias else None
    inputs = [x, branch, table] + ([out_bias] if bias else [])
    fed = branch + out_bias.detach().to(dtype) if bias else branch  # the bias already in the branch, as bias_out
    d_total, d_y = torch.randn(shape, device=DEVICE).to(dtype), torch.randn(shape, device=DEVICE).to(dtype)
    ref_in = [_leaf(t.double()) for t in inputs]
    ref_branch = ref_in[1] + ref_in[3] if bias else ref_in[1]
    ref_total, ref_y = add_modulate_reference(ref_in[0], ref_branch, ref_in[2][:, 3:4], ref_in[2][:, 4:5], EPS,
                                              gate=ref_in[2][:, 2:3])
    assert torch.equal(ref_total, gated_residual_reference(ref_in[0], ref_in[2][:, 2:3], ref_branch))
    for which in ("both", "sum", "y"):
        total, y = add_modulate(x, fed, table[:, 3:4], table[:, 4:5], EPS, backend="triton", gate=table[:, 2:3],
                                branch_bias=out_bias)
        assert total.dtype == y.dtype == dtype
        outs, refs, douts = {"both": ((total, y), (ref_total, ref_y), (d_total, d_y)),
                             "sum": ((total,), (ref_total,), (d_total,)), "y": ((y,), (ref_y,), (d_y,))}[which]
        grads = torch.autograd.grad(outs, inputs, douts)
        ref_grads = torch.autograd.grad(refs, ref_in, [d.double() for d in douts], retain_graph=True)
        errs = [_rel(total, ref_total), _rel(y, ref_y)] + [_rel(g, r) for g, r in zip(grads, ref_grads)]
        assert all(g.shape == t.shape and g.dtype == t.dtype for g, t in zip(grads, inputs))
        assert max(errs) <= TOL[dtype], f"{which}: relative errors sum, out and grads x, branch, table, bias {errs}"


@pytest.mark.parametrize("with_dres", [True, False], ids=["dres", "no-dres"])
def test_add_modulate_bias_gradient_is_the_kernels_row(with_dres):
    """The Triton backward op's third partial row, program by program: the column sums of the dx it writes (with
    dres, add_modulate's ds; without, modulate's own dx) over that program's tokens (float32 sums in another order);
    with and without the row, dx and the (dshift, dscale) rows are the same, bit for bit."""
    from kernels import triton_adaln
    from kernels.launch import device_index

    B, N, C = 3, 101, 200  # tiles of 8 rows, the last one partial; on the interpreter 3 tiles a chunk, 5 chunks
    torch.manual_seed(0)
    x, dy = torch.randn(B, N, C, device=DEVICE).mul(3).add(1), torch.randn(B, N, C, device=DEVICE)
    dres = torch.randn(B, N, C, device=DEVICE) if with_dres else None
    shift, scale = torch.randn(B, 1, C, device=DEVICE), torch.randn(B, 1, C, device=DEVICE)
    _, mean, rstd = triton_adaln._modulate_op(x, shift, scale, EPS)
    dx, part = triton_adaln._modulate_backward_op(dy, x, scale, mean, rstd, dres, True)
    dx0, part0 = triton_adaln._modulate_backward_op(dy, x, scale, mean, rstd, dres)
    chunks = part.shape[1]
    assert part.shape == (B, chunks, 3, C) and part0.shape == (B, chunks, 2, C) and chunks > 1
    assert torch.equal(dx, dx0) and torch.equal(part[:, :, :2], part0)
    kernel = "modulate_bwd_acc" if with_dres else "modulate_bwd"  # the tiles of each (triton_adaln.CONFIG)
    block_r = triton_adaln._tile(C, kernel)[0]
    per = triton_adaln._reduce_grid(B, N, block_r, device_index(x), kernel)[1] * block_r  # tokens a chunk
    want = torch.stack([dx.double()[:, k * per:(k + 1) * per].sum(1) for k in range(chunks)], 1)  # (B, chunks, C)
    assert _rel(part[:, :, 2], want) < 1e-6


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ADALN_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_modulate_tee_adds_the_residual_gradient_in_its_kernel(shape, dtype):
    """(x, modulate(x)) with the first output read on (as the residual add reads it): x's gradient is the
    residual's plus modulate's, summed inside the backward kernel; against float64 autograd adding the two."""
    B, N, C = shape
    x = _leaf(torch.randn(shape, device=DEVICE).mul(3).add(1).to(dtype))
    table = _table(B, C)
    x2, y = modulate_tee(x, table[:, 0:1], table[:, 1:2], EPS, backend="triton")
    assert y.grad_fn.name() == "_ModulateTeeBackward" and torch.equal(x2, x)
    d_x2, d_y = torch.randn_like(x2), torch.randn_like(y)
    grads = torch.autograd.grad((x2, y), [x, table], (d_x2, d_y))
    ref_in = [_leaf(x.double()), _leaf(table.double())]
    ref_y = modulate_reference(ref_in[0], ref_in[1][:, 0:1], ref_in[1][:, 1:2], EPS)
    ref_grads = torch.autograd.grad((ref_in[0], ref_y), ref_in, (d_x2.double(), d_y.double()))
    errs = [_rel(y, ref_y)] + [_rel(g, r) for g, r in zip(grads, ref_grads)]
    assert grads[0].dtype == dtype and max(errs) <= TOL[dtype], f"relative errors out and grads {errs}"
    # only the passed-on x differentiated: its gradient as it is
    x2, _ = modulate_tee(x, table[:, 0:1], table[:, 1:2], EPS, backend="triton")
    assert torch.equal(torch.autograd.grad(x2, x, d_x2)[0], d_x2)


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("shape", ADALN_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_modulate_quantised_for_w8a8_matches_the_reference_rule(shape, fmt):
    """modulate(quantize=fmt): the float32 rows quantised in the kernel by kernels.int8_gemm's rule (per-token
    absmax scale; int8 rounds half away from zero, fp8 e4m3 to nearest). Codes equal to the rule applied to the
    float64 rows except, rarely, one step at a rounding boundary (the float32 row differs in its last bits)."""
    from kernels.int8_gemm import QuantizedRows, quantize_rows_reference
    from tests.kernels.test_int8_gemm import INTERPRET, _fp8_carry

    B, N, C = shape
    torch.manual_seed(0)
    x = torch.randn(shape, device=DEVICE).mul(3).add(1)
    x = x * torch.logspace(-2, 1, N, device=DEVICE)[None, :, None]  # rows of very different scales
    if ON_GPU:
        x = x.bfloat16()
    table = torch.randn(B, 6, C, device=DEVICE) * 0.5
    shift, scale = table[:, 0:1], table[:, 1:2]
    got = modulate(x, shift, scale, EPS, backend="triton", quantize=fmt)
    assert isinstance(got, QuantizedRows) and got.shape == x.shape and got.dtype == x.dtype and got.fmt == fmt
    y = modulate_reference(x.double(), shift.double(), scale.double(), EPS).reshape(-1, C)
    qr, sr = quantize_rows_reference(y.float(), fmt)
    assert got.q.shape == (B * N, C) and got.q.dtype == qr.dtype and got.scale.dtype == torch.float32
    assert torch.allclose(got.scale, sr, rtol=1e-5, atol=0)
    same = got.q.float() == qr.float()
    if fmt == "fp8" and INTERPRET:
        same |= _fp8_carry(y.float() / sr[:, None], qr)
    diff = ~same
    assert diff.float().mean().item() < 2e-3, diff.float().mean().item()
    if diff.any():
        r = qr.float()[diff]
        step = 1.0 if fmt == "int8" else torch.exp2(torch.floor(torch.log2(r.abs().clamp_min(2.0**-6))) - 3)
        assert ((got.q.float()[diff] - r).abs() <= step).all()
    # the same rows through the reference path (PyTorch modulate, then the quantisation pass)
    ref = modulate(x, shift, scale, EPS, backend="torch", quantize=fmt)
    assert isinstance(ref, QuantizedRows) and ref.shape == x.shape and ref.q.dtype == qr.dtype
    deq, deq_ref = got.q.float() * got.scale[:, None], ref.q.float() * ref.scale[:, None]
    assert _rel(deq, deq_ref.double()) < (0.02 if fmt == "int8" else 0.06)


@pytest.fixture
def split_rows(monkeypatch):
    """Every modulate kernel at one row a tile, the row split into a power of two and a tail tile
    (triton_adaln._columns); the configured tiles split only rows wider than ELEMENTS, Sana's."""
    from kernels import triton_adaln

    for k in ("modulate_fwd", "modulate_bwd", "modulate_bwd_acc"):
        monkeypatch.setitem(triton_adaln.CONFIG, k, dict(triton_adaln.CONFIG[k], ELEMENTS=1, SPLIT=True))
    return triton_adaln


@pytest.mark.parametrize("shape", [(2, 15, 44), (1, 33, 88), (2, 7, 24)], ids=lambda s: "x".join(map(str, s)))
def test_modulate_rows_split_in_two_tiles_match_float64(shape, split_rows):
    """The modulate kernels with each row as two column tiles (a tail partly masked at 44 = 32 + 16 and
    88 = 64 + 32, exact at 24 = 16 + 8): forward, quantised forward, and the backward plain, with the residual's
    gradient added and with the branch bias's row, all against float64 as at the configured tiles."""
    assert split_rows._columns(shape[2], 1, "modulate_fwd")[1] > 0
    assert split_rows._columns(2240, 1, "modulate_bwd") == (2048, 256)
    assert split_rows._columns(1152, 1, "modulate_bwd") == (1024, 128)
    assert split_rows._columns(1152, 2, "modulate_bwd") == (2048, 0)  # rows sharing a tile stay whole
    assert split_rows._columns(200, 1, "modulate_bwd") == (256, 0)  # 128 + 128 would mask as many lanes
    for dtype in DTYPES:
        test_modulate_matches_float64(shape, dtype)
        test_add_modulate_matches_float64(shape, dtype)
        test_gated_add_modulate_matches_float64(shape, dtype, "B", True)
        test_modulate_tee_adds_the_residual_gradient_in_its_kernel(shape, dtype)
    test_add_modulate_takes_the_branch_bias_gradient(shape, torch.float32, "B", "triton")
    for fmt in ("int8", "fp8"):
        test_modulate_quantised_for_w8a8_matches_the_reference_rule(shape, fmt)


def test_adaln_ops_broadcast_one_row_over_the_batch():
    """shift/scale/gate of batch 1, as (1, C) rows: the gradient sums over the batch."""
    x = _leaf(torch.randn(3, 10, 48, device=DEVICE))
    rows = _leaf(torch.randn(3, 48, device=DEVICE))

    def fast(x, rows):
        return gated_residual(modulate(x, rows[0:1], rows[1:2], EPS, backend="triton"), rows[2:3], x,
                              backend="triton")

    def ref(x, rows):
        return gated_residual_reference(modulate_reference(x, rows[0:1], rows[1:2], EPS), rows[2:3], x)

    _check(fast, ref, [x, rows], torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", GLU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_depthwise_glu_matches_float64(shape, dtype):
    B, H, W, hid = shape
    u = _leaf(torch.randn(B, H * W, 2 * hid, device=DEVICE).to(dtype))
    weight = _leaf(torch.randn(2 * hid, 1, 3, 3, device=DEVICE) / 3)
    bias = _leaf(torch.randn(2 * hid, device=DEVICE))

    def fast(u, weight, bias):
        return depthwise_glu(u, weight, bias, (H, W), backend="triton")

    def ref(u, weight, bias):
        return depthwise_glu_reference(u, weight, bias, (H, W))

    _check(fast, ref, [u, weight, bias], dtype)


# the reference conv needs its input in the weights' dtype (autocast casts them in the model)
@pytest.mark.parametrize("backend,dtype", [("triton", torch.bfloat16), ("triton", torch.float32),
                                           ("torch", torch.float32)], ids=str)
@pytest.mark.parametrize("shape", GLU_SHAPES[:3], ids=lambda s: "x".join(map(str, s)))
def test_depthwise_glu_takes_the_expansion_bias_gradient(shape, dtype, backend):
    """in_bias: the expansion GEMM's bias, added into u with its gradient cut (kernels.linear.linear_bias_out);
    the GLU gives it du's column sums (on Triton a tenth partial row of the du kernel), as the uncut bias would
    get them, against float64."""
    B, H, W, hid = shape
    u0 = _leaf(torch.randn(B, H * W, 2 * hid, device=DEVICE).to(dtype))
    weight = _leaf(torch.randn(2 * hid, 1, 3, 3, device=DEVICE) / 3)
    bias = _leaf(torch.randn(2 * hid, device=DEVICE))
    in_bias = _leaf(torch.randn(2 * hid, device=DEVICE))  # float32, as the parameter

    def fast(u0, weight, bias, in_bias):
        u = u0 + in_bias.detach().to(u0.dtype)
        return depthwise_glu(u, weight, bias, (H, W), backend=backend, in_bias=in_bias)

    def ref(u0, weight, bias, in_bias):
        return depthwise_glu_reference(u0 + in_bias, weight, bias, (H, W))

    _check(fast, ref, [u0, weight, bias, in_bias], dtype)


def test_depthwise_glu_shapes_cover_strips_and_bands():
    """The kernels split an image into column strips and row bands (each with halo rows); the shapes above
    must exercise both splits, or a seam bug would go unseen."""
    from kernels.triton_mixffn import CONFIG, _plan

    dev = 0 if ON_GPU else -1
    plans = [(_plan(B, H, W, hid, CONFIG[k], dev), B, H, W) for B, H, W, hid in GLU_SHAPES for k in CONFIG]
    assert any(p["scalars"][0] > 1 for p, *_ in plans), "no shape has two column strips"
    assert any(p["scalars"][1] < H for p, B, H, W in plans), "no shape has two row bands"


def test_depthwise_glu_is_local_and_zero_padded():
    """One hot token: the output is nonzero exactly on its 3x3 neighbourhood, clipped at the image edge
    (checks the grid order H-major and that no tap wraps around a row end)."""
    B, H, W, hid = 2, 4, 5, 4
    u = torch.full((B, H * W, 2 * hid), -30.0, device=DEVICE)  # silu(-30) ~ 0
    u[1, 0 * W + 4] = 3.0  # top-right corner of image 1
    weight = torch.ones(2 * hid, 1, 3, 3, device=DEVICE)
    bias = torch.zeros(2 * hid, device=DEVICE)
    out = depthwise_glu(u, weight, bias, (H, W), backend="triton")
    live = out.abs().amax(-1) > 1e-6
    expected = torch.zeros(B, H, W, dtype=torch.bool, device=DEVICE)
    expected[1, 0:2, 3:5] = True
    assert torch.equal(live.view(B, H, W), expected)


def test_custom_ops_pass_opcheck():
    """Schema, fake (meta) implementations and the autograd registrations, as torch.compile needs them."""
    import kernels.triton_adaln  # noqa: F401 - registers the ops
    import kernels.triton_mixffn  # noqa: F401

    B, H, W, C = 2, 3, 5, 16
    x = _leaf(torch.randn(B, H * W, C, device=DEVICE))
    table = torch.randn(B, 6, C, device=DEVICE)
    shift, scale, gate = (_leaf(table[:, i:i + 1].clone()) for i in range(3))
    # x as the patch embedding gives it: a transposed (B, N, C) view; outputs are contiguous all the same
    xt = _leaf(torch.randn(B, C, H * W, device=DEVICE)).transpose(1, 2)
    for xin in (x, xt):
        torch.library.opcheck(torch.ops.sana.modulate, (xin, shift, scale, EPS))
        torch.library.opcheck(torch.ops.sana.gated_residual, (xin, gate, _leaf(torch.randn(B, H * W, C, device=DEVICE))))
        torch.library.opcheck(torch.ops.sana.gated_residual, (xin, gate, _leaf(torch.randn(B, H * W, C, device=DEVICE)),
                                                              _leaf(torch.randn(C, device=DEVICE))))
        torch.library.opcheck(torch.ops.sana.add_modulate,
                              (xin, _leaf(torch.randn(B, H * W, C, device=DEVICE)), shift, scale, EPS))
        torch.library.opcheck(torch.ops.sana.add_modulate,
                              (xin, _leaf(torch.randn(B, H * W, C, device=DEVICE)), shift, scale, EPS,
                               _leaf(torch.randn(C, device=DEVICE))))
        for out_bias in (None, _leaf(torch.randn(C, device=DEVICE))):  # with a gate
            torch.library.opcheck(torch.ops.sana.add_modulate,
                                  (xin, _leaf(torch.randn(B, H * W, C, device=DEVICE)), shift, scale, EPS, out_bias,
                                   gate))
    for bias_sum in (False, True):  # the backward ops: their partial sums' shapes in the fake implementations
        torch.library.opcheck(torch.ops.sana.gated_residual_backward,
                              (torch.randn(B, H * W, C, device=DEVICE), gate.detach(),
                               torch.randn(B, H * W, C, device=DEVICE), bias_sum))
        _, mean, rstd = torch.ops.sana.modulate(x.detach(), shift.detach(), scale.detach(), EPS)
        for dres in (None, torch.randn(B, H * W, C, device=DEVICE)):
            torch.library.opcheck(torch.ops.sana.modulate_backward,
                                  (torch.randn(B, H * W, C, device=DEVICE), x.detach(), scale.detach(), mean, rstd,
                                   dres, bias_sum))
    u = _leaf(torch.randn(B, H * W, 2 * C, device=DEVICE))
    weight, bias = _leaf(torch.randn(2 * C, 1, 3, 3, device=DEVICE)), _leaf(torch.randn(2 * C, device=DEVICE))
    torch.library.opcheck(torch.ops.sana.depthwise_glu, (u, weight, bias, None, H, W))
    torch.library.opcheck(torch.ops.sana.depthwise_glu, (u, weight, bias, _leaf(torch.randn(2 * C, device=DEVICE)), H, W))
    for fmt in ("int8", "fp8"):  # inference only: no autograd
        torch.library.opcheck(torch.ops.sana.modulate_quant, (x.detach(), shift.detach(), scale.detach(), EPS, fmt))


def test_compiles_without_graph_breaks():
    """A block-shaped function of all the ops under torch.compile(fullgraph=True) equals eager, grads too."""
    B, H, W, C = 2, 3, 5, 16
    torch.manual_seed(0)
    x = _leaf(torch.randn(B, H * W, C, device=DEVICE))
    table = _leaf(torch.randn(B, 6, C, device=DEVICE))
    weight, bias = _leaf(torch.randn(2 * C, 1, 3, 3, device=DEVICE)), _leaf(torch.randn(2 * C, device=DEVICE))
    out_bias, mid_bias = _leaf(torch.randn(C, device=DEVICE)), _leaf(torch.randn(C, device=DEVICE))
    # a linear's scale: unscaled, the GLU's inputs reach the float32 exp's overflow (a warning on the interpreter)
    lin = torch.randn(C, 2 * C, device=DEVICE) / C**0.5

    def f(x, table, weight, bias, out_bias, mid_bias):
        h = modulate(x, table[:, 0:1], table[:, 1:2], EPS, backend="triton") @ lin
        h = depthwise_glu(h, weight, bias, (H, W), backend="triton")
        x2, h2 = add_modulate(x, h + mid_bias.detach(), table[:, 3:4], table[:, 4:5], EPS, backend="triton",
                              branch_bias=mid_bias)
        x3 = gated_residual(x2, table[:, 2:3], h2 + out_bias.detach(), backend="triton", branch_bias=out_bias)
        # the gated add + modulate (sana_core.dit.Residual's)
        s, y = add_modulate(x3, h2, table[:, 0:1], table[:, 5:6], EPS, backend="triton", gate=table[:, 2:3])
        return s + y

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="inductor" if ON_GPU else "aot_eager")
    inputs = (x, table, weight, bias, out_bias, mid_bias)
    eager_out, comp_out = f(*inputs), compiled(*inputs)
    eager_grads = torch.autograd.grad(eager_out.square().sum(), inputs)
    comp_grads = torch.autograd.grad(comp_out.square().sum(), inputs)
    assert _rel(comp_out, eager_out.double()) <= 1e-6
    for a, b in zip(comp_grads, eager_grads):
        assert _rel(a, b.double()) <= 1e-6


def test_bad_inputs_fail_with_one_clear_line():
    u = torch.randn(2, 15, 8, device=DEVICE)
    with pytest.raises(ValueError, match="15 tokens do not make a 4x4 grid"):
        depthwise_glu(u, torch.randn(8, 1, 3, 3, device=DEVICE), torch.randn(8, device=DEVICE), (4, 4),
                      backend="triton")
    with pytest.raises(ValueError, match=r"weight \(8, 1, 3, 3\)"):
        depthwise_glu(u, torch.randn(8, 3, 3, device=DEVICE), torch.randn(8, device=DEVICE), (3, 5))
    with pytest.raises(ValueError, match="modulate shift must be"):
        modulate(u, torch.randn(3, 1, 8, device=DEVICE), torch.randn(2, 1, 8, device=DEVICE), EPS,
                 backend="triton")
    with pytest.raises(ValueError, match=r"add_modulate: branch_bias must be \(8,\)"):
        add_modulate(u, u, torch.randn(2, 1, 8, device=DEVICE), torch.randn(2, 1, 8, device=DEVICE), EPS,
                     backend="triton", branch_bias=torch.randn(1, 8, device=DEVICE))
    with pytest.raises(ValueError, match="block backend must be one of"):
        resolve_block_backend(u, "cuda")


def test_eager_calls_match_the_dispatched_ops():
    """Eager calls skip the dispatcher (kernels.launch.KernelOp): the same outputs and gradients, bit for bit, as
    the torch.library ops that torch.compile traces."""
    from kernels import triton_adaln, triton_mixffn

    B, H, W, C = 2, 3, 5, 24
    x = _leaf(torch.randn(B, H * W, C, device=DEVICE))
    rows = _table(B, C)
    u = _leaf(torch.randn(B, H * W, 2 * C, device=DEVICE))
    weight = _leaf(torch.randn(2 * C, 1, 3, 3, device=DEVICE) / 3)
    bias = _leaf(torch.randn(2 * C, device=DEVICE))
    in_bias = _leaf(torch.randn(2 * C, device=DEVICE))
    branch = _leaf(torch.randn(B, H * W, C, device=DEVICE))
    out_bias = _leaf(torch.randn(C, device=DEVICE))
    cases = [(triton_adaln._modulate_op, torch.ops.sana.modulate, (x, rows, EPS), (x, rows)),
             (triton_adaln._gated_residual_op, torch.ops.sana.gated_residual, (x, rows, branch), (x, rows, branch)),
             (triton_adaln._gated_residual_op, torch.ops.sana.gated_residual, (x, rows, branch, out_bias),
              (x, rows, branch, out_bias)),
             (triton_mixffn._depthwise_glu_op, torch.ops.sana.depthwise_glu, (u, weight, bias, in_bias, H, W),
              (u, weight, bias, in_bias)),
             (triton_adaln._add_modulate_op, torch.ops.sana.add_modulate, (x, branch, rows, EPS), (x, branch, rows)),
             (triton_adaln._add_modulate_op, torch.ops.sana.add_modulate, (x, branch, rows, EPS, out_bias),
              (x, branch, rows, out_bias)),
             (triton_adaln._add_modulate_op, torch.ops.sana.add_modulate, (x, branch, rows, EPS, out_bias, True),
              (x, branch, rows, out_bias))]
    views = {triton_adaln._modulate_op: lambda x, rows, eps: (x, rows[:, 0:1], rows[:, 1:2], eps),
             triton_adaln._gated_residual_op: lambda x, rows, br, *ob: (x, rows[:, 2:3], br, *ob),
             triton_adaln._add_modulate_op: lambda x, br, rows, eps, *ob: (
                 x, br, rows[:, 3:4], rows[:, 4:5], eps, *ob[:1], *((rows[:, 2:3],) if ob[1:] else ()))}
    for eager, op, args, tensors in cases:
        outs = []
        for fn in (eager, op):
            out = fn(*views.get(eager, lambda *a: a)(*args))  # the table's rows sliced afresh for each call
            out = out[1] if eager is triton_adaln._add_modulate_op else out[0] if isinstance(out, tuple) else out
            dy = torch.ones_like(out).cumsum(-1) / out.shape[-1]
            outs.append((out.detach(), torch.autograd.grad(out, tensors, dy), type(out.grad_fn).__name__))
        (o1, g1, via1), (o2, g2, via2) = outs
        assert via1 == "_EagerBackward" and via2 != via1, (via1, via2)
        assert torch.equal(o1, o2), op
        for a, b in zip(g1, g2):
            assert torch.equal(a, b), op
