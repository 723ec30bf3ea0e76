"""Instruction counts of the Mix-FFN GLU kernels' row loop, from an offline sm_90 compile (no GPU needed).

    python bench/sass_mixffn.py [--before FILE] [--shape B,H,W,hid] [--out bench/results]

Compiles each kernel of kernels/triton_mixffn.py (and of an earlier version, FILE from
`git show REV:kernels/triton_mixffn.py`) for sm_90 at its CONFIG and its plan at the shape (Sana-0.6B's batch 16 by default), bf16, with Triton's bundled ptxas, disassembles
the cubin with the bundled cuobjdump, and counts the SASS instructions of the main loop's body (the longest
backward branch), its tanh (MUFU) ops and the registers. Divided by the outputs a thread computes a row step, that
is the number that showed the kernels bound by instruction issue (bench/NOTES_block_fastpath.md). A version is
told apart by its kernels' signature: column kernels take BLOCK_C only, the earlier tile kernels BLOCK_W too.
Writes sass_mixffn.json.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from bench.compare_mixffn import load_before  # noqa: E402

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
POINTERS = {"u_ptr": "*bf16", "dc_ptr": "*bf16", "dout_ptr": "*bf16", "out_ptr": "*bf16", "du_ptr": "*bf16",
            "w_ptr": "*fp32", "bias_ptr": "*fp32", "part_ptr": "*fp32"}


def _loop(sass: list[str]) -> list[str]:
    """The instructions of the longest backward branch's body (the row loop)."""
    addr = {int(m.group(1), 16): i for i, line in enumerate(sass) if (m := re.search(r"/\*([0-9a-f]{4,})\*/", line))}
    best = (0, -1)
    for i, line in enumerate(sass):
        m, here = re.search(r"BRA (?:`\()?.*?0x([0-9a-f]+)", line), re.search(r"/\*([0-9a-f]{4,})\*/", line)
        if m and here and int(m.group(1), 16) < int(here.group(1), 16) and int(m.group(1), 16) in addr:
            start = addr[int(m.group(1), 16)]
            if i - start > best[1] - best[0]:
                best = (start, i)
    return [line for line in sass[best[0]:best[1] + 1] if re.match(r"\s+/\*[0-9a-f]{4,}\*/", line)]


def count(fn, consts: dict, ints: dict, num_warps: int) -> dict:
    """Compile fn for sm_90 -> registers, loop instructions and tanh ops a row step. ints: the int arguments'
    values at the shape, specialized as the JIT does at a launch (a multiple of 16 is marked so, a 1 is a
    constant): the address arithmetic depends on it."""
    params = list(inspect.signature(fn.fn).parameters)
    consts = dict(consts, **{p: 1 for p in params if ints.get(p) == 1})
    sig = {p: POINTERS.get(p, "constexpr" if p in consts else "i32") for p in params}
    attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(params)
             if sig[p].startswith("*") or (sig[p] == "i32" and ints[p] % 16 == 0)}
    k = triton.compile(ASTSource(fn, sig, {p: consts[p] for p in params if p in consts}, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps))
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(k.asm["cubin"])
    try:
        run = lambda *a: subprocess.run([str(BIN / "cuobjdump"), *a, f.name], capture_output=True, text=True,  # noqa: E731
                                        check=True).stdout
        regs = int(re.search(r"REG:(\d+)", run("--dump-resource-usage")).group(1))
        body = _loop(run("-sass").splitlines())
    finally:
        os.unlink(f.name)
    return dict(regs=regs, loop_instructions=len(body), tanh=sum("MUFU.TANH" in line for line in body))


def kernels(mod, B: int, H: int, W: int, hid: int, sms: int) -> dict:
    """name -> (jit function, constexprs, int arguments, warps, outputs a thread computes a row step) at the
    module's CONFIG and plan for the shape on a GPU of `sms` SMs."""
    mod.sm_count = lambda device: sms  # _plan reads it from the module's namespace
    out = {}
    for name, fn, extra in (("fwd", mod._conv_glu, dict(BACKWARD=False)), ("bwd_conv", mod._conv_glu, dict(BACKWARD=True)),
                            ("bwd_input", mod._bwd_input, dict(DU_SUM=True))):
        cfg = mod.CONFIG[name]
        consts = dict(extra, BLOCK_C=cfg["BLOCK_C"], STAGES=cfg["STAGES"], FAST=True)
        cols = getattr(mod, "COLS", None)
        if "BLOCK_W" in cfg:  # a (columns x channels) tile a program, spread over its threads
            consts["BLOCK_W"] = cfg["BLOCK_W"]
            per_thread = cfg["BLOCK_W"] * cfg["BLOCK_C"] // (32 * cfg["num_warps"])
        else:  # COLS column vectors of BLOCK_C channels
            per_thread = cols * cfg["BLOCK_C"] // (32 * cfg["num_warps"])
        channels = 2 * hid if name == "bwd_input" else hid
        n_wseg, band = mod._plan(B, H, W, channels, cfg, 0)["scalars"]
        ints = dict(H=H, W=W, HID=hid, C2=2 * hid, n_wseg=n_wseg, band=band)
        out[name] = (fn, consts, ints, cfg["num_warps"], per_thread)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", help="an earlier kernels/triton_mixffn.py (git show REV:...)")
    p.add_argument("--shape", default="16,32,32,2880", help="B,H,W,hid the plan is made for (default: %(default)s)")
    p.add_argument("--sms", type=int, default=132, help="SMs of the GPU the plan is made for (H100/H200: 132)")
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    B, H, W, hid = map(int, args.shape.split(","))
    # today's module loaded the same way, so that pointing its _plan at args.sms leaves kernels.triton_mixffn alone
    versions = {"now": load_before(str(Path(__file__).resolve().parents[1] / "kernels" / "triton_mixffn.py"), "sana_now")}
    if args.before:
        versions = {"before": load_before(args.before), **versions}
    result = dict(shape=args.shape, sms=args.sms)
    print(f"{'version':<8} {'kernel':<10} {'regs':>5} {'loop instr':>11} {'tanh':>5} {'outputs/thread':>15} "
          f"{'instr/output':>13}")
    for vname, mod in versions.items():
        result[vname] = {}
        for kname, (fn, consts, ints, warps, per_thread) in kernels(mod, B, H, W, hid, args.sms).items():
            r = count(fn, consts, ints, warps)
            r.update(outputs_per_thread=per_thread, instructions_per_output=r["loop_instructions"] / per_thread,
                     config=mod.CONFIG[kname])
            result[vname][kname] = r
            print(f"{vname:<8} {kname:<10} {r['regs']:>5} {r['loop_instructions']:>11} {r['tanh']:>5} "
                  f"{per_thread:>15} {r['instructions_per_output']:>13.1f}")
    out = Path(args.out) / "sass_mixffn.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
