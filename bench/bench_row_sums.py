"""The backward kernels' partial-sum reductions on the GPU: torch's `.sum(dim)` against kernels.row_sums, at the
buffers a Linear DiT training step reduces (the shapes come from the kernels' own grid planners, so they follow
the committed tiles). Times without the host and with the gaps a CUDA graph has between kernels
(bench.timing.graphed_ms: 20 calls in one graph), which is how the trainer replays the step; torch's split
reductions zero-fill their semaphores first, a memset node before each.

    python bench/bench_row_sums.py [--out bench/results]    -> row_sums_<gpu>.json, a table on stdout
"""
from __future__ import annotations

import argparse

import torch

from bench.timing import graphed_ms, write_result
from kernels.row_sums import sum_rows


def _cases(device: int) -> list[tuple[str, tuple[int, ...], int]]:
    """(name, buffer shape, summed dim) for Sana-1.6B at batch 8 and Sana-0.6B at batch 16 (1024 px)."""
    from kernels import triton_adaln as adaln
    from kernels import triton_mixffn as glu

    cases = []
    for model, B, C, hid in (("1.6b-b8", 8, 2240, 5600), ("0.6b-b16", 16, 1152, 2880)):
        N = 1024
        chunks, _ = adaln._reduce_grid(B, N, adaln._tile(C, "modulate_bwd")[0], device, "modulate_bwd")
        cases += [(f"{model} modulate dshift/dscale", (B, chunks, 2, C), 1),
                  (f"{model} add_modulate with bias row", (B, chunks, 3, C), 1),
                  (f"{model} bias total over the batch", (B, 3, C), 0)]
        strips = glu._plan(B, 32, 32, hid, glu.CONFIG["bwd_conv"], device)["strips"]
        cases.append((f"{model} GLU dbias", (strips, 2 * hid), 0))
        strips = glu._plan(B, 32, 32, 2 * hid, glu.CONFIG["bwd_input"], device)["strips"]
        cases.append((f"{model} GLU dweight + du sums", (strips, 10, 2 * hid), 0))
    return cases


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results", help="folder for row_sums_<gpu>.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    print(f"{'buffer':40s} {'shape':>22s} {'torch us':>9s} {'ours us':>8s} {'max rel diff':>12s}")
    for name, shape, dim in _cases(torch.cuda.current_device()):
        x = torch.randn(shape, device="cuda")
        src = x[:, 2] if name.endswith("over the batch") else x  # the bias row of the (B, 3, C) sums: strided
        ref = src.double().sum(0 if src is not x else dim)
        d = 0 if src is not x else dim
        ours = sum_rows(src, d)
        err = ((ours.double() - ref).abs().max() / ref.abs().max()).item()
        row = dict(buffer=name, shape=list(src.shape), dim=d, torch_us=graphed_ms(lambda: src.sum(d)) * 1e3,
                   ours_us=graphed_ms(lambda: sum_rows(src, d)) * 1e3, max_rel_diff=err)
        rows.append(row)
        print(f"{name:40s} {str(tuple(src.shape)):>22s} {row['torch_us']:9.1f} {row['ours_us']:8.1f} {err:12.1e}")
    write_result(args.out, "row_sums", dict(gpu=torch.cuda.get_device_name(), rows=rows))


if __name__ == "__main__":
    main()
