"""The learning benchmark: proof that the stack learns text conditioning, end to end through the real code.

    python -m bench.learning.run [--steps N] [--out bench/results/learning_cpu.json] [--device cpu|cuda]
                                 [--quant w8a8-int8,w8a8-fp8] [--eval-only WORKDIR/run]

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
Sampling runs in the dtype jobs.sample uses: bfloat16 on CUDA, float32 on the CPU.

`--quant w8a8-int8,w8a8-fp8` then repeats step 3-4 with a copy of the DiT quantised by sana_core.quant.quantize_dit
for each mode, from the same noise, and reports the accuracy difference to the float model in points, the
latent-space PSNR of each quantised sample against its float twin (bench/learning/quant_eval.py) and the per-layer
errors of sana_core.quant.layer_errors. `--eval-only RUN_DIR` scores a run this script trained before (its
WORKDIR/run, kept with --workdir) without building the data or training again.
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
    p.add_argument("--quant", default="", metavar="MODE[,MODE]",
                   help="also sample with the DiT W8A8-quantised in each of these modes and compare with the float "
                        "model: w8a8-int8, w8a8-fp8 (comma separated; default none)")
    p.add_argument("--eval-only", metavar="RUN_DIR",
                   help="do not train: sample and score the checkpoint of this jobs.train run folder (WORKDIR/run of "
                        "an earlier run with --workdir); --grid defaults to the one it was trained at")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                   help="extra jobs.train config override, applied last (repeatable), e.g. --set optim.lr=5e-4")
    args = p.parse_args(argv)
    args.quant = quant_modes(args.quant)
    return args


def quant_modes(spec: str) -> list[str]:
    from sana_core.quant import MODES

    modes = [m.strip() for m in spec.split(",") if m.strip()]
    known = sorted(m for m in MODES if m != "none")
    for m in modes:
        if m not in known:
            raise SanaError(f"--quant: unknown mode {m!r}; choose from {', '.join(known)}")
    if len(set(modes)) != len(modes):
        raise SanaError(f"--quant: a mode is named twice in {spec!r}")
    return modes


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
    from jobs.sample import load_dit, resolve_checkpoint
    from sana_core.autoencoder import Autoencoder
    from sana_core.pipeline import SanaPipeline
    from sana_core.text_encoder import TextEncoder
    from training.trainer import resolve_model_path

    ckpt = resolve_checkpoint(run_dir)
    dit, cfg, which, step = load_dit(ckpt, prefer_ema=True)
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32  # as jobs.sample runs the model
    te = TextEncoder.from_pretrained(resolve_model_path(cfg.model.text_encoder), max_length=cfg.model.max_length,
                                     device=dev, dtype=dtype)
    ae = Autoencoder.from_pretrained(resolve_model_path(cfg.model.autoencoder), device=dev, dtype=dtype)
    dit = dit.to(dev, dtype)
    pipe = SanaPipeline(dit, te, ae)
    prompts = eval_prompts(args.repeats)
    texts, truths = [p for p, _ in prompts], [a for _, a in prompts]
    px = grid * ae.spatial_compression
    # One fixed noise per test prompt, shared by every condition (and every quantisation mode), so the conditions
    # differ only in the text and the modes only in the quantisation.
    noise = torch.randn(len(texts), CHANNELS, grid, grid, generator=torch.Generator().manual_seed(args.seed + 1))
    conditions = {"with_guidance": args.guidance, "text_no_guidance": 1.0,
                  # guidance 0 leaves v_uncond: the empty-prompt embedding the model saw for dropped captions.
                  "without_text": 0.0}

    def sample(p: SanaPipeline, gs: float) -> torch.Tensor:
        return p.latents(texts, height=px, width=px, steps=args.sample_steps, guidance_scale=gs, solver="flow_dpm",
                         shift=cfg.flow.shift, noise=noise)

    out, float_lat = _sample_and_score(pipe, sample, conditions, texts, truths)
    if args.quant:
        out["quant"] = _evaluate_quant(args, dit, te, ae, sample, conditions, texts, truths, out, float_lat, dtype)
    out["_meta"] = {"checkpoint": str(ckpt), "weights": which, "checkpoint_step": step, "shift": cfg.flow.shift,
                    "caption_sampler": f"{cfg.caption.mode} (T={cfg.caption.temperature})",
                    "caption_dropout": cfg.data.caption_dropout, "dit": vars(cfg.model.dit),
                    "dit_params": sum(p.numel() for p in dit.parameters()), "text_encoder": cfg.model.text_encoder,
                    "max_length": cfg.model.max_length, "lr": cfg.optim.lr, "ema_decay": cfg.ema.decay,
                    "batch_size": cfg.data.batch_size, "dtype": str(dtype).removeprefix("torch.")}
    return out


def _sample_and_score(pipe, sample, conditions: dict, texts: list, truths: list) -> tuple[dict, dict]:
    """Per condition: the score of the pipeline's latents, and the latents themselves (float32 numpy)."""
    from bench.learning.scorer import score

    out, lats = {}, {}
    for name, gs in conditions.items():
        t0 = time.time()
        lats[name] = sample(pipe, gs).float().cpu().numpy()
        res = score(list(lats[name]), truths)
        res["guidance_scale"] = gs
        res["sampling_s"] = round(time.time() - t0, 2)
        res["examples"] = [{"prompt": p, "decoded": d} for p, d in zip(texts[:4], res["decoded"][:4])]
        del res["decoded"]
        out[name] = res
    return out, lats


