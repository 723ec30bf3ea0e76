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

With --train-checks it runs the real entry point instead (`python -m jobs.train` under torchrun, on synthetic
shards in the data contract, the --config preset, e.g. sana-0.6b at 1024 px, with the tiny zoo text encoder)
and writes distributed_train_<device>.json: 2-process FSDP2 and DDP runs and a 2-node x 1-process c10d run
against a 1-process run with optim.grad_accum_steps=2 (same samples per step and data slot, loss curves'
largest difference), and the resharded resume of a 2-process FSDP2 checkpoint in 1 process and of a
1-process checkpoint in 2 processes (continuing at the right step with the same samples). On the CPU
(--device cpu --config tiny) the same checks run with gloo.

On CUDA it refuses, in one line, to run with fewer than --nproc GPUs.

On the lent 2-GPU device (no webdataset there: carry its wheel with diffusers', and the tiny zoo), two calls,
each well under 10 minutes, carry [".whl", ".cache/zoo"], .whl holding webdataset-1.0.2 and braceexpand-0.1.7
(`.venv/bin/pip download --no-deps -d .whl webdataset==1.0.2 braceexpand==0.1.7`):
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH=/tmp/site:$PYTHONPATH || exit; \
    python3 bench/bench_distributed.py --config sana-0.6b --batch 16 --latent 32 --out $OUT \
        --name distributed_h200.json
    (same install line); python3 bench/bench_distributed.py --train-checks --config sana-0.6b --latent 32 \
        --train-steps 50 --train-batch 8 --out $OUT --name distributed_train_h200.json
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
    from training.optim import build_optimizer, clip_gradients

    dev, cuda = info.device, info.device.type == "cuda"
    torch.manual_seed(0)
    cfg = DIT_CONFIGS[args.config]
    model = LinearDiT(cfg).to(dev)
    model.gradient_checkpointing = args.checkpointing
    dcfg = DistConfig(bucket_cap_mb=args.bucket_mb, reshard_after_forward=strategy != "fsdp_keep")
    model = D.wrap(model, "fsdp" if strategy.startswith("fsdp") else strategy, info, bf16=cuda, cfg=dcfg)
    raw = D.unwrap(model)
    set_to_none = D.grads_set_to_none("fsdp" if strategy.startswith("fsdp") else strategy)
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
        gn = clip_gradients(opt, model.parameters(), 1.0)
        if hasattr(gn, "full_tensor"):
            gn = gn.full_tensor()
        opt.step()
        opt.zero_grad(set_to_none=set_to_none)
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
    if info.is_main:
        shutil.rmtree(path.parent, ignore_errors=True)  # ~10 GB for Sana-0.6B: one on disk at a time
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


# -- the real entry point: jobs.train under torchrun -----------------------------------------------------
def _train_env() -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", OMP_NUM_THREADS=os.environ.get(
        "OMP_NUM_THREADS", "1"))


def _jobs_train(run: Path, data: Path, preset: str, sets: list[str], nproc: int, device: str,
                resume: bool = False, log: Path | None = None) -> dict:
    """One jobs.train launch (plain python for 1 process, torchrun otherwise); its wall time and exit."""
    args = ["-m", "jobs.train", "--data", str(data), "--output", str(run), "--device", device, "--preset", preset,
            *[a for o in sets for a in ("--set", o)], *(["--resume"] if resume else [])]
    launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                                      "--master-port", str(_free_port())]
    t = time.time()
    with open(log or os.devnull, "w") as f:
        r = subprocess.run([sys.executable, *launcher, *args], cwd=ROOT, env=_train_env(), stdout=f,
                           stderr=subprocess.STDOUT, check=False)
    return {"exit": r.returncode, "seconds": round(time.time() - t, 1), "nproc": nproc}


def _jobs_train_two_nodes(run: Path, data: Path, preset: str, sets: list[str], device: str, log: Path) -> dict:
    """--nnodes 2 --nproc-per-node 1 with a c10d rendezvous on this host: two torchrun agents, one GPU each,
    which takes the multi-node code path (node ranks from the rendezvous, LOCAL_RANK 0 on both)."""
    port = _free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "sana-two-nodes",
           "-m", "jobs.train", "--data", str(data), "--output", str(run), "--device", device, "--preset", preset,
           *[a for o in sets for a in ("--set", o)]]
    t = time.time()
    procs = []
    for node in range(2):
        env = _train_env()
        if device == "cuda":
            env["CUDA_VISIBLE_DEVICES"] = str(node)
        f = open(log.with_suffix(f".node{node}.log"), "w")  # noqa: SIM115 - closed below
        procs.append((subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT), f))
    codes = []
    for proc, f in procs:
        codes.append(proc.wait(timeout=1800))
        f.close()
    return {"exit": max(codes), "seconds": round(time.time() - t, 1), "nproc": 2, "nnodes": 2}


