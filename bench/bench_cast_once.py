"""The eager training step with the Linear weights cast once a forward (kernels.linear.weight_casts) and with a
cast at every call (kernels.linear.CAST_ONCE = False), alternating in one process, each variant twice.

    python bench/bench_cast_once.py [--mode train-0.6b-b16] [--out bench/results]

Uses bench_train_step's `ours-cut` variant (LinearDiT eager, captions cut to 64-token buckets, fused AdamW, bf16
autocast). Also the eager step measured on its own: bench_train_step measures it after the graphed variant in the
same process, which has read 171-180 ms against 136-141 ms alone (README, "Measured"). Prints a line per run and
writes eager_cast_once_<mode>_<gpu>.json.
"""
from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import bench.bench_train_step as bts  # noqa: E402
from bench.timing import write_result  # noqa: E402
from kernels import linear as kl  # noqa: E402
from sana_core.dit import DIT_CONFIGS  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", default="train-0.6b-b16", choices=[m for m, v in bts.MODES.items() if v["kind"] == "train"])
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=8)
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_cast_once needs a CUDA GPU")
    mode = bts.MODES[args.mode]
    ns = types.SimpleNamespace(warmup=args.warmup, iters=args.iters, current_mode=args.mode)
    flops = bts.model_flops(DIT_CONFIGS[mode["config"]], mode["batch"], mode["latent"])
    rows = []
    for _ in range(2):
        for once in (True, False):
            kl.CAST_ONCE = once
            r = bts.run_variant("ours-cut", mode, ns, flops, bts.matmul_ceiling_tflops(), None)
            rows.append(dict(cast_once=once, ms=r.get("median_ms"), min_ms=r.get("min_ms"), error=r.get("error")))
            print(f"{args.mode} cast_once {once}: median {r.get('median_ms', float('nan')):.1f} ms, "
                  f"min {r.get('min_ms', float('nan')):.1f}", flush=True)
    kl.CAST_ONCE = True
    write_result(Path(args.out), f"eager_cast_once_{args.mode}", dict(mode=args.mode, rows=rows))


if __name__ == "__main__":
    main()
