"""Attention kernels. Depends on nothing else in this project."""
from kernels.linear_attention import linear_attention, linear_attention_reference

__all__ = ["linear_attention", "linear_attention_reference"]
