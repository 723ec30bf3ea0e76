"""Fused Triton softmax cross-attention to a short, padded caption (see kernels.cross_attention), forward and
backward, as torch.library custom ops with fake implementations.

Why not SDPA: at Sana's shape (1024 queries, 300 keys, heads of 72) every backend of PyTorch is far from both
the arithmetic and the memory ceiling (cuDNN, the best, 0.74 ms forward + backward a block at batch 16 on the
H200 for ~0.1 ms of either: bench/bench_cross_attention.py). With a few hundred keys a query block's work is
short, so the fixed costs dominate: cuDNN pads the head to its 128 tile, and the output and gradients go
through (B, H, N, D) transposes. Here:
- q, kv, out and every gradient stay in the projections' token layouts ((B, N, H*D), (B, L, 2*H*D)); a head
  is a column slice, read and written in place.
- A head of D channels is one or two power-of-two pieces of one width (see head_pieces), each its own tl.dot
  operand.
- Caption padding after a sample's last real token is neither read nor computed (_key_end): exact, since the
  softmax gives those keys weight 0 in float32 anyway.
- Keys are few, so the backward is two kernels without atomics (the FlashAttention-2 split): _bwd_dq per query
  block walks all keys (dq complete, and delta = rowsum(dO * O) for the other kernel), _bwd_dkdv per key block
  walks all queries (dk, dv complete). Deterministic.

    forward   s = q k^T / sqrt(D) + bias (scores in log2 units), online softmax over key blocks,
              out = softmax(s) v, lse = logsumexp2 per query row (float32, (B, H, N))
    backward  p = exp2(s - lse), dp = dO v^T, ds = p * (dp - delta),
              dq = ds k / sqrt(D), dk = ds^T q / sqrt(D), dv = p^T dO

The bias is the caller's additive key bias (-10000 on padding, as diffusers): a caption of padding only then
attends to all its keys as if unmasked, as the reference does (never NaN). Keys past L get bias -inf and
queries past N an lse of +inf, so that their probabilities are exactly 0 without a select.
Precision: products accumulated in float32; p and ds are rounded to the input dtype for their tl.dot, as
FlashAttention does; float32 inputs use IEEE float32 dots (no tf32).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels.launch import Launcher, cdiv, device_index, kernel_op, on_current_device, supported_device

LOG2E = 1.4426950408889634
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_SKIP_KEYS = 4096  # up to this many keys the kernels find where each sample's real keys end (_key_end)

# Tile shapes per kernel: BLOCK_M queries x BLOCK_N keys. Picked by `python bench/bench_cross_attention.py
# --sweep` on the H200 at Sana-0.6B's batch-16 shape (bench/results/cross_attention_h200.json).
CONFIG = {
    "fwd": {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2},
    "dq": {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2},
    "dkdv": {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2},
}


def head_pieces(d: int) -> tuple[int, int]:
    """A head of d channels as tl.dot pieces (DA, DB): a power of two DA >= 16 (tl.dot's smallest K) and a second
    piece of the same width where d is larger, masked past d (DB 0 where DA covers d): 72 -> (64, 64),
    64 -> (64, 0), 112 -> (64, 64), 8 -> (16, 0). A narrower second piece (72 = 64 + 16 or 64 + 32) would save
    dot work, but on the H200 with Triton 3.6 it made _bwd_dq read shared memory out of bounds in a tl.dot at
    every d = 72 shape tried with N a multiple of 16 (compute-sanitizer); equal pieces ran clean."""
    da = max(16, 1 << (d.bit_length() - 1))
    return (da, 0) if da >= d else (da, da)


@triton.jit
def _rows(base, r, rmask, stride, col0, D, DP: tl.constexpr):
    """(len(r), DP) tile: rows r (stride apart) of columns col0 .. col0 + DP, zero past row mask or column D."""
    c = col0 + tl.arange(0, DP)
    return tl.load(base + r[:, None] * stride + c[None, :], mask=rmask[:, None] & (c < D)[None, :], other=0.0)


@triton.jit
def _store_rows(base, r, rmask, stride, col0, D, x, DP: tl.constexpr):
    c = col0 + tl.arange(0, DP)
    tl.store(base + r[:, None] * stride + c[None, :], x.to(base.dtype.element_ty),
             mask=rmask[:, None] & (c < D)[None, :])


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _key_end(bias_ptr, b, L, BLOCK_L: tl.constexpr):
    """Where this sample's keys end for the kernels: after its last key with bias > -1000 (L if it has none, or
    when BLOCK_L is 0: no skipping). The keys after it are padding that the softmax gives a weight below
    exp(-1000) against the real ones, exactly 0 in float32, so they are neither read nor computed: a caption of
    120 real tokens padded to 300 costs 120 keys (rounded up to BLOCK_N), not 300, and whatever the padding
    rows hold (NaN included) cannot reach the result."""
    if BLOCK_L == 0:
        return L
    else:
        i = tl.arange(0, BLOCK_L)
        bias = tl.load(bias_ptr + b * L + i, mask=i < L, other=float("-inf"))
        last = tl.max(tl.where(bias > -1000.0, i + 1, 0), 0)
        return tl.where(last > 0, last, L)


@triton.jit
def _head(bh, H, D, sq_b, skv_b):
    """Batch offsets (int64: no overflow at large batches) and the head's first channel of program bh."""
    b = bh // H
    h = bh % H
    return b, b.to(tl.int64) * sq_b + h * D, b.to(tl.int64) * skv_b + h * D


