"""The Linear DiT's linear backward on the GPU at Sana-0.6B's batch-16 shapes (16384 tokens): weight gradient as a
bf16 GEMM then a cast, or written in float32 by the GEMM (torch.mm out_dtype); bias gradient by sum, by ones @ dy,
or a Triton column sum. Times without the host (bench.timing.graphed_ms). Writes OUT/probe1.json, committed as
bench/results/linear_backward_h200.json. Usage: OUT=DIR PYTHONPATH=. python bench/bench_linear_backward.py
"""
import json
import os

import torch
import triton
import triton.language as tl

from bench.timing import graphed_ms

torch.manual_seed(0)
dev = "cuda"
res = {}
M = 16384

@triton.jit
def _colsum(g_ptr, part_ptr, M, N, rows_per, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    chunk = tl.program_id(1)
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    for i in range(0, rows_per, BLOCK_R):
        r = chunk * rows_per + i + tl.arange(0, BLOCK_R)
        m = (r < M)[:, None] & (cols < N)[None, :]
        acc += tl.load(g_ptr + r.to(tl.int64)[:, None] * N + cols[None, :], mask=m, other=0.0).to(tl.float32)
    tl.store(part_ptr + chunk * N + cols, tl.sum(acc, 0), mask=cols < N)

def colsum(g, BLOCK_R=32, BLOCK_N=128, chunks=64, warps=4):
    Mg, N = g.shape
    rows_per = triton.cdiv(triton.cdiv(Mg, chunks), BLOCK_R) * BLOCK_R
    ch = triton.cdiv(Mg, rows_per)
    part = torch.empty(ch, N, device=g.device, dtype=torch.float32)
    _colsum[(triton.cdiv(N, BLOCK_N), ch)](g, part, Mg, N, rows_per, BLOCK_R, BLOCK_N, num_warps=warps)
    return part.sum(0)

for (n, k) in [(1152, 1152), (5760, 1152), (1152, 2880), (3456, 1152)]:
    g = torch.randn(M, n, device=dev, dtype=torch.bfloat16)
    x = torch.randn(M, k, device=dev, dtype=torch.bfloat16)
    ref = g.t().float() @ x.float()
    row = dict(mm_bf16=graphed_ms(lambda: g.t() @ x), mm_then_cast=graphed_ms(lambda: (g.t() @ x).float()))
    try:
        out = torch.mm(g.t(), x, out_dtype=torch.float32)
        row["err_out_fp32"] = ((out - ref).abs().max() / ref.abs().max()).item()
        row["err_bf16"] = (((g.t() @ x).float() - ref).abs().max() / ref.abs().max()).item()
        row["mm_out_fp32"] = graphed_ms(lambda: torch.mm(g.t(), x, out_dtype=torch.float32))
    except RuntimeError as e:
        row["mm_out_fp32"] = str(e)[:200]
    dref = g.float().sum(0)
    ones = torch.ones(1, M, device=dev, dtype=torch.bfloat16)
    row.update(sum_bf16=graphed_ms(lambda: g.sum(0)), sum_fp32=graphed_ms(lambda: g.sum(0, dtype=torch.float32)),
               ones_mm_bf16=graphed_ms(lambda: ones @ g), gt_mv=graphed_ms(lambda: g.t() @ ones[0]))
    try:
        row["ones_mm_fp32"] = graphed_ms(lambda: torch.mm(ones, g, out_dtype=torch.float32))
        row["err_ones_mm_fp32"] = ((torch.mm(ones, g, out_dtype=torch.float32)[0] - dref).abs().max() / dref.abs().max()).item()
    except RuntimeError as e:
        row["ones_mm_fp32"] = str(e)[:200]
    for cfg in [(32, 128, 64, 4), (64, 64, 128, 4), (32, 256, 128, 8), (16, 128, 132, 4), (64, 128, 256, 8)]:
        row[f"triton_{cfg}"] = graphed_ms(lambda: colsum(g, *cfg))
        row[f"err_triton_{cfg}"] = ((colsum(g, *cfg) - dref).abs().max() / dref.abs().max()).item()
    print((n, k), {a: (round(b * 1e3, 1) if isinstance(b, float) and 'err' not in a else b) for a, b in row.items()}, flush=True)
    res[f"{n}x{k}"] = row
a = torch.randn(M, 1152, device=dev, dtype=torch.bfloat16)
b = torch.randn_like(a)
res["add_us"] = graphed_ms(lambda: a + b) * 1e3
res["add_inplace_us"] = graphed_ms(lambda: a.add_(b)) * 1e3
print(res["add_us"], res["add_inplace_us"])
json.dump(res, open(os.environ.get("OUT", "/tmp") + "/probe1.json", "w"), indent=1)
