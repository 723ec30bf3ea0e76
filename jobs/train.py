"""Train the Linear DiT on curated shards.

    python -m jobs.train --data CURATED_DIR --output RUN_DIR --preset tiny --max-steps 300 [--resume]
    fine-tune released weights:  ... --init-from SOURCE [--set lora.rank=16]   (training/finetune.py)

Launchers, same training code:
    one process:  python -m jobs.train ...
    torchrun:     torchrun --nproc-per-node 8 [--nnodes N --rdzv-endpoint HOST:PORT] -m jobs.train ...
    Ray Train:    ray job submit -- python -m jobs.train ... --num-workers 8 --gpus-per-worker 1

RUN_DIR gets config.yaml, metrics.jsonl, checkpoints/step-XXXXXXXX/ (sharded, resumable), wandb/ (offline
unless WANDB_MODE is set) and samples/ (image grids from the fixed prompts). One job at a time holds RUN_DIR
(RUN_DIR/.sana.lock); a RUN_DIR holding a run is refused unless --resume continues it (config changes that
alter the model or data layout refused, others applied and printed) or --new-output moves it aside.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sana_core.config import add_config_args, load_config
from sana_core.errors import SanaError, cli_main
from training.config import PRESETS, TrainConfig


def build_config(args: argparse.Namespace, argv: list[str] | None = None) -> TrainConfig:
    overrides = list(args.set)
    if args.max_steps is not None:
        overrides.append(f"max_steps={args.max_steps}")
    cfg = load_config(TrainConfig, preset=PRESETS[args.preset], path=args.config, overrides=overrides)
    source = getattr(args, "init_from", None) or cfg.init_from
    if source:
        from training.finetune import apply_source, explicit_keys, resolve_source
        src = resolve_source(source, cfg.model.dit)
        cfg = apply_source(cfg, src, explicit_keys(args.set, args.config, args.preset,
                                                   sys.argv[1:] if argv is None else argv))
        print(f"init from {src.describe()}; text encoder {cfg.model.text_encoder}, DC-AE {cfg.model.autoencoder}"
              + (f"; LoRA rank {cfg.lora.rank} on {', '.join(cfg.lora.targets)}" if cfg.lora.rank else ""))
    return cfg


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="a curation OUTPUT dir or its shards/ dir")
    p.add_argument("--output", required=True, help="the run dir (created; reused with --resume)")
    add_config_args(p, presets=sorted(PRESETS), default_preset="tiny")
    p.add_argument("--max-steps", type=int, help="total optimizer steps (overrides max_steps)")
    p.add_argument("--resume", action="store_true", help="continue from the run dir's latest checkpoint")
    p.add_argument("--new-output", action="store_true",
                   help="the run dir holds an earlier run: move its files to RUN.old-DATE-TIME and start over "
                        "(without this or --resume such a run dir is refused)")
    p.add_argument("--init-from", metavar="SOURCE",
                   help="start from released weights: a diffusers SanaTransformer2DModel folder or Hub id, a "
                        "pipeline folder, or an NVlabs/Sana .pth (FILE.pth#ema|#state_dict); the DiT config, text "
                        "encoder and DC-AE come from it. LoRA: --set lora.rank=16 (training.finetune)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    ray = p.add_argument_group("Ray Train (instead of torchrun)")
    ray.add_argument("--num-workers", type=int, help="train on N Ray workers (ray.train.torch.TorchTrainer)")
    ray.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per Ray worker (default 0)")
    ray.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs per Ray worker (default 1)")
    ray.add_argument("--ray-address", help="cluster to join (default: RAY_ADDRESS as set by `ray job submit`, "
                                           "else a new local cluster)")
    return p


@cli_main
def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    cfg = build_config(args, argv)
    data, output = str(Path(args.data).resolve()), str(Path(args.output).resolve())
    if args.num_workers:
        from training.ray_launch import run_with_ray
        summary = run_with_ray(cfg, data, output, args.resume, args.num_workers, args.gpus_per_worker,
                               args.cpus_per_worker, args.ray_address, new_output=args.new_output)
        from training.trainer import print_summary
        print_summary(summary, Path(output))
        return
    from training.trainer import NonFiniteLoss, train
    try:
        train(cfg, data, output, resume=args.resume, device=args.device, new_output=args.new_output)
    except NonFiniteLoss as e:
        raise SanaError(str(e)) from None


if __name__ == "__main__":
    sys.exit(main())
