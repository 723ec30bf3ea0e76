"""Fused Triton depthwise-GLU of Mix-FFN in token layout (see kernels.mixffn), forward and backward, as
torch.library custom ops with fake implementations.

u is (B*N, 2*hid) row-major, N = H*W tokens in grid order: a token's channels are contiguous. A program owns
a strip of one image (some columns x BLOCK_C channels) and walks down a band of its rows, one image row an
iteration, keeping the three output rows that the loaded input row feeds in registers (a sliding window over
rows), so each input row is read once from HBM. The forward and the first backward kernel (_conv_glu) hold
their COLS = 4 output columns as separate vectors and load the six input columns a row step needs once each:
the horizontal shifts (j-1, j, j+1) are other variables, so every loaded element gets one SiLU. The second
backward kernel (_bwd_input) has the same layout.

How they got here (Sana-0.6B's batch-16 shape on the H200, ms a block): the first version loaded a tile at all
nine taps (0.28 forward, 1.1 backward). The sliding window over rows with a tile's offsets and shift masks
computed once a program (per-element 64-bit index arithmetic at every load was most of the instructions): 0.20
forward, 0.28 + 0.42 backward. The row loop as a Triton software pipeline (tl.range num_stages: the next rows'
loads are async copies into shared memory while a row is computed; one row in flight a program, at few
programs an SM for their registers, had left HBM at a third of its bandwidth): 0.165, 0.25 + 0.355. The SASS of
an offline sm_90 compile then showed the tile kernels bound by instruction issue (355 instructions a row step
for 4 outputs a thread; 28 of them tanh, which share a quarter-rate unit): the SiLU at each of three shifted
loads was a third of it, and `acc + (l0 k0 + l1 k1 + l2 k2)` a multiply, two FMAs and an add where a chain from
acc is three FMAs. Chained FMAs, x sigmoid(x) as h + h tanh(h) and the column-vector _conv_glu: 59 instructions
an output instead of 89 (forward), 79 instead of 102 (backward conv); measured in bench/NOTES_block_fastpath.md.
Tried and dropped: taking the j +- 1 shifts from the center tile with tl.gather plus two halo columns (twice as
slow: 0.31 ms forward); the loads' SiLU two bf16 at a time (tanh.approx.bf16x2: ptxas splits it into two
scalar tanh ops, so 327 -> 320 instructions a step, not worth a second code path).
Outside the image the taps read zero (zero padding; silu(0) = 0, so padding before or after the SiLU is the
same).

The SiLU of u is taken at the loads (in _conv_glu once an element, 1.5 times with the halo columns; it was
three times, one per horizontal shift, in the tile kernel these measurements come from), so the op is one
kernel and nothing but u is saved for backward. With the exact SiLU (an exp and a division: two special-function
ops) that lost to a PyTorch silu pass plus a kernel reading s (the loads' special-function throughput is the
limit: 0.33 ms against 0.16 + 0.12; first measured in 6e70ef5 at 0.46-0.59 ms); with x sigmoid(x) as
0.5 x (1 + tanh(x / 2)) on the GPU's tanh.approx (one special-function op) it wins: 0.208 ms forward against
0.277, backward 0.272 against 0.257 at Sana-0.6B's batch-16 shape on the H200, and 5 GB less saved
activation over the model's 28 blocks (bench/results/mixffn_h200_silu_in.json; as the op now runs,
mixffn_h200_silu_loads.json: 0.205 ms forward; `python bench/bench_mixffn.py`). tanh.approx has a relative
error of 2^-11, so silu's absolute error is at most 2.5e-4 |x|: below the bf16 rounding of a value of u's size,
which the reference's bf16 s carries; float32 inputs (and the interpreter, which has no inline PTX) get the
exact form. The gate's sigmoid and backward's sigmoid of u use it as well (bwd_input 0.348 -> 0.317 ms, bwd_conv
0.263 -> 0.252, forward unchanged: bench/results/mixffn_h200_tanh_sigmoid.json).

    forward    u -> out = a * silu(g),  a = conv(silu(u_a)) + bias_a, g = conv(silu(u_g)) + bias_g
    backward 1 u, dout -> dc = (da, dg) (the conv outputs' gradient, recomputing a and g), partial dbias
    backward 2 dc, u -> du = (sum_k w[k] * dc[t - off_k]) * silu'(u[t]), and from the same loads partial
               dweight[k] = sum_t dc[t - off_k] * silu(u[t]) (silu and silu' from one sigmoid of u)

The partial sums (one row per (image, column strip, row band)) are summed afterwards: deterministic, no
atomics.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.launch import (
    INTERPRET,
    Launcher,
    cdiv,
    device_index,
    kernel_op,
    on_current_device,
    partial_sums,
    sm_count,
    supported_device,
)

# COLS columns x BLOCK_C channels a program (BLOCK_C / (32 num_warps) channels a thread); PROGRAMS_PER_SM: enough
# row bands that the grid has about this many programs an SM (a band costs two halo rows, so fewer, longer bands
# where the grid is already full); STAGES: see _conv_glu. The best of a checked sweep on the H100 at Sana-0.6B's
# batch-16 shape (`python bench/bench_mixffn.py --sweep`, bench/results/mixffn_h100_cols.json, which also lists
# each configuration's registers and spills): forward 0.149 ms, backward 0.223 + 0.296 ms a block (HBM
# rooflines at the H100's measured copy bandwidth 0.098, 0.163, 0.195). Two channels a thread at 4 warps beat
# one (BLOCK_C 128) and 8 warps (BLOCK_C 256 or 512) at every stage count.
CONFIG = {
    "fwd": {"BLOCK_C": 256, "num_warps": 4, "PROGRAMS_PER_SM": 4, "STAGES": 3},
    "bwd_conv": {"BLOCK_C": 256, "num_warps": 4, "PROGRAMS_PER_SM": 2, "STAGES": 4},
    "bwd_input": {"BLOCK_C": 256, "num_warps": 4, "PROGRAMS_PER_SM": 4, "STAGES": 3},
}


COLS = 4  # output columns a program computes (written out in the kernels: one variable each)
COLS_: tl.constexpr = tl.constexpr(COLS)  # the same, as the kernels read it
SIGMOID_FAST = not INTERPRET  # tanh.approx for 16-bit inputs on the GPU; see _sigmoid and the module docstring


@triton.jit
def _tanh_approx(x):
    """The GPU's tanh.approx.f32: one special-function op, relative error 2^-11."""
    return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _sigmoid(x, FAST: tl.constexpr):
    """sigmoid(x) in float32. FAST: as 0.5 + 0.5 tanh(x / 2) with the GPU's tanh.approx (one special-function
    op instead of an exp and a division; |error| <= 2.5e-4)."""
    if FAST:
        return 0.5 + 0.5 * _tanh_approx(x * 0.5)
    else:
        return tl.sigmoid(x)


