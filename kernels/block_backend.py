"""Which implementation the Linear DiT block's fused ops (kernels.adaln, kernels.mixffn) run.

Argument `backend`, else the environment variable SANA_BLOCK_BACKEND ("auto" | "torch" | "triton"): "auto"
picks the Triton kernels for CUDA tensors when Triton imports, else the PyTorch reference (the CPU path).
"triton" is also accepted for CPU tensors under Triton's interpreter (TRITON_INTERPRET=1), which is how the
kernels are tested without a GPU. Nothing here imports triton: "auto" on the CPU must not.
"""
from __future__ import annotations

import importlib.util
import os

import torch

BACKENDS = ("auto", "torch", "triton")
# Found, not imported (importing triton costs a second, and under torch.compile this module is traced).
TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_block_backend(x: torch.Tensor, backend: str | None = None) -> str:
    backend = backend or os.environ.get("SANA_BLOCK_BACKEND", "auto")
    if backend not in BACKENDS:
        raise ValueError(f"block backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if x.is_cuda and TRITON_AVAILABLE else "torch"
    if backend == "triton" and not ((x.is_cuda or _interpreting()) and TRITON_AVAILABLE):
        raise RuntimeError("block backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors) "
                           "and an importable triton")
    return backend
