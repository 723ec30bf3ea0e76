"""Training-step speed of the Linear DiT on a GPU: PyTorch reference attention vs the fused Triton kernel.

    python bench/bench_train_step.py [--config sana-0.6b] [--batch 8] [--latent 32] [--out DIR]

One step = rectified-flow loss forward + backward + AdamW step, bf16 autocast, random latents and text
embeddings (300 tokens, as the Gemma-2 encoder gives). Prints a table and writes train_step.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from sana_core.dit import DIT_CONFIGS, LinearDiT  # noqa: E402
from sana_core.flow import FlowConfig, flow_loss  # noqa: E402


def run(backend: str, args) -> dict:
    os.environ["SANA_ATTENTION_BACKEND"] = backend
    torch.manual_seed(0)
    cfg = DIT_CONFIGS[args.config]
    model = LinearDiT(cfg).cuda()
    model.gradient_checkpointing = args.checkpointing
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    B, L = args.batch, 300
    x0 = torch.randn(B, cfg.in_channels, args.latent, args.latent, device="cuda")
    y = torch.randn(B, L, cfg.caption_channels, device="cuda")
    y_mask = torch.ones(B, L, dtype=torch.bool, device="cuda")
    y_mask[:, 120:] = False
    flow = FlowConfig(shift=3.0)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = flow_loss(model, x0, y, y_mask, flow)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        loss = step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    assert torch.isfinite(loss), f"non-finite loss with backend {backend}"
    times.sort()
    ms = times[len(times) // 2]
    tokens = B * args.latent * args.latent
    return dict(backend=backend, median_ms=ms, min_ms=times[0], images_per_s=B / ms * 1e3,
                tokens_per_s=tokens / ms * 1e3, peak_gib=torch.cuda.max_memory_allocated() / 2**30,
                params_m=model.num_params() / 1e6)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="sana-0.6b", choices=sorted(DIT_CONFIGS))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--latent", type=int, default=32, help="latent side (32 = 1024 px with DC-AE f32)")
    p.add_argument("--checkpointing", action="store_true")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_train_step needs a CUDA GPU")
    rows = [run(b, args) for b in ("torch", "triton")]
    print(f"\n{args.config}, batch {args.batch}, latent {args.latent}x{args.latent}, bf16 autocast, "
          f"{torch.cuda.get_device_name()}")
    print(f"{'attention':<10} {'median ms':>10} {'img/s':>8} {'peak GiB':>9}")
    for r in rows:
        print(f"{r['backend']:<10} {r['median_ms']:>10.1f} {r['images_per_s']:>8.1f} {r['peak_gib']:>9.1f}")
    print(f"speed-up of the Triton kernel: {rows[0]['median_ms'] / rows[1]['median_ms']:.2f}x")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = dict(config=args.config, batch=args.batch, latent=args.latent, checkpointing=args.checkpointing,
                  device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows,
                  speedup=rows[0]["median_ms"] / rows[1]["median_ms"], date=time.strftime("%Y-%m-%d"))
    (out / "train_step.json").write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
