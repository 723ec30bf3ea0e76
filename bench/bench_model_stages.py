"""The curation model stages at production size on one GPU, without Ray: CLIP scoring and DC-AE encoding.

    python bench/bench_model_stages.py --out bench/results/model_stages_h200.json

Random weights built from the production configs (nothing is downloaded): open_clip `ViT-L-14`
(sana_core.zoo.PRODUCTION's CLIP, pretrained=None) and diffusers' AutoencoderDC with the dc-ae-f32c32 config
(bench.bench_inference.DCAE_F32C32), saved and loaded through the stages' own loaders. Measured:
- `ClipStage` as the pipeline runs it: a batch of 1024x1024 uint8 images (the bucket size) with 4 captions each
  (one per VLM, ~60 words: chunked to the 77-token context), PIL preprocessing included; and the model alone
  (encode_image on preprocessed tensors, encode_text on tokens) to separate GPU from CPU time;
- `EncodeStage` (bf16, the production dtype) at 1024x1024 for a few batch sizes, and float32 once.
Images/s per GPU, with peak GPU memory. Throughput is weight-independent, so random weights measure it exactly.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WORDS = ("a red car parked beside a tall building under a cloudy sky with people walking on the wet street "
         "and neon signs reflecting in puddles while a dog sits near the door of a small cafe").split()


def captions(n: int, rng: np.random.Generator) -> list[str]:
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(40, 80)))) for _ in range(n)]


DEVICE = "cuda"


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _peak_gib() -> float:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if DEVICE == "cuda" else 0.0


def _reset_peak() -> None:
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()


def timed(fn, iters: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    _sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync()
    return (time.perf_counter() - t0) / iters


def bench_clip(res: dict, batch: int, size: int, rng) -> None:
    from curation.clip_score import ClipStage
    from curation.stage import clip_column
    from sana_core.zoo import PRODUCTION

    vlms = ["llava", "qwen2vl", "idefics3", "gemma3"]
    stage = ClipStage(PRODUCTION["clip_model"], "", vlms, device=DEVICE)
    imgs = np.empty(batch, dtype=object)
    for i in range(batch):
        imgs[i] = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    b = {"image": imgs}
    for v in vlms:
        b[f"caption__{v}"] = np.array(captions(batch, rng), dtype=object)
    _reset_peak()
    out = {}
    dt = timed(lambda: out.update(stage(b)), iters=3, warmup=1)
    assert all(np.isfinite(out[clip_column(v)]).all() for v in vlms)
    scorer = stage.scorer if hasattr(stage, "scorer") else None
    r = {"model": PRODUCTION["clip_model"], "batch": batch, "image_size": size, "captions_per_image": len(vlms),
         "stage_s_per_batch": round(dt, 4), "stage_images_per_s": round(batch / dt, 1),
         "peak_gib": _peak_gib()}
    if scorer is not None:
        x = torch.randn(batch, 3, 224, 224, device=DEVICE)
        tok = scorer.tokenizer(captions(batch * len(vlms), rng)).to(DEVICE)
        with torch.no_grad():
            ti = timed(lambda: scorer.model.encode_image(x), iters=10)
            tt = timed(lambda: scorer.model.encode_text(tok), iters=10)
        r.update(model_image_s=round(ti, 4), model_text_s=round(tt, 4),
                 model_images_per_s=round(batch / (ti + tt), 1))
    res["clip"] = r
    print("clip", json.dumps(r), flush=True)


def bench_dcae(res: dict, size: int, batches: list[int], rng) -> None:
    from diffusers import AutoencoderDC

    from bench.bench_inference import DCAE_F32C32
    from curation.encode import EncodeStage

    folder = Path("/tmp/dcae_f32c32_random")
    torch.manual_seed(0)
    AutoencoderDC(**DCAE_F32C32).save_pretrained(folder)
    rows = []
    for dtype, bss in (("bfloat16", batches), ("float32", batches[:1])):
        stage = EncodeStage(str(folder), device=DEVICE, dtype=dtype)
        for bs in bss:
            imgs = np.empty(bs, dtype=object)
            for i in range(bs):
                imgs[i] = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            b = {"image": imgs}
            _reset_peak()
            out = {}
            try:
                dt = timed(lambda: out.update(stage(b)), iters=3, warmup=1)
            except torch.OutOfMemoryError:
                rows.append({"dtype": dtype, "batch": bs, "error": "out of memory"})
                (torch.cuda.empty_cache() if DEVICE == "cuda" else None)
                continue
            z = out["latent"][0]
            r = {"dtype": dtype, "batch": bs, "image_size": size, "latent_shape": list(z.shape),
                 "s_per_batch": round(dt, 4), "images_per_s": round(bs / dt, 1),
                 "peak_gib": _peak_gib()}
            rows.append(r)
            print("dcae", json.dumps(r), flush=True)
        stage = None  # free its weights before the next dtype
        (torch.cuda.empty_cache() if DEVICE == "cuda" else None)
    res["dcae"] = rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(REPO / "bench/results/model_stages_h200.json"))
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--clip-batch", type=int, default=64)
    p.add_argument("--dcae-batches", type=int, nargs="+", default=[8, 16, 32])
    p.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (a dry run at small sizes)")
    args = p.parse_args()
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    rng = np.random.default_rng(0)
    res = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", "torch": torch.__version__,
           "command": "python bench/bench_model_stages.py " + " ".join(sys.argv[1:])}
    t0 = time.time()
    for name, fn in (("dcae", lambda: bench_dcae(res, args.size, args.dcae_batches, rng)),
                     ("clip", lambda: bench_clip(res, args.clip_batch, args.size, rng))):
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - keep the other stage's numbers when one fails on the device
            res[f"{name}_error"] = f"{type(e).__name__}: {e}"
            print(name, "failed:", res[f"{name}_error"], flush=True)
    res["wall_s"] = round(time.time() - t0, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