def _evaluate_quant(args, dit, te, ae, sample, conditions, texts, truths, float_res, float_lat, dtype) -> dict:
    """Each --quant mode: a quantised copy of the DiT sampled like the float one, compared with it."""
    import copy

    from bench.learning import quant_eval
    from sana_core.pipeline import SanaPipeline
    from sana_core.quant import QuantLinear, layer_errors, quantize_dit, summarize_layer_errors

    float_pipe = SanaPipeline(dit, te, ae)
    res = {"reference": {"dtype": str(dtype).removeprefix("torch."), "device": args.device,
                         "what": "the same EMA weights unquantised, same prompts and noise"},
           "psnr_peak": quant_eval.PSNR_PEAK, "psnr_definition": quant_eval.PSNR_DEFINITION,
           "goal_definition": quant_eval.GOAL_DEFINITION,
           "unrelated_latent_psnr": {name: quant_eval.unrelated_psnr(lat) for name, lat in float_lat.items()},
           "unrelated_latent_psnr_note": "each float sample against the next one (another prompt, another noise): "
                                         "the PSNR of a latent unrelated to its reference",
           "modes": {}}
    for mode in args.quant:
        print(f"\n=== {mode}", flush=True)
        qdit = quantize_dit(copy.deepcopy(dit), mode)
        q_res, q_lat = _sample_and_score(SanaPipeline(qdit, te, ae), sample, conditions, texts, truths)
        # Each layer quantised alone, on the float model's own activations over a whole guided sampling run.
        errors = layer_errors(dit, mode, lambda: sample(float_pipe, conditions["with_guidance"]))
        m = {"quantized_layers": sum(isinstance(x, QuantLinear) for x in qdit.modules()),
             "conditions": {name: quant_eval.compare(float_res[name], float_lat[name], q_res[name], q_lat[name],
                                                      texts)
                            for name in conditions},
             "layer_error_summary": summarize_layer_errors(errors), "layer_errors": errors}
        m["goals"] = quant_eval.goals(m)
        res["modes"][mode] = m
    return res


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
    t, d = res["training"], res.get("dataset")
    wall = f"{t['wall_s']:.0f} s wall" if t.get("wall_s") is not None else "wall not recorded"
    data = f"{d['samples']} samples of {d['latent_shape']}, " if d else ""
    print(f"\n  training: {t['steps']} steps, {wall} ({res['device']}), {data}{res['model']['dit_params']:,} DiT params"
          + (f" (trained earlier: --eval-only {res['eval_only']})" if res.get("eval_only") else ""))
    print(f"  sampler:  {res['sampler']['solver']}, {res['sampler']['steps']} steps, "
          f"{res['with_guidance']['n']} test prompts, {res['model']['weights']} weights, {res['sampler']['dtype']}")
    if "quant" in res:
        print_quant(res)


