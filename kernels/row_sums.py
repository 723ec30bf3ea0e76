"""The sum over one dimension of a float32 partial-sum buffer, as one Triton kernel (a torch.library custom op).

The backward kernels (kernels.triton_adaln, kernels.triton_mixffn) write their weight, bias and modulation
gradients as partial sums, one row per program (deterministic: no atomics), and the rows are summed afterwards.
torch's `.sum(dim)` over such a tall buffer runs a reduction split across thread blocks, which zero-fills its
semaphores first: a memset, then a gap of 3-5 us before the reduction in a CUDA graph, then the reduction (6.2
us a call on the H100 over Sana-1.6B's step, 184 calls and as many memsets a step in
bench/results/profile_train-1.6b-b8_ours-graphed-cut-topt-xattn_h100.txt). Here each program sums all the rows
of a block of columns in a fixed order: one launch, no fill, and the same result every run.

    sum_rows(x, dim) == x.sum(dim) for float32 x whose dimensions after `dim` are contiguous (a partial-sum buffer,
    or a view of one that selects a row of its second-to-last dimension, as d[:, 2] of a (B, 3, C) tensor).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels.launch import (
    Launcher,
    cdiv,
    device_index,
    kernel_op,
    next_pow2,
    on_current_device,
    supported_device,
)

BLOCK_Q = 128  # columns a program (4 warps: one column a thread, BLOCK_R rows each)
MAX_BLOCK_R = 16  # rows a step


@triton.jit
def _sum_rows(x_ptr, out_ptr, R, Q, s_p, s_r, BLOCK_R: tl.constexpr, BLOCK_Q: tl.constexpr):
    """out[p, q] = sum_r x[p * s_p + r * s_r + q] for this program's BLOCK_Q columns q and its p."""
    q = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    p = tl.program_id(1).to(tl.int64)
    r = tl.arange(0, BLOCK_R)
    base = x_ptr + p * s_p + q[None, :]
    acc = tl.zeros((BLOCK_R, BLOCK_Q), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rows = r0 + r
        acc += tl.load(base + rows[:, None].to(tl.int64) * s_r, mask=(rows[:, None] < R) & (q[None, :] < Q),
                       other=0.0)
    tl.store(out_ptr + p * Q + q, tl.sum(acc, axis=0), mask=q < Q)


_launch = Launcher(_sum_rows)


def _layout(x: torch.Tensor, dim: int) -> tuple[int, int, int, int, int]:
    """(P, R, Q, stride of p, stride of r): x as P blocks of R rows of Q contiguous columns, summed over R."""
    shape, strides = x.shape, x.stride()
    P, R, Q = math.prod(shape[:dim]), shape[dim], math.prod(shape[dim + 1:])
    expect = 1
    for i in range(x.dim() - 1, dim, -1):
        if shape[i] > 1 and strides[i] != expect:
            raise ValueError(f"sum_rows: the dimensions after {dim} must be contiguous, got strides {strides}")
        expect *= shape[i]
    lead = [i for i in range(dim) if shape[i] > 1]  # these must flatten to one stride (a contiguous buffer's do)
    if any(strides[a] != strides[b] * shape[b] for a, b in zip(lead, lead[1:])):
        raise ValueError(f"sum_rows: the dimensions before {dim} must flatten, got strides {strides}")
    s_p = strides[lead[-1]] if lead else 0
    return P, R, Q, s_p, strides[dim]


@kernel_op("sana::sum_rows")
def _sum_rows_op(x: torch.Tensor, dim: int) -> torch.Tensor:
    if x.dtype != torch.float32 or not supported_device(x):
        raise ValueError(f"sum_rows: needs a float32 CUDA tensor (or the CPU under TRITON_INTERPRET=1), got "
                         f"{x.dtype} on {x.device}")
    P, R, Q, s_p, s_r = _layout(x, dim)
    out = x.new_empty(x.shape[:dim] + x.shape[dim + 1:])
    if out.numel():
        if R == 0:
            return out.zero_()
        block_r = min(MAX_BLOCK_R, next_pow2(R))
        _launch((cdiv(Q, BLOCK_Q), P), device_index(x), (x, out), (R, Q, s_p, s_r), (block_r, BLOCK_Q),
                (("num_warps", 4),))
    return out


@_sum_rows_op.register_fake
def _(x, dim):
    return x.new_empty(x.shape[:dim] + x.shape[dim + 1:])


def sum_rows(x: torch.Tensor, dim: int) -> torch.Tensor:
    """x.sum(dim) for a float32 partial-sum buffer (see the module docstring); dim >= 0."""
    if not 0 <= dim < x.dim():
        raise ValueError(f"sum_rows: dim must be in [0, {x.dim()}), got {dim}")
    if not on_current_device(x):  # Triton launches on the current device's stream
        with torch.cuda.device(x.device):
            return _sum_rows_op(x, dim)
    return _sum_rows_op(x, dim)
