"""CUDA-event timing shared by the kernel benchmarks (bench_mixffn, bench_cross_attention)."""
from __future__ import annotations

import torch


def median_cuda_ms(fn, iters: int, warmup: int = 3) -> float:
    """Median over `iters` calls of fn's GPU time in milliseconds, each call bracketed by CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]
