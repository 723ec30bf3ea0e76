"""Fused Triton depthwise-GLU of Mix-FFN in token layout (see kernels.mixffn), forward and backward, as
torch.library custom ops with fake implementations.

u is (B*N, 2*hid) row-major, N = H*W tokens in grid order: a token's channels are contiguous. A program owns
a (BLOCK_W columns x BLOCK_C channels) strip of one image and walks down a band of its rows, one image row
an iteration, keeping the three output rows that the loaded input row feeds in registers (a sliding window
over rows): each input row is read once from HBM, its three horizontal shifts (j-1, j, j+1) are three loads
of which two hit L1. A tile's offsets and shift masks are computed once a program, so that a load is a row
pointer plus them: per-element 64-bit index arithmetic at every load was most of the instructions (forward
0.27 -> 0.20 ms, backward 0.36 + 0.49 -> 0.28 + 0.42 ms a block at Sana-0.6B's batch-16 shape on the H200).
Then the row loop became a Triton software pipeline (tl.range num_stages: the next rows' loads are async copies
into shared memory while a row is computed): 0.20 -> 0.165, 0.28 + 0.42 -> 0.25 + 0.355 ms. The kernels were
bound by load latency, not bandwidth (one row in flight a program, few programs an SM for their registers).
Taking the j +- 1 shifts from the center tile with tl.gather plus two halo columns, instead of three loads of
which two hit the cache, was twice as slow (0.31 ms forward at the best tile, measured beside it).
The first version loaded a tile at all nine taps (nine shifted reads of every element: 0.28 ms forward and
1.1 ms backward a block).
Outside the image the taps read zero (zero padding; silu(0) = 0, so padding before or after the SiLU is the
same).

The SiLU of u is taken at the loads (three times an element, one per horizontal shift), so the op is one
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
    next_pow2,
    on_current_device,
    partial_sums,
    sm_count,
    supported_device,
)

# BLOCK_W columns x BLOCK_C channels a program; PROGRAMS_PER_SM: enough row bands that the grid has about this
# many programs an SM (a band costs two halo rows, so fewer, longer bands where the grid is already full);
# STAGES: see _conv_glu. The best of a checked sweep on the H200 at Sana-0.6B's batch-16 shape
# (`python bench/bench_mixffn.py --sweep`, bench/results/mixffn_h200.json, which also lists each configuration's
# registers and spills): forward 0.165 ms, backward 0.251 + 0.355 ms a block (HBM rooflines 0.072, 0.120, 0.192;
# without the pipeline, STAGES 1: 0.227, 0.314, 0.441). Four stages beat three at every tile; larger tiles hold
# more registers and fewer programs an SM, and lose.
CONFIG = {
    "fwd": {"BLOCK_W": 16, "BLOCK_C": 32, "num_warps": 4, "PROGRAMS_PER_SM": 4, "STAGES": 4},
    "bwd_conv": {"BLOCK_W": 16, "BLOCK_C": 32, "num_warps": 4, "PROGRAMS_PER_SM": 4, "STAGES": 4},
    "bwd_input": {"BLOCK_W": 16, "BLOCK_C": 32, "num_warps": 4, "PROGRAMS_PER_SM": 4, "STAGES": 4},
}


SIGMOID_FAST = not INTERPRET  # tanh.approx for 16-bit inputs on the GPU; see _sigmoid and the module docstring


@triton.jit
def _sigmoid(x, FAST: tl.constexpr):
    """sigmoid(x) in float32. FAST: as 0.5 + 0.5 tanh(x / 2) with the GPU's tanh.approx (one special-function
    op instead of an exp and a division; |error| <= 2.5e-4)."""
    if FAST:
        t = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [x * 0.5], dtype=tl.float32,
                                      is_pure=True, pack=1)
        return 0.5 + 0.5 * t
    else:
        return tl.sigmoid(x)


@triton.jit
def _silu(x, FAST: tl.constexpr):
    return x * _sigmoid(x, FAST)


@triton.jit
def _tile(j, c, jmask, cmask, W, stride):
    """Offsets within an image row of a (BLOCK_W, BLOCK_C) tile (`stride` channels a token), computed once a
    program, and the masks of its three horizontal shifts (columns j-1, j, j+1; zero outside the image).
    Every load is then a row pointer (one scalar an iteration) plus these: per-element 64-bit index arithmetic
    at each load was most of the kernels' instructions."""
    offs = j[:, None] * stride + c[None, :]
    cm = cmask[None, :]
    return (offs, (jmask & (j >= 1))[:, None] & cm, jmask[:, None] & cm, (jmask & (j + 1 < W))[:, None] & cm)


