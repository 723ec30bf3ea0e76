"""Which linear-attention backend runs where, without Triton's interpreter (this process never sets it)."""
from __future__ import annotations

import pytest
import torch

from kernels.linear_attention import (
    linear_attention,
    linear_attention_packed,
    linear_attention_reference,
    resolve_backend,
)


def test_dispatch_uses_torch_on_cpu(monkeypatch):
    monkeypatch.delenv("SANA_ATTENTION_BACKEND", raising=False)
    q, k, v = torch.randn(1, 9, 3, 2, 8).unbind(2)
    assert resolve_backend(q) == "torch"
    assert torch.equal(linear_attention(q, k, v), linear_attention_reference(q, k, v))
    qkv = torch.randn(1, 9, 3, 2, 8)
    assert torch.equal(linear_attention_packed(qkv), linear_attention_reference(*qkv.unbind(2)))


def test_forcing_triton_on_cpu_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v = torch.randn(1, 9, 3, 2, 8).unbind(2)
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        linear_attention(q, k, v, backend="triton")
    monkeypatch.setenv("SANA_ATTENTION_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        linear_attention(q, k, v)
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        linear_attention_packed(torch.randn(1, 9, 3, 2, 8))


@pytest.mark.parametrize("shape", [(1, 9, 2, 8), (1, 9, 2, 2, 8), (1, 9, 3, 2, 8, 1)])
def test_packed_input_of_wrong_shape_is_a_clear_error(shape):
    with pytest.raises(ValueError, match=r"qkv of shape \(B, N, 3, H, D\), got"):
        linear_attention_packed(torch.randn(shape), backend="torch")