def _losses(run: Path) -> dict[int, float]:
    if not (run / "metrics.jsonl").is_file():
        return {}
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def _keys(run: Path) -> dict[tuple[int, int], dict]:
    out = {}
    for f in sorted((run / "sample_keys").glob("rank-*.jsonl")) if (run / "sample_keys").is_dir() else []:
        for r in map(json.loads, f.read_text().splitlines()):
            out[r["step"], r["slot"]] = r
    return out


def _once_per_epoch(records: dict, all_keys: list[str]) -> bool:
    """No sample twice in an epoch across ranks and slots, and every sample in each epoch before the last."""
    from collections import Counter
    per: dict[int, Counter] = {}
    for r in records.values():
        per.setdefault(r["epoch"], Counter()).update(r["keys"])
    if not per or any(max(c.values()) > 1 for c in per.values()):
        return False
    return all(per[e] == Counter(all_keys) for e in per if e < max(per))


def _curve_diff(a: dict, b: dict, steps) -> dict:
    steps = [i for i in steps if i in a and i in b]
    if not steps:
        return {"steps": 0}
    absd = [abs(a[i] - b[i]) for i in steps]
    return {"steps": len(steps), "max_abs": max(absd), "max_rel": max(d / abs(b[i]) for d, i in zip(absd, steps)),
            "mean_loss": statistics.mean(b[i] for i in steps)}