def print_quant(res: dict) -> None:
    q = res["quant"]
    ref = q["reference"]["dtype"]
    print(f"\n=== W8A8 against the {ref} model (same prompts and noise); latent PSNR, peak = max |{ref} latent| "
          f"of each sample")
    print(f"  {'condition':<18}{'model':<11}" + "".join(f"{a:>9}" for a in ("colour", "position", "size", "joint"))
          + f"{'mean attr':>10}{'d points':>9}{'PSNR mean':>10}{'min':>7}")
    for name in ("with_guidance", "text_no_guidance", "without_text"):
        f = res[name]
        print(f"  {name:<18}{ref:<11}" + "".join(f"{_pct(f['accuracy'][a]):>9}" for a in f["accuracy"])
              + f"{_pct(f['mean_attribute_accuracy']):>10}")
        for mode, m in q["modes"].items():
            c = m["conditions"][name]
            ps = c["latent_psnr"]
            num = (lambda x: "inf" if x is None else f"{x:.1f}")
            print(f"  {'':<18}{mode.removeprefix('w8a8-'):<11}" + "".join(f"{_pct(c['accuracy'][a]):>9}"
                                                                        for a in c["accuracy"])
                  + f"{_pct(c['mean_attribute_accuracy']):>10}{c['delta_points']['mean_attribute']:>+9.2f}"
                  + f"{num(ps['mean_db']):>10}{num(ps['min_db']):>7}")
        print(f"  {'':<18}{'unrelated':<11}{'(each float latent against the next one)':<46}"
              f"{q['unrelated_latent_psnr'][name]['mean_db']:>10.1f}{q['unrelated_latent_psnr'][name]['min_db']:>7.1f}")
    for mode, m in q["modes"].items():
        print(f"\n  {mode}: {m['quantized_layers']} layers quantised; each alone on the {ref} model's activations "
              f"(a guided sampling run):")
        print(f"    {'layer':<18}{'mean rel err':>13}{'max rel err':>13}{'worst block':>13}{'min cos':>10}")
        for layer, e in m["layer_error_summary"].items():
            print(f"    {layer:<18}{100 * e['mean_rel_err']:>12.2f}%{100 * e['max_rel_err']:>12.2f}%"
                  f"{e['worst_block']:>13}{e['min_cos']:>10.5f}")
        worst = m["conditions"]["with_guidance"]["worst_samples"]
        print("    lowest PSNR with guidance: " + "; ".join(f"{w['psnr_db']:.1f} dB '{w['prompt']}'" for w in worst))
        print("    goals: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in m["goals"].items()))


def _git_commit() -> str | None:
    r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False)
    return r.stdout.strip() or None


