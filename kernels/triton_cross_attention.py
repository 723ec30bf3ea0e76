"""Fused Triton softmax cross-attention to a short caption (see kernels.cross_attention), forward and backward,
as torch.library custom ops with fake implementations.

Built for what the Linear DiT's cross-attention is once captions are cut to their batch's longest (the trainer's
and the pipeline's `caption_bucket`): at most MAX_KEYS keys, so every key of an (image, head) fits in one tile.
Then:
- a program loads K, V and the key bias of its (image, head) once and walks query blocks (a Triton software
  pipeline over them: the next blocks' q loads are in flight while one is computed), so the whole softmax of a
  query block is one tile: no online rescaling in forward, and no log-sum-exp saved for backward (backward
  takes the softmax again from the same tile);
- backward is two kernels, FlashAttention-2's split without its online softmax: a dq kernel (programs as in
  forward: dq of a query block is complete after its one key tile, stored, no atomics; it also stores each
  query's log2-sum-exp2 and delta = rowsum(p * dp), from the same tile, so the output is not read back), then a
  dk/dv kernel with a program a BLOCK_K keys of an (image, head) that walks every query block and takes p^T
  from those statistics, so each key's gradient is written once, with no partial sums. One kernel doing both
  (dk, dv of all keys accumulated in registers over a program's query blocks; the form until 2026-12-06) had one
  program an (image, head): 160 programs at Sana-1.6B's batch 8 for 132 SMs, 255 registers a thread, and no
  query pipelining: 0.32 ms at that shape on the H100, where cuDNN's three backward kernels take 0.27;
- q, kv, out and every gradient stay in the projections' token layouts ((B, N, H*D), (B, L, 2*H*D)): a head is a
  column slice, read and written in place; a head of D channels is one power-of-two tile DP >= D, masked.
  D is a compile-time constant: a head's column offset h * D and the d < D mask are then known multiples of D's
  power-of-two factor (8 for Sana's 72 and 112), so the loads vectorise to 16 bytes and pipeline as async
  copies. With D a runtime int the compiler could prove no alignment and every load was one 2-byte element, no
  async copy (seen in the TTGIR of an offline sm_90 compile: sizePerThread [1, 1]; 0.10 ms forward, 0.30 ms
  backward at Sana-0.6B's batch-16 shape on an H100, no faster than cuDNN).

A first Triton kernel (823f372, reverted) walked keys in blocks with an online softmax, one query block a program,
and split backward into a dq and a dk/dv kernel (FlashAttention-2's form, for any number of keys): on the H200 it
lost to cuDNN (bench/NOTES_block_fastpath.md). Its programs were too short to hide their load latency.

    forward   s = q k^T / sqrt(D) + bias (log2 units), p = softmax(s), out = p v
    backward  dp = dO v^T, ds = p * (dp - rowsum(p * dp)),
              dq = ds k / sqrt(D), dk = ds^T q / sqrt(D), dv = p^T dO

The bias is the caller's additive key bias (the model's -10000 on padding, as diffusers): a caption of padding
only then attends to all its keys as if unmasked, as the reference does (never NaN). Key slots past L get -inf.
Precision: products accumulated in float32; p and ds are rounded to the input dtype for their tl.dot, as
FlashAttention does; float32 inputs use IEEE float32 dots (no tf32).
Deterministic: every output element is written by one program, with no atomics.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels.cross_attention import MAX_HEAD_DIM, MAX_KEYS
from kernels.cross_attention import fused_supported as supports
from kernels.launch import (
    Launcher,
    cdiv,
    device_index,
    kernel_op,
    next_pow2,
    on_current_device,
    pow2_tiles,
    sm_count,
    supported_device,
)

LOG2E = 1.4426950408889634

# BLOCK_M queries a step; PROGRAMS_PER_SM: query blocks are split between programs of one (image, head) until
# the grid has about this many programs an SM (forward and the dq kernel; the dk/dv kernel has a program a
# BLOCK_K keys of an (image, head)); STAGES: the software pipeline over query blocks. The best of
# `python bench/bench_cross_attention.py --shape 8,1024,128,20,112 --sweep` on the H100 (Sana-1.6B, batch 8:
# bench/results/cross_attention_1.6b_split2_h100.json; at 0.6B's shape, cross_attention_split2_h100.json, each
# is within 10 us of that shape's best). dk/dv: 64 keys at 4 warps, so the tile has the 64 rows a warp group
# covers (at 8 warps Triton's Hopper layout computes a 64-row product twice: 0.133 ms against 0.077; 128 keys at
# 8 warps is as fast at 128 caption slots, but a caption cut to 64 takes 64-key tiles). float32 inputs (IEEE
# dots, twice the shared memory a tile) take smaller tiles that fit an SM's 227 KiB.
CONFIG = {
    "fwd": {"BLOCK_M": 128, "num_warps": 8, "PROGRAMS_PER_SM": 2, "STAGES": 3},
    "bwd_dq": {"BLOCK_M": 64, "num_warps": 4, "PROGRAMS_PER_SM": 4, "STAGES": 1},
    "bwd_dkv": {"BLOCK_M": 32, "BLOCK_K": 64, "num_warps": 4, "STAGES": 3},
    "fwd_fp32": {"BLOCK_M": 64, "num_warps": 8, "PROGRAMS_PER_SM": 1, "STAGES": 1},
    "bwd_dq_fp32": {"BLOCK_M": 32, "num_warps": 8, "PROGRAMS_PER_SM": 1, "STAGES": 1},
    "bwd_dkv_fp32": {"BLOCK_M": 32, "BLOCK_K": 32, "num_warps": 4, "STAGES": 1},
}
HEAD_SPLIT = True  # the forward's head channels as two tiles where that masks fewer lanes (_head_tiles)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _dot_acc(a, b, acc, IEEE: tl.constexpr):
    """acc + a @ b."""
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _kv_cols(kv_ptr, b, h, L, H, D: tl.constexpr, skv_b, skv_n, lk, c0: tl.constexpr, W: tl.constexpr):
    """Head channels c0 .. c0 + W of keys lk of image b, head h: K and V as (BLOCK_L, W) tiles, zero past L and D."""
    d = c0 + tl.arange(0, W)
    m = (lk < L)[:, None] & (d < D)[None, :]
    base = kv_ptr + b.to(tl.int64) * skv_b + h * D + lk[:, None] * skv_n + d[None, :]
    return tl.load(base, mask=m, other=0.0), tl.load(base + H * D, mask=m, other=0.0)


@triton.jit
def _keys(kv_ptr, bias_ptr, b, h, L, H, D: tl.constexpr, skv_b, skv_n, DP: tl.constexpr, BLOCK_L: tl.constexpr,
          start=0):
    """Keys start .. start + BLOCK_L of image b, head h: K and V as (BLOCK_L, DP) tiles (zero past L and D), and
    the key bias in log2 units (-inf past L)."""
    lk = start + tl.arange(0, BLOCK_L)
    k, v = _kv_cols(kv_ptr, b, h, L, H, D, skv_b, skv_n, lk, 0, DP)
    bias = tl.load(bias_ptr + b.to(tl.int64) * L + lk, mask=lk < L, other=float("-inf")).to(tl.float32)
    return k, v, bias * 1.4426950408889634


@triton.jit
def _softmax(q, kt, bias, qk_scale, IEEE: tl.constexpr):
    """The softmax of q's rows over the one key tile, unnormalised: (exp2(s - rowmax), row sums, rowmax), float32,
    s in log2 units. The caller divides (forward the output, backward the probabilities)."""
    return _softmax_of(_dot(q, kt, IEEE), bias, qk_scale)


@triton.jit
def _softmax_of(s, bias, qk_scale):
    """_softmax from the products q k^T."""
    s = s * qk_scale + bias[None, :]
    top = tl.max(s, 1)
    p = tl.exp2(s - top[:, None])
    return p, tl.sum(p, 1), top


@triton.jit
def _fwd(q_ptr, kv_ptr, bias_ptr, o_ptr, N, L, H, sq_b, sq_n, skv_b, skv_n, qk_scale, D: tl.constexpr,
         DP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr, STAGES: tl.constexpr, IEEE: tl.constexpr,
         DT: tl.constexpr = 0):
    """Query blocks program_id(0), + num_programs(0), ... of (image, head) program_id(1). DT > 0: a head's
    channels are two tiles, [0, DP) and a tail [DP, DP + DT) (see _head_tiles), each product two dots."""
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    k, v, bias = _keys(kv_ptr, bias_ptr, b, h, L, H, D, skv_b, skv_n, DP, BLOCK_L)
    kt = tl.trans(k)
    d = tl.arange(0, DP)
    dmask = (d < D)[None, :]
    q_base = q_ptr + b.to(tl.int64) * sq_b + h * D + d[None, :]
    o_base = o_ptr + b.to(tl.int64) * N * H * D + h * D + d[None, :]  # out: contiguous (B, N, C)
    if DT > 0:
        k_t, v_t = _kv_cols(kv_ptr, b, h, L, H, D, skv_b, skv_n, tl.arange(0, BLOCK_L), DP, DT)
        kt_t = tl.trans(k_t)
        dt = DP + tl.arange(0, DT)
        tmask = (dt < D)[None, :]
        q_base_t = q_ptr + b.to(tl.int64) * sq_b + h * D + dt[None, :]
        o_base_t = o_ptr + b.to(tl.int64) * N * H * D + h * D + dt[None, :]
    for mb in tl.range(tl.program_id(0), tl.cdiv(N, BLOCK_M), tl.num_programs(0), num_stages=STAGES):
        m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        mm = (m < N)[:, None] & dmask
        q = tl.load(q_base + m[:, None] * sq_n, mask=mm, other=0.0)  # (BLOCK_M, DP)
        if DT > 0:
            mt = (m < N)[:, None] & tmask
            q_t = tl.load(q_base_t + m[:, None] * sq_n, mask=mt, other=0.0)  # (BLOCK_M, DT)
            p, den, _ = _softmax_of(_dot_acc(q, kt, _dot(q_t, kt_t, IEEE), IEEE), bias, qk_scale)
            o_t = _dot(p.to(v.dtype), v_t, IEEE) / den[:, None]
            tl.store(o_base_t + m[:, None] * (H * D), o_t.to(o_ptr.dtype.element_ty), mask=mt)
        else:
            p, den, _ = _softmax(q, kt, bias, qk_scale, IEEE)
        o = _dot(p.to(v.dtype), v, IEEE) / den[:, None]
        tl.store(o_base + m[:, None] * (H * D), o.to(o_ptr.dtype.element_ty), mask=mm)


@triton.jit
def _bwd_dq(q_ptr, kv_ptr, bias_ptr, do_ptr, dq_ptr, stat_ptr, N, L, H, sq_b, sq_n, skv_b, skv_n, qk_scale,
            sm_scale, D: tl.constexpr, DP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr,
            STAGES: tl.constexpr, IEEE: tl.constexpr):
    """dq of query blocks program_id(0), + num_programs(0), ... of (image, head) program_id(1), and each query's
    log2-sum-exp2 and delta = rowsum(p * dp) into stat (B*H, 2, N) for _bwd_dkv."""
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    k, v, bias = _keys(kv_ptr, bias_ptr, b, h, L, H, D, skv_b, skv_n, DP, BLOCK_L)
    kt = tl.trans(k)
    vt = tl.trans(v)
    d = tl.arange(0, DP)
    dmask = (d < D)[None, :]
    C = H * D
    q_base = q_ptr + b.to(tl.int64) * sq_b + h * D + d[None, :]
    t_off = b.to(tl.int64) * N * C + h * D + d[None, :]  # dout and dq: contiguous (B, N, C)
    stat = stat_ptr + bh.to(tl.int64) * 2 * N
    for mb in tl.range(tl.program_id(0), tl.cdiv(N, BLOCK_M), tl.num_programs(0), num_stages=STAGES):
        m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        mm = (m < N)[:, None] & dmask
        q = tl.load(q_base + m[:, None] * sq_n, mask=mm, other=0.0)  # (BLOCK_M, DP)
        do = tl.load(do_ptr + t_off + m[:, None] * C, mask=mm, other=0.0)
        p, den, top = _softmax(q, kt, bias, qk_scale, IEEE)  # (BLOCK_M, BLOCK_L)
        p = p / den[:, None]
        dp = _dot(do, vt, IEEE)
        delta = tl.sum(p * dp, 1)
        ds = p * (dp - delta[:, None])  # zero on key slots past L (p = 0)
        dq = _dot(ds.to(k.dtype), k, IEEE) * sm_scale
        tl.store(dq_ptr + t_off + m[:, None] * C, dq.to(dq_ptr.dtype.element_ty), mask=mm)
        tl.store(stat + m, top + tl.log2(den), mask=m < N)
        tl.store(stat + N + m, delta, mask=m < N)


@triton.jit
def _bwd_dkv(q_ptr, kv_ptr, bias_ptr, do_ptr, stat_ptr, dkv_ptr, N, L, H, sq_b, sq_n, skv_b, skv_n, qk_scale,
             sm_scale, D: tl.constexpr, DP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
             STAGES: tl.constexpr, IEEE: tl.constexpr):
    """dk, dv of keys program_id(0) * BLOCK_K + [0, BLOCK_K) of (image, head) program_id(1), over every query:
    the transposed tile p^T = exp2(k q^T + bias - lse) from _bwd_dq's statistics (FlashAttention-2's dk/dv
    loop), written once, in place."""
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    C = H * D
    k, v, bias = _keys(kv_ptr, bias_ptr, b, h, L, H, D, skv_b, skv_n, DP, BLOCK_K, tl.program_id(0) * BLOCK_K)
    d = tl.arange(0, DP)
    qt_base = q_ptr + b.to(tl.int64) * sq_b + h * D + d[:, None]  # q^T tiles (DP, BLOCK_M)
    do_base = do_ptr + b.to(tl.int64) * N * C + h * D + d[None, :]
    stat = stat_ptr + bh.to(tl.int64) * 2 * N
    dk = tl.zeros((BLOCK_K, DP), tl.float32)
    dv = tl.zeros((BLOCK_K, DP), tl.float32)
    for mb in tl.range(0, tl.cdiv(N, BLOCK_M), num_stages=STAGES):
        m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        qt = tl.load(qt_base + m[None, :] * sq_n, mask=(d < D)[:, None] & (m < N)[None, :], other=0.0)
        lse = tl.load(stat + m, mask=m < N, other=float("inf"))  # rows past N: p = 0
        pt = tl.exp2(_dot(k, qt, IEEE) * qk_scale + bias[:, None] - lse[None, :])  # (BLOCK_K, BLOCK_M)
        do = tl.load(do_base + m[:, None] * C, mask=(m < N)[:, None] & (d < D)[None, :], other=0.0)
        dv += _dot(pt.to(do.dtype), do, IEEE)
        delta = tl.load(stat + N + m, mask=m < N, other=0.0)
        dst = pt * (_dot(v, tl.trans(do), IEEE) - delta[None, :])
        dk += _dot(dst.to(qt.dtype), tl.trans(qt), IEEE)
    lk = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    km = (lk < L)[:, None] & (d < D)[None, :]
    base = dkv_ptr + b.to(tl.int64) * L * 2 * C + h * D + lk[:, None] * (2 * C) + d[None, :]  # (B, L, 2C)
    tl.store(base, (dk * sm_scale).to(dkv_ptr.dtype.element_ty), mask=km)
    tl.store(base + C, dv.to(dkv_ptr.dtype.element_ty), mask=km)


_fwd_launch = Launcher(_fwd)
_bwd_dq_launch = Launcher(_bwd_dq)
_bwd_dkv_launch = Launcher(_bwd_dkv)


def _config(kind: str, dtype: torch.dtype) -> dict:
    return CONFIG[kind + ("_fp32" if dtype == torch.float32 else "")]


def _plan(B: int, N: int, L: int, heads: int, kind: str, dtype: torch.dtype, device: int) -> tuple[int, tuple, tuple]:
    """-> (programs an (image, head), constexprs, launch options) of the forward ("fwd") or the dq kernel."""
    cfg = _config(kind, dtype)
    n_blocks = cdiv(N, cfg["BLOCK_M"])
    split = max(1, min(n_blocks, cdiv(cfg["PROGRAMS_PER_SM"] * sm_count(device), B * heads)))
    consts = (cfg["BLOCK_M"], _tile(L), int(cfg["STAGES"]))
    return split, consts, (("num_warps", cfg["num_warps"]),)


def _tile(n: int) -> int:
    """The power-of-two tile (at least tl.dot's 16) that holds n keys or head channels."""
    return max(16, next_pow2(n))


def _head_tiles(D: int) -> tuple[int, int]:
    """(DP, DT): the forward's tiles of a head's D channels, one power of two (DT 0), or the largest power of two
    below D and a tail tile where the two are narrower: Sana-0.6B's 72 channels as 64 + 16 instead of 128, so its
    two products a query block run on 80 channels, not 128 of which 56 are masked zeros."""
    return pow2_tiles(D, smallest=16)  # tl.dot's smallest tile, as _tile


def _scalars(q: torch.Tensor, kv: torch.Tensor, heads: int, backward: bool) -> tuple:
    """The kernels' int and float arguments: N, L, H, the row strides and the log2-unit score scale (and the
    gradients' 1 / sqrt(D) in backward)."""
    d = q.shape[-1] // heads
    out = (q.shape[1], kv.shape[1], heads, q.stride(0), q.stride(1), kv.stride(0), kv.stride(1), LOG2E / math.sqrt(d))
    return (*out, 1.0 / math.sqrt(d)) if backward else out


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    """The kernels take any row strides but need the channels contiguous."""
    return t if t.stride(-1) == 1 else t.contiguous()


@kernel_op("sana::cross_attention")
def _cross_attention_op(q: torch.Tensor, kv: torch.Tensor, bias: torch.Tensor, heads: int) -> torch.Tensor:
    """-> out (B, N, C) contiguous."""
    q, kv, bias = _unit_last(q), _unit_last(kv), bias.contiguous()
    B, N, C = q.shape
    L, D = kv.shape[1], C // heads
    o = q.new_empty((B, N, C))
    if o.numel():
        dev = device_index(q)
        split, consts, options = _plan(B, N, L, heads, "fwd", q.dtype, dev)
        dp, dt = _head_tiles(D) if HEAD_SPLIT else (_tile(D), 0)
        _fwd_launch((split, B * heads), dev, (q, kv, bias, o), _scalars(q, kv, heads, backward=False),
                    (D, dp, *consts, q.dtype == torch.float32, dt), options)
    return o


@_cross_attention_op.register_fake
def _(q, kv, bias, heads):
    return q.new_empty(q.shape)


def _backward_dq(do, q, kv, bias, heads) -> tuple[torch.Tensor, torch.Tensor]:
    """-> dq (B, N, C) and the per-query statistics (B*heads, 2, N) float32 that _backward_dkv reads."""
    B, N, C = q.shape
    L, D = kv.shape[1], C // heads
    dq = q.new_empty(q.shape)
    stat = q.new_empty((B * heads, 2, N), dtype=torch.float32)
    dev = device_index(q)
    split, consts, options = _plan(B, N, L, heads, "bwd_dq", q.dtype, dev)
    _bwd_dq_launch((split, B * heads), dev, (q, kv, bias, do, dq, stat), _scalars(q, kv, heads, backward=True),
                   (D, _tile(D), *consts, q.dtype == torch.float32), options)
    return dq, stat


def _backward_dkv(do, q, kv, bias, stat, heads) -> torch.Tensor:
    """-> dkv (B, L, 2C): a program a BLOCK_K keys of an (image, head), each key's gradient written once."""
    B, N, C = q.shape
    L, D = kv.shape[1], C // heads
    dkv = kv.new_empty((B, L, 2 * C))
    cfg = _config("bwd_dkv", q.dtype)
    block_k = min(cfg["BLOCK_K"], _tile(L))
    dev = device_index(q)
    _bwd_dkv_launch((cdiv(L, block_k), B * heads), dev, (q, kv, bias, do, stat, dkv),
                    _scalars(q, kv, heads, backward=True),
                    (D, _tile(D), cfg["BLOCK_M"], block_k, int(cfg["STAGES"]), q.dtype == torch.float32),
                    (("num_warps", cfg["num_warps"]),))
    return dkv


@kernel_op("sana::cross_attention_backward")
def _cross_attention_backward_op(do: torch.Tensor, q: torch.Tensor, kv: torch.Tensor, bias: torch.Tensor,
                                 heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> dq (B, N, C) and dkv (B, L, 2C), contiguous: the dq kernel, then the dk/dv kernel on its statistics."""
    q, kv, bias, do = _unit_last(q), _unit_last(kv), bias.contiguous(), do.contiguous()
    if not q.numel():
        return q.new_empty(q.shape), kv.new_zeros(kv.shape)
    dq, stat = _backward_dq(do, q, kv, bias, heads)
    return dq, _backward_dkv(do, q, kv, bias, stat, heads)


@_cross_attention_backward_op.register_fake
def _(do, q, kv, bias, heads):
    return q.new_empty(q.shape), kv.new_empty(kv.shape)


def _setup(ctx, inputs, output):
    q, kv, bias, ctx.heads = inputs
    ctx.save_for_backward(q, kv, bias)


def _backward(ctx, do):
    q, kv, bias = ctx.saved_tensors
    dq, dkv = _cross_attention_backward_op.within(ctx)(do, q, kv, bias, ctx.heads)
    return dq, dkv, None, None


_cross_attention_op.register_autograd(_backward, setup_context=_setup)


def cross_attention_triton(q: torch.Tensor, kv: torch.Tensor, bias: torch.Tensor, heads: int) -> torch.Tensor:
    """q (B, N, C), kv (B, L, 2C), any row strides; bias (B, L) -> out (B, N, C) contiguous."""
    if not supports(q, kv, heads):
        raise ValueError(f"triton cross-attention takes up to {MAX_KEYS} keys, head dims up to {MAX_HEAD_DIM} and "
                         f"q, kv of one float dtype; got {kv.shape[1]} keys, head dim {q.shape[-1] // heads}, "
                         f"{q.dtype} and {kv.dtype}")
    if not (supported_device(q) and q.device == kv.device == bias.device):
        raise ValueError("triton cross-attention needs q, kv and bias on one CUDA device (or on the CPU with "
                         "TRITON_INTERPRET=1)")
    if not on_current_device(q):  # Triton launches on the current device's stream
        with torch.cuda.device(q.device):
            return cross_attention_triton(q, kv, bias, heads)
    return _cross_attention_op(q, kv, bias, int(heads))
