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


def graphed_ms(fn, reps: int = 20, iters: int = 10) -> float:
    """GPU time in milliseconds of one call of fn, without the host: `reps` calls captured in one CUDA graph,
    the median replay over `iters` divided by reps. For kernels shorter than their launch (a few tens of
    microseconds), where median_cuda_ms measures the host."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compiles, allocator) outside the capture
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    return median_cuda_ms(graph.replay, iters) / reps
