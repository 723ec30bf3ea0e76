"""The learning benchmark: proof that the stack learns text conditioning, end to end through the real code.

    python -m bench.learning.run [--steps N] [--out bench/results/learning_cpu.json] [--device cpu|cuda]

1. writes the synthetic caption-conditioned latent dataset (bench/learning/dataset.py) as data-contract shards;
2. trains the tiny Linear DiT on it with `python -m jobs.train` -- the entry point users run: its WebDataset
   loader, CLIP-score caption sampler, caption dropout, the zoo's frozen tiny Gemma-2 through TextEncoder,
   rectified-flow loss, AdamW, EMA, DCP checkpoint;
3. loads the EMA weights the way `jobs.sample` does and samples one latent per test prompt with
   Flow-DPM-Solver through SanaPipeline.latents: with guidance, with text but no guidance, and without text
   (guidance 0: the unconditional branch the model learnt from dropped captions);
4. reads colour / position / size back from each latent (bench/learning/scorer.py) and reports accuracy
   against ground truth and chance.

A model that ignores the caption draws a random object, so only reading the text lifts accuracy above chance.
`--device cuda` defaults to a bigger setting (8x8 latents, a deeper and wider DiT, more steps).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sana_core.errors import SanaError, cli_main

REPO = Path(__file__).resolve().parents[2]

# Per-device defaults. The DiT keeps caption_channels 64 (the tiny Gemma-2's width) in both.
# Why these: the DiT has no positional encoding, so a cell learns which quadrant it is in only from the zero
# padding of the Mix-FFN's 3x3 convolutions (one cell further per block): depth >= grid / 2 + a margin. And the
# object's place is decided at high noise, where the model must use that absolute position: with flow shift 1
# (logit-normal t) colour and size reach 100% but position stays at chance after 1000 steps; Sana's shift 3
# spends training there. Through jobs.train (Gemma embeddings, paraphrased captions, EMA) position is learnt
# between steps 1000 and 1150 (loss 0.12 -> 0.10): 1000 steps left it at chance, 2000 reach 100%
# (bench/results/learning_cpu_1000steps.json, learning_cpu.json).
SETTINGS = {
    "cpu": {"grid": 4, "steps": 2000, "batch_size": 128, "samples": 4096, "flow": {"shift": 3.0},
            "dit": {"hidden_size": 64, "depth": 4}},
    "cuda": {"grid": 8, "steps": 6000, "batch_size": 128, "samples": 16384, "flow": {"shift": 3.0},
             "dit": {"hidden_size": 256, "depth": 8, "num_heads": 8, "cross_heads": 8}},
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.learning.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where to train and sample (default cpu)")
    p.add_argument("--steps", type=int, help="training steps (default: 2000 on cpu, 6000 on cuda)")
    p.add_argument("--out", help="result JSON (default: bench/results/learning_<device>.json)")
    p.add_argument("--grid", type=int, help="latent grid side, even (default: 4 on cpu, 8 on cuda)")
    p.add_argument("--samples", type=int, help="training samples (default: 4096 on cpu, 16384 on cuda)")
    p.add_argument("--batch-size", type=int, help="training batch size (default: 128)")
    p.add_argument("--repeats", type=int, default=2,
                   help="test prompts per attribute combination (32 combinations; default 2)")
    p.add_argument("--guidance", type=float, default=4.5, help="classifier-free guidance scale (default 4.5)")
    p.add_argument("--sample-steps", type=int, default=20, help="Flow-DPM-Solver steps (default 20)")
    p.add_argument("--seed", type=int, default=0, help="dataset, training and sampling noise seed")
    p.add_argument("--workdir", help="where the dataset and the run go (default: a temporary folder, removed)")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for training and sampling (default 1: the tiny model's ops are too small to "
                        "split, and on a shared 2-core machine 2 threads measured 5x slower per step)")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                   help="extra jobs.train config override, applied last (repeatable), e.g. --set optim.lr=5e-4")
    return p.parse_args(argv)


def train_overrides(args: argparse.Namespace, setting: dict) -> list[str]:
    """jobs.train --set values: the benchmark's model size and batch; no image grids, no wandb, one checkpoint."""
    sets = [f"data.batch_size={setting['batch_size']}", f"seed={args.seed}", f"data.seed={args.seed}",
            "track.wandb=false", "track.sample_prompts=[]", f"checkpoint.every={10 ** 9}", "checkpoint.keep_last=1"]
    sets += [f"model.dit.{k}={v}" for k, v in setting["dit"].items()]
    sets += [f"flow.{k}={v}" for k, v in setting["flow"].items()]
    return sets + list(args.set)


