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


def interpreting() -> bool:
    """Whether Triton's interpreter is on (kernels then run on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve(x: torch.Tensor, backend: str | None, env: str, what: str, available: bool) -> str:
    """The backend rule every kernel family shares: `backend`, else $env, else "auto" (Triton for CUDA tensors
    when `available`, else torch); "triton" is refused in one line where it cannot run."""
    backend = backend or os.environ.get(env, "auto")
    if backend not in BACKENDS:
        raise ValueError(f"{what} backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if x.is_cuda and available else "torch"
    if backend == "triton" and not ((x.is_cuda or interpreting()) and available):
        raise RuntimeError(f"{what} backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors) "
                           "and an importable triton")
    return backend


def resolve_block_backend(x: torch.Tensor, backend: str | None = None) -> str:
    return resolve(x, backend, "SANA_BLOCK_BACKEND", "block", TRITON_AVAILABLE)