@triton.jit
def _fwd(q_ptr, kv_ptr, bias_ptr, o_ptr, lse_ptr, N, L, H, D, sq_b, sq_n, skv_b, skv_n, qk_scale,
         DA: tl.constexpr, DB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
         IEEE: tl.constexpr):
    """One query block of one (image, head): all L keys, online softmax; out and lse."""
    bh = tl.program_id(1)
    b, q_off, kv_off = _head(bh, H, D, sq_b, skv_b)
    C = H * D
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = m < N
    q_base, k_base = q_ptr + q_off, kv_ptr + kv_off
    v_base = k_base + C
    qa = _rows(q_base, m, mmask, sq_n, 0, D, DA)  # (BLOCK_M, DA)
    if DB > 0:
        qb = _rows(q_base, m, mmask, sq_n, DA, D, DB)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc_a = tl.zeros((BLOCK_M, DA), tl.float32)
    if DB > 0:
        acc_b = tl.zeros((BLOCK_M, DB), tl.float32)
    end = _key_end(bias_ptr, b, L, BLOCK_L)
    for start in range(0, end, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        nmask = n < end  # the keys past the end read as padding past L: zero, bias -inf
        ka = _rows(k_base, n, nmask, skv_n, 0, D, DA)  # (BLOCK_N, DA)
        s = _dot(qa, tl.trans(ka), tl.zeros((BLOCK_M, BLOCK_N), tl.float32), IEEE)
        if DB > 0:
            kb = _rows(k_base, n, nmask, skv_n, DA, D, DB)
            s = _dot(qb, tl.trans(kb), s, IEEE)
        bias = tl.load(bias_ptr + b * L + n, mask=nmask, other=float("-inf")).to(tl.float32)
        s = s * qk_scale + bias[None, :] * 1.4426950408889634  # keys past L: bias -inf
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        va = _rows(v_base, n, nmask, skv_n, 0, D, DA)
        acc_a = _dot(p.to(va.dtype), va, acc_a * alpha[:, None], IEEE)
        if DB > 0:
            vb = _rows(v_base, n, nmask, skv_n, DA, D, DB)
            acc_b = _dot(p.to(vb.dtype), vb, acc_b * alpha[:, None], IEEE)
        m_i = m_new
    o_base = o_ptr + b.to(tl.int64) * N * C + (bh % H) * D
    _store_rows(o_base, m, mmask, C, 0, D, acc_a / l_i[:, None], DA)
    if DB > 0:
        _store_rows(o_base, m, mmask, C, DA, D, acc_b / l_i[:, None], DB)
    tl.store(lse_ptr + bh.to(tl.int64) * N + m, m_i + tl.log2(l_i), mask=mmask)


@triton.jit
def _bwd_dq(q_ptr, kv_ptr, bias_ptr, o_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, N, L, H, D, sq_b, sq_n, skv_b,
            skv_n, qk_scale, sm_scale,
            DA: tl.constexpr, DB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
            IEEE: tl.constexpr):
    """One query block of one (image, head): delta = rowsum(dO * O), then dq over all keys."""
    bh = tl.program_id(1)
    b, q_off, kv_off = _head(bh, H, D, sq_b, skv_b)
    C = H * D
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = m < N
    q_base, k_base = q_ptr + q_off, kv_ptr + kv_off
    v_base = k_base + C
    t_off = b.to(tl.int64) * N * C + (bh % H) * D  # out, dout and dq: contiguous (B, N, C)
    qa = _rows(q_base, m, mmask, sq_n, 0, D, DA)
    doa = _rows(do_ptr + t_off, m, mmask, C, 0, D, DA)
    delta = tl.sum(doa.to(tl.float32) * _rows(o_ptr + t_off, m, mmask, C, 0, D, DA).to(tl.float32), 1)
    if DB > 0:
        qb = _rows(q_base, m, mmask, sq_n, DA, D, DB)
        dob = _rows(do_ptr + t_off, m, mmask, C, DA, D, DB)
        delta += tl.sum(dob.to(tl.float32) * _rows(o_ptr + t_off, m, mmask, C, DA, D, DB).to(tl.float32), 1)
    tl.store(delta_ptr + bh.to(tl.int64) * N + m, delta, mask=mmask)
    lse = tl.load(lse_ptr + bh.to(tl.int64) * N + m, mask=mmask, other=float("inf"))  # p = 0 past N
    dqa = tl.zeros((BLOCK_M, DA), tl.float32)
    if DB > 0:
        dqb = tl.zeros((BLOCK_M, DB), tl.float32)
    end = _key_end(bias_ptr, b, L, BLOCK_L)
    for start in range(0, end, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        nmask = n < end  # the keys past the end read as padding past L: zero, bias -inf
        ka = _rows(k_base, n, nmask, skv_n, 0, D, DA)
        va = _rows(v_base, n, nmask, skv_n, 0, D, DA)
        s = _dot(qa, tl.trans(ka), tl.zeros((BLOCK_M, BLOCK_N), tl.float32), IEEE)
        dp = _dot(doa, tl.trans(va), tl.zeros((BLOCK_M, BLOCK_N), tl.float32), IEEE)
        if DB > 0:
            kb = _rows(k_base, n, nmask, skv_n, DA, D, DB)
            vb = _rows(v_base, n, nmask, skv_n, DA, D, DB)
            s = _dot(qb, tl.trans(kb), s, IEEE)
            dp = _dot(dob, tl.trans(vb), dp, IEEE)
        bias = tl.load(bias_ptr + b * L + n, mask=nmask, other=float("-inf")).to(tl.float32)
        p = tl.exp2(s * qk_scale + bias[None, :] * 1.4426950408889634 - lse[:, None])  # 0 past L and N
        ds = (p * (dp - delta[:, None])).to(ka.dtype)
        dqa = _dot(ds, ka, dqa, IEEE)
        if DB > 0:
            dqb = _dot(ds, kb, dqb, IEEE)
    _store_rows(dq_ptr + t_off, m, mmask, C, 0, D, dqa * sm_scale, DA)
    if DB > 0:
        _store_rows(dq_ptr + t_off, m, mmask, C, DA, D, dqb * sm_scale, DB)


@triton.jit
def _bwd_dkdv(q_ptr, kv_ptr, bias_ptr, do_ptr, lse_ptr, delta_ptr, dkv_ptr, N, L, H, D, sq_b, sq_n, skv_b, skv_n,
              qk_scale, sm_scale,
              DA: tl.constexpr, DB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_L: tl.constexpr, IEEE: tl.constexpr):
    """One key block of one (image, head): dk and dv over all queries (scores transposed: keys x queries)."""
    bh = tl.program_id(1)
    b, q_off, kv_off = _head(bh, H, D, sq_b, skv_b)
    C = H * D
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    end = _key_end(bias_ptr, b, L, BLOCK_L)
    nmask = n < end  # keys past the end: zero, bias -inf, so their gradients come out 0 (stored up to L)
    q_base, k_base = q_ptr + q_off, kv_ptr + kv_off
    v_base = k_base + C
    do_base = do_ptr + b.to(tl.int64) * N * C + (bh % H) * D
    stat = bh.to(tl.int64) * N
    ka = _rows(k_base, n, nmask, skv_n, 0, D, DA)  # (BLOCK_N, DA)
    va = _rows(v_base, n, nmask, skv_n, 0, D, DA)
    dka = tl.zeros((BLOCK_N, DA), tl.float32)
    dva = tl.zeros((BLOCK_N, DA), tl.float32)
    if DB > 0:
        kb = _rows(k_base, n, nmask, skv_n, DA, D, DB)
        vb = _rows(v_base, n, nmask, skv_n, DA, D, DB)
        dkb = tl.zeros((BLOCK_N, DB), tl.float32)
        dvb = tl.zeros((BLOCK_N, DB), tl.float32)
    bias = tl.load(bias_ptr + b * L + n, mask=nmask, other=float("-inf")).to(tl.float32) * 1.4426950408889634
    # a key block wholly past the keys' end gets zero gradients (its weights are 0): no query is visited
    for start in range(0, tl.where(tl.program_id(0) * BLOCK_N < end, N, 0), BLOCK_M):
        m = start + tl.arange(0, BLOCK_M)
        mmask = m < N
        qa = _rows(q_base, m, mmask, sq_n, 0, D, DA)  # (BLOCK_M, DA)
        doa = _rows(do_base, m, mmask, C, 0, D, DA)
        st = _dot(ka, tl.trans(qa), tl.zeros((BLOCK_N, BLOCK_M), tl.float32), IEEE)
        dpt = _dot(va, tl.trans(doa), tl.zeros((BLOCK_N, BLOCK_M), tl.float32), IEEE)
        if DB > 0:
            qb = _rows(q_base, m, mmask, sq_n, DA, D, DB)
            dob = _rows(do_base, m, mmask, C, DA, D, DB)
            st = _dot(kb, tl.trans(qb), st, IEEE)
            dpt = _dot(vb, tl.trans(dob), dpt, IEEE)
        lse = tl.load(lse_ptr + stat + m, mask=mmask, other=float("inf"))
        delta = tl.load(delta_ptr + stat + m, mask=mmask, other=0.0)
        pt = tl.exp2(st * qk_scale + bias[:, None] - lse[None, :])  # (BLOCK_N, BLOCK_M), 0 past L and N
        dst = (pt * (dpt - delta[None, :])).to(qa.dtype)
        pt = pt.to(doa.dtype)
        dva = _dot(pt, doa, dva, IEEE)
        dka = _dot(dst, qa, dka, IEEE)
        if DB > 0:
            dvb = _dot(pt, dob, dvb, IEEE)
            dkb = _dot(dst, qb, dkb, IEEE)
    dk_base = dkv_ptr + b.to(tl.int64) * L * 2 * C + (bh % H) * D  # dkv: contiguous (B, L, 2C)
    _store_rows(dk_base, n, n < L, 2 * C, 0, D, dka * sm_scale, DA)
    _store_rows(dk_base + C, n, n < L, 2 * C, 0, D, dva, DA)
    if DB > 0:
        _store_rows(dk_base, n, n < L, 2 * C, DA, D, dkb * sm_scale, DB)
        _store_rows(dk_base + C, n, n < L, 2 * C, DA, D, dvb, DB)


_fwd_launch = Launcher(_fwd)
_dq_launch = Launcher(_bwd_dq)
_dkdv_launch = Launcher(_bwd_dkdv)


def _block_l(L: int) -> int:
    """The bias row as one vector for _key_end; 0 (no skipping) for key counts no caption has."""
    return max(16, triton.next_power_of_2(L)) if L <= MAX_SKIP_KEYS else 0


def _options(cfg: dict) -> tuple:
    return ("num_warps", cfg["num_warps"]), ("num_stages", cfg["num_stages"])


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    """The kernels take any row strides but need the channels contiguous."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch_forward(q, kv, bias, o, lse, heads: int) -> None:
    B, N, C = q.shape
    L, D = kv.shape[1], C // heads
    cfg, dev = CONFIG["fwd"], device_index(q)
    _fwd_launch((cdiv(N, cfg["BLOCK_M"]), B * heads), dev, (q, kv, bias, o, lse),
                (N, L, heads, D, q.stride(0), q.stride(1), kv.stride(0), kv.stride(1), LOG2E / math.sqrt(D)),
                (*head_pieces(D), cfg["BLOCK_M"], cfg["BLOCK_N"], _block_l(L), q.dtype == torch.float32),
                _options(cfg))


def _launch_dq(q, kv, bias, o, lse, do, delta, dq, heads: int) -> None:
    """dq, and delta = rowsum(dO * O) into delta (like lse) for _launch_dkdv."""
    B, N, C = q.shape
    L, D = kv.shape[1], C // heads
    cfg = CONFIG["dq"]
    _dq_launch((cdiv(N, cfg["BLOCK_M"]), B * heads), device_index(q), (q, kv, bias, o, do, lse, delta, dq),
               (N, L, heads, D, q.stride(0), q.stride(1), kv.stride(0), kv.stride(1), LOG2E / math.sqrt(D),
                1.0 / math.sqrt(D)),
               (*head_pieces(D), cfg["BLOCK_M"], cfg["BLOCK_N"], _block_l(L), q.dtype == torch.float32),
               _options(cfg))


def _launch_dkdv(q, kv, bias, lse, do, delta, dkv, heads: int) -> None:
    B, N, C = q.shape
    L, D = kv.shape[1], C // heads
    cfg = CONFIG["dkdv"]
    _dkdv_launch((cdiv(L, cfg["BLOCK_N"]), B * heads), device_index(q), (q, kv, bias, do, lse, delta, dkv),
                 (N, L, heads, D, q.stride(0), q.stride(1), kv.stride(0), kv.stride(1), LOG2E / math.sqrt(D),
                  1.0 / math.sqrt(D)),
                 (*head_pieces(D), cfg["BLOCK_M"], cfg["BLOCK_N"], _block_l(L), q.dtype == torch.float32),
                _options(cfg))


@kernel_op("sana::cross_attention")
def _cross_attention_op(q: torch.Tensor, kv: torch.Tensor, bias: torch.Tensor,
                        heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> out (B, N, C) contiguous and lse (B, H, N) float32 (log2 units), which backward reads."""
    q, kv, bias = _unit_last(q), _unit_last(kv), bias.contiguous()
    B, N, C = q.shape
    o = q.new_empty((B, N, C))
    lse = q.new_empty((B, heads, N), dtype=torch.float32)
    if o.numel():
        _launch_forward(q, kv, bias, o, lse, heads)
    return o, lse


@_cross_attention_op.register_fake
def _(q, kv, bias, heads):
    B, N, C = q.shape
    return q.new_empty((B, N, C)), q.new_empty((B, heads, N), dtype=torch.float32)


@kernel_op("sana::cross_attention_backward")
def _cross_attention_backward_op(do: torch.Tensor, q: torch.Tensor, kv: torch.Tensor, bias: torch.Tensor,
                                 o: torch.Tensor, lse: torch.Tensor,
                                 heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> dq (B, N, C) and dkv (B, L, 2C), contiguous."""
    q, kv, bias, do = _unit_last(q), _unit_last(kv), bias.contiguous(), do.contiguous()
    dq, dkv = q.new_empty(q.shape), kv.new_empty(kv.shape)
    if q.numel():
        delta = torch.empty_like(lse)
        _launch_dq(q, kv, bias, o, lse, do, delta, dq, heads)
        _launch_dkdv(q, kv, bias, lse, do, delta, dkv, heads)
    else:
        dkv.zero_()
    return dq, dkv


@_cross_attention_backward_op.register_fake
def _(do, q, kv, bias, o, lse, heads):
    return q.new_empty(q.shape), kv.new_empty(kv.shape)


def _setup(ctx, inputs, output):
    q, kv, bias, ctx.heads = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(q, kv, bias, *output)


def _backward(ctx, do, _dlse):
    q, kv, bias, o, lse = ctx.saved_tensors
    dq, dkv = _cross_attention_backward_op.within(ctx)(do, q, kv, bias, o, lse, ctx.heads)
    return dq, dkv, None, None


_cross_attention_op.register_autograd(_backward, setup_context=_setup)


def cross_attention_triton(q: torch.Tensor, kv: torch.Tensor, bias: torch.Tensor, heads: int) -> torch.Tensor:
    """q (B, N, C), kv (B, L, 2C), any row strides; bias (B, L) -> out (B, N, C) contiguous."""
    if not (q.dtype == kv.dtype and q.dtype in DTYPES):
        raise ValueError(f"triton cross-attention needs q and kv of one dtype in {DTYPES}, got {q.dtype}, {kv.dtype}")
    if not (supported_device(q) and q.device == kv.device == bias.device):
        raise ValueError("triton cross-attention needs q, kv and bias on one CUDA device (or on the CPU with "
                         "TRITON_INTERPRET=1)")
    if not on_current_device(q):  # Triton launches on the current device's stream
        with torch.cuda.device(q.device):
            return cross_attention_triton(q, kv, bias, heads)
    return _cross_attention_op(q, kv, bias, int(heads))[0]
