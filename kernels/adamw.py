"""AdamW over every parameter in one Triton kernel that also writes the low-precision weight copies.

Why: at Sana-1.6B the optimizer's bill is three passes over 1.6 billion parameters. torch's fused AdamW reads
the parameter, the gradient and both moments and writes back the parameter, the moments and (when it divides the
gradient by a clipping scale) the gradient: 32 bytes a parameter. The next forward then casts every weight to
bf16 (6 bytes more: kernels.linear.weight_casts), and nothing reads the clipped gradient the kernel stored. Here
one pass reads p, g, m, v and writes p, m, v and the bf16 copy: 30 bytes against 38.

The math is torch.optim.AdamW's (decoupled weight decay, bias-corrected moments, eps outside the square root),
in float32 with IEEE square root and division; the gradient may arrive divided by a device scalar (the clipping
divisor of training.optim.clip_gradients), never read back to the host.

Launch: one program per BLOCK elements of one tensor; the tensors are reached through int64 tables of their
addresses (as Triton's grouped-GEMM tutorial does), built once for the parameters, moments and copies, and again
only when the gradients' addresses change. A tensor with no copy has address 0 and its stores are masked off.
Addresses read from a table tell the compiler nothing about alignment, so the tensors whose every address is
16-byte aligned and whose size is a multiple of 8 go to a launch that says so (VEC: 16-byte loads and stores in
an offline sm_90 compile, against 4-byte ones without the hints), the rest (if any) to a second one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.launch import cdiv

BLOCK = 4096  # elements a program: 16 KiB of each float32 stream, enough bytes in flight per SM
NUM_WARPS = 8


@triton.jit
def _adamw_kernel(p_tab, g_tab, m_tab, v_tab, c_tab, numel_tab, first_tab, blk_tab, scale_ptr,
                  lr_wd, beta1, beta2, step_size, bc2_sqrt, eps,
                  HAS_SCALE: tl.constexpr, G_DTYPE: tl.constexpr, C_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
                  VEC: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(blk_tab + pid)  # this program's tensor
    n = tl.load(numel_tab + t)
    offs = (pid - tl.load(first_tab + t)) * BLOCK + tl.arange(0, BLOCK)
    p_ptr = tl.load(p_tab + t).to(tl.pointer_type(tl.float32))
    g_ptr = tl.load(g_tab + t).to(tl.pointer_type(G_DTYPE))
    m_ptr = tl.load(m_tab + t).to(tl.pointer_type(tl.float32))
    v_ptr = tl.load(v_tab + t).to(tl.pointer_type(tl.float32))
    c_addr = tl.load(c_tab + t)
    c_ptr = c_addr.to(tl.pointer_type(C_DTYPE))
    if VEC:  # the host put only 16-byte aligned tensors of a multiple of 8 elements here: 16-byte accesses
        n = tl.multiple_of(n, 8)
        p_ptr = tl.multiple_of(p_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
        m_ptr = tl.multiple_of(m_ptr, 16)
        v_ptr = tl.multiple_of(v_ptr, 16)
        c_ptr = tl.multiple_of(c_ptr, 16)
    mask = offs < n
    p = tl.load(p_ptr + offs, mask=mask)
    g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask)
    v = tl.load(v_ptr + offs, mask=mask)
    if HAS_SCALE:
        g = tl.math.div_rn(g, tl.load(scale_ptr))
    p = p - lr_wd * p
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    denom = tl.math.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    p = p - tl.math.div_rn(step_size * m, denom)
    tl.store(p_ptr + offs, p, mask=mask)
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(v_ptr + offs, v, mask=mask)
    if C_DTYPE == tl.bfloat16:  # round to nearest even by hand: Triton's interpreter truncates in .to()
        bits = p.to(tl.uint32, bitcast=True)
        c = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        c = p.to(C_DTYPE)
    tl.store(c_ptr + offs, c, mask=mask & (c_addr != 0))


_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@dataclass
class _Tables:
    p: torch.Tensor
    m: torch.Tensor
    v: torch.Tensor
    c: torch.Tensor
    numel: torch.Tensor
    first: torch.Tensor
    blk: torch.Tensor
    blocks: int
    g_key: tuple = ()
    g: torch.Tensor | None = None


def _addresses(ts, device) -> torch.Tensor:
    host = torch.tensor([0 if t is None else t.data_ptr() for t in ts], dtype=torch.int64)
    if device.type == "cuda":  # pinned + non_blocking: no host wait on the work queued before (the backward)
        return host.pin_memory().to(device, non_blocking=True)
    return host


def _aligned(t: torch.Tensor | None) -> bool:
    return t is None or t.data_ptr() % 16 == 0


def _block_tables(numels: list[int], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """For tensors of these sizes, one program per BLOCK elements of one tensor: (each tensor's numel, int64; its
    first program, int32; each program's tensor, int32; the number of programs)."""
    counts = [cdiv(n, BLOCK) for n in numels]
    first = [0]
    for c in counts[:-1]:
        first.append(first[-1] + c)
    blk = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int32), torch.tensor(counts, dtype=torch.int64))
    return (torch.tensor(numels, dtype=torch.int64).to(device), torch.tensor(first, dtype=torch.int32).to(device),
            blk.to(device), sum(counts))


