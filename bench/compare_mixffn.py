"""Mix-FFN's GLU kernels against an earlier version of themselves, side by side in one process, on the GPU.

    git show REV:kernels/triton_mixffn.py > /tmp/before_mixffn.py
    python bench/compare_mixffn.py --before /tmp/before_mixffn.py [--shapes B,H,W,hid;...] [--out bench/results]

Loads the earlier module under another op namespace (its torch.library ops would clash with today's), then
for each shape times, with CUDA events (median of --iters), each version's forward kernel, backward-conv kernel
and backward-input kernel at its own CONFIG, and checks that the two versions write the same tensors (relative
error; both use the same SiLU approximation unless one of them changed it). Writes compare_mixffn_<gpu>.json.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.timing import median_cuda_ms, write_result  # noqa: E402
from kernels import triton_mixffn as now  # noqa: E402

# Sana-0.6B training batch 16 and inference batch 32 at 1024 px, Sana-1.6B batch 8, 4K (128x128 latents) batch 2
SHAPES = "16,32,32,2880;32,32,32,2880;8,32,32,5600;2,128,128,2880"


def load_before(path: str, namespace: str = "sana_before"):
    """A kernels/triton_mixffn.py (an earlier version) as a module, its ops renamed from sana:: to namespace::
    (registering them under sana:: again would clash with today's)."""
    src = Path(path).read_text().replace('"sana::', f'"{namespace}::')
    tmp = Path(tempfile.mkdtemp()) / f"{namespace}_mixffn.py"
    tmp.write_text(src)
    spec = importlib.util.spec_from_file_location(f"{namespace}_mixffn", tmp)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(mod, u, wt, bias, dout, dc_in, H, W):
    """Each kernel of one version: name -> callable, and the dict its outputs land in."""
    B, N, C2 = u.shape
    got = dict(out=u.new_empty((B, N, C2 // 2)), dc=torch.empty_like(u), du=torch.empty_like(u))

    def fwd():
        mod._launch_forward(u, wt, bias, got["out"], H, W)

    def bwd_conv():
        got["dbias"] = mod._launch_backward_conv(u, wt, bias, dout, got["dc"], H, W).sum(0)

    def bwd_input():
        got["dweight"] = mod._launch_backward_input(dc_in, u, wt, got["du"], H, W, True).sum(0)

    return dict(fwd=fwd, bwd_conv=bwd_conv, bwd_input=bwd_input), got


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", required=True, help="an earlier kernels/triton_mixffn.py (git show REV:...)")
    p.add_argument("--shapes", default=SHAPES, help="B,H,W,hid;... (default: %(default)s)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--name", default="", help="suffix of the result file")
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("compare_mixffn needs a CUDA GPU")
    before = load_before(args.before)
    result = dict(gpu=torch.cuda.get_device_name(), before=args.before, config_before=before.CONFIG,
                  config_now=now.CONFIG, shapes={})
    print(f"{result['gpu']}: ms per kernel call, before -> now (speedup), and |now - before| / |before|")
    for shape in args.shapes.split(";"):
        B, H, W, hid = map(int, shape.split(","))
        g = torch.Generator(device="cuda").manual_seed(0)
        u = torch.randn(B, H * W, 2 * hid, device="cuda", generator=g).to(torch.bfloat16)
        wt = now._taps_major(torch.randn(2 * hid, 1, 3, 3, device="cuda", generator=g) / 3)
        bias = torch.randn(2 * hid, device="cuda", generator=g)
        dout = torch.randn(B, H * W, hid, device="cuda", generator=g).to(torch.bfloat16)
        dc_in = torch.randn(B, H * W, 2 * hid, device="cuda", generator=g).to(torch.bfloat16)
        runs = {name: _run(mod, u, wt, bias, dout, dc_in, H, W) for name, mod in (("before", before), ("now", now))}
        rows = {}
        for k in ("fwd", "bwd_conv", "bwd_input"):
            ms = {name: median_cuda_ms(fns[k], args.iters) for name, (fns, _) in runs.items()}
            rows[k] = dict(before_ms=ms["before"], now_ms=ms["now"], speedup=ms["before"] / ms["now"])
        for out in ("out", "dc", "dbias", "du", "dweight"):
            a, b = runs["before"][1][out].float(), runs["now"][1][out].float()
            rows[f"rel_diff_{out}"] = ((b - a).norm() / a.norm()).item()
        result["shapes"][shape] = rows
        print(f"{shape:>16}: " + "; ".join(f"{k} {rows[k]['before_ms']:.3f} -> {rows[k]['now_ms']:.3f} "
                                          f"({rows[k]['speedup']:.2f}x)" for k in ("fwd", "bwd_conv", "bwd_input"))
              + "; diff " + " ".join(f"{o} {rows[f'rel_diff_{o}']:.1e}" for o in ("out", "dc", "dbias", "du", "dweight")))
    write_result(args.out, "compare_mixffn" + (f"_{args.name}" if args.name else ""), result)


if __name__ == "__main__":
    main()