@triton.jit
def _rowp(ptr, b, r, H, W, stride):
    """Pointer to the first channel of row r of image b (int64: no overflow at large batches)."""
    return ptr + ((b * H + r) * W).to(tl.int64) * stride


@triton.jit
def _rows3(ptr, b, r, ok, offs, m_l, m_c, m_r, H, W, stride):
    """Row r at the three horizontal shifts a kernel row reads, zero where not `ok` (a row outside the image or
    band) or outside the image: the loads of one window step, in the tensor's dtype."""
    p = _rowp(ptr, b, r, H, W, stride) + offs
    return (tl.load(p - stride, mask=m_l & ok, other=0.0), tl.load(p, mask=m_c & ok, other=0.0),
            tl.load(p + stride, mask=m_r & ok, other=0.0))


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
def _mix(l0, l1, l2, k0, k1, k2):
    """One kernel row (taps k0, k1, k2) applied to three horizontal shifts l0, l1, l2 (columns j-1, j, j+1)."""
    return (l0.to(tl.float32) * k0[None, :] + l1.to(tl.float32) * k1[None, :]
            + l2.to(tl.float32) * k2[None, :])


@triton.jit
def _strip(H, W, n_wseg, band, BLOCK_W: tl.constexpr):
    """This program's image b, columns j and row band [r0, r1) from program_id(1)."""
    pid = tl.program_id(1)
    n_bands = tl.cdiv(H, band)
    b = (pid // (n_wseg * n_bands)).to(tl.int64)
    rest = pid % (n_wseg * n_bands)
    j = (rest // n_bands) * BLOCK_W + tl.arange(0, BLOCK_W)
    r0 = (rest % n_bands) * band
    r1 = tl.minimum(r0 + band, H)
    return b, j, r0, r1


@triton.jit
def _feed(l0, l1, l2, k0, k1, k2, k3, k4, k5, k6, k7, k8, acc_p, acc_c):
    """Feed input row r (three shifts) into the window: -> (row r-1 complete, row r, row r+1 started); an input
    row r feeds output row r - di through kernel row di + 1."""
    return (acc_p + _mix(l0, l1, l2, k6, k7, k8), acc_c + _mix(l0, l1, l2, k3, k4, k5), _mix(l0, l1, l2, k0, k1, k2))


@triton.jit
def _conv_glu(u_ptr, w_ptr, bias_ptr, dout_ptr, out_ptr, part_ptr, H, W, HID, n_wseg, band,
              BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr, BACKWARD: tl.constexpr, STAGES: tl.constexpr,
              FAST: tl.constexpr):
    """a = conv(silu(u_a)) + bias_a, g = conv(silu(u_g)) + bias_g over this program's rows, then
    forward (BACKWARD False): out = a * silu(g), (B*N, HID);
    backward: dc = (da, dg) from dout into out (B*N, 2*HID), and this program's partial dbias row.
    STAGES: Triton's software pipeline over the row loop (tl.range num_stages): the loads of the next STAGES - 1
    rows are in flight (async copies into shared memory) while a row is computed. The kernels are bound by the
    latency of their loads, not by bandwidth: registers (the 18 hoisted tap weights take 18 for each channel a
    thread holds) allow 2-4 programs an SM, and one row in flight a program left HBM at a third of its bandwidth.
    The tap weights are loaded once a program; loading them from L1 each row was slower at every swept tile (the
    "h0" entries of bench/results/mixffn_h200.json as committed in 86db365, swept with a HOIST flag there)."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < HID
    b, j, r0, r1 = _strip(H, W, n_wseg, band, BLOCK_W)
    jmask = j < W
    C2 = 2 * HID
    offs, m_l, m_c, m_r = _tile(j, c, jmask, cmask, W, C2)  # u and dc: 2*HID channels a token
    offs_o = j[:, None] * HID + c[None, :]  # out and dout: HID
    a0, a1, a2, a3, a4, a5, a6, a7, a8 = _taps(w_ptr, c, cmask, C2)
    g0, g1, g2, g3, g4, g5, g6, g7, g8 = _taps(w_ptr + HID, c, cmask, C2)
    bias_a = tl.load(bias_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    bias_g = tl.load(bias_ptr + HID + c, mask=cmask, other=0.0).to(tl.float32)
    pa = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)
    ca = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)
    pg = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)
    cg = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)
    # dbias: summed over the strip's tokens elementwise, reduced over its columns once at the end
    db_a = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)
    db_g = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)
    for r in tl.range(r0 - 1, r1 + 1, num_stages=STAGES):  # input row r completes output row r - 1
        ok = (r >= 0) & (r < H)
        ua0, ua1, ua2 = _rows3(u_ptr, b, r, ok, offs, m_l, m_c, m_r, H, W, C2)
        ug0, ug1, ug2 = _rows3(u_ptr + HID, b, r, ok, offs, m_l, m_c, m_r, H, W, C2)
        # the SiLU at every load; silu(0) = 0 keeps the zero padding
        xa0, xa1, xa2 = _silu(ua0.to(tl.float32), FAST), _silu(ua1.to(tl.float32), FAST), _silu(ua2.to(tl.float32), FAST)
        xg0, xg1, xg2 = _silu(ug0.to(tl.float32), FAST), _silu(ug1.to(tl.float32), FAST), _silu(ug2.to(tl.float32), FAST)
        ro = r - 1
        mask = m_c & (ro >= r0)
        if BACKWARD:
            d = tl.load(_rowp(dout_ptr, b, ro, H, W, HID) + offs_o, mask=mask, other=0.0)
        da, ca, na = _feed(xa0, xa1, xa2, a0, a1, a2, a3, a4, a5, a6, a7, a8, pa, ca)
        dg, cg, ng = _feed(xg0, xg1, xg2, g0, g1, g2, g3, g4, g5, g6, g7, g8, pg, cg)
        a = da + bias_a[None, :]
        g = dg + bias_g[None, :]
        sg = _sigmoid(g, FAST)
        if BACKWARD:
            df = d.to(tl.float32)  # zero where the row is not this program's
            grad_a = df * g * sg
            grad_g = df * a * sg * (1.0 + g * (1.0 - sg))
            p = _rowp(out_ptr, b, ro, H, W, C2) + offs
            tl.store(p, grad_a.to(out_ptr.dtype.element_ty), mask=mask)
            tl.store(p + HID, grad_g.to(out_ptr.dtype.element_ty), mask=mask)
            db_a += grad_a
            db_g += grad_g
        else:
            tl.store(_rowp(out_ptr, b, ro, H, W, HID) + offs_o, (a * g * sg).to(out_ptr.dtype.element_ty), mask=mask)
        pa, ca, pg, cg = ca, na, cg, ng
    if BACKWARD:
        part = part_ptr + tl.program_id(1).to(tl.int64) * C2
        tl.store(part + c, tl.sum(db_a, axis=0), mask=cmask)
        tl.store(part + HID + c, tl.sum(db_g, axis=0), mask=cmask)


@triton.jit
def _bwd_input(dc_ptr, u_ptr, w_ptr, du_ptr, part_ptr, H, W, C2, n_wseg, band,
               BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr, STAGES: tl.constexpr, FAST: tl.constexpr,
               DU_SUM: tl.constexpr):
    """The transposed conv: s[q] receives dc[q - off_k] * w[k] for the nine offsets off_k = (di, dj), so a
    loaded row r of dc (at columns j - dj) feeds ds at rows r + di; w[k] receives dc[q - off_k] * s[q], the
    same loads against the window of s rows r-1, r, r+1 (only this program's rows, so that every pair is
    counted by exactly one program). s = silu(u) and silu'(u) both come from one sigmoid of u, loaded once a row
    (s at its center column only is needed here, so it is not read back: a third less traffic than reading s
    and u). STAGES and the weights as in _conv_glu. DU_SUM: a tenth partial row, the column sum of du (the
    gradient of the expansion GEMM's bias, which that GEMM would otherwise compute as ones^T du)."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C2
    b, j, r0, r1 = _strip(H, W, n_wseg, band, BLOCK_W)
    jmask = j < W
    offs, m_l, m_c, m_r = _tile(j, c, jmask, cmask, W, C2)
    k0, k1, k2, k3, k4, k5, k6, k7, k8 = _taps(w_ptr, c, cmask, C2)
    dp = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)  # ds of rows r-1, r
    dcur = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)
    sp = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)  # s of rows r-1, r (zero outside the band)
    scur = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)
    gp = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)  # silu'(u) of rows r-1, r
    gcur = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)
    # dweight per tap, summed over the strip's tokens elementwise (nine register tiles), reduced at the end
    w0 = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)
    w1 = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)
    w2 = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)
    w3 = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)
    w4 = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)
    w5 = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)
    w6 = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)
    w7 = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)
    w8 = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)
    dsum = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)
    for r in tl.range(r0 - 1, r1 + 1, num_stages=STAGES):
        # step r's loads: dc row r (xm = dc[r, j + 1] is dj = -1, xp = dc[r, j - 1] is dj = +1) and u row r + 1,
        # only within the band (rows r0 - 1 and r1 are other programs'): zero there, so s is zero as well
        xp, x0, xm = _rows3(dc_ptr, b, r, (r >= 0) & (r < H), offs, m_l, m_c, m_r, H, W, C2)
        xu = tl.load(_rowp(u_ptr, b, r + 1, H, W, C2) + offs, mask=m_c & (r + 1 < r1), other=0.0)
        lm, l0, lp = xm.to(tl.float32), x0.to(tl.float32), xp.to(tl.float32)
        u = xu.to(tl.float32)
        su = _sigmoid(u, FAST)
        snext = u * su
        gnext = su * (1.0 + u * (1.0 - su))
        # kernel row 0 (di = -1) -> ds row r - 1, row 1 -> r, row 2 -> r + 1
        done = dp + _mix(lm, l0, lp, k0, k1, k2)
        dcur = dcur + _mix(lm, l0, lp, k3, k4, k5)
        dnext = _mix(lm, l0, lp, k6, k7, k8)
        w0 += lm * sp
        w1 += l0 * sp
        w2 += lp * sp
        w3 += lm * scur
        w4 += l0 * scur
        w5 += lp * scur
        w6 += lm * snext
        w7 += l0 * snext
        w8 += lp * snext
        du = done * gp  # zero outside the image and before the band (gp is zeroed there)
        tl.store(_rowp(du_ptr, b, r - 1, H, W, C2) + offs, du.to(du_ptr.dtype.element_ty), mask=m_c & (r - 1 >= r0))
        if DU_SUM:
            dsum += du
        dp, dcur = dcur, dnext
        # s row r is zero before the band already; the selects keep the loop pipelinable (Triton's pipeliner
        # refuses a loop that yields one of its own iteration arguments unchanged: a distance-2 dependence)
        sp, scur = tl.where(r >= r0, scur, 0.0), snext
        gp, gcur = tl.where(r >= r0, gcur, 0.0), gnext
    part = part_ptr + tl.program_id(1).to(tl.int64) * (10 if DU_SUM else 9) * C2 + c
    tl.store(part, tl.sum(w0, axis=0), mask=cmask)
    tl.store(part + C2, tl.sum(w1, axis=0), mask=cmask)
    tl.store(part + 2 * C2, tl.sum(w2, axis=0), mask=cmask)
    tl.store(part + 3 * C2, tl.sum(w3, axis=0), mask=cmask)
    tl.store(part + 4 * C2, tl.sum(w4, axis=0), mask=cmask)
    tl.store(part + 5 * C2, tl.sum(w5, axis=0), mask=cmask)
    tl.store(part + 6 * C2, tl.sum(w6, axis=0), mask=cmask)
    tl.store(part + 7 * C2, tl.sum(w7, axis=0), mask=cmask)
    tl.store(part + 8 * C2, tl.sum(w8, axis=0), mask=cmask)
    if DU_SUM:
        tl.store(part + 9 * C2, tl.sum(dsum, axis=0), mask=cmask)


_conv_glu_launch = Launcher(_conv_glu)
_bwd_input_launch = Launcher(_bwd_input)


def _plan(B: int, H: int, W: int, channels: int, cfg: dict, device: int) -> dict:
    """Grid of a kernel: channel blocks x (images x column strips x row bands), enough programs to fill the GPU
    with the fewest bands (each band re-reads two halo rows)."""
    block_w = max(2, min(cfg["BLOCK_W"], next_pow2(W)))
    c_blocks, n_wseg = cdiv(channels, cfg["BLOCK_C"]), cdiv(W, block_w)
    want = cdiv(cfg["PROGRAMS_PER_SM"] * sm_count(device), c_blocks * B * n_wseg)
    band = cdiv(H, min(H, max(1, want)))
    strips = B * n_wseg * cdiv(H, band)
    return dict(grid=(c_blocks, strips), strips=strips, scalars=(n_wseg, band),
                consts=(block_w, cfg["BLOCK_C"]), flags=(int(cfg["STAGES"]),),
                options=(("num_warps", cfg["num_warps"]),) + ((("maxnreg", cfg["maxnreg"]),) if cfg.get("maxnreg") else ()))


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