def train(args, setting: dict, data: Path, run_dir: Path) -> tuple[dict, list[str], float]:
    cmd = [sys.executable, "-m", "jobs.train", "--data", str(data), "--output", str(run_dir), "--preset", "tiny",
           "--max-steps", str(setting["steps"]), "--device", args.device]
    for s in train_overrides(args, setting):
        cmd += ["--set", s]
    print(f"\n=== train\n$ {' '.join(cmd)}", flush=True)
    env = dict(os.environ, WANDB_MODE=os.environ.get("WANDB_MODE", "offline"))
    if args.device == "cpu":
        env["OMP_NUM_THREADS"] = str(args.threads)
    t0 = time.time()
    r = subprocess.run(cmd, cwd=REPO, env=env, check=False)
    wall = time.time() - t0
    if r.returncode != 0:
        raise SanaError(f"jobs.train failed with exit code {r.returncode} (command above)")
    return _read_metrics(run_dir), cmd, wall


def _read_metrics(run_dir: Path) -> dict:
    f = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()] if f.is_file() else []
    losses = [r["loss"] for r in rows if isinstance(r.get("loss"), (int, float))]
    return {"logged_points": len(rows), "first_logged_loss": losses[0] if losses else None,
            "last_logged_loss": losses[-1] if losses else None, "last": rows[-1] if rows else None}


def evaluate(args, run_dir: Path, grid: int) -> dict:
    import torch

    from bench.learning.dataset import CHANNELS, eval_prompts
    from bench.learning.scorer import score
    from jobs.sample import load_dit, resolve_checkpoint
    from sana_core.autoencoder import Autoencoder
    from sana_core.pipeline import SanaPipeline
    from sana_core.text_encoder import TextEncoder
    from training.trainer import resolve_model_path

    ckpt = resolve_checkpoint(run_dir)
    dit, cfg, which, step = load_dit(ckpt, prefer_ema=True)
    dev = torch.device(args.device)
    te = TextEncoder.from_pretrained(resolve_model_path(cfg.model.text_encoder), max_length=cfg.model.max_length,
                                     device=dev)
    ae = Autoencoder.from_pretrained(resolve_model_path(cfg.model.autoencoder), device=dev)
    pipe = SanaPipeline(dit.to(dev), te, ae)
    prompts = eval_prompts(args.repeats)
    texts, truths = [p for p, _ in prompts], [a for _, a in prompts]
    px = grid * ae.spatial_compression
    # One fixed noise per test prompt, shared by every condition, so the conditions differ only in the text.
    noise = torch.randn(len(texts), CHANNELS, grid, grid, generator=torch.Generator().manual_seed(args.seed + 1))
    conditions = {"with_guidance": (texts, args.guidance), "text_no_guidance": (texts, 1.0),
                  # guidance 0 leaves v_uncond: the empty-prompt embedding the model saw for dropped captions.
                  "without_text": (texts, 0.0)}
    out = {}
    for name, (ps, gs) in conditions.items():
        t0 = time.time()
        lat = pipe.latents(ps, height=px, width=px, steps=args.sample_steps, guidance_scale=gs, solver="flow_dpm",
                           shift=cfg.flow.shift, noise=noise)
        res = score(list(lat.float().cpu().numpy()), truths)
        res["guidance_scale"] = gs
        res["sampling_s"] = round(time.time() - t0, 2)
        res["examples"] = [{"prompt": p, "decoded": d} for p, d in zip(texts[:4], res["decoded"][:4])]
        del res["decoded"]
        out[name] = res
    out["_meta"] = {"checkpoint": str(ckpt), "weights": which, "checkpoint_step": step, "shift": cfg.flow.shift,
                    "caption_sampler": f"{cfg.caption.mode} (T={cfg.caption.temperature})",
                    "caption_dropout": cfg.data.caption_dropout, "dit": vars(cfg.model.dit),
                    "dit_params": sum(p.numel() for p in dit.parameters()), "text_encoder": cfg.model.text_encoder,
                    "max_length": cfg.model.max_length, "lr": cfg.optim.lr, "ema_decay": cfg.ema.decay}
    return out


def _pct(x: float) -> str:
    return f"{100 * x:5.1f}%"


