"""Could the optimizer hide behind the next step's forward? An upper bound, on the GPU, for the graphed training step.

    python bench/bench_optimizer_overlap.py [--modes train-1.6b-b8,train-0.6b-b16] [--iters 8] [--out bench/results]

At Sana-1.6B batch 8 the fused AdamW over 1.6 B float32 parameters is about 20 ms of a 162 ms step on an H100
(bench_train_step.py --profile), the same kernel diffusers' step runs, and memory-bound where the forward's GEMMs
are compute-bound. Launching each step's update on a side stream while the next forward runs would be correct
only with a wait, before each block, on that block's parameters; this measures what such a pipeline could gain
at most: the update on a side stream and the next step's forward and backward launched at once, with no wait
(the next step then reads half-updated weights: wrong numbers, the right timing). Same model, inputs and step as
bench_train_step.py's `ours-graphed-cut`. Prints, per mode, in ms a step: the sequential step, forward + backward
+ gradient norm, the optimizer step alone, and the overlapped upper bound; writes optimizer_overlap_<gpu>.json.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.bench_train_step import MODES, build_case, train_parts  # noqa: E402
from bench.timing import write_result  # noqa: E402

VARIANT = "ours-graphed-cut"


def _per_step_ms(fn, iters: int) -> float:
    """GPU time of `iters` back-to-back calls over iters (no synchronisation between calls: overlap counts)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def measure(mode_name: str, iters: int) -> dict:
    model, inp = build_case(VARIANT, MODES[mode_name])
    opt, forward_backward = train_parts(model, inp, graphed=True)
    side = torch.cuda.Stream()

    def update():
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sequential():
        forward_backward()
        update()

    def forward_backward_only():
        forward_backward()
        opt.zero_grad(set_to_none=True)

    def overlapped():
        forward_backward()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            update()
        # no wait for `side` before the next forward: the upper bound (module docstring)

    row = dict(mode=mode_name, sequential_ms=_per_step_ms(sequential, iters),
               forward_backward_ms=_per_step_ms(forward_backward_only, iters))
    forward_backward()  # gradients in place; the optimizer step alone, repeated over them
    row["optimizer_ms"] = _per_step_ms(opt.step, iters)
    opt.zero_grad(set_to_none=True)
    row["overlapped_upper_bound_ms"] = _per_step_ms(overlapped, iters)
    torch.cuda.synchronize()
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", default="train-1.6b-b8,train-0.6b-b16",
                   help=f"comma-separated training modes of {[m for m in MODES if m.startswith('train')]}")
    p.add_argument("--iters", type=int, default=8)
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    modes = args.modes.split(",")
    bad = [m for m in modes if m not in MODES or MODES[m]["kind"] != "train"]
    if bad:
        p.error(f"not training modes: {bad}")
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    rows = [measure(m, args.iters) for m in modes]
    print(f"{'mode':16} {'sequential':>11} {'fwd+bwd':>9} {'optimizer':>10} {'overlapped (bound)':>19}  ms a step")
    for r in rows:
        print(f"{r['mode']:16} {r['sequential_ms']:11.1f} {r['forward_backward_ms']:9.1f} {r['optimizer_ms']:10.1f} "
              f"{r['overlapped_upper_bound_ms']:19.1f}")
    write_result(args.out, "optimizer_overlap", dict(device=torch.cuda.get_device_name(), rows=rows,
                                                     command="python bench/bench_optimizer_overlap.py "
                                                     + " ".join(sys.argv[1:])))


if __name__ == "__main__":
    main()
