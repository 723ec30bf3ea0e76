"""The global L2 norm of a list of gradients in one Triton launch (the clipping norm of a training step).

torch.nn.utils.get_total_norm takes a norm per tensor with multi-tensor kernels and then the norm of the norms: for
Sana-1.6B's ~360 float32 gradients, 78 launches a step at 30 us each, 2.3 ms on the H100 for 6.4 GB
(bench/results/profile_train-1.6b-b8_ours-graphed-cut-topt_h100_embed_patches.txt). Here one program sums the
squares of BLOCK elements of one tensor, reached through the int64 address tables kernels.adamw builds (16-byte
accesses for the tensors that allow them, as there), and writes its partial; the norm is the square root of the
partials' sum (two small torch kernels). Deterministic: no atomics, a fixed order.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.adamw import _TL, BLOCK, NUM_WARPS, _addresses, _aligned, _block_tables


@triton.jit
def _sumsq_kernel(g_tab, numel_tab, first_tab, blk_tab, out_ptr, G_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
                  VEC: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(blk_tab + pid)  # this program's tensor
    n = tl.load(numel_tab + t)
    offs = (pid - tl.load(first_tab + t)) * BLOCK + tl.arange(0, BLOCK)
    g_ptr = tl.load(g_tab + t).to(tl.pointer_type(G_DTYPE))
    if VEC:  # as in kernels.adamw: 16-byte aligned tensors of a multiple of 8 elements only
        n = tl.multiple_of(n, 8)
        g_ptr = tl.multiple_of(g_ptr, 16)
    g = tl.load(g_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    tl.store(out_ptr + pid, tl.sum(g * g, axis=0))


class GradNormTables:
    """The address tables of one gradient list, rebuilt when an address or a size changes (the gradients of a
    CUDA-graphed backward keep theirs from step to step)."""

    def __init__(self):
        self._key: tuple | None = None
        self._sets: list[tuple[bool, int, tuple[torch.Tensor, ...]]] = []  # (vec, first partial, tables)
        self.blocks = 0

    def get(self, grads: list[torch.Tensor]) -> list[tuple[bool, int, tuple[torch.Tensor, ...]]]:
        vec = [g.numel() % 8 == 0 and _aligned(g) for g in grads]
        key = tuple((g.data_ptr(), g.numel(), w) for g, w in zip(grads, vec))
        if key != self._key:
            device = grads[0].device
            self._key, self._sets, self.blocks = key, [], 0
            for kind in (True, False):
                idx = [i for i, w in enumerate(vec) if w == kind and grads[i].numel()]
                if not idx:
                    continue
                numel, first, blk, blocks = _block_tables([grads[i].numel() for i in idx], device)
                tables = (_addresses([grads[i] for i in idx], device), numel, first, blk)
                self._sets.append((kind, self.blocks, tables))
                self.blocks += blocks
        return self._sets


def grad_norm(grads: list[torch.Tensor], tables: GradNormTables | None = None) -> torch.Tensor:
    """sqrt(sum of every element's square) over contiguous gradients of one dtype on one device, as a float32
    0-d tensor (never read back to the host)."""
    if not grads:
        return torch.zeros((), dtype=torch.float32)
    if len({g.dtype for g in grads}) != 1 or len({g.device for g in grads}) != 1 or any(
            not g.is_contiguous() for g in grads):
        raise ValueError("grad_norm: the gradients must be contiguous, of one dtype and on one device")
    tables = tables or GradNormTables()
    sets = tables.get(grads)
    partial = torch.empty(tables.blocks, dtype=torch.float32, device=grads[0].device)
    for vec, first, (g_tab, numel, first_tab, blk) in sets:
        n = blk.numel()
        _sumsq_kernel[(n,)](g_tab, numel, first_tab, blk, partial[first:first + n], G_DTYPE=_TL[grads[0].dtype],
                            BLOCK=BLOCK, VEC=vec, num_warps=NUM_WARPS)
    return partial.sum().sqrt()