@triton.jit
def _silu(x, FAST: tl.constexpr):
    """x sigmoid(x). FAST: as h + h tanh(h), h = x / 2: three instructions (a multiply, the tanh, an FMA) where
    x * sigmoid(x) takes four. The kernels are bound by instruction issue (bench/sass_mixffn.py), so an
    instruction an element is worth taking."""
    if FAST:
        h = x * 0.5
        return h + h * _tanh_approx(h)
    else:
        return x * tl.sigmoid(x)


@triton.jit
def _rowp(ptr, b, r, H, W, stride):
    """Pointer to the first channel of row r of image b (int64: no overflow at large batches)."""
    return ptr + ((b * H + r) * W).to(tl.int64) * stride


@triton.jit
def _taps(wt_ptr, c, cmask, C2):
    """The nine taps' weights of channels c, float32. wt is the weight transposed to (9, C2): a tap's weights
    for a block of channels are one contiguous load (the (C2, 9) layout made each a 36-byte-strided gather)."""
    w = wt_ptr + c
    return (tl.load(w, mask=cmask, other=0.0).to(tl.float32),
            tl.load(w + C2, mask=cmask, other=0.0).to(tl.float32),
            tl.load(w + 2 * C2, mask=cmask, other=0.0).to(tl.float32),
            tl.load(w + 3 * C2, mask=cmask, other=0.0).to(tl.float32),
            tl.load(w + 4 * C2, mask=cmask, other=0.0).to(tl.float32),
            tl.load(w + 5 * C2, mask=cmask, other=0.0).to(tl.float32),
            tl.load(w + 6 * C2, mask=cmask, other=0.0).to(tl.float32),
            tl.load(w + 7 * C2, mask=cmask, other=0.0).to(tl.float32),
            tl.load(w + 8 * C2, mask=cmask, other=0.0).to(tl.float32))


@triton.jit
def _mix(acc, l0, l1, l2, k0, k1, k2):
    """acc plus one kernel row (taps k0, k1, k2) applied to three horizontal shifts l0, l1, l2 (columns j-1, j,
    j+1), written as a chain from acc so that it compiles to three FMAs (acc + (l0 k0 + l1 k1 + l2 k2) was a
    multiply, two FMAs and an add)."""
    return acc + l0.to(tl.float32) * k0 + l1.to(tl.float32) * k1 + l2.to(tl.float32) * k2