def train_checks(args) -> dict:
    from training.testdata import write_shards
    cuda = args.device == "cuda"
    steps, batch = args.train_steps, args.train_batch
    half = steps // 2
    work = Path(tempfile.mkdtemp(prefix="bench-dist-train-"))
    logs = work / "logs"  # kept (copied to OUT/train_checks_logs) only when a check fails
    logs.mkdir()
    side = args.latent if cuda else 4
    n = args.train_samples
    recs = write_shards(work / "data", n=n, per_shard=max(1, n // 8), channels=32, grids=((side, side),))
    all_keys = [r["key"] for r in recs]
    data = work / "data"
    sets = ["track.wandb=false", "track.sample_prompts=[]",
            "track.log_every=1", "track.log_sample_keys=true", f"data.batch_size={batch}", "data.num_workers=2",
            "optim.name=adamw", "optim.warmup_steps=5", f"checkpoint.every={half}", "checkpoint.keep_last=3",
            f"max_steps={steps}", "model.text_encoder=zoo:gemma", "model.autoencoder=zoo:dcae",
            "model.dit.caption_channels=64"]  # the tiny zoo Gemma-2's width: no weights can be downloaded
    runs: dict[str, dict] = {}

    def go(name, nproc, extra, resume_from=None, resume_step=None):
        run = work / name
        if resume_from is not None:
            ck = f"step-{resume_step:08d}"
            (run / "checkpoints").mkdir(parents=True)
            shutil.move(work / resume_from / "checkpoints" / ck, run / "checkpoints" / ck)  # used once
            shutil.copy(work / resume_from / "config.yaml", run / "config.yaml")
        if name == "two_nodes":
            res = _jobs_train_two_nodes(run, data, args.config, [*sets, *extra], args.device, logs / name)
        else:
            res = _jobs_train(run, data, args.config, [*sets, *extra], nproc, args.device,
                              resume=resume_from is not None, log=logs / f"{name}.log")
        summary = run / "summary.json"
        res["summary"] = json.loads(summary.read_text()) if summary.is_file() else None
        res["losses"] = _losses(run)
        # A Sana-0.6B checkpoint (weights, EMA, AdamW) is ~10 GB: keep only the ones a resume below needs.
        keep = f"step-{half:08d}" if name in ("one_accum2", "fsdp2") else None
        for ck in (run / "checkpoints").glob("step-*") if (run / "checkpoints").is_dir() else []:
            if ck.name != keep:
                shutil.rmtree(ck, ignore_errors=True)
        runs[name] = res
        print(f"  {name:<14} exit {res['exit']}  {res['seconds']:7.1f} s", flush=True)
        return run

    global_batch = f"{batch} per GPU x 2"
    sets_one = ["optim.grad_accum_steps=2"]
    t0 = time.time()
    one = go("one_accum2", 1, sets_one)
    fsdp = go("fsdp2", 2, ["dist.strategy=fsdp"])
    ddp = go("ddp2", 2, ["dist.strategy=ddp"])
    nodes = go("two_nodes", 2, ["dist.strategy=fsdp", f"max_steps={half}"])
    to_one = go("fsdp2_to_one", 1, sets_one, "fsdp2", half)
    to_two = go("one_to_fsdp2", 2, ["dist.strategy=fsdp"], "one_accum2", half)
    ref_keys, ref_loss = _keys(one), _losses(one)
    tol = 2e-2 if cuda else 1e-4

    def same_samples(run, lo, hi):
        k = _keys(run)
        want = [(s, slot) for s in range(lo, hi + 1) for slot in (0, 1)]
        return bool(k) and all(w in k and w in ref_keys and k[w]["keys"] == ref_keys[w]["keys"] for w in want)

    checks = {}
    for name, run, lo, hi in (("fsdp2", fsdp, 1, steps), ("ddp2", ddp, 1, steps), ("two_nodes", nodes, 1, half),
                              ("fsdp2_to_one", to_one, half + 1, steps), ("one_to_fsdp2", to_two, half + 1, steps)):
        k = _keys(run)
        first = {key: v for key, v in ref_keys.items() if key[0] <= half} if lo > 1 else {}
        checks[name] = {"exit": runs[name]["exit"], "same_samples_as_one_accum2": same_samples(run, lo, hi),
                        "first_step": min((st for st, _ in k), default=None),
                        "each_sample_once_per_epoch": _once_per_epoch({**first, **k}, all_keys),
                        "loss_vs_one_accum2": _curve_diff(_losses(run), ref_loss, range(lo, hi + 1))}
        c = checks[name]
        c["ok"] = (c["exit"] == 0 and c["same_samples_as_one_accum2"] and c["first_step"] == lo
                   and c["each_sample_once_per_epoch"] and c["loss_vs_one_accum2"].get("max_rel", 1) < tol)
    record = {"config": args.config, "device": args.device, "steps": steps, "global_batch": global_batch,
              "samples": n, "latent": side, "loss_rel_tolerance": tol, "runs": runs, "checks": checks,
              "reference_losses": ref_loss, "seconds": round(time.time() - t0, 1),
              "all_ok": all(c["ok"] for c in checks.values()) and runs["one_accum2"]["exit"] == 0}
    if not record["all_ok"]:
        shutil.copytree(logs, Path(args.out) / "train_checks_logs", dirs_exist_ok=True)
    shutil.rmtree(work, ignore_errors=True)
    return record


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
    p.add_argument("--train-checks", action="store_true",
                   help="run jobs.train itself (see above) instead of the step benchmark")
    p.add_argument("--train-steps", type=int, default=50, help="--train-checks: optimizer steps a run")
    p.add_argument("--train-batch", type=int, default=8, help="--train-checks: batch per GPU")
    p.add_argument("--train-samples", type=int, default=256, help="--train-checks: synthetic samples")
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
    if args.train_checks:
        if args.nproc != 2:
            sys.exit("bench_distributed: --train-checks compares 2 processes with 1 (--nproc 2)")
        record = train_checks(args)
        record["command"] = "python bench/bench_distributed.py " + " ".join(argv)
        record["device_name"] = device_name
        for name, c in record["checks"].items():
            d = c["loss_vs_one_accum2"]
            print(f"{name:<14} {'ok' if c['ok'] else 'FAILED':<7} exit {c['exit']} same samples "
                  f"{c['same_samples_as_one_accum2']} first step {c['first_step']} once/epoch "
                  f"{c['each_sample_once_per_epoch']} loss max rel diff {d.get('max_rel', float('nan')):.2e} "
                  f"(abs {d.get('max_abs', float('nan')):.2e}, tolerance {record['loss_rel_tolerance']:g})")
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / (args.name or f"distributed_train_{args.device}.json")).write_text(json.dumps(record, indent=2))
        if not record["all_ok"]:
            sys.exit(f"bench_distributed --train-checks: some checks failed, logs in {out / 'train_checks_logs'}")
        return record
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
