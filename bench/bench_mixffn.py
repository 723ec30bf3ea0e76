"""Mix-FFN's fused depthwise GLU (kernels.triton_mixffn) against its HBM roofline and PyTorch, on the GPU.

    python bench/bench_mixffn.py [--shape B,H,W,hid] [--sweep [--sweep-kernels fwd,bwd_conv,bwd_input]] [--out bench/results]

Times, with CUDA events (median of --iters), the forward op (one kernel), the backward op (two kernels +
partial-sum reductions) and each kernel alone, also with the exact sigmoid in place of tanh.approx (the
*_exact_silu rows: an exp and a division for each), at Sana-0.6B's batch-16 shape by default; the bytes each
must move (read u, dout, dc once; write out, dc, du once) over the measured copy bandwidth give the roofline.
The PyTorch reference (channels-first conv2d, cuDNN) is timed beside it. --sweep tries tile configurations
(channels, warps, pipeline stages, programs an SM) per kernel and prints the best; CONFIG in kernels/triton_mixffn.py
is set from it by hand.
Writes mixffn_<gpu>.json.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from triton.runtime.errors import OutOfResources  # noqa: E402

from bench.timing import median_cuda_ms, write_result  # noqa: E402
from kernels import triton_mixffn as tm  # noqa: E402
from kernels.mixffn import depthwise_glu_reference  # noqa: E402


def _kernels(u, w, bias, dout, dc_in, H, W):
    """Each kernel alone, as the ops launch it: name -> (callable, bytes it must move, what it wrote)."""
    B, N, C2 = u.shape
    HID = C2 // 2
    wt = tm._taps_major(w)
    n = u.numel() * u.element_size()
    got = dict(out=u.new_empty((B, N, HID)), dc=torch.empty_like(u), du=torch.empty_like(u))

    def fwd():
        tm._launch_forward(u, wt, bias, got["out"], H, W)

    def bwd_conv():
        got["dbias"] = tm._launch_backward_conv(u, wt, bias, dout, got["dc"], H, W)

    def bwd_input():  # reads the reference dc, so that its check does not depend on bwd_conv
        got["dweight"] = tm._launch_backward_input(dc_in, u, wt, got["du"], H, W, False)

    def bwd_input_du_sum():  # as the model runs it: a tenth partial row, du's column sums (the expansion's bias)
        part = tm._launch_backward_input(dc_in, u, wt, got["du"], H, W, True)
        got["dweight"], got["du_sum"] = part[:, :9], part[:, 9]

    def exact(fn):  # the same with the exact SiLU (an exp and a division) instead of tanh.approx
        def run():
            fast, tm.SIGMOID_FAST = tm.SIGMOID_FAST, False
            try:
                fn()
            finally:
                tm.SIGMOID_FAST = fast
        return run

    return {"fwd": (fwd, n + n // 2), "bwd_conv": (bwd_conv, n + n // 2 + n), "bwd_input": (bwd_input, 3 * n),
            "bwd_input_du_sum": (bwd_input_du_sum, 3 * n),
            "fwd_exact_silu": (exact(fwd), n + n // 2), "bwd_conv_exact_silu": (exact(bwd_conv), n + n // 2 + n),
            "bwd_input_exact_silu": (exact(bwd_input), 3 * n)}, got


def _reference(u, w, bias, dout, H, W):
    """What each kernel must write, in float32 through PyTorch's conv2d (channels-first)."""
    B, N, C2 = u.shape
    uf = u.float().transpose(1, 2).reshape(B, C2, H, W).requires_grad_()
    wf = w.detach().clone().requires_grad_()
    conv = F.conv2d(F.silu(uf), wf, bias, padding=1, groups=C2)
    a, g = conv.chunk(2, dim=1)
    out = a * F.silu(g)
    d = dout.float().transpose(1, 2).reshape(out.shape)
    dc = torch.autograd.grad(out, conv, d, retain_graph=True)[0]
    dc_tok = dc.flatten(2).transpose(1, 2).to(u.dtype)  # what bwd_input reads
    du, dw = torch.autograd.grad(conv, (uf, wf), dc_tok.float().transpose(1, 2).reshape(dc.shape))
    tok = lambda x: x.flatten(2).transpose(1, 2)  # noqa: E731
    return dict(out=tok(out), dc=tok(dc), du=tok(du), dweight=dw.reshape(C2, 9).t(), dbias=dc.sum((0, 2, 3)),
                du_sum=du.sum((0, 2, 3))), dc_tok


