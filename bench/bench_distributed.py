"""Data-parallel scaling of a training step: 1 vs N processes at the same per-GPU batch, DDP and FSDP2.

    python bench/bench_distributed.py [--config sana-0.6b] [--batch 16] [--latent 32] [--nproc 2] [--out DIR]
    python bench/bench_distributed.py --device cpu --config tiny      # gloo on the CPU (CI checks this mode)

One command: it launches torchrun itself, once with 1 process and once with --nproc processes (NCCL on CUDA,
gloo on the CPU), and in each runs the same step for every strategy in turn: the model unwrapped (1 process
only: the plain baseline), DDP, FSDP2 (reshard after forward) and FSDP2 with dist.reshard_after_forward=false.
The step is the trainer's: training.distributed.wrap, bf16 autocast on CUDA, the rectified-flow loss with a
per-rank generator, backward, global grad-norm clipping, AdamW from training.optim, the EMA update; random
latents and text embeddings stand in for the loader and the frozen text encoder (neither scales with the
number of GPUs). Per strategy and world size: median step time, images/s (all ranks), peak memory per GPU
(torch.cuda.max_memory_allocated; peak RSS on the CPU), and the time of one DCP checkpoint save
(training.checkpoint.save: model, optimizer, EMA). Scaling = N-process images/s over 1-process images/s of the
same strategy and over the plain 1-process baseline. Prints a table and writes distributed_<device>.json.

On CUDA it refuses, in one line, to run with fewer than --nproc GPUs.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STRATEGIES = ("ddp", "fsdp", "fsdp_keep")  # fsdp_keep: FSDP2 with reshard_after_forward=false


# -- worker (one torchrun process) -------------------------------------------------------------------------
def _peak_gib(device) -> float:
    import torch
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _measure(strategy: str, args, info, ckpt_root: Path) -> dict:
    import torch

    from sana_core.dit import DIT_CONFIGS, LinearDiT
    from sana_core.flow import FlowConfig, flow_loss
    from training import checkpoint as ckpt
    from training import distributed as D
    from training.config import DistConfig, OptimConfig
    from training.ema import EMA
    from training.optim import build_optimizer

    dev, cuda = info.device, info.device.type == "cuda"
    torch.manual_seed(0)
    cfg = DIT_CONFIGS[args.config]
    model = LinearDiT(cfg).to(dev)
    model.gradient_checkpointing = args.checkpointing
    dcfg = DistConfig(bucket_cap_mb=args.bucket_mb, reshard_after_forward=strategy != "fsdp_keep")
    model = D.wrap(model, "fsdp" if strategy.startswith("fsdp") else strategy, info, bf16=cuda, cfg=dcfg)
    raw = D.unwrap(model)
    opt = build_optimizer(model, OptimConfig(name="adamw", lr=1e-4))
    ema = EMA(raw, 0.9999)
    gen = torch.Generator(device=dev)
    gen.manual_seed(1000 + info.rank)
    B, L = args.batch, args.text_tokens
    x0 = torch.randn(B, cfg.in_channels, args.latent, args.latent, device=dev, generator=gen)
    y = torch.randn(B, L, cfg.caption_channels, device=dev, generator=gen)
    mask = torch.ones(B, L, dtype=torch.bool, device=dev)
    mask[:, L * 2 // 5:] = False
    flow = FlowConfig(shift=3.0)

    def step() -> float:
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=cuda):
            loss, _ = flow_loss(model, x0, y, mask, flow, generator=gen)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if hasattr(gn, "full_tensor"):
            gn = gn.full_tensor()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(raw)
        return float(gn)  # the trainer's per-step host sync (finiteness check)

    def sync():
        if cuda:
            torch.cuda.synchronize(dev)
        D.barrier(info)

    for _ in range(args.warmup):
        step()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        gn = step()
        if cuda:
            torch.cuda.synchronize(dev)
        times.append(time.perf_counter() - t)
    if not math.isfinite(gn):
        raise RuntimeError(f"{strategy}: non-finite grad norm")
    peak = _peak_gib(dev)
    sync()
    t = time.perf_counter()
    path = ckpt.save(ckpt_root / strategy, 1, model, opt, ema, {"step": 1}, {}, info, keep_last=1)
    save_s = time.perf_counter() - t
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if info.is_main else 0
    sync()
    # The slowest rank sets the pace of a synchronous step: per step, the max over ranks.
    all_times = D.gather_objects(times, info)
    step_s = [max(ts[i] for ts in all_times) for i in range(len(times))]
    med = statistics.median(step_s)
    row = {"strategy": strategy, "world": info.world, "batch_per_gpu": B, "median_step_ms": med * 1e3,
           "min_step_ms": min(step_s) * 1e3, "images_per_s": info.world * B / med,
           "peak_gib_per_rank": D.gather_objects(round(peak, 3), info), "checkpoint_save_s": save_s,
           "checkpoint_gib": size / 2**30}
    return row


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from training import distributed as D
    from training.config import DistConfig
    if not dist.is_initialized():
        # training.distributed.setup starts a process group only for more than one process; the 1-process DDP
        # and FSDP2 rows need one too (the plain "none" row is the baseline without it).
        cuda = args.device == "cuda"
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else None
        if cuda:
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if cuda else "gloo", device_id=dev)
    info = D.setup(DistConfig(), args.device)
    strategies = (["none"] if info.world == 1 else []) + list(args.strategies)
    rows = []
    ckpt_root = Path(tempfile.mkdtemp(prefix="bench-dist-ckpt-")) if info.is_main else None
    root = D.gather_objects(str(ckpt_root) if ckpt_root else None, info)[0]  # rank 0's temp dir for all
    try:
        for s in strategies:
            rows.append(_measure(s, args, info, Path(root)))
            gc.collect()  # free this strategy's model and optimizer state before the next one is built
            if info.device.type == "cuda":
                torch.cuda.empty_cache()
            if info.is_main:
                r = rows[-1]
                print(f"  world {info.world} {s:<10} {r['median_step_ms']:8.1f} ms {r['images_per_s']:8.1f} img/s",
                      flush=True)
    finally:
        D.barrier(info)
        if info.is_main:
            shutil.rmtree(root, ignore_errors=True)
    if info.is_main:
        Path(args.worker_out).write_text(json.dumps(rows))
    dist.destroy_process_group()


# -- launcher ------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nproc: int, args, tmp: Path) -> list[dict]:
    out = tmp / f"world{nproc}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
           str(_free_port()), str(Path(__file__).resolve()), "--worker-out", str(out), *args.passthrough]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    r = subprocess.run(cmd, cwd=ROOT, env=env, check=False)
    if r.returncode != 0:
        sys.exit(f"bench_distributed: the {nproc}-process torchrun failed (exit {r.returncode}), see above")
    return json.loads(out.read_text())


def summarize(rows: list[dict], nproc: int) -> dict:
    by = {(r["strategy"], r["world"]): r for r in rows}
    base = by[("none", 1)]["images_per_s"]
    out = {}
    for s in STRATEGIES:
        one, many = by.get((s, 1)), by.get((s, nproc))
        if one and many:
            out[s] = {"scaling_vs_same_strategy_1proc": many["images_per_s"] / one["images_per_s"],
                      "scaling_vs_plain_1proc": many["images_per_s"] / base,
                      "peak_gib_per_rank": max(many["peak_gib_per_rank"])}
    return out


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--config", default="sana-0.6b", help="a sana_core.dit.DIT_CONFIGS name")
    p.add_argument("--batch", type=int, default=16, help="per GPU (per process)")
    p.add_argument("--latent", type=int, default=32, help="latent side (32 = 1024 px with DC-AE f32)")
    p.add_argument("--text-tokens", type=int, default=300)
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing (Sana presets use it)")
    p.add_argument("--bucket-mb", type=int, default=25, help="DDP bucket_cap_mb")
    p.add_argument("--strategies", default=",".join(STRATEGIES), help=f"comma list of {', '.join(STRATEGIES)}")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", default="bench/results")
    p.add_argument("--name", help="result file name (default distributed_<device>.json)")
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.strategies = [s for s in args.strategies.split(",") if s]
    bad = [s for s in args.strategies if s not in STRATEGIES]
    if bad:
        p.error(f"--strategies: {bad[0]!r} is not one of {', '.join(STRATEGIES)}")
    return args


def main(argv=None) -> dict | None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if args.worker_out:
        worker(args)
        return None
    import torch
    if args.nproc < 2:
        sys.exit("bench_distributed: --nproc must be at least 2 (it compares 1 process with --nproc)")
    if args.device == "cuda":
        n = torch.cuda.device_count()
        if n < args.nproc:
            sys.exit(f"bench_distributed: needs {args.nproc} CUDA GPUs on this host, found {n} "
                     f"(use --device cpu --config tiny for the gloo check)")
        device_name = torch.cuda.get_device_name(0)
    else:
        device_name = "cpu"
    args.passthrough = [a for a in argv if a != "--worker-out"]
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="bench-dist-") as tmp:
        rows = launch(1, args, Path(tmp)) + launch(args.nproc, args, Path(tmp))
    scaling = summarize(rows, args.nproc)
    print(f"\n{args.config}, batch {args.batch} per GPU, latent {args.latent}x{args.latent}, "
          f"{'bf16 autocast' if args.device == 'cuda' else 'fp32'}, {device_name}, 1 vs {args.nproc} processes")
    print(f"{'strategy':<10} {'world':>5} {'step ms':>9} {'img/s':>9} {'peak GiB/rank':>14} {'ckpt save s':>12}")
    for r in rows:
        print(f"{r['strategy']:<10} {r['world']:>5} {r['median_step_ms']:>9.1f} {r['images_per_s']:>9.1f} "
              f"{max(r['peak_gib_per_rank']):>14.2f} {r['checkpoint_save_s']:>12.2f}")
    for s, v in scaling.items():
        print(f"scaling {s:<10} {v['scaling_vs_same_strategy_1proc']:.3f}x over 1 process of {s}, "
              f"{v['scaling_vs_plain_1proc']:.3f}x over the plain 1-process step")
    record = {"config": args.config, "batch_per_gpu": args.batch, "latent": args.latent, "nproc": args.nproc,
              "checkpointing": args.checkpointing, "bucket_mb": args.bucket_mb, "device": device_name,
              "backend": "nccl" if args.device == "cuda" else "gloo", "torch": torch.__version__,
              "steps": args.steps, "warmup": args.warmup, "rows": rows, "scaling": scaling,
              "seconds": round(time.time() - t0, 1), "date": time.strftime("%Y-%m-%d"),
              "command": "python bench/bench_distributed.py " + " ".join(argv)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / (args.name or f"distributed_{args.device}.json")).write_text(json.dumps(record, indent=2))
    return record


if __name__ == "__main__":
    main()
