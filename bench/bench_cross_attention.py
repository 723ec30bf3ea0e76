"""The Linear DiT's cross-attention (softmax attention of image tokens to a padded caption) per SDPA backend.

    python bench/bench_cross_attention.py [--shape B,N,L,heads,head_dim] [--out bench/results]

At Sana-0.6B's batch-16 training shape by default (1024 image tokens, 300 caption tokens of which a seeded
random number per sample are padding, 16 heads of 72), bf16: times forward and forward + backward of
F.scaled_dot_product_attention with the additive key-padding bias the model passes, under each backend that
accepts it (cuDNN, memory-efficient, math; flash takes no mask), and checks each against a float32 math
reference (output and the three input gradients). Prints a table, writes cross_attention_<gpu>.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from bench.timing import median_cuda_ms  # noqa: E402

BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "math": SDPBackend.MATH}
TOLERANCE = 2e-2


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="16,1024,300,16,72", help="B,N,L,heads,head_dim (Sana-0.6B, batch 16)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_cross_attention needs a CUDA GPU")
    B, N, L, h, d = map(int, args.shape.split(","))
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, h, n, d, device="cuda", generator=g, dtype=torch.bfloat16) for n in (N, L, L))
    real = torch.randint(L // 4, L + 1, (B,), device="cuda", generator=g)
    mask = torch.arange(L, device="cuda")[None] < real[:, None]  # (B, L) True = real token
    bias = ((~mask).to(q.dtype) * -10000.0)[:, None, None, :]  # as LinearDiT passes it
    dout = torch.randn(B, h, N, d, device="cuda", generator=g, dtype=torch.bfloat16)

    leaves = [t.float().requires_grad_() for t in (q, k, v)]
    with sdpa_kernel(SDPBackend.MATH):
        ref = F.scaled_dot_product_attention(*leaves, attn_mask=bias.float())
    ref_grads = torch.autograd.grad(ref, leaves, dout.float())

    gpu = torch.cuda.get_device_name()
    rows = {}
    for name, backend in BACKENDS.items():
        qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))

        def fwd():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(qq, kk, vv, attn_mask=bias)

        def fwd_bwd():
            return torch.autograd.grad(fwd(), (qq, kk, vv), dout)

        try:
            out = fwd()
            grads = fwd_bwd()
        except RuntimeError as e:  # the backend refuses this shape or mask
            rows[name] = dict(error=str(e).splitlines()[0][:200])
            continue
        errs = {n: ((x.float() - r).norm() / r.norm()).item()
                for n, x, r in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads))}
        with torch.no_grad():
            fwd_ms = median_cuda_ms(fwd, args.iters)
        rows[name] = dict(fwd_ms=fwd_ms, fwd_bwd_ms=median_cuda_ms(fwd_bwd, args.iters), rel_err=errs,
                          ok=all(e <= TOLERANCE for e in errs.values()))
    print(f"{gpu}: q (B={B}, heads={h}, N={N}, d={d}), {L} caption tokens, bf16")
    print(f"{'backend':<10} {'fwd ms':>8} {'fwd+bwd ms':>11}  relative error vs float32")
    for name, r in rows.items():
        if "error" in r:
            print(f"{name:<10} refused: {r['error']}")
            continue
        err = " ".join(f"{k} {e:.1e}" for k, e in r["rel_err"].items())
        print(f"{name:<10} {r['fwd_ms']:>8.3f} {r['fwd_bwd_ms']:>11.3f}  {err}{'' if r['ok'] else '  WRONG'}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "h200" if "H200" in gpu else "h100" if "H100" in gpu else gpu.split()[-1].lower()
    path = out / f"cross_attention_{tag}.json"
    path.write_text(json.dumps(dict(gpu=gpu, shape=dict(B=B, N=N, L=L, heads=h, head_dim=d), rows=rows), indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
