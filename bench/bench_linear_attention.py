"""Times ReLU linear attention on the GPU: PyTorch eager reference, torch.compile of it, our Triton kernels.

    python bench/bench_linear_attention.py --out DIR [--sweep]

Inputs are laid out as the DiT produces them: one (B, N, 3, H, D) projection output qkv, which every
method is timed from (forward under no_grad; forward+backward as out = f(qkv) then
torch.autograd.grad(out, x, dO)); "ours" is the packed op the DiT calls, "ours_unpacked_grad" the q, k, v op
on qkv.unbind(2), whose gradient goes back through autograd's unbind. Times are triton.testing.do_bench medians, which
flush L2 before every call; input sets rotate as well. The HBM roofline counts q, k, v read and o
written once (forward), plus dO read and dq, dk, dv written (backward), at the measured copy bandwidth.
"ours_jit_launch" is ours with every launch going through Triton's JIT (kernels.launch.FAST_LAUNCH = False).
Prints a table and writes linear_attention_h100.json to --out.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernels import launch  # noqa: E402
from kernels import triton_linear_attention as tla
from kernels.linear_attention import linear_attention_reference

SHAPES = [(32, 36, 1024, 32), (8, 36, 4096, 32), (2, 36, 16384, 32), (16, 70, 1024, 32)]  # (B, H, N, D)
# Launch configs tried per kernel by --sweep: option i of every kernel is timed in the same run, each
# kernel's own device time read off the profiler, so one pass over i covers all four kernels.
SWEEP = {  # kv, dq: (BLOCK, num_warps, num_stages, PROGRAMS_PER_SM); out, dkv: (BLOCK, num_warps)
    "kv": [(128, 4, 3, 8), (128, 4, 3, 4), (128, 4, 4, 16), (64, 4, 3, 8), (64, 2, 4, 16), (256, 8, 3, 4),
           (128, 8, 3, 8), (64, 4, 5, 16)],
    "out": [(128, 4), (64, 4), (256, 8), (64, 2), (128, 8), (32, 2), (256, 4), (128, 2)],
    "dq": [(32, 2, 3, 8), (32, 2, 4, 16), (16, 1, 3, 8), (64, 4, 3, 8), (64, 2, 3, 8), (32, 4, 3, 8),
           (64, 4, 4, 16), (32, 1, 3, 8)],
    "dkv": [(64, 4), (64, 2), (128, 4), (32, 2), (128, 8), (32, 1), (256, 8), (64, 8)],
}
SWEEP_SHAPES = [(16, 36, 1024, 32), (32, 36, 1024, 32), (2, 36, 16384, 32)]  # train bs16, infer bs32, 4K
SWEEP_OTHER = [{"bf16_split": False}]


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=150, return_mode="median")


def bench_graph(fn) -> float:
    """Median over replays of a CUDA graph of back-to-back calls: device time without launch overhead."""
    try:
        return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
    except RuntimeError as e:  # a method that cannot be captured is reported, not fatal
        print(f"    graph capture failed: {str(e)[:200]}", flush=True)
        return float("nan")


def host_ms(fn, calls: int = 20, reps: int = 7) -> float:
    """Host time to enqueue one call, median over reps of `calls` calls (the queue stays far from full, so
    nothing waits on the device)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        times.append((t1 - t0) / calls * 1e3)
    return statistics.median(times)


