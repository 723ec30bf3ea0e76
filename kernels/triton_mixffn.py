"""Fused Triton depthwise-GLU of Mix-FFN in token layout (see kernels.mixffn), forward and backward, as
torch.library custom ops with fake implementations.

u is (B*N, 2*hid) row-major: a token's channels are contiguous, so each of the nine 3x3 taps is a
coalesced load of a (tokens, channels) tile shifted by a whole number of tokens (di * W + dj); taps
outside the image are masked to zero (zero padding; silu(0) = 0, so padding before or after the SiLU is
the same). A tile covers a few image rows, so the nine shifted loads hit L1/L2 and HBM sees s about once.
s = silu(u) is computed once by PyTorch (one elementwise pass, rounded to u's dtype like the reference)
rather than at every tap: nine SiLUs an element made the first version of the kernel compute-bound (10x).

    forward    s -> out = a * silu(g),  a = conv(s_a) + bias_a, g = conv(s_g) + bias_g
    backward 1 s, dout -> dc = (da, dg) (the conv outputs' gradient, recomputing a and g), partial dbias
    backward 2 dc, s, u -> du = (sum_k w[k] * dc[t - off_k]) * silu'(u[t]), and from the same loads partial
               dweight[k] = sum_t dc[t - off_k] * s[t] (nine register tiles, reduced once a program)

Only u is saved for backward (the 1x1 expansion's output; s and the conv outputs are recomputed). The
partial sums (one row per program chunk over tokens) are summed afterwards: deterministic, no atomics.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.launch import Launcher, cdiv, device_index, on_current_device, sm_count, supported_device

# Tiles (tokens x channels) picked by a sweep on the H200 at Sana-0.6B's batch-16 shape (u: 16 x 1024 x 5760):
# forward 0.26 ms + 0.10 ms for silu(u) (a copy of u takes 0.09 ms); both backward kernels together ~0.98 ms.
CONFIG = {
    "fwd": {"BLOCK_T": 32, "BLOCK_C": 128, "num_warps": 4},
    "bwd_conv": {"BLOCK_T": 32, "BLOCK_C": 64, "num_warps": 4, "PROGRAMS_PER_SM": 4},
    "bwd_input": {"BLOCK_T": 16, "BLOCK_C": 64, "num_warps": 4, "PROGRAMS_PER_SM": 4},
}


@triton.jit
def _tap(s_ptr, t, i, j, c, tmask, cmask, H, W, C2, K: tl.constexpr, SIGN: tl.constexpr):
    """s at tap K of tokens t (the token SIGN * (di, dj) away, di, dj = K // 3 - 1, K % 3 - 1), channels c, in
    float32; zero outside the image (zero padding)."""
    di = SIGN * (K // 3 - 1)
    dj = SIGN * (K % 3 - 1)
    ok = tmask & (i + di >= 0) & (i + di < H) & (j + dj >= 0) & (j + dj < W)
    src = (t + di * W + dj).to(tl.int64) * C2
    return tl.load(s_ptr + src[:, None] + c[None, :], mask=ok[:, None] & cmask[None, :], other=0.0).to(tl.float32)


@triton.jit
def _conv(s_ptr, w_ptr, t, i, j, c, tmask, cmask, H, W, HID, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """The depthwise 3x3 conv of s = silu(u) (no bias) for value channels c and gate channels HID + c."""
    acc_a = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    acc_g = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    for k in tl.static_range(9):
        wa = tl.load(w_ptr + c * 9 + k, mask=cmask, other=0.0).to(tl.float32)
        wg = tl.load(w_ptr + (c + HID) * 9 + k, mask=cmask, other=0.0).to(tl.float32)
        acc_a += _tap(s_ptr, t, i, j, c, tmask, cmask, H, W, 2 * HID, k, 1) * wa[None, :]
        acc_g += _tap(s_ptr + HID, t, i, j, c, tmask, cmask, H, W, 2 * HID, k, 1) * wg[None, :]
    return acc_a, acc_g


@triton.jit
def _fwd(s_ptr, w_ptr, bias_ptr, out_ptr, M, N, H, W, HID, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    tmask = t < M
    cmask = c < HID
    n = t % N
    i = n // W
    j = n % W
    acc_a, acc_g = _conv(s_ptr, w_ptr, t, i, j, c, tmask, cmask, H, W, HID, BLOCK_T, BLOCK_C)
    a = acc_a + tl.load(bias_ptr + c, mask=cmask, other=0.0).to(tl.float32)[None, :]
    g = acc_g + tl.load(bias_ptr + HID + c, mask=cmask, other=0.0).to(tl.float32)[None, :]
    out = a * g * tl.sigmoid(g)
    mask = tmask[:, None] & cmask[None, :]
    tl.store(out_ptr + t.to(tl.int64)[:, None] * HID + c[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_conv(dout_ptr, s_ptr, w_ptr, bias_ptr, dc_ptr, part_ptr, M, N, H, W, HID, tiles_per_prog,
              BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    chunk = tl.program_id(1)
    cmask = c < HID
    bias_a = tl.load(bias_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    bias_g = tl.load(bias_ptr + HID + c, mask=cmask, other=0.0).to(tl.float32)
    # dbias: summed over tokens elementwise, reduced over the tile rows once at the end
    db_a = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    db_g = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    for it in range(tiles_per_prog):
        t = (chunk * tiles_per_prog + it) * BLOCK_T + tl.arange(0, BLOCK_T)
        tmask = t < M
        mask = tmask[:, None] & cmask[None, :]
        n = t % N
        i = n // W
        j = n % W
        acc_a, acc_g = _conv(s_ptr, w_ptr, t, i, j, c, tmask, cmask, H, W, HID, BLOCK_T, BLOCK_C)
        a = acc_a + bias_a[None, :]
        g = acc_g + bias_g[None, :]
        d = tl.load(dout_ptr + t.to(tl.int64)[:, None] * HID + c[None, :], mask=mask, other=0.0).to(tl.float32)
        sg = tl.sigmoid(g)
        da = d * g * sg  # zero outside the tile's valid tokens and channels (d = 0 there)
        dg = d * a * sg * (1.0 + g * (1.0 - sg))
        dc_offs = t.to(tl.int64)[:, None] * (2 * HID) + c[None, :]
        tl.store(dc_ptr + dc_offs, da.to(dc_ptr.dtype.element_ty), mask=mask)
        tl.store(dc_ptr + HID + dc_offs, dg.to(dc_ptr.dtype.element_ty), mask=mask)
        db_a += da
        db_g += dg
    part = part_ptr + chunk.to(tl.int64) * (2 * HID)
    tl.store(part + c, tl.sum(db_a, axis=0), mask=cmask)
    tl.store(part + HID + c, tl.sum(db_g, axis=0), mask=cmask)


@triton.jit
def _dc_tap(dc_ptr, w_ptr, s, t, i, j, c, tmask, cmask, H, W, C2, ds, acc, K: tl.constexpr):
    """One tap of the transposed conv: s[q] receives dc[q - off_K] * w[K] (ds), and w[K] receives
    dc[q - off_K] * s[q] (acc, summed over q: the same pairs as sum_p dc[p] * s[p + off_K])."""
    dc = _tap(dc_ptr, t, i, j, c, tmask, cmask, H, W, C2, K, -1)
    w = tl.load(w_ptr + c * 9 + K, mask=cmask, other=0.0).to(tl.float32)
    return ds + dc * w[None, :], acc + dc * s


@triton.jit
def _bwd_input(dc_ptr, u_ptr, s_ptr, w_ptr, du_ptr, part_ptr, M, N, H, W, C2, tiles_per_prog,
               BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    chunk = tl.program_id(1)
    cmask = c < C2
    zero = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    # dweight per tap, summed over tokens elementwise (nine tiles of registers), reduced at the end
    w0, w1, w2, w3, w4, w5, w6, w7, w8 = zero, zero, zero, zero, zero, zero, zero, zero, zero
    for it in range(tiles_per_prog):
        t = (chunk * tiles_per_prog + it) * BLOCK_T + tl.arange(0, BLOCK_T)
        tmask = t < M
        mask = tmask[:, None] & cmask[None, :]
        n = t % N
        i = n // W
        j = n % W
        offs = t.to(tl.int64)[:, None] * C2 + c[None, :]
        s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        ds = zero
        ds, w0 = _dc_tap(dc_ptr, w_ptr, s, t, i, j, c, tmask, cmask, H, W, C2, ds, w0, 0)
        ds, w1 = _dc_tap(dc_ptr, w_ptr, s, t, i, j, c, tmask, cmask, H, W, C2, ds, w1, 1)
        ds, w2 = _dc_tap(dc_ptr, w_ptr, s, t, i, j, c, tmask, cmask, H, W, C2, ds, w2, 2)
        ds, w3 = _dc_tap(dc_ptr, w_ptr, s, t, i, j, c, tmask, cmask, H, W, C2, ds, w3, 3)
        ds, w4 = _dc_tap(dc_ptr, w_ptr, s, t, i, j, c, tmask, cmask, H, W, C2, ds, w4, 4)
        ds, w5 = _dc_tap(dc_ptr, w_ptr, s, t, i, j, c, tmask, cmask, H, W, C2, ds, w5, 5)
        ds, w6 = _dc_tap(dc_ptr, w_ptr, s, t, i, j, c, tmask, cmask, H, W, C2, ds, w6, 6)
        ds, w7 = _dc_tap(dc_ptr, w_ptr, s, t, i, j, c, tmask, cmask, H, W, C2, ds, w7, 7)
        ds, w8 = _dc_tap(dc_ptr, w_ptr, s, t, i, j, c, tmask, cmask, H, W, C2, ds, w8, 8)
        u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        su = tl.sigmoid(u)
        tl.store(du_ptr + offs, (ds * su * (1.0 + u * (1.0 - su))).to(du_ptr.dtype.element_ty), mask=mask)
    part = part_ptr + chunk.to(tl.int64) * 9 * C2 + c
    tl.store(part, tl.sum(w0, axis=0), mask=cmask)
    tl.store(part + C2, tl.sum(w1, axis=0), mask=cmask)
    tl.store(part + 2 * C2, tl.sum(w2, axis=0), mask=cmask)
    tl.store(part + 3 * C2, tl.sum(w3, axis=0), mask=cmask)
    tl.store(part + 4 * C2, tl.sum(w4, axis=0), mask=cmask)
    tl.store(part + 5 * C2, tl.sum(w5, axis=0), mask=cmask)
    tl.store(part + 6 * C2, tl.sum(w6, axis=0), mask=cmask)
    tl.store(part + 7 * C2, tl.sum(w7, axis=0), mask=cmask)
    tl.store(part + 8 * C2, tl.sum(w8, axis=0), mask=cmask)


_fwd_launch = Launcher(_fwd)
_bwd_conv_launch = Launcher(_bwd_conv)
_bwd_input_launch = Launcher(_bwd_input)


def _opts(cfg: dict) -> tuple:
    return (("num_warps", cfg["num_warps"]),)


def _reduce_grid(M: int, channels: int, cfg: dict, device: int) -> tuple[int, int, int]:
    """(channel blocks, token chunks, tiles per chunk) of a backward kernel, enough programs to fill the GPU."""
    c_blocks, n_tiles = cdiv(channels, cfg["BLOCK_C"]), cdiv(M, cfg["BLOCK_T"])
    want = cdiv(cfg["PROGRAMS_PER_SM"] * sm_count(device), c_blocks)
    tiles_per = cdiv(n_tiles, min(n_tiles, max(1, want)))
    return c_blocks, cdiv(n_tiles, tiles_per), tiles_per


@torch.library.custom_op("sana::depthwise_glu", mutates_args=())
def _depthwise_glu_op(u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, H: int, W: int) -> torch.Tensor:
    if not supported_device(u):
        raise ValueError("depthwise GLU: the Triton kernel needs a CUDA tensor (or the CPU under TRITON_INTERPRET=1)")
    weight, bias = weight.contiguous(), bias.contiguous()
    B, N, C2 = u.shape
    HID = C2 // 2
    out = u.new_empty((B, N, HID))
    if out.numel():
        s = F.silu(u.contiguous())  # once an element (the kernel reads it at nine taps), rounded like the reference
        cfg = CONFIG["fwd"]
        _fwd_launch((cdiv(B * N, cfg["BLOCK_T"]), cdiv(HID, cfg["BLOCK_C"])), device_index(u),
                    (s, weight, bias, out), (B * N, N, H, W, HID), (cfg["BLOCK_T"], cfg["BLOCK_C"]), _opts(cfg))
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
    du = torch.empty(u.shape, dtype=u.dtype, device=u.device)
    conv_grid = _reduce_grid(B * N, HID, CONFIG["bwd_conv"], dev)
    input_grid = _reduce_grid(B * N, C2, CONFIG["bwd_input"], dev)
    dbias = u.new_zeros((conv_grid[1], C2), dtype=torch.float32)
    dweight = u.new_zeros((input_grid[1], 9, C2), dtype=torch.float32)
    if u.numel():
        s = F.silu(u)
        dc = torch.empty_like(u)
        cfg = CONFIG["bwd_conv"]
        _bwd_conv_launch(conv_grid[:2], dev, (dout, s, weight, bias, dc, dbias),
                         (B * N, N, H, W, HID, conv_grid[2]), (cfg["BLOCK_T"], cfg["BLOCK_C"]), _opts(cfg))
        cfg = CONFIG["bwd_input"]
        _bwd_input_launch(input_grid[:2], dev, (dc, u, s, weight, du, dweight),
                          (B * N, N, H, W, C2, input_grid[2]), (cfg["BLOCK_T"], cfg["BLOCK_C"]), _opts(cfg))
    return du, dweight.sum(0).t().reshape(C2, 1, 3, 3).contiguous(), dbias.sum(0)


@_depthwise_glu_backward_op.register_fake
def _(dout, u, weight, bias, H, W):
    C2 = u.shape[-1]
    return (u.new_empty(u.shape), u.new_empty((C2, 1, 3, 3), dtype=torch.float32),
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
