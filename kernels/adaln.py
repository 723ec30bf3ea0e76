"""AdaLN-single's two per-block idioms, with a PyTorch reference and fused Triton kernels.

    modulate:        y = layer_norm(x) * (1 + scale) + shift      (no affine weights)
    gated residual:  y = x + gate * branch   (optionally also giving the gradient of a bias already in branch)
    add + modulate:  s = x + branch, y = modulate(s)   (a residual add whose sum is then modulated, in one pass;
                     optionally also giving the gradient of a bias already in branch; with a gate,
                     s = x + gate * branch: a gated residual and the modulate that reads its sum)
    modulate tee:    (x, modulate(x)) for an x that the residual stream also carries on: the backward adds
                     the stream's gradient of x into modulate's dx in its kernel (no separate add kernel)

x, branch, y are (B, N, C) token tensors; shift, scale, gate are (B, 1, C) (or (B, C), or batch 1 to
broadcast) rows of the modulation table, with any stride between batch rows, so the chunks of one
(B, 6, C) table are read in place. The reference is exactly the PyTorch expression (under autocast
layer_norm runs in float32 and the result is float32); the Triton path keeps activations in x's dtype with
float32 only inside the kernels (row statistics and the batch reductions of the backward).

Backend choice: see kernels.block_backend (SANA_BLOCK_BACKEND).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from kernels.block_backend import resolve_block_backend

if TYPE_CHECKING:  # kernels.int8_gemm imports triton, which the CPU path of this module must not
    from kernels.int8_gemm import QuantizedRows


def modulate_reference(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], eps=eps) * (1 + scale) + shift


def add_modulate_reference(x: torch.Tensor, branch: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                           eps: float, gate: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    total = x + branch if gate is None else gated_residual_reference(x, gate, branch)
    return total, modulate_reference(total, shift, scale, eps)


def gated_residual_reference(x: torch.Tensor, gate: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    return x + gate * branch


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
             backend: str | None = None, quantize: str | None = None) -> torch.Tensor | QuantizedRows:
    """layer_norm(x) * (1 + scale) + shift; x (B, N, C), shift and scale (B, 1, C).

    quantize "int8" | "fp8" (inference, for a W8A8 linear that reads it): the result quantised per token,
    as QuantizedRows; the Triton kernel quantises the float32 rows in registers and never writes the bf16
    ones (the reference quantises its own output with kernels.int8_gemm.quantize_rows)."""
    fused = resolve_block_backend(x, backend) == "triton"
    if quantize is not None:
        from kernels.int8_gemm import QuantizedRows, quantize_rows

        if fused:
            from kernels.triton_adaln import modulate_quant_triton

            q, s = modulate_quant_triton(x, shift, scale, eps, quantize)
            return QuantizedRows(q, s, x.shape, x.dtype)
        y = modulate_reference(x, shift, scale, eps)
        q, s = quantize_rows(y.reshape(-1, y.shape[-1]), quantize)
        return QuantizedRows(q, s, y.shape, y.dtype)
    if fused:
        from kernels.triton_adaln import modulate_triton

        return modulate_triton(x, shift, scale, eps)
    return modulate_reference(x, shift, scale, eps)


def add_modulate(x: torch.Tensor, branch: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
                 backend: str | None = None, branch_bias: torch.Tensor | None = None,
                 gate: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, modulate(s)), s = x + branch; x and branch (B, N, C). On the Triton back-end one kernel each way: the
    sum is written once and normalised as stored, and its backward adds the sum's own gradient (its other
    consumers') into modulate's dx, the add autograd would otherwise run as a kernel of its own.

    gate (B, 1, C): s = x + gate * branch, the gated residual's sum (gated_residual), which the forward kernel
    forms as it loads: one pass over the residual stream instead of the residual's and modulate's two; the
    backward is modulate's kernel then the gated residual's (branch_bias's gradient from the latter).

    branch_bias (C): the bias that the branch's last GEMM has added into branch with its gradient cut
    (kernels.linear.linear_bias_out); its gradient, the column sums over (B, N) of ds (the sum's gradient, which
    branch gets), is taken here, in branch_bias's dtype: on the Triton back-end by the backward kernel that writes
    ds (a third partial row beside dshift's and dscale's), instead of a ones^T ds GEMM of its own. On the reference
    path it is added as an exact + 0 that carries that gradient, as in gated_residual."""
    if branch_bias is not None and branch_bias.shape != branch.shape[-1:]:
        raise ValueError(f"add_modulate: branch_bias must be ({branch.shape[-1]},), got {tuple(branch_bias.shape)}")
    if resolve_block_backend(x, backend) == "triton":
        from kernels.triton_adaln import add_modulate_triton

        return add_modulate_triton(x, branch, shift, scale, eps, branch_bias, gate)
    if branch_bias is not None:  # + 0 exactly, with branch_bias's gradient (gate times) ds's column sum
        branch = branch + (branch_bias - branch_bias.detach()).to(branch.dtype)
    return add_modulate_reference(x, branch, shift, scale, eps, gate)


def modulate_tee(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
                 backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, modulate(x)); the caller passes the first on to x's other reader (the residual add). On the Triton
    back-end, with a gradient, the two readers' gradients of x are summed inside modulate's backward kernel."""
    if resolve_block_backend(x, backend) == "triton":
        from kernels.triton_adaln import modulate_tee_triton

        return modulate_tee_triton(x, shift, scale, eps)
    return x, modulate_reference(x, shift, scale, eps)


def gated_residual(x: torch.Tensor, gate: torch.Tensor, branch: torch.Tensor,
                   backend: str | None = None, branch_bias: torch.Tensor | None = None) -> torch.Tensor:
    """x + gate * branch; x and branch (B, N, C), gate (B, 1, C).

    branch_bias (C): the bias that the branch's last GEMM has added into branch with its gradient cut
    (kernels.linear.linear_bias_out); its gradient, the column sums of dbranch = gate * dy over (B, N), is taken
    here, in branch_bias's dtype: on the Triton back-end by the backward kernel that writes dbranch (a second
    partial row beside dgate's), instead of a ones^T dbranch GEMM of its own. On the reference path it is added
    as an exact + 0 that carries that gradient (the model never passes one there: off the fast path
    linear_bias_out leaves the bias to its GEMM and gives None)."""
    if branch_bias is not None and branch_bias.shape != branch.shape[-1:]:
        raise ValueError(f"gated residual: branch_bias must be ({branch.shape[-1]},), got {tuple(branch_bias.shape)}")
    if resolve_block_backend(x, backend) == "triton":
        from kernels.triton_adaln import gated_residual_triton

        return gated_residual_triton(x, gate, branch, branch_bias)
    if branch_bias is not None:  # + 0 exactly, with branch_bias's gradient dbranch's column sum
        branch = branch + (branch_bias - branch_bias.detach()).to(branch.dtype)
    return gated_residual_reference(x, gate, branch)