class jit_launches:
    """Context: our kernels launched through Triton's JIT on every call (the path before kernels.launch.Launcher)."""

    def __enter__(self):
        self.saved, launch.FAST_LAUNCH = launch.FAST_LAUNCH, False

    def __exit__(self, *exc):
        launch.FAST_LAUNCH = self.saved


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second."""
    src = torch.randn(2**28, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


class Case:
    """Rotating input sets for one shape; `fwd(f)` and `fwd_bwd(f)` make timed closures of f(qkv)."""

    def __init__(self, B, H, N, D, dtype=torch.bfloat16, sets=3):
        self.shape = (B, N, 3, H, D)
        self.xs = [torch.randn(B, N, 3 * H * D, device="cuda", dtype=dtype, requires_grad=True)
                   for _ in range(sets)]
        self.dos = [torch.randn(B, N, H, D, device="cuda", dtype=dtype) for _ in range(sets)]
        self.i = itertools.count()

    def _next(self):
        i = next(self.i) % len(self.xs)
        return self.xs[i], self.dos[i]

    def fwd(self, f):
        def run():
            x, _ = self._next()
            with torch.no_grad():
                f(x.view(self.shape))
        return run

    def fwd_bwd(self, f):
        def run():
            x, do = self._next()
            torch.autograd.grad(f(x.view(self.shape)), x, do)
        return run


class _AllocateOnly(torch.autograd.Function):
    """Autograd node that launches nothing: its fwd+bwd host time is autograd's own cost."""

    @staticmethod
    def forward(ctx, q):
        return torch.empty(q.shape, device=q.device, dtype=q.dtype)

    @staticmethod
    def backward(ctx, do):
        return torch.empty(do.shape, device=do.device, dtype=do.dtype)


def host_breakdown(case: Case) -> dict[str, float]:
    """Host (enqueue) time of the pieces of one call of ours, ms; "JIT" = through Triton's JIT launch path."""
    x, do = case.xs[0].detach(), case.dos[0]
    q, k, v = x.view(case.shape).unbind(2)
    out, stats = tla._forward(q, k, v, 1e-15)
    grads = torch.empty_like(x).view(case.shape).unbind(2)
    B, N, H, D = q.shape
    cfg = tla.CONFIG["out"]
    grid = (B * H, triton.cdiv(N, cfg["BLOCK"]))
    split, prec = tla._precision(q.dtype)
    scalars = (N, H, *q.stride()[:3], *out.stride()[:3], 1e-15)
    consts = (D, cfg["BLOCK"], split, prec)
    res = {"torch.empty(out)": host_ms(lambda: torch.empty(q.shape, device="cuda", dtype=q.dtype)),
           "one launch (_out_kernel), direct": host_ms(lambda: tla._out_launch(
               grid, q.get_device(), (q, stats, out), scalars, consts, (("num_warps", cfg["num_warps"]),))),
           "one launch (_out_kernel), JIT": host_ms(lambda: tla._out_kernel[grid](
               q, stats, out, *scalars, *consts, num_warps=cfg["num_warps"])),
           "_forward (2 launches)": host_ms(lambda: tla._forward(q, k, v, 1e-15)),
           "_backward (2 launches)": host_ms(lambda: tla._backward(q, k, v, stats, do, 1e-15, *grads)),
           "no_grad call": host_ms(case.fwd(tla.triton_linear_attention_packed)),
           "fwd+bwd via autograd": host_ms(case.fwd_bwd(tla.triton_linear_attention_packed)),
           "fwd+bwd via autograd, allocate-only Function": host_ms(_allocate_only(case))}
    with jit_launches():
        res["_forward, JIT"] = host_ms(lambda: tla._forward(q, k, v, 1e-15))
        res["_backward, JIT"] = host_ms(lambda: tla._backward(q, k, v, stats, do, 1e-15, *grads))
        res["fwd+bwd via autograd, JIT"] = host_ms(case.fwd_bwd(tla.triton_linear_attention_packed))
    return res


def _allocate_only(case: Case):
    def run():
        x, do = case._next()
        q = x.view(case.shape).unbind(2)[0]
        torch.autograd.grad(_AllocateOnly.apply(q), x, do)
    return run


def kernel_breakdown(case: Case, iters: int = 20) -> dict[str, float]:
    """Mean device time per call of each CUDA kernel in one forward+backward of ours (ms)."""
    run = case.fwd_bwd(tla.triton_linear_attention_packed)
    run()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            run()
        torch.cuda.synchronize()
    times: dict[str, float] = {}
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            key = evt.name[:60]
            times[key] = times.get(key, 0.0) + evt.device_time / 1e3 / iters
    return times