class AdamWTables:
    """The address tables of one parameter list, rebuilt when an address changes (cheap to check each step): one
    set for the tensors the kernel can move in 16-byte accesses (every address 16-byte aligned, a multiple of 8
    elements), one for the rest."""

    def __init__(self):
        self._key: tuple | None = None
        self._sets: list[tuple[bool, list[int], _Tables]] = []

    def get(self, params, grads, exp_avgs, exp_avg_sqs, copies) -> list[tuple[bool, _Tables]]:
        device = params[0].device
        vec = [p.numel() % 8 == 0 and all(_aligned(t) for t in (p, g, m, v, c))
               for p, g, m, v, c in zip(params, grads, exp_avgs, exp_avg_sqs, copies)]
        key = tuple((p.data_ptr(), p.numel(), m.data_ptr(), v.data_ptr(), 0 if c is None else c.data_ptr(), w)
                    for p, m, v, c, w in zip(params, exp_avgs, exp_avg_sqs, copies, vec))
        if key != self._key:
            self._key, self._sets = key, []
            for kind in (True, False):
                idx = [i for i, w in enumerate(vec) if w == kind]
                if not idx:
                    continue
                pick = lambda ts: [ts[i] for i in idx]  # noqa: E731
                self._sets.append((kind, idx, _Tables(
                    _addresses(pick(params), device), _addresses(pick(exp_avgs), device),
                    _addresses(pick(exp_avg_sqs), device), _addresses(pick(copies), device),
                    *_block_tables([params[i].numel() for i in idx], device))))
        out = []
        for kind, idx, t in self._sets:
            g_key = tuple(grads[i].data_ptr() for i in idx)
            if t.g is None or t.g_key != g_key:
                t.g, t.g_key = _addresses([grads[i] for i in idx], device), g_key
            out.append((kind, t))
        return out


def adamw_step_(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                exp_avg_sqs: list[torch.Tensor], copies: list[torch.Tensor | None], *, step: int, lr: float,
                beta1: float, beta2: float, eps: float, weight_decay: float,
                grad_scale: torch.Tensor | None = None, tables: AdamWTables | None = None) -> None:
    """One AdamW step in place on contiguous float32 params and moments (all at the same `step`, counted from 1);
    grads in one dtype; copies[i] (same shape, one dtype for all, or None) receives params[i] after the step.
    grad_scale: a one-element float32 tensor each gradient is divided by (None: 1)."""
    if not params:
        return
    for name, ts in (("param", params), ("exp_avg", exp_avgs), ("exp_avg_sq", exp_avg_sqs)):
        if any(t.dtype != torch.float32 or not t.is_contiguous() for t in ts):
            raise ValueError(f"adamw_step_: every {name} must be a contiguous float32 tensor")
    if len({g.dtype for g in grads}) != 1 or any(not g.is_contiguous() for g in grads):
        raise ValueError("adamw_step_: the gradients must be contiguous and of one dtype")
    c_dtypes = {c.dtype for c in copies if c is not None}
    if len(c_dtypes) > 1 or any(c is not None and not c.is_contiguous() for c in copies):
        raise ValueError("adamw_step_: the copies must be contiguous and of one dtype")
    scalars = (lr * weight_decay, beta1, beta2, lr / (1 - beta1**step), math.sqrt(1 - beta2**step), eps)
    consts = dict(HAS_SCALE=grad_scale is not None, G_DTYPE=_TL[grads[0].dtype],
                  C_DTYPE=_TL[c_dtypes.pop() if c_dtypes else torch.bfloat16], BLOCK=BLOCK)
    for vec, t in (tables or AdamWTables()).get(params, grads, exp_avgs, exp_avg_sqs, copies):
        scale = grad_scale if grad_scale is not None else t.numel  # any pointer: unread without HAS_SCALE
        _adamw_kernel[(t.blocks,)](t.p, t.g, t.m, t.v, t.c, t.numel, t.first, t.blk, scale, *scalars, **consts,
                                   VEC=vec, num_warps=NUM_WARPS)
