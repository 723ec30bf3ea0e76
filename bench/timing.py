"""CUDA-event timing and result files shared by the GPU benchmarks (bench_mixffn, bench_cross_attention,
bench_adaln, bench_train_step)."""
from __future__ import annotations

import json
from pathlib import Path

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


def gpu_tag(name: str | None = None) -> str:
    """The GPU's short name for result files: h200, h100, else the last word of its name."""
    name = name or torch.cuda.get_device_name()
    return "h200" if "H200" in name else "h100" if "H100" in name else name.split()[-1].lower()


def write_result(out_dir: str | Path, stem: str, result: dict) -> Path:
    """result as JSON to out_dir/<stem>_<gpu>.json (folders made); prints and returns the path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{stem}_{gpu_tag()}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")
    return path