def compiled_resources() -> dict[str, list]:
    """Registers, spills and shared memory of every compiled variant of our kernels."""
    res = {}
    for name in ("_kv_kernel", "_out_kernel", "_dq_kernel", "_dkv_kernel"):
        for cache in getattr(tla, name).device_caches.values():
            for key, k in cache[0].items():
                res.setdefault(name, []).append({"regs": k.n_regs, "spills": k.n_spills, "shared": k.metadata.shared,
                                                 "warps": k.metadata.num_warps, "key": str(key)[-120:]})
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for linear_attention_h100.json")
    ap.add_argument("--sweep", action="store_true", help="also time our kernels under several launch configs")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    ap.add_argument("--sweep-only", action="store_true", help="only the launch-config sweep (implies --sweep)")
    ap.add_argument("--name", default="linear_attention_h100.json", help="JSON file name in --out")
    args = ap.parse_args()
    args.sweep = args.sweep or args.sweep_only
    torch._dynamo.config.cache_size_limit = 64
    props = torch.cuda.get_device_properties(0)
    bw = copy_bandwidth()
    print(f"{props.name}: copy {bw / 1e12:.2f} TB/s; torch {torch.__version__}, triton {triton.__version__}",
          flush=True)
    report = {"device": props.name, "torch": torch.__version__, "triton": triton.__version__,
              "copy_TBps": bw / 1e12, "config": dict(tla.CONFIG), "shapes": [], "sweep": []}

    def unpacked(qkv):  # our kernels with the gradient going back through autograd's unbind
        return tla.triton_linear_attention(*qkv.unbind(2))

    def reference(qkv):
        return linear_attention_reference(*qkv.unbind(2))

    methods = {"eager": reference, "ours": tla.triton_linear_attention_packed,
               "ours_jit_launch": tla.triton_linear_attention_packed, "ours_unpacked_grad": unpacked}
    fwd_bwd_only = ("ours_unpacked_grad",)  # what it changes is the backward
    no_graph = ("ours_jit_launch",)  # a graph replays the kernels, not the launch path
    if not args.no_compile:
        methods["compile"] = torch.compile(reference, dynamic=False)
    rows = []
    # torch.compile leaves worker threads behind that slow the host, so it runs after everything else.
    cases = {}
    for pass_methods in ([m for m in methods if m != "compile"], [m for m in methods if m == "compile"]):
        for B, H, N, D in ([] if args.sweep_only else SHAPES):
            if not pass_methods:
                continue
            case = Case(B, H, N, D)
            tensor_bytes = B * N * H * D * 2
            roof_f, roof_fb = 4 * tensor_bytes / bw * 1e3, 11 * tensor_bytes / bw * 1e3
            entry = cases.setdefault((B, H, N, D), {"B": B, "H": H, "N": N, "D": D, "roofline_fwd_ms": roof_f,
                                                    "roofline_fwd_bwd_ms": roof_fb})
            for name in pass_methods:
                f = methods[name]
                t0 = time.time()
                launches = jit_launches() if name == "ours_jit_launch" else contextlib.nullcontext()
                with launches:
                    fwd = bench(case.fwd(f)) if name not in fwd_bwd_only else float("nan")
                    fb = bench(case.fwd_bwd(f))
                    fwd_g = bench_graph(case.fwd(f)) if name not in fwd_bwd_only + no_graph else float("nan")
                    fb_g = bench_graph(case.fwd_bwd(f)) if name not in no_graph else float("nan")
                    entry[name] = {"fwd_ms": fwd, "fwd_bwd_ms": fb, "fwd_x_roofline": fwd / roof_f,
                                   "fwd_bwd_x_roofline": fb / roof_fb, "graph_fwd_ms": fwd_g,
                                   "graph_fwd_bwd_ms": fb_g, "host_fwd_ms": host_ms(case.fwd(f)),
                                   "host_fwd_bwd_ms": host_ms(case.fwd_bwd(f))}
                rows.append((f"{B}x{H}x{N}x{D}", name, fwd, fwd / roof_f, fb, fb / roof_fb, fwd_g / roof_f,
                             fb_g / roof_fb, entry[name]["host_fwd_bwd_ms"]))
                print(f"  {rows[-1][0]:>14} {name:>18}: fwd {fwd:.3f} ms, fwd+bwd {fb:.3f} ms, graph {fwd_g:.3f} / "
                      f"{fb_g:.3f} ms, host {entry[name]['host_fwd_bwd_ms']:.3f} ms ({time.time() - t0:.0f} s)",
                      flush=True)
            if "ours" in pass_methods:
                entry["ours_kernels_ms"] = kernel_breakdown(case)
                entry["ours_host_ms"] = host_breakdown(case)
                print("   kernels:", {k: round(v, 4) for k, v in entry["ours_kernels_ms"].items()}, flush=True)
                print("   host:", {k: round(v, 4) for k, v in entry["ours_host_ms"].items()}, flush=True)
            del case
    report["shapes"] = list(cases.values())
    rows.sort(key=lambda r: [f"{s[0]}x{s[1]}x{s[2]}x{s[3]}" for s in SHAPES].index(r[0]))
    out = Path(args.out) / args.name
    out.write_text(json.dumps(report, indent=1))
    try:
        report["resources"] = compiled_resources()
        for name, variants in report["resources"].items():
            print(" ", name, [(v["regs"], v["spills"], v["shared"], v["warps"]) for v in variants], flush=True)
    except (AttributeError, KeyError, IndexError, TypeError) as e:  # Triton-internal API: report, don't fail
        report["resources"] = f"unavailable: {e!r}"

    if args.sweep:
        default = {k: (dict(v) if isinstance(v, dict) else v) for k, v in tla.CONFIG.items()}
        trials = [{kern: opts[i] for kern, opts in SWEEP.items()} for i in range(len(SWEEP["kv"]))]
        trials += SWEEP_OTHER
        for B, H, N, D in SWEEP_SHAPES:
            case = Case(B, H, N, D)
            for trial in trials:
                for key, opt in trial.items():
                    if isinstance(opt, tuple):
                        opt = dict(zip(("BLOCK", "num_warps", "num_stages", "PROGRAMS_PER_SM"), opt))
                    tla.CONFIG[key] = opt
                times = kernel_breakdown(case, iters=10)
                report["sweep"].append({"shape": [B, H, N, D], "trial": {k: list(v) if isinstance(v, tuple) else v
                                                                           for k, v in trial.items()},
                                        "kernel_ms": times})
                print(f"  sweep {B}x{H}x{N}x{D} {trial}: " + ", ".join(f"{k} {v:.4f}" for k, v in times.items()
                                                                      if k.startswith("_")), flush=True)
                tla.CONFIG.clear()
                tla.CONFIG.update({k: (dict(v) if isinstance(v, dict) else v) for k, v in default.items()})
            del case

    out.write_text(json.dumps(report, indent=1))
    print(f"\ncopy bandwidth {bw / 1e12:.2f} TB/s; times in ms (x = multiple of the HBM roofline)")
    print("do_bench (L2 flushed, launches included); graph: CUDA-graph replay x; host: enqueue time of fwd+bwd")
    print(f"{'B x H x N x D':>16} {'method':>18} {'fwd':>8} {'x':>6} {'fwd+bwd':>8} {'x':>6} {'graph x':>7} "
          f"{'graph x':>7} {'host':>6}")
    for shape, name, fwd, xf, fb, xfb, xfg, xfbg, host in rows:
        print(f"{shape:>16} {name:>18} {fwd:8.3f} {xf:6.2f} {fb:8.3f} {xfb:6.2f} {xfg:7.2f} {xfbg:7.2f} {host:6.3f}")
    for e in report["shapes"]:
        print(f"{e['B']}x{e['H']}x{e['N']}x{e['D']} roofline fwd {e['roofline_fwd_ms']:.3f} "
              f"fwd+bwd {e['roofline_fwd_bwd_ms']:.3f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
