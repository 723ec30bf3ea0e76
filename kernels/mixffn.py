"""The middle of Sana's Mix-FFN (GLUMBConv) in token layout, with a PyTorch reference and a fused Triton kernel.

    u (B, N, 2*hid) = the output of the 1x1 expansion (an nn.Linear on tokens)
    s = silu(u); c = depthwise_conv3x3(s, weight, bias) on the (H, W) token grid, zero padding
    out (B, N, hid) = c[..., :hid] * silu(c[..., hid:])

N = H * W tokens in row-major grid order; weight (2*hid, 1, 3, 3) and bias (2*hid) are the parameters of
the nn.Conv2d(2*hid, 2*hid, 3, padding=1, groups=2*hid) they come from, so state dicts are unchanged. The
reference goes through the channels-first layout that conv2d needs (two transposes); the Triton kernel
reads and writes the token layout directly, with SiLU, bias and gate fused (see kernels.triton_mixffn).

Backend choice: see kernels.block_backend (SANA_BLOCK_BACKEND).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.block_backend import resolve_block_backend


def _check(u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, hw: tuple[int, int]) -> None:
    if u.dim() != 3 or u.shape[-1] % 2:
        raise ValueError(f"depthwise GLU input must be (B, N, 2*hid), got {tuple(u.shape)}")
    if u.shape[1] != hw[0] * hw[1]:
        raise ValueError(f"depthwise GLU: {u.shape[1]} tokens do not make a {hw[0]}x{hw[1]} grid")
    if weight.shape != (u.shape[-1], 1, 3, 3) or bias.shape != (u.shape[-1],):
        raise ValueError(f"depthwise GLU needs weight ({u.shape[-1]}, 1, 3, 3) and bias ({u.shape[-1]},), got "
                         f"{tuple(weight.shape)} and {tuple(bias.shape)}")


def depthwise_glu_reference(u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                            hw: tuple[int, int]) -> torch.Tensor:
    B, N, C2 = u.shape
    x = u.transpose(1, 2).reshape(B, C2, *hw)  # (B, 2*hid, H, W)
    x = F.conv2d(F.silu(x), weight, bias, padding=1, groups=C2)
    x, gate = x.chunk(2, dim=1)
    return (x * F.silu(gate)).flatten(2).transpose(1, 2)  # (B, N, hid)


def depthwise_glu(u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, hw: tuple[int, int],
                  backend: str | None = None, in_bias: torch.Tensor | None = None) -> torch.Tensor:
    """u (B, N, 2*hid) -> (B, N, hid): silu, 3x3 depthwise conv on the (H, W) grid, x * silu(gate).

    in_bias (2*hid): the bias that the expansion GEMM has added into u with its gradient cut
    (kernels.linear.linear_bias_out); its gradient, du's column sum, is taken here: on the Triton back-end by the
    backward kernel that writes du (a tenth row of its partial sums), instead of a ones^T du GEMM of its own."""
    _check(u, weight, bias, hw)
    if in_bias is not None and in_bias.shape != (u.shape[-1],):
        raise ValueError(f"depthwise GLU: in_bias must be ({u.shape[-1]},), got {tuple(in_bias.shape)}")
    if resolve_block_backend(u, backend) == "triton":
        from kernels.triton_mixffn import depthwise_glu_triton

        return depthwise_glu_triton(u, weight, bias, hw, in_bias)
    if in_bias is not None:  # + 0 exactly, with in_bias's gradient du's column sum (as the uncut GEMM's bias)
        u = u + (in_bias - in_bias.detach()).to(u.dtype)
    return depthwise_glu_reference(u, weight, bias, hw)
