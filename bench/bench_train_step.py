"""Training-step and inference speed of the Linear DiT against diffusers' SanaTransformer2DModel, one process.

    python bench/bench_train_step.py [--modes train-0.6b-b16,infer-0.6b-b32,...] [--variants ...]
                                     [--profile] [--out bench/results]

Variants (the same weights, copied through to_diffusers_state_dict, and the same inputs for all):
  diffusers           SanaTransformer2DModel, eager
  diffusers-compiled  the same with torch.compile of each transformer block (diffusers' regional compilation)
  ours                LinearDiT eager: fused Triton block ops and linear attention (the default on CUDA)
  ours-compiled       the same with torch.compile of each block
  ours-graphed        ours eager with the DiT's forward and backward replayed as CUDA graphs: training.graphs,
                      what the trainer runs with model.cuda_graphs=true (optimizer and clipping stay eager;
                      first step = capture); inference: the forward captured once and replayed
  ours-reference      LinearDiT eager on its PyTorch reference path (SANA_{BLOCK,ATTENTION}_BACKEND=torch)
  ours-cut            ours eager on the captions cut as the trainer cuts them (model.caption_bucket 64: the 120
                      real tokens in 128 positions instead of 300; same loss up to rounding); its MFU counts
                      the 300-token model FLOPs of the other rows, so it reads as work done per second
  ours-graphed-cut    both, with torch's fused AdamW (model.cuda_graphs=true, the default caption_bucket,
                      optim.triton=false)
  ours-graphed-cut-topt  the same with the trainer's default optimizer on CUDA, sana_core.adamw.TritonAdamW (the
                      same AdamW step in one Triton kernel that also writes the bf16 weight copies the next forward
                      reads): what the trainer runs with model.cuda_graphs=true; variants without -topt run torch's
                      fused AdamW, as diffusers' rows do
  ours-graphed-cut-xattn  the same with our Triton cross-attention named (SANA_CROSS_ATTENTION_BACKEND=triton);
                      the default on CUDA since 2026-12-06 (kernels.cross_attention). Rows of this name from
                      2026-12-05 and earlier compared it with the then default, SDPA; `*_xattn.json` of 2026-12-05
                      were run while it was the default once before: their `ours-graphed-cut` row is this variant
  ours-graphed-cut-topt-xattn  TritonAdamW and our Triton cross-attention named (today's defaults)
  ours-graphed-cut-sdpa, ours-graphed-cut-topt-sdpa  the same two with SDPA's cross-attention
                      (SANA_CROSS_ATTENTION_BACKEND=torch): the comparison since the Triton kernels are the default
Training step = rectified-flow MSE loss (sana_core.flow.flow_loss, fixed noise and t) forward + backward +
gradient clipping + fused AdamW, bf16 autocast; inference = one forward under no_grad, bf16 autocast. Text:
300 tokens of which 120 real. MFU = model FLOPs (torch's FlopCounterMode on meta tensors for the forward; a
training step counted as 3x the forward) / step time, against 989 TFLOP/s (dense bf16 peak of an H100/H200)
and against a bf16 matmul ceiling measured in the same process. Prints a table per mode and writes
train_step_<mode>_<gpu>.json; --profile adds a torch.profiler table by kernel of "ours" (or --profile-variants)
per mode.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from bench.timing import gpu_tag  # noqa: E402
from kernels.linear import copies_checked_by_caller  # noqa: E402
from sana_core.adamw import TritonAdamW  # noqa: E402
from sana_core.dit import DIT_CONFIGS, LinearDiT, to_diffusers_state_dict  # noqa: E402
from sana_core.flow import FlowConfig, flow_loss  # noqa: E402
from sana_core.text_encoder import CAPTION_BUCKET, trim_padding  # noqa: E402
from training.graphs import GraphedModel  # noqa: E402
from training.optim import clip_gradients  # noqa: E402

PEAK_TFLOPS = 989.0  # dense bf16, H100/H200 SXM
MODES = {
    "train-0.6b-b16": dict(kind="train", config="sana-0.6b", batch=16, latent=32),
    "train-0.6b-b32": dict(kind="train", config="sana-0.6b", batch=32, latent=32),
    "train-1.6b-b8": dict(kind="train", config="sana-1.6b", batch=8, latent=32),
    "infer-0.6b-b32": dict(kind="infer", config="sana-0.6b", batch=32, latent=32),
    "infer-0.6b-4k-b2": dict(kind="infer", config="sana-0.6b", batch=2, latent=128),
}
VARIANTS = ("diffusers", "diffusers-compiled", "ours", "ours-compiled", "ours-graphed", "ours-reference", "ours-cut",
            "ours-graphed-cut", "ours-graphed-cut-topt", "ours-graphed-cut-xattn", "ours-graphed-cut-topt-xattn",
            "ours-graphed-cut-sdpa", "ours-graphed-cut-topt-sdpa")
TEXT_TOKENS, REAL_TOKENS = 300, 120


class _Diffusers(nn.Module):
    """SanaTransformer2DModel behind LinearDiT's call signature (t in [0, 1], boolean caption mask)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, t, y, y_mask):
        return self.model(hidden_states=x, encoder_hidden_states=y, timestep=t * 1000.0,
                          encoder_attention_mask=y_mask.long(), return_dict=False)[0]


