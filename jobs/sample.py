"""Sample images from a training checkpoint with Flow-DPM-Solver, decoded by DC-AE.

    python -m jobs.sample --checkpoint RUN_DIR_OR_CHECKPOINT --prompt "a red apple" --steps 20 --out out.png

--checkpoint takes a run dir (its latest checkpoint is used) or one checkpoints/step-XXXXXXXX dir. The model
is rebuilt from the config saved with the checkpoint; EMA weights are used unless --no-ema. A LoRA run's
adapter is applied to its base (the run's init_from). --checkpoint also takes what --init-from takes: a diffusers
SanaTransformer2DModel or pipeline folder (our exports included) or an NVlabs .pth.
--checkpoint LORA_DIR (pytorch_lora_weights.safetensors, e.g. our export) samples its base with it fused in.
--export-diffusers DIR also writes the DiT as a diffusers SanaTransformer2DModel folder (safetensors, the
shareable format; a sana_stack.json beside it names the text encoder and DC-AE); for a LoRA run it writes the
adapter as DIR/pytorch_lora_weights.safetensors for diffusers' SanaPipeline.load_lora_weights, and with --merged
the base with the adapter merged in as a full model folder instead.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from sana_core.errors import SanaError, cli_main


def resolve_checkpoint(path: str | Path) -> Path:
    from training.checkpoint import latest
    p = Path(path)
    if (p / "meta.json").is_file():
        return p
    for d in (p / "checkpoints", p):
        found = latest(d)
        if found is not None:
            return found
    raise SanaError(f"--checkpoint {p}: no checkpoint found (expected RUN_DIR/checkpoints/step-*/meta.json)")


def load_run(ckpt: Path, prefer_ema: bool = True):
    """(plain LinearDiT with any LoRA merged, run config, "ema"/"model", step, LoRA tensors or None)."""
    import json

    from sana_core.config import from_dict
    from sana_core.dit import LinearDiT
    from training import finetune
    from training.checkpoint import load_weights_for_inference
    from training.config import TrainConfig
    meta = json.loads((ckpt / "meta.json").read_text())
    cfg = from_dict(TrainConfig, meta["config"])
    if cfg.lora.rank <= 0:
        dit = LinearDiT(cfg.model.dit)
        return dit.eval(), cfg, load_weights_for_inference(ckpt, dit, prefer_ema=prefer_ema), meta["step"], None
    adapted = finetune.prepare_model(LinearDiT(cfg.model.dit), cfg)  # the base from init_from, adapter layers
    which = load_weights_for_inference(ckpt, adapted, prefer_ema=prefer_ema)
    sd = adapted.state_dict()
    dit = LinearDiT(cfg.model.dit)
    dit.load_state_dict(finetune.plain_state_dict(sd, cfg), strict=True)
    return dit.eval(), cfg, which, meta["step"], finetune.lora_state_dict(sd)


def load_dit(ckpt: Path, prefer_ema: bool = True):
    dit, cfg, which, step, _ = load_run(ckpt, prefer_ema)
    return dit, cfg, which, step


def load_source(spec: str):
    """A diffusers folder / Hub id or NVlabs .pth as a model to sample from (the config jobs.train would give)."""
    from sana_core.dit import LinearDiT
    from sana_core.weights import read_sidecar
    from training import finetune
    from training.config import TrainConfig
    src = finetune.resolve_source(spec)
    cfg = finetune.apply_source(TrainConfig(), src, set())
    side = read_sidecar(spec) if Path(spec).is_dir() else {}
    cfg.model.max_length = side.get("max_length", cfg.model.max_length)
    cfg.flow.shift = side.get("flow_shift", cfg.flow.shift)
    dit = LinearDiT(cfg.model.dit)
    finetune.load_source_weights(dit, src)
    return dit.eval(), cfg


def is_source(path: str) -> bool:
    p = Path(path.partition("#")[0])
    if p.is_file():
        return True
    return (p / "config.json").is_file() or (p / "transformer" / "config.json").is_file() or \
        (not p.exists() and path.count("/") == 1)  # a Hub id


def export_diffusers(dit, out: Path, cfg=None) -> None:
    import json

    from diffusers import SanaTransformer2DModel

    from sana_core.dit import to_diffusers_state_dict
    from sana_core.weights import SIDECAR
    model = SanaTransformer2DModel(**dit.cfg.to_diffusers_config())
    model.load_state_dict(to_diffusers_state_dict(dit), strict=True)
    model.save_pretrained(str(out))
    if cfg is not None:  # what jobs.sample / --init-from need to use this folder with the right encoders
        from training.finetune import sidecar
        (Path(out) / SIDECAR).write_text(json.dumps(sidecar(cfg), indent=1))


def _inference_dit(dit, args):
    """The DiT the pipeline runs: on --device (bf16 on CUDA), quantised per --quant. A copy when
    --export-diffusers needs the float model as loaded."""
    import copy

    import torch

    from sana_core.quant import quantize_dit
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    run_dit = copy.deepcopy(dit) if args.export_diffusers else dit
    return quantize_dit(run_dit.to(device, dtype), args.quant), device, dtype


def _peak_memory_text(device) -> str:
    from sana_core.pipeline import peak_memory_gib
    peak = peak_memory_gib(device)
    if peak is not None:
        return f"{peak:.2f} GiB allocated on {device}"
    import resource
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB resident (CPU)"


@cli_main
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m jobs.sample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run dir or checkpoints/step-XXXXXXXX dir")
    p.add_argument("--prompt", action="append", required=True, help="prompt (repeat for several images)")
    p.add_argument("--steps", type=int, default=20, help="sampler steps (default 20)")
    p.add_argument("--out", required=True, help="PNG file; several prompts give FILE-0.png, FILE-1.png, ...")
    p.add_argument("--height", type=int, help="pixels (default: the run's track.sample_height)")
    p.add_argument("--width", type=int, help="pixels (default: the run's track.sample_width)")
    p.add_argument("--guidance-scale", type=float, help="classifier-free guidance (default: the run's)")
    p.add_argument("--solver", choices=["flow_dpm", "euler"], default="flow_dpm")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ema", action="store_true", help="use the raw model weights instead of the EMA")
    p.add_argument("--export-diffusers", metavar="DIR", help="also save the DiT as a diffusers folder (a LoRA "
                                                              "run: the adapter in diffusers' LoRA layout)")
    p.add_argument("--base", metavar="SOURCE", help="--checkpoint is a diffusers LoRA folder: the model it applies "
                                                     "to (default: the base its sana_stack.json names)")
    p.add_argument("--merged", action="store_true", help="with --export-diffusers on a LoRA run: save the full "
                                                        "model with the adapter merged instead of the adapter")
    p.add_argument("--quant", choices=["none", "w8a8-int8", "w8a8-fp8"], default="none",
                   help="W8A8 post-training quantisation of the DiT block linears (sana_core.quant)")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available; bf16 there, float32 on cpu)")
    args = p.parse_args(argv)

    t0 = time.time()
    lora = None
    from training.finetune import is_lora_export, load_lora_export
    if is_lora_export(args.checkpoint):
        ckpt, (dit, cfg), which, step = args.checkpoint, load_lora_export(args.checkpoint, args.base), "LoRA", None
    elif is_source(args.checkpoint) and not (Path(args.checkpoint) / "checkpoints").is_dir():
        ckpt, (dit, cfg), which, step = args.checkpoint, load_source(args.checkpoint), "source", None
    else:
        ckpt = resolve_checkpoint(args.checkpoint)
        dit, cfg, which, step, lora = load_run(ckpt, prefer_ema=not args.no_ema)
    from sana_core.autoencoder import Autoencoder
    from sana_core.pipeline import SanaPipeline
    from sana_core.text_encoder import TextEncoder
    from training.trainer import resolve_model_path
    run_dit, device, dtype = _inference_dit(dit, args)
    te = TextEncoder.from_pretrained(resolve_model_path(cfg.model.text_encoder), max_length=cfg.model.max_length,
                                     device=device, dtype=dtype)
    ae = Autoencoder.from_pretrained(resolve_model_path(cfg.model.autoencoder), device=device, dtype=dtype)
    h = args.height or cfg.track.sample_height
    w = args.width or cfg.track.sample_width
    g = cfg.track.guidance_scale if args.guidance_scale is None else args.guidance_scale
    images = SanaPipeline(run_dit, te, ae)(args.prompt, height=h, width=w, steps=args.steps, guidance_scale=g,
                                       solver=args.solver, seed=args.seed, shift=cfg.flow.shift)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out] if len(images) == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(len(images))]
    for im, path in zip(images, paths):
        im.save(path)
    if args.merged and (lora is None or not args.export_diffusers):
        raise SanaError("--merged goes with --export-diffusers on a LoRA run (other runs export full models)")
    if args.export_diffusers and lora is not None and not args.merged:
        from training.finetune import export_lora
        export_lora(args.export_diffusers, lora, cfg)
    elif args.export_diffusers:
        export_diffusers(dit, Path(args.export_diffusers), cfg)
    print(f"sampled {len(images)} image(s) {w}x{h} in {time.time() - t0:.1f} s from {ckpt} (step {step}, {which} "
          f"weights, {args.solver}, {args.steps} steps, guidance {g}) -> {', '.join(map(str, paths))}"
          + (f"; diffusers export -> {args.export_diffusers}" if args.export_diffusers else ""))
    print(f"quantisation {args.quant}; peak memory {_peak_memory_text(device)}")


if __name__ == "__main__":
    sys.exit(main())