def print_table(res: dict) -> None:
    attrs = ("colour", "position", "size", "joint")
    print("\n=== learning benchmark: attribute accuracy of generated latents")
    print(f"  {'condition':<28}" + "".join(f"{a:>10}" for a in attrs) + f"{'mean attr':>11}")
    rows = [(f"text, guidance {res['with_guidance']['guidance_scale']:.1f}", res["with_guidance"]),
            ("text, no guidance (1.0)", res["text_no_guidance"]), ("without text (uncond)", res["without_text"])]
    for title, r in rows:
        print(f"  {title:<28}" + "".join(f"{_pct(r['accuracy'][a]):>10}" for a in attrs)
              + f"{_pct(r['mean_attribute_accuracy']):>11}")
    ch = res["chance"]
    print(f"  {'chance':<28}" + "".join(f"{_pct(ch[a]):>10}" for a in attrs)
          + f"{_pct(sum(ch[a] for a in attrs[:3]) / 3):>11}")
    t = res["training"]
    print(f"\n  training: {t['steps']} steps, {t['wall_s']:.0f} s wall ({res['device']}), "
          f"{res['dataset']['samples']} samples of {res['dataset']['latent_shape']}, "
          f"{res['model']['dit_params']:,} DiT params")
    print(f"  sampler:  {res['sampler']['solver']}, {res['sampler']['steps']} steps, "
          f"{res['with_guidance']['n']} test prompts, {res['model']['weights']} weights")


def _git_commit() -> str | None:
    r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False)
    return r.stdout.strip() or None


@cli_main
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch

    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    from bench.learning.dataset import CHANCE, CHANNELS, build_dataset
    from sana_core.zoo import ensure_zoo

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SanaError("--device cuda: no CUDA device is visible here; use --device cpu")
    setting = {k: (dict(v) if isinstance(v, dict) else v) for k, v in SETTINGS[args.device].items()}
    for k in ("grid", "steps", "samples", "batch_size"):
        if getattr(args, k) is not None:
            setting[k] = getattr(args, k)
    if setting["grid"] < 4 or setting["grid"] % 2:
        raise SanaError(f"--grid must be even and >= 4, got {setting['grid']}")
    out = Path(args.out or REPO / "bench" / "results" / f"learning_{args.device}.json")
    t_all = time.time()

    zoo = ensure_zoo(vlms=False)  # the tiny Gemma-2 and DC-AE jobs.train loads as zoo:gemma / zoo:dcae
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="learning_bench_"))
    try:
        data = work / "data"
        if data.exists():
            shutil.rmtree(data)
        t0 = time.time()
        info = build_dataset(data, n=setting["samples"], grid=setting["grid"], seed=args.seed)
        print(f"dataset: {info.samples} samples of ({CHANNELS}, {info.grid}, {info.grid}) in {info.shards} shards "
              f"({time.time() - t0:.1f} s) -> {data}; text encoder {zoo.gemma}")
        run_dir = work / "run"
        if run_dir.exists():
            shutil.rmtree(run_dir)
        metrics, cmd, wall = train(args, setting, data, run_dir)
        print("\n=== sample and score", flush=True)
        ev = evaluate(args, run_dir, setting["grid"])
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    meta = ev.pop("_meta")
    res = {
        "benchmark": "bench.learning: attribute accuracy of latents generated from captions",
        "command": "python -m bench.learning.run " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": args.device, "device_name": torch.cuda.get_device_name() if args.device == "cuda" else
        platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "threads": args.threads if args.device == "cpu" else None,
        **ev,
        "chance": dict(CHANCE), "mean_attribute_chance": sum(CHANCE[a] for a in ("colour", "position", "size")) / 3,
        "training": {"steps": meta["checkpoint_step"], "wall_s": round(wall, 1), "batch_size": setting["batch_size"],
                     "entry_point": "python -m jobs.train --preset tiny", "command": " ".join(cmd[1:]),
                     "overrides": train_overrides(args, setting), "lr": meta["lr"], "ema_decay": meta["ema_decay"],
                     "caption_sampler": meta["caption_sampler"], "caption_dropout": meta["caption_dropout"],
                     **metrics},
        "sampler": {"solver": "flow_dpm", "steps": args.sample_steps, "guidance_scale": args.guidance,
                    "shift": meta["shift"], "path": "sana_core.pipeline.SanaPipeline.latents"},
        "model": {"dit": meta["dit"], "dit_params": meta["dit_params"], "weights": meta["weights"],
                  "text_encoder": f"{meta['text_encoder']} (frozen, random weights, via sana_core.TextEncoder)",
                  "max_length": meta["max_length"]},
        "dataset": {**{k: v for k, v in vars(info).items() if k != "root"},
                    "latent_shape": [CHANNELS, info.grid, info.grid]},
        "total_wall_s": round(time.time() - t_all, 1), "torch": torch.__version__, "git_commit": _git_commit(),
        "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print_table(res)
    print(f"\n  result -> {out}")


if __name__ == "__main__":
    sys.exit(main())
