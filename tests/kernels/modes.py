"""Where kernel tests run: see conftest.py beside this. Kernel tests import DEVICE, pick and gpu_only from here."""
from __future__ import annotations

import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
ON_GPU = torch.cuda.is_available() and not INTERPRET
DEVICE = "cuda" if ON_GPU else "cpu"


def pick(small, real):
    """Small shapes under the interpreter (every program runs in Python), real ones on the GPU."""
    return real if ON_GPU else small


def gpu_only(test):
    """For what only a GPU has (direct launches of compiled kernels, the speed of a path)."""
    return pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (not the interpreter)")(test)


# Triton's interpreter runs tl.dot through numpy, which has no bfloat16: bf16 dots come out wrong (seen with
# triton 3.7.1: a 16x16 bf16 dot off by 3e10), so bf16 kernels are tested on the GPU only.
FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32) if ON_GPU else (torch.float16, torch.float32)
HALF_DTYPES = tuple(d for d in FLOAT_DTYPES if d != torch.float32)
