"""Host time of the Linear DiT's eager training step: what Python, autograd and the dispatcher cost per step.

    TRITON_INTERPRET=1 python bench/bench_host_overhead.py [--depth 28] [--steps 20] [--out bench/results]

Runs on the CPU: a DiT of Sana-0.6B's depth (28 blocks) but narrow tensors (hidden 64, 4x4 latents, 8 caption
tokens), forward + backward, with every Triton launch replaced by a no-op (kernels.launch.Launcher), so what is
timed is the host side alone: the same Python and autograd work a GPU step does before its kernels run (the
GPU step additionally pays the CUDA launch calls). Variants, in one process:
  torch            the PyTorch reference path (SANA_BLOCK_BACKEND=torch): real CPU math on tiny tensors
  ops, dispatcher  the Triton path with every kernel call through its torch.library op
  ops, direct      the Triton path as eager runs it (kernels.launch.KernelOp: the op only under tracing)
Median of --repeats runs of --steps steps each. Writes host_overhead_cpu.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    sys.exit("run with TRITON_INTERPRET=1 (the Triton path on CPU tensors; launches are stubbed anyway)")

import torch  # noqa: E402

from kernels import launch  # noqa: E402
from sana_core.dit import DiTConfig, LinearDiT  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=28)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    torch.set_num_threads(1)
    launch.Launcher.__call__ = lambda self, *a, **k: None  # host work only
    torch.manual_seed(0)
    model = LinearDiT(DiTConfig(hidden_size=64, depth=args.depth, num_heads=2, cross_heads=2, caption_channels=32))
    x, t = torch.randn(2, 32, 4, 4), torch.rand(2)
    y, mask = torch.randn(2, 8, 32), torch.ones(2, 8, dtype=torch.bool)

    def step():
        model(x, t, y, mask).square().mean().backward()

    variants = {"torch": ("torch", False), "ops, dispatcher": ("triton", True), "ops, direct": ("triton", False)}
    rows = {}
    for name, (backend, via) in variants.items():
        os.environ["SANA_BLOCK_BACKEND"] = os.environ["SANA_ATTENTION_BACKEND"] = backend
        launch.KernelOp.via_dispatcher = via
        for _ in range(3):
            step()
        runs = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step()
            runs.append((time.perf_counter() - t0) / args.steps * 1e3)
        rows[name] = dict(ms=statistics.median(runs), runs_ms=runs)
    launch.KernelOp.via_dispatcher = False
    print(f"host time of one forward + backward, {args.depth} blocks, launches stubbed (CPU, 1 thread)")
    for name, r in rows.items():
        print(f"  {name:<16} {r['ms']:7.1f} ms   (runs: {', '.join(f'{v:.1f}' for v in r['runs_ms'])})")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = dict(depth=args.depth, steps=args.steps, repeats=args.repeats, rows=rows, cpu_count=os.cpu_count(),
                  torch=torch.__version__, command="TRITON_INTERPRET=1 python bench/bench_host_overhead.py "
                  + " ".join(sys.argv[1:]))
    (out / "host_overhead_cpu.json").write_text(json.dumps(record, indent=1))
    print(f"wrote {out / 'host_overhead_cpu.json'}")


if __name__ == "__main__":
    main()
