"""Samples/s of the training loader alone (WebDataset shards -> caption sampling -> bucketed batches).

    python -m bench.bench_loader [--samples 4096] [--workers 0 1 2] [--out bench/results/loader_cpu.json]

Writes synthetic data-contract shards (32-channel float16 latents, three captions each, two buckets) to a
temporary folder, then times one pass per worker count after a warm-up batch; no model, no text encoder.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from training.caption_sampler import CaptionSamplerConfig
from training.config import DataConfig
from training.data import build_loader, find_shards
from training.testdata import write_shards


def measure(shards, workers: int, batch: int, grid: int) -> dict:
    cfg = DataConfig(batch_size=batch, num_workers=workers, shuffle_buffer=1000)
    t0 = time.perf_counter()
    n = first = 0
    t_first = None
    for b in build_loader(shards, cfg, CaptionSamplerConfig(), epochs=1):
        if t_first is None:
            t_first, first = time.perf_counter(), len(b["keys"])
        n += len(b["keys"])
    t1 = time.perf_counter()
    steady = (n - first) / (t1 - t_first) if t1 > t_first else float("nan")
    return {"workers": workers, "batch_size": batch, "samples": n, "seconds": round(t1 - t0, 3),
            "samples_per_s": round(n / (t1 - t0), 1), "steady_samples_per_s": round(steady, 1),
            "first_batch_s": round(t_first - t0, 3), "latent": [32, grid, grid]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.bench_loader", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=4096)
    p.add_argument("--per-shard", type=int, default=512)
    p.add_argument("--grid", type=int, default=16, help="latent side (16 = 512 px at 32x compression)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default="bench/results/loader_cpu.json")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        g = args.grid
        write_shards(d, n=args.samples, per_shard=args.per_shard, grids=((g, g), (g, 2 * g)))
        shards = find_shards(d)
        size = sum(s.stat().st_size for s in shards)
        rows = [measure(shards, w, args.batch_size, g) for w in args.workers]
    print(f"{'workers':>8} {'samples':>8} {'seconds':>8} {'samples/s':>10} {'steady/s':>10} {'MB/s':>8}")
    for r in rows:
        r["mb_per_s"] = round(size / 1e6 / r["seconds"], 1)
        print(f"{r['workers']:>8} {r['samples']:>8} {r['seconds']:>8.2f} {r['samples_per_s']:>10.1f} "
              f"{r['steady_samples_per_s']:>10.1f} {r['mb_per_s']:>8.1f}")
    out = {"bench": "training loader (training.data) over data-contract shards", "shards": len(shards),
           "shard_bytes": size, "buckets": [[32, g, g], [32, g, 2 * g]], "cpu_count": os.cpu_count(),
           "machine": platform.machine(), "torch": torch.__version__, "load_avg_1m": os.getloadavg()[0],
           "results": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out} (load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores: "
          "other jobs share this machine)")


if __name__ == "__main__":
    main()
