"""The learning benchmark for LoRA fine-tuning: a model pre-trained on captions that never name one attribute
learns it from a LoRA fine-tune on full captions.

    python -m bench.learning.lora [--omit colour] [--pretrain-steps N] [--lora-steps M] [--rank R]

1. pre-train the tiny DiT through jobs.train on captions without the omitted attribute's words (the objects
   still vary in it: bench.learning.dataset omit);
2. export it as a diffusers SanaTransformer2DModel folder (jobs.sample's export, the shareable format);
3. `jobs.train --init-from` that folder with `lora.rank=R` on a fresh dataset with full captions;
4. score generated latents of the base and of the LoRA run (bench.learning.run.evaluate, which loads a LoRA
   run the way jobs.sample does): the omitted attribute's accuracy before and after.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench.learning import run as R
from sana_core.errors import cli_main

REPO = Path(__file__).resolve().parents[2]


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.learning.lora", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--omit", choices=["colour", "size"], default="colour", help="attribute left out of pre-training")
    p.add_argument("--pretrain-steps", type=int, default=1000)
    p.add_argument("--lora-steps", type=int, default=500)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lora-lr", type=float, default=2e-3)
    p.add_argument("--samples", type=int, default=4096)
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "learning_lora_cpu.json"))
    p.add_argument("--workdir", help="where datasets and runs go (default: a temporary folder, removed)")
    return p.parse_args(argv)


@cli_main
def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    import torch

    from bench.learning.dataset import build_dataset
    from jobs.sample import export_diffusers, load_dit, resolve_checkpoint
    from sana_core.zoo import ensure_zoo
    torch.set_num_threads(1)
    ensure_zoo(vlms=False)
    setting = {k: (dict(v) if isinstance(v, dict) else v) for k, v in R.SETTINGS["cpu"].items()}
    setting["samples"] = a.samples
    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="learning_lora_"))
    t_all = time.time()
    try:
        base_args = R.parse_args(["--device", "cpu"])
        build_dataset(work / "data-omit", n=a.samples, grid=setting["grid"], seed=0, omit=a.omit)
        pre = dict(setting, steps=a.pretrain_steps)
        _, pre_cmd, pre_wall = R.train(base_args, pre, work / "data-omit", work / "pretrain")
        before = R.evaluate(base_args, work / "pretrain", setting["grid"])
        dit, cfg, _, _ = load_dit(resolve_checkpoint(work / "pretrain"))
        export_diffusers(dit, work / "base-diffusers", cfg)

        build_dataset(work / "data-full", n=a.samples, grid=setting["grid"], seed=1)
        lora_args = R.parse_args(["--device", "cpu", "--set", f"init_from={work / 'base-diffusers'}",
                                  "--set", f"lora.rank={a.rank}", "--set", f"optim.lr={a.lora_lr}"])
        ft = dict(setting, steps=a.lora_steps)
        _, lora_cmd, lora_wall = R.train(lora_args, ft, work / "data-full", work / "lora")
        after = R.evaluate(lora_args, work / "lora", setting["grid"])
        summary = json.loads((work / "lora" / "summary.json").read_text())
    finally:
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)
    cond = "with_guidance"
    res = {"benchmark": "bench.learning.lora: LoRA fine-tune learns an attribute pre-training never captioned",
           "command": "python -m bench.learning.lora " + " ".join(argv if argv is not None else sys.argv[1:]),
           "omitted": a.omit, "pretrain": {"steps": a.pretrain_steps, "wall_s": round(pre_wall, 1),
                                           "command": " ".join(pre_cmd[1:])},
           "lora": {"steps": a.lora_steps, "rank": a.rank, "lr": a.lora_lr, "wall_s": round(lora_wall, 1),
                    "trainable_params": summary.get("trainable_params"), "params": summary.get("params"),
                    "command": " ".join(lora_cmd[1:])},
           "accuracy_before": {k: before[k]["accuracy"] for k in ("with_guidance", "text_no_guidance",
                                                                  "without_text")},
           "accuracy_after": {k: after[k]["accuracy"] for k in ("with_guidance", "text_no_guidance",
                                                                "without_text")},
           "total_wall_s": round(time.time() - t_all, 1), "git_commit": R._git_commit(),
           "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    print(f"\n=== LoRA learning benchmark ({a.omit} never captioned in pre-training; guidance 4.5)")
    for name, acc in (("pre-trained base", before[cond]["accuracy"]), ("after LoRA", after[cond]["accuracy"])):
        print(f"  {name:<18}" + "".join(f"{k} {100 * acc[k]:5.1f}%  " for k in ("colour", "position", "size",
                                                                                "joint")))
    print(f"  result -> {a.out}")


if __name__ == "__main__":
    sys.exit(main())
