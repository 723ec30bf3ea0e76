"""nn.Linear's y = x @ W^T + b for the Linear DiT's fast path: the same cuBLAS GEMMs, a leaner backward.

Under bf16 autocast PyTorch computes the weight and bias gradients in bf16 and then casts them to the float32
parameters (one more kernel and a bf16 rounding each), and takes the bias gradient as a column sum with a
reduction kernel at about three times its HBM time. Here, for the same forward:

    dx = dy @ W                         (as PyTorch)
    dW = dy^T @ x                       written in the parameter's dtype by the GEMM (torch.mm out_dtype:
                                        cuBLAS accumulates in float32 anyway; no bf16 rounding, no cast)
    db = ones^T @ dy                    the same GEMM routine as a column sum, in the bias's dtype

On the H200 at Sana-0.6B's batch-16 shapes (16384 tokens; `python bench/bench_linear_backward.py`,
bench/results/linear_backward_h200.json): dW 65.2 against 69.4 us (1152 x 1152; 172.0 / 181.7 us for
1152 x 2880, 184.3 / 195.7 for 3456 x 1152), db 11.0 against 27.7 us (1152 columns; 48.7 / 59.3 us for 5760),
about 3 ms of GPU time in a 28-block training step by these counts (the graphed bs16 step measured 146.1 ms
after against 145.7-146.7 before: the gain did not show in the step, see bench/NOTES_block_fastpath.md).

Backend choice: kernels.block_backend (SANA_BLOCK_BACKEND), with the block's other fused ops; under
torch.compile the plain F.linear (the compiler plans its own backward). Inference (no gradient) is F.linear.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.block_backend import resolve_block_backend


def _mm(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """a @ b in `dtype`: written so by the GEMM where it can (CUDA, half inputs, float32 out)."""
    if a.is_cuda and dtype == torch.float32 and a.dtype in (torch.bfloat16, torch.float16):
        return torch.mm(a, b, out_dtype=dtype)
    return (a @ b).to(dtype)


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, dtype):
        xc, wc = x.to(dtype), weight.to(dtype)  # what autocast would cast (no copy when already `dtype`)
        out = F.linear(xc, wc, None if bias is None else bias.to(dtype))
        ctx.save_for_backward(xc, wc)
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return out

    @staticmethod
    def backward(ctx, dy):
        xc, wc = ctx.saved_tensors
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        g = dy.reshape(-1, dy.shape[-1]).to(wc.dtype)  # (M, N)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = (g @ wc).view(*dy.shape[:-1], wc.shape[1]).to(x_dtype)
        if ctx.needs_input_grad[1]:
            dw = _mm(g.t(), xc.reshape(-1, xc.shape[-1]), w_dtype)  # (N, K)
        if ctx.needs_input_grad[2]:
            db = _mm(g.new_ones((1, g.shape[0])), g, b_dtype).view(-1)  # (N,)
        return dx, dw, db, None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           backend: str | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), autocast included; on the fast path with the backward above."""
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                              or (bias is not None and bias.requires_grad))
    if not needs_grad or torch.compiler.is_compiling() or resolve_block_backend(x, backend) != "triton":
        return F.linear(x, weight, bias)
    kind = x.device.type
    dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else weight.dtype
    return _Linear.apply(x, weight, bias, dtype)
