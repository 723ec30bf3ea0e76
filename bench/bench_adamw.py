"""The optimizer's share of a training step: torch's fused AdamW (with the clipping scale, as the trainer runs it)
plus the forward's bf16 weight cast, against sana_core.adamw.TritonAdamW (kernels.adamw), which does both in one
pass. On the parameters of a real Sana config (LinearDiT built on the GPU, random gradients), one process.

    python bench/bench_adamw.py [--config sana-1.6b] [--sweep] [--out bench/results]

Prints a table (ms a step, GB moved, TB/s) and writes adamw_<config>_<gpu>.json. --sweep times the kernel's
BLOCK and num_warps choices too.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import kernels.adamw as ka  # noqa: E402
from bench.timing import gpu_tag, median_cuda_ms  # noqa: E402
from kernels.linear import WeightCopies, castable  # noqa: E402
from sana_core.adamw import TritonAdamW  # noqa: E402
from sana_core.dit import DIT_CONFIGS, Linear, LinearDiT  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="sana-1.6b", choices=sorted(DIT_CONFIGS))
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args()

    torch.manual_seed(0)
    model = LinearDiT(DIT_CONFIGS[args.config]).cuda()
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    linears = castable((q for m in model.modules() if isinstance(m, Linear) for q in (m.weight, m.bias)),
                       torch.bfloat16)
    copies = WeightCopies(linears, torch.bfloat16)
    n_cast = sum(p.numel() for p in linears)
    scale = torch.tensor(2.0, device="cuda")

    torch_opt = torch.optim.AdamW(params, lr=1e-6, fused=True)
    torch_opt.grad_scale = scale  # as training.optim.clip_gradients sets it

    def torch_step():
        torch_opt.step()

    @torch.no_grad()  # as the forward's cast runs: the copies are views of one buffer, made without grad
    def cast():
        torch._foreach_copy_(copies.copies, copies.params)

    ours = TritonAdamW(params, lr=1e-6)
    ours.grad_scale = scale

    rows = []

    def row(name, ms, bytes_):
        rows.append(dict(name=name, ms=ms, gb=bytes_ / 1e9, tb_s=bytes_ / (ms * 1e-3) / 1e12))

    t_torch, t_cast = median_cuda_ms(torch_step, args.iters), median_cuda_ms(cast, args.iters)
    row("torch fused AdamW, grad_scale (p, g, m, v read; p, g, m, v written)", t_torch, 32 * n)
    row("the forward's bf16 cast of the Linear weights (foreach copy)", t_cast, 6 * n_cast)
    row("sum of the two", t_torch + t_cast, 32 * n + 6 * n_cast)
    row("TritonAdamW (p, g, m, v read; p, m, v and the bf16 copy written)", median_cuda_ms(ours.step, args.iters),
        28 * n + 2 * n_cast)
    if args.sweep:
        for block, warps in [(1024, 4), (2048, 4), (2048, 8), (4096, 4), (4096, 8), (8192, 8), (8192, 16)]:
            ka.BLOCK, ka.NUM_WARPS = block, warps
            ours._tables = [None] * len(ours.param_groups)  # the block tables depend on BLOCK
            row(f"  BLOCK {block}, {warps} warps", median_cuda_ms(ours.step, args.iters), 28 * n + 2 * n_cast)

    print(f"{args.config}: {n / 1e9:.3f} B parameters ({n_cast / 1e9:.3f} B cast), {torch.cuda.get_device_name()}")
    print(f"{'':<78} {'ms':>8} {'GB':>7} {'TB/s':>6}")
    for r in rows:
        print(f"{r['name']:<78} {r['ms']:8.2f} {r['gb']:7.1f} {r['tb_s']:6.2f}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"adamw_{args.config}_{gpu_tag()}.json"
    path.write_text(json.dumps(dict(config=args.config, params=n, cast_params=n_cast, gpu=torch.cuda.get_device_name(),
                                    rows=rows, date=time.strftime("%Y-%m-%d"),
                                    command="python bench/bench_adamw.py " + " ".join(sys.argv[1:])), indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
