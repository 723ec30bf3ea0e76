"""AdaLN modulate and gated-residual kernels (kernels.triton_adaln) against their HBM roofline, on the GPU.

    python bench/bench_adaln.py [--shape B,N,C] [--sweep] [--out bench/results]

Times each of the four kernels as its op launches it, and the modulate pair as add_modulate runs them (20 calls
captured in a CUDA graph, the median of --iters replays: these kernels are shorter than a launch through Python,
which event timing of one call would measure), at Sana-0.6B's batch-16 shape by default (x (16, 1024, 1152)
bf16), and checks what it wrote against a float32 PyTorch reference; the bytes each must move (x, dy, branch read
once, y, dx, dbranch written once) over the measured copy bandwidth give the roofline. --sweep tries (ELEMENTS a
tile, warps[, PROGRAMS_PER_SM, STAGES][, SPLIT]) per kernel (--kernels picks them) and prints the best; CONFIG in kernels/triton_adaln.py is set from it by hand. Writes adaln_<gpu>.json.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from triton.runtime.errors import OutOfResources  # noqa: E402

from bench.timing import graphed_ms, median_cuda_ms, write_result  # noqa: E402
from kernels import triton_adaln as ta  # noqa: E402

TOLERANCE = 1e-2  # relative error (norm of the difference / norm of the reference) of bf16 outputs
LAUNCHERS = {"modulate_fwd": ta._modulate_fwd_launch, "modulate_bwd": ta._modulate_bwd_launch,
             "modulate_bwd_acc": ta._modulate_bwd_launch,
             "residual_fwd": ta._residual_fwd_launch, "residual_bwd": ta._residual_bwd_launch}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="16,1024,1152", help="B,N,C (Sana-0.6B at 1024 px, batch 16)")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--sweep", action="store_true", help="try tile configurations per kernel")
    p.add_argument("--kernels", default="modulate_fwd,modulate_bwd,residual_fwd,residual_bwd",
                   help="comma-separated: the kernels --sweep tries")
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_adaln needs a CUDA GPU")
    B, N, C = map(int, args.shape.split(","))
    torch.manual_seed(0)
    dev, bf = "cuda", torch.bfloat16
    x = (torch.randn(B, N, C, device=dev) * 2 + 0.5).to(bf)
    table = torch.randn(B, 6, C, device=dev, dtype=bf) * 0.5  # the block's (B, 6, C) chunks, read in place
    shift, scale, gate = table[:, 0:1], table[:, 1:2], table[:, 2:3]
    dy = torch.randn(B, N, C, device=dev, dtype=bf)
    branch = torch.randn(B, N, C, device=dev, dtype=bf)
    eps = 1e-6

    # float32 references of what each kernel writes
    xr, shr, scr = (t.float().detach().requires_grad_() for t in (x, shift, scale))
    y_ref = F.layer_norm(xr, (C,), eps=eps) * (1 + scr) + shr
    dx_ref, dshift_ref, dscale_ref = torch.autograd.grad(y_ref, (xr, shr, scr), dy.float())
    # add_modulate as the block runs it: s = x + branch modulated, s's own gradient dres added in the backward
    # kernel (ACC) and the column sums of the result taken there too (BIAS_SUM, a bias inside branch)
    dres = torch.randn(B, N, C, device=dev, dtype=bf)
    s_ref = (x.float() + branch.float()).to(bf).float().requires_grad_()
    ys_ref = F.layer_norm(s_ref, (C,), eps=eps) * (1 + scale.float()) + shift.float()
    ds_ref = torch.autograd.grad(ys_ref, s_ref, dy.float())[0] + dres.float()
    res_ref = x.float() + gate.float() * branch.float()
    dbranch_ref, dgate_ref = dy.float() * gate.float(), (dy.float() * branch.float()).sum(1, keepdim=True)

    copy_src = torch.empty(256 * 2**20, dtype=torch.uint8, device=dev)
    copy_dst = torch.empty_like(copy_src)
    bw = 2 * copy_src.numel() / (median_cuda_ms(lambda: copy_dst.copy_(copy_src), args.iters) * 1e-3)
    gpu = torch.cuda.get_device_name()
    n = x.numel() * x.element_size()
    print(f"{gpu}: x {tuple(x.shape)} bf16 ({n / 2**20:.0f} MiB); copy bandwidth {bw / 1e12:.2f} TB/s")
    _, mean, rstd = torch.ops.sana.modulate(x, shift, scale, eps)
    got: dict = {}

    def modulate_fwd():
        got["y"] = torch.ops.sana.modulate(x, shift, scale, eps)[0]

    def modulate_bwd():
        dx, part = torch.ops.sana.modulate_backward(dy, x, scale, mean, rstd)
        got["dx"], got["dshift"], got["dscale"] = dx, part[:, :, 0].sum(1), part[:, :, 1].sum(1)

    total, _, mean_s, rstd_s = torch.ops.sana.add_modulate(x, branch, shift, scale, eps)

    def add_modulate_fwd():
        got["ys"] = torch.ops.sana.add_modulate(x, branch, shift, scale, eps)[1]

    def add_modulate_bwd():
        ds, part = torch.ops.sana.modulate_backward(dy, total, scale, mean_s, rstd_s, dres, True)
        got["ds"], got["dbias"] = ds, part[:, :, 2].sum((0, 1))

    def residual_fwd():
        got["res"] = torch.ops.sana.gated_residual(x, gate, branch)

    def residual_bwd():
        dbranch, part = torch.ops.sana.gated_residual_backward(dy, gate, branch)
        got["dbranch"], got["dgate"] = dbranch, part.sum(1)

    kernels = {"modulate_fwd": (modulate_fwd, 2 * n), "modulate_bwd": (modulate_bwd, 3 * n),
               "add_modulate_fwd": (add_modulate_fwd, 4 * n), "add_modulate_bwd": (add_modulate_bwd, 4 * n),
               "residual_fwd": (residual_fwd, 3 * n), "residual_bwd": (residual_bwd, 3 * n)}

    def errors(name: str) -> dict:
        if name == "modulate_fwd":
            return {"y": _rel(got["y"], y_ref)}
        if name == "modulate_bwd":
            return {"dx": _rel(got["dx"], dx_ref), "dshift": _rel(got["dshift"], dshift_ref.reshape(B, C)),
                    "dscale": _rel(got["dscale"], dscale_ref.reshape(B, C))}
        if name == "add_modulate_fwd":
            return {"y": _rel(got["ys"], ys_ref)}
        if name == "add_modulate_bwd":
            return {"ds": _rel(got["ds"], ds_ref), "dbias": _rel(got["dbias"], ds_ref.sum((0, 1)))}
        if name == "residual_fwd":
            return {"y": _rel(got["res"], res_ref)}
        return {"dbranch": _rel(got["dbranch"], dbranch_ref), "dgate": _rel(got["dgate"], dgate_ref.reshape(B, C))}

    result = dict(gpu=gpu, shape=dict(B=B, N=N, C=C), copy_tb_s=bw / 1e12, config=json.loads(json.dumps(ta.CONFIG)))
    rows = {}
    for name, (fn, nbytes) in kernels.items():
        ms = graphed_ms(fn, iters=args.iters)
        rows[name] = dict(ms=ms, roofline_ms=nbytes / bw * 1e3, of_roofline=nbytes / bw * 1e3 / ms, rel_err=errors(name))
    result["timings"] = rows
    print(f"{'':<14} {'ms':>8} {'roofline ms':>12} {'of roofline':>12}  relative error vs float32")
    for name, r in rows.items():
        err = " ".join(f"{k} {v:.1e}" for k, v in r["rel_err"].items())
        print(f"{name:<14} {r['ms']:>8.4f} {r['roofline_ms']:>12.4f} {r['of_roofline']:>12.0%}  {err}")
    wrong = [k for k, r in rows.items() if any(v > TOLERANCE for v in r["rel_err"].values())]
    if wrong:
        print(f"WRONG RESULTS (relative error > {TOLERANCE}) from: {wrong}")

    if args.sweep:
        sweep = {}
        for name, (fn, nbytes) in kernels.items():
            key = {"add_modulate_fwd": "modulate_fwd", "add_modulate_bwd": "modulate_bwd_acc"}.get(name, name)
            if name not in args.kernels.split(",") or key not in ta.CONFIG:
                continue
            keep = dict(ta.CONFIG[key])
            grid = {"ELEMENTS": (1024, 2048, 4096), "num_warps": (1, 2, 4)}
            if "PROGRAMS_PER_SM" in keep:  # the reductions' tile loops: also pipeline stages
                grid = {"ELEMENTS": (2048, 4096), "num_warps": (4, 8), "PROGRAMS_PER_SM": (4,), "STAGES": (1, 2, 3)}
            if "SPLIT" in keep:  # the modulate kernels: a row as one tile or as a power of two and a tail
                grid["SPLIT"] = (False, True)
            sweep[name] = {}
            for combo in itertools.product(*grid.values()):
                cfg = dict(keep, **dict(zip(grid, combo)))
                label = " ".join(f"{k}={v}" for k, v in zip(grid, combo))
                ta.CONFIG[key] = cfg
                LAUNCHERS[key].kernels.clear()
                try:
                    ms = graphed_ms(fn)
                except (OutOfResources, RuntimeError) as e:  # a config the compiler refuses
                    sweep[name][label] = dict(error=type(e).__name__)
                    continue
                errs = errors(name)
                compiled = next(iter(LAUNCHERS[key].kernels.values()), None)
                sweep[name][label] = dict(ms=ms, of_roofline=nbytes / bw * 1e3 / ms, rel_err=errs,
                                          ok=all(v <= TOLERANCE for v in errs.values()),
                                          regs=getattr(compiled, "n_regs", None),
                                          spills=getattr(compiled, "n_spills", None))
            ta.CONFIG[key] = keep
            LAUNCHERS[key].kernels.clear()
            good = sorted((v["ms"], k) for k, v in sweep[name].items() if v.get("ok"))
            print(f"sweep {name}: best " + "; ".join(f"{k} {ms:.4f} ms" for ms, k in good[:5])
                  + f"; current {rows[name]['ms']:.4f} ms")
        result["sweep"] = sweep
    write_result(args.out, "adaln", result)


if __name__ == "__main__":
    main()
