"""ReLU linear attention: the one function the Linear DiT calls, with a PyTorch reference and a Triton path.

    out[n] = relu(q[n]) @ (sum_m relu(k[m])^T v[m]) / (relu(q[n]) . sum_m relu(k[m]) + eps)

Two entry points: `linear_attention_packed(qkv)` takes the QKV projection output as it falls out of
(B, N, 3*H*D) -> view (B, N, 3, H, D), which is what the DiT calls (the Triton backward then writes one
gradient of qkv's shape instead of three that autograd would stack); `linear_attention(q, k, v)` takes
q, k, v as (B, N, H, D) each, for other callers. Strided views are accepted and no transpose is
materialised. The output is a contiguous (B, N, H, D) in the input dtype, so reshaping it to (B, N, H*D)
for the output projection is free. K^T V and the K-sum are accumulated in float32. The Triton path is a
torch.library custom op (kernels.triton_linear_attention): torch.compile traces it without graph breaks.

Backend choice: argument `backend`, else the environment variable SANA_ATTENTION_BACKEND
("auto" | "torch" | "triton"); "auto" uses Triton for CUDA tensors when Triton imports, else torch.
"triton" is also accepted for CPU tensors under Triton's interpreter (TRITON_INTERPRET=1), which is how
the kernels are tested without a GPU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.block_backend import interpreting, resolve

EPS = 1e-15  # as in NVlabs/Sana and diffusers' SanaLinearAttnProcessor2_0
BACKENDS = ("auto", "torch", "triton")


def linear_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """The PyTorch reference (and the CPU path). Float32 accumulation; float64 inputs stay float64."""
    out_dtype = v.dtype
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    q = F.relu(q).to(acc)
    k = F.relu(k).to(acc)
    v = v.to(acc)
    kv = torch.einsum("bnhd,bnhe->bhde", k, v)  # (B, H, D, Dv)
    ksum = k.sum(dim=1)  # (B, H, D)
    num = torch.einsum("bnhd,bhde->bnhe", q, kv)
    den = torch.einsum("bnhd,bhd->bnh", q, ksum).unsqueeze(-1)
    return (num / (den + eps)).to(out_dtype).contiguous()


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken Triton install means "no Triton", not a crash
        return False
    return True


def resolve_backend(x: torch.Tensor, backend: str | None = None) -> str:
    # Triton is imported only where it could run: "auto" on the CPU must not pay for (or break on) it.
    available = (x.is_cuda or interpreting()) and _triton_available()
    return resolve(x, backend, "SANA_ATTENTION_BACKEND", "attention", available)


def check_packed(qkv: torch.Tensor) -> None:
    if not (qkv.dim() == 5 and qkv.shape[2] == 3):
        raise ValueError(f"packed linear attention needs qkv of shape (B, N, 3, H, D), got {tuple(qkv.shape)}")


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = EPS,
                     backend: str | None = None) -> torch.Tensor:
    """q, k, v (B, N, H, D) -> (B, N, H, D)."""
    if resolve_backend(q, backend) == "triton":
        from kernels.triton_linear_attention import triton_linear_attention

        return triton_linear_attention(q, k, v, eps)
    return linear_attention_reference(q, k, v, eps)


def linear_attention_packed(qkv: torch.Tensor, eps: float = EPS, backend: str | None = None) -> torch.Tensor:
    """qkv (B, N, 3, H, D), e.g. qkv_proj(x).view(B, N, 3, H, D) -> (B, N, H, D); same function and backend
    rule as linear_attention on qkv.unbind(2)."""
    check_packed(qkv)
    if resolve_backend(qkv, backend) == "triton":
        from kernels.triton_linear_attention import triton_linear_attention_packed

        return triton_linear_attention_packed(qkv, eps)
    return linear_attention_reference(*qkv.unbind(2), eps)
