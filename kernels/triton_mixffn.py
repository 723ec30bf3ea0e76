"""Fused Triton depthwise-GLU of Mix-FFN in token layout (see kernels.mixffn), forward and backward, as
torch.library custom ops with fake implementations.

u is (B*N, 2*hid) row-major: a token's channels are contiguous, so each of the nine 3x3 taps is a
coalesced load of a (tokens, channels) tile shifted by a whole number of tokens (di * W + dj); taps
outside the image are masked to zero (zero padding; silu(0) = 0, so padding before or after the SiLU is
the same). A tile covers a few image rows, so the nine shifted loads hit L1/L2 and HBM sees u about once.

    forward    u -> out = a * silu(g),  a = conv(silu(u_a)) + bias_a, g = conv(silu(u_g)) + bias_g
    backward 1 u, dout -> dc = (da, dg) (the conv outputs' gradient, recomputing a and g), and per-program
               partial sums of dweight[k] = sum_t dc[t] * silu(u[t + off_k]) and dbias = sum_t dc[t]
    backward 2 dc, u -> du = (sum_k w[k] * dc[t - off_k]) * silu'(u[t])

Only u is saved for backward (the 1x1 expansion's output; the conv outputs are recomputed). The
partial sums of backward 1 (programs over tokens, 10 rows of 2*hid float32 each) are summed afterwards:
deterministic, no atomics.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.launch import Launcher, cdiv, device_index, on_current_device, sm_count, supported_device

CONFIG = {
    "fwd": {"BLOCK_T": 64, "BLOCK_C": 64, "num_warps": 4},
    "bwd_conv": {"BLOCK_T": 32, "BLOCK_C": 64, "num_warps": 4, "PROGRAMS_PER_SM": 4},
    "bwd_input": {"BLOCK_T": 64, "BLOCK_C": 64, "num_warps": 4},
}


@triton.jit
def _silu(x):
    return x / (1.0 + tl.exp(-x))


@triton.jit
def _tap(u_ptr, t, i, j, c, tmask, cmask, H, W, C2, K: tl.constexpr):
    """silu(u) at tap K (di, dj = K // 3 - 1, K % 3 - 1) of tokens t, channels c; zero outside the image."""
    di = K // 3 - 1
    dj = K % 3 - 1
    ok = tmask & (i + di >= 0) & (i + di < H) & (j + dj >= 0) & (j + dj < W)
    src = (t + di * W + dj).to(tl.int64) * C2
    v = tl.load(u_ptr + src[:, None] + c[None, :], mask=ok[:, None] & cmask[None, :], other=0.0)
    return _silu(v.to(tl.float32))


@triton.jit
def _conv(u_ptr, w_ptr, t, i, j, c, tmask, cmask, H, W, HID, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """The depthwise 3x3 conv of silu(u) (no bias) for value channels c and gate channels HID + c."""
    acc_a = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    acc_g = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    for k in tl.static_range(9):
        wa = tl.load(w_ptr + c * 9 + k, mask=cmask, other=0.0).to(tl.float32)
        wg = tl.load(w_ptr + (c + HID) * 9 + k, mask=cmask, other=0.0).to(tl.float32)
        acc_a += _tap(u_ptr, t, i, j, c, tmask, cmask, H, W, 2 * HID, k) * wa[None, :]
        acc_g += _tap(u_ptr + HID, t, i, j, c, tmask, cmask, H, W, 2 * HID, k) * wg[None, :]
    return acc_a, acc_g


@triton.jit
def _fwd(u_ptr, w_ptr, bias_ptr, out_ptr, M, N, H, W, HID, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    tmask = t < M
    cmask = c < HID
    n = t % N
    i = n // W
    j = n % W
    acc_a, acc_g = _conv(u_ptr, w_ptr, t, i, j, c, tmask, cmask, H, W, HID, BLOCK_T, BLOCK_C)
    a = acc_a + tl.load(bias_ptr + c, mask=cmask, other=0.0).to(tl.float32)[None, :]
    g = acc_g + tl.load(bias_ptr + HID + c, mask=cmask, other=0.0).to(tl.float32)[None, :]
    out = a * _silu(g)
    mask = tmask[:, None] & cmask[None, :]
    tl.store(out_ptr + t.to(tl.int64)[:, None] * HID + c[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_conv(dout_ptr, u_ptr, w_ptr, bias_ptr, dc_ptr, part_ptr, M, N, H, W, HID, tiles_per_prog,
              BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    chunk = tl.program_id(1)
    cmask = c < HID
    bias_a = tl.load(bias_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    bias_g = tl.load(bias_ptr + HID + c, mask=cmask, other=0.0).to(tl.float32)
    taps = tl.arange(0, 16)[:, None]  # rows 0..8 of the accumulators are the taps, row 9 the bias
    part_a = tl.zeros((16, BLOCK_C), dtype=tl.float32)
    part_g = tl.zeros((16, BLOCK_C), dtype=tl.float32)
    for it in range(tiles_per_prog):
        t = (chunk * tiles_per_prog + it) * BLOCK_T + tl.arange(0, BLOCK_T)
        tmask = t < M
        mask = tmask[:, None] & cmask[None, :]
        n = t % N
        i = n // W
        j = n % W
        acc_a, acc_g = _conv(u_ptr, w_ptr, t, i, j, c, tmask, cmask, H, W, HID, BLOCK_T, BLOCK_C)
        a = acc_a + bias_a[None, :]
        g = acc_g + bias_g[None, :]
        offs = t.to(tl.int64)[:, None] * HID + c[None, :]
        d = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # zero outside: da, dg zero there
        sg = 1.0 / (1.0 + tl.exp(-g))
        da = d * g * sg
        dg = d * a * sg * (1.0 + g * (1.0 - sg))
        dc_offs = t.to(tl.int64)[:, None] * (2 * HID) + c[None, :]
        tl.store(dc_ptr + dc_offs, da.to(dc_ptr.dtype.element_ty), mask=mask)
        tl.store(dc_ptr + HID + dc_offs, dg.to(dc_ptr.dtype.element_ty), mask=mask)
        part_a += tl.where(taps == 9, tl.sum(da, axis=0)[None, :], 0.0)
        part_g += tl.where(taps == 9, tl.sum(dg, axis=0)[None, :], 0.0)
        for k in tl.static_range(9):
            sa = _tap(u_ptr, t, i, j, c, tmask, cmask, H, W, 2 * HID, k)
            sgt = _tap(u_ptr + HID, t, i, j, c, tmask, cmask, H, W, 2 * HID, k)
            part_a += tl.where(taps == k, tl.sum(da * sa, axis=0)[None, :], 0.0)
            part_g += tl.where(taps == k, tl.sum(dg * sgt, axis=0)[None, :], 0.0)
    rows = (chunk * 10 + taps).to(tl.int64) * (2 * HID)
    pmask = (taps < 10) & cmask[None, :]
    tl.store(part_ptr + rows + c[None, :], part_a, mask=pmask)
    tl.store(part_ptr + rows + HID + c[None, :], part_g, mask=pmask)


@triton.jit
def _bwd_input(dc_ptr, u_ptr, w_ptr, du_ptr, M, N, H, W, C2, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    tmask = t < M
    cmask = c < C2
    n = t % N
    i = n // W
    j = n % W
    ds = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    for k in tl.static_range(9):
        # out[p] takes s[p + off_k] * w[k], so s[q] gets dc[q - off_k] * w[k] for q - off_k in the image
        di = k // 3 - 1
        dj = k % 3 - 1
        ok = tmask & (i - di >= 0) & (i - di < H) & (j - dj >= 0) & (j - dj < W)
        src = (t - di * W - dj).to(tl.int64) * C2
        dc = tl.load(dc_ptr + src[:, None] + c[None, :], mask=ok[:, None] & cmask[None, :], other=0.0)
        w = tl.load(w_ptr + c * 9 + k, mask=cmask, other=0.0).to(tl.float32)
        ds += dc.to(tl.float32) * w[None, :]
    mask = tmask[:, None] & cmask[None, :]
    offs = t.to(tl.int64)[:, None] * C2 + c[None, :]
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    su = 1.0 / (1.0 + tl.exp(-u))
    tl.store(du_ptr + offs, (ds * su * (1.0 + u * (1.0 - su))).to(du_ptr.dtype.element_ty), mask=mask)


_fwd_launch = Launcher(_fwd)
_bwd_conv_launch = Launcher(_bwd_conv)
_bwd_input_launch = Launcher(_bwd_input)


def _opts(cfg: dict) -> tuple:
    return (("num_warps", cfg["num_warps"]),)


def _bwd_grid(M: int, HID: int, device: int) -> tuple[int, int, int]:
    """(channel blocks, token chunks, tiles per chunk) of backward 1, enough programs to fill the GPU."""
    cfg = CONFIG["bwd_conv"]
    c_blocks, n_tiles = cdiv(HID, cfg["BLOCK_C"]), cdiv(M, cfg["BLOCK_T"])
    want = cdiv(cfg["PROGRAMS_PER_SM"] * sm_count(device), c_blocks)
    tiles_per = cdiv(n_tiles, min(n_tiles, max(1, want)))
    return c_blocks, cdiv(n_tiles, tiles_per), tiles_per


@torch.library.custom_op("sana::depthwise_glu", mutates_args=())
def _depthwise_glu_op(u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, H: int, W: int) -> torch.Tensor:
    if not supported_device(u):
        raise ValueError("depthwise GLU: the Triton kernel needs a CUDA tensor (or the CPU under TRITON_INTERPRET=1)")
    u, weight, bias = u.contiguous(), weight.contiguous(), bias.contiguous()
    B, N, C2 = u.shape
    HID = C2 // 2
    out = u.new_empty((B, N, HID))
    if out.numel():
        cfg = CONFIG["fwd"]
        _fwd_launch((cdiv(B * N, cfg["BLOCK_T"]), cdiv(HID, cfg["BLOCK_C"])), device_index(u),
                    (u, weight, bias, out), (B * N, N, H, W, HID), (cfg["BLOCK_T"], cfg["BLOCK_C"]), _opts(cfg))
    return out


@_depthwise_glu_op.register_fake
def _(u, weight, bias, H, W):
    return u.new_empty((*u.shape[:-1], u.shape[-1] // 2))


@torch.library.custom_op("sana::depthwise_glu_backward", mutates_args=())
def _depthwise_glu_backward_op(dout: torch.Tensor, u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                               H: int, W: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> du (like u), dweight (2*hid, 1, 3, 3) and dbias (2*hid) in float32."""
    dout, u, weight, bias = dout.contiguous(), u.contiguous(), weight.contiguous(), bias.contiguous()
    B, N, C2 = u.shape
    HID = C2 // 2
    dev = device_index(u)
    du = torch.empty_like(u)
    c_blocks, chunks, tiles_per = _bwd_grid(B * N, HID, dev)
    part = u.new_zeros((chunks, 10, C2), dtype=torch.float32)
    if u.numel():
        dc = torch.empty_like(u)
        cfg = CONFIG["bwd_conv"]
        _bwd_conv_launch((c_blocks, chunks), dev, (dout, u, weight, bias, dc, part),
                         (B * N, N, H, W, HID, tiles_per), (cfg["BLOCK_T"], cfg["BLOCK_C"]), _opts(cfg))
        cfg = CONFIG["bwd_input"]
        _bwd_input_launch((cdiv(B * N, cfg["BLOCK_T"]), cdiv(C2, cfg["BLOCK_C"])), dev, (dc, u, weight, du),
                          (B * N, N, H, W, C2), (cfg["BLOCK_T"], cfg["BLOCK_C"]), _opts(cfg))
    part = part.sum(0)  # (10, 2*hid)
    return du, part[:9].t().reshape(C2, 1, 3, 3).contiguous(), part[9].contiguous()


@_depthwise_glu_backward_op.register_fake
def _(dout, u, weight, bias, H, W):
    C2 = u.shape[-1]
    return (torch.empty_like(u), u.new_empty((C2, 1, 3, 3), dtype=torch.float32),
            u.new_empty((C2,), dtype=torch.float32))


def _setup(ctx, inputs, output):
    u, weight, bias, H, W = inputs
    ctx.hw = (H, W)
    ctx.save_for_backward(u, weight, bias)


def _backward(ctx, dout):
    u, weight, bias = ctx.saved_tensors
    du, dweight, dbias = torch.ops.sana.depthwise_glu_backward(dout, u, weight, bias, *ctx.hw)
    return du, dweight.to(weight.dtype), dbias.to(bias.dtype), None, None


_depthwise_glu_op.register_autograd(_backward, setup_context=_setup)


def depthwise_glu_triton(u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                         hw: tuple[int, int]) -> torch.Tensor:
    if not on_current_device(u):  # Triton launches on the current device's stream
        with torch.cuda.device(u.device):
            return depthwise_glu_triton(u, weight, bias, hw)
    return torch.ops.sana.depthwise_glu(u, weight, bias, int(hw[0]), int(hw[1]))