@triton.jit
def _mix0(l0, l1, l2, k0, k1, k2):
    """One kernel row applied to three horizontal shifts, from nothing (see _mix)."""
    return l0.to(tl.float32) * k0 + l1.to(tl.float32) * k1 + l2.to(tl.float32) * k2


@triton.jit
def _strip_start(H, n_wseg, band, cols):
    """This program's image b, first column j0 (of `cols`) and row band [r0, r1) from program_id(1)."""
    pid = tl.program_id(1)
    n_bands = tl.cdiv(H, band)
    b = (pid // (n_wseg * n_bands)).to(tl.int64)
    rest = pid % (n_wseg * n_bands)
    r0 = (rest % n_bands) * band
    return b, (rest // n_bands) * cols, r0, tl.minimum(r0 + band, H)


@triton.jit
def _feed(l0, l1, l2, k0, k1, k2, k3, k4, k5, k6, k7, k8, acc_p, acc_c, bias):
    """Feed input row r (three shifts) into the window: -> (row r-1 complete, row r, row r+1 started from the
    bias); an input row r feeds output row r - di through kernel row di + 1."""
    return (_mix(acc_p, l0, l1, l2, k6, k7, k8), _mix(acc_c, l0, l1, l2, k3, k4, k5),
            _mix(bias, l0, l1, l2, k0, k1, k2))


@triton.jit
def _load_silu(row, j, W, stride, m, FAST: tl.constexpr):
    """silu(u) at column j of a row (`row` points at its first token's channels), zero outside the image."""
    x = tl.load(row + j * stride, mask=m & (j >= 0) & (j < W), other=0.0)
    return _silu(x.to(tl.float32), FAST)


@triton.jit
def _glu_out(out_ptr, b, ro, j, H, W, HID, c, m, a, g, FAST: tl.constexpr):
    """out = a * silu(g) at (row ro, column j)."""
    p = _rowp(out_ptr, b, ro, H, W, HID) + j * HID + c
    tl.store(p, (a * _silu(g, FAST)).to(out_ptr.dtype.element_ty), mask=m & (j < W))


@triton.jit
def _glu_grad(dout_ptr, dc_ptr, b, ro, j, H, W, HID, c, m, a, g, db_a, db_g, FAST: tl.constexpr):
    """dc = (da, dg) at (row ro, column j) from dout; -> the dbias sums with them added (zero where masked: dout
    reads zero there)."""
    mj = m & (j < W)
    d = tl.load(_rowp(dout_ptr, b, ro, H, W, HID) + j * HID + c, mask=mj, other=0.0).to(tl.float32)
    sg = _sigmoid(g, FAST)
    grad_a = d * g * sg
    grad_g = d * a * sg * (1.0 + g * (1.0 - sg))
    p = _rowp(dc_ptr, b, ro, H, W, 2 * HID) + j * (2 * HID) + c
    tl.store(p, grad_a.to(dc_ptr.dtype.element_ty), mask=mj)
    tl.store(p + HID, grad_g.to(dc_ptr.dtype.element_ty), mask=mj)
    return db_a + grad_a, db_g + grad_g


@triton.jit
def _conv_glu(u_ptr, w_ptr, bias_ptr, dout_ptr, out_ptr, part_ptr, H, W, HID, n_wseg, band,
              BLOCK_C: tl.constexpr, BACKWARD: tl.constexpr, STAGES: tl.constexpr, FAST: tl.constexpr):
    """a = conv(silu(u_a)) + bias_a, g = conv(silu(u_g)) + bias_g over this program's COLS = 4 columns and rows,
    then forward (BACKWARD False): out = a * silu(g), (B*N, HID);
    backward: dc = (da, dg) from dout into out (B*N, 2*HID), and this program's partial dbias row.

    A program holds its four output columns as separate (BLOCK_C,) vectors (a thread: a few channels of every
    column) and reads the six input columns j0-1 .. j0+4 of each row once: the horizontal shifts of a kernel row
    are other variables, not other loads, so each loaded element gets one SiLU (1.5 a row's output instead of
    the three of a (columns x channels) tile, whose j +- 1 shifts are other threads' data and were loaded and
    activated again). The kernel is bound by instruction issue, and the SiLUs were a third of it.
    STAGES: Triton's software pipeline over the row loop (tl.range num_stages): the loads of the next STAGES - 1
    rows are in flight (async copies into shared memory) while a row is computed. The tap weights are loaded
    once a program (18 registers for each channel a thread holds)."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < HID
    b, j0, r0, r1 = _strip_start(H, n_wseg, band, COLS_)
    C2 = 2 * HID
    a0, a1, a2, a3, a4, a5, a6, a7, a8 = _taps(w_ptr, c, cmask, C2)
    g0, g1, g2, g3, g4, g5, g6, g7, g8 = _taps(w_ptr + HID, c, cmask, C2)
    bias_a = tl.load(bias_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    bias_g = tl.load(bias_ptr + HID + c, mask=cmask, other=0.0).to(tl.float32)
    z = tl.zeros((BLOCK_C,), dtype=tl.float32)
    # the window, per output column q: rows r-1 (p*) and r (c*) of a and g
    pa0, pa1, pa2, pa3, ca0, ca1, ca2, ca3 = z, z, z, z, z, z, z, z
    pg0, pg1, pg2, pg3, cg0, cg1, cg2, cg3 = z, z, z, z, z, z, z, z
    db_a, db_g = z, z  # dbias, summed over the program's tokens
    for r in tl.range(r0 - 1, r1 + 1, num_stages=STAGES):  # input row r completes output row r - 1
        m = cmask & (r >= 0) & (r < H)
        row = _rowp(u_ptr, b, r, H, W, C2) + c
        # input columns j0 - 1 + i, their SiLU once; silu(0) = 0 keeps the zero padding
        xa0 = _load_silu(row, j0 - 1, W, C2, m, FAST)
        xa1 = _load_silu(row, j0, W, C2, m, FAST)
        xa2 = _load_silu(row, j0 + 1, W, C2, m, FAST)
        xa3 = _load_silu(row, j0 + 2, W, C2, m, FAST)
        xa4 = _load_silu(row, j0 + 3, W, C2, m, FAST)
        xa5 = _load_silu(row, j0 + 4, W, C2, m, FAST)
        xg0 = _load_silu(row + HID, j0 - 1, W, C2, m, FAST)
        xg1 = _load_silu(row + HID, j0, W, C2, m, FAST)
        xg2 = _load_silu(row + HID, j0 + 1, W, C2, m, FAST)
        xg3 = _load_silu(row + HID, j0 + 2, W, C2, m, FAST)
        xg4 = _load_silu(row + HID, j0 + 3, W, C2, m, FAST)
        xg5 = _load_silu(row + HID, j0 + 4, W, C2, m, FAST)
        # output column q reads input columns q, q + 1, q + 2 (j - 1, j, j + 1)
        oa0, ca0, na0 = _feed(xa0, xa1, xa2, a0, a1, a2, a3, a4, a5, a6, a7, a8, pa0, ca0, bias_a)
        oa1, ca1, na1 = _feed(xa1, xa2, xa3, a0, a1, a2, a3, a4, a5, a6, a7, a8, pa1, ca1, bias_a)
        oa2, ca2, na2 = _feed(xa2, xa3, xa4, a0, a1, a2, a3, a4, a5, a6, a7, a8, pa2, ca2, bias_a)
        oa3, ca3, na3 = _feed(xa3, xa4, xa5, a0, a1, a2, a3, a4, a5, a6, a7, a8, pa3, ca3, bias_a)
        og0, cg0, ng0 = _feed(xg0, xg1, xg2, g0, g1, g2, g3, g4, g5, g6, g7, g8, pg0, cg0, bias_g)
        og1, cg1, ng1 = _feed(xg1, xg2, xg3, g0, g1, g2, g3, g4, g5, g6, g7, g8, pg1, cg1, bias_g)
        og2, cg2, ng2 = _feed(xg2, xg3, xg4, g0, g1, g2, g3, g4, g5, g6, g7, g8, pg2, cg2, bias_g)
        og3, cg3, ng3 = _feed(xg3, xg4, xg5, g0, g1, g2, g3, g4, g5, g6, g7, g8, pg3, cg3, bias_g)
        ro = r - 1
        mo = cmask & (ro >= r0)
        if BACKWARD:
            db_a, db_g = _glu_grad(dout_ptr, out_ptr, b, ro, j0, H, W, HID, c, mo, oa0, og0, db_a, db_g, FAST)
            db_a, db_g = _glu_grad(dout_ptr, out_ptr, b, ro, j0 + 1, H, W, HID, c, mo, oa1, og1, db_a, db_g, FAST)
            db_a, db_g = _glu_grad(dout_ptr, out_ptr, b, ro, j0 + 2, H, W, HID, c, mo, oa2, og2, db_a, db_g, FAST)
            db_a, db_g = _glu_grad(dout_ptr, out_ptr, b, ro, j0 + 3, H, W, HID, c, mo, oa3, og3, db_a, db_g, FAST)
        else:
            _glu_out(out_ptr, b, ro, j0, H, W, HID, c, mo, oa0, og0, FAST)
            _glu_out(out_ptr, b, ro, j0 + 1, H, W, HID, c, mo, oa1, og1, FAST)
            _glu_out(out_ptr, b, ro, j0 + 2, H, W, HID, c, mo, oa2, og2, FAST)
            _glu_out(out_ptr, b, ro, j0 + 3, H, W, HID, c, mo, oa3, og3, FAST)
        pa0, pa1, pa2, pa3, pg0, pg1, pg2, pg3 = ca0, ca1, ca2, ca3, cg0, cg1, cg2, cg3
        ca0, ca1, ca2, ca3, cg0, cg1, cg2, cg3 = na0, na1, na2, na3, ng0, ng1, ng2, ng3
    if BACKWARD:
        part = part_ptr + tl.program_id(1).to(tl.int64) * C2
        tl.store(part + c, db_a, mask=cmask)
        tl.store(part + HID + c, db_g, mask=cmask)


@triton.jit
def _dc_col(row, j, W, stride, m):
    """dc at column j of a row (`row` points at its first token's channels), zero outside the image, float32."""
    return tl.load(row + j * stride, mask=m & (j >= 0) & (j < W), other=0.0).to(tl.float32)


@triton.jit
def _s_col(row, j, W, stride, m, FAST: tl.constexpr):
    """s = silu(u) and silu'(u) at column j of a row, both zero outside the image and where m is off (rows
    outside the band): s from the zero load, silu'(0) = 1/2 by the select."""
    mj = m & (j < W)
    u = tl.load(row + j * stride, mask=mj, other=0.0).to(tl.float32)
    su = _sigmoid(u, FAST)
    return u * su, tl.where(mj, su * (1.0 + u * (1.0 - su)), 0.0)


@triton.jit
def _ds_col(dp, dcur, lm, l0, lp, k0, k1, k2, k3, k4, k5, k6, k7, k8):
    """One column's ds window fed by dc row r (lm = dc[r, j + 1] is dj = -1, lp = dc[r, j - 1] is dj = +1):
    kernel row 0 (di = -1) completes ds row r - 1, row 1 adds to r, row 2 starts r + 1."""
    return _mix(dp, lm, l0, lp, k0, k1, k2), _mix(dcur, lm, l0, lp, k3, k4, k5), _mix0(lm, l0, lp, k6, k7, k8)


@triton.jit
def _dw_row(wa, wb, wc, x0, x1, x2, x3, x4, x5, s0, s1, s2, s3):
    """Three taps' dweight sums (one kernel row) plus dc row r against one row of s at the four columns: column
    q pairs s_q with dc[r, j + 1], dc[r, j], dc[r, j - 1] = x_{q+2}, x_{q+1}, x_q."""
    wa = wa + x2 * s0 + x3 * s1 + x4 * s2 + x5 * s3
    wb = wb + x1 * s0 + x2 * s1 + x3 * s2 + x4 * s3
    wc = wc + x0 * s0 + x1 * s1 + x2 * s2 + x3 * s3
    return wa, wb, wc


@triton.jit
def _du_col(du_ptr, b, ro, j, H, W, stride, c, m, done, g):
    """du = ds * silu'(u) at (row ro, column j); -> it (zero where g is: outside the image and the band)."""
    du = done * g
    tl.store(_rowp(du_ptr, b, ro, H, W, stride) + j * stride + c, du.to(du_ptr.dtype.element_ty), mask=m & (j < W))
    return du


@triton.jit
def _bwd_input(dc_ptr, u_ptr, w_ptr, du_ptr, part_ptr, H, W, C2, n_wseg, band,
               BLOCK_C: tl.constexpr, STAGES: tl.constexpr, FAST: tl.constexpr, DU_SUM: tl.constexpr):
    """The transposed conv: s[q] receives dc[q - off_k] * w[k] for the nine offsets off_k = (di, dj), so a
    loaded row r of dc (at columns j - dj) feeds ds at rows r + di; w[k] receives dc[q - off_k] * s[q], the
    same loads against the window of s rows r-1, r, r+1 (only this program's rows and columns, so that every
    pair is counted by exactly one program). s = silu(u) and silu'(u) both come from one sigmoid of u, loaded
    once a row (s at the program's own columns only is needed here, so it is not read back: a third less
    traffic than reading s and u). Columns as in _conv_glu: COLS = 4 output columns as separate vectors, the
    six dc columns of a row loaded once. STAGES and the weights as in _conv_glu. DU_SUM: a tenth partial row,
    the column sum of du (the gradient of the expansion GEMM's bias, which that GEMM would otherwise compute as
    ones^T du)."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C2
    b, j0, r0, r1 = _strip_start(H, n_wseg, band, COLS_)
    k0, k1, k2, k3, k4, k5, k6, k7, k8 = _taps(w_ptr, c, cmask, C2)
    z = tl.zeros((BLOCK_C,), dtype=tl.float32)
    dp0, dp1, dp2, dp3, dc0, dc1, dc2, dc3 = z, z, z, z, z, z, z, z  # ds of rows r-1, r, per column
    sp0, sp1, sp2, sp3, sc0, sc1, sc2, sc3 = z, z, z, z, z, z, z, z  # s of rows r-1, r (zero outside the band)
    gp0, gp1, gp2, gp3, gc0, gc1, gc2, gc3 = z, z, z, z, z, z, z, z  # silu'(u) of rows r-1, r
    w0, w1, w2, w3, w4, w5, w6, w7, w8 = z, z, z, z, z, z, z, z, z  # dweight per tap, over the program's tokens
    dsum = z
    for r in tl.range(r0 - 1, r1 + 1, num_stages=STAGES):
        # step r's loads: dc row r at columns j0 - 1 .. j0 + 4, u row r + 1 at the program's columns, only within
        # the band (rows r0 - 1 and r1 are other programs'): zero there, so s and silu' are zero as well
        row = _rowp(dc_ptr, b, r, H, W, C2) + c
        m = cmask & (r >= 0) & (r < H)
        x0 = _dc_col(row, j0 - 1, W, C2, m)
        x1 = _dc_col(row, j0, W, C2, m)
        x2 = _dc_col(row, j0 + 1, W, C2, m)
        x3 = _dc_col(row, j0 + 2, W, C2, m)
        x4 = _dc_col(row, j0 + 3, W, C2, m)
        x5 = _dc_col(row, j0 + 4, W, C2, m)
        urow = _rowp(u_ptr, b, r + 1, H, W, C2) + c
        mu = cmask & (r + 1 < r1)
        sn0, gn0 = _s_col(urow, j0, W, C2, mu, FAST)
        sn1, gn1 = _s_col(urow, j0 + 1, W, C2, mu, FAST)
        sn2, gn2 = _s_col(urow, j0 + 2, W, C2, mu, FAST)
        sn3, gn3 = _s_col(urow, j0 + 3, W, C2, mu, FAST)
        # column q: dc[r, j - 1], dc[r, j], dc[r, j + 1] are x_q, x_{q+1}, x_{q+2}
        done0, dc0, dn0 = _ds_col(dp0, dc0, x2, x1, x0, k0, k1, k2, k3, k4, k5, k6, k7, k8)
        done1, dc1, dn1 = _ds_col(dp1, dc1, x3, x2, x1, k0, k1, k2, k3, k4, k5, k6, k7, k8)
        done2, dc2, dn2 = _ds_col(dp2, dc2, x4, x3, x2, k0, k1, k2, k3, k4, k5, k6, k7, k8)
        done3, dc3, dn3 = _ds_col(dp3, dc3, x5, x4, x3, k0, k1, k2, k3, k4, k5, k6, k7, k8)
        w0, w1, w2 = _dw_row(w0, w1, w2, x0, x1, x2, x3, x4, x5, sp0, sp1, sp2, sp3)  # s row r - 1
        w3, w4, w5 = _dw_row(w3, w4, w5, x0, x1, x2, x3, x4, x5, sc0, sc1, sc2, sc3)  # s row r
        w6, w7, w8 = _dw_row(w6, w7, w8, x0, x1, x2, x3, x4, x5, sn0, sn1, sn2, sn3)  # s row r + 1
        mo = cmask & (r - 1 >= r0)
        du0 = _du_col(du_ptr, b, r - 1, j0, H, W, C2, c, mo, done0, gp0)
        du1 = _du_col(du_ptr, b, r - 1, j0 + 1, H, W, C2, c, mo, done1, gp1)
        du2 = _du_col(du_ptr, b, r - 1, j0 + 2, H, W, C2, c, mo, done2, gp2)
        du3 = _du_col(du_ptr, b, r - 1, j0 + 3, H, W, C2, c, mo, done3, gp3)
        if DU_SUM:
            dsum += (du0 + du1) + (du2 + du3)
        dp0, dp1, dp2, dp3, dc0, dc1, dc2, dc3 = dc0, dc1, dc2, dc3, dn0, dn1, dn2, dn3
        # s row r is zero before the band already; the selects keep the loop pipelinable (Triton's pipeliner
        # refuses a loop that yields one of its own iteration arguments unchanged: a distance-2 dependence)
        keep = r >= r0
        sp0, sp1 = tl.where(keep, sc0, 0.0), tl.where(keep, sc1, 0.0)
        sp2, sp3 = tl.where(keep, sc2, 0.0), tl.where(keep, sc3, 0.0)
        gp0, gp1 = tl.where(keep, gc0, 0.0), tl.where(keep, gc1, 0.0)
        gp2, gp3 = tl.where(keep, gc2, 0.0), tl.where(keep, gc3, 0.0)
        sc0, sc1, sc2, sc3, gc0, gc1, gc2, gc3 = sn0, sn1, sn2, sn3, gn0, gn1, gn2, gn3
    part = part_ptr + tl.program_id(1).to(tl.int64) * (10 if DU_SUM else 9) * C2 + c
    tl.store(part, w0, mask=cmask)
    tl.store(part + C2, w1, mask=cmask)
    tl.store(part + 2 * C2, w2, mask=cmask)
    tl.store(part + 3 * C2, w3, mask=cmask)
    tl.store(part + 4 * C2, w4, mask=cmask)
    tl.store(part + 5 * C2, w5, mask=cmask)
    tl.store(part + 6 * C2, w6, mask=cmask)
    tl.store(part + 7 * C2, w7, mask=cmask)
    tl.store(part + 8 * C2, w8, mask=cmask)
    if DU_SUM:
        tl.store(part + 9 * C2, dsum, mask=cmask)


_conv_glu_launch = Launcher(_conv_glu)
_bwd_input_launch = Launcher(_bwd_input)


def _plan(B: int, H: int, W: int, channels: int, cfg: dict, device: int) -> dict:
    """Grid of a kernel: channel blocks x (images x column strips of COLS x row bands), enough programs to fill
    the GPU with the fewest bands (each band re-reads two halo rows)."""
    c_blocks, n_wseg = cdiv(channels, cfg["BLOCK_C"]), cdiv(W, COLS)
    want = cdiv(cfg["PROGRAMS_PER_SM"] * sm_count(device), c_blocks * B * n_wseg)
    band = cdiv(H, min(H, max(1, want)))
    strips = B * n_wseg * cdiv(H, band)
    return dict(grid=(c_blocks, strips), strips=strips, scalars=(n_wseg, band), consts=(cfg["BLOCK_C"],),
                flags=(int(cfg["STAGES"]),),
                options=(("num_warps", cfg["num_warps"]),))


def _taps_major(weight: torch.Tensor) -> torch.Tensor:
    """(C2, 1, 3, 3) -> (9, C2) contiguous, the layout the kernels read (a few microseconds)."""
    return weight.reshape(weight.shape[0], 9).t().contiguous()


def _fast_sigmoid(u: torch.Tensor) -> bool:
    return SIGMOID_FAST and u.dtype != torch.float32


def _launch_forward(u: torch.Tensor, wt: torch.Tensor, bias: torch.Tensor, out: torch.Tensor, H: int, W: int):
    """out = a * silu(g) from u (B, N, 2*hid); wt taps-major."""
    B, N, C2 = u.shape
    dev = device_index(u)
    plan = _plan(B, H, W, C2 // 2, CONFIG["fwd"], dev)
    # dout and the partial sums are backward's (never touched here)
    _conv_glu_launch(plan["grid"], dev, (u, wt, bias, u, out, u), (H, W, C2 // 2, *plan["scalars"]),
                     (*plan["consts"], False, *plan["flags"], _fast_sigmoid(u)), plan["options"])


def _launch_backward_conv(u, wt, bias, dout, dc, H: int, W: int) -> torch.Tensor:
    """dc = (da, dg) into dc (like u) -> the partial dbias rows (strips, 2*hid) in float32."""
    B, N, C2 = u.shape
    dev = device_index(u)
    plan = _plan(B, H, W, C2 // 2, CONFIG["bwd_conv"], dev)
    dbias = partial_sums(u, (plan["strips"], C2))
    if u.numel():
        _conv_glu_launch(plan["grid"], dev, (u, wt, bias, dout, dc, dbias), (H, W, C2 // 2, *plan["scalars"]),
                         (*plan["consts"], True, *plan["flags"], _fast_sigmoid(u)), plan["options"])
    return dbias


def _launch_backward_input(dc, u, wt, du, H: int, W: int, du_sum: bool) -> torch.Tensor:
    """du into du (like u) -> the partial dweight rows (strips, 9, 2*hid) in float32, with du_sum a tenth row
    each: du's column sums."""
    B, N, C2 = u.shape
    dev = device_index(u)
    plan = _plan(B, H, W, C2, CONFIG["bwd_input"], dev)
    part = partial_sums(u, (plan["strips"], 10 if du_sum else 9, C2))
    if u.numel():
        _bwd_input_launch(plan["grid"], dev, (dc, u, wt, du, part), (H, W, C2, *plan["scalars"]),
                          (*plan["consts"], *plan["flags"], _fast_sigmoid(u), du_sum), plan["options"])
    return part


@kernel_op("sana::depthwise_glu")
def _depthwise_glu_op(u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, in_bias: torch.Tensor | None,
                      H: int, W: int) -> torch.Tensor:
    """-> out (B, N, hid). in_bias: the expansion GEMM's bias, already in u; not read, here for its gradient
    (du's column sum, which the backward kernel takes; see kernels.mixffn.depthwise_glu)."""
    if not supported_device(u):
        raise ValueError("depthwise GLU: the Triton kernel needs a CUDA tensor (or the CPU under TRITON_INTERPRET=1)")
    u, wt, bias = u.contiguous(), _taps_major(weight), bias.contiguous()
    B, N, C2 = u.shape
    out = u.new_empty((B, N, C2 // 2))
    if out.numel():
        _launch_forward(u, wt, bias, out, H, W)
    return out


@_depthwise_glu_op.register_fake
def _(u, weight, bias, in_bias, H, W):
    return u.new_empty((*u.shape[:-1], u.shape[-1] // 2))


@kernel_op("sana::depthwise_glu_backward")
def _depthwise_glu_backward_op(dout: torch.Tensor, u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                               H: int, W: int, du_sum: bool
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> du (like u), dweight (2*hid, 1, 3, 3), dbias (2*hid) and, with du_sum, du's column sums (2*hid; else
    an empty tensor), in float32."""
    dout, u = dout.contiguous(), u.contiguous()
    wt, bias = _taps_major(weight), bias.contiguous()
    C2 = u.shape[-1]
    du, dc = torch.empty(u.shape, dtype=u.dtype, device=u.device), torch.empty_like(u)
    dbias = _launch_backward_conv(u, wt, bias, dout, dc, H, W)
    sums = _launch_backward_input(dc, u, wt, du, H, W, du_sum).sum(0)  # (9 or 10, 2*hid): one reduction
    dsum = sums[9] if du_sum else sums.new_empty((0,))
    return du, sums[:9].t().reshape(C2, 1, 3, 3).contiguous(), dbias.sum(0), dsum


@_depthwise_glu_backward_op.register_fake
def _(dout, u, weight, bias, H, W, du_sum):
    C2 = u.shape[-1]
    return (u.new_empty(u.shape), u.new_empty((C2, 1, 3, 3), dtype=torch.float32),
            u.new_empty((C2,), dtype=torch.float32), u.new_empty((C2 if du_sum else 0,), dtype=torch.float32))


def _setup(ctx, inputs, output):
    u, weight, bias, in_bias, H, W = inputs
    ctx.hw = (H, W)
    ctx.in_bias_dtype = None if in_bias is None else in_bias.dtype
    ctx.save_for_backward(u, weight, bias)


def _backward(ctx, dout):
    u, weight, bias = ctx.saved_tensors
    has_in_bias = ctx.in_bias_dtype is not None
    du, dweight, dbias, dsum = _depthwise_glu_backward_op.within(ctx)(dout, u, weight, bias, *ctx.hw, has_in_bias)
    return (du, dweight.to(weight.dtype), dbias.to(bias.dtype), dsum.to(ctx.in_bias_dtype) if has_in_bias else None,
            None, None)


_depthwise_glu_op.register_autograd(_backward, setup_context=_setup)


def depthwise_glu_triton(u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, hw: tuple[int, int],
                         in_bias: torch.Tensor | None = None) -> torch.Tensor:
    if not on_current_device(u):  # Triton launches on the current device's stream
        with torch.cuda.device(u.device):
            return depthwise_glu_triton(u, weight, bias, hw, in_bias)
    return _depthwise_glu_op(u, weight, bias, in_bias, int(hw[0]), int(hw[1]))
