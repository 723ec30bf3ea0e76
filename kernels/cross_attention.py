"""Softmax cross-attention of image tokens to a caption, as the Linear DiT block calls it.

    q (B, N, H*D)    the query projection's output, token layout
    kv (B, L, 2*H*D) the key/value projection's output (k then v, each H heads of D)
    bias (B, L)      additive key bias (the model's -10000 on caption padding)
    out (B, N, H*D)  = softmax(q_h k_h^T / sqrt(D) + bias) v_h for each head h, token layout

The reference is F.scaled_dot_product_attention on (B, H, N, D) views (cuDNN on Hopper, the best of PyTorch's
backends at this shape: bench/bench_cross_attention.py), with the output transposed back to token layout.
The Triton path (kernels.triton_cross_attention) reads q and kv and writes out and every gradient in their
token layouts, and is built for a caption cut to its batch's longest (the trainer's and the pipeline's
`caption_bucket`): up to MAX_KEYS keys, every key of an (image, head) in one tile. Longer captions (a
caption_bucket of 0 pads every caption to 300) and head dims over MAX_HEAD_DIM take the reference.

Backend choice: argument `backend`, else SANA_CROSS_ATTENTION_BACKEND ("auto" | "torch" | "triton"), else
"auto": the Triton kernels for CUDA tensors (where they apply), SDPA elsewhere. They are tested against float64
on the CPU and the GPU (tests/kernels/test_cross_attention.py passes in full on an H100) and, with the backward as
a dq and a dk/dv kernel (2026-12-06), are faster than cuDNN's kernels at both Sana shapes (H100, kernel times:
forward 0.051 against 0.084 ms at Sana-1.6B's batch 8, 0.058 against 0.110 at Sana-0.6B's batch 16; in the
1.6B training step's profile 0.30 ms a block for forward and backward against cuDNN's 0.32 plus the transposes
and the k/v cat the SDPA path needs): bench/NOTES_block_fastpath.md. "torch" gives SDPA.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from kernels.block_backend import TRITON_AVAILABLE, resolve

MAX_KEYS = 128  # one key tile: the Triton backward keeps dk and dv (keys x head, float32) in registers
MAX_HEAD_DIM = 128


def _check(q: torch.Tensor, kv: torch.Tensor, bias: torch.Tensor, heads: int) -> None:
    if q.dim() != 3 or kv.dim() != 3 or q.shape[0] != kv.shape[0] or kv.shape[-1] != 2 * q.shape[-1]:
        raise ValueError(f"cross-attention needs q (B, N, C) and kv (B, L, 2C), got {tuple(q.shape)} and "
                         f"{tuple(kv.shape)}")
    if heads < 1 or q.shape[-1] % heads:
        raise ValueError(f"cross-attention: {q.shape[-1]} channels do not split into {heads} heads")
    if bias.shape != kv.shape[:2]:
        raise ValueError(f"cross-attention bias must be (B, L) = {tuple(kv.shape[:2])}, got {tuple(bias.shape)}")
    if kv.shape[1] == 0:
        raise ValueError("cross-attention needs at least one key (caption token)")


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """t, or a copy of it where its first element is not at a 16-byte boundary. SDPA's memory-efficient CUDA kernel
    (what float32 takes) reads with 16-byte loads without checking the address: a float32 column slice of a wider
    projection at a 12-byte offset failed with cudaErrorMisalignedAddress on an H100, and a CUDA error poisons the
    process. Projection outputs (the model's q and kv) are aligned and pass through; traced code (torch.compile:
    fake tensors have no address) is left as it is."""
    if t.is_cuda and not torch.compiler.is_compiling() and t.data_ptr() % 16:
        return t.clone(memory_format=torch.contiguous_format)
    return t


def cross_attention_reference(q: torch.Tensor, kv: torch.Tensor, bias: torch.Tensor, heads: int) -> torch.Tensor:
    q, kv = _aligned(q), _aligned(kv)
    B, N, C = q.shape
    d = C // heads
    qh = q.view(B, N, heads, d).transpose(1, 2)  # (B, H, N, D)
    # unbind, not a permute of the (2, B, H, L, D) stack: the backward then stacks dk and dv straight into the
    # projection's (B, L, 2, H, D) gradient (one vectorised cat, instead of a cat and a strided copy)
    k, v = (t.transpose(1, 2) for t in kv.view(B, kv.shape[1], 2, heads, d).unbind(2))  # each (B, H, L, D)
    out = F.scaled_dot_product_attention(qh, k, v, attn_mask=bias[:, None, None, :].to(qh.dtype))
    return out.transpose(1, 2).reshape(B, N, C)


def fused_supported(q: torch.Tensor, kv: torch.Tensor, heads: int) -> bool:
    return (kv.shape[1] <= MAX_KEYS and q.shape[-1] // heads <= MAX_HEAD_DIM and q.dtype == kv.dtype
            and q.dtype in (torch.float16, torch.bfloat16, torch.float32))


def resolve_backend(x: torch.Tensor, backend: str | None = None) -> str:
    backend = backend or os.environ.get("SANA_CROSS_ATTENTION_BACKEND") or "auto"
    return resolve(x, backend, "SANA_CROSS_ATTENTION_BACKEND", "cross-attention", TRITON_AVAILABLE)


def cross_attention(q: torch.Tensor, kv: torch.Tensor, bias: torch.Tensor, heads: int,
                    backend: str | None = None) -> torch.Tensor:
    """q (B, N, C), kv (B, L, 2C), bias (B, L) -> (B, N, C)."""
    _check(q, kv, bias, heads)
    if resolve_backend(q, backend) == "triton" and fused_supported(q, kv, heads):
        from kernels.triton_cross_attention import cross_attention_triton

        return cross_attention_triton(q, kv, bias, heads)
    return cross_attention_reference(q, kv, bias, heads)