def _errors(got, ref) -> dict:
    """Relative error of what each kernel wrote (partial sums reduced) against the float32 reference."""
    have = dict(out=got["out"], dc=got.get("dc"), du=got.get("du"),
                dweight=got["dweight"].sum(0) if "dweight" in got else None,
                dbias=got["dbias"].sum(0) if "dbias" in got else None,
                du_sum=got["du_sum"].sum(0) if "du_sum" in got else None)
    return {k: ((v.float() - ref[k]).norm() / ref[k].norm()).item() for k, v in have.items() if v is not None}


KERNEL_OUTPUTS = {"fwd": ("out",), "bwd_conv": ("dc", "dbias"), "bwd_input": ("du", "dweight"),
                  "bwd_input_du_sum": ("du", "dweight", "du_sum"),
                  "fwd_exact_silu": ("out",), "bwd_conv_exact_silu": ("dc", "dbias"),
                  "bwd_input_exact_silu": ("du", "dweight")}
TOLERANCE = 2e-2  # bf16 storage of out/dc/du


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="16,32,32,2880", help="B,H,W,hid (Sana-0.6B at 1024 px, batch 16)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--sweep", action="store_true", help="try tile configurations per kernel")
    p.add_argument("--sweep-kernels", default="fwd,bwd_conv,bwd_input", help="which kernels --sweep tries")
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_mixffn needs a CUDA GPU")
    B, H, W, hid = map(int, args.shape.split(","))
    torch.manual_seed(0)
    dev = "cuda"
    u = torch.randn(B, H * W, 2 * hid, device=dev, dtype=torch.bfloat16)
    w = torch.randn(2 * hid, 1, 3, 3, device=dev) / 3
    bias = torch.randn(2 * hid, device=dev)
    dout = torch.randn(B, H * W, hid, device=dev, dtype=torch.bfloat16)
    copy_src = torch.empty(256 * 2**20, dtype=torch.uint8, device=dev)
    copy_dst = torch.empty_like(copy_src)
    copy_ms = median_cuda_ms(lambda: copy_dst.copy_(copy_src), args.iters)
    bw = 2 * copy_src.numel() / (copy_ms * 1e-3)  # bytes/s, read + write
    gpu = torch.cuda.get_device_name()
    print(f"{gpu}: u {tuple(u.shape)} bf16 ({u.numel() * 2 / 2**20:.0f} MiB); copy bandwidth {bw / 1e12:.2f} TB/s")
    result = dict(gpu=gpu, shape=dict(B=B, H=H, W=W, hid=hid), copy_tb_s=bw / 1e12, config=dict(tm.CONFIG))

    ref, dc_in = _reference(u, w, bias, dout, H, W)
    kernels, got = _kernels(u, w, bias, dout, dc_in, H, W)
    rows = {}
    for name, (fn, nbytes) in kernels.items():
        ms = median_cuda_ms(fn, args.iters)
        errs = {k: v for k, v in _errors(got, ref).items() if k in KERNEL_OUTPUTS[name]}
        rows[name] = dict(ms=ms, roofline_ms=nbytes / bw * 1e3, of_roofline=nbytes / bw * 1e3 / ms, rel_err=errs)

    def op_fwd():
        return torch.ops.sana.depthwise_glu(u, w, bias, None, H, W)

    def op_bwd():
        return torch.ops.sana.depthwise_glu_backward(dout, u, w, bias, H, W, False)

    rows["op forward"] = dict(ms=median_cuda_ms(op_fwd, args.iters))
    rows["op backward"] = dict(ms=median_cuda_ms(op_bwd, args.iters))
    ur, wr, br = (t.detach().requires_grad_() for t in (u, w, bias))

    def ref_fwd_bwd():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            depthwise_glu_reference(ur, wr, br, (H, W)).backward(dout)

    rows["torch reference fwd+bwd"] = dict(ms=median_cuda_ms(ref_fwd_bwd, args.iters))
    rows["ours fwd+bwd"] = dict(ms=rows["op forward"]["ms"] + rows["op backward"]["ms"])
    result["timings"] = rows
    print(f"{'':<26} {'ms':>8} {'roofline ms':>12} {'of roofline':>12}  relative error vs float32")
    for name, r in rows.items():
        roof = f"{r['roofline_ms']:>12.3f}" if "roofline_ms" in r else " " * 12
        frac = f"{r['of_roofline']:>12.0%}" if "of_roofline" in r else " " * 12
        err = " ".join(f"{k} {v:.1e}" for k, v in r.get("rel_err", {}).items())
        print(f"{name:<26} {r['ms']:>8.3f} {roof} {frac}  {err}")
    wrong = [n for n, r in rows.items() if any(v > TOLERANCE for v in r.get("rel_err", {}).values())]
    if wrong:
        print(f"WRONG RESULTS (relative error > {TOLERANCE}) from: {wrong}")

    if args.sweep:
        # channels x warps (1-2 channels a thread) x pipeline stages, and programs an SM
        cols = [dict(BLOCK_C=bc, num_warps=nw, STAGES=st)
                for bc, nw in ((128, 4), (256, 4), (256, 8), (512, 8)) for st in (3, 4)]
        cols += [dict(BLOCK_C=256, num_warps=4, STAGES=4, PROGRAMS_PER_SM=pps) for pps in (2, 8)]
        sweep = {}
        for name in (k for k in kernels if k in tm.CONFIG and k in args.sweep_kernels.split(",")):
            keep = dict(tm.CONFIG[name])
            sweep[name] = {}
            for change in cols:
                key = "_".join(f"{k}{v}" for k, v in change.items())
                tm.CONFIG[name] = dict(keep, **change)
                launcher = tm._bwd_input_launch if name == "bwd_input" else tm._conv_glu_launch
                launcher.kernels.clear()
                for t in (got["out"], got["dc"], got["du"]):  # a configuration that writes nothing fails its check
                    t.fill_(float("nan"))
                try:
                    ms = median_cuda_ms(kernels[name][0], 10)
                except (OutOfResources, RuntimeError) as e:  # a config the compiler refuses (registers, shared memory)
                    sweep[name][key] = dict(error=type(e).__name__)
                    continue
                errs = {k: v for k, v in _errors(got, ref).items() if k in KERNEL_OUTPUTS[name]}
                compiled = next(iter(launcher.kernels.values()), None)  # what ran: its registers and spills
                sweep[name][key] = dict(ms=ms, rel_err=errs, ok=all(v <= TOLERANCE for v in errs.values()),
                                        regs=getattr(compiled, "n_regs", None), spills=getattr(compiled, "n_spills", None))
            tm.CONFIG[name] = keep
            good = [(v["ms"], k) for k, v in sweep[name].items() if v.get("ok")]
            print(f"sweep {name}: best {min(good)[1] if good else None} {min(good)[0] if good else 0:.3f} ms; "
                  + ", ".join(f"{k} {v['ms']:.3f} (r{v['regs']}/s{v['spills']}){'' if v['ok'] else ' WRONG'}"
                              if "ms" in v else f"{k} {v['error']}"
                              for k, v in sweep[name].items()))
        result["sweep"] = sweep
    write_result(args.out, "mixffn", result)


if __name__ == "__main__":
    main()