def _set_backends(variant: str) -> None:
    backend = "torch" if variant == "ours-reference" else "auto"
    os.environ["SANA_BLOCK_BACKEND"] = os.environ["SANA_ATTENTION_BACKEND"] = backend
    os.environ["SANA_CROSS_ATTENTION_BACKEND"] = ("triton" if variant.endswith("-xattn") else
                                                  "torch" if variant.endswith("-sdpa") else "")


def _build(variant: str, cfg) -> nn.Module:
    torch.manual_seed(0)
    ours = LinearDiT(cfg)
    if variant.startswith("diffusers"):
        from diffusers import SanaTransformer2DModel

        ref = SanaTransformer2DModel(**cfg.to_diffusers_config())
        ref.load_state_dict(to_diffusers_state_dict(ours), strict=True)
        del ours
        model = _Diffusers(ref).cuda()
        blocks = ref.transformer_blocks
    else:
        model = ours.cuda()
        blocks = ours.blocks
    if variant.endswith("compiled"):
        torch._dynamo.reset()
        for block in blocks:
            block.compile()
    return model


def _inputs(cfg, B: int, latent: int) -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)
    y_mask = torch.zeros(B, TEXT_TOKENS, dtype=torch.bool, device="cuda")
    y_mask[:, :REAL_TOKENS] = True
    x0 = torch.randn(B, cfg.in_channels, latent, latent, device="cuda", generator=g)
    return dict(x0=x0, y=torch.randn(B, TEXT_TOKENS, cfg.caption_channels, device="cuda", generator=g), y_mask=y_mask,
                noise=torch.randn(x0.shape, device="cuda", generator=g),
                t=torch.rand(B, device="cuda", generator=g))