TRAIN_RECORD = "learning_bench.json"  # written into the run folder: what --eval-only cannot read from the checkpoint


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
    out = Path(args.out or REPO / "bench" / "results" / f"learning_{args.device}.json")
    t_all = time.time()

    zoo = ensure_zoo(vlms=False)  # the tiny Gemma-2 and DC-AE jobs.train loads as zoo:gemma / zoo:dcae
    if args.eval_only:
        run_dir = Path(args.eval_only)
        if not run_dir.is_dir():
            raise SanaError(f"--eval-only {run_dir}: no such run folder")
        rec_file = run_dir / TRAIN_RECORD
        record = json.loads(rec_file.read_text()) if rec_file.is_file() else {}
        grid = args.grid or record.get("grid") or setting["grid"]
        _check_grid(grid)
        print(f"=== sample and score {run_dir} (grid {grid}; "
              f"{'training record ' + str(rec_file) if record else 'no ' + TRAIN_RECORD + ' there'})", flush=True)
        ev = evaluate(args, run_dir, grid)
        training = {**record.get("training", {"wall_s": None, "command": None, "overrides": None}),
                    **_read_metrics(run_dir)}
        dataset = record.get("dataset")
        trained_by = record.get("bench_command")
    else:
        grid = setting["grid"]
        _check_grid(grid)
        work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="learning_bench_"))
        try:
            data = work / "data"
            if data.exists():
                shutil.rmtree(data)
            t0 = time.time()
            info = build_dataset(data, n=setting["samples"], grid=grid, seed=args.seed)
            print(f"dataset: {info.samples} samples of ({CHANNELS}, {info.grid}, {info.grid}) in {info.shards} "
                  f"shards ({time.time() - t0:.1f} s) -> {data}; text encoder {zoo.gemma}")
            run_dir = work / "run"
            if run_dir.exists():
                shutil.rmtree(run_dir)
            metrics, cmd, wall = train(args, setting, data, run_dir)
            dataset = {**{k: v for k, v in vars(info).items() if k != "root"}, "latent_shape": [CHANNELS, grid, grid]}
            training = {"wall_s": round(wall, 1), "command": " ".join(cmd[1:]),
                        "overrides": train_overrides(args, setting)}
            (run_dir / TRAIN_RECORD).write_text(json.dumps({"grid": grid, "training": training, "dataset": dataset,
                                                            "bench_command": _command(argv)}, indent=2) + "\n")
            training, trained_by = {**training, **metrics}, None
            print("\n=== sample and score", flush=True)
            ev = evaluate(args, run_dir, grid)
        finally:
            if not args.workdir:
                shutil.rmtree(work, ignore_errors=True)
    meta = ev.pop("_meta")
    quant = ev.pop("quant", None)
    res = {
        "benchmark": "bench.learning: attribute accuracy of latents generated from captions",
        "command": _command(argv), "eval_only": args.eval_only, "trained_by": trained_by,
        "device": args.device, "device_name": torch.cuda.get_device_name() if args.device == "cuda" else
        platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "threads": args.threads if args.device == "cpu" else None,
        **ev,
        "chance": dict(CHANCE), "mean_attribute_chance": sum(CHANCE[a] for a in ("colour", "position", "size")) / 3,
        "training": {"steps": meta["checkpoint_step"], "wall_s": training.pop("wall_s"),
                     "batch_size": meta["batch_size"], "entry_point": "python -m jobs.train --preset tiny",
                     "lr": meta["lr"], "ema_decay": meta["ema_decay"], "caption_sampler": meta["caption_sampler"],
                     "caption_dropout": meta["caption_dropout"], **training},
        "sampler": {"solver": "flow_dpm", "steps": args.sample_steps, "guidance_scale": args.guidance,
                    "shift": meta["shift"], "path": "sana_core.pipeline.SanaPipeline.latents", "dtype": meta["dtype"]},
        "model": {"dit": meta["dit"], "dit_params": meta["dit_params"], "weights": meta["weights"],
                  "checkpoint": meta["checkpoint"],
                  "text_encoder": f"{meta['text_encoder']} (frozen, random weights, via sana_core.TextEncoder)",
                  "max_length": meta["max_length"]},
        "dataset": dataset,
    }
    if quant is not None:
        res["quant"] = quant
        res["goals"] = {mode: m["goals"] for mode, m in quant["modes"].items()}
        res["goal_definition"] = quant["goal_definition"]
    res.update({"total_wall_s": round(time.time() - t_all, 1), "torch": torch.__version__,
                "git_commit": _git_commit(), "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print_table(res)
    print(f"\n  result -> {out}")


def _command(argv: list[str] | None) -> str:
    return "python -m bench.learning.run " + " ".join(argv if argv is not None else sys.argv[1:])


def _check_grid(grid: int) -> None:
    if grid < 4 or grid % 2:
        raise SanaError(f"--grid must be even and >= 4, got {grid}")


if __name__ == "__main__":
    sys.exit(main())
