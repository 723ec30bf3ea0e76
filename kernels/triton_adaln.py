"""Fused Triton kernels for AdaLN-single's modulate and gated residual (see kernels.adaln), forward and
backward, each a torch.library custom op with a fake implementation (torch.compile traces them without
graph breaks; autograd, activation checkpointing and FSDP2 see ordinary ops).

    modulate fwd   x, shift, scale         -> y = (x - mean) * rstd * (1 + scale) + shift, mean, rstd
                   (inference, for a W8A8 linear: y quantised per token instead, q and its row scales)
    modulate bwd   dy, x, scale, mean, rstd [, dres] -> dx (+ dres), dshift = sum_n dy, dscale = sum_n dy * xhat
                   [, dbias = sum_n dx: the column sums of the dx written]
    add_modulate   x, branch, shift, scale -> s = x + branch and modulate(s) in one pass; its backward is
                   modulate's with s's own gradient added in the kernel (x and branch both get the sum ds)
                   (with a gate, s = x + gate * branch: a block's last gated residual and the next block's
                   modulate in one pass; backward then runs the residual's backward kernel on ds)
                   (with a branch bias: also dbias = sum_b sum_n ds, the column sums of the dx it writes, for
                   a bias that the branch's last GEMM added with its gradient cut, kernels.linear.linear_bias_out)
    residual fwd   x, gate, branch         -> x + gate * branch
    residual bwd   dy, gate, branch        -> dbranch = gate * dy, dgate = sum_n dy * branch   (dx = dy)
                   (with a branch bias: also dbias = sum_b gate_b * sum_n dy, the column sums of dbranch, for
                   a bias that the branch's last GEMM added with its gradient cut, kernels.linear.linear_bias_out)

Each forward reads its inputs once and writes y once in x's dtype (bf16 in training), the float32
LayerNorm output and the float32 product that eager PyTorch materialises under autocast never exist.
The backward kernels loop over the tokens of one image, keep the per-channel sums (dshift, dscale,
dgate, dbias) in float32 registers and write one partial row per program, summed afterwards (a few MB,
deterministic: no atomics).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.int8_gemm import FORMATS
from kernels.launch import (
    Launcher,
    cdiv,
    device_index,
    kernel_op,
    next_pow2,
    on_current_device,
    partial_sums,
    pow2_tiles,
    sm_count,
    supported_device,
)

# Per kernel: ELEMENTS of a (rows, channels) tile (rows = ELEMENTS // next_pow2(C), 1 to 64) and its warps;
# PROGRAMS_PER_SM: the backward reductions over tokens get enough programs to fill the GPU.
# `python bench/bench_adaln.py --sweep` times the choices at Sana-0.6B's batch-16 shape without the host (CUDA
# graph replays), each checked against a float32 PyTorch reference; these are set from it by hand
# (bench/results/adaln_h200.json): the forward modulate at one row and two warps a program, 29.9 us against
# 37.4 us for 4 rows at 8 warps (the row statistics then reduce within two warps instead of across eight); the
# other three were best, or within 1%, where they were: residual forward at 105% of the HBM roofline, residual
# backward 81%, modulate backward 50%. Then the backward reductions' tile loops became Triton software pipelines
# (STAGES; `--sweep --kernels modulate_bwd,residual_bwd`, bench/results/adaln_h200_stages.json): modulate backward
# 59.1 -> 51.1 us at 4 warps and 3 stages (57% of its roofline); the residual backward
# gained nothing (36.7 us at 1 stage, 37.0 at 3), so it stays unpipelined. Swept again on an H100 at both
# Sana-0.6B's shape and Sana-1.6B's (x (8, 1024, 2240): `--shape 8,1024,2240`; bench/results/adaln_h100*.json):
# the backward reductions at one row a tile (ELEMENTS 2048) and 4 warps were best or within 2% at both; at 1.6B's
# width the 8192-element tiles (two rows there) had left modulate backward at 69.8 us and residual backward at
# 54.1 us, now 58.5 and 46.1 (bench/results/adaln_h100_1.6b_config.json; 0.8 ms a 1.6B step); at 0.6B's width
# 57.1 -> 54.0 and 46.8 -> 46.7 us (adaln_h100_config.json).
# SPLIT (the modulate kernels): a row that fills its tile alone (BLOCK_R 1) is two column tiles, a power of two and
# a tail (see _columns), instead of one next_pow2(C) tile ~45% masked at both Sana widths. modulate_bwd_acc is the
# backward as add_modulate and the tee run it (dres added, add_modulate's bias row too), timed on its own. H100
# sweep at both widths (`--sweep --shape 8,1024,2240` and `16,1024,1152`, bench/results/adaln_h100_split.txt):
# forward modulate 38.1 -> 33.0 us (2240) and add_modulate 57.9 -> 53.5 (98% of its roofline); the backward with
# dres at 2240 split at 4 warps 77.7 us (92.8 before, one 4096 tile at 8 warps: 4 warps spilled there), at 1152
# two rows a tile unsplit 74.5 (87.8 before; split 85.1); the plain backward is best unsplit at both (57.4 / 53.5
# against 63.2 / 66.0 split).
CONFIG = {
    "modulate_fwd": {"ELEMENTS": 1024, "num_warps": 2, "SPLIT": True},
    "modulate_bwd": {"ELEMENTS": 2048, "num_warps": 4, "PROGRAMS_PER_SM": 4, "STAGES": 3, "SPLIT": False},
    "modulate_bwd_acc": {"ELEMENTS": 4096, "num_warps": 4, "PROGRAMS_PER_SM": 4, "STAGES": 3, "SPLIT": True},
    "residual_fwd": {"ELEMENTS": 8192, "num_warps": 8},
    "residual_bwd": {"ELEMENTS": 2048, "num_warps": 4, "PROGRAMS_PER_SM": 4, "STAGES": 3},
}


@triton.jit
def _sum_rows(x_ptr, branch_ptr, sum_ptr, gate_ptr, base, cols, b, s_gate, mask, ADD: tl.constexpr,
              GATE: tl.constexpr):
    """x at (rows base, cols) in float32; with ADD, x + branch (GATE: x + gate * branch, as the gated residual's
    kernel computes it), stored to sum_ptr in x's dtype first (the residual stream) and returned as stored, so
    that backward's reload of it sees the same values."""
    offs = base + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    if ADD:
        branch = tl.load(branch_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if GATE:
            branch = tl.load(gate_ptr + b * s_gate + cols[None, :], mask=mask, other=0.0).to(tl.float32) * branch
        x = (x.to(tl.float32) + branch).to(x.dtype)
        tl.store(sum_ptr + offs, x, mask=mask)
    return x.to(tl.float32)


@triton.jit
def _modulate_cols(xc, rstd, shift_ptr, scale_ptr, b, s_shift, s_scale, cols, mask):
    scale = tl.load(scale_ptr + b * s_scale + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    shift = tl.load(shift_ptr + b * s_shift + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    return xc * rstd[:, None] * (1.0 + scale) + shift


@triton.jit
def _quantise_store(q_ptr, y, amax, offs, mask, QUANT: tl.constexpr, QMAX: tl.constexpr):
    v = y * (QMAX / amax)[:, None]
    if QUANT == 2:
        q = tl.minimum(tl.maximum(v, -QMAX), QMAX).to(tl.float8e4nv)
    else:
        r = tl.where(v >= 0, v + 0.5, v - 0.5)  # the int cast truncates: this rounds half away from 0
        q = tl.minimum(tl.maximum(r, -QMAX), QMAX).to(tl.int8)
    tl.store(q_ptr + offs, q, mask=mask)


@triton.jit
def _modulate_fwd(x_ptr, shift_ptr, scale_ptr, y_ptr, mean_ptr, rstd_ptr, q_ptr, qs_ptr, branch_ptr, sum_ptr, gate_ptr,
                  M, N, C, s_shift, s_scale, s_gate, eps, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                  BLOCK_T: tl.constexpr, QUANT: tl.constexpr, QMAX: tl.constexpr, ADD: tl.constexpr,
                  GATE: tl.constexpr):
    """QUANT 0: y, mean, rstd. QUANT 1 (int8) / 2 (fp8 e4m3): y quantised per row for a W8A8 linear instead,
    q (M, C) and its scale (M,), the rule of kernels.int8_gemm.quantize_rows_reference applied to the float32 y
    (inference: no y, no statistics written). ADD: the rows modulated are x + branch (GATE: x + gate * branch),
    also written to sum_ptr.
    BLOCK_T > 0: the row is two column tiles, [0, BLOCK_C) and a tail [BLOCK_C, BLOCK_C + BLOCK_T) (see _tile)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < M
    base = rows.to(tl.int64)[:, None] * C
    cols = tl.arange(0, BLOCK_C)
    mask = rmask[:, None] & (cols < C)[None, :]
    b = (rows // N).to(tl.int64)[:, None]
    x = _sum_rows(x_ptr, branch_ptr, sum_ptr, gate_ptr, base, cols, b, s_gate, mask, ADD, GATE)
    total = tl.sum(x, axis=1)
    if BLOCK_T > 0:
        tcols = BLOCK_C + tl.arange(0, BLOCK_T)
        tmask = rmask[:, None] & (tcols < C)[None, :]
        xt = _sum_rows(x_ptr, branch_ptr, sum_ptr, gate_ptr, base, tcols, b, s_gate, tmask, ADD, GATE)
        total += tl.sum(xt, axis=1)
    mean = total / C
    xc = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1)
    if BLOCK_T > 0:
        xct = tl.where(tmask, xt - mean[:, None], 0.0)
        var += tl.sum(xct * xct, axis=1)
    rstd = 1.0 / tl.sqrt(var / C + eps)
    y = _modulate_cols(xc, rstd, shift_ptr, scale_ptr, b, s_shift, s_scale, cols, mask)
    if BLOCK_T > 0:
        yt = _modulate_cols(xct, rstd, shift_ptr, scale_ptr, b, s_shift, s_scale, tcols, tmask)
    if QUANT == 0:
        tl.store(y_ptr + base + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
        if BLOCK_T > 0:
            tl.store(y_ptr + base + tcols[None, :], yt.to(y_ptr.dtype.element_ty), mask=tmask)
        tl.store(mean_ptr + rows, mean, mask=rmask)
        tl.store(rstd_ptr + rows, rstd, mask=rmask)
    else:
        amax = tl.max(tl.where(mask, tl.abs(y), 0.0), axis=1)
        if BLOCK_T > 0:
            amax = tl.maximum(amax, tl.max(tl.where(tmask, tl.abs(yt), 0.0), axis=1))
        amax = tl.maximum(amax, 1e-12)
        _quantise_store(q_ptr, y, amax, base + cols[None, :], mask, QUANT, QMAX)
        if BLOCK_T > 0:
            _quantise_store(q_ptr, yt, amax, base + tcols[None, :], tmask, QUANT, QMAX)
        tl.store(qs_ptr + rows, amax / QMAX, mask=rmask)


@triton.jit
def _xhat_dy(dy_ptr, x_ptr, offs, mask, mean, rstd):
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0), dy


@triton.jit
def _store_dx(dx_ptr, dres_ptr, g, xhat, c1, c2, rstd, offs, mask, ACC: tl.constexpr):
    dx = (g - c2[:, None] - xhat * c1[:, None]) * rstd[:, None]
    if ACC:
        dx += tl.load(dres_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    return dx


@triton.jit
def _modulate_bwd(dy_ptr, x_ptr, scale_ptr, mean_ptr, rstd_ptr, dx_ptr, part_ptr, dres_ptr, N, C, s_scale,
                  tiles_per_prog, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr,
                  ACC: tl.constexpr, STAGES: tl.constexpr, BIAS_SUM: tl.constexpr):
    """ACC: dx also gets dres, the gradient x receives from its other consumers (add_modulate's residual
    stream), so that autograd needs no separate add of the two. STAGES: Triton's software pipeline over the
    tile loop (the next tiles' loads in flight while one is reduced, as in kernels.triton_mixffn).
    BIAS_SUM: a third partial row, the column sums of the final dx (the sum's gradient ds with ACC) over the
    program's tokens, taken in float32 before dx's rounding: the gradient of a bias already in add_modulate's
    branch, which the branch's linear would otherwise take with a ones^T ds GEMM of its own.
    BLOCK_T > 0: the row is two column tiles, as in _modulate_fwd; each keeps its own column sums."""
    b = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    one_scale = 1.0 + tl.load(scale_ptr + b * s_scale + cols, mask=cmask, other=0.0).to(tl.float32)
    dshift = tl.zeros((BLOCK_C,), dtype=tl.float32)
    dscale = tl.zeros((BLOCK_C,), dtype=tl.float32)
    dsum = tl.zeros((BLOCK_C,), dtype=tl.float32)
    if BLOCK_T > 0:
        tcols = BLOCK_C + tl.arange(0, BLOCK_T)
        tcmask = tcols < C
        one_scale_t = 1.0 + tl.load(scale_ptr + b * s_scale + tcols, mask=tcmask, other=0.0).to(tl.float32)
        dshift_t = tl.zeros((BLOCK_T,), dtype=tl.float32)
        dscale_t = tl.zeros((BLOCK_T,), dtype=tl.float32)
        dsum_t = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for i in tl.range(tiles_per_prog, num_stages=STAGES):
        n = (chunk * tiles_per_prog + i) * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = n < N
        rows = b * N + n
        base = rows[:, None] * C
        mask = rmask[:, None] & cmask[None, :]
        mean = tl.load(mean_ptr + rows, mask=rmask, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=rmask, other=0.0)
        xhat, dy = _xhat_dy(dy_ptr, x_ptr, base + cols[None, :], mask, mean, rstd)
        dshift += tl.sum(dy, axis=0)
        dscale += tl.sum(dy * xhat, axis=0)
        g = dy * one_scale[None, :]
        c1 = tl.sum(g * xhat, axis=1)
        c2 = tl.sum(g, axis=1)
        if BLOCK_T > 0:
            tmask = rmask[:, None] & tcmask[None, :]
            xhat_t, dy_t = _xhat_dy(dy_ptr, x_ptr, base + tcols[None, :], tmask, mean, rstd)
            dshift_t += tl.sum(dy_t, axis=0)
            dscale_t += tl.sum(dy_t * xhat_t, axis=0)
            g_t = dy_t * one_scale_t[None, :]
            c1 += tl.sum(g_t * xhat_t, axis=1)
            c2 += tl.sum(g_t, axis=1)
        c1 = c1 / C
        c2 = c2 / C
        # padding rows add 0 to the sums below (rstd and dres load as 0 there); padding columns are never stored
        dx = _store_dx(dx_ptr, dres_ptr, g, xhat, c1, c2, rstd, base + cols[None, :], mask, ACC)
        if BIAS_SUM:
            dsum += tl.sum(dx, axis=0)
        if BLOCK_T > 0:
            dx_t = _store_dx(dx_ptr, dres_ptr, g_t, xhat_t, c1, c2, rstd, base + tcols[None, :], tmask, ACC)
            if BIAS_SUM:
                dsum_t += tl.sum(dx_t, axis=0)
    part = part_ptr + (b * tl.num_programs(1) + chunk) * (3 if BIAS_SUM else 2) * C
    tl.store(part + cols, dshift, mask=cmask)
    tl.store(part + C + cols, dscale, mask=cmask)
    if BIAS_SUM:  # rows (dshift, dscale, dbias) a program
        tl.store(part + 2 * C + cols, dsum, mask=cmask)
    if BLOCK_T > 0:
        tl.store(part + tcols, dshift_t, mask=tcmask)
        tl.store(part + C + tcols, dscale_t, mask=tcmask)
        if BIAS_SUM:
            tl.store(part + 2 * C + tcols, dsum_t, mask=tcmask)


@triton.jit
def _residual_fwd(x_ptr, gate_ptr, branch_ptr, y_ptr, M, N, C, s_gate,
                  BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    mask = (rows < M)[:, None] & (cols < C)[None, :]
    offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
    b = (rows // N).to(tl.int64)[:, None]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    branch = tl.load(branch_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(gate_ptr + b * s_gate + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, (x + gate * branch).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _residual_bwd(dy_ptr, gate_ptr, branch_ptr, dbranch_ptr, part_ptr, N, C, s_gate, tiles_per_prog,
                  BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, STAGES: tl.constexpr, BIAS_SUM: tl.constexpr):
    """BIAS_SUM: a second partial row, dbranch's column sum over the program's tokens (the gradient of a bias
    already in branch), taken as gate * sum_n dy: the gate is one row for the whole program, so it costs an
    add an element, where the branch's linear would run a ones^T dbranch GEMM of its own."""
    b = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    gate = tl.load(gate_ptr + b * s_gate + cols, mask=cmask, other=0.0).to(tl.float32)
    dgate = tl.zeros((BLOCK_C,), dtype=tl.float32)
    dsum = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for i in tl.range(tiles_per_prog, num_stages=STAGES):
        n = (chunk * tiles_per_prog + i) * BLOCK_R + tl.arange(0, BLOCK_R)
        mask = (n < N)[:, None] & cmask[None, :]
        offs = (b * N + n)[:, None] * C + cols[None, :]
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        branch = tl.load(branch_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dgate += tl.sum(dy * branch, axis=0)
        if BIAS_SUM:
            dsum += tl.sum(dy, axis=0)
        tl.store(dbranch_ptr + offs, (dy * gate[None, :]).to(dbranch_ptr.dtype.element_ty), mask=mask)
    if BIAS_SUM:  # rows (dgate, dbias) a program, as modulate backward's (dshift, dscale)
        part = part_ptr + (b * tl.num_programs(1) + chunk) * 2 * C
        tl.store(part + cols, dgate, mask=cmask)
        tl.store(part + C + cols, gate * dsum, mask=cmask)
    else:
        tl.store(part_ptr + (b * tl.num_programs(1) + chunk) * C + cols, dgate, mask=cmask)


_modulate_fwd_launch = Launcher(_modulate_fwd)
_modulate_bwd_launch = Launcher(_modulate_bwd)
_residual_fwd_launch = Launcher(_residual_fwd)
_residual_bwd_launch = Launcher(_residual_bwd)


def _tile(C: int, kernel: str) -> tuple[int, int, int, tuple]:
    """(BLOCK_R, BLOCK_C, BLOCK_T, launch options): whole rows of C channels, several rows a program when C is
    small, as one tile or (kernels with SPLIT) two, see _columns; fewer warps where the tile is small (a warp per
    1024 elements at most)."""
    cfg = CONFIG[kernel]
    full = next_pow2(C)
    block_r = max(1, min(64, cfg["ELEMENTS"] // full))
    block_c, block_t = _columns(C, block_r, kernel) if "SPLIT" in cfg else (full, 0)
    return block_r, block_c, block_t, (("num_warps", max(1, min(cfg["num_warps"], block_r * full // 256))),)


def _columns(C: int, block_r: int, kernel: str) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_T) for the modulate kernels, whose row statistics need the whole row in one program: one
    power-of-two tile of C channels (BLOCK_T 0), or, where CONFIG[kernel] splits and a row fills its tile alone,
    the largest power of two below C and a tail tile for the rest where that masks fewer lanes. A masked lane
    still issues its instructions: Sana-1.6B's 2240 channels on one 4096-wide tile are 45% masked, as 2048 + 256
    3%; Sana-0.6B's 1152 (a 2048-wide tile) are 1024 + 128 exactly."""
    if not (CONFIG[kernel]["SPLIT"] and block_r == 1):
        return next_pow2(C), 0
    return pow2_tiles(C)


def _reduce_grid(B: int, N: int, block_r: int, device: int, kernel: str) -> tuple[int, int]:
    """(chunks of one image's tokens, tiles of BLOCK_R rows per chunk) for the backward reductions."""
    n_tiles = cdiv(N, block_r)
    want = cdiv(CONFIG[kernel]["PROGRAMS_PER_SM"] * sm_count(device), B)
    tiles_per = cdiv(n_tiles, min(n_tiles, max(1, want)))
    return cdiv(n_tiles, tiles_per), tiles_per


def _rows(t: torch.Tensor, B: int, C: int, what: str) -> tuple[torch.Tensor, int]:
    """A (B or 1, [1,] C) modulation row tensor as (rows, C) with unit channel stride, and its batch stride
    (0 to broadcast one row over the batch)."""
    if t.shape[-1] != C or t.numel() not in (C, B * C) or (t.dim() == 3 and t.shape[1] != 1) or t.dim() > 3:
        raise ValueError(f"{what} must be (B, 1, C) or (B, C) (or batch 1) with B={B}, C={C}, got {tuple(t.shape)}")
    t = t.reshape(-1, C)
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t, (t.stride(0) if t.shape[0] > 1 else 0)


def _check(x: torch.Tensor, what: str) -> torch.Tensor:
    if x.dim() != 3:
        raise ValueError(f"{what} must be (B, N, C), got {tuple(x.shape)}")
    if not supported_device(x):
        raise ValueError(f"{what}: the Triton kernels need a CUDA tensor (or the CPU under TRITON_INTERPRET=1)")
    return x.contiguous()


def _fit(d: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-image sums (B, C) -> the gradient of a modulation row tensor of like's shape."""
    if like.numel() != d.numel():  # one row broadcast over the batch
        d = d.sum(0, keepdim=True)
    return d.reshape(like.shape).to(like.dtype)


def _reduce_rows(part: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-image partial sums (B, chunks, C) -> the gradient of a modulation row tensor of like's shape."""
    return _fit(part.sum(1), like)


def _reduce_shift_scale(part: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor):
    """modulate backward's partial sums (B, chunks, 2, C) -> (dshift, dscale), one reduction over the chunks."""
    d = part.sum(1)  # (B, 2, C)
    return _fit(d[:, 0], shift), _fit(d[:, 1], scale)


def _reduce_shift_scale_bias(part: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, bias_dtype: torch.dtype):
    """With bias_sum, (B, chunks, 3, C) -> (dshift, dscale, dbias): one reduction over the chunks for all three,
    the bias's row summed over the batch too."""
    d = part.sum(1)  # (B, 3, C)
    return _fit(d[:, 0], shift), _fit(d[:, 1], scale), d[:, 2].sum(0).to(bias_dtype)


def _modulate_rows(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
                   branch: torch.Tensor | None = None, gate: torch.Tensor | None = None):
    """The forward modulate of x (of x + branch, or x + gate * branch, also returned, when branch is given)
    -> sum, y, mean, rstd."""
    B, N, C = x.shape
    shift2, s_shift = _rows(shift, B, C, "modulate shift")
    scale2, s_scale = _rows(scale, B, C, "modulate scale")
    gate2, s_gate = (x, 0) if gate is None else _rows(gate, B, C, "add_modulate gate")
    y = x.new_empty(x.shape)
    total = None if branch is None else x.new_empty(x.shape)
    mean = x.new_empty((B * N,), dtype=torch.float32)
    rstd = torch.empty_like(mean)
    if x.numel():
        block_r, block_c, block_t, opts = _tile(C, "modulate_fwd")
        add = (x, x) if branch is None else (branch, total)
        _modulate_fwd_launch((cdiv(B * N, block_r),), device_index(x),
                             (x, shift2, scale2, y, mean, rstd, y, mean, *add, gate2),
                             (B * N, N, C, s_shift, s_scale, s_gate, eps),
                             (block_r, block_c, block_t, 0, 1.0, branch is not None, gate is not None), opts)
    return total, y, mean, rstd


@kernel_op("sana::modulate")
def _modulate_op(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _modulate_rows(_check(x, "modulate x"), shift, scale, eps)[1:]


@_modulate_op.register_fake
def _(x, shift, scale, eps):
    B, N, _ = x.shape
    mean = x.new_empty((B * N,), dtype=torch.float32)
    return x.new_empty(x.shape), mean, torch.empty_like(mean)


_QUANT_CODE = {"int8": 1, "fp8": 2}  # the kernel's QUANT for each of kernels.int8_gemm.FORMATS


@kernel_op("sana::modulate_quant")
def _modulate_quant_op(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
                       fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Inference: modulate's output quantised per token for a W8A8 linear -> q (B*N, C), scale (B*N,) float32."""
    x = _check(x, "modulate x")
    B, N, C = x.shape
    if fmt not in FORMATS:
        raise ValueError(f"modulate: quantisation format must be one of {sorted(FORMATS)}, got {fmt!r}")
    (dtype, qmax), code = FORMATS[fmt], _QUANT_CODE[fmt]
    shift2, s_shift = _rows(shift, B, C, "modulate shift")
    scale2, s_scale = _rows(scale, B, C, "modulate scale")
    q = torch.empty((B * N, C), dtype=dtype, device=x.device)
    qs = torch.empty((B * N,), dtype=torch.float32, device=x.device)
    if x.numel():
        block_r, block_c, block_t, opts = _tile(C, "modulate_fwd")
        _modulate_fwd_launch((cdiv(B * N, block_r),), device_index(x), (x, shift2, scale2, x, qs, qs, q, qs, x, x, x),
                             (B * N, N, C, s_shift, s_scale, 0, eps),
                             (block_r, block_c, block_t, code, qmax, False, False), opts)
    return q, qs


@_modulate_quant_op.register_fake
def _(x, shift, scale, eps, fmt):
    B, N, C = x.shape
    return x.new_empty((B * N, C), dtype=FORMATS[fmt][0]), x.new_empty((B * N,), dtype=torch.float32)


def _bwd_kernel(dres: torch.Tensor | None) -> str:
    """The CONFIG entry of modulate's backward: with dres (add_modulate's, the tee's) tiled on its own."""
    return "modulate_bwd" if dres is None else "modulate_bwd_acc"


@kernel_op("sana::modulate_backward")
def _modulate_backward_op(dy: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor,
                          rstd: torch.Tensor, dres: torch.Tensor | None = None,
                          bias_sum: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """-> dx (like x; plus dres, x's gradient from elsewhere, when given), partial sums (B, chunks, 2, C) float32
    of dshift ([:, :, 0]) and dscale ([:, :, 1]); with bias_sum (B, chunks, 3, C), also dx's column sums
    ([:, :, 2], add_modulate's branch bias's gradient once summed over B too)."""
    x, dy = x.contiguous(), dy.contiguous()
    B, N, C = x.shape
    scale2, s_scale = _rows(scale, B, C, "modulate scale")
    dx = x.new_empty(x.shape)
    acc = dres is not None
    kernel = _bwd_kernel(dres)
    block_r, block_c, block_t, opts = _tile(C, kernel)
    chunks, tiles_per = _reduce_grid(B, N, block_r, device_index(x), kernel)
    part = partial_sums(x, (B, chunks, 3 if bias_sum else 2, C))
    if x.numel():
        _modulate_bwd_launch((B, chunks), device_index(x),
                             (dy, x, scale2, mean, rstd, dx, part, dres.contiguous() if acc else dy),
                             (N, C, s_scale, tiles_per),
                             (block_r, block_c, block_t, acc, CONFIG[kernel]["STAGES"], bool(bias_sum)), opts)
    return dx, part


@_modulate_backward_op.register_fake
def _(dy, x, scale, mean, rstd, dres=None, bias_sum=False):
    B, N, C = x.shape
    kernel = _bwd_kernel(dres)
    chunks, _ = _reduce_grid(B, N, _tile(C, kernel)[0], device_index(x), kernel)
    return x.new_empty(x.shape), x.new_empty((B, chunks, 3 if bias_sum else 2, C), dtype=torch.float32)


def _modulate_setup(ctx, inputs, output):
    x, shift, scale, _ = inputs
    _, mean, rstd = output
    # an output nobody differentiates gets None, not a zero tensor: as in eager calls (kernels.launch._Eager), so
    # that the op that torch.compile traces reads no zeros and gives eager's results bit for bit
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, shift, scale, mean, rstd)


def _modulate_backward(ctx, dy, _dmean, _drstd):
    if dy is None:
        return None, None, None, None
    x, shift, scale, mean, rstd = ctx.saved_tensors
    dx, part = _modulate_backward_op.within(ctx)(dy, x, scale, mean, rstd)
    return dx, *_reduce_shift_scale(part, shift, scale), None


_modulate_op.register_autograd(_modulate_backward, setup_context=_modulate_setup)


@kernel_op("sana::add_modulate")
def _add_modulate_op(x: torch.Tensor, branch: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
                     branch_bias: torch.Tensor | None = None, gate: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> s = x + branch (with gate, x + gate * branch), modulate(s), mean, rstd: one read of each input, no
    separate add kernel. branch_bias (C,): a bias already in branch (added by its GEMM with the gradient cut,
    kernels.linear.linear_bias_out); not read, here for its gradient, which the backward kernel takes."""
    x, branch = _check(x, "add_modulate x"), branch.contiguous()
    if branch.shape != x.shape:
        raise ValueError(f"add_modulate: branch {tuple(branch.shape)} must have x's shape {tuple(x.shape)}")
    return _modulate_rows(x, shift, scale, eps, branch, gate)


@_add_modulate_op.register_fake
def _(x, branch, shift, scale, eps, branch_bias=None, gate=None):
    B, N, _ = x.shape
    mean = x.new_empty((B * N,), dtype=torch.float32)
    return x.new_empty(x.shape), x.new_empty(x.shape), mean, torch.empty_like(mean)


def _add_modulate_setup(ctx, inputs, output):
    _, branch, shift, scale, _, *rest = inputs  # branch_bias and gate may be left out (their default, None)
    bias, gate = (rest + [None, None])[:2]
    total, _, mean, rstd = output
    ctx.branch_dtype = branch.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.set_materialize_grads(False)  # as _modulate_setup: the sum's gradient is None where only y is read
    ctx.save_for_backward(total, shift, scale, mean, rstd, *(() if gate is None else (gate, branch)))


def _add_modulate_backward(ctx, dtotal, dy, _dmean, _drstd):
    total, shift, scale, mean, rstd, *gated = ctx.saved_tensors
    if dy is None and dtotal is None:
        return None, None, None, None, None, None, None
    if gated:
        return _gated_add_modulate_backward(ctx, dtotal, dy, total, shift, scale, mean, rstd, *gated)
    if dy is None:  # only the sum is differentiated
        dbias = None if ctx.bias_dtype is None else dtotal.sum((0, 1), dtype=torch.float32).to(ctx.bias_dtype)
        return dtotal, dtotal.to(ctx.branch_dtype), None, None, None, dbias, None
    if ctx.bias_dtype is None:
        dx, part = _modulate_backward_op.within(ctx)(dy, total, scale, mean, rstd, dtotal)
        # x and branch get the same gradient (a sum's), one tensor for both
        return dx, dx.to(ctx.branch_dtype), *_reduce_shift_scale(part, shift, scale), None, None, None
    dx, part = _modulate_backward_op.within(ctx)(dy, total, scale, mean, rstd, dtotal, True)
    dshift, dscale, dbias = _reduce_shift_scale_bias(part, shift, scale, ctx.bias_dtype)
    return dx, dx.to(ctx.branch_dtype), dshift, dscale, None, dbias, None


def _gated_add_modulate_backward(ctx, dtotal, dy, total, shift, scale, mean, rstd, gate, branch):
    """s = x + gate * branch: ds from modulate's backward kernel (with s's own gradient added in), then the gated
    residual's backward kernel on ds (dbranch, and the partial rows of dgate and of the branch bias's gradient):
    the two kernels the unfused residual and modulate ran, so the fusion's gain is the forward's pass."""
    dshift = dscale = None
    if dy is None:  # only the sum is differentiated
        ds = dtotal
    else:
        ds, part = _modulate_backward_op.within(ctx)(dy, total, scale, mean, rstd, dtotal)
        dshift, dscale = _reduce_shift_scale(part, shift, scale)
    dbranch, dgate, dbias = _gated_residual_grads(ctx, ds, gate, branch)
    return ds, dbranch, dshift, dscale, None, dbias, dgate


_add_modulate_op.register_autograd(_add_modulate_backward, setup_context=_add_modulate_setup)


@kernel_op("sana::gated_residual")
def _gated_residual_op(x: torch.Tensor, gate: torch.Tensor, branch: torch.Tensor,
                       branch_bias: torch.Tensor | None = None) -> torch.Tensor:
    """-> x + gate * branch. branch_bias (C,): a bias already in branch (added by its GEMM with the gradient cut,
    kernels.linear.linear_bias_out); not read, here for its gradient, which the backward kernel takes."""
    x, branch = _check(x, "gated residual x"), branch.contiguous()
    if branch.shape != x.shape:
        raise ValueError(f"gated residual: branch {tuple(branch.shape)} must have x's shape {tuple(x.shape)}")
    B, N, C = x.shape
    gate2, s_gate = _rows(gate, B, C, "gated residual gate")
    y = x.new_empty(x.shape)
    if x.numel():
        block_r, block_c, _, opts = _tile(C, "residual_fwd")
        _residual_fwd_launch((cdiv(B * N, block_r),), device_index(x), (x, gate2, branch, y),
                             (B * N, N, C, s_gate), (block_r, block_c), opts)
    return y


@_gated_residual_op.register_fake
def _(x, gate, branch, branch_bias=None):
    return x.new_empty(x.shape)


@kernel_op("sana::gated_residual_backward")
def _gated_residual_backward_op(dy: torch.Tensor, gate: torch.Tensor, branch: torch.Tensor,
                                bias_sum: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """-> dbranch (like branch), partial sums (B, chunks, C) float32 of dgate; with bias_sum (B, chunks, 2, C):
    dgate ([:, :, 0]) and dbranch's column sums ([:, :, 1], the branch bias's gradient once summed over B too)."""
    dy, branch = dy.contiguous(), branch.contiguous()
    B, N, C = branch.shape
    gate2, s_gate = _rows(gate, B, C, "gated residual gate")
    dbranch = branch.new_empty(branch.shape)
    block_r, block_c, _, opts = _tile(C, "residual_bwd")
    chunks, tiles_per = _reduce_grid(B, N, block_r, device_index(branch), "residual_bwd")
    part = partial_sums(branch, (B, chunks, 2, C) if bias_sum else (B, chunks, C))
    if branch.numel():
        _residual_bwd_launch((B, chunks), device_index(branch), (dy, gate2, branch, dbranch, part),
                             (N, C, s_gate, tiles_per),
                             (block_r, block_c, CONFIG["residual_bwd"]["STAGES"], bool(bias_sum)), opts)
    return dbranch, part


@_gated_residual_backward_op.register_fake
def _(dy, gate, branch, bias_sum=False):
    B, N, C = branch.shape
    chunks, _ = _reduce_grid(B, N, _tile(C, "residual_bwd")[0], device_index(branch), "residual_bwd")
    shape = (B, chunks, 2, C) if bias_sum else (B, chunks, C)
    return branch.new_empty(branch.shape), branch.new_empty(shape, dtype=torch.float32)


def _gated_residual_setup(ctx, inputs, output):
    x, gate, branch, *bias = inputs  # branch_bias may be left out (its default, None)
    ctx.x_dtype = x.dtype
    ctx.bias_dtype = bias[0].dtype if bias and bias[0] is not None else None
    ctx.save_for_backward(gate, branch)


def _gated_residual_grads(ctx, dy, gate, branch):
    """-> (dbranch, dgate, dbias or None) of x + gate * branch from the sum's gradient dy: the backward kernel, and
    with a branch bias (ctx.bias_dtype) its second partial row, the bias's gradient."""
    if ctx.bias_dtype is None:
        dbranch, part = _gated_residual_backward_op.within(ctx)(dy, gate, branch)
        return dbranch, _reduce_rows(part, gate), None
    dbranch, part = _gated_residual_backward_op.within(ctx)(dy, gate, branch, True)
    d = part.sum(1)  # (B, 2, C): one reduction over the chunks for both
    return dbranch, _fit(d[:, 0], gate), d[:, 1].sum(0).to(ctx.bias_dtype)


def _gated_residual_backward(ctx, dy):
    dbranch, dgate, dbias = _gated_residual_grads(ctx, dy, *ctx.saved_tensors)
    return dy.to(ctx.x_dtype), dgate, dbranch, dbias


_gated_residual_op.register_autograd(_gated_residual_backward, setup_context=_gated_residual_setup)


class _ModulateTee(torch.autograd.Function):
    """(x, modulate(x)) in eager mode: x's two gradients (its reader after this one, modulate's) meet in the
    backward kernel's dres. Not a custom op (an op's outputs may not alias its inputs): under tracing,
    modulate_tee_triton returns (x, modulate(x)) and the compiler fuses the add itself."""

    @staticmethod
    def forward(ctx, x, shift, scale, eps):
        y, mean, rstd = _modulate_op.fn(x, shift, scale, eps)
        ctx.save_for_backward(x, shift, scale, mean, rstd)
        ctx.set_materialize_grads(False)
        return x.view_as(x), y

    @staticmethod
    def backward(ctx, dres, dy):
        x, shift, scale, mean, rstd = ctx.saved_tensors
        if dy is None:
            return dres, None, None, None
        dx, part = _modulate_backward_op.fn(dy, x, scale, mean, rstd, dres)
        return dx, *_reduce_shift_scale(part, shift, scale), None


def _modulate_tee(x, shift, scale, eps):
    return _ModulateTee.apply(x, shift, scale, eps)


def _guarded(fn, x, *args):
    if not on_current_device(x):  # Triton launches on the current device's stream
        with torch.cuda.device(x.device):
            return fn(x, *args)
    return fn(x, *args)


def modulate_triton(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    return _guarded(_modulate_op, x, shift, scale, float(eps))[0]


def modulate_tee_triton(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                        eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, shift, scale))
    if not grad or torch.compiler.is_compiling() or _modulate_op.via_dispatcher or any(
            type(t) not in (torch.Tensor, torch.nn.Parameter) for t in (x, shift, scale)):
        return x, modulate_triton(x, shift, scale, eps)
    return _guarded(_modulate_tee, x, shift, scale, float(eps))


def add_modulate_triton(x: torch.Tensor, branch: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                        eps: float, branch_bias: torch.Tensor | None = None,
                        gate: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    return _guarded(_add_modulate_op, x, branch, shift, scale, float(eps), branch_bias, gate)[:2]


def modulate_quant_triton(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
                          fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _guarded(_modulate_quant_op, x, shift, scale, float(eps), fmt)


def gated_residual_triton(x: torch.Tensor, gate: torch.Tensor, branch: torch.Tensor,
                          branch_bias: torch.Tensor | None = None) -> torch.Tensor:
    return _guarded(_gated_residual_op, x, gate, branch, branch_bias)