def model_flops(cfg, B: int, latent: int) -> float:
    """Forward FLOPs of one call (matmuls, convolutions, attention) by FlopCounterMode on meta tensors."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = LinearDiT(cfg)
        x = torch.empty(B, cfg.in_channels, latent, latent)
        y = torch.empty(B, TEXT_TOKENS, cfg.caption_channels)
        mask = torch.ones(B, TEXT_TOKENS, dtype=torch.bool)
        with FlopCounterMode(display=False) as counter:
            model(x, torch.empty(B), y, mask)
    return float(counter.get_total_flops())


def matmul_ceiling_tflops(n: int = 8192, iters: int = 30) -> float:
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(5):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * n**3 * iters / (start.elapsed_time(end) * 1e-3) / 1e12


def _amp(graphed: bool) -> dict:
    # Autocast's weight cache must be off under CUDA-graph capture (its casts would be captured once, stale after).
    return dict(device_type="cuda", dtype=torch.bfloat16, cache_enabled=not graphed)


def _step_fn(model, inp: dict, kind: str, graphed: bool = False, triton_adamw: bool = False):
    amp = _amp(graphed)
    if kind == "infer":
        def step():
            with torch.no_grad(), torch.autocast(**amp):
                return model(inp["x0"], inp["t"], inp["y"], inp["y_mask"]).float().square().mean()
        return _graph(step) if graphed else step
    opt, forward_backward = train_parts(model, inp, graphed, triton_adamw)

    def step():
        loss = forward_backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    return step


def train_parts(model, inp: dict, graphed: bool, triton_adamw: bool = False):
    """A training step in two parts: -> (fused AdamW over the model's parameters, forward_backward), where
    forward_backward() runs the loss, its backward and the gradient clipping and returns the loss; the step is
    forward_backward() then the optimizer's step and zero_grad (bench_optimizer_overlap.py runs them apart).
    triton_adamw: sana_core.adamw.TritonAdamW instead of torch's fused kernel."""
    amp = _amp(graphed)
    opt = (TritonAdamW if triton_adamw else partial(torch.optim.AdamW, fused=True))(model.parameters(), lr=1e-4)
    flow = FlowConfig(shift=3.0)
    forward = GraphedModel(model) if graphed else model  # what the trainer runs with model.cuda_graphs=true

    def forward_backward():
        with torch.autocast(**amp):
            loss, _ = flow_loss(forward, inp["x0"], inp["y"], inp["y_mask"], flow, noise=inp["noise"], t=inp["t"])
        loss.backward()
        clip_gradients(opt, model.parameters(), 1.0)  # as the trainer clips: in fused AdamW's kernel
        return loss.detach()
    return opt, forward_backward


def build_case(variant: str, mode: dict) -> tuple[nn.Module, dict]:
    """The variant's model (back-ends set for it) and the mode's inputs, captions cut for the -cut variants."""
    _set_backends(variant)
    cfg = DIT_CONFIGS[mode["config"]]
    model = _build(variant, cfg)
    inp = _inputs(cfg, mode["batch"], mode["latent"])
    if "-cut" in variant:
        inp["y"], inp["y_mask"] = trim_padding(inp["y"], inp["y_mask"], REAL_TOKENS, CAPTION_BUCKET, TEXT_TOKENS)
    return model, inp


def _graph(step):
    """An inference forward captured once as a CUDA graph and replayed (warm-up on a side stream first); the
    inputs are the same tensors every call."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        first = step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), copies_checked_by_caller():  # the weights do not change: as in the pipeline
        out = step()
    calls = [first]  # the first call returns the warm-up's result; replays run the captured forward

    def replay():
        if calls:
            return calls.pop()
        graph.replay()
        return out
    return replay


def run_variant(variant: str, mode: dict, args, flops: float, ceiling: float, profile_dir: Path | None) -> dict:
    B = mode["batch"]
    row = dict(variant=variant)
    try:
        model, inp = build_case(variant, mode)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()  # from here: a CUDA graph's pool is allocated at capture
        t0 = time.perf_counter()
        step = _step_fn(model, inp, mode["kind"], graphed="graphed" in variant, triton_adamw="-topt" in variant)
        first_loss = step().item()
        row["first_step_s"] = time.perf_counter() - t0
        for _ in range(args.warmup):
            step()
        torch.cuda.synchronize()
        times = []
        for _ in range(args.iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            loss = step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        if not torch.isfinite(loss):
            raise RuntimeError(f"non-finite loss {loss.item()}")
        times.sort()
        ms = times[len(times) // 2]
        # back to back, as a trainer that does not wait for each step runs: the host's work before a step's first
        # kernel then overlaps the previous step (each timed step above starts from an idle GPU)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(args.iters):
            step()
        end.record()
        torch.cuda.synchronize()
        row["chained_ms"] = start.elapsed_time(end) / args.iters
        step_flops = flops * (3 if mode["kind"] == "train" else 1)
        achieved = step_flops / (ms * 1e-3) / 1e12
        row.update(median_ms=ms, min_ms=times[0], images_per_s=B / ms * 1e3,
                   peak_gib=torch.cuda.max_memory_allocated() / 2**30, first_loss=first_loss, last_loss=loss.item(),
                   tflops=achieved, mfu_peak=achieved / PEAK_TFLOPS, mfu_ceiling=achieved / ceiling)
        if profile_dir is not None:
            row["profile"] = _profile(step, profile_dir / f"profile_{args.current_mode}_{variant}.txt")
    except torch.cuda.OutOfMemoryError as e:
        row["error"] = f"OOM: {str(e).splitlines()[0]}"
    finally:
        model = inp = step = None  # noqa: F841 - drop the references before freeing
        gc.collect()
        torch.cuda.empty_cache()
        torch._dynamo.reset()
    return row


def _gaps(prof, steps: int = 3, top: int = 25) -> str:
    """Where the GPU idles: the kernel timeline's busy time against its span, the idle time in gaps by size, and
    the largest gaps with the kernels on either side (a graph's kernels are recorded one by one too)."""
    kernels = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                     if e.device_type == torch.autograd.DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
                     and e.time_range.end > e.time_range.start)
    if not kernels:
        return "no kernel events\n"
    busy, gaps, end, prev = 0.0, [], kernels[0][0], kernels[0][2]
    for s, e, name in kernels:
        if s > end:
            gaps.append((s - end, prev, name))
        busy += max(0.0, e - max(s, end))
        if e > end:
            end, prev = e, name
    span = end - kernels[0][0]
    idle = span - busy
    lines = [f"timeline over {steps} steps: span {span / 1e3:.1f} ms, kernels busy {busy / 1e3:.1f} ms, idle "
             f"{idle / 1e3:.1f} ms ({idle / steps / 1e3:.2f} ms a step) in {len(gaps)} gaps; {len(kernels)} kernels"]
    for lo, hi in ((0, 2), (2, 5), (5, 20), (20, 100), (100, 1e12)):
        sel = [g for g, *_ in gaps if lo <= g < hi]
        lines.append(f"  gaps {lo}-{hi if hi < 1e12 else 'inf'} us: {len(sel) / steps:.0f} a step, "
                     f"{sum(sel) / steps / 1e3:.2f} ms a step")
    after: dict[str, int] = {}  # what each memset node precedes (cuBLAS's workspace fills, torch's semaphores)
    for (_, _, a), (_, _, b) in zip(kernels, kernels[1:]):
        if a.startswith("Memset"):
            after[b[:70]] = after.get(b[:70], 0) + 1
    if after:
        lines.append(f"memsets: {sum(after.values()) / steps:.0f} a step, before:")
        lines += [f"  {n / steps:6.1f}  {name}" for name, n in sorted(after.items(), key=lambda kv: -kv[1])[:12]]
    lines.append("largest gaps (us, kernel before -> kernel after):")
    for g, a, b in sorted(gaps, reverse=True)[:top]:
        lines.append(f"  {g:9.1f}  {a[:70]} -> {b[:70]}")
    return "\n".join(lines) + "\n"


def _profile(step, path: Path) -> dict:
    """Three steps under torch.profiler: the kernel table to path, and GPU time by category."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    table = events.table(sort_by="self_cuda_time_total", row_limit=150, max_name_column_width=160)
    path.parent.mkdir(parents=True, exist_ok=True)
    gaps = _gaps(prof)
    path.write_text(table + "\n" + gaps)
    # The same by op and input shapes: which tensors the copies, adds and reductions move.
    path.with_suffix(".shapes.txt").write_text(prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cuda_time_total", row_limit=80, max_name_column_width=60, max_shapes_column_width=120))
    print("\n".join(line[:100] + line[-40:] for line in table.splitlines()[:22]))
    print("\n".join(gaps.splitlines()[:12]))
    cats: dict[str, float] = {}
    for e in events:
        us = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        # kernels only: a record_function range on the GPU (the optimizer's step, a compiled graph's call) spans
        # kernels that are counted themselves
        if not us or e.device_type != torch.autograd.DeviceType.CUDA or getattr(e, "is_user_annotation", False):
            continue
        n = e.key.lower()
        # attention first: cuDNN's SDPA kernels are named ..._sdpa_sm90_flash_... and would count as GEMMs
        cat = ("attention (sdpa)" if any(k in n for k in ("sdpa", "flash", "fmha", "attention", "efficient")) else
               "gemm" if any(k in n for k in ("gemm", "cutlass", "sm90", "nvjet", "matmul")) else
               "triton block ops" if any(k in n for k in ("_modulate", "_residual", "_conv_glu", "_bwd_input"))
               else "triton linear attention" if any(k in n for k in ("_kv_kernel", "_out_kernel", "_dq_kernel",
                                                                       "_dkv_kernel")) else
               "copy/transpose" if any(k in n for k in ("copy", "transpose", "cat")) else
               "conv" if "conv" in n else "adam" if "adam" in n else
               "reduce" if "reduce" in n else "elementwise/other")
        cats[cat] = cats.get(cat, 0.0) + us / 3 / 1e3
    print("GPU ms a step by category:", {k: round(v, 1) for k, v in sorted(cats.items(), key=lambda kv: -kv[1])})
    return cats


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {list(MODES)}")
    p.add_argument("--variants", default="diffusers,diffusers-compiled,ours,ours-compiled",
                   help=f"comma-separated, of {list(VARIANTS)}")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--profile", action="store_true", help="torch.profiler table of --profile-variants per mode")
    p.add_argument("--profile-variants", default="ours", help="comma-separated variants to profile (--profile)")
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    modes, variants = args.modes.split(","), args.variants.split(",")
    profiled = args.profile_variants.split(",")
    bad = [m for m in modes if m not in MODES] + [v for v in variants + profiled if v not in VARIANTS]
    if bad:
        sys.exit(f"unknown modes/variants {bad}; modes: {list(MODES)}, variants: {list(VARIANTS)}")
    if not torch.cuda.is_available():
        sys.exit("bench_train_step needs a CUDA GPU")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name()
    tag = gpu_tag(gpu)
    ceiling = matmul_ceiling_tflops()
    print(f"{gpu}: measured bf16 matmul ceiling {ceiling:.0f} TFLOP/s (8192^3)")
    for name in modes:
        mode = MODES[name]
        args.current_mode = name
        flops = model_flops(DIT_CONFIGS[mode["config"]], mode["batch"], mode["latent"])
        rows = [run_variant(v, mode, args, flops, ceiling, out if args.profile and v in profiled else None)
                for v in variants]
        step_kind = "train step (fwd+bwd+AdamW)" if mode["kind"] == "train" else "forward"
        print(f"\n{name}: {mode['config']}, batch {mode['batch']}, latent {mode['latent']}x{mode['latent']}, "
              f"{step_kind}, bf16 autocast, {gpu}; forward {flops / mode['batch'] / 1e12:.2f} TFLOP an image")
        print(f"{'variant':<20} {'ms':>8} {'chained':>8} {'img/s':>8} {'peak GiB':>9} {'1st step s':>10} "
              f"{'MFU 989':>8} {'MFU ceil':>8} {'loss':>8} {'last loss':>9}")
        for r in rows:
            if "error" in r:
                print(f"{r['variant']:<20} {r['error'][:80]}")
                continue
            print(f"{r['variant']:<20} {r['median_ms']:>8.1f} {r['chained_ms']:>8.1f} {r['images_per_s']:>8.1f} "
                  f"{r['peak_gib']:>9.1f} "
                  f"{r['first_step_s']:>10.1f} {r['mfu_peak']:>8.1%} {r['mfu_ceiling']:>8.1%} {r['first_loss']:>8.4f} "
                  f"{r['last_loss']:>9.4f}")
        by = {r["variant"]: r for r in rows if "error" not in r}
        speedup = None
        if "ours" in by and "diffusers-compiled" in by:
            speedup = by["diffusers-compiled"]["median_ms"] / by["ours"]["median_ms"]
            print(f"ours eager vs diffusers compiled blocks: {speedup:.2f}x")
        labels = {"ours-graphed": "ours eager + CUDA graphs",
                  "ours-cut": f"ours eager on captions cut to {CAPTION_BUCKET}-token buckets",
                  "ours-graphed-cut": f"ours + CUDA graphs on captions cut to {CAPTION_BUCKET}-token buckets",
                  "ours-graphed-cut-topt": "the same with TritonAdamW (the trainer's default on CUDA)",
                  "ours-graphed-cut-xattn": "the same with our Triton cross-attention",
                  "ours-graphed-cut-topt-xattn": "TritonAdamW and our Triton cross-attention",
                  "ours-graphed-cut-sdpa": "ours + CUDA graphs, cut captions, SDPA cross-attention",
                  "ours-graphed-cut-topt-sdpa": "the same with TritonAdamW and SDPA cross-attention"}
        for v, label in labels.items():
            if v in by and "diffusers-compiled" in by:
                print(f"{label} vs diffusers compiled blocks: "
                      f"{by['diffusers-compiled']['median_ms'] / by[v]['median_ms']:.2f}x (chained steps: "
                      f"{by['diffusers-compiled']['chained_ms'] / by[v]['chained_ms']:.2f}x)")
        record = dict(mode=name, **mode, device=gpu, torch=torch.__version__, text_tokens=TEXT_TOKENS,
                      forward_flops=flops, matmul_ceiling_tflops=ceiling, peak_tflops=PEAK_TFLOPS, rows=rows,
                      speedup_ours_eager_vs_diffusers_compiled=speedup, date=time.strftime("%Y-%m-%d"),
                      command="python bench/bench_train_step.py " + " ".join(sys.argv[1:]))
        (out / f"train_step_{name}_{tag}.json").write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
